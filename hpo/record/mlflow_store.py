"""A new local MLflow store (an SQLite file) made from an empty one migrated once per MLflow version.

MLflow makes a new SQLite store by running every schema migration of its history (alembic,
about 60 revisions), paid by the first ``hpo search`` in every new folder and by every test
that starts from an empty folder: about 0.5 s of a one-trial sweep's 10.6 s wall on a 2-core
machine (docs/benchmarks.md; importing alembic and its scripts stays, since MLflow checks the
revision on every open). The result is always the same
empty schema, so :func:`seed` builds it once per MLflow version under
``$HPO_CACHE/mlflow-store/`` -- MLflow's own migrations, run by MLflow -- and copies it to
where the new store goes. MLflow then opens the copy as an existing store at its head revision
(it checks the revision, ``_verify_schema``, and would refuse a stale one).

One row is not copied: MLflow's default experiment (id 0) records the artifact folder of the
store it was made for (``./mlruns`` resolved when the store is first opened). The template is
kept without it, and MLflow creates it, with this store's own location, the first time it opens
the copy (``SqlAlchemyStore._initialize_store_state``), exactly as for a store it made itself.

Safe under concurrency and failure: the copy is written to a temporary file beside the store
and put in place with ``os.link``, which fails when the store's name exists: a store that MLflow
(or anyone) made there meanwhile is never replaced, and a reader sees a whole file or none. The
copy is created with mode 0666 less the umask, as MLflow's own file would be (not mkstemp's
0600). The caller holds the store's file lock (:func:`hpo.record.sqlite.sqlite_file_lock`).
Anything that goes wrong here only means MLflow makes the store itself, as before. Knows
nothing of Optuna.
"""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3
import tempfile
import uuid
from pathlib import Path

from hpo.record.sqlite import sqlite_path

logger = logging.getLogger(__name__)


def seed(uri: str) -> bool:
    """Put an empty, migrated MLflow store at the SQLite file ``uri`` names, if that file does
    not exist yet; returns whether it did. Other URIs, and any failure, leave things to MLflow."""
    target = sqlite_path(uri)
    if target is None or os.path.exists(target) or not os.path.isdir(os.path.dirname(target)):
        return False
    try:
        template = _template()
        partial = os.path.join(os.path.dirname(target), f".mlflow-seed-{uuid.uuid4().hex}.db")
        try:
            # O_EXCL: a fresh file of our own; mode 0666 less the umask, like a file MLflow creates
            with os.fdopen(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb") as copy, \
                    open(template, "rb") as source:
                shutil.copyfileobj(source, copy)
            os.link(partial, target)  # FileExistsError if a store appeared meanwhile: it is kept
        finally:
            if os.path.lexists(partial):
                os.unlink(partial)
        return True
    except Exception as error:  # noqa: BLE001 - MLflow makes the store itself, as without a template
        logger.debug("hpo: no MLflow store template (%s: %s); MLflow creates the store", type(error).__name__, error)
        return False


def _template() -> Path:
    """The empty store for this MLflow version, made (once) if it is not in the cache yet."""
    import mlflow

    from hpo.train.models import cache_dir

    folder = cache_dir() / "mlflow-store"
    template = folder / f"mlflow-{mlflow.__version__}-sqlite{sqlite3.sqlite_version}.db"
    if template.is_file():
        return template
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as scratch:
        made = Path(scratch) / "store.db"
        _migrate(f"sqlite:///{made}", Path(scratch) / "artifacts")
        with sqlite3.connect(made) as connection:  # MLflow recreates experiment 0 for each store (see above)
            connection.execute("PRAGMA journal_mode=DELETE")  # one self-contained file, no -wal beside it
            connection.execute("DELETE FROM experiment_tags WHERE experiment_id = 0")
            connection.execute("DELETE FROM experiments WHERE experiment_id = 0")
        connection.close()
        os.replace(made, template)
    return template


def _migrate(uri: str, artifacts: Path) -> None:
    """MLflow's own creation of a store at ``uri`` (every migration), then its engine closed."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    store = SqlAlchemyStore(uri, str(artifacts))
    store.engine.dispose()
