"""What a trial's value is (objective last/best, with its best_step) and what the pruner
ranks trials on (prune_metric): config checks, the recorder in process against a real
Optuna SQLite study and MLflow store, and one sweep under the real Ray whose own train
reports known curves."""

from __future__ import annotations

import dataclasses
import json
import uuid
from pathlib import Path
from typing import Any

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from hpo import HpoError, Sweep
from hpo.overrides import parse_overrides
from hpo.record.ledger import Ledger
from hpo.record.recorder import Recorder
from hpo.record.study import open_storage
from hpo.record.sweep_tracker import SweepTracker
from hpo.run.promote import FinalSchedule, final_schedule
from hpo.run.ranking import mode, prune_mode, pruned_on
from hpo.run.scheduling import OptunaBridge, _NoStop
from hpo.run.sweep import SearchOptions, prepare
from hpo.train.recipe import check_metrics
from hpo.train.reporter import Report, ReportError
from tests.conftest import SEARCH_SPACES, run_hpo


def test_prune_metric_defaults_to_the_metric_and_knows_its_own_direction() -> None:
    sweep = Sweep()
    assert (pruned_on(sweep), prune_mode(sweep), sweep.objective) == ("eval_accuracy", "max", "last")
    on_loss = Sweep(prune_metric="eval_loss")
    assert (on_loss.metric, mode(on_loss), pruned_on(on_loss), prune_mode(on_loss)) == \
        ("eval_accuracy", "max", "eval_loss", "min")
    assert prune_mode(Sweep(metric="score", direction="minimize")) == "min"
    assert prune_mode(Sweep(prune_metric="f1", prune_direction="maximize")) == "max"
    assert parse_overrides(["prune_metric=eval_loss", "objective=best", "prune_direction=none"]) == \
        {"prune_metric": "eval_loss", "objective": "best", "prune_direction": None}
    assert pruned_on(dataclasses.replace(sweep, **parse_overrides(["prune_metric=none"]))) == "eval_accuracy"


@pytest.mark.parametrize(("values", "words"), [
    ({"objective": "max"}, "objective='max' must be one of last, best (fix it in the module or with --set objective="),
    ({"prune_metric": "f1"}, "prune_direction=None must be maximize or minimize (needed for the prune_metric 'f1'"),
    ({"prune_metric": ""}, "prune_metric='' must name a metric that report records"),
    ({"prune_metric": "eval_loss", "prune_direction": "down"}, "prune_direction='down' must be maximize or minimize"),
])
def test_bad_objective_and_prune_fields_name_the_field_and_the_flag(values: dict, words: str) -> None:
    with pytest.raises(HpoError, match="^sweep field ") as caught:
        Sweep(**values)
    assert words in str(caught.value)


def test_the_recipe_refuses_a_metric_it_does_not_report_before_anything_runs(tmp_path: Path) -> None:
    assert check_metrics(Sweep(prune_metric="eval_loss")) is None
    assert check_metrics(Sweep(task="causal_lm", prune_metric="train_loss")) is None
    problem = check_metrics(Sweep(prune_metric="eval_f1", prune_direction="maximize"))
    assert problem is not None and problem.startswith("sweep field prune_metric='eval_f1' is not something the "
                                                      "built-in recipe reports for task classification")
    assert "eval_accuracy, eval_loss" in problem and "--set prune_metric=" in problem
    with pytest.raises(HpoError, match=r"lora.py: sweep field metric='eval_perplexity' is not something"):
        prepare(SearchOptions(str(SEARCH_SPACES / "lora.py"), overrides=["metric=eval_perplexity"]))
    assert not list(tmp_path.iterdir()), "nothing written"


def test_report_requires_the_prune_metric_in_every_call() -> None:
    sent: list[tuple[int, dict]] = []
    report = Report(("eval_accuracy",), lambda step, values: sent.append((step, values)), prune_metric="eval_loss")
    report(1, {"eval_accuracy": 0.5, "eval_loss": 0.7})
    with pytest.raises(ReportError, match=r"report\(step=2\) got no 'eval_loss' \(the sweep's prune_metric"):
        report(2, {"eval_accuracy": 0.6})
    assert sent == [(1, {"eval_accuracy": 0.5, "eval_loss": 0.7})]
    same = Report(("eval_loss",), lambda step, values: None, prune_metric="eval_loss")
    same(1, {"eval_loss": 0.3})


