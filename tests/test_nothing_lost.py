"""Faults produced for real: a driver stalled past the grace period while its trial runs,
kill -9 of the Ray workers only, Ctrl-C to the process group, several sweep processes on one
SQLite / PostgreSQL / MariaDB study, and the chaos soak (bench/chaos.py) on a short schedule."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from hpo.record.study import open_storage
from tests.conftest import REPO, hpo_env, write_sleepy_module

pytestmark = pytest.mark.slow
sys.path.insert(0, str(REPO / "bench"))
import chaos  # noqa: E402


def write(folder: Path, trials: int, seconds: float, steps: int = 3, concurrency: int = 2) -> Path:
    return write_sleepy_module(folder, "lost", trials, seconds, steps, concurrency)


def start(module: Path, folder: Path, env: dict | None = None, storage: str | None = None) -> subprocess.Popen:
    args = [sys.executable, "-m", "hpo", "search", str(module), "--tracking-uri", f"sqlite:///{folder / 'mlflow.db'}"]
    if storage:
        args += ["--storage", storage]
    return subprocess.Popen(args, cwd=folder, env=hpo_env(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def study_of(folder: Path, storage: str | None = None, name: str = "lost") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=open_storage(storage or f"sqlite:///{folder / 'hpo.db'}"))


def wait_for(check, process: subprocess.Popen, seconds: float = 300) -> None:  # noqa: ANN001
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[0][-4000:]
        try:
            if check():
                return
        except Exception:  # noqa: BLE001 - the study is not there yet
            pass
        time.sleep(0.2)
    chaos.kill_all(chaos.family(process.pid))
    raise AssertionError("timed out: " + process.communicate()[0][-4000:])


def running(folder: Path) -> list:
    return study_of(folder).get_trials(deepcopy=False, states=(TrialState.RUNNING,))


def trial_runs(folder: Path) -> dict[int, object]:
    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("lost").experiment_id], max_results=1000)
    return {int(r.data.tags["hpo.trial_number"]): r for r in runs if r.data.tags["hpo.role"] == "trial"}


STALL = """
import sys, time, optuna
from hpo.record.ledger import Ledger
from hpo.record.study import open_storage
study = optuna.load_study(study_name="lost", storage=open_storage(sys.argv[1]))
ledger = Ledger(study, lambda t: {}, target=1)
with ledger.lock:                       # the driver's loop now waits for this lock (claim, reclaim)
    time.sleep(float(sys.argv[2]))      # ... longer than the grace period
    print("STALE", ledger._stale_trial_ids(), flush=True)
    print("RECLAIMED", ledger.reclaim(), flush=True)
