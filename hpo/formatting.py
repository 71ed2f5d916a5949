"""Numbers and values for people and for JSON: short numeric forms, percentages, JSON-safe data.

The one home of number formatting: the diagnosis (:mod:`hpo.analysis.diagnose`) for its messages and its
``--json`` output, the command line's tables, the live sweep display (:mod:`hpo.run.progress`) and
the HTML report; and the colour of each trial state on a terminal.
"""

from __future__ import annotations

import math
from typing import Any

STATE_STYLE = {"RUNNING": "cyan", "COMPLETE": "green", "PRUNED": "yellow", "FAIL": "red", "WAITING": "dim"}
"""The rich style of each trial state, wherever trials are listed (``hpo trials``, the live sweep view)."""


def percent(share: float) -> str:
    return f"{100 * share:.0f}%"


def sci(value: float) -> str:
    """Short scientific form: 5e-03, 1.5e-02 (how log-scaled parameters read best)."""
    if isinstance(value, int) or not math.isfinite(value):
        return str(value)
    mantissa, exponent = f"{value:.1e}".split("e")
    return f"{mantissa.removesuffix('.0')}e{exponent}"


def num(value: float | int | None) -> str:
    """A number for people: ints as they are, small or large floats in short scientific form."""
    if value is None:
        return "-"
    if isinstance(value, int) or not math.isfinite(value):
        return str(value)
    if value != 0 and (abs(value) < 1e-2 or abs(value) >= 1e4):
        return sci(value)
    return f"{value:.3g}"


def short(value: float | int | None, digits: int = 4) -> str:
    """A metric value to ``digits`` significant digits (``0.8312``, ``1.5e-05``, ``nan``), ``-`` for None."""
    return "-" if value is None else f"{value:.{digits}g}"


def cell(value: Any, digits: int = 4, missing: str = "-") -> str:
    """Any value for a table or a message: floats :func:`short`, None ``missing``, the rest as ``str``."""
    if isinstance(value, float):
        return short(value, digits)
    return missing if value is None else str(value)


def params_text(params: dict[str, Any], digits: int = 4) -> str:
    """``key=value`` pairs on one line, floats to ``digits`` significant digits."""
    return " ".join(f"{k}={short(v, digits) if isinstance(v, float) else v}" for k, v in params.items())


def json_safe(value: Any) -> Any:
    """Plain JSON data: non-finite floats become ``"nan"``, ``"inf"``, ``"-inf"``; tuples lists."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return json_safe(value.item())
    if isinstance(value, float):
        number = float(value)
        if math.isnan(number):
            return "nan"
        if math.isinf(number):
            return "inf" if number > 0 else "-inf"
        return number
    return str(value)

