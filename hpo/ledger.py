"""The driver's record of trials in the Optuna study: claim, report, tell, retry, reclaim.

One writer per sweep process: only the driver calls this (from Ray Tune's loop thread).
Several sweep processes may share a study (on one machine or many); they coordinate
through the storage:

* **claim**: under a study-wide lock (a file lock beside an SQLite database, an advisory
  lock on PostgreSQL/MySQL) a process counts finished + running trials and asks for a new
  one only while the study is short of ``target``. So ``--trials N`` means N finished
  trials in the study, however many processes share it, with none too many.
* **liveness**: each trial records its driver (host, pid, process start time) and a
  heartbeat (Optuna's RDB heartbeat, refreshed by the driver while the trial runs).
  ``reclaim`` fails trials whose driver is dead -- at once when it ran on this host and the
  process is gone, else once its heartbeat is older than the grace period -- with
  reason ``interrupted``, and enqueues the same parameters to run again.
* **retries**: a trial that failed (error, oom, crash) is enqueued again up to
  ``retries`` times; the failed attempt is kept (FAIL, ``retried``) but not counted.

Every write is a short storage transaction, so a driver killed at any moment loses no
finished trial.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from hpo.study import retry_when_locked, sqlite_file_lock

DRIVER_ATTR = "hpo:driver"
NOT_COUNTED = ("interrupted",)


def counts_towards_target(trial: FrozenTrial) -> bool:
    """COMPLETE, PRUNED and FAIL trials count, except attempts that are run again:
    interrupted ones (including those Optuna failed for a stale heartbeat, which carry no
    reason) and failures that were retried."""
    if trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
        return True
    if trial.state != TrialState.FAIL:
        return False
    reason = trial.user_attrs.get("reason")
    return reason is not None and reason not in NOT_COUNTED and not trial.user_attrs.get("retried")


def backend(storage: Any) -> Any:
    """The storage behind Optuna's cache wrapper (``load_study`` wraps an RDBStorage)."""
    return getattr(storage, "_backend", storage)


def driver_id() -> str:
    """This process as ``host:pid:start_time`` (the start time tells a reused pid apart)."""
    return f"{socket.gethostname()}:{os.getpid()}:{_start_time(os.getpid())}"


def driver_is_dead(driver: str) -> bool:
    """True when ``driver`` ran on this host and that process is gone (or the pid now
    belongs to another process). Drivers on other hosts are judged by heartbeat instead."""
    try:
        host, pid_text, start = driver.rsplit(":", 2)
        pid = int(pid_text)
    except ValueError:
        return False
    if host != socket.gethostname():
        return False
    if pid == os.getpid():
        return False
    return _start_time(pid) != start


def _start_time(pid: int) -> str:
    try:
        import psutil

        return f"{psutil.Process(pid).create_time():.2f}"
    except Exception:  # noqa: BLE001 - NoSuchProcess, AccessDenied, ...
        return "gone"


@dataclass
class AskedTrial:
    number: int
    params: dict[str, Any]
    """What ``space(trial)`` returned: what the trial trains with."""
    trial: optuna.Trial
    reported: set[int] = field(default_factory=set)
    attrs: dict[str, Any] = field(default_factory=dict)


