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


priors = {"lr": hpo.Prior(high=1e-2, why="a made-up bound for the test")}


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
    assert diagnosis["priors"] == {"lr": {"low": None, "high": 1e-2, "why": "a made-up bound for the test"}}, \
        "hpo search records the module's priors on the study"

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


def _planted_study(tmp_path: Path, train: Path, evals: Path, tracking_uri: str | None = None) -> str:
    """A study named ``planted`` whose sweep trained on ``train``/``evals``: trials 0 and 1 overfit,
    2 shows early signs (the shipped demo's trial 0), 3 is healthy, 4 was pruned after one evaluation."""
    from hpo.record.sweep_record import SweepRecord
    from tests.test_diagnose import DEMO, OVERFIT_EVAL, OVERFIT_TRAIN, pairs

    storage = f"sqlite:///{tmp_path / 'hpo.db'}"
    study = optuna.create_study(study_name="planted", storage=storage, direction="maximize")
    SweepRecord(sweep={"metric": "eval_accuracy", "direction": "maximize", "max_steps": 200, "eval_every": 20,
                       "train_data": str(train), "eval_data": str(evals)}, tracking_uri=tracking_uri).save(study)
    overfit = {"train_loss": pairs(OVERFIT_TRAIN), "eval_loss": pairs(OVERFIT_EVAL)}
    curves = [overfit, overfit, DEMO[0], DEMO[8], {"train_loss": [[20, 0.69]], "eval_loss": [[20, 0.7]]}]
    for number, trial_curves in enumerate(curves):
        pruned = number == 4
        study.add_trial(optuna.trial.create_trial(
            params={"learning_rate": 10 ** (-4 + number / 2)},
            distributions={"learning_rate": optuna.distributions.FloatDistribution(1e-5, 1e-1, log=True)},
            value=None if pruned else 0.8 + number / 100, user_attrs={"curves": trial_curves},
            state=TrialState.PRUNED if pruned else TrialState.COMPLETE))
    return storage


