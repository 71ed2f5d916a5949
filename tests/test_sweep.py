"""End to end through the real CLI: real Ray (local), a SQLite Optuna storage, a SQLite
MLflow store, the pretrained MiniLM. One 8-trial sweep is shared by the tests here."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from tests.conftest import SEARCH_SPACES, run_hpo

pytestmark = pytest.mark.slow
MAX_STEPS = 20  # ASHA's one rung is at step 10 (eval_every) for 20 steps as for 30: the same pruning, less training


@pytest.fixture(scope="module")
def lora_sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cwd = tmp_path_factory.mktemp("lora-sweep")
    result = run_hpo(["search", str(SEARCH_SPACES / "lora.py"), "--trials", "8", "--concurrency", "2",
                      "--set", f"max_steps={MAX_STEPS}", "--set", "eval_every=10"], cwd=cwd)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "best: trial" in result.stdout and "hpo dashboard" in result.stdout and "hpo ui" in result.stdout
    return cwd


def load_study(cwd: Path) -> optuna.Study:
    return optuna.load_study(study_name="lora", storage=f"sqlite:///{cwd / 'hpo.db'}")


def test_optuna_holds_the_truth(lora_sweep: Path) -> None:
    trials = load_study(lora_sweep).get_trials()
    states = [t.state for t in trials]
    assert len(trials) == 8
    assert set(states) <= {TrialState.COMPLETE, TrialState.PRUNED}
    assert TrialState.COMPLETE in states and TrialState.PRUNED in states
    for trial in trials:
        steps = sorted(trial.intermediate_values)
        assert steps and steps == list(range(10, steps[-1] + 1, 10))
        if trial.state == TrialState.PRUNED:
            assert steps[-1] < MAX_STEPS, "a pruned trial stopped before the full budget"
            assert trial.value == trial.intermediate_values[steps[-1]]  # Optuna keeps the last one
            assert trial.user_attrs["reason"] == "pruned"
        else:
            assert steps[-1] == MAX_STEPS
            assert trial.value == trial.intermediate_values[MAX_STEPS]
        assert trial.user_attrs["config"] == trial.params


def test_mlflow_mirrors_the_trials_one_to_one(lora_sweep: Path) -> None:
    study = load_study(lora_sweep)
    client = MlflowClient(f"sqlite:///{lora_sweep / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("lora")
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    parents = [r for r in runs if r.data.tags.get("hpo.role") == "sweep"]
    children = [r for r in runs if r.data.tags.get("hpo.role") == "trial"]
    assert len(parents) == 1 and len(children) == 8
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.data.params["max_steps"] == str(MAX_STEPS)
    assert study.user_attrs["hpo"]["mlflow_parent_run_id"] == parent.info.run_id
    by_number = {int(r.data.tags["hpo.trial_number"]): r for r in children}
    assert sorted(by_number) == [t.number for t in study.get_trials()]
    for trial in study.get_trials():
        run = by_number[trial.number]
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.tags["hpo.study"] == "lora"
        assert run.data.tags["hpo.state"] == trial.state.name
        assert run.info.status == {"COMPLETE": "FINISHED", "PRUNED": "KILLED"}[trial.state.name]
        sampled = {k: str(v) for k, v in trial.params.items()}
        assert {k: run.data.params.get(k) for k in sampled} == sampled  # the sampled values, as Optuna holds them
        # ... plus the full job the worker trained with, defaults filled in
        assert run.data.params["warmup_ratio"] == "0.0" and run.data.params["max_grad_norm"] == "1.0"
        assert run.data.params["precision"] == "fp32" and run.data.params["device"] == "cpu"
        history = client.get_metric_history(run.info.run_id, "eval_accuracy")
        assert {m.step: m.value for m in history} == trial.intermediate_values
        assert {m.step for m in client.get_metric_history(run.info.run_id, "train_loss")} == set(trial.intermediate_values)
        assert client.get_metric_history(run.info.run_id, "eval_loss")


def test_status_and_best(lora_sweep: Path) -> None:
    status = run_hpo(["status", "--json"], cwd=lora_sweep)
    assert status.returncode == 0, status.stderr
    rows = json.loads(status.stdout)["trials"]
    assert [r["number"] for r in rows] == list(range(8))
    assert {r["state"] for r in rows} == {"COMPLETE", "PRUNED"}
    table = run_hpo(["status"], cwd=lora_sweep)
    assert "PRUNED" in table.stdout and "learning_rate=" in table.stdout

    best = json.loads(run_hpo(["best", "--json"], cwd=lora_sweep).stdout)
    study = load_study(lora_sweep)
    assert best["number"] == study.best_trial.number and best["value"] == study.best_value
    assert best["params"] == study.best_trial.params and best["metric"] == "eval_accuracy"


def test_running_again_keeps_the_finished_trials(lora_sweep: Path) -> None:
    again = run_hpo(["search", str(SEARCH_SPACES / "lora.py"), "--trials", "8"], cwd=lora_sweep)
    assert again.returncode == 0, again.stderr
    assert "already has 8 finished trials" in again.stdout
    assert len(load_study(lora_sweep).get_trials()) == 8


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve(args: list[str], cwd: Path, url: str, timeout: float = 90):
    """Start a server through the CLI and wait until ``url`` answers; returns the process."""
    import os
    import subprocess
    import sys
    import time
    import urllib.request

    process = subprocess.Popen([sys.executable, "-m", "hpo", *args], cwd=cwd, env=os.environ.copy(),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"server exited: {process.stdout.read() if process.stdout else ''}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return process
        except OSError:
            time.sleep(0.5)
    process.kill()
    raise AssertionError(f"{url} did not answer in {timeout}s")


def get_json(url: str, body: dict | None = None) -> dict:
    import urllib.request

    request = urllib.request.Request(url, data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def test_optuna_dashboard_serves_the_study_on_loopback(lora_sweep: Path) -> None:
    port = free_port()
    process = serve(["dashboard", "--port", str(port)], lora_sweep, f"http://127.0.0.1:{port}/api/studies")
    try:
        studies = get_json(f"http://127.0.0.1:{port}/api/studies")["study_summaries"]
        assert [s["study_name"] for s in studies] == ["lora"]
        study_id = studies[0]["study_id"]
        detail = get_json(f"http://127.0.0.1:{port}/api/studies/{study_id}?after=0")
        states = {t["state"] for t in detail["trials"]}
        assert len(detail["trials"]) == 8 and states <= {"Complete", "Pruned"} and "Pruned" in states
        pruned = next(t for t in detail["trials"] if t["state"] == "Pruned")
        assert pruned["intermediate_values"], "the dashboard sees the curves of pruned trials"
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_mlflow_ui_serves_the_runs_on_loopback(lora_sweep: Path) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    process = serve(["ui", "--port", str(port)], lora_sweep, f"{base}/health", timeout=120)
    try:
        experiment = get_json(f"{base}/api/2.0/mlflow/experiments/get-by-name?experiment_name=lora")["experiment"]
        runs = get_json(f"{base}/api/2.0/mlflow/runs/search", {"experiment_ids": [experiment["experiment_id"]]})["runs"]
        assert len(runs) == 9
        assert sum(1 for r in runs for tag in r["data"]["tags"] if tag["key"] == "mlflow.parentRunId") == 8
    finally:
        process.terminate()
        process.wait(timeout=30)
