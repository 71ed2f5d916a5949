"""What a search-space module knows about its parameters before any trial: :class:`Prior`.

A module may declare, beside ``sweep`` and ``space``::

    priors = {
        "batch_size": hpo.Prior(high=32, why="LoRA pays more than full fine-tuning for large batches"),
    }

A prior says that values outside ``[low, high]`` are not worth trying, and why (a citation or
a measurement). It does not change what ``space(trial)`` samples; it is what later steps must
not argue past on a few trials' evidence: ``hpo diagnose`` never advises widening a range or
adding choices beyond it, and quotes its ``why`` instead. ``hpo search`` records the priors
on the study (:class:`hpo.record.sweep_record.SweepRecord`), so the diagnosis reads them from
the study alone. Plain data: no Optuna, Ray or MLflow here.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from hpo.errors import HpoError


@dataclass(frozen=True)
class Prior:
    """Bounds a parameter's useful values (either may be None: unbounded) and says why."""

    low: float | None = None
    """Nothing below this is worth trying (None: no lower limit)."""
    high: float | None = None
    """Nothing above this is worth trying (None: no upper limit)."""
    why: str = ""
    """The reason, for a person: a citation or a measurement. Advice quotes it."""

    def __post_init__(self) -> None:
        for name in ("low", "high"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value)):
                raise HpoError(f"hpo.Prior: {name}={value!r} is not a finite number; give a number or leave it out")
        if self.low is None and self.high is None:
            raise HpoError("hpo.Prior: give low=, high= or both (the values worth trying lie between them)")
        if self.low is not None and self.high is not None and self.low > self.high:
            raise HpoError(f"hpo.Prior: low={self.low} is above high={self.high}; swap them")
        if not isinstance(self.why, str) or not self.why.strip():
            raise HpoError("hpo.Prior: why= is empty; say where the bound comes from (a paper, a measurement)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, stored: dict[str, Any]) -> Prior:
        return cls(low=stored.get("low"), high=stored.get("high"), why=stored.get("why", ""))

    def text(self) -> str:
        """``nothing above 32``, ``nothing below 1e-05``, ``only 0.0 to 0.1``."""
        if self.low is None:
            return f"nothing above {self.high:g}"
        if self.high is None:
            return f"nothing below {self.low:g}"
        return f"only {self.low:g} to {self.high:g}"

    def allows(self, value: float) -> bool:
        return (self.low is None or value >= self.low) and (self.high is None or value <= self.high)

    def clamp(self, value: float) -> float:
        """``value`` moved inside the prior's bounds."""
        if self.high is not None:
            value = min(value, self.high)
        if self.low is not None:
            value = max(value, self.low)
        return value


def check_priors(priors: Any, where: str) -> dict[str, Prior]:
    """A module's ``priors`` (None: none) as a dict of parameter name -> :class:`Prior`, or an
    :class:`HpoError` naming ``where`` (the module's path) and what is wrong."""
    if priors is None:
        return {}
    if not isinstance(priors, dict):
        raise HpoError(f"{where}: `priors` is a {type(priors).__name__}; expected a dict of parameter name -> "
                       "hpo.Prior(low=..., high=..., why=...)")
    for name, prior in priors.items():
        if not isinstance(name, str) or not isinstance(prior, Prior):
            raise HpoError(f"{where}: priors[{name!r}] is a {type(prior).__name__}; expected hpo.Prior(low=..., "
                           "high=..., why=...) under a parameter's name")
    return dict(priors)


def stored_priors(stored: Any) -> dict[str, Prior]:
    """Priors as a study records them (``{name: {"low", "high", "why"}}``); entries that do not
    read as a prior are left out (a record written by another version)."""
    priors = {}
    for name, value in (stored or {}).items() if isinstance(stored, dict) else ():
        try:
            priors[name] = Prior.from_dict(value)
        except (HpoError, AttributeError, TypeError):
            continue
    return priors
