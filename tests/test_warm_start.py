"""Warm start on real Optuna storages (no Ray): what fits a space, once per study, within
the trials left; bad sources and flags are one clear line; the PostgreSQL pool is sized
for the concurrency. The end-to-end warm-started nightly sweep is in test_dashboards.py."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState, create_trial

from hpo.errors import HpoError
from hpo.record import study as studies
from hpo.record.warmstart import compatible_params, parse_source, warm_start
from tests.conftest import run_hpo


def space(trial: optuna.Trial) -> dict:
    """A conditional space: ``layers`` exists only for the ``deep`` kind."""
    params = {"lr": trial.suggest_float("lr", 1e-4, 1e-1, log=True),
              "kind": trial.suggest_categorical("kind", ["shallow", "deep"])}
    if params["kind"] == "deep":
        params["layers"] = trial.suggest_int("layers", 2, 8, step=2)
    return params


def earlier(storage: str) -> optuna.Study:
    study = optuna.create_study(study_name="earlier", storage=storage, direction="minimize")
    lr, kinds = FloatDistribution(1e-5, 1.0, log=True), CategoricalDistribution(["shallow", "deep", "wide"])
    layers = IntDistribution(1, 8)
    for value, params in ((0.1, {"lr": 0.01, "kind": "deep", "layers": 4}),
                          (0.2, {"lr": 0.5, "kind": "deep", "layers": 3}),
                          (0.3, {"lr": 0.02, "kind": "wide", "layers": 4}),
                          (0.9, {"lr": 0.03, "kind": "shallow", "layers": 2})):
        distributions = {"lr": lr, "kind": kinds, "layers": layers}
        study.add_trial(create_trial(state=TrialState.COMPLETE, value=value, params=params, distributions=distributions))
    study.add_trial(create_trial(state=TrialState.PRUNED, params={"lr": 0.01, "kind": "deep", "layers": 2},
                                 distributions={"lr": lr, "kind": kinds, "layers": layers}, intermediate_values={1: 0.0}))
    return study


def test_only_what_fits_is_kept_and_each_drop_says_why() -> None:
    assert compatible_params({"lr": 0.01, "kind": "deep", "layers": 4}, space) == (
        {"lr": 0.01, "kind": "deep", "layers": 4}, [])
    kept, reasons = compatible_params({"lr": 0.5, "kind": "deep", "layers": 3}, space)
    assert kept == {"kind": "deep"}
    assert reasons == ["lr=0.5: outside this space's range [0.0001, 0.1]",
                       "layers=3: outside this space's range [2, 8] step 2"]
    kept, reasons = compatible_params({"lr": 0.03, "kind": "shallow", "layers": 2, "dropout": 0.1}, space)
    assert kept == {"lr": 0.03, "kind": "shallow"}, "layers is not suggested on the shallow path"
    assert reasons == ["layers=2: this space has no parameter 'layers'",
                       "dropout=0.1: this space has no parameter 'dropout'"]


def test_best_configs_are_enqueued_once_within_the_trials_left(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'hpo.db'}"
    source = earlier(storage)
    study = optuna.create_study(study_name="new", storage=studies.open_storage(storage), direction="minimize")
    result = warm_start(study, source, "earlier@hpo.db", top=5, space=space, room=3)
    assert [number for number, _ in result.enqueued] == [0, 1, 2], "best first, by the earlier study's direction"
    assert "trial 3: only 3 trial(s) to run in this sweep" in result.skipped
    assert "trial 2 kind='wide': outside this space's choices ['shallow', 'deep']" in result.skipped
    waiting = study.get_trials(states=(TrialState.WAITING,))
    assert [t.system_attrs["fixed_params"] for t in waiting] == [
        {"lr": 0.01, "kind": "deep", "layers": 4}, {"kind": "deep"}, {"lr": 0.02, "layers": 4}]
    assert waiting[0].user_attrs["warm_start"] == "earlier@hpo.db trial 0"

    trial = study.ask()  # the sweep asks: the first enqueued config comes out as is
    assert space(trial) == {"lr": 0.01, "kind": "deep", "layers": 4}

    resumed = optuna.load_study(study_name="new", storage=studies.open_storage(storage))
    again = warm_start(resumed, source, "earlier@hpo.db", top=5, space=space, room=3)
    assert again.already and not again.enqueued
    assert "nothing enqueued again" in again.lines()[0]
    assert len(resumed.get_trials(states=(TrialState.WAITING,))) == 2, "nothing added on resume"


def test_sources_are_parsed_and_checked(tmp_path: Path) -> None:
    assert parse_source("lora", "sqlite:///hpo.db") == ("lora", "sqlite:///hpo.db")
    assert parse_source("lora@postgresql://u:p@db/hpo", None) == ("lora", "postgresql://u:p@db/hpo")
    with pytest.raises(HpoError, match="expected STUDY or STUDY@STORAGE"):
        parse_source("lora@", None)
    module = tmp_path / "custom.py"
    module.write_text("import hpo\nsweep = hpo.Sweep(metric='score', direction='maximize', trials=1, max_steps=1, eval_every=1)\n"
                      "def space(trial):\n    return {'x': trial.suggest_float('x', 0, 1)}\n"
                      "def train(params, report):\n    report(1, {'score': params['x']})\n")
    missing = run_hpo(["search", str(module), "--warm-start", "old@sqlite:///nowhere.db"], cwd=tmp_path)
    assert missing.returncode == 2
    assert missing.stderr.strip() == ("error: --warm-start old@sqlite:///nowhere.db: the file nowhere.db does not "
                                      "exist; give STUDY@sqlite:///PATH")
    both = run_hpo(["search", str(module), "--trials", "5", "--more", "2"], cwd=tmp_path)
    assert both.returncode == 2 and "--trials 5 and --more 2: give one" in both.stderr
    assert not (tmp_path / "hpo.db").exists() and not (tmp_path / "mlflow.db").exists(), "nothing written"


@pytest.mark.postgres
def test_the_postgresql_pool_is_sized_for_the_concurrency(postgres_url: str) -> None:
    wide = studies.open_storage(postgres_url, concurrency=24)
    assert (wide.engine.pool.size(), wide.engine.pool._max_overflow) == (26, 24)
    small = studies.open_storage(postgres_url, concurrency=2)
    assert (small.engine.pool.size(), small.engine.pool._max_overflow) == (5, 10), "never below SQLAlchemy's default"
    assert studies.pool_size(None)["pool_recycle"] == 3600


def test_a_warm_start_killed_part_way_enqueues_each_config_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The driver dies after the first enqueue, before the study records the warm start
    (the death is simulated: the second enqueue raises SystemExit, as a kill would stop it
    there). The next run enqueues the rest, not the first one again."""
    storage = f"sqlite:///{tmp_path / 'hpo.db'}"
    source = earlier(storage)
    study = optuna.create_study(study_name="new", storage=studies.open_storage(storage), direction="minimize")
    enqueue, calls = optuna.Study.enqueue_trial, []

    def dies_on_the_second(self: optuna.Study, *args: object, **kwargs: object) -> None:
        calls.append(1)
        if len(calls) == 2:
            raise SystemExit("killed")
        enqueue(self, *args, **kwargs)

    monkeypatch.setattr(optuna.Study, "enqueue_trial", dies_on_the_second)
    with pytest.raises(SystemExit):
        warm_start(study, source, "earlier@hpo.db", top=5, space=space, room=3)
    monkeypatch.setattr(optuna.Study, "enqueue_trial", enqueue)
    resumed = optuna.load_study(study_name="new", storage=studies.open_storage(storage))
    result = warm_start(resumed, source, "earlier@hpo.db", top=5, space=space, room=3)
    assert not result.already and [n for n, _ in result.enqueued] == [0, 1, 2]
    origins = [t.user_attrs["warm_start"] for t in resumed.get_trials(states=(TrialState.WAITING,))]
    assert sorted(origins) == [f"earlier@hpo.db trial {n}" for n in (0, 1, 2)], "each config once"
