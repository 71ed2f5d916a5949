"""The decision tables, in process: Tune's events (result, error, stop, interrupt) driven
through OptunaBridge and the Recorder into a real Optuna SQLite study and a real MLflow
SQLite store; each row checks the state and reason told to Optuna and to MLflow."""

from __future__ import annotations

import math
import uuid
from pathlib import Path
from typing import Any

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from hpo.record.ledger import DRIVER_ATTR, Ledger, counts_towards_target
from hpo.record.recorder import Recorder
from hpo.record.study import open_storage
from hpo.record.sweep_tracker import SweepTracker
from hpo.run.scheduling import OptunaBridge, _NoStop
from hpo.run.trial import ERROR_KEY, REASON_KEY


class Shown:
    """A display that remembers what it was told."""

    def __init__(self) -> None:
        self.ended: dict[int, tuple[str, Any, Any]] = {}

    def trial_started(self, number: int, params: dict[str, Any]) -> None: ...
    def trial_result(self, number: int, step: int, value: float | None) -> None: ...
    def tick(self) -> None: ...

    def trial_ended(self, number: int, state: str, value: float | None, reason: str | None) -> None:
        self.ended[number] = (state, value, reason)


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    SweepTracker(uri, "warm-up")  # the store's migrations, once for the module
    return uri


class Sweep:
    def __init__(self, folder: Path, tracking_uri: str, target: int = 5, space: Any = None):
        self.name = f"s{uuid.uuid4().hex[:8]}"
        self.url = f"sqlite:///{folder / 'hpo.db'}"
        self.study = optuna.create_study(study_name=self.name, storage=open_storage(self.url), direction="maximize")
        self.ledger = Ledger(self.study, space or (lambda t: {"x": t.suggest_float("x", 0, 1)}), target=target)
        self.tracker = SweepTracker(tracking_uri, self.name)
        self.tracker.start_sweep({}, {})
        self.display = Shown()
        self.recorder = Recorder(self.ledger, self.tracker, self.display, metrics=("score",), deadline=None)
        self.scheduler = _NoStop()
        self.bridge = OptunaBridge(self.recorder, self.scheduler, "score", "max")

    def start(self, trial_id: str = "t") -> int:
        config = self.bridge.suggest(trial_id)
        assert isinstance(config, dict), config
        return config["number"]

    def result(self, trial_id: str, step: int, **metrics: Any) -> None:
        self.bridge.on_trial_result(trial_id, {"step": step, **metrics})

    def trial(self, number: int) -> optuna.trial.FrozenTrial:
        return self.study.get_trials()[number]

    def run(self, number: int) -> Any:
        self.tracker.flush()  # MLflow writes run on the tracker's writer thread
        client = MlflowClient(self.tracker.uri)
        runs = client.search_runs([self.tracker.experiment_id], f"tags.`hpo.trial_number` = '{number}'")
        assert len(runs) == 1
        return runs[0]


@pytest.fixture
def sweep(tmp_path: Path, tracking_uri: str) -> Sweep:
    made = Sweep(tmp_path, tracking_uri)
    yield made
    made.ledger.close()


# (name, results before the end, (result, error) at the end, scheduler stop step,
#  Optuna state, reason user attr, MLflow status, hpo.state tag, run again)
ROWS = [
    ("complete", [1, 2], ({"step": 2, "score": 2.5, "done": True}, False), None,
     TrialState.COMPLETE, None, "FINISHED", "COMPLETE", False),
    ("early_stopped", [1], ({"step": 1, "hpo_early_stopped": 1, "done": True}, False), None,
     TrialState.COMPLETE, "early_stopped", "FINISHED", "COMPLETE", False),
    ("pruned", [1], ({"step": 2, "score": 2.5}, False), 2,
     TrialState.PRUNED, "pruned", "KILLED", "PRUNED", False),
    ("error", [1], ({"step": 1, ERROR_KEY: "ValueError: boom", REASON_KEY: "error"}, False), None,
     TrialState.FAIL, "error", "FAILED", "FAIL", False),
    ("nan", [1], ({"step": 1, ERROR_KEY: "non-finite loss", REASON_KEY: "nan"}, False), None,
     TrialState.FAIL, "nan", "FAILED", "FAIL", False),
    ("oom", [], ({"step": 0, ERROR_KEY: "OutOfMemoryError: CUDA", REASON_KEY: "oom"}, False), None,
     TrialState.FAIL, "oom", "FAILED", "FAIL", False),
    ("worker_died", [1], (None, True), None, TrialState.FAIL, "interrupted", "KILLED", "FAIL", True),
    ("stopped_by_ctrl_c", [1], ({"step": 1, "score": 1.5}, False), None,
     TrialState.FAIL, "interrupted", "KILLED", "FAIL", True),
    ("no_result", [], (None, False), None, TrialState.FAIL, "interrupted", "KILLED", "FAIL", True),
    ("no_metric", [], ({"step": 3, "done": True}, False), None, TrialState.FAIL, "no_metric", "FAILED", "FAIL", False),
    ("nan_metric", [1], ({"step": 2, "score": math.nan, "done": True}, False), None,
     TrialState.FAIL, "nan", "FAILED", "FAIL", False),
]


