"""docker/ outside docker (there is no engine here): the compose file as docker-compose
resolves it, the build context .dockerignore leaves, the refusal of the example's
`change-me` secrets, the PostgreSQL init script against the real server, and the MLflow
entrypoint serving a real server with basic auth on a temporary database."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from base64 import b64encode
from pathlib import Path

import psutil
import pytest
import yaml

from tests.conftest import REPO, hpo_env, stop_group

DOCKER = REPO / "docker"
SECRETS = ["POSTGRES_PASSWORD", "OPTUNA_DB_PASSWORD", "OPTUNA_DASHBOARD_DB_PASSWORD", "MLFLOW_DB_PASSWORD",
           "MLFLOW_ADMIN_PASSWORD", "MLFLOW_HPO_PASSWORD", "MLFLOW_FLASK_SECRET_KEY", "RAY_AUTH_TOKEN"]
# which service may hold which secret: the Ray nodes never see the superuser or the MLflow admin
SECRETS_OF = {
    "postgres": {"POSTGRES_PASSWORD", "OPTUNA_DB_PASSWORD", "OPTUNA_DASHBOARD_DB_PASSWORD", "MLFLOW_DB_PASSWORD"},
    "mlflow": {"MLFLOW_DB_PASSWORD", "MLFLOW_ADMIN_PASSWORD", "MLFLOW_HPO_PASSWORD", "MLFLOW_FLASK_SECRET_KEY"},
    "optuna-dashboard": {"OPTUNA_DASHBOARD_DB_PASSWORD"},  # the read-only role
    "ray-head": {"RAY_AUTH_TOKEN", "OPTUNA_DB_PASSWORD", "MLFLOW_HPO_PASSWORD"},
    "ray-worker": {"RAY_AUTH_TOKEN"},
    "hpo": {"RAY_AUTH_TOKEN", "OPTUNA_DB_PASSWORD", "MLFLOW_HPO_PASSWORD"},
}


def docker_compose() -> str:
    found = shutil.which("docker-compose")
    assert found, "docker-compose is not installed: apt-get install -y docker-compose (.ci/run does)"
    return found


def compose_config(env_file: Path) -> dict:
    result = subprocess.run([docker_compose(), "-f", str(DOCKER / "compose.yaml"), "--env-file", str(env_file), "config"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def example_env() -> dict[str, str]:
    lines = (DOCKER / ".env.example").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


def test_compose_file_is_valid_and_each_service_gets_only_its_secrets(tmp_path: Path) -> None:
    compose_config(DOCKER / ".env.example")  # the example env file resolves as it is
    distinct = {name: f"s3cret-{name.lower().replace('_', '-')}-{uuid.uuid4().hex[:8]}" for name in SECRETS}
    env_file = tmp_path / ".env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in {**example_env(), **distinct}.items()))
    services = compose_config(env_file)["services"]
    assert set(services) == set(SECRETS_OF)

    for name, service in services.items():
        environment = service.get("environment", {})
        held = {secret for secret, value in distinct.items() if any(value in str(v) for v in environment.values())}
        assert held == SECRETS_OF[name], f"{name} holds {sorted(held)}"
        outside = yaml.safe_dump({k: v for k, v in service.items() if k != "environment"})
        assert not [s for s, v in distinct.items() if v in outside], f"{name}: a secret outside its environment"
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond this machine"
        if name != "hpo":  # the driver is a one-off run, not a service to wait on
            assert service.get("healthcheck", {}).get("test"), f"{name} has no health check"
        if name in ("ray-head", "ray-worker", "hpo"):
            assert environment["RAY_AUTH_MODE"] == "token"

    head = services["ray-head"]
    # the head holds the drivers' credentials: it offers no CPU or GPU, so no trial runs there
    assert "--num-cpus=0" in head["command"] and "--num-gpus=0" in head["command"], head["command"]
    assert not [v for v in services["ray-worker"]["environment"].values() if "://" in str(v)]
    # optuna-dashboard (no login) shares a network with PostgreSQL only, never with the Ray nodes
    dashboard_networks = set(services["optuna-dashboard"]["networks"])
    assert dashboard_networks == {"studies"}, dashboard_networks
    assert not dashboard_networks & set(services["ray-worker"].get("networks", {"default": None}))
    assert "studies" in services["postgres"]["networks"]
    assert services["optuna-dashboard"]["environment"]["HPO_STORAGE"].startswith("postgresql+psycopg://optuna_dashboard:")
    assert [str(p) for p in head["ports"]] == ["127.0.0.1:8265:8265/tcp"], "only the token-protected dashboard/job API"
    assert not any(str(p).split(":")[-2] in ("6379", "10001") for s in services.values() for p in s.get("ports", []))
    assert "postgresql+psycopg://optuna:" in services["hpo"]["environment"]["HPO_STORAGE"], "the optuna role, not the superuser"
    assert services["hpo"]["environment"]["MLFLOW_TRACKING_USERNAME"] == "hpo"
    assert services["postgres"]["entrypoint"][0].endswith("check-secrets.sh")
    assert "./postgres-init.sh" not in str(services["postgres"]["volumes"]), "paths resolve to files that exist"
    assert any(str(DOCKER / "postgres-init.sh") in str(v) for v in services["postgres"]["volumes"])


def build_context(root: Path) -> set[str]:
    """The files docker-compose sends to build from ``root`` (docker-py's exclude_paths,
    what docker-compose v1 builds with), after the root's .dockerignore."""
    script = ("import sys; from docker.utils.build import exclude_paths\n"
              "lines = [l.strip() for l in open(sys.argv[1] + '/.dockerignore').read().splitlines()]\n"
              "print('\\n'.join(sorted(exclude_paths(sys.argv[1], [l for l in lines if l and not l.startswith('#')]))))")
    python = shutil.which("python3", path="/usr/bin") or "python3"  # the Python docker-compose runs on
    result = subprocess.run([python, "-c", script, str(root)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return set(result.stdout.split())


def test_dockerignore_keeps_env_files_out_of_the_build_context(tmp_path: Path) -> None:
    for path in ["docker/.env", ".env", "sub/.env", "docker/.env.local", "hpo.db", ".venv/lib/x.py",
                 "hpo/cli.py", "docker/Dockerfile", "docker/.env.example", "deploy/nightly_sweep.py"]:
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("x")
    shutil.copy(REPO / ".dockerignore", tmp_path / ".dockerignore")
    sent = build_context(tmp_path)
    assert not sent & {"docker/.env", ".env", "sub/.env", "docker/.env.local", "hpo.db", ".venv/lib/x.py"}
    assert {"hpo/cli.py", "docker/Dockerfile", "deploy/nightly_sweep.py"} <= sent

    # and every file the two images COPY is in the repository's own build context
    sent = build_context(REPO)
    for dockerfile in ("Dockerfile", "mlflow.Dockerfile"):
        lines = (DOCKER / dockerfile).read_text().splitlines()
        sources = [src for line in lines if line.startswith("COPY ") for src in line.split()[1:-1]]
        assert sources and all(src in sent for src in sources), (dockerfile, [s for s in sources if s not in sent])
        assert all((REPO / src).is_dir() or os.access(REPO / src, os.X_OK) or not src.endswith((".sh", ".py"))
                   for src in sources), "scripts keep their executable bit in the image"
    dockerfile = (DOCKER / "Dockerfile").read_text()
    assert "ARG BASE_IMAGE=python:3.11-slim" in dockerfile and "download.pytorch.org/whl/cpu" in dockerfile
    assert '"check-secrets.sh"' in dockerfile.split("ENTRYPOINT", 1)[1], "every command starts through the refusal"


def run_script(script: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    base = {"PATH": os.environ["PATH"], "TMPDIR": env.pop("TMPDIR", "/tmp")}
    return subprocess.run(["sh", str(DOCKER / script), *args], env={**base, **env},
                          capture_output=True, text=True, timeout=60)


def test_services_refuse_the_example_change_me_values() -> None:
    example = {k: v for k, v in example_env().items() if k in SECRETS}
    assert set(example) == set(SECRETS) and all("change-me" in v for v in example.values())

    refused = run_script("check-secrets.sh", {**example, "HPO_SERVICE": "ray-head"}, "echo", "started")
    assert refused.returncode == 2 and "started" not in refused.stdout
    assert refused.stderr.count("\n") == 1, refused.stderr
    assert refused.stderr.startswith("ray-head: refusing to start: ") and "RAY_AUTH_TOKEN" in refused.stderr

    missing = run_script("check-secrets.sh", {"HPO_REQUIRED_SECRETS": "RAY_AUTH_TOKEN"}, "echo", "started")
    assert missing.returncode == 2 and "RAY_AUTH_TOKEN: not set" in missing.stderr

    fine = run_script("check-secrets.sh", {"RAY_AUTH_TOKEN": "a1b2c3", "HPO_REQUIRED_SECRETS": "RAY_AUTH_TOKEN"},
                      "echo", "started")
    assert (fine.returncode, fine.stdout) == (0, "started\n")

    # the MLflow entrypoint refuses before it writes or starts anything
    mlflow = run_script("mlflow-entrypoint.sh", {
        "MLFLOW_BACKEND_STORE_URI": "postgresql+psycopg://mlflow:change-me@postgres:5432/mlflow",
        "MLFLOW_AUTH_DB_URI": "postgresql+psycopg://mlflow:change-me@postgres:5432/mlflow_auth",
        "MLFLOW_AUTH_ADMIN_PASSWORD": example["MLFLOW_ADMIN_PASSWORD"],
        "MLFLOW_FLASK_SERVER_SECRET_KEY": example["MLFLOW_FLASK_SECRET_KEY"]})
    assert mlflow.returncode == 2 and mlflow.stderr.count("\n") == 1, mlflow.stderr
    assert mlflow.stderr.startswith("mlflow: refusing to start: ") and "MLFLOW_AUTH_DB_URI" in mlflow.stderr


def psql(*statements: str, user: str = "postgres", dbname: str = "test") -> subprocess.CompletedProcess:
    commands = [arg for sql in statements for arg in ("-c", sql)]  # each -c in its own transaction
    return subprocess.run(["psql", "-h", "127.0.0.1", "-U", user, "-d", dbname, "-v", "ON_ERROR_STOP=1", "-At", *commands],
                          capture_output=True, text=True, timeout=60)


@pytest.fixture()
def init_roles():
    """docker/postgres-init.sh run against the real PostgreSQL, with names of its own; dropped after."""
    prefix = f"hpo_ops_{uuid.uuid4().hex[:8]}"
    names = {"OPTUNA_DB_USER": f"{prefix}_optuna", "OPTUNA_DB_NAME": f"{prefix}_optuna",
             "MLFLOW_DB_USER": f"{prefix}_mlflow", "MLFLOW_DB_NAME": f"{prefix}_mlflow",
             "MLFLOW_AUTH_DB_NAME": f"{prefix}_mlflow_auth", "OPTUNA_DASHBOARD_DB_USER": f"{prefix}_dashboard"}
    env = {**names, "PGHOST": "127.0.0.1", "PGUSER": "postgres", "PGDATABASE": "test",
           "OPTUNA_DB_PASSWORD": "optuna-" + uuid.uuid4().hex, "MLFLOW_DB_PASSWORD": "mlflow-" + uuid.uuid4().hex,
           "OPTUNA_DASHBOARD_DB_PASSWORD": "dashboard-" + uuid.uuid4().hex}
    result = run_script("postgres-init.sh", dict(env))
    try:
        assert result.returncode == 0, result.stderr
        assert env["OPTUNA_DB_PASSWORD"] not in result.stdout + result.stderr
        yield names
    finally:
        psql(*[f'DROP DATABASE IF EXISTS "{names[key]}" WITH (FORCE)'
               for key in ("OPTUNA_DB_NAME", "MLFLOW_DB_NAME", "MLFLOW_AUTH_DB_NAME")],
             *[f'DROP ROLE IF EXISTS "{names[key]}"' for key in ("OPTUNA_DASHBOARD_DB_USER", "OPTUNA_DB_USER",
                                                                  "MLFLOW_DB_USER")])


@pytest.mark.postgres
def test_postgres_init_creates_roles_that_are_not_superusers(init_roles: dict[str, str]) -> None:
    optuna, mlflow = init_roles["OPTUNA_DB_USER"], init_roles["MLFLOW_DB_USER"]
    rows = psql("SELECT rolname, rolsuper, rolcreatedb, rolcreaterole, rolpassword LIKE 'SCRAM-SHA-256$%' "
                f"FROM pg_authid WHERE rolname IN ('{optuna}', '{mlflow}') ORDER BY rolname").stdout.split()
    assert rows == [f"{mlflow}|f|f|f|t", f"{optuna}|f|f|f|t"], "login roles with a password, no superuser powers"
    owners = psql("SELECT datname, pg_get_userbyid(datdba) FROM pg_database "
                  f"WHERE datname LIKE '{optuna.rsplit('_', 1)[0]}%' ORDER BY datname").stdout.split()
    assert owners == [f"{mlflow}|{mlflow}", f"{init_roles['MLFLOW_AUTH_DB_NAME']}|{mlflow}", f"{optuna}|{optuna}"]

    own = psql("CREATE TABLE studies (id int); INSERT INTO studies VALUES (1); SELECT count(*) FROM studies",
               user=optuna, dbname=init_roles["OPTUNA_DB_NAME"])
    assert own.returncode == 0 and own.stdout.split()[-1] == "1", own.stderr
    for forbidden in ("CREATE ROLE intruder SUPERUSER", "CREATE DATABASE intruder", "ALTER ROLE CURRENT_USER SUPERUSER"):
        denied = psql(forbidden, user=optuna, dbname=init_roles["OPTUNA_DB_NAME"])
        assert denied.returncode != 0 and ("permission denied" in denied.stderr or "must be superuser" in denied.stderr), forbidden
    other = psql("SELECT 1", user=mlflow, dbname=init_roles["OPTUNA_DB_NAME"])
    assert other.returncode != 0 and "CONNECT privilege" in other.stderr, "each role reaches its own databases only"


@pytest.mark.postgres
def test_optuna_dashboard_role_reads_the_studies_and_changes_nothing(init_roles: dict[str, str], tmp_path: Path) -> None:
    """optuna-dashboard has no login and its API deletes studies and tells trials: the
    compose service connects as the read-only role the init script makes. Through the real
    `hpo dashboard` on that role, a study the optuna role wrote is listed, its delete fails
    and the study is still there; the role cannot write with SQL either."""
    import optuna

    database, owner, reader = (init_roles[k] for k in ("OPTUNA_DB_NAME", "OPTUNA_DB_USER", "OPTUNA_DASHBOARD_DB_USER"))
    study = optuna.create_study(study_name="nightly", storage=f"postgresql+psycopg://{owner}@127.0.0.1:5432/{database}")
    study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=2)
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "hpo", "dashboard", "--port", str(port), "--storage",
                               f"postgresql+psycopg://{reader}@127.0.0.1:5432/{database}"], cwd=tmp_path,
                              env=hpo_env(), text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              start_new_session=True)
    base = f"http://127.0.0.1:{port}/api/studies"
    try:
        deadline = time.monotonic() + 120
        while status_of(base) != 200:
            assert server.poll() is None and time.monotonic() < deadline, server.communicate()[0][-3000:]
            time.sleep(0.3)
        with urllib.request.urlopen(base, timeout=30) as response:
            listed = json.loads(response.read())["study_summaries"]
        assert [s["study_name"] for s in listed] == ["nightly"]
        delete = urllib.request.Request(f"{base}/{listed[0]['study_id']}", method="DELETE")
        try:
            with urllib.request.urlopen(delete, timeout=30) as response:
                answer = response.status
        except urllib.error.HTTPError as error:
            answer = error.code
        assert answer >= 400, "the dashboard deleted the study"
    finally:
        stop_group(server)
    assert len(optuna.load_study(study_name="nightly", storage=study._storage).trials) == 2
    for write in ("DELETE FROM trials", "UPDATE studies SET study_name = 'x'", "CREATE TABLE notes (id int)"):
        denied = psql(write, user=reader, dbname=database)
        assert denied.returncode != 0 and "permission denied" in denied.stderr, write
    read = psql("SELECT count(*) FROM trials", user=reader, dbname=database)
    assert read.returncode == 0 and read.stdout.split() == ["2"], read.stderr


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def status_of(url: str, auth: tuple[str, str] | None = None) -> int:
    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", "Basic " + b64encode(":".join(auth).encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0  # not listening yet


