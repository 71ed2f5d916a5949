"""A new local MLflow store made from the migrated template (hpo.record.mlflow_store) is the
store MLflow would have made: same schema revision, the default experiment pointing at this
store's own artifact folder, and usable by MLflow at once."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import mlflow
import pytest

from hpo.record import mlflow_store
from hpo.record.sweep_tracker import SweepTracker


def _schema(path: Path) -> tuple[list, list]:
    """The schema revision and every table and index, each statement's lines sorted: MLflow's own
    migrations do not write a table's constraints in the same order in every process."""
    with sqlite3.connect(path) as connection:
        revision = connection.execute("SELECT version_num FROM alembic_version").fetchall()
        tables = connection.execute("SELECT type, name, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite_%' "
                                    "ORDER BY name").fetchall()
    connection.close()
    return revision, [(kind, name, sorted(line.strip().rstrip(",") for line in (sql or "").splitlines()))
                      for kind, name, sql in tables]


def test_a_seeded_store_is_the_store_mlflow_makes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    native, seeded = tmp_path / "native.db", tmp_path / "seeded.db"
    mlflow.MlflowClient(f"sqlite:///{native}").search_experiments()  # MLflow's own migrations
    assert mlflow_store.seed(f"sqlite:///{seeded}")
    assert _schema(seeded) == _schema(native)

    client = mlflow.MlflowClient(f"sqlite:///{seeded}")
    default = client.get_experiment("0")  # made by MLflow on first open, for this store
    assert default.name == "Default"
    assert default.artifact_location == mlflow.MlflowClient(f"sqlite:///{native}").get_experiment("0").artifact_location
    experiment = client.create_experiment("study")
    run = client.create_run(experiment)
    client.log_metric(run.info.run_id, "eval_accuracy", 0.75, step=20)
    client.set_terminated(run.info.run_id)
    assert client.get_metric_history(run.info.run_id, "eval_accuracy")[0].value == 0.75
    assert not any(p.name.startswith(".mlflow-seed-") for p in tmp_path.iterdir())  # no partial copy left


def test_seed_leaves_an_existing_store_and_other_uris_alone(tmp_path: Path) -> None:
    store = tmp_path / "mlflow.db"
    client = mlflow.MlflowClient(f"sqlite:///{store}")
    client.create_experiment("kept")
    before = store.stat().st_mtime_ns, store.stat().st_size
    assert not mlflow_store.seed(f"sqlite:///{store}")
    assert (store.stat().st_mtime_ns, store.stat().st_size) == before
    assert client.get_experiment_by_name("kept") is not None
    assert not mlflow_store.seed(f"file://{tmp_path / 'mlruns'}")
    assert not mlflow_store.seed(f"sqlite:///{tmp_path / 'no-such-folder' / 'mlflow.db'}")
    assert not (tmp_path / "no-such-folder").exists()


def test_the_template_is_made_once_per_mlflow_version(tmp_path: Path) -> None:
    cache = Path(os.environ["HPO_CACHE"]) / "mlflow-store"
    assert mlflow_store.seed(f"sqlite:///{tmp_path / 'a.db'}")
    templates = sorted(cache.glob("mlflow-*.db"))
    assert [t.name.split("-sqlite")[0] for t in templates] == [f"mlflow-{mlflow.__version__}"]
    made = templates[0].stat().st_mtime_ns
    assert mlflow_store.seed(f"sqlite:///{tmp_path / 'b.db'}")
    assert templates[0].stat().st_mtime_ns == made
    assert not [p for p in cache.iterdir() if p not in templates]  # no scratch folder left behind


def test_a_broken_template_falls_back_to_mlflow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A template that cannot be read is not copied: MLflow makes the store itself."""
    monkeypatch.setenv("HPO_CACHE", str(tmp_path / "cache"))
    mlflow_store.seed(f"sqlite:///{tmp_path / 'warm.db'}")
    template = next((tmp_path / "cache" / "mlflow-store").glob("mlflow-*.db"))
    template.unlink()
    template.mkdir()  # in the way: copying it fails
    tracker = SweepTracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "study")
    assert tracker.client.get_experiment(tracker.experiment_id).name == "study"
    assert _schema(tmp_path / "mlflow.db") == _schema(tmp_path / "warm.db")


def test_a_store_made_meanwhile_is_never_replaced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """MLflow (another process, not holding hpo's lock) makes the store between seed's look and
    its copy: the copy is not put in place, the store MLflow made and what it holds stay."""
    store = tmp_path / "mlflow.db"
    real_template = mlflow_store._template

    def template_then_mlflow_makes_the_store() -> Path:
        made = real_template()
        mlflow.MlflowClient(f"sqlite:///{store}").create_experiment("theirs")
        return made

    monkeypatch.setattr(mlflow_store, "_template", template_then_mlflow_makes_the_store)
    assert not mlflow_store.seed(f"sqlite:///{store}")
    assert mlflow.MlflowClient(f"sqlite:///{store}").get_experiment_by_name("theirs") is not None
    assert not any(p.name.startswith(".mlflow-seed-") for p in tmp_path.iterdir())  # no partial copy left


@pytest.mark.parametrize("umask", [0o022, 0o002], ids=["umask022", "umask002"])
def test_a_seeded_store_follows_the_umask(tmp_path: Path, umask: int) -> None:
    """The store gets the mode MLflow's own file would (0666 less the umask), not mkstemp's 0600."""
    previous = os.umask(umask)
    try:
        assert mlflow_store.seed(f"sqlite:///{tmp_path / 'mlflow.db'}")
    finally:
        os.umask(previous)
    assert (tmp_path / "mlflow.db").stat().st_mode & 0o777 == 0o666 & ~umask