@pytest.mark.parametrize("row", ROWS, ids=[row[0] for row in ROWS])
def test_each_end_is_told_truthfully_to_optuna_and_mlflow(sweep: Sweep, row: tuple) -> None:
    _, steps, (result, error), stop_at, state, reason, status, tag_state, again = row
    number = sweep.start("t")
    for step in steps:
        sweep.result("t", step, score=step + 0.5)
    if stop_at is not None:
        sweep.scheduler.stopped_early["t"] = stop_at
    sweep.bridge.on_trial_complete("t", result=result, error=error)

    trial = sweep.trial(number)
    assert trial.state == state
    assert trial.user_attrs.get("reason") == reason
    if state == TrialState.COMPLETE:
        assert trial.value == (2.5 if reason is None else 1.5)
    if state == TrialState.PRUNED:
        assert trial.intermediate_values == {1: 1.5, 2: 2.5} and trial.user_attrs["pruned_at"] == 2
    reruns = [t for t in sweep.study.get_trials() if t.user_attrs.get("retry_of") == number]
    assert bool(reruns) == again and counts_towards_target(trial) == (not again)
    if again:
        assert reruns[0].state == TrialState.WAITING and reruns[0].system_attrs["fixed_params"] == trial.params
    run = sweep.run(number)
    assert run.info.status == status and run.data.tags["hpo.state"] == tag_state
    assert sweep.display.ended[number][0] == state.name
    if reason in ("interrupted", "error", "nan", "oom", "no_metric"):
        assert run.data.tags["hpo.reason"]
    assert (number in sweep.recorder.interrupted) == again


def test_a_config_interrupted_three_times_fails_and_counts(sweep: Sweep) -> None:
    for attempt in (1, 2, 3):
        number = sweep.start(f"t{attempt}")
        sweep.bridge.on_trial_complete(f"t{attempt}", result=None, error=True)
    trial = sweep.trial(number)
    assert trial.user_attrs["attempt"] == 3 and trial.user_attrs["reason"] == "interrupted_too_often"
    assert counts_towards_target(trial) and sweep.run(number).info.status == "FAILED"
    assert not [t for t in sweep.study.get_trials() if t.state == TrialState.WAITING]


def test_a_result_for_a_trial_failed_meanwhile_is_kept_and_said(sweep: Sweep) -> None:
    from rich.console import Console

    sweep.display.console = Console(record=True, width=200)
    number = sweep.start("t")
    sweep.result("t", 1, score=0.75)
    trial_id = sweep.trial(number)._trial_id
    storage = sweep.study._storage  # another process fails it (as a stale driver's) and queues a rerun
    storage.set_trial_user_attr(trial_id, "reason", "interrupted")
    storage.set_trial_state_values(trial_id, TrialState.FAIL)
    sweep.study.enqueue_trial(sweep.trial(number).params, user_attrs={"retry_of": number, "attempt": 2})
    sweep.result("t", 2, score=0.9)
    sweep.bridge.on_trial_complete("t", result={"step": 2, "score": 0.9, "done": True})

    kept = sweep.recorder.kept[number]
    trials = sweep.study.get_trials()
    assert trials[kept].state == TrialState.COMPLETE and trials[kept].value == 0.9
    assert trials[kept].params == trials[number].params and trials[kept].user_attrs["late_result_of"] == number
    assert sum(counts_towards_target(t) for t in trials) == 1
    run = sweep.run(number)
    assert run.info.status == "FINISHED" and run.data.tags["hpo.kept_as_trial"] == str(kept)
    assert f"its result is kept as trial {kept}" in sweep.display.console.export_text()


