"""Secrets never shown: each password shape through the real CLI (a sweep on PostgreSQL
with an MLflow server that `hpo ui` started on PostgreSQL), then every place a secret
could land is searched: stdout/stderr, MLflow params and tags, the study's attrs, Ray's
session logs, the command lines of the servers. Plus the redactor on its own."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from urllib.parse import quote

import psutil
import pytest

from hpo.errors import HpoError
from hpo.secrets import redact_url, scrub, url_secrets
from tests.conftest import hpo_env, run_hpo

TINY = '''
import hpo

sweep = hpo.Sweep(metric="score", direction="maximize", trials=2, max_steps=1, eval_every=1,
                  pruner="none", sampler="random", seed=0, concurrency=1)


def space(trial):
    return {"x": trial.suggest_float("x", 0.0, 1.0)}


def train(params, report):
    import os

    print("trial output goes to Ray's logs")
    exposed = sum(("Secret-" in v or "Slash-91" in v) for v in os.environ.values())
    report(1, {"score": params["x"], "env_secrets": exposed})  # what a worker's environment holds
'''


@pytest.mark.parametrize(("url", "shown", "secrets"), [
    ("postgresql://hpo:ab/cd@db/optuna", "postgresql://hpo:***@db/optuna", ["ab/cd"]),
    ("postgresql://hpo@db:5432/optuna?password=zz-Top&sslmode=require",
     "postgresql://hpo@db:5432/optuna?password=***&sslmode=require", ["zz-Top"]),
    ("https://bob:hunter2@mlflow.example.com", "https://bob:***@mlflow.example.com", ["hunter2"]),
    ("postgresql://hpo:p%40ss%3Aw%252F@db/optuna", "postgresql://hpo:***@db/optuna", ["p%40ss%3Aw%252F", "p@ss:w%2F"]),
    ("postgresql://hpo:p@ss:w%2F@db:5432/optuna", "postgresql://***@db:5432/optuna", ["p@ss:w%2F", "p@ss:w/"]),
    ("postgresql://hpo:p@ss@db/optuna?sslmode=x", "postgresql://***@db/optuna?***", ["p@ss"]),
    ("sqlite:///hpo.db", "sqlite:///hpo.db", []),
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000", []),
])
def test_redact_each_shape(url: str, shown: str, secrets: list[str]) -> None:
    assert redact_url(url) == shown
    assert set(secrets) <= set(url_secrets(url))
    text = scrub(f"could not connect to {url} (password {secrets[0] if secrets else ''})", url)
    assert not [s for s in secrets if s in text] and shown in text


def test_http_credentials_go_in_a_header_never_in_the_url(monkeypatch: pytest.MonkeyPatch) -> None:
    """check_tracking strips the user info before the request and sends it as basic auth,
    the way MLflow's MLFLOW_TRACKING_USERNAME/PASSWORD do; the URI MLflow gets has none."""
    from hpo.record.tracking import check_tracking
    from hpo.secrets import use_credentials, without_credentials

    seen = []

    class Health(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            seen.append((self.path, self.headers.get("Authorization")))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    try:
        uri = f"http://bob:{quote('s/e@c:r%t', safe='')}@127.0.0.1:{server.server_port}"
        check_tracking(uri)
        import base64

        assert seen == [("/health", "Basic " + base64.b64encode(b"bob:s/e@c:r%t").decode())]
        assert use_credentials(uri) == f"http://127.0.0.1:{server.server_port}"
        assert os.environ["MLFLOW_TRACKING_PASSWORD"] == "s/e@c:r%t"
        with without_credentials():
            assert "MLFLOW_TRACKING_PASSWORD" not in os.environ
        assert os.environ["MLFLOW_TRACKING_PASSWORD"] == "s/e@c:r%t"
    finally:
        server.shutdown()
    with pytest.raises(HpoError) as error:  # no port: urllib used to quote 'hunter2@localhost'
        check_tracking("https://bob:hunter2@localhost")
    assert "hunter2" not in str(error.value) and "https://bob:***@localhost" in str(error.value)


def test_the_health_check_sends_the_password_to_the_tracking_server_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """A tracking server that redirects /health to another host (here 'localhost' for
    '127.0.0.1', another port) does not get the Basic auth forwarded there; a redirect on the
    server itself keeps it."""
    from hpo.record.tracking import check_tracking

    seen: list[tuple[str, str, str | None]] = []

    def server(name: str, answer: Callable[[BaseHTTPRequestHandler], None]) -> HTTPServer:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                seen.append((name, self.path, self.headers.get("Authorization")))
                answer(self)

            def log_message(self, *args: object) -> None:
                pass

        started = HTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=started.serve_forever, daemon=True).start()
        return started

    def ok(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.end_headers()

    elsewhere = server("elsewhere", ok)

    def redirect(handler: BaseHTTPRequestHandler) -> None:  # /health -> /healthz (here) -> another host
        handler.send_response(302)
        handler.send_header("Location", "/healthz" if handler.path == "/health"
                            else f"http://localhost:{elsewhere.server_port}/health")
        handler.end_headers()

    tracking = server("tracking", redirect)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "bob")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "s3cret-Pw")
    try:
        check_tracking(f"http://127.0.0.1:{tracking.server_port}")
    finally:
        tracking.shutdown()
        elsewhere.shutdown()
    import base64

    basic = "Basic " + base64.b64encode(b"bob:s3cret-Pw").decode()
    assert seen == [("tracking", "/health", basic), ("tracking", "/healthz", basic),
                    ("elsewhere", "/health", None)], seen


