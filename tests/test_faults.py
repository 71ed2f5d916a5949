"""Nothing lost: kill -9 and resume, retries, timeout, several sweep processes on one study
(SQLite and PostgreSQL), secrets kept out of output and records. Real processes, real Ray."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import psutil
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from hpo.record.ledger import counts_towards_target
from hpo.record.study import open_storage
from tests.conftest import hpo_env, run_hpo, write_sleepy_module

pytestmark = pytest.mark.slow

SLOW_MODULE = '''
import time
import hpo

sweep = hpo.Sweep(metric="score", direction="maximize", trials=6, max_steps=3, eval_every=1,
                  pruner="none", sampler="random", seed=0, concurrency=2)


def space(trial):
    return {"x": trial.suggest_float("x", 0.0, 1.0)}


def train(params, report):
    for step in (1, 2, 3):
        time.sleep(SECONDS)
        report(step, {"score": params["x"] + step})
'''


def write_module(folder: Path, body: str, seconds: float = 1.0, name: str = "slow") -> Path:
    path = folder / f"{name}.py"
    path.write_text(body.replace("SECONDS", repr(seconds)))
    return path


def study_of(folder: Path, name: str = "slow", storage: str | None = None) -> optuna.Study:
    """The study, opened as hpo opens it (taking turns with a sweep that may be creating the tables)."""
    return optuna.load_study(study_name=name, storage=open_storage(storage or f"sqlite:///{folder / 'hpo.db'}"))


def mlflow_runs(folder: Path, name: str = "slow") -> list:
    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    return client.search_runs([client.get_experiment_by_name(name).experiment_id], max_results=1000)


def start(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "hpo", *args], cwd=cwd, env=hpo_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL the sweep and every process it started (Ray's included), all at once."""
    family = [process.pid] + [p.pid for p in psutil.Process(process.pid).children(recursive=True)]
    for pid in family:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait(timeout=30)