def test_waits_for_another_live_process_then_finishes(tmp_path: Path, tracking_uri: str) -> None:
    sweep = Sweep(tmp_path, tracking_uri, target=2)
    sweep.recorder.POLL = 0.0
    other = Ledger(optuna.load_study(study_name=sweep.name, storage=open_storage(sweep.url)),
                   lambda t: {"x": t.suggest_float("x", 0, 1)}, target=2)
    theirs = [other.claim(), other.claim()]
    # Short, with another live process's trials running: this Tune run ends (no idle worker
    # of ours holds a slot their trials may need), and the sweep waits on the study.
    assert sweep.bridge.suggest("a") == "FINISHED" and sweep.recorder.elsewhere and not sweep.recorder.done
    other.tell(theirs[0].number, TrialState.COMPLETE, value=1.0)
    other.tell(theirs[1].number, TrialState.FAIL, reason="interrupted")  # its rerun is ours to run
    asked = sweep.recorder.wait_for_a_trial()
    sweep.bridge = OptunaBridge(sweep.recorder, sweep.scheduler, "score", "max", first=asked)  # the next Tune run
    number = sweep.start("a")
    assert number == 2 and sweep.trial(number).user_attrs["retry_of"] == theirs[1].number
    sweep.result("a", 1, score=1.0)
    sweep.bridge.on_trial_complete("a", result={"step": 1, "score": 1.0, "done": True})
    assert sweep.bridge.suggest("b") == "FINISHED" and sweep.recorder.done
    other.close()
    sweep.ledger.close()


def test_takes_over_a_dead_drivers_trials(tmp_path: Path, tracking_uri: str) -> None:
    sweep = Sweep(tmp_path, tracking_uri, target=1)
    sweep.recorder.POLL = 0.0
    other = Ledger(optuna.load_study(study_name=sweep.name, storage=open_storage(sweep.url)),
                   lambda t: {"x": t.suggest_float("x", 0, 1)}, target=1)
    theirs = other.claim()
    assert sweep.bridge.suggest("a") == "FINISHED" and sweep.recorder.elsewhere
    other.running.clear()  # its driver dies
    sweep.study._storage.set_trial_system_attr(theirs.trial._trial_id, DRIVER_ATTR, _dead_identity())
    sweep.recorder._last_reclaim = 0.0  # the waiting sweep's first look reclaims
    sweep.bridge = OptunaBridge(sweep.recorder, sweep.scheduler, "score", "max",
                                first=sweep.recorder.wait_for_a_trial())
    number = sweep.start("a")
    assert sweep.trial(number).user_attrs["retry_of"] == theirs.number
    other.close()
    sweep.ledger.close()


def test_a_run_with_nothing_more_of_its_own_ends_when_others_fill_the_study(tmp_path: Path,
                                                                           tracking_uri: str) -> None:
    """Issue 19, item 0: with only this process's trials running, Tune waits (its workers are
    reused for what comes next); once another process's trials fill the rest of the study, this
    run asks for no more trials (FINISHED: Tune drops its idle workers, ends when ours end)."""
    sweep = Sweep(tmp_path, tracking_uri, target=3)
    mine = [sweep.start("a"), sweep.start("b")]
    sweep.bridge.on_trial_complete("a", result={"step": 1, "score": 1.0, "done": True})
    assert sweep.bridge.suggest("c") is not None, "its own trials only: a new one"
    sweep.bridge.on_trial_complete("c", result={"step": 1, "score": 1.0, "done": True})
    assert sweep.bridge.suggest("d") is None and not sweep.recorder.elsewhere, "only its own trial runs: wait"
    sweep.ledger.target = 4  # a shared study: another process claims the fourth trial
    other = Ledger(optuna.load_study(study_name=sweep.name, storage=open_storage(sweep.url)),
                   lambda t: {"x": t.suggest_float("x", 0, 1)}, target=4)
    theirs = other.claim()
    sweep.recorder.POLL = 0.0
    assert sweep.bridge.suggest("d") == "FINISHED" and sweep.recorder.elsewhere and not sweep.recorder.done
    sweep.result("b", 1, score=2.0)  # its own running trial still ends truthfully
    sweep.bridge.on_trial_complete("b", result={"step": 1, "score": 2.0, "done": True})
    assert sweep.trial(mine[1]).state == TrialState.COMPLETE
    other.tell(theirs.number, TrialState.COMPLETE, value=1.0)
    assert sweep.recorder.wait_for_a_trial() is None and sweep.recorder.done and not sweep.recorder.elsewhere
    other.close()
    sweep.ledger.close()


