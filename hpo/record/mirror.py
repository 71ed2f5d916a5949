"""What a trial's MLflow run shows, and bringing the runs in line with the study.

A trial's run is written twice over, by two paths that must agree: live, by the driver's
:class:`~hpo.record.recorder.Recorder` (``next_trial`` opens it, ``on_info`` adds what the
worker resolved, ``on_end`` closes it), and from the study (:func:`mirror_gaps`, after a driver
died or MLflow refused a write: :func:`trial_end`). Both build the run's params with
:func:`run_params` and its ``hpo.reason`` with :func:`shown_reason`, so a run filled from the
study holds what the live one would have.

A trial's params, from ``space()`` to the run: ``space(trial)`` returns the config the trial
trains with (``AskedTrial.params``; the study keeps it as the ``config`` user attr,
:func:`hpo.record.ledger.trial_config`); Optuna keeps the sampled values (``trial.params``);
the worker reports what it resolved (device, precision, target_modules, ...: scalar user
attrs outside :data:`BOOKKEEPING_ATTRS`); the built-in recipe's full job (defaults filled in)
comes from ``job_params(config)``. :func:`run_params` merges them, one rule for both paths.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from hpo.record.ledger import trial_config
from hpo.record.study import GRACE_PERIOD
from hpo.record.sweep_tracker import SweepTracker, TrialEnd, run_status
from hpo.record.tracking import TAG_STATE

if TYPE_CHECKING:
    import optuna
    from mlflow.entities import Run
    from optuna.trial import FrozenTrial

JobParams = Callable[[dict[str, Any]], dict[str, Any]]
"""A trial's config -> the full job a worker trains with (defaults filled in), for its MLflow run."""

KEPT_AS_TAG = "hpo.kept_as_trial"
"""On the run of a trial another process failed while it ran here: the trial its result was kept as."""
INTERRUPTED = ("interrupted", "interrupted_too_often")
"""The reasons of a trial whose worker or driver died (or Ctrl-C stopped it): its run shows the reason alone."""
# Trial attributes the recipe reports among its metrics and the study keeps as user attrs.
ATTRS = ("micro_batch_size", "grad_accum", "peak_memory_mb", "peak_reserved_memory_mb", "resident_memory_mb")
# ... and those kept as fractional numbers: seconds from the trial's start on its worker to the start of its
# first optimizer step; the training's tokens per second and, on a CUDA GPU, its model FLOPs utilisation.
SECONDS_ATTRS = ("trial_setup_seconds", "tokens_per_second", "mfu")
# User attrs that are hpo's bookkeeping; a trial's other scalar user attrs are what its worker
# resolved (device, precision, ...), which its MLflow run holds as params.
BOOKKEEPING_ATTRS = frozenset({
    "reason", "error", "retried", "retry_of", "attempt", "warm_start", "late_result_of", "superseded_by",
    "last_step", "pruned_at", "stopped_early_at", "config", "curves", "resources", *ATTRS, *SECONDS_ATTRS,
})


def run_params(sampled: dict[str, Any], config: dict[str, Any], job_params: JobParams | None = None, *,
               info: dict[str, Any] | None = None, from_study: bool = False) -> dict[str, Any]:
    """A trial's MLflow params: each source over the ones before it -- what the worker resolved
    (``info``), the full job (``job_params(config)``: the built-in recipe's, defaults filled in),
    the sampled params (``sampled``, Optuna's values), the other names ``space()`` returned
    (``config``). A live run opens before the worker's ``info`` is known; it then adds only the
    names it does not show yet (:meth:`~hpo.record.recorder.Recorder.on_info`), the same rule.

    ``from_study``: the config was read back from the study, maybe written by another version of
    hpo; one ``job_params`` cannot rebuild leaves the job out (the sampled params still go).
    Otherwise its error is raised."""
    try:
        job = job_params(config) if job_params is not None else {}
    except Exception:  # noqa: BLE001 - see from_study
        if not from_study:
            raise
        job = {}
    return {**(info or {}), **job, **sampled, **{k: v for k, v in config.items() if k not in sampled}}


def shown_reason(state: str, reason: str | None, error: str | None, pruned_at: int | None) -> str | None:
    """The run's ``hpo.reason`` (and the live display's) for a trial that ended in Optuna ``state``
    with the ``reason``/``error`` the study holds: an interrupted trial's reason (one without a
    reason too: Optuna failed it for a stale heartbeat); a failed one's error; a pruned one's step."""
    if reason in INTERRUPTED or (state == "FAIL" and reason is None):
        return reason or "interrupted"
    if state == "FAIL":
        return error or reason
    if state == "PRUNED":
        return f"stopped early by the pruner at step {pruned_at}"
    return reason


