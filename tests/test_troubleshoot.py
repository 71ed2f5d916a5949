"""Troubleshooting through the real CLI: hpo diagnose on curves of known behaviour, hpo
check-data on planted problems, early stopping recorded as the reason a trial ended, and
the report logged to the sweep's MLflow run."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from tests.conftest import SEARCH_SPACES, run_hpo

BEHAVIOURS = '''
import math
import hpo

sweep = hpo.Sweep(metric="eval_loss", direction="minimize", trials=5, max_steps=200, eval_every=20,
                  pruner="none", sampler="random", seed=0, concurrency=2)
KINDS = ["overfit", "underfit", "diverge", "slow", "healthy"]


def space(trial):
    return {"lr": trial.suggest_float("lr", 1e-4, 1e-2, log=True), "kind": KINDS[trial.number % len(KINDS)]}


def curves(kind, t):
    """train and validation loss at fraction t of training, by known behaviour."""
    if kind == "overfit":   # validation bottoms out at 40% then climbs while training keeps falling
        return 2.0 * math.exp(-6 * t) + 0.05, 0.6 + 2.0 * (t - 0.4) ** 2
    if kind == "underfit":  # both stay high and flat
        return 2.30 - 0.05 * t, 2.32 - 0.04 * t
    if kind == "diverge":   # learning rate too high: training loss blows up
        return 1.0 + 4.0 * t * t, 1.1 + 4.5 * t * t
    if kind == "slow":      # learning rate too low: a steady, small descent, still going
        return 2.0 - 0.4 * t, 2.05 - 0.38 * t
    return 0.3 + 1.7 * math.exp(-5 * t), 0.45 + 1.6 * math.exp(-5 * t)


def train(params, report):
    for step in range(20, 201, 20):
        train_loss, eval_loss = curves(params["kind"], step / 200)
        report(step, {"eval_loss": eval_loss, "train_loss": train_loss})
'''


@pytest.mark.slow
def test_diagnose_names_each_known_behaviour(tmp_path: Path) -> None:
    module = tmp_path / "behaviours.py"
    module.write_text(BEHAVIOURS)
    search = run_hpo(["search", str(module)], cwd=tmp_path)
    assert search.returncode == 0, search.stdout + search.stderr
    assert "report:" in search.stdout

    study = optuna.load_study(study_name="behaviours", storage=f"sqlite:///{tmp_path / 'hpo.db'}")
    for trial in study.get_trials():
        curves = trial.user_attrs["curves"]
        assert [step for step, _ in curves["eval_loss"]] == list(range(20, 201, 20))
        assert set(curves) >= {"train_loss", "eval_loss"}

    result = run_hpo(["diagnose", "--json"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    diagnosis = json.loads(result.stdout)
    expected = {"overfit": "overfitting", "underfit": "underfitting", "diverge": "diverging",
                "slow": "slow_convergence", "healthy": "healthy"}
    kinds = {t.number: t.user_attrs["config"]["kind"] for t in study.get_trials()}
    found = {entry["number"]: [f["kind"] for f in entry["findings"]] for entry in diagnosis["trials"]}
    assert found == {number: [expected[kind]] for number, kind in kinds.items()}
    overfit = next(e for e in diagnosis["trials"] if kinds[e["number"]] == "overfit")
    assert overfit["findings"][0]["evidence"]["best_eval_step"] == 80
    assert diagnosis["advice"] and "importance" in diagnosis

    table = run_hpo(["diagnose"], cwd=tmp_path)
    assert "overfitting" in table.stdout and "what to try next" in table.stdout

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent = study.user_attrs["hpo"]["mlflow_parent_run_id"]
    artifacts = {a.path for a in client.list_artifacts(parent, "report")}
    for name in ("report.html", "diagnosis.json", "optimization_history.png", "intermediate_values.png",
                 "parallel_coordinate.png", "slice.png"):
        assert f"report/{name}" in artifacts, artifacts
    html = (tmp_path / ".hpo" / "reports" / "behaviours" / "report.html").read_text()
    assert "What to try next" in html and "overfitting" in html and "Plotly.newPlot" in html

    again = run_hpo(["report"], cwd=tmp_path)
    assert again.returncode == 0 and "logged to MLflow run" in again.stdout


def test_check_data_finds_planted_problems_through_the_cli(tmp_path: Path) -> None:
    rows = ["label\ttext"] + [f"{i % 2}\tan ordinary review number {i} with several words" for i in range(60)]
    rows[5] = "1\t   "                                                  # empty text
    rows[10] = "0\tan ordinary review number 3 with several words"       # exact duplicate of row 4's text
    rows[20] = "2\ta third class appears only here, never again"        # fine on its own
    (tmp_path / "train.tsv").write_text("\n".join(rows) + "\n")
    (tmp_path / "eval.tsv").write_text("label\ttext\n1\tan ordinary review number 7 with several words\n"
                                       "0\ta review written only for the evaluation set\n7\tunknown class\n")
    result = run_hpo(["check-data", "--set", "train_data=train.tsv", "--set", "eval_data=eval.tsv", "--json",
                      "--no-tokenizer"], cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    report = json.loads(result.stdout)
    codes = {f["code"]: f for f in report["findings"]}
    assert codes["empty_text"]["rows"] == [5]
    assert codes["duplicate"]["rows"] == [10]
    assert codes["leakage"]["count"] == 1 and codes["leakage"]["rows"] == [1]
    assert codes["label_out_of_range"]["severity"] == "error" and codes["label_out_of_range"]["rows"] == [3]
    assert not report["ok"]

    search = run_hpo(["search", str(SEARCH_SPACES / "lora.py"), "--set", "train_data=train.tsv",
                      "--set", "eval_data=eval.tsv"], cwd=tmp_path)
    assert search.returncode == 2 and "the data check found 3 error(s)" in search.stderr
    assert not (tmp_path / "hpo.db").exists(), "a sweep on bad data writes nothing"

    human = run_hpo(["check-data", str(SEARCH_SPACES / "lora.py"), "--no-tokenizer"], cwd=tmp_path)
    assert human.returncode == 0 and "ready for a sweep" in human.stdout


PATIENT = '''
import hpo

sweep = hpo.Sweep(model=MODEL, train_data=TRAIN, eval_data=EVAL, trials=1, max_steps=40, eval_every=4,
                  max_length=32, patience=1, pruner="none", seed=0)


def space(trial):
    return {"learning_rate": trial.suggest_float("learning_rate", 0.5, 0.6), "batch_size": 8}
'''


@pytest.mark.slow
def test_early_stopping_ends_a_trial_with_its_reason(tmp_path: Path, tiny_bert: Path) -> None:
    reviews = SEARCH_SPACES / "data" / "reviews"
    module = tmp_path / "patient.py"
    module.write_text(PATIENT.replace("MODEL", repr(str(tiny_bert))).replace("TRAIN", repr(str(reviews / "train.tsv")))
                      .replace("EVAL", repr(str(reviews / "eval.tsv"))))
    result = run_hpo(["search", str(module)], cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    trial = optuna.load_study(study_name="patient", storage=f"sqlite:///{tmp_path / 'hpo.db'}").trials[0]
    assert trial.state == TrialState.COMPLETE
    assert trial.user_attrs["reason"] == "early_stopped"
    stopped = trial.user_attrs["stopped_early_at"]
    assert stopped < 40 and max(trial.intermediate_values) == stopped
    assert trial.value == trial.intermediate_values[stopped]
