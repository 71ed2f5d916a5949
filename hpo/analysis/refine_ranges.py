"""Arithmetic on Optuna distributions for ``hpo refine``: positions in a range, tidy bounds, short descriptions.

Pure: distributions and numbers in, distributions and strings out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from hpo.formatting import num, sci


@dataclass(frozen=True)
class Fixed:
    """A parameter the next sweep no longer searches: this value in every trial."""

    value: Any


def to_unit(value: float, distribution: Any) -> float:
    """Where ``value`` sits in the range, 0 at its low and 1 at its high end (log space for a log range)."""
    where = math.log if distribution.log else float
    if distribution.high <= distribution.low:
        return 0.0
    return (where(value) - where(distribution.low)) / (where(distribution.high) - where(distribution.low))


def from_unit(position: float, distribution: Any, *, up: bool) -> float:
    """The value at ``position`` of the range, rounded (up or down) to 2 significant digits."""
    low, high = distribution.low, distribution.high
    if distribution.log:
        value = math.exp(math.log(low) + position * (math.log(high) - math.log(low)))
    else:
        value = low + position * (high - low)
    return round_significant(value, up=up)


def round_significant(value: float, *, up: bool, digits: int = 2) -> float:
    """``value`` rounded up or down to ``digits`` significant digits (0.000347 -> 0.00034 down, 0.00035 up)."""
    if value == 0 or not math.isfinite(value):
        return value
    exponent = math.floor(math.log10(abs(value))) - digits + 1
    scaled = value / 10.0 ** exponent
    whole = math.ceil(scaled - 1e-9) if up else math.floor(scaled + 1e-9)
    return float(f"{whole}e{exponent}")


def rebuild(distribution: Any, low: float, high: float) -> Any:
    """A distribution like ``distribution`` (type, log, step) from ``low`` to ``high``; integer and
    stepped ranges widen to whole steps from the old low."""
    from optuna.distributions import FloatDistribution, IntDistribution

    step = distribution.step
    if isinstance(distribution, IntDistribution):
        step = step or 1
        low = distribution.low + math.floor((low - distribution.low) / step) * step
        high = low + math.ceil((high - low) / step) * step
        low = max(low, 1) if distribution.log else low
        return IntDistribution(int(low), int(max(high, low)), log=distribution.log, step=step)
    if step is not None:
        low = round(distribution.low + math.floor((low - distribution.low) / step + 1e-9) * step, 10)
        high = round(low + math.ceil((high - low) / step - 1e-9) * step, 10)
        return FloatDistribution(low, max(high, low), step=step)
    return FloatDistribution(float(low), float(max(high, low)), log=distribution.log)


def tidy(value: Any) -> Any:
    """A float to 3 significant digits (a fixed value or bound people read); anything else as it is."""
    return float(f"{value:.3g}") if isinstance(value, float) else value


def show(value: Any) -> str:
    return num(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else repr(value)


def describe(value: Any) -> str:
    """A distribution or :class:`Fixed` value in a few characters: ``1e-04..5e-03 (log)``, ``[8, 16]``."""
    from optuna.distributions import CategoricalDistribution

    if isinstance(value, Fixed):
        return f"fixed at {show(value.value)}"
    if isinstance(value, CategoricalDistribution):
        return "[" + ", ".join(show(c) for c in value.choices) + "]"
    shown = sci if value.log else num
    return f"{shown(value.low)}..{shown(value.high)}" + (" (log)" if value.log else "") + \
        (f" step {num(value.step)}" if value.step not in (None, 1) else "")