@contextlib.contextmanager
def postgres_database() -> Iterator[str]:
    import psycopg

    name = f"hpo_test_{uuid.uuid4().hex[:10]}"
    admin = psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=test", autocommit=True)
    admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield name
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start(args: list[str], cwd: Path, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "hpo", *args], cwd=cwd, env=hpo_env(env), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def wait_for_http(url: str, process: subprocess.Popen, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stdout.read() if process.stdout else ""
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.3)
    raise AssertionError(f"{url} did not answer in {seconds} s")


def command_lines(process: subprocess.Popen) -> str:
    """The command lines of ``process`` and all its descendants, as `ps` shows them."""
    family = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
    return "\n".join(" ".join(p.cmdline()) for p in family if p.is_running())


def stop(process: subprocess.Popen) -> str:
    family = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
    for member in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.kill()
    out, _ = process.communicate(timeout=30)
    return out


@pytest.mark.slow
@pytest.mark.postgres
def test_each_password_shape_never_leaks(tmp_path: Path, postgres_url: str) -> None:
    study_db = postgres_url.rsplit("/", 1)[1]
    mlflow_password = "At@Colon:Pct%2F-55"  # '@', ':' and a literal '%2F', percent-encoded in the URL
    storage_slash = f"postgresql://postgres:ab/cd-Slash-91@127.0.0.1:5432/{study_db}"
    storage_query = f"postgresql://postgres@127.0.0.1:5432/{study_db}?password=Query-Secret-73"
    secrets = ["ab/cd-Slash-91", "Query-Secret-73", mlflow_password, quote(mlflow_password, safe=""),
               "Http-Secret-64", "Hunter2-NoPort"]
    texts: dict[str, str] = {}
    (tmp_path / "tiny.py").write_text(TINY)
    ray_tmp = Path(tempfile.mkdtemp(prefix="rs", dir="/tmp"))  # short: Ray's socket paths have a length limit
    with postgres_database() as mlflow_db:
        backend = f"postgresql://postgres:{quote(mlflow_password, safe='')}@127.0.0.1:5432/{mlflow_db}"
        port = free_port()
        ui = start(["ui", "--tracking-uri", backend, "--port", str(port)], tmp_path)
        dashboard_port = free_port()
        dashboard = None
        try:
            wait_for_http(f"http://127.0.0.1:{port}/health", ui)
            texts["ui command lines"] = command_lines(ui)
            tracking = f"http://bob:Http-Secret-64@127.0.0.1:{port}"
            sweep = run_hpo(["search", "tiny.py", "--storage", storage_slash, "--tracking-uri", tracking], tmp_path,
                            env={"RAY_TMPDIR": str(ray_tmp)})
            assert sweep.returncode == 0, sweep.stdout + sweep.stderr
            assert f"postgres:***@127.0.0.1:5432/{study_db}" in sweep.stdout
            texts["sweep"] = sweep.stdout + sweep.stderr

            dashboard = start(["dashboard", "--storage", storage_slash, "--port", str(dashboard_port)], tmp_path)
            wait_for_http(f"http://127.0.0.1:{dashboard_port}/api/studies", dashboard)
            texts["dashboard command lines"] = command_lines(dashboard)
        finally:
            texts["ui output"] = stop(ui)
            if dashboard is not None:
                texts["dashboard output"] = stop(dashboard)
        assert "***" in texts["ui output"] and "***" in texts["dashboard output"]

        status = run_hpo(["status", "--storage", storage_query, "--json"], tmp_path)
        assert status.returncode == 0, status.stderr
        texts["status"] = status.stdout + status.stderr
        no_port = run_hpo(["search", "tiny.py", "--tracking-uri", "https://bob:Hunter2-NoPort@localhost"], tmp_path)
        assert no_port.returncode == 2 and "https://bob:***@localhost" in no_port.stderr, no_port.stderr
        texts["no port"] = no_port.stdout + no_port.stderr

        from mlflow.tracking import MlflowClient

        client = MlflowClient(backend)
        experiment = client.get_experiment_by_name("tiny")
        runs = client.search_runs([experiment.experiment_id])
        assert len(runs) == 3, "the sweep's run and its 2 trials were logged through the server"
        assert runs[0].data.tags.get("hpo.storage", "").startswith("postgresql://postgres:***@") or any(
            r.data.tags.get("hpo.storage", "").startswith("postgresql://postgres:***@") for r in runs)
        assert [r.data.metrics["env_secrets"] for r in runs if r.data.tags["hpo.role"] == "trial"] == [0, 0]
        texts["mlflow"] = json.dumps([[r.data.params, r.data.tags] for r in runs] + [experiment.tags])
    import optuna

    study = optuna.load_study(study_name="tiny", storage=postgres_url)
    texts["study attrs"] = json.dumps([study.user_attrs, study._storage.get_study_system_attrs(study._study_id)]
                                      + [[t.user_attrs, t.system_attrs] for t in study.trials], default=str)
    try:
        ray_logs = [p for p in ray_tmp.rglob("*") if p.is_file() and p.stat().st_size < 20_000_000]
        assert any(p.parent.name == "logs" for p in ray_logs), "the sweep's Ray session logs are there"
        texts["ray logs"] = "\n".join(p.read_text(errors="replace") for p in ray_logs)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    texts["hpo folder"] = "\n".join(p.read_text(errors="replace") for p in (tmp_path / ".hpo").rglob("*")
                                    if p.is_file() and p.stat().st_size < 20_000_000)
    leaks = {place: [s for s in secrets if s in text] for place, text in texts.items()}
    assert not {place: found for place, found in leaks.items() if found}


