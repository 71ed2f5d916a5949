"""The sweep's objective in Ray Tune's words: which way is better (``max``/``min``, Tune's ``mode``) and the
metric ASHA ranks trials on at each rung.

The config speaks Optuna's words (``metric``, ``direction``: maximize/minimize, ``prune_metric``,
``prune_direction``); Tune's stay in ``hpo/run/``, where the scheduler, the searcher and promote's early
stopping are built from these.
"""

from __future__ import annotations

from hpo.config import KNOWN_DIRECTIONS, Sweep


def mode(sweep: Sweep) -> str:
    """``max`` or ``min``, as Ray Tune names the direction of the sweep's (first) objective."""
    return _mode(sweep.directions[0])


def pruned_on(sweep: Sweep) -> str:
    """The metric ASHA ranks trials on: ``prune_metric``, else ``metric`` (the first of several)."""
    return sweep.prune_metric or sweep.metrics[0]


def prune_mode(sweep: Sweep) -> str:
    """``max`` or ``min`` for :func:`pruned_on`: ``prune_direction``, else the sweep's own direction of that
    metric, else its known direction."""
    metric = pruned_on(sweep)
    if metric == sweep.metrics[0] and sweep.prune_direction is None:
        return mode(sweep)
    own = dict(zip(sweep.metrics, sweep.directions, strict=False))
    return _mode(sweep.prune_direction or own.get(metric) or KNOWN_DIRECTIONS[metric])


def _mode(direction: str) -> str:
    return "max" if direction == "maximize" else "min"
