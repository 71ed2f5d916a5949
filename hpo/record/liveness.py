"""Is a sweep driver alive? Who it is, and the heartbeats that say so.

A trial in the study records the driver that runs it (``hpo:driver``), as
``host:boot_id:pid_namespace:pid:start_time``:

* the **boot id** (``/proc/sys/kernel/random/boot_id``) tells apart machines that share a
  host name, and the **PID-namespace id** containers on one machine: a pid is only
  meaningful in the same boot and the same PID namespace;
* the **start time** tells a reused pid apart (compared with a tolerance, not as text).

:func:`driver_is_dead` answers True only when sure (same host, boot and namespace, and the
pid is gone or belongs to a younger process). A process that cannot be read
(``AccessDenied``), or one elsewhere, counts as alive: its heartbeat's age decides. So does
one hidden from this user (``/proc`` mounted ``hidepid=2``: psutil finds no such process,
while ``os.kill(pid, 0)`` answers EPERM, "it exists, and is not yours").

:class:`Heartbeats` records each running trial's heartbeat from a daemon thread with its
own database connection, so nothing the driver's loop waits on (the study lock, MLflow,
SQLite's busy timeout, a long Ray call) can make a live driver's trials look stale.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from optuna.storages import RDBStorage

logger = logging.getLogger(__name__)
START_TOLERANCE = 1.0
"""Seconds two readings of one process's start time may differ by."""


def _read(path: str) -> str:
    try:
        with open(path) as handle:
            return handle.read().strip() or "-"
    except OSError:
        return "-"


def _pid_namespace() -> str:
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return "-"


def _start_time(pid: int) -> float | None:
    """The process's start time (seconds since the epoch); None if it cannot be read."""
    try:
        import psutil

        return float(psutil.Process(pid).create_time())
    except Exception:  # noqa: BLE001 - NoSuchProcess, AccessDenied, ...
        return None


HOST = socket.gethostname()
BOOT_ID = _read("/proc/sys/kernel/random/boot_id")
PID_NAMESPACE = _pid_namespace()


@dataclass(frozen=True)
class Driver:
    host: str
    boot_id: str | None
    """None for the old ``host:pid:start`` form (written before boot ids were recorded)."""
    pid_namespace: str | None
    pid: int
    start: float | None


def driver_id(pid: int | None = None) -> str:
    """This process (or ``pid``) as ``host:boot_id:pid_namespace:pid:start_time``."""
    pid = os.getpid() if pid is None else pid
    start = _start_time(pid)
    return f"{HOST}:{BOOT_ID}:{PID_NAMESPACE}:{pid}:{'-' if start is None else f'{start:.3f}'}"


def parse_driver(text: str) -> Driver | None:
    """Both forms: ``host:boot:ns:pid:start`` and the old ``host:pid:start``; None if neither."""
    parts = text.split(":")
    try:
        if len(parts) == 5:
            host, boot, namespace, pid, start = parts
        elif len(parts) == 3:
            (host, pid, start), boot, namespace = parts, None, None
        else:
            return None
        return Driver(host, boot, namespace, int(pid), _float(start))
    except ValueError:
        return None


def _float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None  # "-" or the old "gone": the start time was not readable


def driver_is_dead(text: str) -> bool:
    """True only when ``text`` names a process of this machine, boot and PID namespace that
    is gone (or whose pid now belongs to another process). Anything else -- another host or
    container, a process that cannot be read, an unreadable record -- is not known dead."""
    driver = parse_driver(text)
    if driver is None or driver.host != HOST:
        return False
    if driver.boot_id is not None and (driver.boot_id != BOOT_ID or driver.pid_namespace != PID_NAMESPACE):
        return False
    if driver.start is None:
        return False
    try:
        import psutil

        started = psutil.Process(driver.pid).create_time()
    except Exception as error:  # noqa: BLE001 - AccessDenied, ZombieProcess...: not known dead
        return type(error).__name__ == "NoSuchProcess" and not _pid_exists(driver.pid)
    return abs(started - driver.start) > START_TOLERANCE


def _pid_exists(pid: int) -> bool:
    """Whether a process has this pid, by signal 0 (not ``/proc``, which ``hidepid=2`` thins
    out to the caller's own processes): EPERM means one runs, another user's; only ESRCH
    means none. A pid below 1 names no one process (signal 0 would test a group): True."""
    if pid < 1:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError (EPERM) above all
        return True
    return True


def known_alive(text: str) -> bool:
    """Whether ``text`` names a process of this machine, boot and namespace that runs now
    (the calling process included): its trials are live whatever their heartbeat says."""
    driver = parse_driver(text)
    if driver is None or driver.host != HOST or driver.start is None:
        return False
    if driver.boot_id is not None and (driver.boot_id != BOOT_ID or driver.pid_namespace != PID_NAMESPACE):
        return False
    started = _start_time(driver.pid)
    return started is not None and abs(started - driver.start) <= START_TOLERANCE


class Heartbeats:
    """A daemon thread recording a heartbeat for each trial in :meth:`add` every
    ``interval / 2`` seconds, through its own Optuna storage (own engine and connections).

    Thread-safe: the driver's loop only adds and discards trial ids under a small lock.
    A failed write is logged and tried again on the next beat.
    """

    def __init__(self, url: str, interval: float, grace_period: float):
        self.url = url
        self.interval = interval
        self.grace_period = grace_period
        self._ids: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.beats = 0

    def add(self, trial_id: int) -> None:
        with self._lock:
            self._ids.add(trial_id)
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="hpo-heartbeats", daemon=True)
            self._thread.start()

    def discard(self, trial_id: int) -> None:
        with self._lock:
            self._ids.discard(trial_id)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        storage: RDBStorage | None = None
        while not self._stop.wait(max(0.2, self.interval / 2)):
            with self._lock:
                ids = sorted(self._ids)
            if not ids:
                continue
            try:
                if storage is None:
                    storage = _own_storage(self.url, self.interval, self.grace_period)
                for trial_id in ids:
                    storage.record_heartbeat(trial_id)
                self.beats += 1
            except Exception as error:  # noqa: BLE001 - retried on the next beat
                logger.warning("hpo: recording heartbeats failed (%s); trying again in %.0f s",
                               type(error).__name__, self.interval / 2)
        if storage is not None:
            storage.engine.dispose()


def _own_storage(url: str, interval: float, grace_period: float) -> RDBStorage:
    import optuna

    engine_kwargs: dict[str, Any] = {"connect_args": {"timeout": 120}} if url.startswith("sqlite") else \
        {"pool_pre_ping": True, "pool_size": 1}
    return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, skip_compatibility_check=True,
                                      skip_table_creation=True, heartbeat_interval=int(max(1, interval)),
                                      grace_period=int(max(1, grace_period)))