class Ledger:
    """See the module docstring. ``space`` maps an Optuna trial to the trial's params."""

    def __init__(self, study: optuna.Study, space: Callable[[optuna.Trial], dict], *, target: int,
                 retries: int = 0):
        self.study = study
        self.space = space
        self.target = target
        self.retries = retries
        self.running: dict[int, AskedTrial] = {}
        self.driver = driver_id()
        self.lock = StudyLock(study)

    # counting ---------------------------------------------------------------------
    def finished(self) -> int:
        return sum(1 for t in self.study.get_trials(deepcopy=False) if counts_towards_target(t))

    def claim(self) -> AskedTrial | None:
        """A new trial if the study is short of ``target`` (counting every process's
        running trials), else None. Raises what ``space`` raises, after failing the trial."""
        with self.lock:
            trials = self.study.get_trials(deepcopy=False)
            taken = sum(1 for t in trials if counts_towards_target(t) or t.state == TrialState.RUNNING)
            if taken >= self.target:
                return None
            return self._ask()

    def _ask(self) -> AskedTrial:
        trial = self.study.ask()
        storage = self.study._storage
        storage.set_trial_system_attr(trial._trial_id, DRIVER_ATTR, self.driver)
        self.heartbeat(trial)
        try:
            params = self.space(trial)
        except Exception as error:
            trial.set_user_attr("reason", "space")
            trial.set_user_attr("error", f"{type(error).__name__}: {error}"[:2000])
            self.study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
            raise
        trial.set_user_attr("config", {k: (list(v) if isinstance(v, tuple) else v) for k, v in params.items()})
        asked = AskedTrial(trial.number, params, trial)
        self.running[trial.number] = asked
        return asked

    # while running ------------------------------------------------------------------
    def heartbeat(self, trial: optuna.Trial) -> None:
        storage = self.study._storage  # Optuna wraps the RDB storage in a cache that forwards heartbeats
        interval = getattr(storage, "get_heartbeat_interval", None)
        if interval is not None and interval():
            retry_when_locked(lambda: storage.record_heartbeat(trial._trial_id))

    def report(self, number: int, step: int, value: float) -> None:
        """Record the objective at ``step`` (once per step; NaN and inf are kept as they are)."""
        asked = self.running[number]
        if step not in asked.reported:
            retry_when_locked(lambda: asked.trial.report(float(value), step))
            asked.reported.add(step)
        self.heartbeat(asked.trial)

    def set_attr(self, number: int, key: str, value: Any) -> None:
        """A user attr on a running trial, written only when it changes."""
        asked = self.running[number]
        if asked.attrs.get(key) != value:
            retry_when_locked(lambda: asked.trial.set_user_attr(key, value))
            asked.attrs[key] = value

    # the end ------------------------------------------------------------------------
    def tell(self, number: int, state: TrialState, value: float | None = None, reason: str | None = None,
             error: str | None = None, attrs: dict[str, Any] | None = None) -> bool:
        """Record the trial's end: COMPLETE with ``value``, PRUNED (Optuna keeps the last
        intermediate value) or FAIL with ``reason``/``error`` user attrs. Interrupted and
        (within ``retries``) failed trials are enqueued to run again; returns whether."""
        asked = self.running.pop(number)
        trial = asked.trial
        again = state == TrialState.FAIL and (reason in NOT_COUNTED or self._attempt(trial) <= self.retries)
        values = {**(attrs or {}), "reason": reason, "error": error[:4000] if error else None,
                  "retried": True if again and reason not in NOT_COUNTED else None}
        for key, attr in values.items():
            if attr is not None:
                retry_when_locked(lambda key=key, attr=attr: trial.set_user_attr(key, attr))
        if state == TrialState.COMPLETE:
            retry_when_locked(lambda: self.study.tell(trial, float(value), skip_if_finished=True))  # type: ignore[arg-type]
        else:
            retry_when_locked(lambda: self.study.tell(trial, state=state, skip_if_finished=True))
        if again:
            self._enqueue_again(self._frozen(trial))
        return again

    def _attempt(self, trial: optuna.Trial) -> int:
        return int(self._frozen(trial).user_attrs.get("attempt", 1))

    def _frozen(self, trial: optuna.Trial) -> FrozenTrial:
        return self.study._storage.get_trial(trial._trial_id)

    def _enqueue_again(self, trial: FrozenTrial) -> None:
        attempt = int(trial.user_attrs.get("attempt", 1))
        self.study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number, "attempt": attempt + 1},
                                 skip_if_exists=False)

    def reclaim(self) -> list[int]:
        """Fail (reason ``interrupted``) and enqueue again the RUNNING trials of dead
        drivers; returns their numbers. Safe to call from every process at any time."""
        reclaimed = []
        for trial in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if trial.number in self.running:
                continue
            driver = trial.system_attrs.get(DRIVER_ATTR)
            if driver and driver_is_dead(driver):
                try:
                    self.study._storage.set_trial_user_attr(trial._trial_id, "reason", "interrupted")
                    self.study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
                except optuna.exceptions.UpdateFinishedTrialError:
                    continue  # another process reclaimed it first
                self._enqueue_again(trial)
                reclaimed.append(trial.number)
        before = {t.number for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
        optuna.storages.fail_stale_trials(self.study)  # other hosts: stale heartbeat
        trials = {t.number: t for t in self.study.get_trials(deepcopy=False)}
        for number in sorted(before - set(self.running)):
            if trials[number].state == TrialState.FAIL:
                self._enqueue_again(trials[number])
                reclaimed.append(number)
        return sorted(reclaimed)


class StudyLock:
    """A lock shared by every process using the study: a file lock beside an SQLite file,
    an advisory lock on PostgreSQL and MySQL, none for other storages."""

    def __init__(self, study: optuna.Study):
        storage = backend(study._storage)
        self.url: str = getattr(storage, "url", "")
        self.engine = getattr(storage, "engine", None)
        self.key = f"hpo:{study.study_name}"
        self._file_lock = sqlite_file_lock(self.url) if self.url.startswith("sqlite:///") else None

    def __enter__(self) -> StudyLock:
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(self._acquire())
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stack.close()

    @contextlib.contextmanager
    def _acquire(self) -> Iterator[None]:
        if self._file_lock is not None:
            with self._file_lock:
                yield
            return
        dialect = self.engine.dialect.name if self.engine is not None else ""
        if dialect not in ("postgresql", "mysql"):
            yield
            return
        import sqlalchemy

        with self.engine.connect() as connection:
            if dialect == "postgresql":
                connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(hashtext(:key))"), {"key": self.key})
                try:
                    yield
                finally:
                    connection.execute(sqlalchemy.text("SELECT pg_advisory_unlock(hashtext(:key))"), {"key": self.key})
                    connection.commit()
            else:
                connection.execute(sqlalchemy.text("SELECT GET_LOCK(:key, 600)"), {"key": self.key})
                try:
                    yield
                finally:
                    connection.execute(sqlalchemy.text("SELECT RELEASE_LOCK(:key)"), {"key": self.key})
                    connection.commit()
