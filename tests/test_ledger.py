"""The ledger's coordination through the storage itself: the study lock excludes other
processes (SQLite file lock, PostgreSQL advisory lock) and heartbeats reach the database."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import sqlalchemy

from hpo.ledger import Ledger, StudyLock
from hpo.study import open_storage

TRY_LOCK = """
import sys, optuna
from hpo.ledger import StudyLock
from filelock import Timeout
lock = StudyLock(optuna.load_study(study_name="s", storage=sys.argv[1]))
lock._file_lock.timeout = 1
try:
    with lock:
        print("ACQUIRED")
except Timeout:
    print("BLOCKED")
"""


def test_sqlite_lock_excludes_another_process(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    study = optuna.create_study(study_name="s", storage=open_storage(url))
    with StudyLock(study):
        held = subprocess.run([sys.executable, "-c", TRY_LOCK, url], capture_output=True, text=True, timeout=60)
    assert held.stdout.strip() == "BLOCKED", held.stderr
    free = subprocess.run([sys.executable, "-c", TRY_LOCK, url], capture_output=True, text=True, timeout=60)
    assert free.stdout.strip() == "ACQUIRED", free.stderr


def test_heartbeats_reach_the_database(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    study = optuna.create_study(study_name="s", storage=open_storage(url))
    ledger = Ledger(study, lambda trial: {"x": trial.suggest_float("x", 0, 1)}, target=3)
    asked = ledger.claim()
    assert asked is not None
    engine = sqlalchemy.create_engine(url)
    with engine.connect() as connection:
        rows = connection.execute(sqlalchemy.text("SELECT trial_id FROM trial_heartbeats")).fetchall()
    assert [r[0] for r in rows] == [asked.trial._trial_id]


@pytest.mark.postgres
def test_postgres_lock_is_an_advisory_lock(postgres_url: str) -> None:
    study = optuna.create_study(study_name="s", storage=open_storage(postgres_url))
    other = sqlalchemy.create_engine(postgres_url)
    probe = sqlalchemy.text("SELECT pg_try_advisory_lock(hashtext('hpo:s'))")
    with StudyLock(study), other.connect() as connection:
        assert connection.execute(probe).scalar() is False
    with other.connect() as connection:
        assert connection.execute(probe).scalar() is True
        connection.execute(sqlalchemy.text("SELECT pg_advisory_unlock(hashtext('hpo:s'))"))
