"""Optuna: storage, samplers, study create/resume, and what a study holds (best trial,
Pareto front, states).

The Optuna study is the single source of truth for trials. Only the driver process
writes it, through the trial ledger (:class:`hpo.record.ledger.Ledger`): workers compute, the
driver asks, reports and tells. The sweep's record on the study is
:class:`hpo.record.sweep_record.SweepRecord`. Nothing here knows Ray or transformers.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from hpo.errors import HpoError
from hpo.record import optuna_access
from hpo.record.samplers import make_sampler  # noqa: F401 - the sweep builds its sampler as study.make_sampler
from hpo.record.sqlite import sqlite_file_lock
from hpo.record.stores import check_local, connect_once, retry_when_locked
from hpo.secrets import redact_url as redact
from hpo.secrets import scrub

if TYPE_CHECKING:
    from hpo.config import Direction

DEFAULT_STORAGE = "sqlite:///hpo.db"
# The driver records a heartbeat for every trial it runs; a trial whose heartbeat is older
# than GRACE_PERIOD belongs to a dead driver and is failed when a sweep (re)starts.
# Tests shrink both (HPO_HEARTBEAT_INTERVAL, HPO_GRACE_PERIOD) to stall a driver past the grace period quickly.
HEARTBEAT_INTERVAL = int(os.environ.get("HPO_HEARTBEAT_INTERVAL", "20"))
GRACE_PERIOD = int(os.environ.get("HPO_GRACE_PERIOD", "60"))

optuna.logging.set_verbosity(optuna.logging.WARNING)
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
# The driver records heartbeats itself (Ledger.heartbeat, Recorder.tick), so the storage's
# heartbeat works with ask/tell here, which Optuna warns it does not do on its own.
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")


def check_storage(url: str | None) -> None:
    """Make sure the storage can be opened, writing nothing (not even an SQLite file).

    Raises HpoError (password hidden) naming the URL and what to check.
    """
    url = url or DEFAULT_STORAGE
    if check_local(url, "--storage"):
        return
    try:
        connect_once(url)
    except Exception as error:  # noqa: BLE001 - drivers raise many types
        raise _storage_error(url, error) from None


def open_storage(url: str | None, concurrency: int | None = None) -> optuna.storages.RDBStorage:
    """Connect to an SQLAlchemy URL (SQLite file by default, PostgreSQL, MySQL).

    SQLite gets a long busy timeout so several writers wait instead of failing with
    'database is locked'. A server database gets a connection pool sized for the sweep's
    ``concurrency`` (see :func:`pool_size`). Raises HpoError (password hidden) if the
    database is unreachable.
    """
    url = url or DEFAULT_STORAGE
    check_storage(url)
    engine_kwargs: dict[str, Any] = (
        {"connect_args": {"timeout": 120}} if url.startswith("sqlite")
        else {"pool_pre_ping": True, **pool_size(concurrency)}
    )
    # Several sweeps starting at once on a new database race to create its tables: take
    # turns on SQLite (a file lock beside it), retry elsewhere (the loser finds them made).
    for attempt in range(5):
        try:
            with sqlite_file_lock(url):
                return optuna.storages.RDBStorage(
                    url, engine_kwargs=engine_kwargs, heartbeat_interval=HEARTBEAT_INTERVAL, grace_period=GRACE_PERIOD
                )
        except Exception as error:  # noqa: BLE001 - drivers raise many types
            if attempt == 4 or not _is_creation_race(error):
                raise _storage_error(url, error) from None
            time.sleep(0.5 * (attempt + 1))
    raise AssertionError("unreachable")


def pool_size(concurrency: int | None) -> dict[str, int]:
    """SQLAlchemy pool settings for a driver running ``concurrency`` trials at once.

    The driver's writes are short, but a study-lock connection (held while claiming), the
    heartbeat writes of every running trial and each tell may overlap; SQLAlchemy's default
    (5 + 10 overflow) makes a wide sweep wait for connections. Keep one per running trial
    plus two, with as many again in overflow; recycle connections hourly so a nightly
    sweep does not reuse ones the server or a proxy closed while idle.
    """
    running = max(1, concurrency or 1)
    return {"pool_size": max(5, running + 2), "max_overflow": max(10, running), "pool_recycle": 3600}


def _is_creation_race(error: Exception) -> bool:
    text = f"{type(error).__name__} {error}"
    return any(word in text for word in ("IntegrityError", "UniqueViolation", "already exists", "duplicate key"))


def _storage_error(url: str, error: Exception) -> HpoError:
    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    return HpoError(
        f"--storage {redact(url)}: cannot open the study storage ({type(error).__name__}: {scrub(reason, url)[:300]}); "
        "check the URL, that the server runs, and the credentials"
    )


def create_or_resume(storage: optuna.storages.BaseStorage, name: str, directions: tuple[Direction, ...],
                     sampler: optuna.samplers.BaseSampler, metrics: tuple[str, ...] | None = None) -> optuna.Study:
    """The study ``name``, created if new. An existing study must have the same direction(s).

    ``metrics`` name the objectives (Optuna's metric names), so optuna-dashboard shows
    ``eval_accuracy`` rather than "Objective 0"; set on create and on resume. A
    multi-objective sweep gives several names and directions (``Sweep.metrics``, ``Sweep.directions``):
    the study then has several directions and keeps a Pareto front.
    """
    wanted = list(directions)
    try:
        existing = optuna.load_study(study_name=name, storage=storage, sampler=sampler)
    except KeyError:
        existing = optuna.create_study(study_name=name, storage=storage, sampler=sampler, directions=wanted,
                                       load_if_exists=True)
    held = [d.name.lower() for d in existing.directions]
    if held != wanted:
        raise HpoError(
            f"study {name!r} exists and {','.join(held)}s its objective{'s' if len(held) > 1 else ''}, but this "
            f"sweep {','.join(directions)}s; use another --study name"
        )
    names = list(metrics) if metrics else None
    if names and existing.metric_names != names:
        retry_when_locked(lambda: existing.set_metric_names(names))
    return existing


def is_multi_objective(study: optuna.Study) -> bool:
    return len(study.directions) > 1


def first_value(trial: FrozenTrial) -> float | None:
    """A trial's value, or the first objective's of a multi-objective trial (``trial.value``
    raises there); None if it has none."""
    return trial.values[0] if trial.values else None


def load(storage_url: str | None, name: str | None) -> optuna.Study:
    """An existing study; with no name, the only study in the storage."""
    storage = open_storage(storage_url)
    names = [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)]
    if name is None:
        if len(names) == 1:
            name = names[0]
        elif not names:
            raise HpoError(f"--storage {redact(storage.url)}: holds no study yet; run `hpo search MODULE` first")
        else:
            raise HpoError(f"--storage {redact(storage.url)}: holds several studies; pick one with --study ({', '.join(names)})")
    if name not in names:
        raise HpoError(f"no study {name!r} in {redact(storage.url)}; studies there: {', '.join(names) or 'none'}")
    return optuna.load_study(study_name=name, storage=storage)


def last_step(trial: FrozenTrial) -> int | None:
    return max(trial.intermediate_values) if trial.intermediate_values else None


def state_counts(study: optuna.Study) -> dict[str, int]:
    """Number of trials in each state, by Optuna state name."""
    counts: dict[str, int] = {}
    for trial in study.get_trials(deepcopy=False):
        counts[trial.state.name] = counts.get(trial.state.name, 0) + 1
    return counts


def best_summary(study: optuna.Study) -> dict[str, Any] | None:
    """The best COMPLETE trial as plain data (number, value, params, config, steps and, for a
    sweep with objective=best, the step of its best evaluation ``best_step``), or None.
    A multi-objective study has no single best trial: None (see :func:`pareto_front`)."""
    if is_multi_objective(study):
        return None
    complete = [(t.value, t) for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if t.value is not None and math.isfinite(t.value)]
    if not complete:
        return None
    pick = max if study.direction == optuna.study.StudyDirection.MAXIMIZE else min
    _, trial = pick(complete, key=lambda scored: scored[0])
    from hpo.record.sweep_record import SweepRecord

    record = SweepRecord.load(study)
    return {
        "study": study.study_name,
        "number": trial.number,
        "value": trial.value,
        "metric": record.metric if record else None,
        "params": trial.params,
        "config": trial.user_attrs.get("config", trial.params),
        "steps": last_step(trial),
        **({"best_step": trial.user_attrs["best_step"]} if "best_step" in trial.user_attrs else {}),
    }


def pareto_front(study: optuna.Study) -> list[dict[str, Any]]:
    """The non-dominated COMPLETE trials of a study (Optuna's ``best_trials``), by number, as
    plain data: number, ``values`` by metric name, params, config, steps. A single-objective
    study's front is its best trial."""
    metrics = study.metric_names or [f"objective_{i}" for i in range(len(study.directions))]
    front = [t for t in study.best_trials if t.values and all(math.isfinite(v) for v in t.values)]
    return [{
        "study": study.study_name,
        "number": trial.number,
        "values": dict(zip(metrics, trial.values, strict=True)),
        "params": trial.params,
        "config": trial.user_attrs.get("config", trial.params),
        "steps": last_step(trial),
    } for trial in sorted(front, key=lambda t: t.number)]


def fail_reasons(study: optuna.Study) -> dict[str, int]:
    """How many trials failed for each reason (error, nan, oom, interrupted, ...)."""
    reasons: dict[str, int] = {}
    for trial in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
        reason = trial.user_attrs.get("reason", "unknown")
        reasons[reason] = reasons.get(reason, 0) + 1
    return reasons


def next_run_index(study: optuna.Study) -> int:
    """0 for the first sweep process on this study, then 1, 2, ... (call under the study lock)."""
    storage, study_id = optuna_access.storage_of(study), optuna_access.study_id(study)
    index = int(storage.get_study_system_attrs(study_id).get("hpo:runs", 0))
    storage.set_study_system_attr(study_id, "hpo:runs", index + 1)
    return index
