"""The one module that reads Optuna's private attributes.

Optuna's public API gives no handle on the storage behind a study or a trial, and some of
its public calls do more than hpo can afford. Where hpo needs either, it comes here:

* a trial's id in the storage, to write its system attrs, heartbeats and state by id (the
  ledger's claim and reclaim, :mod:`hpo.record.liveness`), or to find its heartbeat row;
* the study's storage and id, for study system attrs (``hpo:runs``, warm start's done mark)
  and the one-query trial count on the database (:func:`hpo.record.ledger.count_taken`);
* the storage behind Optuna's cache wrapper (its URL and SQLAlchemy engine: the study lock);
* the trials whose heartbeat is stale, by Optuna's own query, without failing them;
* a trial's attrs (user and system) and its first heartbeat written in one transaction, where
  Optuna commits each on its own (:func:`write_trial_attrs`);
* ``ask`` without reading the study's trials when no trial waits in its queue (``Study.ask``
  reads every unfinished trial, ~7 queries, to look for a WAITING one; one query says whether
  there is any);
* ``tell`` without reading the trial back (``Study.tell`` returns a FrozenTrial hpo never uses:
  7 queries per trial);
* the trials as Optuna's own samplers read them while sampling (one read per trial, cached for
  the sampling thread), and a study that shows them fewer (:class:`StudyView`), for the
  samplers that wrap them (:mod:`hpo.record.samplers`);
* whether a distribution holds a value (warm start keeps the params of an earlier study that
  fit this one's space).

Each is one line here, checked against Optuna 5.1: an Optuna upgrade that renames one breaks
this file, nowhere else. ``tests/test_boundaries.py`` refuses these attributes anywhere else
in ``hpo/``.
"""

from __future__ import annotations

import copy
from collections.abc import Container, Mapping
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial, TrialState

__all__ = ["StudyView", "ask", "backend_of", "cached_trials", "contains", "stale_trial_ids", "storage_of",
           "study_id", "tell_without_readback", "trial_id", "write_trial_attrs"]


def storage_of(study: optuna.Study) -> BaseStorage:
    """The storage the study reads and writes (Optuna's cache wrapper around an RDB storage)."""
    return study._storage


def backend_of(study: optuna.Study) -> Any:
    """The storage behind Optuna's cache wrapper (``load_study`` wraps an RDBStorage): its
    ``url`` and ``engine``; the storage itself when it is not wrapped."""
    wrapped = study._storage
    return getattr(wrapped, "_backend", wrapped)


def study_id(study: optuna.Study) -> int:
    """The study's id in its storage (the ``study_id`` column of Optuna's tables)."""
    return study._study_id


def trial_id(trial: optuna.Trial | FrozenTrial) -> int:
    """The trial's id in its storage (not its number: ids count across every study of the storage)."""
    return trial._trial_id


def stale_trial_ids(study: optuna.Study) -> list[int]:
    """Ids of the study's RUNNING trials whose heartbeat is older than the storage's grace
    period (Optuna's own query, which ``fail_stale_trials`` runs before failing them)."""
    return backend_of(study)._get_stale_trial_ids(study._study_id)


def ask(study: optuna.Study) -> optuna.Trial:
    """``study.ask()``; on a database with no WAITING trial in the study, without the read of every
    unfinished trial ``Study.ask`` makes to look for one (its queue; ~7 queries on every ask): one
    query answers whether any waits, then the statements ``Study.ask`` runs when none does. A
    trial enqueued after that query waits for the next ask, as one enqueued after ``Study.ask``'s
    read would."""
    storage = backend_of(study)
    if not isinstance(storage, optuna.storages.RDBStorage):
        return study.ask()
    import sqlalchemy

    query = sqlalchemy.text("SELECT 1 FROM trials WHERE study_id = :study AND state = 'WAITING' LIMIT 1")
    with storage.engine.connect() as connection:
        if connection.execute(query, {"study": study._study_id}).first() is not None:
            return study.ask()
    study._thread_local.cached_all_trials = None  # what Study.ask does first: the trials are read again
    return optuna.Trial(study, study._storage.create_new_trial(study._study_id))


