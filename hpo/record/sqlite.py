"""SQLite files the sweep driver writes (the Optuna study, the MLflow store): a WAL journal
with ``synchronous=NORMAL``, so a commit does not wait for the disk.

Why: in SQLite's default mode (rollback journal, ``synchronous=FULL``) every commit creates
and deletes a journal file and waits for the disk (fsync) several times. The driver commits
about 25 times per trial (Optuna ask, report, user attrs, tell; MLflow create, log, close),
so on a 2-core VM those waits were most of its bookkeeping: 150-170 ms per trial against
42 ms in WAL mode, measured in one process with the machine busy (``bench/overhead.py``
gives the end-to-end figure).

What it keeps: a ``kill -9`` of the driver at any moment loses no commit -- the WAL holds a
committed transaction in the operating system's cache the moment ``commit`` returns
(SQLite's documented guarantee for ``synchronous=NORMAL`` in WAL mode is durability against
application crashes). A power loss or an OS crash may roll back the last commits (never
corrupt the file): a trial whose end is lost is RUNNING again, and the next sweep fails it
as ``interrupted`` and runs it again, as after any crash.

WAL mode is a property of the file (other readers -- ``hpo status``, optuna-dashboard,
``mlflow ui`` -- just work, and no longer block the writer); it needs every process on one
machine, which an SQLite study already does. Knows nothing of Optuna or MLflow: it sets two
PRAGMAs on each new SQLite connection of this process, through SQLAlchemy's ``connect`` event.

Also the file an SQLite URL names (:func:`sqlite_path`) and the lock file beside it
(:func:`sqlite_file_lock`), which the study (:mod:`hpo.record.study`, :mod:`hpo.record.locks`) and the
MLflow store (:mod:`hpo.record.tracking`) take.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from typing import Any

logger = logging.getLogger(__name__)
_installed = False


def use_wal() -> None:
    """From now on, every SQLite database this process opens through SQLAlchemy is switched to
    WAL (once per file; it stays so) and each new connection to it commits with
    ``synchronous=NORMAL``. Call it in the driver before opening the stores; idempotent."""
    global _installed
    if _installed:
        return
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    event.listen(Engine, "connect", _on_connect)
    _installed = True


def _on_connect(dbapi_connection: Any, _record: Any) -> None:
    if not isinstance(dbapi_connection, sqlite3.Connection):
        return
    cursor = dbapi_connection.cursor()
    try:
        mode = cursor.execute("PRAGMA journal_mode=WAL").fetchone()
        if mode and str(mode[0]).lower() == "wal":
            cursor.execute("PRAGMA synchronous=NORMAL")
    except sqlite3.Error as error:  # e.g. another process holds a lock: this connection keeps the defaults
        logger.debug("hpo: SQLite WAL mode not set (%s)", error)
    finally:
        cursor.close()


def sqlite_path(url: str) -> str | None:
    """The resolved file of an SQLite URL (``sqlite:///hpo.db`` and ``sqlite:////abs/hpo.db``
    name the same file when run in /abs), or None for other URLs and in-memory databases."""
    if not url.startswith("sqlite:///") or url.endswith(":memory:"):
        return None
    path = url.removeprefix("sqlite:///").split("?", 1)[0]
    return os.path.realpath(os.path.abspath(os.path.expanduser(path))) if path else None


def sqlite_file_lock(url: str, timeout: float = 600) -> Any:
    """A lock file beside an SQLite database (``<resolved file>.lock``); a no-op for other URLs."""
    import contextlib

    path = sqlite_path(url)
    if path is None:
        return contextlib.nullcontext()
    from filelock import FileLock

    return FileLock(path + ".lock", timeout=timeout)
