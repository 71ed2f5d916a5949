"""The driver's one writer: turns trial events into Optuna, MLflow and progress updates.

Events arrive from the scheduler (Ray Tune, in its driver thread) as plain calls:
``next_trial`` -> ``on_result``* -> ``on_end``. Each is written to the Optuna study
first (the source of truth), then mirrored to MLflow, then shown. Knows neither Ray nor
transformers.

Whatever the Optuna write does, the trial's MLflow run is closed (never left RUNNING).
Transient storage and MLflow errors are retried with a bounded back-off; when asking for
trials still fails, the sweep stops asking (``stop_reason``) and ends short, which the
command reports with a non-zero exit.
"""

from __future__ import annotations

import enum
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from optuna.trial import TrialState

from hpo.record import mirror
from hpo.record.ledger import AskedTrial, Ledger, Told
from hpo.record.mirror import KEPT_AS_TAG, JobParams, run_params, shown_reason
from hpo.record.stores import retry_transient
from hpo.record.study import GRACE_PERIOD
from hpo.record.sweep_tracker import SweepTracker

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outcome:
    """How a trial ended, as the scheduler saw it."""

    kind: str
    """``complete``, ``pruned``, ``fail`` or ``interrupted``."""
    reason: str | None = None
    """For ``fail``: error, nan, oom, space. For ``complete``: early_stopped, when the
    trial's own early stopping (patience) ended it before max_steps."""
    error: str | None = None
    """The exception's class and message, for ``fail``."""
    step: int | None = None
    """The step at which the trial was stopped early (``pruned``, or ``early_stopped``)."""
    attrs: dict[str, Any] = field(default_factory=dict)
    """User attrs recorded with the end, in the same write (the resources the trial held)."""


class NoTrial(enum.Enum):
    """What :meth:`Recorder.next_trial` answers when it starts no trial."""

    WAIT = "wait"
    """Not now: trials run here, or in another live process, while the study is short; ask again."""
    DONE = "done"
    """No more: the study is full, --timeout passed, or the sweep stopped asking (``stop_reason``)."""
    ELSEWHERE = "elsewhere"
    """Nothing to start here: other live processes' running trials (with this process's own
    running ones) fill the study. Hold no resources meanwhile: the scheduler ends its run once
    this process's own trials end (so idle workers kept for reuse give their slots back at
    once, e.g. to the other processes' trials waiting for them), then
    :meth:`Recorder.wait_for_a_trial` waits on the study."""


class Display(Protocol):
    def trial_started(self, number: int, params: dict[str, Any]) -> None: ...
    def trial_result(self, number: int, step: int, value: float | None) -> None: ...
    def trial_ended(self, number: int, state: str, value: float | None, reason: str | None) -> None: ...
    def tick(self) -> None: ...