def tell_without_readback(study: optuna.Study, trial: optuna.Trial, value: float | list[float] | None = None,
         state: TrialState | None = None) -> None:
    """``study.tell(trial, value, state)`` without reading the trial back for the FrozenTrial
    ``Study.tell`` returns (a read of the trial, 7 queries, per trial; hpo uses none of it):
    the function ``Study.tell`` calls, with the same checks, sampler hook and write."""
    from optuna.study._tell import _tell_with_warning

    _tell_with_warning(study, trial, value, state)


def write_trial_attrs(study: optuna.Study, trial: int, user: Mapping[str, Any] | None = None,
                      system: Mapping[str, Any] | None = None, *, heartbeat: bool = False) -> None:
    """Set user and system attrs of the trial whose id is ``trial`` (and, with ``heartbeat``,
    record its heartbeat), all or none: one transaction on a database, where Optuna's
    ``set_trial_user_attr``, ``set_trial_system_attr`` and ``record_heartbeat`` commit one each
    (the driver wrote 5 to 9 per trial). Other storages get those calls one by one. Raises what
    Optuna raises (``UpdateFinishedTrialError`` for a finished trial)."""
    user, system = user or {}, system or {}
    if not (user or system or heartbeat):
        return
    storage = backend_of(study)
    if not isinstance(storage, optuna.storages.RDBStorage):
        for key, value in system.items():
            storage.set_trial_system_attr(trial, key, value)
        for key, value in user.items():
            storage.set_trial_user_attr(trial, key, value)
        if heartbeat:
            storage.record_heartbeat(trial)
        return
    import sqlalchemy
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session

    with _create_scoped_session(storage.scoped_session) as session:
        for kind, attrs in ((models.TrialSystemAttributeModel, system), (models.TrialUserAttributeModel, user)):
            for key, value in attrs.items():
                storage._set_trial_attr_without_commit(session, kind, trial, key, value)
        if heartbeat:  # RDBStorage.record_heartbeat's own statements
            beat = models.TrialHeartbeatModel.where_trial_id(trial, session, True)
            if beat is None:
                session.add(models.TrialHeartbeatModel(trial_id=trial))
            else:
                beat.heartbeat = session.execute(sqlalchemy.func.now()).scalar_one()


def cached_trials(study: optuna.Study, states: Container[TrialState] | None = None) -> list[FrozenTrial]:
    """The study's trials (of ``states``), by number, not copied, read once per sampled trial:
    what Optuna's samplers read while sampling (``use_cache=True``: a cache of the calling
    thread's, emptied at each ``ask`` and ``tell``)."""
    return study._get_trials(deepcopy=False, states=states, use_cache=True)


def contains(distribution: BaseDistribution, value: Any) -> bool:
    """Whether ``value`` (as ``suggest_*`` returns it) lies in ``distribution``: inside its range
    and on its step, or one of its choices. Raises ValueError or TypeError for a value of
    another kind (``to_internal_repr`` refuses it)."""
    return bool(distribution._contains(distribution.to_internal_repr(value)))


class StudyView:
    """A study whose trials are ``trials`` (sorted by number); all else is the study's. Optuna's
    samplers read trials through ``Study._get_trials``, others through ``get_trials``."""

    def __init__(self, study: optuna.Study, trials: list[FrozenTrial]):
        self._study = study
        self._trials = trials

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)

    def _get_trials(self, deepcopy: bool = True, states: Any = None, use_cache: bool = False) -> list[FrozenTrial]:
        trials = [t for t in self._trials if states is None or t.state in states]
        return copy.deepcopy(trials) if deepcopy else trials

    def get_trials(self, deepcopy: bool = True, states: Any = None) -> list[FrozenTrial]:
        return self._get_trials(deepcopy, states)

    @property
    def trials(self) -> list[FrozenTrial]:
        return self._get_trials()
