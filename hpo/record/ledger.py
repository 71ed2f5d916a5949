"""The driver's record of trials in the Optuna study: claim, record intermediate values, tell, retry, reclaim.

One writer per sweep process: only the driver calls this (from Ray Tune's loop thread;
heartbeats come from their own thread, see :mod:`hpo.record.liveness`). Several sweep processes
may share a study (on one machine or many); they coordinate through the storage:

* **claim**: under the study lock (:mod:`hpo.record.locks`) a process counts finished + running
  trials and asks for a new one only while the study is short of ``target``. So
  ``--trials N`` means N finished trials in the study, however many processes share it. On a
  database the count is one query (:func:`count_taken`), not a read of every trial, so a
  claim takes as long at trial 5,000 as at trial 5.
* **liveness**: each trial records its driver (:func:`hpo.record.liveness.driver_id`) and a
  heartbeat. ``reclaim`` -- under the study lock -- fails with reason ``interrupted`` the
  RUNNING trials of dead drivers: at once when the driver ran in this machine's boot and
  PID namespace and is gone, else once its heartbeat is older than the grace period; a
  driver known alive (this process included) is never failed. Only the trials this call
  failed are enqueued again, so two reclaimers never queue one trial twice.
* **late results**: a trial failed by a reclaimer while its driver still ran (a driver cut
  off from the database longer than the grace period) can still end with a result. That
  result is kept, as a new finished trial with the same params (``late_result_of``), and
  the queued rerun, if not started yet, is withdrawn (reason ``superseded``).
* **retries**: an interrupted trial runs again, at most ``MAX_ATTEMPTS`` attempts of one
  config (then FAIL, reason ``interrupted_too_often``, counted); only crashes (a killed
  worker or driver) count as attempts, not a Ctrl-C that stopped it; a trial that failed
  (error, oom, ...) runs again up to ``retries`` times. Attempts run again are kept (FAIL)
  but not counted.

Every write is a short storage transaction, retried on transient errors, so a driver
killed at any moment loses no finished trial.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

from hpo.record.liveness import Heartbeats, driver_id, driver_is_dead, known_alive
from hpo.record.locks import StudyLock
from hpo.record.optuna_access import (
    ask,
    backend_of,
    stale_trial_ids,
    storage_of,
    study_id,
    tell_without_readback,
    trial_id,
    write_trial_attrs,
)
from hpo.record.stores import retry_transient, retry_when_locked
from hpo.record.study import GRACE_PERIOD, HEARTBEAT_INTERVAL

__all__ = ["AskedTrial", "Ledger", "StudyLock", "Told", "counts_towards_target", "driver_id", "trial_config"]
logger = logging.getLogger(__name__)
DRIVER_ATTR = "hpo:driver"
NOT_COUNTED = ("interrupted", "superseded", "claim")
RERUN = ("interrupted",)
CONFIG_ATTR = "config"  # the user attr holding what space(trial) returned (tuples as lists): see trial_config
MAX_ATTEMPTS = 3
"""Attempts of one config that may end interrupted (worker or driver killed) before the
trial counts as FAIL with reason ``interrupted_too_often``."""


def counts_towards_target(trial: FrozenTrial) -> bool:
    """COMPLETE, PRUNED and FAIL trials count, except attempts that are run again:
    interrupted ones (including those Optuna failed for a stale heartbeat, which carry no
    reason), withdrawn reruns (``superseded``) and failures that were retried."""
    if trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
        return True
    if trial.state != TrialState.FAIL:
        return False
    reason = trial.user_attrs.get("reason")
    return reason is not None and reason not in NOT_COUNTED and not trial.user_attrs.get("retried")


def trial_config(trial: FrozenTrial) -> dict[str, Any]:
    """The config a trial trains with: what ``space(trial)`` returned (:data:`CONFIG_ATTR`), else its sampled params."""
    return trial.user_attrs.get(CONFIG_ATTR) or dict(trial.params)


def _objective(value: Any) -> float | list[float]:
    """What ``study.tell`` takes: a float, or a list of floats for a multi-objective study."""
    return [float(v) for v in value] if isinstance(value, (list, tuple)) else float(value)


def _values(value: Any) -> list[float]:
    return [float(v) for v in value] if isinstance(value, (list, tuple)) else [float(value)]


T = TypeVar("T")


def _write(call: Callable[[], T]) -> T:
    return retry_transient(lambda: retry_when_locked(call), what="writing the study")


@dataclass
class AskedTrial:
    number: int
    params: dict[str, Any]
    """What ``space(trial)`` returned: what the trial trains with."""
    trial: optuna.Trial
    reported: dict[int, float] = field(default_factory=dict)
    attrs: dict[str, Any] = field(default_factory=dict)
    attempt: int = 1
    """Which run of its config this is (``attempt`` user attr of a rerun, read at ask)."""


@dataclass(frozen=True)
class Told:
    """What :meth:`Ledger.tell` recorded."""

    state: TrialState
    reason: str | None
    again: bool = False
    """Enqueued to run again."""
    kept_as: int | None = None
    """The trial had been failed by a reclaimer: its result was kept as this new trial."""


class Ledger:
    """See the module docstring. ``space`` maps an Optuna trial to the trial's params."""

    def __init__(self, study: optuna.Study, space: Callable[[optuna.Trial], dict], *, target: int,
                 retries: int = 0, max_attempts: int = MAX_ATTEMPTS):
        self.study = study
        self.space = space
        self.target = target
        self.retries = retries
        self.max_attempts = max_attempts
        self.running: dict[int, AskedTrial] = {}
        self.abandoned: set[int] = set()
        """Trials of this process whose end could not be written: reclaimed like a dead driver's."""
        self.driver = driver_id()
        self.lock = StudyLock(study)
        storage = backend_of(study)
        url = getattr(storage, "url", None)
        enabled = url and getattr(storage, "get_heartbeat_interval", lambda: None)()
        self.heartbeats = Heartbeats(url, HEARTBEAT_INTERVAL, GRACE_PERIOD) if url and enabled else None

    # counting ---------------------------------------------------------------------
    def finished(self) -> int:
        return sum(1 for t in self.study.get_trials(deepcopy=False) if counts_towards_target(t))

    def others_running(self) -> int:
        """RUNNING trials of other drivers (live ones, or dead ones not reclaimed yet)."""
        return sum(1 for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                   if t.number not in self.running)

    def claim(self) -> AskedTrial | None:
        """A new trial if the study is short of ``target`` (counting every process's
        running trials), else None. Raises what ``space`` raises, after failing the trial."""
        with self.lock:
            if self.taken() >= self.target:
                return None
            return self._ask()

    def taken(self) -> int:
        """Trials that count towards the target (:func:`counts_towards_target`) plus running ones,
        of every process: one query on a database, else counted from the trials."""
        storage = backend_of(self.study)
        if getattr(storage, "engine", None) is not None:
            return count_taken(storage.engine, study_id(self.study))
        return sum(1 for t in self.study.get_trials(deepcopy=False)
                   if counts_towards_target(t) or t.state == TrialState.RUNNING)

    def _ask(self) -> AskedTrial:
        """Ask, sample ``space``, then record the config, the driver and a first heartbeat in one
        transaction (all under the study lock, so no reclaimer sees the trial half-claimed; a
        claimer that dies before that write leaves a trial without a heartbeat, which a reclaim
        fails). Any error on the way fails the trial (reason ``space`` when ``space`` raised,
        else ``claim``, which does not count) and is raised: a claim never leaves a RUNNING trial."""
        trial = ask(self.study)
        step = "space"
        try:
            params = self.space(trial)
            step = "claim"
            config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in params.items()}
            _write(partial(write_trial_attrs, self.study, trial_id(trial), {CONFIG_ATTR: config},
                           {DRIVER_ATTR: self.driver}, heartbeat=self.heartbeats is not None))
        except Exception as error:
            self._fail_claim(trial, step, error)
            raise
        asked = AskedTrial(trial.number, params, trial, attempt=int(trial.user_attrs.get("attempt", 1)))
        self.running[trial.number] = asked
        if self.heartbeats is not None:
            self.heartbeats.add(trial_id(trial))
        return asked

    def _fail_claim(self, trial: optuna.Trial, reason: str, error: Exception) -> None:
        """FAIL a trial whose claim went wrong; if even that fails, a later reclaim does it."""
        try:
            _write(lambda: trial.set_user_attr("reason", reason))
            _write(lambda: trial.set_user_attr("error", f"{type(error).__name__}: {error}"[:2000]))
            _write(lambda: self.study.tell(trial, state=TrialState.FAIL, skip_if_finished=True))
        except Exception:  # noqa: BLE001 - the claim's own error is the one to raise
            logger.warning("hpo: trial %s could not be failed after its claim went wrong; a reclaim fails it",
                           trial.number, exc_info=True)
            self.abandoned.add(trial.number)

    # while running ------------------------------------------------------------------
    def record_intermediate(self, number: int, step: int, value: float) -> None:
        """Record the objective at ``step`` as the trial's intermediate value (once per step; NaN and inf are kept as they are)."""
        asked = self.running[number]
        if step not in asked.reported:
            asked.reported[step] = float(value)
            try:
                _write(lambda: asked.trial.report(float(value), step))
            except UpdateFinishedTrialError:
                pass  # failed by a reclaimer meanwhile: the value is kept here for tell (see _keep_late)

    def set_attrs(self, number: int, attrs: dict[str, Any]) -> None:
        """User attrs on a running trial, those that changed, in one write."""
        asked = self.running[number]
        changed = {key: value for key, value in attrs.items() if asked.attrs.get(key) != value}
        if changed:
            try:
                _write(partial(write_trial_attrs, self.study, trial_id(asked.trial), changed))
            except UpdateFinishedTrialError:
                pass  # failed by a reclaimer meanwhile: tell keeps the attrs with the result
            asked.attrs.update(changed)

    def close(self) -> None:
        """Stop the heartbeat thread (after the last trial ended)."""
        if self.heartbeats is not None:
            self.heartbeats.stop()

    # the end ------------------------------------------------------------------------
    def tell(self, number: int, state: TrialState, value: float | list[float] | None = None, reason: str | None = None,
             error: str | None = None, attrs: dict[str, Any] | None = None, *, crashed: bool = True) -> Told:
        """Record the trial's end: COMPLETE with ``value`` (a list: one per objective), PRUNED (Optuna keeps the last
        intermediate value) or FAIL with ``reason``/``error`` user attrs. Interrupted trials
        (within ``max_attempts``) and failed ones (within ``retries``) are enqueued again.
        An interrupted trial that did not crash (``crashed=False``: Ctrl-C stopped it) is
        enqueued again as the same attempt: only crashes count towards ``max_attempts``.
        A trial a reclaimer failed meanwhile keeps its result as a new trial (``kept_as``)."""
        asked = self.running.pop(number)
        if self.heartbeats is not None:
            self.heartbeats.discard(trial_id(asked.trial))
        try:
            return self._tell(asked, state, value, reason, error, attrs, crashed)
        except Exception:
            self.abandoned.add(number)  # a later reclaim (ours or another's) fails and re-queues it
            raise

    def _tell(self, asked: AskedTrial, state: TrialState, value: float | list[float] | None, reason: str | None,
              error: str | None, attrs: dict[str, Any] | None, crashed: bool = True) -> Told:
        trial = asked.trial
        attempt = asked.attempt  # no read first: a trial finished meanwhile refuses the first write below
        if state == TrialState.FAIL and reason in RERUN and crashed and attempt >= self.max_attempts:
            reason = "interrupted_too_often"
            error = f"interrupted {attempt} times (a worker or driver died each time); not run again"
        again = state == TrialState.FAIL and (reason in RERUN or (reason != "interrupted_too_often"
                                                                  and attempt <= self.retries))
        values = {**(attrs or {}), "reason": reason, "error": error[:4000] if error else None,
                  "retried": True if again and reason not in RERUN else None}
        try:
            _write(partial(write_trial_attrs, self.study, trial_id(trial),
                           {key: attr for key, attr in values.items() if attr is not None}))
            if state == TrialState.COMPLETE:
                _write(lambda: tell_without_readback(self.study, trial, _objective(value)))
            else:
                _write(lambda: tell_without_readback(self.study, trial, state=state))
        except (UpdateFinishedTrialError, ValueError):  # Optuna's tell says "Cannot tell a FAIL trial."
            frozen = self._frozen(trial)
            if not frozen.state.is_finished():
                raise
            if frozen.state == state and frozen.user_attrs.get("reason") == reason:
                return Told(state, reason, again=False)  # our own write, retried after a lost answer
            return self._keep_late(asked, frozen, state, value, reason, attrs)
        if again:
            self._enqueue_again(self._frozen(trial), counted=crashed or reason not in RERUN)
        return Told(state, reason, again=again)

    def _keep_late(self, asked: AskedTrial, frozen: FrozenTrial, state: TrialState, value: float | list[float] | None,
                   reason: str | None, attrs: dict[str, Any] | None) -> Told:
        """The trial was failed by a reclaimer while it still ran here. A result (COMPLETE,
        PRUNED) is kept as a new trial with the same params, and the rerun the reclaimer
        queued is withdrawn if it has not started; a failure needs nothing (it reruns)."""
        if state not in (TrialState.COMPLETE, TrialState.PRUNED):
            return Told(frozen.state, frozen.user_attrs.get("reason") or "interrupted")
        intermediate = {**frozen.intermediate_values, **asked.reported}
        user_attrs = {**{k: v for k, v in frozen.user_attrs.items() if k not in ("reason", "error", "retried")},
                      **(attrs or {}), "late_result_of": frozen.number,
                      **({"reason": reason} if reason and reason != "pruned" else {})}
        if state == TrialState.PRUNED:
            user_attrs["reason"] = "pruned"
        new = optuna.trial.create_trial(
            state=state, values=_values(value) if state == TrialState.COMPLETE else None, params=frozen.params,
            distributions=frozen.distributions, intermediate_values=intermediate, user_attrs=user_attrs,
            system_attrs={DRIVER_ATTR: self.driver},
        )
        with self.lock:
            _write(lambda: self.study.add_trial(new))
            kept = max(t.number for t in self.study.get_trials(deepcopy=False)
                       if t.user_attrs.get("late_result_of") == frozen.number)
            for rerun in self.study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
                if rerun.user_attrs.get("retry_of") == frozen.number:
                    self._withdraw(rerun, kept)
        logger.warning("hpo: trial %s had been failed as interrupted while it still ran here; its result is "
                       "kept as trial %s", frozen.number, kept)
        return Told(state, reason, kept_as=kept)

    def _withdraw(self, trial: FrozenTrial, kept: int) -> None:
        storage = storage_of(self.study)
        try:
            _write(lambda: storage.set_trial_user_attr(trial_id(trial), "reason", "superseded"))
            _write(lambda: storage.set_trial_user_attr(trial_id(trial), "superseded_by", kept))
            _write(lambda: storage.set_trial_state_values(trial_id(trial), TrialState.FAIL))
        except UpdateFinishedTrialError:
            pass

    def _frozen(self, trial: optuna.Trial) -> FrozenTrial:
        return retry_transient(lambda: storage_of(self.study).get_trial(trial_id(trial)), what="reading the study")

    def _enqueue_again(self, trial: FrozenTrial, counted: bool = True) -> None:
        """Queue ``trial``'s params to run again, as its next attempt (``counted``) or the same one."""
        attempt = int(trial.user_attrs.get("attempt", 1))
        _write(lambda: self.study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number,
                                                                          "attempt": attempt + (1 if counted else 0)},
                                                skip_if_exists=False))

    def reclaim(self) -> list[int]:
        """Under the study lock, fail (reason ``interrupted``) the RUNNING trials of dead
        drivers and enqueue again those this call failed; returns their numbers. Safe to
        call from every process at any time; never fails a live driver's trial."""
        reclaimed = []
        with self.lock:
            stale = set(self._stale_trial_ids())
            running = [t for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                       if t.number not in self.running]
            # Claims record the driver and a first heartbeat under this lock: a RUNNING trial
            # without a heartbeat now is one whose claimer died in the middle of claiming it.
            orphans = {trial_id(t) for t in running} - self._with_heartbeat([trial_id(t) for t in running])
            for trial in running:
                driver = trial.system_attrs.get(DRIVER_ATTR)
                if trial.number not in self.abandoned and trial_id(trial) not in orphans:
                    if driver and known_alive(driver):
                        continue
                    if not ((driver and driver_is_dead(driver)) or trial_id(trial) in stale):
                        continue
                attempt = int(trial.user_attrs.get("attempt", 1))
                reason = "interrupted" if attempt < self.max_attempts else "interrupted_too_often"
                storage = storage_of(self.study)
                try:
                    _write(partial(storage.set_trial_user_attr, trial_id(trial), "reason", reason))
                    _write(partial(storage.set_trial_state_values, trial_id(trial), TrialState.FAIL))
                except UpdateFinishedTrialError:
                    continue  # it ended (or another process reclaimed it) meanwhile
                if reason == "interrupted":
                    self._enqueue_again(trial)
                reclaimed.append(trial.number)
        return sorted(reclaimed)

    def _with_heartbeat(self, trial_ids: list[int]) -> set[int]:
        """Those of ``trial_ids`` that have a heartbeat row (all of them when heartbeats are off)."""
        storage = backend_of(self.study)
        if not trial_ids or not getattr(storage, "get_heartbeat_interval", lambda: None)():
            return set(trial_ids)
        import sqlalchemy

        query = sqlalchemy.text("SELECT trial_id FROM trial_heartbeats WHERE trial_id IN :ids").bindparams(
            sqlalchemy.bindparam("ids", expanding=True))

        def read() -> set[int]:
            with storage.engine.connect() as connection:
                return {row[0] for row in connection.execute(query, {"ids": trial_ids})}

        return retry_transient(read, what="reading heartbeats")

    def _stale_trial_ids(self) -> list[int]:
        """Trials whose heartbeat is older than the grace period (Optuna's own query)."""
        storage = backend_of(self.study)
        if not getattr(storage, "get_heartbeat_interval", lambda: None)():
            return []
        return retry_transient(lambda: stale_trial_ids(self.study), what="reading heartbeats")