def mirror_gaps(study: optuna.Study, tracker: SweepTracker, *, metric: str, job_params: JobParams | None = None,
                only: set[int] | None = None, grace: float = GRACE_PERIOD) -> list[int]:
    """Bring the study's MLflow trial runs in line with the study (the truth) after a driver
    died with writes it had not made yet, or could not make them (:mod:`hpo.record.writer`: the
    store was down, or refused a write): every finished trial whose run is missing or disagrees
    with the study (:func:`run_agrees`: still RUNNING, another status or ``hpo.state``, no or
    another ``hpo.objective``, a sampled param or a curve missing) gets its run -- made if
    missing, with the params and the metric curves the study keeps -- tagged and closed with its
    state, so no run stays RUNNING for a trial that is not running, nor closed with the wrong
    state or without its values.

    Trials of a live driver are left to it, and so are those another machine's driver
    finished less than ``grace`` seconds ago. ``only``: just these trials, whatever their
    driver and their run's status (this process's own trials whose writes failed). Returns
    the numbers of the trials whose runs were written."""
    from hpo.record.ledger import DRIVER_ATTR
    from hpo.record.liveness import driver_is_dead, known_alive

    runs = tracker.trial_run_index()
    trials = study.get_trials(deepcopy=False)
    by_number = {trial.number: trial for trial in trials}
    written = []
    for trial in trials:
        run = runs.get(trial.number)
        if not trial.state.is_finished() or (only is not None and trial.number not in only):
            continue
        if run is None and (trial.user_attrs.get("late_result_of") is not None
                            or trial.user_attrs.get("reason") in ("superseded", "space")):
            continue  # never ran as itself: its result is on the run of the trial it names
        kept = run.data.tags.get(KEPT_AS_TAG, "") if run is not None else ""
        source = by_number.get(int(kept), trial) if kept.isdigit() else trial  # the run holds the kept result
        end = trial_end(source, metric, job_params)
        if only is None:
            if run is not None and run_agrees(run, source, end):
                continue
            driver = trial.system_attrs.get(DRIVER_ATTR)
            if driver and known_alive(driver):
                continue
            ended = trial.datetime_complete.timestamp() if trial.datetime_complete else 0.0
            judged_dead = trial.user_attrs.get("reason") in INTERRUPTED
            if not (judged_dead or (driver and driver_is_dead(driver))) and time.time() - ended < grace:
                continue  # another machine's driver may still be writing it
        tracker.fill_trial(trial.number, run, end)
        written.append(trial.number)
    numbers = {trial.number for trial in trials}
    for number, run in runs.items():  # a run whose trial the study does not hold
        if only is None and number not in numbers and run.info.status == "RUNNING":
            tracker.fill_trial(number, run, TrialEnd("FAIL", "interrupted"))
            written.append(number)
    return sorted(written)


def run_agrees(run: Run, trial: FrozenTrial, end: TrialEnd) -> bool:
    """Whether a trial's MLflow ``run`` holds what the study says of the finished ``trial``
    (``end``, :func:`trial_end`): closed with the status and ``hpo.state`` of its state, the
    ``hpo.objective`` of a COMPLETE trial, every sampled param and every curve the study keeps."""
    tags = run.data.tags
    if run.info.status != run_status(end.state, end.reason) or tags.get(TAG_STATE) != end.state:
        return False
    if isinstance(end.value, (int, float)) and tags.get("hpo.objective") != repr(float(end.value)):
        return False
    if any(str(key) not in run.data.params for key, value in trial.params.items() if value is not None):
        return False
    return all(key in run.data.metrics for key, points in end.curves.items()
               if any(isinstance(value, (int, float)) and not isinstance(value, bool) for _, value in points))


def trial_end(trial: FrozenTrial, metric: str, job_params: JobParams | None) -> TrialEnd:
    """What a finished Optuna trial's MLflow run should hold (as :meth:`Recorder.on_end` writes it)."""
    attrs = trial.user_attrs
    state = trial.state.name
    info = {k: v for k, v in attrs.items()
            if k not in BOOKKEEPING_ATTRS and isinstance(v, (str, int, float, bool))}
    params = run_params(trial.params, trial_config(trial), job_params, info=info, from_study=True)
    curves: dict[str, list[tuple[int, float]]] = {k: [(int(s), v) for s, v in points]
                                                  for k, points in (attrs.get("curves") or {}).items()}
    if trial.intermediate_values and metric not in curves:
        curves[metric] = sorted(trial.intermediate_values.items())
    last = attrs.get("last_step") or (max(trial.intermediate_values) if trial.intermediate_values else 0)
    for key in (*ATTRS, *SECONDS_ATTRS):
        if key in attrs and key not in curves:
            curves[key] = [(int(last), attrs[key])]
    single = trial.values[0] if state == "COMPLETE" and trial.values and len(trial.values) == 1 else None
    return TrialEnd(state, shown_reason(state, attrs.get("reason"), attrs.get("error"), attrs.get("pruned_at")),
                    value=single, params=params, curves=curves,
                    started=int(trial.datetime_start.timestamp() * 1000) if trial.datetime_start else None,
                    ended=int(trial.datetime_complete.timestamp() * 1000) if trial.datetime_complete else None)
