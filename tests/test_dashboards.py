"""What a person sees, in a real headless Chromium: optuna-dashboard (`hpo dashboard`) and
the MLflow UI (`hpo ui`) on a real sweep that was warm-started from an earlier study and
then grown by a nightly-style `--more` run. Also: the addresses the servers listen on.

Screenshots land in $HPO_TEST_ARTIFACTS (if set) or in a `screenshots` folder under
pytest's tmp dir; the path is printed.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna
import psutil
import pytest
from mlflow.tracking import MlflowClient
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial

from tests.browser import Browser
from tests.conftest import hpo_env, run_hpo, stop_group

pytestmark = pytest.mark.slow

MODULE = '''
import hpo

sweep = hpo.Sweep(metric="eval_accuracy", direction="maximize", trials=4, max_steps=9, eval_every=3,
                  sampler="random", seed=3, concurrency=1)


def space(trial):
    return {"x": trial.suggest_float("x", 0.0, 1.0), "kind": trial.suggest_categorical("kind", ["a", "b"])}


def train(params, report):
    for step in (3, 6, 9):  # kind "b" scores low: ASHA prunes it at the first rung
        report(step, {"eval_accuracy": params["x"] + step / 100 - (0.5 if params["kind"] == "b" else 0.0)})
'''


def earlier_study(path: Path) -> None:
    """An earlier study with a different space: its 3 best configs fit this one partly."""
    study = optuna.create_study(study_name="earlier", storage=f"sqlite:///{path}", direction="maximize")
    x, wide = FloatDistribution(0.0, 1.0), FloatDistribution(0.0, 2.0)
    kinds, lr = CategoricalDistribution(["a", "b", "c"]), FloatDistribution(1e-4, 1.0, log=True)
    for value, params, distributions in (
        (0.99, {"x": 0.95, "kind": "a"}, {"x": x, "kind": kinds}),  # fits as is
        (0.98, {"x": 1.7, "kind": "b"}, {"x": wide, "kind": kinds}),  # x out of range
        (0.97, {"x": 0.9, "kind": "c", "lr": 0.1}, {"x": x, "kind": kinds, "lr": lr}),  # no lr; no kind c
        (0.10, {"x": 0.1, "kind": "a"}, {"x": x, "kind": kinds}),  # not among the best 3
    ):
        study.add_trial(create_trial(state=TrialState.COMPLETE, value=value, params=params,
                                     distributions=distributions))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(args: list[str], cwd: Path, url: str, timeout: float = 300) -> subprocess.Popen:
    """Start an `hpo` server command in its own process group; wait until ``url`` answers."""
    log = cwd / f"{args[0]}-{time.monotonic_ns()}.log"
    with log.open("w") as output:  # a file, not a pipe: a chatty server never blocks on it
        process = subprocess.Popen([sys.executable, "-m", "hpo", *args], cwd=cwd, env=hpo_env(), text=True,
                                   stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
    process.log = log  # type: ignore[attr-defined]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"hpo {' '.join(args)} exited: {log.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=5):
                return process
        except OSError:
            time.sleep(0.5)
    stop_server(process)
    raise AssertionError(f"hpo {' '.join(args)} did not answer on {url} within {timeout} s")


def stop_server(process: subprocess.Popen) -> str:
    """Stop the server and what it started (its own process group); return its output."""
    if process.poll() is None:
        stop_group(process)
    return process.log.read_text()  # type: ignore[attr-defined]


def listening_addresses(pid: int, port: int) -> set[str]:
    """The local addresses the process (or its children) listens on at ``port``."""
    root = psutil.Process(pid)
    found = set()
    for process in [root, *root.children(recursive=True)]:
        try:
            connections = process.net_connections(kind="inet")
        except psutil.Error:
            continue
        found |= {c.laddr.ip for c in connections if c.status == psutil.CONN_LISTEN and c.laddr.port == port}
    return found


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = Path(os.environ["HPO_TEST_ARTIFACTS"]) if os.environ.get("HPO_TEST_ARTIFACTS") else \
        tmp_path_factory.mktemp("screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    print(f"\nscreenshots: {folder}")
    return folder


@pytest.fixture(scope="module")
def nightly_sweep(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Night 1: `--trials 4 --warm-start earlier@...`; night 2: `--more 2` with the same flags."""
    cwd = tmp_path_factory.mktemp("nightly")
    (cwd / "custom.py").write_text(MODULE)
    earlier_study(cwd / "earlier.db")
    warm = ["--warm-start", f"earlier@sqlite:///{cwd / 'earlier.db'}", "--warm-start-top", "3"]
    first = run_hpo(["search", "custom.py", "--trials", "4", *warm], cwd=cwd)
    assert first.returncode == 0, first.stdout + first.stderr
    second = run_hpo(["search", "custom.py", "--more", "2", *warm], cwd=cwd)
    assert second.returncode == 0, second.stdout + second.stderr
    return {"cwd": cwd, "first": first.stdout, "second": second.stdout}