class Recorder:
    """Owns the sweep's bookkeeping while Ray runs trials.

    The ledger's ``target`` is the number of finished trials the study should hold; a
    sweep stops asking for trials once the study has them (with the trials running in any
    process), or after ``deadline`` (running trials then finish). While other processes'
    trials fill the study it waits (they may finish, or their driver may die and reclaim
    re-queues them here) instead of ending.
    """

    POLL = 1.0
    """Seconds between looks at the study while waiting for other processes' trials."""
    ATTRS = mirror.ATTRS  # metrics the study keeps as the trial's user attrs (ints) ...
    SECONDS_ATTRS = mirror.SECONDS_ATTRS  # ... and as fractional numbers
    # Curves kept on the Optuna trial (user attr "curves") for `hpo diagnose` and reports (every eval_* too):
    # the steps' loss and gradient norm, and the retain set's scores (hpo.train.training, hpo.train.answers).
    CURVES = ("train_loss", "eval_loss", "learning_rate", "train_loss_max", "grad_norm", "grad_norm_max",
              "retain_loss", "retain_score", "retain_loss_before", "retain_score_before")

    def __init__(self, ledger: Ledger, tracker: SweepTracker, display: Display, *, metrics: tuple[str, ...],
                 deadline: float | None, job_params: JobParams | None = None,
                 objective: str = "last", direction: str = "maximize"):
        self.job_params = job_params
        """params -> the full job a worker trains with (defaults filled in), for the MLflow run."""
        self.ledger = ledger
        self.tracker = tracker
        self.display = display
        self.metrics = metrics
        """The objectives (``Sweep.metrics``): one, or several (a multi-objective study: Optuna takes no
        intermediate values there, so only the curves user attr and MLflow keep them)."""
        self.objective = objective
        """``last``: a COMPLETE trial's value is its last evaluation of ``metric``; ``best``: its best
        one (by ``direction``), whose step becomes the ``best_step`` user attr and MLflow metric."""
        self.direction = direction
        self.best: dict[int, tuple[float, int]] = {}
        """Each running trial's best finite ``metric`` so far and its step (the earliest on ties)."""
        self.deadline = deadline
        self.started = 0
        self.interrupted: list[int] = []
        self.last: dict[int, dict[str, float]] = {}
        self.curves: dict[int, dict[str, list[list[float]]]] = {}
        self._steps: dict[int, int] = {}
        self._last_reclaim = time.monotonic()
        self._last_claim = 0.0
        self._waiting_since: float | None = None
        self.elsewhere = False
        """The last answer of :meth:`next_trial` was ``ELSEWHERE`` (see :meth:`wait_for_a_trial`)."""
        self.done = False
        """The recorder said ``NoTrial.DONE``: the study is full, or --timeout passed (``timed_out``)."""
        self.timed_out = False
        self.stop_reason: str | None = None
        """Why the sweep stopped asking for trials, when it was an error (see :meth:`stop`)."""
        self.interrupt_requested = False
        """Ctrl-C (see :meth:`interrupt`): no new trial starts; the running ones end as interrupted."""
        self._said_interrupt = False
        self.kept: dict[int, int] = {}
        """Trials failed by another process while they ran here -> the trial keeping their result."""
        self._logged: dict[int, set[str]] = {}  # MLflow params of each running trial's run (they never change)

    def next_trial(self) -> AskedTrial | NoTrial:
        """The next trial to run, or :class:`NoTrial` ``WAIT`` (only this process's trials run
        while the study is short), ``ELSEWHERE`` (other live processes' trials fill it) or
        ``DONE``. Transient storage and MLflow errors are retried with a bounded back-off; what
        still fails is raised."""
        if self.stop_reason is not None or self.interrupt_requested:
            return NoTrial.DONE
        if self.deadline is not None and time.time() >= self.deadline:
            if self.ledger.running:
                return NoTrial.WAIT
            self.done = self.timed_out = True
            return NoTrial.DONE
        now = time.monotonic()
        if self._waiting_since is not None and now - self._last_claim < self.POLL:
            return NoTrial.ELSEWHERE  # waiting for other drivers' trials: poll the study, don't hammer it
        self._last_claim = now
        asked = retry_transient(self.ledger.claim, what="asking for the next trial")
        if asked is None:
            if not self.ledger.running and retry_transient(self.ledger.finished) >= self.ledger.target:
                self.done, self.elsewhere = True, False
                return NoTrial.DONE
            if retry_transient(self.ledger.others_running):
                # Another process's trials fill the study: they may finish (then the study
                # is done) or their driver may die (reclaim re-queues them, and we run them).
                # Meanwhile this process holds no worker it has nothing to run on.
                self._waiting_since = self._waiting_since or now
                self.elsewhere = True
                return NoTrial.ELSEWHERE
            self._waiting_since, self.elsewhere = None, False
            if self.ledger.running:
                return NoTrial.WAIT
            self.done = True
            return NoTrial.DONE
        self._waiting_since, self.elsewhere = None, False
        self.started += 1
        params = run_params(asked.trial.params, asked.params, self.job_params)  # the worker's info comes later
        self.tracker.start_trial(asked.number, params)  # written off this thread, in order (hpo.record.writer)
        self._logged[asked.number] = set(params)
        self.display.trial_started(asked.number, asked.params)
        if self.interrupt_requested:  # Ctrl-C came while this trial was claimed: it never runs
            self.on_end(asked.number, Outcome("interrupted"))
            return NoTrial.DONE
        return asked

    def wait_for_a_trial(self) -> AskedTrial | None:
        """After the scheduler's run ended on ``ELSEWHERE``: look at the study every ``POLL``
        seconds (reclaiming dead drivers' trials, redrawing the display, as :meth:`tick` does)
        until a trial can start here -- another process's trial failed, or its driver died and
        its trials were re-queued -- and return it (claimed: the next run must start it), or
        None once the study is full, --timeout passed or Ctrl-C came (``next_trial`` said DONE)."""
        while True:
            self.tick()
            asked = self.next_trial()
            if asked is NoTrial.DONE:
                return None
            if not isinstance(asked, NoTrial):
                return asked
            time.sleep(self.POLL)

    def stop(self, reason: str) -> None:
        """Ask for no more trials (running ones finish): ``reason`` is why the study ends short."""
        logger.warning("hpo: %s; no new trials start", reason)
        self.stop_reason = reason

    def interrupt(self) -> None:
        """Ctrl-C: from now on :meth:`next_trial` answers ``DONE`` and the scheduler stops the
        running trials, which end as interrupted (they run again on the next run). Only sets a
        flag, so a signal handler may call it at any point of the driver's loop."""
        self.interrupt_requested = True

    def on_result(self, number: int, step: int, metrics: dict[str, float]) -> None:
        """One evaluation of a running trial (deduplicated by step)."""
        if number not in self.ledger.running or self._steps.get(number, 0) >= step:
            return
        self._steps[number] = step
        self.last[number] = metrics
        curves = self.curves.setdefault(number, {})
        for key, metric in metrics.items():
            if key in self.CURVES or key in self.metrics or key.startswith("eval_"):
                curves.setdefault(key, []).append([step, metric])
        value = metrics.get(self.metrics[0])
        if value is not None and len(self.metrics) == 1:
            self.ledger.record_intermediate(number, step, value)
            self._note_best(number, step, value)
        self.ledger.set_attrs(number, {**{key: int(metrics[key]) for key in self.ATTRS if key in metrics},
                                       **{key: round(float(metrics[key]), 4) for key in self.SECONDS_ATTRS
                                          if key in metrics}})
        self.tracker.log_metrics(number, step, metrics)
        self.display.trial_result(number, step, value)

    def _note_best(self, number: int, step: int, value: float) -> None:
        best = self.best.get(number)
        if math.isfinite(value) and (best is None or (value > best[0] if self.direction == "maximize"
                                                      else value < best[0])):
            self.best[number] = (value, step)

    def on_info(self, number: int, info: dict[str, Any]) -> None:
        """What the trial's worker resolved (device, precision, ...): Optuna user attrs and
        MLflow params of the trial's run, those whose names it does not show yet
        (:func:`~hpo.record.mirror.run_params`: what ``space()`` returned and the job come first)."""
        if number not in self.ledger.running:
            return
        self.ledger.set_attrs(number, info)
        logged = self._logged.setdefault(number, set())
        self.tracker.log_trial_params(number, {k: v for k, v in info.items() if k not in logged})
        logged.update(info)

    def on_end(self, number: int, outcome: Outcome) -> None:
        """Tell Optuna the truthful end, close the MLflow run, update the display.

        The MLflow run is closed whatever happens to the Optuna write; a result that arrives
        for a trial another process failed meanwhile is kept as a new trial and reported
        loudly (see :meth:`Ledger.tell`)."""
        if number not in self.ledger.running:
            return
        last = self.last.get(number, {})
        kind, reason, error = outcome.kind, outcome.reason, outcome.error
        value: Any = last.get(self.metrics[0])
        for metric in self.metrics:
            one = last.get(metric)
            if kind == "complete" and (one is None or not math.isfinite(one)):
                kind, reason = "fail", ("nan" if one is not None else "no_metric")
                error = f"the trial ended with {metric}={one}" if one is not None else \
                    f"the trial ended without reporting {metric!r}"
        if len(self.metrics) > 1:
            value = [last.get(metric) for metric in self.metrics] if kind == "complete" else None
        self._logged.pop(number, None)
        steps = self._steps.get(number)
        attrs: dict[str, Any] = {**outcome.attrs, **({"last_step": steps} if steps else {})}
        best = self.best.pop(number, None)
        if kind == "complete" and self.objective == "best" and best is not None:
            value, attrs["best_step"] = best
            self._log_best_step(number, best[1])
        if number in self.curves:
            attrs["curves"] = self.curves.pop(number)
        if kind == "complete":
            if reason == "early_stopped":
                attrs["stopped_early_at"] = outcome.step
            call: dict[str, Any] = {"state": TrialState.COMPLETE, "value": value, "reason": reason}
        elif kind == "pruned":
            call = {"state": TrialState.PRUNED, "reason": "pruned"}
            attrs["pruned_at"] = outcome.step
        elif kind == "interrupted":
            # after a Ctrl-C the trial was stopped, not crashed: its rerun is the same attempt
            call = {"state": TrialState.FAIL, "reason": "interrupted", "error": error,
                    "crashed": not self.interrupt_requested}
        else:
            call = {"state": TrialState.FAIL, "reason": reason or "error", "error": error}
        told: Told | None = None
        try:
            told = self.ledger.tell(number, attrs=attrs, **call)
        finally:
            self._close_run(number, told, value, error, outcome.step)

    def _log_best_step(self, number: int, step: int) -> None:
        """``best_step`` as a metric of the trial's MLflow run (the value is its ``hpo.objective`` tag)."""
        try:
            retry_transient(lambda: self.tracker.log_metrics(number, step, {"best_step": float(step)}),
                            what="logging best_step")
        except Exception:  # noqa: BLE001 - the study holds it (user attr best_step); the run is closed below
            logger.warning("hpo: logging best_step of trial %s to MLflow failed", number, exc_info=True)

    def _close_run(self, number: int, told: Told | None, value: float | list[float] | None, error: str | None,
                   step: int | None) -> None:
        """Mirror what Optuna now holds to MLflow and the display (the reason as
        :func:`~hpo.record.mirror.shown_reason` words it; ``step``: where a pruned trial stopped)."""
        shown: str | None
        if told is None:  # the Optuna write failed: a reclaim fails and re-queues the trial
            state, shown = "FAIL", "interrupted"
        else:
            state = told.state.name
            shown = shown_reason(state, told.reason, error, step)
            if told.reason == "interrupted":
                self.interrupted.append(number)
        if told is not None and told.kept_as is not None:
            self.kept[number] = told.kept_as
            message = (f"trial {number} had been failed as interrupted by another process while it still ran "
                       f"here; its result is kept as trial {told.kept_as}")
            console = getattr(self.display, "console", None)
            if console is not None:
                console.print(f"[bold yellow]warning:[/] {message}", highlight=False)
            self.tracker.tag_trial(number, KEPT_AS_TAG, str(told.kept_as))
        single = value if state == "COMPLETE" and not isinstance(value, list) else None
        self.tracker.end_trial(number, state, reason=shown, value=single)
        if isinstance(value, list):  # several objectives: the display shows the first
            value = value[0]
        self.display.trial_ended(number, state, value if state == "COMPLETE" else None, shown)

    def tick(self) -> None:
        """Called often by the scheduler's loop: reclaims dead drivers' trials (every grace
        period; every few seconds while waiting on other processes) and the display's clock.
        Heartbeats are not sent from here but from their own thread (:mod:`hpo.record.liveness`)."""
        if self.interrupt_requested and not self._said_interrupt:
            self._said_interrupt = True
            console = getattr(self.display, "console", None)
            running = sorted(self.ledger.running)
            stopping = f"stopping trials {running} (they run again on the next run); " if running else ""
            if console is not None:
                console.print(f"[yellow]Ctrl-C:[/] no new trials start; {stopping}Ctrl-C again stops at once",
                              highlight=False)
        now = time.monotonic()
        every = self.POLL * 5 if self._waiting_since is not None else GRACE_PERIOD
        if now - self._last_reclaim >= every:
            self._last_reclaim = now
            try:
                self.ledger.reclaim()  # trials of other drivers that died meanwhile
            except Exception:  # noqa: BLE001
                logger.warning("hpo: reclaiming trials of dead drivers failed", exc_info=True)
        self.display.tick()

    def close_leftovers(self) -> list[int]:
        """After the scheduler returns: any trial still open ends as interrupted."""
        left = sorted(self.ledger.running)
        for number in left:
            try:
                self.on_end(number, Outcome("interrupted"))
            except Exception:  # noqa: BLE001 - the next start reclaims it
                logger.warning("hpo: recording trial %s as interrupted failed", number, exc_info=True)
        self.ledger.close()
        return left