def count_taken(engine: Any, study_id: int) -> int:
    """:meth:`Ledger.taken` on an Optuna RDB storage's database, as one query: RUNNING, COMPLETE
    and PRUNED trials, and the FAIL trials :func:`counts_towards_target` counts (a ``reason`` user
    attr other than those of :data:`NOT_COUNTED`, and not ``retried``)."""
    import sqlalchemy

    query = sqlalchemy.text(
        "SELECT COUNT(*) FROM trials t WHERE t.study_id = :study AND ("
        "t.state IN ('RUNNING', 'COMPLETE', 'PRUNED') OR (t.state = 'FAIL'"
        " AND EXISTS (SELECT 1 FROM trial_user_attributes a WHERE a.trial_id = t.trial_id"
        "  AND a.key = 'reason' AND a.value_json NOT IN :not_counted)"
        " AND NOT EXISTS (SELECT 1 FROM trial_user_attributes r WHERE r.trial_id = t.trial_id"
        "  AND r.key = 'retried' AND r.value_json = 'true')))"
    ).bindparams(sqlalchemy.bindparam("not_counted", expanding=True))
    not_counted = [json.dumps(reason) for reason in (*NOT_COUNTED, None)]
    with engine.connect() as connection:
        return int(connection.execute(query, {"study": study_id, "not_counted": not_counted}).scalar_one())
