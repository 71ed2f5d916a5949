"""Multi-objective sweeps (``metric="a,b"``, ``direction="maximize,minimize"``): the config
and its errors, the report contract, the study's directions and Pareto front, ``hpo best``,
the report's Pareto plot and ``hpo promote``'s choice of a point, with a module whose own
train reports known values for two objectives under the real Ray."""

from __future__ import annotations

import dataclasses
import json
import urllib.request
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState
from typer.testing import CliRunner

from hpo import HpoError, Sweep
from hpo.cli import app
from hpo.config import direction_follows_metric, parse_overrides
from hpo.record.study import create_or_resume, open_storage, pareto_front
from hpo.run.promote import _pick_trial
from hpo.train.recipe import check_metrics
from hpo.train.reporter import Report, ReportError
from tests.conftest import run_hpo
from tests.test_dashboards import free_port, start_server, stop_server


def test_several_metrics_take_their_known_directions_and_the_first_leads() -> None:
    sweep = Sweep(metric="eval_accuracy, peak_memory_mb")
    assert (sweep.metric, sweep.direction) == ("eval_accuracy,peak_memory_mb", "maximize,minimize")
    assert (sweep.metrics, sweep.directions, sweep.is_multi_objective) == \
        (("eval_accuracy", "peak_memory_mb"), ("maximize", "minimize"), True)
    assert (sweep.mode, sweep.pruned_on, sweep.prune_mode) == ("max", "eval_accuracy", "max")
    on_memory = Sweep(metric="score,cost", direction="maximize,minimize", prune_metric="cost")
    assert (on_memory.pruned_on, on_memory.prune_mode) == ("cost", "min")
    single = Sweep()
    assert (single.metrics, single.directions, single.is_multi_objective) == (("eval_accuracy",), ("maximize",), False)
    assert parse_overrides(["metric=eval_accuracy,trainable_params", "direction=maximize,minimize"]) == \
        {"metric": "eval_accuracy,trainable_params", "direction": "maximize,minimize"}
    assert direction_follows_metric(single, {"metric": "eval_accuracy,trainable_params"})["direction"] == \
        "maximize,minimize"
    with pytest.raises(HpoError, match="--set direction=maximize or minimize"):
        direction_follows_metric(single, {"metric": "eval_accuracy,f1"})
    assert check_metrics(Sweep(metric="eval_accuracy,trainable_params")) is None
    assert "'latency_ms' is not something the built-in recipe reports" in \
        check_metrics(Sweep(metric="eval_accuracy,latency_ms", direction="maximize,minimize"))


@pytest.mark.parametrize(("values", "words"), [
    ({"metric": "score,cost"}, "direction=None must give one direction per metric, comma-separated"),
    ({"metric": "score,cost", "direction": "maximize"}, "gives 1 direction(s) for the 2 metrics score,cost"),
    ({"metric": "score,cost", "direction": "maximize,minimize,minimize"}, "gives 3 direction(s) for the 2 metrics"),
    ({"metric": "score,cost", "direction": "maximize,down"}, "has 'down'; each direction must be maximize or minimize"),
    ({"metric": "score,", "direction": "maximize,minimize"}, "must list distinct metric names separated by commas"),
    ({"metric": "eval_accuracy,peak_memory_mb", "objective": "best"}, "objective='best' needs a single metric"),
    ({"metric": "eval_accuracy,peak_memory_mb", "sampler": "cmaes"}, "sampler='cmaes' optimizes a single objective"),
])
def test_bad_multi_objective_fields_name_the_field_and_the_flag(values: dict, words: str) -> None:
    with pytest.raises(HpoError, match="^sweep field ") as caught:
        Sweep(**values)
    assert words in str(caught.value) and "\n" not in str(caught.value)
    assert "(fix it in the module or with --set " in str(caught.value)


def test_every_objective_must_be_reported() -> None:
    seen: list = []
    report = Report("score,cost", lambda step, values: seen.append((step, values)))
    with pytest.raises(ReportError, match="got no 'cost' \\(the sweep's metric\\)"):
        report(1, {"score": 0.5})
    report(1, {"score": 0.5, "cost": 3})
    assert seen == [(1, {"score": 0.5, "cost": 3.0})]


def test_a_study_keeps_its_directions_and_names(tmp_path: Path) -> None:
    storage = open_storage(f"sqlite:///{tmp_path / 'mo.db'}")
    study = create_or_resume(storage, "mo", ("maximize", "minimize"), optuna.samplers.RandomSampler(0), metrics=("score", "cost"))
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    assert study.metric_names == ["score", "cost"]
    for values in ([0.9, 300], [0.8, 100], [0.7, 200]):
        study.tell(study.ask(), values)
    assert [point["number"] for point in pareto_front(study)] == [0, 1]
    assert pareto_front(study)[1]["values"] == {"score": 0.8, "cost": 100}
    with pytest.raises(HpoError, match="exists and maximize,minimizes its objectives, but this sweep maximizes"):
        create_or_resume(storage, "mo", ("maximize",), optuna.samplers.RandomSampler(0), metrics=("score",))
    with pytest.raises(HpoError, match="several objectives and no single best trial.*--trial N \\(trials 0, 1;"):
        _pick_trial(study, None)
    assert _pick_trial(study, 1).params == study.trials[1].params


