"""The study lock: one lock shared by every process that uses a study.

* SQLite: a file lock beside the database, named after its *resolved* path, so
  ``sqlite:///hpo.db`` (run in /abs) and ``sqlite:////abs/hpo.db`` are one lock.
* PostgreSQL: a session advisory lock (``pg_try_advisory_lock``, polled up to the timeout).
* MySQL/MariaDB: ``GET_LOCK(key, timeout)``, whose answer is checked: 1 acquired,
  0 timed out, NULL an error.
* Other storages: no lock.

Reentrant within one :class:`StudyLock` object (a reclaim inside a held lock is fine).
Waiting longer than ``timeout`` raises :class:`StudyLockTimeout`, an HpoError naming the
lock, never hangs forever.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import optuna

from hpo.errors import HpoError
from hpo.record.optuna_access import backend_of
from hpo.record.sqlite import sqlite_file_lock, sqlite_path

if TYPE_CHECKING:
    import sqlalchemy

LOCK_TIMEOUT = 600.0


class StudyLockTimeout(HpoError):
    """Another process held the study lock longer than the timeout."""


class StudyLock:
    """See the module docstring."""

    def __init__(self, study: optuna.Study, timeout: float = LOCK_TIMEOUT):
        storage = backend_of(study)
        self.url: str = getattr(storage, "url", "")
        self.engine: sqlalchemy.Engine | None = getattr(storage, "engine", None)
        self.study_name = study.study_name
        self.key = f"hpo:{study.study_name}"
        self.timeout = timeout
        self.path = sqlite_path(self.url)
        self._file_lock = sqlite_file_lock(self.url, timeout) if self.path else None
        self._depth = 0
        self._stack: contextlib.ExitStack | None = None

    def __enter__(self) -> StudyLock:
        if self._depth == 0:
            stack = contextlib.ExitStack()
            stack.enter_context(self._acquire())
            self._stack = stack
        self._depth += 1
        return self

    def __exit__(self, *exc: Any) -> None:
        self._depth -= 1
        if self._depth == 0 and self._stack is not None:
            stack, self._stack = self._stack, None
            stack.close()

    def _timed_out(self, where: str) -> StudyLockTimeout:
        return StudyLockTimeout(
            f"study {self.study_name!r}: waited {self.timeout:g} s for the study lock ({where}) that another "
            "hpo process holds; check for a hung `hpo search` on this study, or try again")

    @contextlib.contextmanager
    def _acquire(self) -> Iterator[None]:
        if self._file_lock is not None:
            from filelock import Timeout

            try:
                self._file_lock.acquire(timeout=self.timeout)
            except Timeout:
                raise self._timed_out(f"file {self.path}.lock") from None
            try:
                yield
            finally:
                self._file_lock.release()
            return
        dialect = self.engine.dialect.name if self.engine is not None else ""
        if self.engine is not None and dialect == "postgresql":
            with self._postgres(self.engine):
                yield
        elif self.engine is not None and dialect == "mysql":
            with self._mysql(self.engine):
                yield
        else:
            yield

    @contextlib.contextmanager
    def _postgres(self, engine: sqlalchemy.Engine) -> Iterator[None]:
        import sqlalchemy

        take = sqlalchemy.text("SELECT pg_try_advisory_lock(hashtext(:key))")
        with engine.connect() as connection:
            deadline, wait = time.monotonic() + self.timeout, 0.01
            while not connection.execute(take, {"key": self.key}).scalar():
                connection.commit()
                if time.monotonic() >= deadline:
                    raise self._timed_out("PostgreSQL advisory lock")
                time.sleep(wait)
                wait = min(0.25, wait * 2)
            connection.commit()
            try:
                yield
            finally:
                connection.execute(sqlalchemy.text("SELECT pg_advisory_unlock(hashtext(:key))"), {"key": self.key})
                connection.commit()

    @contextlib.contextmanager
    def _mysql(self, engine: sqlalchemy.Engine) -> Iterator[None]:
        import sqlalchemy

        # MySQL lock names are at most 64 characters: a long study name is hashed.
        key = self.key if len(self.key) <= 64 else "hpo:" + hashlib.sha1(self.key.encode()).hexdigest()
        with engine.connect() as connection:
            got = connection.execute(sqlalchemy.text("SELECT GET_LOCK(:key, :timeout)"),
                                     {"key": key, "timeout": max(0, int(self.timeout))}).scalar()
            connection.commit()
            if got == 0:
                raise self._timed_out("MySQL GET_LOCK")
            if got != 1:
                raise HpoError(f"study {self.study_name!r}: MySQL GET_LOCK({key!r}) failed (answered {got!r}); "
                               "check the database server's log")
            try:
                yield
            finally:
                connection.execute(sqlalchemy.text("SELECT RELEASE_LOCK(:key)"), {"key": key})
                connection.commit()