def test_what_a_dead_driver_left_unwritten_in_mlflow_is_written_from_the_study(sweep: Sweep) -> None:
    """MLflow trails the study (hpo.record.writer); a driver killed in between leaves MLflow behind.
    The next sweep writes, from the study, what is missing -- and only that."""
    from hpo.record.mirror import mirror_gaps

    ledger, dead = sweep.ledger, _dead_identity()

    def died(number: int) -> None:  # the trial's driver is gone by the time the next sweep starts
        sweep.study._storage.set_trial_system_attr(sweep.trial(number)._trial_id, DRIVER_ATTR, dead)

    lost = ledger.claim()  # finished in the study; its run was never made
    died(lost.number)
    ledger.record_intermediate(lost.number, 1, 0.25)
    ledger.record_intermediate(lost.number, 2, 0.5)
    ledger.tell(lost.number, TrialState.COMPLETE, value=0.5, attrs={
        "last_step": 2, "curves": {"score": [[1, 0.25], [2, 0.5]], "train_loss": [[1, 0.9], [2, 0.7]]},
        "trial_setup_seconds": 1.5, "device": "cpu"})
    half = sweep.start("b")  # its run made, with step 1; then the driver dies after telling Optuna
    sweep.result("b", 1, score=0.1)
    sweep.tracker.flush()
    died(half)
    ledger.record_intermediate(half, 2, 0.2)
    ledger.tell(half, TrialState.PRUNED, reason="pruned", attrs={"pruned_at": 2})
    alive = ledger.claim()  # finished by a live driver (this process): its own writer writes it
    ledger.tell(alive.number, TrialState.COMPLETE, value=1.0)

    assert mirror_gaps(sweep.study, sweep.tracker, metric="score") == [lost.number, half]
    client = MlflowClient(sweep.tracker.uri)

    def history(run: Any, key: str) -> list:
        return sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))

    run = sweep.run(lost.number)
    assert run.info.status == "FINISHED" and run.data.tags["hpo.state"] == "COMPLETE"
    assert run.data.tags["hpo.objective"] == "0.5" and run.data.tags["mlflow.parentRunId"] == sweep.tracker.parent_run_id
    assert run.data.params["x"] == str(lost.params["x"]) and run.data.params["device"] == "cpu"
    assert history(run, "score") == [(1, 0.25), (2, 0.5)] and history(run, "train_loss") == [(1, 0.9), (2, 0.7)]
    assert history(run, "trial_setup_seconds") == [(2, 1.5)]
    run = sweep.run(half)
    assert run.info.status == "KILLED" and run.data.tags["hpo.state"] == "PRUNED"
    assert history(run, "score") == [(1, 0.1), (2, 0.2)], "the point it had is not written twice"
    assert not client.search_runs([sweep.tracker.experiment_id], f"tags.`hpo.trial_number` = '{alive.number}'")
    assert mirror_gaps(sweep.study, sweep.tracker, metric="score") == [], "nothing left to write"