@pytest.fixture(scope="module")
def servers(nightly_sweep: dict):
    cwd = nightly_sweep["cwd"]
    dash_port, ui_port = free_port(), free_port()
    dashboard = start_server(["dashboard", "--port", str(dash_port)], cwd, f"http://127.0.0.1:{dash_port}/dashboard")
    try:
        ui = start_server(["ui", "--port", str(ui_port)], cwd, f"http://127.0.0.1:{ui_port}/health")
    except BaseException:
        stop_server(dashboard)
        raise
    yield {"dashboard": dashboard, "dash_port": dash_port, "ui": ui, "ui_port": ui_port}
    stop_server(dashboard)
    ui_output = stop_server(ui)
    assert "workflowType=machine_learning" in ui_output


def test_warm_start_enqueues_what_fits_once(nightly_sweep: dict) -> None:
    first, second = nightly_sweep["first"], nightly_sweep["second"]
    assert "enqueued 3 config(s) (earlier trials 0, 1, 2)" in first
    assert "skipped trial 1 x=1.7: outside this space's range [0.0, 1.0]" in first
    assert "skipped trial 2 kind='c': outside this space's choices ['a', 'b']" in first
    assert "skipped trial 2 lr=0.1: this space has no parameter 'lr'" in first
    assert "done when this study began; nothing enqueued again" in second
    study = optuna.load_study(study_name="custom", storage=f"sqlite:///{nightly_sweep['cwd'] / 'hpo.db'}")
    trials = study.get_trials()
    assert len(trials) == 6, "night 1: 4 trials; night 2: --more 2"
    warmed = [t for t in trials if "warm_start" in t.user_attrs]
    assert [t.number for t in warmed] == [0, 1, 2], "enqueued once, run first"
    assert trials[0].params == {"x": 0.95, "kind": "a"}
    assert trials[1].params["kind"] == "b" and 0 <= trials[1].params["x"] <= 1 and trials[1].params["x"] != 1.7
    assert trials[2].params["x"] == 0.9 and trials[2].params["kind"] in ("a", "b")
    assert trials[1].state == TrialState.PRUNED
    assert study.metric_names == ["eval_accuracy"]


def test_servers_listen_on_loopback_only(servers: dict, nightly_sweep: dict) -> None:
    assert listening_addresses(servers["dashboard"].pid, servers["dash_port"]) == {"127.0.0.1"}
    assert listening_addresses(servers["ui"].pid, servers["ui_port"]) == {"127.0.0.1"}
    children = " ".join(" ".join(child.cmdline()) for child in psutil.Process(servers["ui"].pid).children(recursive=True))
    assert "huey" not in children, "hpo ui starts MLflow's job runner (7 processes sweeps never use)"
    port = free_port()  # --host is honoured: another loopback address, still not exposed
    other = start_server(["dashboard", "--host", "127.0.0.2", "--port", str(port)], nightly_sweep["cwd"],
                         f"http://127.0.0.2:{port}/dashboard")
    try:
        assert listening_addresses(other.pid, port) == {"127.0.0.2"}
    finally:
        stop_server(other)


def test_optuna_dashboard_shows_the_study(servers: dict, screenshots: Path) -> None:
    base = f"http://127.0.0.1:{servers['dash_port']}/dashboard/studies/1"
    with Browser() as browser:
        browser.open(f"{base}/trials")
        text = browser.wait_for(lambda t: "6 Trials" in t and "Pruned" in t, what="the trial list")
        assert "custom (id=1)" in text
        assert "Trial 1 Pruned" in " ".join(text.split())
        browser.screenshot(screenshots / "optuna-dashboard-trials.png")
        browser.open(base)
        text = browser.wait_for(lambda t: "Best Trial" in t and "eval_accuracy" in t, what="the history page")
        assert "Objective 0" not in text
        browser.screenshot(screenshots / "optuna-dashboard-history.png")


def test_mlflow_ui_shows_the_sweep_with_nested_trials(servers: dict, nightly_sweep: dict, screenshots: Path) -> None:
    client = MlflowClient(f"sqlite:///{nightly_sweep['cwd'] / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("custom")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    link = f"http://127.0.0.1:{servers['ui_port']}/#/experiments/{experiment.experiment_id}?workflowType=machine_learning"
    assert f"sweep custom: {link}" in servers["ui"].log.read_text(), "hpo ui prints the link a person opens"
    with Browser() as browser:
        browser.open(link)
        text = browser.wait_for(lambda t: "ago" in t and "matching runs" in t, what="the runs table")
        assert "7 matching runs" in text and "Run Name" in text and "Detect Issues" not in text
        assert "trial-0" not in text, "trials are nested: hidden until the sweep's row is expanded"
        browser.screenshot(screenshots / "mlflow-ui-runs.png")
        expanded = browser.evaluate("(() => { const b = document.querySelector("
                                    "'button[data-component-id*=\"runnamecellrenderer\"]'); "
                                    "if (!b) return false; b.click(); return true; })()")
        assert expanded, "the sweep's row has an expander for its nested runs"
        text = browser.wait_for(lambda t: all(f"trial-{n}" in t for n in range(6)), timeout=30,
                                what="the nested trial runs")
        assert text.index("custom\n") < text.index("trial-5") < text.index("trial-0")
        browser.screenshot(screenshots / "mlflow-ui-nested-trials.png")