MODULE = '''
import hpo

sweep = hpo.Sweep(metric="score,memory_mb", direction="maximize,minimize", trials=5, max_steps=9, eval_every=3,
                  sampler="random", seed=1, concurrency=1)
# (score, memory_mb) of each trial; the score climbs to its value by the last step, memory stays.
POINTS = [(0.90, 300), (0.50, 10), (0.95, 500), (0.80, 100), (0.92, 600)]


def space(trial):
    return {"x": trial.suggest_float("x", 0.0, 1.0), "point": trial.number % len(POINTS)}


def train(params, report):
    score, memory = POINTS[params["point"]]
    for step in (3, 6, 9):
        report(step, {"score": score - (9 - step) / 100, "memory_mb": memory, "train_loss": 1 - score})
'''


def dominated(point: tuple[float, float], others: list[tuple[float, float]]) -> bool:
    return any(o[0] >= point[0] and o[1] <= point[1] and o != point for o in others)


@pytest.mark.slow
def test_a_two_objective_sweep_keeps_the_pareto_front(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module = tmp_path / "pareto.py"
    module.write_text(MODULE)
    result = run_hpo(["search", str(module)], cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    study = optuna.load_study(study_name="pareto", storage=f"sqlite:///{tmp_path / 'hpo.db'}")
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    assert study.metric_names == ["score", "memory_mb"]  # what optuna-dashboard shows on its Pareto front
    trials = study.get_trials()
    assert len(trials) == 5
    # ASHA ranks on the first objective: trial 1 (the least memory of all) is stopped at step 3
    # for its low score, though no trial dominates it.
    assert trials[1].state == TrialState.PRUNED and trials[1].user_attrs["pruned_at"] == 3
    for trial in trials:
        assert trial.intermediate_values == {}, "Optuna keeps no intermediate values of a multi-objective study"
        assert [step for step, _ in trial.user_attrs["curves"]["score"]][0] == 3
        if trial.state == TrialState.PRUNED:
            assert trial.values is None
    complete = {t.number: tuple(t.values) for t in trials if t.state == TrialState.COMPLETE}
    assert complete[0] == (0.9, 300) and complete[2] == (0.95, 500)
    front = sorted(n for n, point in complete.items() if not dominated(point, list(complete.values())))
    assert 4 not in front, "(0.92, 600) is dominated by (0.95, 500)"
    assert sorted(t.number for t in study.best_trials) == front
    assert f"Pareto front: trials {', '.join(map(str, front))}" in result.stdout

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("pareto").experiment_id])
    parents = [run for run in runs if "mlflow.parentRunId" not in run.data.tags]
    assert [run.data.tags.get("hpo.pareto_front") for run in parents] == [",".join(map(str, front))]
    port = free_port()  # the real optuna-dashboard over HTTP: its API serves the front and the axes' names
    dashboard = start_server(["dashboard", "--port", str(port)], tmp_path, f"http://127.0.0.1:{port}/dashboard")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies/1", timeout=30) as answer:
            served = json.loads(answer.read())
    finally:
        stop_server(dashboard)
    assert served["directions"] == ["maximize", "minimize"]
    assert served["objective_names"] == ["score", "memory_mb"]
    assert sorted(t["number"] for t in served["best_trials"]) == front

    best = run_hpo(["best", "--json"], cwd=tmp_path)
    assert best.returncode == 0, best.stderr
    listed = json.loads(best.stdout)
    assert listed["directions"] == {"score": "maximize", "memory_mb": "minimize"}
    assert [p["number"] for p in listed["front"]] == front
    assert listed["front"][0]["values"] == {"score": 0.9, "memory_mb": 300.0}
    assert listed["front"][0]["params"] == trials[0].params
    monkeypatch.chdir(tmp_path)  # the rest in process (the default storage is ./hpo.db): quicker
    shown = CliRunner().invoke(app, ["best"])
    assert "trial 0: score=0.9  memory_mb=300" in shown.stdout, shown.stdout
    status = CliRunner().invoke(app, ["status", "--json"])
    assert json.loads(status.stdout)["trials"][0]["value"] == [0.9, 300.0]

    reports = tmp_path / ".hpo" / "reports" / "pareto"
    page = (reports / "report.html").read_text()
    assert "Pareto front: each COMPLETE trial" in page and "maximize score, minimize memory_mb" in page
    assert (reports / "pareto_front.png").stat().st_size > 1000
    assert "pareto_front:" not in page, "the Pareto plot is not among the skipped ones"
    assert "intermediate_values: a multi-objective study keeps no intermediate values" in page
    assert not (reports / "intermediate_values.png").exists()

    refused = run_hpo(["promote"], cwd=tmp_path)
    assert refused.returncode != 0
    lines = [line for line in refused.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "pick one of its Pareto front with --trial N" in lines[0], refused.stderr
    assert f"(trials {', '.join(map(str, front))};" in lines[0]
    # A chosen point goes on to promote (the module's own train: promote says how to train it).
    chosen = CliRunner().invoke(app, ["promote", "--trial", str(front[-1])])
    assert isinstance(chosen.exception, HpoError) and f"train trial {front[-1]}'s params" in str(chosen.exception)
    diagnose = CliRunner().invoke(app, ["diagnose", "--json"])
    assert diagnose.exit_code == 0, diagnose.stdout
    assert json.loads(diagnose.stdout)["metric"] == "score"


def test_single_metric_studies_are_unchanged(tmp_path: Path) -> None:
    storage = open_storage(f"sqlite:///{tmp_path / 'one.db'}")
    study = create_or_resume(storage, "one", ("maximize",), optuna.samplers.RandomSampler(0), metrics=("score",))
    assert (study.direction.name, study.metric_names) == ("MAXIMIZE", ["score"])
    assert dataclasses.replace(Sweep(), metric="eval_loss", direction="minimize").metrics == ("eval_loss",)