NAMES = ["acc@5", "eval_accuracy", "eval/acc top:1", "a b", "a/../b", "/abs", "..", "a//b", "x" * 251,
         "x" * 250, "précision"]


def test_report_refuses_metric_names_mlflow_refuses_at_the_first_call() -> None:
    """A name MLflow would refuse (its whole log_batch with it) fails the trial at its first
    report, in one line that names it and a name to use instead; nothing reaches the sink."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils.validation import _validate_metric

    sent: list[tuple[int, dict]] = []
    report = Report(("eval_accuracy",), lambda step, values: sent.append((step, values)))
    with pytest.raises(ReportError) as error:
        report(1, {"eval_accuracy": 0.5, "acc@5": 0.9})
    assert str(error.value).count("\n") == 0 and "'acc@5' is one MLflow refuses" in str(error.value)
    assert "e.g. 'acc_5'" in str(error.value) and sent == []
    from hpo.train.reporter import is_valid_name

    for name in NAMES:  # the rule restated in hpo.train.reporter is MLflow's own (stricter only on a final newline)
        try:
            _validate_metric(name, 1.0, 0, 1)
            accepted = True
        except MlflowException:
            accepted = False
        assert is_valid_name(name) == accepted, name


class _Quiet:
    def trial_started(self, number: int, params: dict[str, Any]) -> None: ...
    def trial_result(self, number: int, step: int, value: float | None) -> None: ...
    def trial_ended(self, number: int, state: str, value: float | None, reason: str | None) -> None: ...
    def tick(self) -> None: ...


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    SweepTracker(uri, "warm-up")  # the store's migrations, once for the module
    return uri


@pytest.mark.parametrize(("objective", "direction"), [("best", "maximize"), ("best", "minimize"), ("last", "maximize")])
def test_a_trial_is_worth_its_best_or_last_evaluation(tmp_path: Path, tracking_uri: str, objective: str,
                                                      direction: str) -> None:
    """Driven through OptunaBridge and the Recorder in process: real SQLite study, real MLflow store."""
    name = f"s{uuid.uuid4().hex[:8]}"
    study = optuna.create_study(study_name=name, storage=open_storage(f"sqlite:///{tmp_path / 'hpo.db'}"),
                                direction=direction)
    ledger = Ledger(study, lambda t: {"x": t.suggest_float("x", 0, 1)}, target=3)
    tracker = SweepTracker(tracking_uri, name)
    tracker.start_sweep({}, {})
    recorder = Recorder(ledger, tracker, _Quiet(), metrics=("score",), deadline=None, objective=objective,
                        direction=direction)
    scheduler = _NoStop()
    bridge = OptunaBridge(recorder, scheduler, "score", "max" if direction == "maximize" else "min")
    curve = {1: 0.5, 2: 0.9, 3: 0.9, 4: 0.7} if direction == "maximize" else {1: 0.5, 2: 0.2, 3: 0.2, 4: 0.4}
    try:
        complete, pruned = (bridge.suggest(trial_id)["number"] for trial_id in ("a", "b"))
        for step, score in list(curve.items())[:3]:
            bridge.on_trial_result("a", {"step": step, "score": score})
            bridge.on_trial_result("b", {"step": step, "score": score})
        bridge.on_trial_complete("a", result={"step": 4, "score": curve[4], "done": True})
        scheduler.stopped_early["b"] = 3
        bridge.on_trial_complete("b", result={"step": 3, "score": curve[3]})
    finally:
        ledger.close()
        tracker.flush(final=True)  # the runs are written by the tracker's own thread: wait for them before reading
    trials = study.get_trials()
    done, stopped = trials[complete], trials[pruned]
    assert done.state == TrialState.COMPLETE and done.intermediate_values == pytest.approx(curve)
    runs = MlflowClient(tracker.uri).search_runs([tracker.experiment_id], f"tags.`hpo.trial_number` = '{complete}'")
    if objective == "best":
        assert done.value == curve[2] and done.user_attrs["best_step"] == 2, "the earliest of two equal bests"
        assert runs[0].data.metrics["best_step"] == 2
        assert float(runs[0].data.tags["hpo.objective"]) == curve[2]
    else:
        assert done.value == curve[4] and "best_step" not in done.user_attrs
        assert "best_step" not in runs[0].data.metrics
    assert stopped.state == TrialState.PRUNED and "best_step" not in stopped.user_attrs
    assert stopped.value == curve[3], "Optuna keeps a pruned trial's last intermediate value"
    assert stopped.user_attrs["pruned_at"] == 3


CURVES = '''
import hpo

sweep = hpo.Sweep(metric="eval_accuracy", prune_metric="eval_loss", objective="best", trials=5, max_steps=3,
                  eval_every=1, reduction_factor=3, sampler="random", seed=0, concurrency=1)
# Per trial (they run one at a time, in order): (accuracy, loss) at the first rung (step 1),
# then accuracy at steps 2 and 3. At step 1 trials 0 and 1 tie on accuracy but not on loss;
# trial 2 has the best accuracy and the worst loss. Ranked on loss, ASHA (keep the best third
# at the rung) stops 1 and 2; ranked on accuracy it would have kept 2. Trial 4 reports no loss.
CURVES = [((0.55, 0.50), 0.80, 0.70), ((0.55, 0.69), 0.90, 0.90),
          ((0.62, 0.90), 0.95, 0.95), ((0.50, 0.40), 0.60, 0.75), ((0.50, None), 0.60, 0.75)]


def space(trial):
    return {"x": trial.suggest_float("x", 0.0, 1.0), "curve": trial.number}


def train(params, report):
    (accuracy, loss), *later = CURVES[params["curve"]]
    report(1, {"eval_accuracy": accuracy, **({"eval_loss": loss} if loss is not None else {})})
    for step, accuracy in enumerate(later, start=2):
        report(step, {"eval_accuracy": accuracy, "eval_loss": loss - 0.1 * step})
'''


@pytest.mark.slow
def test_asha_ranks_on_the_prune_metric_and_a_trial_keeps_its_best(tmp_path: Path) -> None:
    module = tmp_path / "curves.py"
    module.write_text(CURVES)
    result = run_hpo(["search", str(module)], cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "pruner asha on eval_loss from step 1, a trial is worth its best evaluation" in result.stdout
    study = optuna.load_study(study_name="curves", storage=f"sqlite:///{tmp_path / 'hpo.db'}")
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.PRUNED, TrialState.PRUNED,
                                         TrialState.COMPLETE, TrialState.FAIL]
    assert trials[4].user_attrs["error"].startswith("ReportError: report(step=1) got no 'eval_loss' (the sweep's "
                                                    "prune_metric"), "a clear reason at the first result"
    assert trials[1].intermediate_values == {1: 0.55} and trials[2].intermediate_values == {1: 0.62}, \
        "intermediate values are the study's metric, not the pruner's"
    assert trials[0].intermediate_values == {1: 0.55, 2: 0.80, 3: 0.70}
    assert (trials[0].value, trials[0].user_attrs["best_step"]) == (0.80, 2), "the peak mid-way, not the last"
    assert (trials[3].value, trials[3].user_attrs["best_step"]) == (0.75, 3)
    recorded = study.user_attrs["hpo"]["sweep"]
    assert (recorded["prune_metric"], recorded["objective"]) == ("eval_loss", "best")

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("curves").experiment_id])
    parent = next(r for r in runs if r.data.tags["hpo.role"] == "sweep")
    assert (parent.data.params["prune_metric"], parent.data.params["objective"]) == ("eval_loss", "best")
    trial_runs = {int(r.data.tags["hpo.trial_number"]): r for r in runs if r.data.tags["hpo.role"] == "trial"}
    assert trial_runs[0].data.metrics["best_step"] == 2 and float(trial_runs[0].data.tags["hpo.objective"]) == 0.80

    best = run_hpo(["best", "--study", "curves", "--json"], cwd=tmp_path)
    assert json.loads(best.stdout)["best_step"] == 2 and json.loads(best.stdout)["number"] == 0
    shown = run_hpo(["best", "--study", "curves"], cwd=tmp_path)
    assert "eval_accuracy = 0.8 (its best evaluation, at step 2 of 3)" in shown.stdout

    resumed = run_hpo(["search", str(module), "--trials", "6", "--set", "objective=last"], cwd=tmp_path)
    assert resumed.returncode == 2 and "holds trials valued by objective=best, but this sweep has objective=last" \
        in resumed.stderr
    assert len(optuna.load_study(study_name="curves", storage=f"sqlite:///{tmp_path / 'hpo.db'}").trials) == 5


@pytest.mark.parametrize(("args", "expected"), [
    ((600, 20), (30, 10, 300)),  # the SST-2 case: a 60-step sweep at eval_every=20, a 600-step final run
    ((360, 20), (20, 9, 180)),  # never more often than the sweep evaluated
    ((40, 10), (10, 2, 20)),
    ((10, 20), (10, 1, 5)),  # a final run shorter than the sweep's cadence: one evaluation, at the end
    ((600, 20, {"patience": 0}), (30, 0, 300)),  # --set patience=0: no early stopping
    ((600, 20, {"eval_every": 50, "patience": 2}), (50, 2, 300)),  # --set values are kept
])
def test_promote_scales_cadence_and_patience_to_the_final_run(args: tuple, expected: tuple) -> None:
    steps, sweep_every, *given = args
    assert final_schedule(steps, sweep_every, **(given[0] if given else {})) == FinalSchedule(*expected)


def test_early_stopping_watches_the_chosen_metric_ties_going_to_the_lower_loss() -> None:
    import torch

    from hpo.train.training import _BestWatch

    model = torch.nn.Linear(2, 1)
    watch = _BestWatch(patience=2, restore_best=True, watch="eval_accuracy", mode="max", min_steps=50)
    evaluations = [(10, 0.55, 0.69), (20, 0.70, 0.60), (30, 0.70, 0.55), (40, 0.80, 0.75),  # loss up, accuracy up
                   (50, 0.78, 0.80), (60, 0.79, 0.90), (70, 0.90, 1.0)]
    stopped = []
    for step, accuracy, loss in evaluations:
        with torch.no_grad():
            model.weight.fill_(step)
        if watch.should_stop(step, {"eval_accuracy": accuracy, "eval_loss": loss}, model):
            stopped.append(step)
            break
    assert stopped == [60] and watch.best_step == 40, "the loss rose at 40; accuracy, the metric, was best"
    assert watch.best_state is not None and float(watch.best_state["weight"][0, 0]) == 40
    ties = _BestWatch(patience=1, restore_best=False, watch="eval_accuracy", mode="max")
    for step, loss in ((10, 0.6), (20, 0.5)):
        assert not ties.should_stop(step, {"eval_accuracy": 0.7, "eval_loss": loss}, model)
    assert ties.best_step == 20 and ties.should_stop(30, {"eval_accuracy": 0.7, "eval_loss": 0.55}, model)
    early = _BestWatch(patience=1, restore_best=False, watch="eval_accuracy", mode="max", min_steps=50)
    worse = {"eval_accuracy": 0.5, "eval_loss": 0.9}
    assert not early.should_stop(10, {"eval_accuracy": 0.6, "eval_loss": 0.7}, model)
    assert [early.should_stop(step, worse, model) for step in (20, 30, 40, 50)] == [False, False, False, True]
    on_loss = _BestWatch(patience=1, restore_best=False)  # trials: eval_loss, as before
    assert not on_loss.should_stop(10, {"eval_loss": 0.5}, model) and on_loss.should_stop(20, {"eval_loss": 0.5}, model)
