"""A module's own train(params, report) under the real Ray: pruning, failures with their
reasons, NaN, the all-failed exit, and a sweep without early stopping."""

from __future__ import annotations

import math
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from tests.conftest import run_hpo

pytestmark = pytest.mark.slow

MODULE = '''
import hpo

sweep = hpo.Sweep(metric="score", direction="maximize", trials=6, max_steps=9, eval_every=3,
                  sampler="random", seed=1, concurrency=1)
OUTCOMES = ["ok", "raise", "ok", "nan", "oom", "ok", "ok", "ok"]


def space(trial):
    return {"x": trial.suggest_float("x", 0.0, 1.0), "outcome": OUTCOMES[trial.number % len(OUTCOMES)]}


def train(params, report):
    print("HELLO-FROM-TRIAL")
    for step in (3, 6, 9):
        if params["outcome"] == "raise" and step == 6:
            raise ValueError("exploded at step 6")
        if params["outcome"] == "oom":
            import torch

            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        score = float("nan") if params["outcome"] == "nan" else params["x"] + step / 100
        report(step, {"score": score, "train_loss": 1 - score})
'''


def sweep_in(tmp_path: Path, body: str, *flags: str):
    module = tmp_path / "custom.py"
    module.write_text(body)
    return run_hpo(["search", str(module), *flags], cwd=tmp_path), optuna.load_study(
        study_name="custom", storage=f"sqlite:///{tmp_path / 'hpo.db'}")


def test_failures_keep_their_reason_and_the_sweep_goes_on(tmp_path: Path) -> None:
    result, study = sweep_in(tmp_path, MODULE)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "HELLO-FROM-TRIAL" not in result.stdout + result.stderr, "trial output stays in Ray's logs"
    trials = study.get_trials()
    assert len(trials) == 6
    raised, nan, oom = trials[1], trials[3], trials[4]
    assert raised.state == TrialState.FAIL and raised.user_attrs["reason"] == "error"
    assert raised.user_attrs["error"] == "ValueError: exploded at step 6"
    assert raised.intermediate_values == {3: pytest.approx(raised.params["x"] + 0.03)}
    assert nan.state == TrialState.FAIL and nan.user_attrs["reason"] == "nan"
    assert list(nan.intermediate_values) == [3] and math.isnan(nan.intermediate_values[3])
    assert oom.state == TrialState.FAIL and oom.user_attrs["reason"] == "oom"
    assert oom.user_attrs["error"].startswith("OutOfMemoryError: CUDA out of memory")
    assert oom.intermediate_values == {}
    others = [t for i, t in enumerate(trials) if i not in (1, 3, 4)]
    assert {t.state for t in others} <= {TrialState.COMPLETE, TrialState.PRUNED}
    assert TrialState.PRUNED in {t.state for t in others}, "random x: ASHA stops the weaker ones at step 3"
    assert trials[0].state == TrialState.COMPLETE, "the first trial has no rung to be compared with"
    for trial in others:
        if trial.state == TrialState.COMPLETE:
            assert trial.value == pytest.approx(trial.params["x"] + 0.09)
        else:
            assert max(trial.intermediate_values) == 3

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("custom").experiment_id])
    by_number = {int(r.data.tags["hpo.trial_number"]): r for r in runs if r.data.tags["hpo.role"] == "trial"}
    assert by_number[1].info.status == "FAILED" and "exploded at step 6" in by_number[1].data.tags["hpo.reason"]
    assert by_number[3].info.status == "FAILED"
    assert by_number[0].data.params["outcome"] == "ok", "values space() returns beside Optuna's params are logged"
    assert not [r for r in runs if r.info.status == "RUNNING"]


def test_all_trials_failing_exits_non_zero_with_a_summary(tmp_path: Path) -> None:
    body = MODULE.replace('OUTCOMES = ["ok", "raise", "ok", "nan", "oom", "ok", "ok", "ok"]', 'OUTCOMES = ["raise"]')
    result, study = sweep_in(tmp_path, body, "--trials", "2")
    assert result.returncode == 1
    assert "no trial of study 'custom' finished (2 error)" in result.stderr
    assert [t.state for t in study.get_trials()] == [TrialState.FAIL, TrialState.FAIL]


def test_without_a_pruner_every_good_trial_completes(tmp_path: Path) -> None:
    body = MODULE.replace('OUTCOMES = ["ok", "raise", "ok", "nan", "oom"', 'OUTCOMES = ["ok", "ok", "ok", "ok", "ok"')
    result, study = sweep_in(tmp_path, body, "--set", "pruner=none", "--trials", "4", "--worker-logs")
    assert result.returncode == 0, result.stderr
    assert "HELLO-FROM-TRIAL" in result.stdout + result.stderr, "--worker-logs shows what trials print"
    assert [t.state for t in study.get_trials()] == [TrialState.COMPLETE] * 4
    assert all(sorted(t.intermediate_values) == [3, 6, 9] for t in study.get_trials())
