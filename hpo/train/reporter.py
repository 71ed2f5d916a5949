"""``report(step, metrics)``: the one channel from a training loop to the sweep, checked.

The built-in recipe and a module's own ``train(params, report[, sweep])`` both get a
:class:`Report`. Each call is checked, then handed to the report's *sink*: under Ray the
sink is Ray's report (``tune.report``, or ``ray.train.report`` on each rank of a multi-worker
trial: :mod:`hpo.run.trial`), in ``hpo promote`` it logs to MLflow and the progress bar. A sink may raise to end training early (Ray's stop does).

The contract:

* ``step`` is an int greater than the previous call's;
* ``metrics`` is a dict with string keys holding the sweep's ``metric`` (every one of a
  multi-objective sweep's; and, when ASHA
  ranks trials on another one, its ``prune_metric``); every value is a real number
  (``int``/``float``, numpy scalars; not ``bool``);
* keys Ray Tune or hpo use for their own bookkeeping (``step``, ``done``, ``trial_id``,
  ``training_iteration``, ``time_*``, ``timestamp``, ``pid``, ``hostname``, ``node_ip``,
  ``date``, ``config/*``, ``hpo_*``, ...) are refused: they would be overwritten or
  dropped on the way to Optuna and MLflow;
* metric names are ones MLflow accepts (letters, digits, ``_ - . : /`` and spaces, at most 250
  characters, not a path such as ``a/../b`` or ``/a``): ``acc@5`` is refused at the first call
  that holds it, not found missing from the trial's MLflow run after the sweep;
* a non-finite objective, ``train_loss`` or ``eval_loss`` is still recorded (the curve
  shows where it diverged), then :class:`NonFiniteMetric` is raised: the trial ends as
  FAIL with reason ``nan``.

Bad calls raise :class:`ReportError` (a ``ValueError``), which fails the trial with that
message. Imports nothing of Optuna, Ray or MLflow.
"""

from __future__ import annotations

import math
import numbers
import posixpath
import re
from collections.abc import Callable
from typing import Any

# The one list of reserved result names (Tune's own and hpo's ``hpo_*``): hpo.run.trial.metrics sets them
# aside from a result, so the sweep records only the trial's own metrics.
RESERVED_KEYS = frozenset({
    "step", "done", "trial_id", "training_iteration", "timestamp", "pid", "hostname", "node_ip", "date",
    "experiment_tag", "checkpoint_dir_name", "should_checkpoint", "iterations_since_restore",
    "time_this_iter_s", "time_total_s", "time_since_restore", "experiment_id", "episodes_total",
    "timesteps_total", "config",
})
RESERVED_PREFIXES = ("time_", "config/", "hpo_")
# MLflow's rule for metric and param names (mlflow.utils.validation: _validate_metric_name,
# MAX_ENTITY_KEY_LENGTH), restated here: hpo/train knows nothing of MLflow.
NAME_CHARACTERS = re.compile(r"[/\w.\- :]+")
MAX_NAME_LENGTH = 250
CHECKED_FOR_NAN = ("train_loss", "eval_loss")

Sink = Callable[[int, dict[str, float]], None]


class ReportError(ValueError):
    """A ``report(step, metrics)`` call that breaks the contract."""


class NonFiniteMetric(Exception):
    """The objective or a loss became NaN/inf (already handed to the sink): the run cannot recover."""


class Report:
    """A checked ``report(step, metrics)`` for a sweep whose objective is ``metric``.

    ``sink(step, values)`` receives each valid call, values as floats. ``prune_metric``, when
    given, must be in every call too (ASHA ranks trials on it).
    """

    def __init__(self, metric: str, sink: Sink, prune_metric: str | None = None):
        self.metric = metric
        self.metrics = tuple(metric.split(","))
        """The objectives: ``metric``, or the names of a comma-separated multi-objective ``metric``."""
        self.prune_metric = prune_metric if prune_metric not in self.metrics else None
        self.sink = sink
        self.last_step = 0
        """The step of the last valid call (0 before any)."""

    def __call__(self, step: int, metrics: dict[str, Any]) -> None:
        values = self.check(step, metrics)
        self.last_step = step
        self.sink(step, values)
        bad = [k for k in (*self.metrics, *CHECKED_FOR_NAN) if k in values and not math.isfinite(values[k])]
        if bad:
            raise NonFiniteMetric(f"{bad[0]} is {values[bad[0]]} at step {step}")

    def check(self, step: Any, metrics: Any) -> dict[str, float]:
        """The call's metrics as floats, or :class:`ReportError` saying what is wrong."""
        if not isinstance(step, int) or isinstance(step, bool) or step <= self.last_step:
            raise ReportError(f"report(step={step!r}): step must be an int greater than the last ({self.last_step})")
        if not isinstance(metrics, dict):
            raise ReportError(f"report(step={step}, metrics=...): metrics must be a dict, got {type(metrics).__name__}")
        reserved = sorted(str(k) for k in metrics if is_reserved(k))
        if reserved:
            raise ReportError(f"report(step={step}): the key(s) {', '.join(map(repr, reserved))} are reserved for "
                              "Ray Tune and hpo's own bookkeeping; rename them (e.g. 'my_step')")
        for metric in self.metrics:
            if metric not in metrics:
                raise ReportError(f"report(step={step}) got no {metric!r} (the sweep's metric); got {sorted(metrics)}")
        if self.prune_metric is not None and self.prune_metric not in metrics:
            raise ReportError(f"report(step={step}) got no {self.prune_metric!r} (the sweep's prune_metric, which "
                              f"the pruner ranks trials on); got {sorted(metrics)}: report it, or --set prune_metric=")
        values: dict[str, float] = {}
        for key, value in metrics.items():
            if not isinstance(key, str):
                raise ReportError(f"report(step={step}): metric names must be strings, got {key!r}")
            if not is_valid_name(key):
                raise ReportError(f"report(step={step}): the metric name {key!r} is one MLflow refuses (names hold "
                                  "letters, digits, '_', '-', '.', ':', '/' and spaces, at most 250 characters, and are "
                                  f"not paths such as 'a/../b' or '/a'); rename it, e.g. {suggest_name(key)!r}")
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise ReportError(f"report(step={step}): {key}={value!r} is a {type(value).__name__}; "
                                  "metric values must be numbers (use .item() on a tensor)")
            values[key] = float(value)
        return values


def is_reserved(key: Any) -> bool:
    return isinstance(key, str) and (key in RESERVED_KEYS or key.startswith(RESERVED_PREFIXES))


def is_valid_name(key: str) -> bool:
    """Whether MLflow accepts ``key`` as a metric name (it refuses the whole batch otherwise)."""
    normal = posixpath.normpath(key)
    return (bool(NAME_CHARACTERS.fullmatch(key)) and len(key) <= MAX_NAME_LENGTH
            and normal == key and normal != "." and not normal.startswith(("..", "/")))


def suggest_name(key: str) -> str:
    """``key`` with what MLflow refuses replaced: each other character by ``_``, path parts dropped."""
    parts = [re.sub(r"[^/\w.\- :]", "_", part) for part in key.split("/")]
    name = "/".join(part for part in parts if part not in ("", ".", ".."))
    return name[:MAX_NAME_LENGTH] or "metric"