"""


def test_a_driver_stalled_past_the_grace_period_keeps_its_trial(tmp_path: Path) -> None:
    env = {"HPO_HEARTBEAT_INTERVAL": "1", "HPO_GRACE_PERIOD": "3"}
    module = write(tmp_path, trials=1, seconds=4.0, concurrency=1)
    process = start(module, tmp_path, env)
    wait_for(lambda: running(tmp_path), process)
    stall = subprocess.run([sys.executable, "-c", STALL, f"sqlite:///{tmp_path / 'hpo.db'}", "6"],
                           capture_output=True, text=True, env=hpo_env(env), timeout=120)
    assert stall.stdout.splitlines() == ["STALE []", "RECLAIMED []"], stall.stdout + stall.stderr
    out, _ = process.communicate(timeout=300)
    assert process.returncode == 0, out
    trials = study_of(tmp_path).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE], out
    assert trials[0].value == trials[0].params["x"] + 3, "the result is kept"
    assert trial_runs(tmp_path)[0].info.status == "FINISHED"


def test_killed_workers_rerun_then_ctrl_c_exits_130_and_resumes(tmp_path: Path) -> None:
    module = write(tmp_path, trials=4, seconds=3.0)
    process = start(module, tmp_path)
    wait_for(lambda: running(tmp_path) and chaos.trial_workers(process.pid), process)
    chaos.kill_all(chaos.trial_workers(process.pid))  # kill -9 the Ray workers only

    def failed() -> set[int]:
        return {t.number for t in study_of(tmp_path).get_trials() if t.state == TrialState.FAIL}

    wait_for(failed, process)
    victims = failed()
    wait_for(lambda: {t.number for t in running(tmp_path)} - victims, process)  # the sweep goes on
    interrupted = {t.number for t in running(tmp_path)}
    os.killpg(process.pid, signal.SIGINT)  # Ctrl-C in the terminal: the whole process group
    out, _ = process.communicate(timeout=300)
    assert process.returncode == 130, out
    assert "interrupted: trials" in out

    trials = {t.number: t for t in study_of(tmp_path).get_trials()}
    for number in victims | interrupted:
        assert trials[number].state == TrialState.FAIL and trials[number].user_attrs["reason"] == "interrupted"
    runs = trial_runs(tmp_path)
    assert {runs[n].info.status for n in victims | interrupted} == {"KILLED"}

    again = start(module, tmp_path)
    out, _ = again.communicate(timeout=300)
    assert again.returncode == 0, out
    trials = study_of(tmp_path).get_trials()
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 4 and not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    by_number = {t.number: t for t in trials}
    finished_configs = {t.params["x"] for t in complete}
    for number in victims | interrupted:  # each stopped trial ran again, with the same params, to its end
        assert by_number[number].params["x"] in finished_configs
        assert [t for t in trials if t.user_attrs.get("retry_of") == number]
    assert not [r for r in trial_runs(tmp_path).values() if r.info.status == "RUNNING"]


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """One Ray head on 127.0.0.1 (token auth with a token of its own) that several sweep
    processes join instead of starting one Ray each; the environment that joins it."""
    import secrets

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    temp = tmp_path_factory.mktemp("ray")
    env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    log = temp / "head.log"
    head = subprocess.Popen(
        [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", f"--port={port}",
         "--node-ip-address=127.0.0.1", "--num-cpus=8", "--include-dashboard=false", "--disable-usage-stats",
         f"--temp-dir={temp}"],
        env=hpo_env(env), stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while "Ray runtime started" not in log.read_text():
            assert head.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        yield {**env, "RAY_ADDRESS": f"127.0.0.1:{port}"}
    finally:
        chaos.kill_all(chaos.family(head.pid))


NOOP = '''
import hpo

sweep = hpo.Sweep(metric="score", direction="maximize", trials=200, max_steps=1, eval_every=1,
                  pruner="none", sampler="random", seed=0, concurrency=1)


def space(trial):
    return {"x": trial.suggest_float("x", 0.0, 1.0)}


def train(params, report):
    report(1, {"score": params["x"]})
'''


def processes_share_one_study(folder: Path, storage: str, ray_env: dict[str, str], processes: int = 8,
                              trials: int = 200) -> None:
    """``processes`` sweep processes, all joining one Ray head, run one study of ``trials``."""
    module = folder / "lost.py"
    module.write_text(NOOP.replace("trials=200", f"trials={trials}"))
    started = [start(module, folder, ray_env, storage) for _ in range(processes)]
    outputs = []
    for process in started:
        out, _ = process.communicate(timeout=600)
        outputs.append(out)
        assert process.returncode == 0, out[-4000:]
    joined = "\n".join(outputs)
    for word in ("database is locked", "Traceback"):
        at = joined.find(word)
        assert at < 0, joined[max(0, at - 3000) : at + 1500]
    found = study_of(folder, storage).get_trials()
    numbers = [t.number for t in found]
    assert len(numbers) == len(set(numbers))
    assert [t.state for t in found] == [TrialState.COMPLETE] * trials, f"exactly {trials} finished, nothing RUNNING"
    assert len({t.system_attrs["hpo:driver"] for t in found}) >= 2, "the processes shared the work"
    runs = trial_runs(folder)
    assert len(runs) == trials and not [r for r in runs.values() if r.info.status == "RUNNING"]
    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    everything = client.search_runs([client.get_experiment_by_name("lost").experiment_id], max_results=1000)
    assert sum(1 for r in everything if r.data.tags["hpo.role"] == "sweep") == 1, "one sweep run, shared"


def test_four_processes_on_one_sqlite_study(tmp_path: Path, ray_head: dict) -> None:
    processes_share_one_study(tmp_path, f"sqlite:///{tmp_path / 'hpo.db'}", ray_head, processes=4, trials=100)


@pytest.mark.postgres
def test_eight_processes_on_one_postgresql_study(tmp_path: Path, postgres_url: str, ray_head: dict) -> None:
    processes_share_one_study(tmp_path, postgres_url, ray_head)


@pytest.mark.mariadb
def test_eight_processes_on_one_mariadb_study(tmp_path: Path, mariadb_url: str, ray_head: dict) -> None:
    processes_share_one_study(tmp_path, mariadb_url, ray_head)


def test_chaos_short_schedule_loses_nothing(tmp_path: Path) -> None:
    """The soak's short form: against a real MLflow server, the server killed and started again
    while trials run, then a driver killed just after a trial ended (while it writes the study
    and MLflow), then a worker: nothing lost, and every trial's MLflow run agrees with the study."""
    run = subprocess.run([sys.executable, str(REPO / "bench" / "chaos.py"), "--trials", "8", "--kills", "2",
                          "--server-kills", "1", "--seed", "1", "--seconds", "0.1", "--max-delay", "2",
                          "--max-down", "3", "--workdir", str(tmp_path)],
                         capture_output=True, text=True, env=hpo_env(), timeout=600)
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["losses"] == 0, report
    assert report["kills"] == 2 and report["driver_kills"] == 1 and report["worker_kills"] == 1 and report["resumes"] >= 1
    assert report["server_kills"] == 1 and report["mid_write_kills"] == 1, report
    assert report["trials"] == 8 and report["running"] == 0 and report["mlflow_running"] == 0, report
    assert report["mlflow_disagree"] == 0 and report["mlflow_duplicate_runs"] == 0, report
    assert report["mlflow_trial_runs"] == report["optuna_trials"], "one run per trial"
    assert run.returncode == 0, run.stdout + run.stderr