def test_diagnose_json_and_the_report_page_carry_every_finding_with_what_is_behind_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """hpo check-data records its findings for study ``planted``; hpo diagnose --json carries them
    beside each trial's findings and the advice, each with its rows or trials; the report page
    (headless Chromium) lists every one, advice linked to the trials behind it."""
    from typer.testing import CliRunner

    from hpo.cli import app
    from tests.browser import Browser

    monkeypatch.chdir(tmp_path)  # in process: the default checks folder is ./.hpo/checks
    rows = ["label\ttext"] + [f"{i % 2}\tan ordinary review number {i} with several words" for i in range(40)]
    rows[10] = "1\tan ordinary review number 3 with several words"  # row 10 repeats row 4
    (tmp_path / "train.tsv").write_text("\n".join(rows) + "\n")
    evals = ["label\ttext", "1\tan ordinary review number 7 with several words"]  # eval row 1 leaks (a warning
    evals += [f"{i % 2}\ta review written only for the evaluation set, number {i}" for i in range(9)]  # at 1 in 10)
    (tmp_path / "eval.tsv").write_text("\n".join(evals) + "\n")
    checked = CliRunner().invoke(app, ["check-data", "--set", f"train_data={tmp_path / 'train.tsv'}", "--set",
                                       f"eval_data={tmp_path / 'eval.tsv'}", "--no-tokenizer", "--out",
                                       ".hpo/checks/planted"])
    assert checked.exit_code == 0, checked.stdout
    assert "recorded in .hpo/checks/planted/checks.json (hpo diagnose and hpo report read it for study planted)" \
        in checked.stdout
    storage = _planted_study(tmp_path, tmp_path / "train.tsv", tmp_path / "eval.tsv")

    diagnosed = CliRunner().invoke(app, ["diagnose", "--json", "--storage", storage])
    assert diagnosed.exit_code == 0, diagnosed.stdout
    result = json.loads(diagnosed.stdout)
    kinds = {t["number"]: [f["kind"] for f in t["findings"]] for t in result["trials"]}
    assert kinds == {0: ["overfitting"], 1: ["overfitting"], 2: ["early_overfitting"], 3: ["healthy"], 4: []}
    for trial in result["trials"]:
        assert all(f["trials"] == [trial["number"]] and f["scope"] == "trial" for f in trial["findings"])
    behind = {f["kind"]: f["trials"] for f in result["study_findings"]}
    assert behind["overfitting"] == [0, 1] and behind["early_overfitting"] == [2]
    assert behind["too_few_evaluations"] == [4] and behind["importance"] == [0, 1, 2, 3]
    data = {f["kind"]: f for f in result["data_findings"]}
    assert [r["row"] for r in data["duplicate"]["rows"]] == [10]
    assert [r["row"] for r in data["leakage"]["rows"]] == [1]
    assert result["data_checks"]["found"] and "note" not in result["data_checks"], "the same files the study used"

    reported = CliRunner().invoke(app, ["report", "--storage", storage, "--output", "report"])
    assert reported.exit_code == 0, reported.stdout
    with Browser() as browser:
        browser.open((tmp_path / "report" / "report.html").as_uri())
        text = browser.wait_for(lambda t: "The data (hpo check-data)" in t and "Trials" in t, timeout=60,
                                what="the report's findings")
        for finding in result["study_findings"]:
            numbers = finding["trials"]
            assert f"{finding['message']} (trial{'s' if len(numbers) > 1 else ''} " \
                   f"{', '.join(map(str, numbers))})" in text
        for finding in result["data_findings"]:
            assert finding["message"] in text
        for trial in result["trials"]:
            for finding in trial["findings"]:
                assert f"{finding['kind']}: {finding['message']}" in text
        links = browser.evaluate("[...document.querySelectorAll('#advice a')].map(a => a.getAttribute('href'))")
        assert "#trial-2" in links and all(
            browser.evaluate(f"document.getElementById('{link[1:]}') !== null") for link in links)
        tables = browser.evaluate("[...document.querySelectorAll('#data table')].map(t => t.innerText)")
        assert "row\tsource\n10\ttrain.tsv" in tables[0] and "row\tsource\n1\teval.tsv" in tables[1], tables


def test_diagnose_reads_the_data_checks_logged_to_the_sweeps_mlflow_run(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """No .hpo/checks/STUDY here (check-data ran elsewhere with --tracking-uri): hpo diagnose finds
    checks.json under checks/ of the study's MLflow sweep run."""
    from typer.testing import CliRunner

    from hpo.analysis.data_findings import write_checks
    from hpo.cli import app
    from hpo.record.sweep_tracker import SweepTracker
    from hpo.record.tracking import log_data_checks

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    train, evals = tmp_path / "train.tsv", tmp_path / "eval.tsv"
    storage = _planted_study(tmp_path, train, evals, tracking_uri=uri)
    tracker = SweepTracker(uri, "planted")
    sweep_run = tracker.start_sweep({}, {})
    tracker.end_sweep()
    duplicate = {"severity": "warning", "code": "duplicate", "source": str(train), "message": "1 of 40 rows repeat",
                 "count": 1, "rows": [10]}
    recorded = write_checks(tmp_path / "elsewhere", {"findings": [duplicate]}, str(train), str(evals))
    assert log_data_checks(uri, "planted", [recorded]) == sweep_run

    diagnosed = CliRunner().invoke(app, ["diagnose", "--json", "--storage", storage])
    assert diagnosed.exit_code == 0, diagnosed.stdout
    result = json.loads(diagnosed.stdout)
    assert result["data_checks"]["source"] == f"MLflow run {sweep_run}, checks/checks.json"
    assert [(f["kind"], f["rows"]) for f in result["data_findings"]] == [("duplicate", [{"row": 10,
                                                                                         "source": str(train)}])]
    assert not (tmp_path / ".hpo").exists(), "diagnose writes nothing here"