PLANTED = "import pathlib, sys\npathlib.Path('planted-{name}-ran').write_text(' '.join(sys.argv))\nraise SystemExit(99)\n"


@pytest.mark.postgres
def test_re_exec_never_runs_code_from_the_current_folder(tmp_path: Path) -> None:
    """An hpo.py and an mlflow.py in the current folder: the re-exec that moves a password
    off the command line, `hpo ui`'s MLflow server and the nightly wrapper's `hpo search`
    run the installed packages (python -P), never those files."""
    for name in ("hpo", "mlflow"):
        (tmp_path / f"{name}.py").write_text(PLANTED.format(name=name))
    hpo_script = Path(sys.executable).parent / "hpo"  # as a user runs it: sys.path[0] is the script's folder
    moved = subprocess.run([str(hpo_script), "status", "--storage", "postgresql://postgres:Planted-Pw-7@127.0.0.1:1/none"],
                           cwd=tmp_path, env=hpo_env(), capture_output=True, text=True, timeout=120)
    assert not (tmp_path / "planted-hpo-ran").exists() and moved.returncode == 2, moved.stdout + moved.stderr
    assert moved.stderr.startswith("error:") and "Planted-Pw-7" not in moved.stderr

    nightly = subprocess.run([sys.executable, str(Path(__file__).parents[1] / "deploy" / "nightly_sweep.py"),
                              "missing.py", "--more", "1", "--timeout", "5"],
                             cwd=tmp_path, env=hpo_env(), capture_output=True, text=True, timeout=120)
    assert not (tmp_path / "planted-hpo-ran").exists() and nightly.returncode == 2, nightly.stdout + nightly.stderr
    assert "missing.py" in nightly.stderr

    port = free_port()
    ui = subprocess.Popen([str(hpo_script), "ui", "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
                           "--port", str(port)], cwd=tmp_path, env=hpo_env(), text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and ui.poll() is None and not (tmp_path / "planted-mlflow-ran").exists():
            with contextlib.suppress(OSError), urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                break
            time.sleep(0.3)
        assert not (tmp_path / "planted-mlflow-ran").exists(), "hpo ui ran ./mlflow.py"
        assert ui.poll() is None, "the real MLflow server serves"
    finally:
        stop(ui)


EXPOSED = '''
import hpo

sweep = hpo.Sweep(metric="score", direction="maximize", trials=1, max_steps=1, eval_every=1,
                  pruner="none", sampler="random", seed=0, concurrency=1)


def space(trial):
    return {"x": trial.suggest_float("x", 0.0, 1.0)}


def train(params, report):
    import os

    import psutil

    secrets = SECRETS
    found = [f"the environment's {k}" for k, v in os.environ.items() if any(s in v for s in secrets)]
    for process in psutil.process_iter(["cmdline"]):
        if any(s in " ".join(process.info["cmdline"] or []) for s in secrets):
            found.append(f"the command line of pid {process.pid}")
    if found:
        raise RuntimeError("a secret in " + ", ".join(found))
    report(1, {"score": params["x"]})
'''


def exposed_module(folder: Path, secrets: list[str]) -> None:
    """``folder/exposed.py``: a one-trial sweep whose trial fails when any of ``secrets`` is
    in its worker's environment or on any process's command line on this host."""
    (folder / "exposed.py").write_text(EXPOSED.replace("SECRETS", repr(secrets)))


def trial_states(folder: Path) -> list[tuple[str, str | None]]:
    status = run_hpo(["status", "--study", "exposed", "--json"], folder)
    assert status.returncode == 0, status.stderr
    return [(t["state"], t["reason"]) for t in json.loads(status.stdout)["trials"]]


@pytest.mark.postgres
def test_warm_start_storage_password_leaves_the_command_line(tmp_path: Path, postgres_url: str) -> None:
    """--warm-start STUDY@postgresql://user:PASSWORD@... goes into HPO_WARM_START at start
    (as --storage does): no process shows it and no worker inherits it; the earlier study's
    best config is enqueued all the same."""
    import optuna

    password = f"Warm-{uuid.uuid4().hex[:12]}"
    source = postgres_url.replace("pg-Secret-42", password)  # trust auth: any password connects
    earlier = optuna.create_study(study_name="src", storage=source, direction="maximize")
    earlier.enqueue_trial({"x": 0.25})
    earlier.optimize(lambda trial: trial.suggest_float("x", 0.0, 1.0), n_trials=1)
    exposed_module(tmp_path, [password])
    sweep = run_hpo(["search", "exposed.py", "--warm-start", f"src@{source}"], tmp_path)
    assert password not in sweep.stdout + sweep.stderr
    assert "warm start from src@postgresql://postgres:***@" in sweep.stdout, sweep.stdout + sweep.stderr
    assert trial_states(tmp_path) == [("COMPLETE", None)], sweep.stdout + sweep.stderr


def test_token_and_database_passwords_never_reach_a_local_rays_workers(tmp_path: Path) -> None:
    """MLFLOW_TRACKING_TOKEN and PGPASSWORD (and MYSQL_PWD) are the driver's: a trial's
    worker does not inherit them."""
    secrets = {name: f"{name.split('_')[-1]}-{uuid.uuid4().hex[:12]}"
               for name in ("MLFLOW_TRACKING_TOKEN", "PGPASSWORD", "MYSQL_PWD")}
    exposed_module(tmp_path, list(secrets.values()))
    sweep = run_hpo(["search", "exposed.py"], tmp_path, env=secrets)
    assert trial_states(tmp_path) == [("COMPLETE", None)], sweep.stdout + sweep.stderr
    assert sweep.returncode == 0


def test_re_exec_from_a_checkout_runs_that_checkouts_hpo() -> None:
    """`python -m hpo` in a checkout runs that checkout's hpo; the re-exec with -P must run
    the same one again, not an hpo installed elsewhere (nor fail to find any)."""
    from tests.conftest import REPO

    env = {k: v for k, v in hpo_env().items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-m", "hpo", "--debug", "status", "--storage",
                             "postgresql://postgres:Checkout-Pw-3@127.0.0.1:1/none"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    files = {line.split('"')[1] for line in result.stderr.splitlines() if line.strip().startswith('File "')}
    hpo_files = {f for f in files if "/hpo/" in f and "site-packages" not in f}
    assert hpo_files and all(f.startswith(f"{REPO}/hpo/") for f in hpo_files), result.stderr[-3000:]