def rest(base: str, method: str, path: str, auth: tuple[str, str], body: dict | None = None,
         data: bytes | None = None) -> dict:
    """One authenticated REST call that must succeed: its JSON answer."""
    request = urllib.request.Request(base + path, method=method, data=json.dumps(body).encode() if body else data)
    request.add_header("Authorization", "Basic " + b64encode(":".join(auth).encode()).decode())
    request.add_header("Content-Type", "application/json" if body else "application/octet-stream")
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read() or b"{}")


@pytest.mark.postgres
def test_mlflow_entrypoint_serves_with_basic_auth(init_roles: dict[str, str], tmp_path: Path) -> None:
    """The entrypoint as the mlflow service runs it, on the databases and role the init
    script made (127.0.0.1, trust auth), a temporary artifact folder and a free port."""
    port, artifacts = free_port(), tmp_path / "mlartifacts"
    role = init_roles["MLFLOW_DB_USER"]
    secrets = {"admin": "admin-" + uuid.uuid4().hex, "hpo": "hpo-" + uuid.uuid4().hex, "db": "db-" + uuid.uuid4().hex}
    env = hpo_env({
        "MLFLOW_BACKEND_STORE_URI": f"postgresql+psycopg://{role}:{secrets['db']}@127.0.0.1:5432/{init_roles['MLFLOW_DB_NAME']}",
        "MLFLOW_AUTH_DB_URI": f"postgresql+psycopg://{role}:{secrets['db']}@127.0.0.1:5432/{init_roles['MLFLOW_AUTH_DB_NAME']}",
        "MLFLOW_AUTH_ADMIN_PASSWORD": secrets["admin"], "MLFLOW_HPO_PASSWORD": secrets["hpo"],
        "MLFLOW_FLASK_SERVER_SECRET_KEY": uuid.uuid4().hex, "MLFLOW_ARTIFACTS_DESTINATION": str(artifacts),
        "MLFLOW_HOST": "127.0.0.1", "MLFLOW_PORT": str(port), "MLFLOW_WORKERS": "1", "TMPDIR": str(tmp_path),
        "PYTHON": sys.executable,  # the image's python3; here the one with mlflow[auth]
    })
    log = tmp_path / "mlflow.log"
    with log.open("w") as out:
        server = subprocess.Popen(["sh", str(DOCKER / "mlflow-entrypoint.sh")], env=env, stdout=out,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        started = time.monotonic()
        deadline = started + 300  # seconds on an idle machine; minutes when the cores are shared
        while status_of(f"{base}/health") != 200:
            assert server.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "no MLflow server after 300 s\n" + log.read_text()[-3000:]
            time.sleep(0.5)
        print(f"server up after {time.monotonic() - started:.1f} s")
        search = f"{base}/api/2.0/mlflow/experiments/search?max_results=1"
        assert status_of(search) == 401, "no credentials: refused"
        while status_of(search, ("hpo", secrets["hpo"])) != 200:  # made by mlflow-users.py once the server is up
            assert time.monotonic() < deadline, "no user hpo after 300 s\n" + log.read_text()[-3000:]
            time.sleep(0.5)
        assert status_of(search, ("hpo", "wrong-password")) == 401
        assert status_of(search, ("admin", secrets["admin"])) == 200

        # the hpo user logs a run with an artifact, which lands in the artifact folder (REST
        # calls as MlflowClient makes them; importing mlflow here would cost seconds of CPU)
        user = ("hpo", secrets["hpo"])
        experiment = rest(base, "POST", "/api/2.0/mlflow/experiments/create", user, {"name": f"ops-{uuid.uuid4().hex[:6]}"})
        run = rest(base, "POST", "/api/2.0/mlflow/runs/create", user, {"experiment_id": experiment["experiment_id"]})["run"]
        assert run["info"]["artifact_uri"].startswith("mlflow-artifacts:/"), "artifacts go through the server"
        path = run["info"]["artifact_uri"].removeprefix("mlflow-artifacts:/").lstrip("/") + "/notes/hello.txt"
        rest(base, "PUT", f"/api/2.0/mlflow-artifacts/artifacts/{path}", user, data=b"hello")
        assert (artifacts / path).read_text() == "hello"
        print(f"requests done after {time.monotonic() - started:.1f} s")

        config = Path(env["TMPDIR"]).glob("*/basic_auth.ini")
        assert [oct(p.stat().st_mode & 0o777) for p in config] == ["0o600"]
        command_lines = ""
        for process in [psutil.Process(server.pid), *psutil.Process(server.pid).children(recursive=True)]:
            try:
                command_lines += " ".join(process.cmdline()) + "\n"
            except psutil.Error:  # mlflow-users.py ended: a zombie until the container's init reaps it
                pass
        assert "--app-name basic-auth" in command_lines
        assert "huey" not in command_lines, "MLflow's job runner is off (its consumers serve no sweep)"
        assert not [name for name, value in secrets.items() if value in command_lines], "secrets on a command line"
        assert not [name for name, value in secrets.items() if value in log.read_text()], "secrets in the log"
    finally:
        stop_group(server)