def test_the_chaos_check_sees_a_run_that_disagrees_with_the_study(tmp_path: Path) -> None:
    """bench/chaos.py's own check of a trial's MLflow run against the study (not hpo's): it
    passes a run that agrees, and names what is wrong with one that does not."""
    from hpo.record import mlflow_store

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow_store.seed(store)
    client = MlflowClient(store)
    experiment = client.create_experiment("check")
    trial = optuna.trial.create_trial(params={"x": 0.5, "y": 7}, distributions={
        "x": optuna.distributions.FloatDistribution(0, 1), "y": optuna.distributions.IntDistribution(0, 1000)},
        value=510.0, intermediate_values={3: 510.0})

    def run(status: str = "FINISHED", state: str = "COMPLETE", value: str = "510.0", score: float = 510.0,
            y: str = "7"):  # noqa: ANN202
        made = client.create_run(experiment, tags={"hpo.role": "trial", "hpo.trial_number": "0", "hpo.state": state,
                                                   "hpo.objective": value})
        client.log_param(made.info.run_id, "x", "0.5")
        client.log_param(made.info.run_id, "y", y)
        client.log_metric(made.info.run_id, "score", score, step=3)
        if status != "RUNNING":
            client.set_terminated(made.info.run_id, status=status)
        return client.get_run(made.info.run_id)

    good = run()
    assert chaos.disagreement(trial, [good], {0: trial}) == ""
    assert chaos.disagreement(trial, [], {0: trial}) == "no run"
    assert chaos.disagreement(trial, [good, run()], {0: trial}) == "2 runs"
    assert chaos.disagreement(trial, [run(status="RUNNING")], {0: trial}) == "status RUNNING, not FINISHED"
    assert chaos.disagreement(trial, [run(state="RUNNING")], {0: trial}) == "hpo.state RUNNING, not COMPLETE"
    assert chaos.disagreement(trial, [run(value="3.0")], {0: trial}) == "hpo.objective 3.0, not 510.0"
    assert chaos.disagreement(trial, [run(score=2.0)], {0: trial}) == "last score 2.0, not 510.0"
    assert chaos.disagreement(trial, [run(y="8")], {0: trial}) == "param y 8, not 7"
    interrupted = optuna.trial.create_trial(state=TrialState.FAIL, params=trial.params,
                                            distributions=trial.distributions, user_attrs={"reason": "interrupted"})
    assert chaos.disagreement(interrupted, [run(status="FAILED", state="FAIL")], {0: interrupted}) == \
        "status FAILED, not KILLED"