def test_gap_filling_repairs_a_closed_run_that_disagrees_with_the_study(sweep: Sweep) -> None:
    """What the old writer left after a store that refused one write (issue 19): the trial's run
    FINISHED, still tagged hpo.state=RUNNING, without its objective nor its curve. A closed run is
    not taken as complete: every run that disagrees with the study is written from it."""
    from hpo.record.mirror import mirror_gaps

    trial = sweep.ledger.claim()
    sweep.study._storage.set_trial_system_attr(trial.trial._trial_id, DRIVER_ATTR, _dead_identity())
    sweep.ledger.record_intermediate(trial.number, 1, 0.25)
    sweep.ledger.tell(trial.number, TrialState.COMPLETE, value=0.25,
                      attrs={"last_step": 1, "curves": {"score": [[1, 0.25]]}})
    client = MlflowClient(sweep.tracker.uri)
    left = client.create_run(sweep.tracker.experiment_id, run_name=f"trial-{trial.number}",
                             tags=sweep.tracker._trial_tags(trial.number, "RUNNING"))
    client.log_param(left.info.run_id, "x", str(trial.params["x"]))
    client.set_terminated(left.info.run_id, "FINISHED")

    assert mirror_gaps(sweep.study, sweep.tracker, metric="score") == [trial.number]
    run = client.get_run(left.info.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["hpo.state"] == "COMPLETE"
    assert run.data.tags["hpo.objective"] == "0.25" and run.data.metrics == {"score": 0.25}
    assert mirror_gaps(sweep.study, sweep.tracker, metric="score") == [], "a run that agrees is left alone"


def test_a_write_the_store_refuses_fails_alone(sweep: Sweep) -> None:
    """A metric name MLflow refuses (the worker's Report refuses it too; here it reaches the
    tracker directly) fails that one write: the store is not taken as down, the next trial's
    run is written at once, and the refused trial's run is written from the study at the end."""
    import time

    from hpo.record.mirror import mirror_gaps

    started = time.monotonic()
    first = sweep.start("a")
    sweep.result("a", 1, score=0.5, **{"acc@5": 0.9})
    sweep.bridge.on_trial_complete("a", result={"step": 1, "score": 0.5, "done": True})
    second = sweep.start("b")
    sweep.result("b", 1, score=0.75)
    sweep.bridge.on_trial_complete("b", result={"step": 1, "score": 0.75, "done": True})
    sweep.tracker.flush()
    assert time.monotonic() - started < 20
    run = sweep.run(second)
    assert run.info.status == "FINISHED" and run.data.tags["hpo.state"] == "COMPLETE"
    assert run.data.tags["hpo.objective"] == "0.75" and run.data.metrics == {"score": 0.75}
    assert sweep.tracker.unwritten == {first} and not sweep.tracker.down

    assert mirror_gaps(sweep.study, sweep.tracker, metric="score", only=sweep.tracker.unwritten) == [first]
    run = sweep.run(first)
    assert run.info.status == "FINISHED" and run.data.tags["hpo.state"] == "COMPLETE"
    assert run.data.tags["hpo.objective"] == "0.5" and run.data.metrics["score"] == 0.5


def test_a_trials_run_holds_the_same_params_and_reason_live_and_from_the_study(tmp_path: Path,
                                                                                tracking_uri: str) -> None:
    """The run the driver writes as a trial runs and the one written from the study after a
    driver died (hpo.record.mirror.trial_end) are built by one rule: the worker's info under the
    job under the sampled params under the rest of what space() returned; the same reason text."""
    from hpo.record.mirror import trial_end

    def space(trial: Any) -> dict[str, Any]:
        x = trial.suggest_float("x", 0, 1)
        return {"x": x * 10, "label": "space"}  # "x" is shown as sampled; "label" as space() returned it

    def job_params(config: dict[str, Any]) -> dict[str, Any]:
        return {"x": -1.0, "label": "job", "steps": 3, "device_kind": "job"}

    sweep = Sweep(tmp_path, tracking_uri, space=space)
    sweep.recorder.job_params = job_params
    info = {"hpo_info/device": "cpu", "hpo_info/device_kind": "worker", "hpo_info/label": "worker"}
    pruned = sweep.start("a")
    sweep.result("a", 1, score=0.5, **info)
    sweep.scheduler.stopped_early["a"] = 1
    sweep.bridge.on_trial_complete("a", result={"step": 1, "score": 0.5})
    failed = sweep.start("b")
    sweep.result("b", 1, score=0.25, **info)
    sweep.bridge.on_trial_complete("b", result={"step": 1, ERROR_KEY: "ValueError: boom", REASON_KEY: "error"})
    for number, reason in ((pruned, "stopped early by the pruner at step 1"), (failed, "ValueError: boom")):
        run, trial = sweep.run(number), sweep.trial(number)
        end = trial_end(trial, "score", job_params)
        assert run.data.params == {k: str(v) for k, v in end.params.items()}, number
        assert run.data.params["x"] == str(trial.params["x"]) and run.data.params["label"] == "space"
        assert run.data.params["steps"] == "3" and run.data.params["device_kind"] == "job"
        assert run.data.params["device"] == "cpu"
        assert run.data.tags["hpo.reason"] == end.reason == reason
    sweep.ledger.close()


def test_gap_filling_writes_a_multi_objective_trials_run(tmp_path: Path, tracking_uri: str) -> None:
    """A COMPLETE trial of a multi-objective study has no single value (Optuna's trial.value
    raises): its run is written, closed FINISHED, without an hpo.objective tag."""
    from hpo.record.mirror import mirror_gaps

    name = f"m{uuid.uuid4().hex[:8]}"
    study = optuna.create_study(study_name=name, storage=open_storage(f"sqlite:///{tmp_path / 'hpo.db'}"),
                                directions=["maximize", "minimize"])
    trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    study.tell(trial, [0.9, 0.1])
    tracker = SweepTracker(tracking_uri, name)
    tracker.start_sweep({}, {})
    assert mirror_gaps(study, tracker, metric="a,b", grace=0) == [trial.number]
    run = MlflowClient(tracker.uri).search_runs([tracker.experiment_id], "tags.`hpo.role` = 'trial'")[0]
    assert run.info.status == "FINISHED" and run.data.tags["hpo.state"] == "COMPLETE"
    assert "hpo.objective" not in run.data.tags and "x" in run.data.params
    assert mirror_gaps(study, tracker, metric="a,b", grace=0) == []


def _dead_identity() -> str:
    import subprocess
    import sys

    from hpo.record.liveness import driver_id

    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    identity = driver_id(process.pid)
    process.kill()
    process.wait()
    return identity


def test_a_failing_ask_stops_the_sweep_with_a_reason(tmp_path: Path, tracking_uri: str) -> None:
    def broken(trial: optuna.Trial) -> dict:
        raise RuntimeError("space is broken")

    sweep = Sweep(tmp_path, tracking_uri, space=broken)
    assert sweep.bridge.suggest("a") == "FINISHED"
    assert "RuntimeError: space is broken" in sweep.recorder.stop_reason
    assert sweep.study.get_trials()[0].user_attrs["reason"] == "space"
    sweep.ledger.close()


def test_close_leftovers_interrupts_what_still_runs(sweep: Sweep) -> None:
    number = sweep.start("t")
    assert sweep.recorder.close_leftovers() == [number]
    assert sweep.trial(number).user_attrs["reason"] == "interrupted"
    assert sweep.run(number).info.status == "KILLED" and sweep.recorder.interrupted == [number]


@pytest.mark.parametrize("done, timed_out, stop_reason, finished, interrupted, ended, ctrl_c", [
    (True, False, None, 5, [], "done", False),
    (False, False, None, 5, [3], "done", False),  # interrupted trials ran again and the study is full
    (True, True, None, 2, [], "timeout", False),
    (False, False, None, 2, [3], "interrupted", False),  # a hard stop (KeyboardInterrupt): exit 130
    (False, False, None, 2, [3], "interrupted", True),  # Ctrl-C: exit 130
    (True, True, None, 2, [], "interrupted", True),  # Ctrl-C after --timeout passed
    (False, False, "asking for the next trial failed (OperationalError: gone)", 2, [], "short", False),
    (True, False, None, 2, [], "short", False),
])
def test_how_a_sweep_ended(done: bool, timed_out: bool, stop_reason: str | None, finished: int,
                           interrupted: list, ended: str, ctrl_c: bool) -> None:
    from types import SimpleNamespace

    from hpo.run.sweep import SearchResult, _ending

    result = SearchResult("s", "", "", {}, None, 0)
    recorder = SimpleNamespace(done=done, timed_out=timed_out, stop_reason=stop_reason, interrupted=interrupted,
                               interrupt_requested=ctrl_c)
    _ending(result, recorder, finished, 5)
    assert result.ended == ended
    assert (result.short_reason is not None) == (ended == "short")
    if stop_reason:
        assert result.short_reason == stop_reason


class _Controller:
    """What Tune hands a scheduler: here only the live trials (the run's whole list is refused)."""

    def __init__(self, live: list[Any]):
        self.live = set(live)

    def get_live_trials(self) -> set[Any]:
        return self.live

    def get_trials(self) -> list[Any]:
        raise AssertionError("the scheduler looked through every trial of the run")


def test_the_next_trial_to_start_is_found_among_the_live_trials_in_claim_order() -> None:
    from ray.tune.experiment import Trial

    def trial(number: int, status: str) -> Trial:
        made = Trial("__fake", config={"number": number, "params": {}}, stub=True)
        made.set_status(status)
        return made

    scheduler = _NoStop()
    running, paused, later, first = (trial(3, Trial.RUNNING), trial(4, Trial.PAUSED), trial(9, Trial.PENDING),
                                     trial(5, Trial.PENDING))
    assert scheduler.choose_trial_to_run(_Controller([running, paused, later, first])) is first
    assert scheduler.choose_trial_to_run(_Controller([running, paused])) is paused
    assert scheduler.choose_trial_to_run(_Controller([running])) is None
