"""The driver's one writer: turns trial events into Optuna, MLflow and progress updates.

Events arrive from the scheduler (Ray Tune, in its driver thread) as plain calls:
``next_trial`` -> ``on_result``* -> ``on_end``. Each is written to the Optuna study
first (the source of truth), then mirrored to MLflow, then shown. Knows neither Ray nor
transformers.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from optuna.trial import TrialState

from hpo.ledger import AskedTrial, Ledger
from hpo.study import GRACE_PERIOD, HEARTBEAT_INTERVAL
from hpo.tracking import SweepTracker

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outcome:
    """How a trial ended, as the scheduler saw it."""

    kind: str
    """``complete``, ``pruned``, ``fail`` or ``interrupted``."""
    reason: str | None = None
    """For ``fail``: error, nan, oom, crash, space. For ``complete``: early_stopped, when the
    trial's own early stopping (patience) ended it before max_steps."""
    error: str | None = None
    """The exception's class and message, for ``fail``."""
    step: int | None = None
    """The step at which the trial was stopped early (``pruned``, or ``early_stopped``)."""


class Display(Protocol):
    def trial_started(self, number: int, params: dict[str, Any]) -> None: ...
    def trial_result(self, number: int, step: int, value: float | None) -> None: ...
    def trial_ended(self, number: int, state: str, value: float | None, reason: str | None) -> None: ...
    def tick(self) -> None: ...


class Recorder:
    """Owns the sweep's bookkeeping while Ray runs trials.

    The ledger's ``target`` is the number of finished trials the study should hold; a
    sweep stops asking for trials once the study has them (with the trials running in any
    process), or after ``deadline`` (running trials then finish).
    """

    DONE = "done"
    # Trial attributes the recipe reports among its metrics and the study keeps as user attrs.
    ATTRS = ("micro_batch_size", "grad_accum", "peak_memory_mb", "resident_memory_mb")
    # Curves kept on the Optuna trial (user attr "curves") for `hpo diagnose` and reports.
    CURVES = ("train_loss", "eval_loss", "learning_rate")

    def __init__(self, ledger: Ledger, tracker: SweepTracker, display: Display, *, metric: str,
                 deadline: float | None, job_params: Callable[[dict[str, Any]], dict[str, Any]] | None = None):
        self.job_params = job_params
        """params -> the full job a worker trains with (defaults filled in), for the MLflow run."""
        self.ledger = ledger
        self.tracker = tracker
        self.display = display
        self.metric = metric
        self.deadline = deadline
        self.started = 0
        self.interrupted: list[int] = []
        self.last: dict[int, dict[str, float]] = {}
        self.curves: dict[int, dict[str, list[list[float]]]] = {}
        self._steps: dict[int, int] = {}
        self._logged: dict[int, set[str]] = {}  # MLflow params of each running trial's run (they never change)
        self._last_heartbeat = self._last_reclaim = time.monotonic()

    def next_trial(self) -> AskedTrial | str | None:
        """The next trial to run, ``None`` (wait for running trials), or ``DONE``."""
        out_of_time = self.deadline is not None and time.time() >= self.deadline
        asked = None if out_of_time else self.ledger.claim()
        if asked is None:
            return None if self.ledger.running else self.DONE
        self.started += 1
        params = {**asked.trial.params, **{k: v for k, v in asked.params.items() if k not in asked.trial.params}}
        if self.job_params is not None:
            params = {**self.job_params(asked.params), **params}
        self.tracker.start_trial(asked.number, params)
        self._logged[asked.number] = set(params)
        self.display.trial_started(asked.number, asked.params)
        return asked

    def on_result(self, number: int, step: int, metrics: dict[str, float]) -> None:
        """One evaluation of a running trial (deduplicated by step)."""
        if number not in self.ledger.running or self._steps.get(number, 0) >= step:
            return
        self._steps[number] = step
        self.last[number] = metrics
        curves = self.curves.setdefault(number, {})
        for key, metric in metrics.items():
            if key in self.CURVES or key == self.metric or key.startswith("eval_"):
                curves.setdefault(key, []).append([step, metric])
        value = metrics.get(self.metric)
        if value is not None:
            self.ledger.report(number, step, value)
        for key in self.ATTRS:
            if key in metrics:
                self.ledger.set_attr(number, key, int(metrics[key]))
        self.tracker.log_metrics(number, step, metrics)
        self.display.trial_result(number, step, value)

    def on_info(self, number: int, info: dict[str, Any]) -> None:
        """What the trial's worker resolved (device, precision, ...): Optuna user attrs and
        MLflow params of the trial's run."""
        if number not in self.ledger.running:
            return
        for key, value in info.items():
            self.ledger.set_attr(number, key, value)
        logged = self._logged.setdefault(number, set())
        self.tracker.log_trial_params(number, {k: v for k, v in info.items() if k not in logged})
        logged.update(info)

    def on_end(self, number: int, outcome: Outcome) -> None:
        """Tell Optuna the truthful end, close the MLflow run, update the display."""
        if number not in self.ledger.running:
            return
        value = self.last.get(number, {}).get(self.metric)
        kind, reason, error = outcome.kind, outcome.reason, outcome.error
        if kind == "complete" and (value is None or not math.isfinite(value)):
            kind, reason = "fail", ("nan" if value is not None else "no_metric")
            error = f"the trial ended with {self.metric}={value}" if value is not None else \
                f"the trial ended without reporting {self.metric!r}"
        if kind == "pruned":
            reason = f"stopped early by the pruner at step {outcome.step}"
        self._logged.pop(number, None)
        steps = self._steps.get(number)
        attrs: dict[str, Any] = {"last_step": steps} if steps else {}
        if number in self.curves:
            attrs["curves"] = self.curves.pop(number)
        if kind == "complete":
            if reason == "early_stopped":
                attrs["stopped_early_at"] = outcome.step
            self.ledger.tell(number, TrialState.COMPLETE, value=value, reason=reason, attrs=attrs)
            state = "COMPLETE"
        elif kind == "pruned":
            self.ledger.tell(number, TrialState.PRUNED, reason="pruned", attrs={**attrs, "pruned_at": outcome.step})
            state = "PRUNED"
        elif kind == "interrupted":
            self.ledger.tell(number, TrialState.FAIL, reason="interrupted", attrs=attrs)
            state, reason = "FAIL", "interrupted"
            self.interrupted.append(number)
        else:
            self.ledger.tell(number, TrialState.FAIL, reason=reason or "error", error=error, attrs=attrs)
            state = "FAIL"
        self.tracker.end_trial(number, state, reason=error or reason, value=value if kind == "complete" else None)
        self.display.trial_ended(number, state, value, error or reason)

    def tick(self) -> None:
        """Called often by the scheduler's loop: heartbeats and the display's clock."""
        now = time.monotonic()
        if now - self._last_heartbeat >= HEARTBEAT_INTERVAL / 2:
            self._last_heartbeat = now
            for asked in list(self.ledger.running.values()):
                try:
                    self.ledger.heartbeat(asked.trial)
                except Exception as error:  # noqa: BLE001 - a missed heartbeat is retried next tick
                    logger.warning("hpo: recording a heartbeat failed (%s); trying again shortly", error)
        if now - self._last_reclaim >= GRACE_PERIOD:
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
            self.on_end(number, Outcome("interrupted"))
        return left
