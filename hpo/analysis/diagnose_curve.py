"""One learning curve as :mod:`hpo.analysis.diagnose_rules` reads it: its levels, noise and lowest point.

Curves have 3-30 noisy points, so levels, not points, are compared: a curve's start, middle
and end *level* is the median of k points there (k = 1 for 3-7 points, 2 for 8-11, 3 for
12+), and lowest points are taken on a running median of 3 (5+ points). Pure arithmetic on
plain lists: no Optuna, no I/O.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from optuna.trial import FrozenTrial


@dataclass(frozen=True)
class Curve:
    """A curve's finite points in order, oriented so that lower is better (``sign`` -1 for a
    maximised metric: the value shown to people is ``sign * value``)."""

    name: str
    steps: list[int]
    values: list[float]
    sign: float = 1.0

    def __len__(self) -> int:
        return len(self.values)

    def shown(self, value: float) -> float:
        return self.sign * value

    def level(self, where: str) -> float:
        """Median of k points at the ``start``, ``middle`` or ``end`` (k from the length)."""
        n, k = len(self.values), window(len(self.values))
        first = {"start": 0, "middle": (n - k) // 2, "end": n - k}[where]
        return statistics.median(self.values[first:first + k])

    def smoothed(self) -> list[float]:
        """Running median of 3 (ends kept) from 5 points on; shorter curves as they are."""
        values = self.values
        if len(values) < 5:
            return list(values)
        return [values[0], *(statistics.median(values[i - 1:i + 2]) for i in range(1, len(values) - 1)), values[-1]]

    def noise(self) -> float:
        """A robust estimate of one point's noise: the median absolute second difference
        (which a straight trend does not change), scaled to a normal's standard deviation."""
        values = self.values
        seconds = [abs(values[i + 1] - 2 * values[i] + values[i - 1]) for i in range(1, len(values) - 1)]
        return statistics.median(seconds) / (0.6745 * math.sqrt(6)) if seconds else 0.0

    def bottom(self) -> tuple[int, float]:
        """Where the curve is lowest: the index of the lowest recorded point at the smoothed
        curve's minimum (itself or a neighbour), and the smoothed level there."""
        smooth = self.smoothed()
        low = min(range(len(smooth)), key=smooth.__getitem__)
        near = range(max(0, low - 1), min(len(smooth), low + 2))
        return min(near, key=lambda i: (self.values[i], i)), smooth[low]

    def at(self, step: int) -> float:
        """The smoothed value at the recorded step nearest to ``step``."""
        index = min(range(len(self.steps)), key=lambda i: (abs(self.steps[i] - step), i))
        return self.smoothed()[index]


def window(n: int) -> int:
    """How many points make a level: 1 (3-7 points), 2 (8-11), 3 (12 or more)."""
    return min(3, max(1, n // 4))


def drops(curve: Curve) -> dict[str, float]:
    """Total, first-half and last-half drop of a curve's levels, as shares of its start level."""
    start, middle, end = curve.level("start"), curve.level("middle"), curve.level("end")
    scale = abs(start) or 1.0
    return {"total_drop": rounded((start - end) / scale), "first_half_drop": rounded((start - middle) / scale),
            "last_half_drop": rounded((middle - end) / scale)}


def kendall_tau(values: Sequence[float]) -> float:
    """Rank correlation of the values with their order: 1 always rising, -1 always falling."""
    pairs = [(a, b) for i, a in enumerate(values) for b in values[i + 1:]]
    if not pairs:
        return 0.0
    return sum((b > a) - (b < a) for a, b in pairs) / len(pairs)


def to_points(raw: Iterable[Any] | None) -> list[tuple[int, float]]:
    """``[[step, value], ...]`` (or a ``{step: value}`` dict) as sorted pairs, one per step."""
    items = raw.items() if isinstance(raw, dict) else raw if isinstance(raw, (list, tuple)) else []
    by_step: dict[int, float] = {}
    for item in items:
        try:
            step, value = item
            by_step[int(step)] = to_float(value)
        except (TypeError, ValueError):
            continue
    return sorted(by_step.items())


def to_float(value: Any) -> float:
    if value is None:
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def rounded(share: float) -> float:
    return round(share, 4)


def first_value(trial: FrozenTrial) -> float | None:
    """A finished trial's value; a multi-objective trial's first (``trial.value`` raises there)."""
    return trial.values[0] if trial.values else None
