"""What the sweep's two stores, the Optuna storage and the MLflow tracking store, share: the
checks before anything is written, and the retries of their calls. Knows neither Optuna nor
MLflow (the MLflow side, :mod:`hpo.record.tracking`, imports this and not :mod:`hpo.record.study`).

* :func:`check_local`, :func:`connect_once`: a URL that parses, an SQLite file's folder, a
  database server that answers; nothing created (an SQLite file is not opened).
  :func:`check_writable`: an SQLite file a sweep can write (its folder too).
* :func:`retry_when_locked`: SQLite's 'database is locked' (and other given words), retried.
* :func:`is_transient`, :func:`retry_transient`: dropped connections, lock waits and an MLflow
  server's 5xx answers, retried with a bounded back-off.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import TypeVar

from hpo.errors import HpoError
from hpo.secrets import check_url, redact_url

logger = logging.getLogger(__name__)
T = TypeVar("T")


def check_local(url: str, flag: str) -> bool:
    """The checks of a store URL that need no connection: that it parses (:func:`hpo.secrets.check_url`)
    and, for an SQLite file, that its folder exists. Returns whether ``url`` is an SQLite
    file: then nothing more is checked (opening it would create the file). Raises HpoError
    (password hidden) naming ``flag``."""
    check_url(url, flag)
    if not url.startswith("sqlite"):
        return False
    folder = os.path.dirname(url.split("///", 1)[-1])
    if folder and not os.path.isdir(folder):
        raise HpoError(f"{flag} {redact_url(url)}: the folder {folder} does not exist")
    return True


def check_writable(url: str, flag: str) -> None:
    """For a sweep, which writes both stores: an SQLite file (and the journal, WAL and lock
    files SQLite and MLflow put beside it) needs its folder writable, and the file itself
    when it exists. Checked with access(2), writing nothing. Raises HpoError naming
    ``flag`` and how to point it elsewhere. Other URLs: nothing to check here."""
    if not url.startswith("sqlite"):
        return
    path = os.path.abspath(url.split("///", 1)[-1])
    for target in (os.path.dirname(path), path):
        if os.path.exists(target) and not os.access(target, os.W_OK):
            raise HpoError(f"{flag} {redact_url(url)}: cannot write {target} ({why_not_writable(target)}); run hpo "
                           f"from a folder you can write, or point {flag} at one, e.g. {flag} "
                           f"sqlite:///{os.path.join(os.path.expanduser('~'), os.path.basename(path))}")


def why_not_writable(path: str) -> str:
    """'read-only file system' or 'permission denied', for a path access(2) refused."""
    try:
        return "read-only file system" if os.statvfs(path).f_flag & os.ST_RDONLY else "permission denied"
    except OSError as error:
        return error.strerror or "not writable"


def connect_once(url: str) -> None:
    """Open and close one connection to the database server at SQLAlchemy ``url``; raises what
    its driver raises (the caller words the error)."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(url, pool_pre_ping=True)
    with engine.connect():
        pass
    engine.dispose()


def retry_when_locked(call: Callable[[], T], attempts: int = 8, words: tuple[str, ...] = ("database is locked",)) -> T:
    """Run ``call()``; if SQLite answers 'database is locked' (or another of ``words``), wait
    and run it again.

    SQLite's busy timeout does not help when two processes' deferred transactions both try
    to upgrade from reading to writing: one of them gets 'database is locked' at once
    (Optuna's heartbeat and tell are such transactions). Waiting a moment and retrying the
    whole short transaction is the remedy. Only for idempotent calls.
    """
    for attempt in range(attempts):
        try:
            return call()
        except Exception as error:  # noqa: BLE001 - sqlalchemy/optuna wrap sqlite3.OperationalError
            if not any(word in str(error) for word in words) or attempt == attempts - 1:
                raise
            time.sleep(min(5.0, 0.05 * 2**attempt))
    raise AssertionError("unreachable")


TRANSIENT_WORDS = ("database is locked", "could not connect", "connection refused", "server closed the connection",
                   "lost connection", "gone away", "connection reset", "connection was killed", "terminating connection",
                   "timed out", "timeout", "temporarily unavailable", "too many connections", "deadlock",
                   "broken pipe", "max retries exceeded", "connection aborted", "connectionerror",
                   "error code 500", "error code 502", "error code 503", "error code 504", "bad gateway",
                   "service unavailable", "internal server error")


def is_transient(error: BaseException) -> bool:
    """Whether ``error`` is worth retrying: a dropped or refused database connection
    (SQLAlchemy ``OperationalError``/``InterfaceError``, a connection the pool invalidated),
    a lock wait, or an MLflow server's connection error or 5xx answer."""
    if isinstance(error, (ConnectionError, TimeoutError)):
        return True
    names = {cls.__name__ for cls in type(error).__mro__}
    if getattr(error, "connection_invalidated", False):
        return True
    text = str(error).lower()
    if names & {"OperationalError", "InterfaceError", "DisconnectionError"}:
        return True
    if names & {"MlflowException", "RestException", "RequestException", "ConnectionError", "HTTPError"}:
        return any(word in text for word in TRANSIENT_WORDS)
    return "database is locked" in text


def retry_transient(call: Callable[[], T], *, attempts: int = 6, first_wait: float = 0.5,
                    what: str = "a storage call") -> T:
    """Run ``call()``, retrying transient storage/MLflow errors (:func:`is_transient`) with
    a bounded exponential back-off (0.5, 1, 2, 4, 8 s: about 15 s in all); anything else, or
    the last failure, is raised. Only for calls that are safe to repeat."""
    for attempt in range(attempts):
        try:
            return call()
        except Exception as error:  # noqa: BLE001 - classified just below
            if attempt == attempts - 1 or not is_transient(error):
                raise
            wait = min(8.0, first_wait * 2**attempt)
            logger.warning("hpo: %s failed (%s: %s); retrying in %.1f s", what, type(error).__name__,
                           str(error).splitlines()[0][:160] if str(error) else "", wait)
            time.sleep(wait)
    raise AssertionError("unreachable")