HOLD_LOCK = """
import sqlite3, sys
connection = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=60)
connection.execute("BEGIN EXCLUSIVE")   # every other writer of the MLflow store now waits
print("locked", flush=True)
sys.stdin.read()                        # ... until the test closes our stdin
"""


def test_mlflow_writes_a_killed_driver_had_not_made_are_written_on_resume(tmp_path: Path) -> None:
    """The driver writes MLflow off its loop (hpo.record.writer). Hold the MLflow store locked (a real
    lock, from another process) so those writes pile up while the study records trials,
    kill -9 the driver, then resume: every trial has its one run, closed, with its params,
    state and metric curve, as the study says."""
    module = write(tmp_path, trials=4, seconds=0.2, concurrency=1)
    process = start(module, tmp_path)
    wait_for(lambda: running(tmp_path), process)  # the store, the sweep's parent run: made
    lock = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path / "mlflow.db")], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert lock.stdout.readline().strip() == "locked"
        wait_for(lambda: sum(t.state == TrialState.COMPLETE for t in study_of(tmp_path).get_trials()) >= 3, process)
        chaos.kill_all(chaos.family(process.pid))
        process.wait(timeout=60)
    finally:
        lock.stdin.close()
        lock.wait(timeout=60)
    finished = [t for t in study_of(tmp_path).get_trials() if t.state.is_finished()]
    before = trial_runs(tmp_path)
    assert [t.number for t in finished if t.number not in before or before[t.number].info.status == "RUNNING"], \
        "the kill left MLflow behind the study (else this test proves nothing)"

    again = start(module, tmp_path)
    out, _ = again.communicate(timeout=300)
    assert again.returncode == 0, out
    assert "cleaned up after an interrupted sweep" in out
    trials = study_of(tmp_path).get_trials()
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 4
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    every = [r for r in client.search_runs([client.get_experiment_by_name("lost").experiment_id], max_results=1000)
             if r.data.tags["hpo.role"] == "trial"]
    runs = {int(r.data.tags["hpo.trial_number"]): r for r in every}
    assert len(every) == len(runs) == len(trials), "one run per trial, none twice"
    status = {"COMPLETE": "FINISHED", "FAIL": "KILLED"}  # FAIL here: interrupted by the kill
    for trial in trials:
        run = runs[trial.number]
        assert run.info.status == status[trial.state.name], (trial.number, run.info.status)
        assert run.data.tags["hpo.state"] == trial.state.name
        # the run holds the trial's params: none for a trial the kill caught inside its claim, before
        # space(trial) sampled it (FAIL interrupted; its rerun samples anew)
        assert {k: run.data.params.get(k) for k in trial.params} == {k: str(v) for k, v in trial.params.items()}
        if not trial.params:
            assert trial.state == TrialState.FAIL and trial.user_attrs["reason"] == "interrupted", trial.number
            assert "x" not in run.data.params
        history = client.get_metric_history(run.info.run_id, "score")
        assert sorted((m.step, m.value) for m in history) == sorted(trial.intermediate_values.items()), trial.number
        if trial.state == TrialState.COMPLETE:
            assert float(run.data.tags["hpo.objective"]) == trial.value