def test_kill_9_after_two_trials_then_resume(tmp_path: Path) -> None:
    module = write_module(tmp_path, SLOW_MODULE, seconds=1.5)
    process = start(["search", str(module)], tmp_path)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if (tmp_path / "hpo.db").exists():
            try:
                done = [t for t in study_of(tmp_path).get_trials() if t.state == TrialState.COMPLETE]
            except KeyError:
                done = []
            if len(done) >= 2:
                break
        time.sleep(0.3)
    else:
        kill_tree(process)
        raise AssertionError("two trials did not finish in time")
    kill_tree(process)

    before = study_of(tmp_path).get_trials()
    finished_before = {t.number: t.value for t in before if t.state == TrialState.COMPLETE}
    running_before = [t.number for t in before if t.state == TrialState.RUNNING]
    assert len(finished_before) >= 2 and running_before, "killed with trials running"

    result = run_hpo(["search", str(module)], cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "cleaned up after an interrupted sweep" in result.stdout

    trials = study_of(tmp_path).get_trials()
    by_number = {t.number: t for t in trials}
    assert sum(counts_towards_target(t) for t in trials) == 6
    assert [t for t in trials if t.state == TrialState.COMPLETE].__len__() == 6
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    for number, value in finished_before.items():
        assert by_number[number].state == TrialState.COMPLETE and by_number[number].value == value
    retried = {t.user_attrs["retry_of"]: t for t in trials if "retry_of" in t.user_attrs}
    for number in running_before:
        assert by_number[number].state == TrialState.FAIL
        assert by_number[number].user_attrs["reason"] == "interrupted"
        assert retried[number].state == TrialState.COMPLETE
        if by_number[number].params:  # (none when the kill came between ask and sampling)
            assert retried[number].params == by_number[number].params, "an interrupted trial runs again"
    complete_params = [t.params["x"] for t in trials if t.state == TrialState.COMPLETE]
    assert len(set(complete_params)) == 6, "no finished trial duplicated"

    runs = mlflow_runs(tmp_path)
    assert not [r for r in runs if r.info.status == "RUNNING" and r.data.tags["hpo.role"] == "trial"]
    trial_runs = {int(r.data.tags["hpo.trial_number"]): r for r in runs if r.data.tags["hpo.role"] == "trial"}
    for number in running_before:
        assert trial_runs[number].info.status == "KILLED"
        assert trial_runs[number].data.tags["hpo.reason"] == "interrupted"
    assert sorted(trial_runs) == sorted(by_number)


FLAKY_MODULE = '''
from pathlib import Path
import hpo

sweep = hpo.Sweep(metric="score", direction="maximize", trials=3, max_steps=2, eval_every=1,
                  pruner="none", sampler="random", seed=0, concurrency=1)


def space(trial):
    return {"x": trial.suggest_float("x", 0.0, 1.0)}


def train(params, report):
    marker = Path(MARKER)
    if not marker.exists():
        marker.touch()
        raise RuntimeError("flaky node")
    report(1, {"score": params["x"]})
    report(2, {"score": params["x"] + 1})
'''


def test_retries_run_a_failed_trial_again(tmp_path: Path) -> None:
    module = tmp_path / "flaky.py"
    module.write_text(FLAKY_MODULE.replace("MARKER", repr(str(tmp_path / "failed-once"))))
    result = run_hpo(["search", str(module), "--retries", "1"], cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    trials = study_of(tmp_path, "flaky").get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL] + [TrialState.COMPLETE] * 3
    failed = trials[0]
    assert failed.user_attrs["reason"] == "error" and failed.user_attrs["retried"] is True
    assert failed.user_attrs["error"] == "RuntimeError: flaky node"
    retry = trials[1]
    assert retry.user_attrs["retry_of"] == 0 and retry.params == failed.params and retry.user_attrs["attempt"] == 2


def test_timeout_lets_running_trials_finish_and_leaves_nothing_running(tmp_path: Path) -> None:
    module = write_module(tmp_path, SLOW_MODULE.replace("trials=6", "trials=50"), seconds=1.0)
    started = time.monotonic()
    result = run_hpo(["search", str(module), "--timeout", "8"], cwd=tmp_path)
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stdout + result.stderr
    trials = study_of(tmp_path).get_trials()
    assert 2 <= len(trials) < 50
    assert {t.state for t in trials} == {TrialState.COMPLETE}, "running trials finished, none cut short"
    assert elapsed < 90
    assert not [r for r in mlflow_runs(tmp_path) if r.info.status == "RUNNING"]


@pytest.mark.postgres
def test_passwords_never_reach_output_or_records(tmp_path: Path, postgres_url: str) -> None:
    module = write_module(tmp_path, SLOW_MODULE.replace("trials=6", "trials=2"), seconds=0.0)
    result = run_hpo(["search", str(module), "--storage", postgres_url], cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    status = run_hpo(["status", "--storage", postgres_url, "--json"], cwd=tmp_path)
    assert status.returncode == 0
    texts = [result.stdout, result.stderr, status.stdout, status.stderr]
    for run in mlflow_runs(tmp_path):
        texts.append(json.dumps({"params": run.data.params, "tags": run.data.tags}))
    texts.append(json.dumps(study_of(tmp_path, storage=postgres_url).user_attrs))
    for log in (tmp_path / ".hpo").rglob("*"):
        if log.is_file() and log.stat().st_size < 5_000_000:
            texts.append(log.read_text(errors="replace"))
    assert "postgres:***@127.0.0.1" in result.stdout
    assert not [t for t in texts if "pg-Secret-42" in t]


def test_unreachable_tracking_server_is_one_line(tmp_path: Path) -> None:
    module = write_module(tmp_path, SLOW_MODULE, seconds=0.0)
    result = run_hpo(["search", str(module), "--tracking-uri", "http://bob:hunter2@127.0.0.1:9/"], cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("error: --tracking-uri http://bob:***@127.0.0.1:9/: the MLflow server does not answer")
    assert "hunter2" not in result.stderr + result.stdout and "Traceback" not in result.stderr
    assert not (tmp_path / "hpo.db").exists()


SLOW_CLEANUP_MODULE = '''
import time
import hpo

sweep = hpo.Sweep(metric="score", direction="maximize", trials=2, max_steps=2, eval_every=1,
                  pruner="none", sampler="random", seed=0, concurrency=1)


def space(trial):
    return {"x": trial.suggest_float("x", 0.0, 1.0)}


def train(params, report):
    try:
        for step in (1, 2):
            report(step, {"score": params["x"] + step})
    finally:
        time.sleep(SECONDS)  # freeing a big model after the last report, on a busy CPU
'''


def test_slow_trial_cleanup_does_not_stall_the_sweep(tmp_path: Path) -> None:
    """A trial still cleaning up after its last report, past Tune's 2 s thread timeout, used to
    error the next trial on that reused worker and stall the whole sweep (Ray 2.60)."""
    module = write_module(tmp_path, SLOW_CLEANUP_MODULE, seconds=4.0, name="cleanup")
    result = run_hpo(["search", str(module)], cwd=tmp_path, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    trials = study_of(tmp_path, "cleanup").get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2


def wait_for_running(process: subprocess.Popen, folder: Path, count: int, name: str = "long") -> list[int]:
    """The numbers of the study's RUNNING trials once there are ``count`` of them."""
    deadline = time.monotonic() + 240
    while True:
        if process.poll() is not None:
            raise AssertionError("the sweep ended before its trials ran: " + process.communicate()[0][-4000:])
        if time.monotonic() > deadline:
            kill_tree(process)
            raise AssertionError(f"{count} trials did not start: " + process.communicate()[0][-4000:])
        try:
            running = [t.number for t in study_of(folder, name).get_trials() if t.state == TrialState.RUNNING]
        except KeyError:  # the study is not created yet
            running = []
        if len(running) >= count:
            return running
        time.sleep(0.3)


def test_one_ctrl_c_starts_no_new_trial_and_exits_130(tmp_path: Path) -> None:
    """One SIGINT to the sweep process alone (``kill -INT PID``; its Ray workers get none and keep
    training): no trial starts after it, the two running ones end interrupted (they run again on
    the next run, their MLflow runs KILLED) and the command exits 130 promptly."""
    module = write_sleepy_module(tmp_path, "long", trials=6, seconds=1.0, steps=40)
    process = start(["search", str(module)], tmp_path)
    running = wait_for_running(process, tmp_path, 2)
    signalled = time.time()
    process.send_signal(signal.SIGINT)  # the process only, not its group
    try:
        out, _ = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        kill_tree(process)
        out = process.communicate()[0]
        raise AssertionError(f"still running 60 s after one Ctrl-C: {out[-4000:]}") from None
    elapsed = time.time() - signalled
    assert process.returncode == 130, out
    assert "interrupted: trials" in out, out

    trials = study_of(tmp_path, "long").get_trials()
    started = {t.number: t.datetime_start.timestamp() for t in trials if t.datetime_start is not None}
    assert sorted(started) == sorted(running), f"trials started after the Ctrl-C: {out[-4000:]}"
    assert max(started.values()) < signalled
    by_number = {t.number: t for t in trials}
    for number in running:
        assert by_number[number].state == TrialState.FAIL
        assert by_number[number].user_attrs["reason"] == "interrupted"
    reruns = [t for t in trials if t.number not in running]
    assert {t.state for t in reruns} <= {TrialState.WAITING}, "only the reruns of the stopped trials are queued"
    assert sorted(t.user_attrs["retry_of"] for t in reruns) == sorted(running)
    assert [t.user_attrs["attempt"] for t in reruns] == [1] * len(running), "a Ctrl-C is not an attempt"

    runs = mlflow_runs(tmp_path, "long")
    assert not [r for r in runs if r.info.status == "RUNNING"]
    trial_runs = {int(r.data.tags["hpo.trial_number"]): r for r in runs if r.data.tags["hpo.role"] == "trial"}
    assert sorted(trial_runs) == sorted(running)
    assert {trial_runs[n].info.status for n in running} == {"KILLED"}
    assert elapsed < 45, f"{elapsed:.0f} s from the Ctrl-C to the exit"


def test_one_ctrl_c_stops_a_sweep_waiting_for_another_process(tmp_path: Path) -> None:
    """A sweep whose study is filled by another process's running trials waits for them inside
    one turn of Tune's loop (``_update_trial_queue(blocking=True)``, up to 600 s, asking the
    searcher every second). Tune's own SIGINT handler only ends its loop after that turn, so one
    Ctrl-C used to go unnoticed: the sweep went on waiting, and once the other process stopped it
    started the reruns of its trials, only to stop them at once (FAIL interrupted). Now the
    Ctrl-C ends it at once (exit 130) and it starts no trial."""
    module = write_sleepy_module(tmp_path, "long", trials=2, seconds=1.0, steps=120)
    shared = ["--storage", f"sqlite:///{tmp_path / 'hpo.db'}", "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first, waiting = start(["search", str(module), *shared], tmp_path / "a"), None
    try:
        running = wait_for_running(first, tmp_path, 2)  # the study's two trials, both the first process's
        waiting = start(["search", str(module), *shared], tmp_path / "b")
        deadline = time.monotonic() + 180
        while not list((tmp_path / "b" / ".hpo" / "ray_results").glob("*/tuner.pkl")):  # its Tune run starts
            assert waiting.poll() is None, waiting.communicate()[0][-4000:]
            assert time.monotonic() < deadline, "the second sweep's Tune run did not start"
            time.sleep(0.2)
        time.sleep(5)  # ... and waits in its loop for the first process's trials
        signalled = time.time()
        waiting.send_signal(signal.SIGINT)  # the process only
        try:
            waiting.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        waited = time.time() - signalled
        first.send_signal(signal.SIGINT)  # now stop the first process: its trials end interrupted
        out_first, _ = first.communicate(timeout=90)
        out_waiting, _ = waiting.communicate(timeout=90)
    finally:
        for process in (first, waiting):
            if process is not None and process.poll() is None:
                kill_tree(process)

    trials = study_of(tmp_path, "long").get_trials()
    late = {t.number: round(t.datetime_start.timestamp() - signalled, 1) for t in trials
            if t.datetime_start is not None and t.datetime_start.timestamp() > signalled}
    assert not late, f"trials started after the waiting sweep's Ctrl-C (trial: seconds after it): {late}"
    assert waiting.returncode == 130, out_waiting
    assert waited < 30, f"the waiting sweep ran on for {waited:.0f} s after its Ctrl-C: {out_waiting[-3000:]}"
    assert first.returncode == 130, out_first
    by_number = {t.number: t for t in trials}
    assert {by_number[n].user_attrs.get("reason") for n in running} == {"interrupted"}
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    assert not [r for r in mlflow_runs(tmp_path, "long") if r.info.status == "RUNNING"]


def test_a_second_ctrl_c_stops_at_once(tmp_path: Path) -> None:
    """Ctrl-C twice: the second one does not wait for Tune to stop the trials (or for the study
    report); the trials still end interrupted, every MLflow run is closed, and the exit is 130."""
    module = write_sleepy_module(tmp_path, "long", trials=6, seconds=1.0, steps=40)
    process = start(["search", str(module)], tmp_path)
    running = wait_for_running(process, tmp_path, 2)
    process.send_signal(signal.SIGINT)
    time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    try:
        out, _ = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        kill_tree(process)
        raise AssertionError("still running 60 s after two Ctrl-C: " + process.communicate()[0][-4000:]) from None
    assert process.returncode == 130, out
    assert "stopped at once (a second Ctrl-C)" in out, out
    trials = {t.number: t for t in study_of(tmp_path, "long").get_trials()}
    assert {trials[n].user_attrs.get("reason") for n in running} == {"interrupted"}
    assert not [t for t in trials.values() if t.state == TrialState.RUNNING]
    assert not [r for r in mlflow_runs(tmp_path, "long") if r.info.status == "RUNNING"]


LATE_RAYLET_SCRIPT = '''
import json
import time

import psutil
import ray
import ray._private.node as node
import ray._private.services as services

from hpo.run import cluster

real_get_node, real_clock, late = services.get_node, time.monotonic, []


def get_node(*args, **kwargs):
    """The first start's raylet is late: its first look finds no node."""
    if not late:
        late.append(time.monotonic())
        raise RuntimeError("node info not available (test)")
    return real_get_node(*args, **kwargs)


class Clock:
    """node.py's ``time``: 31 s ahead once the raylet was late, so Ray's 30 s wait runs out."""

    def __getattr__(self, name):
        return getattr(time, name)

    def monotonic(self):
        return real_clock() + (31 if late else 0)


services.get_node, node.time = get_node, Clock()
cluster.connect(None)
answer = ray.get(ray.remote(lambda: 41 + 1).remote())
names = []
for proc in psutil.Process().children(recursive=True):
    try:
        names.append(proc.name())
    except psutil.Error:  # a worker that has just ended
        pass
print(json.dumps({"late": len(late), "answer": answer, "gcs_servers": names.count("gcs_server"),
                  "raylets": names.count("raylet")}))
ray.shutdown()
'''


def test_a_local_ray_whose_raylet_registers_late_is_started_once_more(tmp_path: Path) -> None:
    """Ray waits a fixed 30 s for a new local node's raylet to register, then fails the start
    ("The current node timed out during startup"); on a loaded 2-core machine it has taken
    longer, failing whole sweeps. ``connect`` ends the half-started node's processes and starts
    Ray once more. The late raylet is the one thing faked (Ray's look for the node fails once
    and its clock jumps past the 30 s): both starts, their processes and the kill are real."""
    script = tmp_path / "late_raylet.py"
    script.write_text(LATE_RAYLET_SCRIPT)
    done = subprocess.run([sys.executable, str(script)], env=hpo_env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["late"] == 1 and result["answer"] == 42, result
    assert result["gcs_servers"] == 1 and result["raylets"] == 1, \
        f"the half-started node's processes were left running: {result}"
    assert "did not register within Ray's 30 s" in done.stderr and "starting Ray once more" in done.stderr, \
        done.stderr[-4000:]
