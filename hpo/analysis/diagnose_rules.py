"""The curve rules: what one trial's learning curves show (:func:`diagnose_curves`).

The thresholds (``OVERFIT_RISE`` ...) and why they are what they are: :mod:`hpo.analysis.diagnose_thresholds`.
Curves have 3-30 noisy points, so levels, not points, are compared: a curve's start,
middle and end *level* is the median of k points there (k = 1 for 3-7 points, 2 for 8-11,
3 for 12+), and its *low* is taken on a running median of 3 (5+ points). The rules,
checked in this order; the first that holds is the trial's finding:

* ``diverging`` (learning rate too high): a NaN/inf in a loss curve (evidence ``step``: the
  first one); or the training loss ends ``DIVERGE_RISE`` of its start above its start, or
  climbs back from its lowest level by that much, rising on the whole from there
  (``DIVERGE_STEADY_TAU``) (``step``: where it turned up). Without a training loss: the
  validation curve ends ``DIVERGE_RISE`` above its start.
* ``overfitting``: the validation loss ends ``OVERFIT_RISE`` or more above its low, reached
  before the end, while the training loss ends below its level at that step. Evidence:
  ``best_eval_step`` (the lowest recorded value at the smoothed low), the losses there and at
  the end, ``eval_low`` (the smoothed low the rise is measured from), ``eval_rise``,
  ``eval_rise_from_best`` (the same from the lowest point), ``train_loss_drop`` since then.
* ``slow_convergence`` (learning rate too low): total drop under ``SLOW_MAX_DROP`` of the
  start, and training or validation loss is still falling (its last half removes
  ``SLOW_TAIL_DROP`` of the start, ``SLOW_TAIL_RATIO`` of what its first half removed and
  ``SLOW_NOISE_FACTOR`` times its point noise); the other curve's last half falls too.
* ``underfitting``: training and validation loss both end less than ``UNDERFIT_MAX_DROP``
  below their start, without that steady tail: stuck high and flat.
* ``early_overfitting``: the overfitting pattern with a rise of ``EARLY_OVERFIT_RISE`` or more
  but under ``OVERFIT_RISE``: an upturn worth watching, not yet a clear one. Same evidence.
* ``healthy``: none of these. Its message names each curve that was still improving at the
  end, and where the validation curve was lowest and how far above that it ended.

A message and its evidence agree: a percentage is given with the two numbers it compares. The
objective's curve stands in for ``eval_loss`` when that is missing (a maximised metric turned
upside down; evidence keys then carry its name: ``best_eval_accuracy``). Drops count from the
first evaluation (after ``eval_every`` steps), not from step 0; a pretrained model whose loss
starts near its floor (a causal-LM fine-tune) drops little: read ``underfitting`` there with
its evidence. With fewer than ``MIN_POINTS`` finite points only NaN/inf is claimed;
otherwise :func:`diagnose_curves` returns ``[]`` (never ``healthy``) and the trial's entry in
:class:`hpo.analysis.diagnose.StudyDiagnosis` says why in its ``note``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from hpo.analysis.diagnose_curve import Curve, drops, kendall_tau, rounded, to_points
from hpo.analysis.diagnose_thresholds import (
    DIVERGE_RISE,
    DIVERGE_STEADY_TAU,
    EARLY_OVERFIT_RISE,
    MIN_POINTS,
    OVERFIT_RISE,
    SLOW_MAX_DROP,
    SLOW_NOISE_FACTOR,
    SLOW_TAIL_DROP,
    SLOW_TAIL_RATIO,
    UNDERFIT_MAX_DROP,
)
from hpo.formatting import json_safe, num, percent

KINDS = ("diverging", "overfitting", "underfitting", "slow_convergence", "early_overfitting", "healthy")


@dataclass(frozen=True)
class Finding:
    """One thing the diagnosis found (in a trial's curves, the study or the data), with the numbers
    it rests on and the trials or rows behind it."""

    kind: str
    """A trial's: one of ``KINDS``. The study's (``scope`` study) and the data's (``scope`` data)
    name what they are about: ``importance``, ``range_edge``, ``label_issues``, ..."""
    message: str
    """One line for a person."""
    evidence: dict = field(default_factory=dict)
    """The steps and values behind it (may hold NaN/inf; :meth:`to_dict` makes them strings)."""
    trials: list[int] = field(default_factory=list)
    """The trials behind it, by number (a trial's own finding: that trial)."""
    rows: list[dict] = field(default_factory=list)
    """The data rows behind it (a data check's finding), each a dict naming its row: ``row`` (1-based,
    as ``hpo check-data`` numbers rows), or ``first_row`` and ``second_row`` for a pair."""
    scope: str = "trial"
    """``trial`` (one trial's curves), ``study`` (what to try next) or ``data`` (``hpo check-data``)."""

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "message": self.message, "evidence": json_safe(self.evidence),
                "trials": list(self.trials), "rows": json_safe(self.rows), "scope": self.scope}


def diagnose_curves(curves: dict[str, list[tuple[int, float]]], *, max_steps: int | None = None,
                    metric: str | None = None, direction: str | None = None) -> list[Finding]:
    """The findings for one trial's curves (the rules are in the module docstring).

    ``curves`` maps a name to ``(step, value)`` pairs (``[step, value]`` lists from JSON are
    fine; NaN, inf and None count as non-finite). ``train_loss`` and ``eval_loss`` are read;
    without ``eval_loss``, the curve named ``metric`` stands in (turned upside down when
    ``direction`` is ``maximize``). ``max_steps``, the sweep's budget, tells whether the
    trial stopped early (``stopped_early`` in the evidence). A ``learning_rate`` curve adds
    the learning rate where a diverging run went wrong. Returns one finding, or ``[]`` when
    there are fewer than ``MIN_POINTS`` finite points and nothing non-finite.
    """
    points = {name: to_points(raw) for name, raw in curves.items()}
    val_name = metric if metric and not points.get("eval_loss") and points.get(metric) else "eval_loss"
    sign = -1.0 if val_name != "eval_loss" and direction == "maximize" else 1.0
    watched = dict.fromkeys(["train_loss", val_name, *(n for n in points if "loss" in n or "perplexity" in n)])
    broken = [found for name in watched if (found := non_finite(name, points.get(name, [])))]
    train = make_curve("train_loss", points.get("train_loss", []))
    val = make_curve(val_name, points.get(val_name, []), sign)
    if broken:
        found = min(broken, key=lambda f: f.evidence["step"])
    elif train is None and val is None:
        return []
    elif train is not None:
        found = diverging(train) or (overfitting(val, train, OVERFIT_RISE) if val is not None else None) \
            or slow_or_underfitting(train, val) \
            or (overfitting(val, train, EARLY_OVERFIT_RISE) if val is not None else None) or healthy(train, val)
    else:
        assert val is not None
        found = diverging_without_train(val) or overfitting(val, None, OVERFIT_RISE) \
            or slow_or_underfitting(val, None) or overfitting(val, None, EARLY_OVERFIT_RISE) or healthy(val, None)
    last_step = max((s for pairs in (points.get("train_loss", []), points.get(val_name, [])) for s, _ in pairs),
                    default=None)
    evidence = {**found.evidence, "last_step": last_step, "max_steps": max_steps,
                "stopped_early": max_steps is not None and last_step is not None and last_step < max_steps}
    if found.kind == "diverging" and points.get("learning_rate"):
        step = evidence["step"]
        evidence["learning_rate_at_step"] = min(points["learning_rate"], key=lambda p: (abs(p[0] - step), p[0]))[1]
    message = found.message + (f" (stopped at step {last_step} of {max_steps})" if evidence["stopped_early"] else "")
    return [Finding(found.kind, message, evidence)]


# --- the rules -----------------------------------------------------------------------------

def non_finite(name: str, points: list[tuple[int, float]]) -> Finding | None:
    for index, (step, value) in enumerate(points):
        if not math.isfinite(value):
            before = [(s, v) for s, v in points[:index] if math.isfinite(v)]
            evidence = {"curve": name, "step": step, "value": value,
                        "last_finite_step": before[-1][0] if before else None,
                        "last_finite_value": before[-1][1] if before else None}
            after = f" (last finite {num(before[-1][1])} at step {before[-1][0]})" if before else ""
            return Finding("diverging", f"{name} became {value} at step {step}{after}: training blew up, "
                                        "the learning rate is likely too high", evidence)
    return None


def diverging(train: Curve) -> Finding | None:
    """Training loss ends clearly above its start, or climbs back steadily from its lowest level."""
    start, end = train.level("start"), train.level("end")
    low_index, low = train.bottom()
    scale = abs(start) or 1.0
    above_start = end - start >= DIVERGE_RISE * scale
    climbed = (low_index < len(train) - 1 and end - low >= DIVERGE_RISE * scale
               and kendall_tau(train.values[low_index:]) >= DIVERGE_STEADY_TAU)
    if not (above_start or climbed):
        return None
    evidence = {"curve": train.name, "step": train.steps[low_index], "start_step": train.steps[0],
                "start_loss": train.values[0], "lowest_loss": train.values[low_index],
                "last_loss": train.values[-1],
                "rise": rounded((end - low) / scale)}
    where = "ended above where it started" if above_start else "climbed back up"
    return Finding("diverging", f"train_loss {where}: {num(train.values[low_index])} at step "
                                f"{train.steps[low_index]} -> {num(train.values[-1])} at step {train.steps[-1]} "
                                f"(start {num(train.values[0])}): unstable, the learning rate is likely too high",
                   evidence)


def diverging_without_train(val: Curve) -> Finding | None:
    """With no training loss: the validation curve ends clearly worse than it started."""
    start, end = val.level("start"), val.level("end")
    if end - start < DIVERGE_RISE * (abs(start) or 1.0):
        return None
    evidence = {"curve": val.name, "step": val.steps[0], "start_step": val.steps[0],
                f"start_{val.name}": val.shown(val.values[0]),
                f"last_{val.name}": val.shown(val.values[-1]), "rise": rounded((end - start) / (abs(start) or 1.0))}
    return Finding("diverging", f"{val.name} ended worse than it started ({num(val.shown(val.values[0]))} -> "
                                f"{num(val.shown(val.values[-1]))}, no training loss recorded): the learning rate "
                                "is likely too high", evidence)


def overfitting(val: Curve, train: Curve | None, needed: float) -> Finding | None:
    """Validation loss turns up from its low before the end by ``needed`` or more of it while
    training loss falls: ``overfitting`` from ``OVERFIT_RISE``, ``early_overfitting`` below it."""
    best, low, rise = upturn(val)
    if best >= len(val) - 1 or rise < needed:
        return None
    best_step, label = val.steps[best], val.name
    evidence: dict[str, Any] = {
        "curve": val.name, "best_eval_step": best_step, f"best_{label}": val.shown(val.values[best]),
        "last_eval_step": val.steps[-1], f"last_{label}": val.shown(val.values[-1]), "eval_low": val.shown(low),
        "eval_rise": rounded(rise), "eval_rise_from_best": rounded(worse(val.values[best], val.values[-1])),
        "train_loss_at_best": None, "last_train_loss": None, "train_loss_drop": None,
    }
    trend = "no training loss recorded to confirm"
    if train is not None:
        at_best, train_end = train.at(best_step), train.level("end")
        if train_end >= at_best:
            return None  # both rise: diverging (caught before) or noise, not overfitting
        evidence.update(train_loss_at_best=at_best, last_train_loss=train.values[-1],
                        train_loss_drop=rounded((at_best - train_end) / (abs(at_best) or 1.0)))
        trend = f"train_loss kept falling {num(at_best)} -> {num(train.values[-1])}"
    if rise >= OVERFIT_RISE:
        return Finding("overfitting", f"{upturn_text(val, best, low, rise)} while {trend}: overfitting", evidence)
    return Finding("early_overfitting", f"{upturn_text(val, best, low, rise)} while {trend}: early signs of "
                                        f"overfitting (overfitting from {percent(OVERFIT_RISE)})", evidence)


def upturn(val: Curve) -> tuple[int, float, float]:
    """Where the validation curve is lowest (the index of the lowest recorded point there), its
    smoothed low, and how far its end level lies above that low, as a share of the low."""
    best, low = val.bottom()
    return best, low, (val.level("end") - low) / (abs(low) or 1.0)


def worse(before: float, after: float) -> float:
    """How much worse ``after`` is than ``before`` (oriented values), as a share of ``before``."""
    return (after - before) / (abs(before) or 1.0)


def upturn_text(val: Curve, best: int, low: float, rise: float) -> str:
    """``eval_loss was best at step 40 (0.299; 0.324 smoothed) and ended 29% worse than that
    smoothed best (40% worse than the point): 0.417 at step 120``: every share with its numbers."""
    point, shown_low = val.shown(val.values[best]), val.shown(low)
    smoothed = abs(low - val.values[best]) > 1e-12
    base = f"{num(point)}; {num(shown_low)} smoothed" if smoothed else num(point)
    from_point = f" ({percent(worse(val.values[best], val.values[-1]))} worse than the point)" if smoothed else ""
    return (f"{val.name} was best at step {val.steps[best]} ({base}) and ended {percent(rise)} worse than that "
            f"{'smoothed ' if smoothed else ''}best{from_point}: {num(val.shown(val.values[-1]))} at step {val.steps[-1]}")


def slow_or_underfitting(primary: Curve, val: Curve | None) -> Finding | None:
    """Still falling steadily with a small total drop (slow), or stuck high and flat (underfitting)."""
    shape = drops(primary)
    val_shape = drops(val) if val is not None else None
    evidence = {"curve": primary.name, "start_step": primary.steps[0], "start_loss": primary.shown(primary.values[0]),
                "last_loss": primary.shown(primary.values[-1]), **shape}
    if val_shape is not None:
        evidence["eval_loss_drop"] = val_shape["total_drop"]
    change = f"{num(primary.shown(primary.values[0]))} -> {num(primary.shown(primary.values[-1]))}"
    falling = [still_falling(curve) for curve in (primary, val) if curve is not None]
    tails = [shape["last_half_drop"], *([val_shape["last_half_drop"]] if val_shape else [])]
    if any(falling) and min(tails) > 0 and shape["total_drop"] < SLOW_MAX_DROP:
        return Finding("slow_convergence", f"{primary.name} was still improving steadily at step {primary.steps[-1]} "
                                           f"({change}, {percent(shape['total_drop'])} in all, "
                                           f"{percent(shape['last_half_drop'])} in the last half): more steps or a "
                                           "higher learning rate would help", evidence)
    if shape["total_drop"] < UNDERFIT_MAX_DROP and (val_shape is None or val_shape["total_drop"] < UNDERFIT_MAX_DROP):
        both = f"{primary.name} and {val.name}" if val is not None else primary.name
        return Finding("underfitting", f"{both} barely improved and levelled off ({change}, "
                                       f"{percent(shape['total_drop'])} better): underfitting, the model learns too "
                                       "little", evidence)
    return None


def still_falling(curve: Curve) -> bool:
    """The last half removes a material share of the start level, not much less than the
    first half did (no plateau), and more than the curve's own noise."""
    shape = drops(curve)
    scale = abs(curve.level("start")) or 1.0
    tail = shape["last_half_drop"]
    return (tail >= SLOW_TAIL_DROP and tail >= SLOW_TAIL_RATIO * max(shape["first_half_drop"], 0.0)
            and tail * scale >= SLOW_NOISE_FACTOR * curve.noise())


def healthy(primary: Curve, val: Curve | None) -> Finding:
    """No trouble: says how far the main curve moved, where the validation curve was best and
    how far above that it ended, and which curves were still improving at the end."""
    shape = drops(primary)
    improving = [curve.name for curve in (primary, val) if curve is not None and still_falling(curve)]
    evidence: dict[str, Any] = {"curve": primary.name, "start_loss": primary.shown(primary.values[0]),
                                "last_loss": primary.shown(primary.values[-1]), "total_drop": shape["total_drop"],
                                "still_improving": improving}
    moved = "fell" if primary.sign > 0 else "rose"
    message = f"{primary.name} {moved} {percent(shape['total_drop'])} ({num(primary.shown(primary.values[0]))} -> " \
              f"{num(primary.shown(primary.values[-1]))})"
    if val is not None:
        best = min(range(len(val)), key=lambda i: (val.values[i], i))
        evidence.update({"best_eval_step": val.steps[best], f"best_{val.name}": val.shown(val.values[best]),
                         f"last_{val.name}": val.shown(val.values[-1])})
        if best == len(val) - 1:
            message += f"; {val.name} was best at its last evaluation (step {val.steps[best]}, " \
                       f"{num(val.shown(val.values[best]))})"
        else:
            _, low, rise = upturn(val)
            evidence.update(eval_low=val.shown(low), eval_rise=rounded(rise))
            message += f"; {upturn_text(val, best, low, rise)}" + (
                f", under the {percent(EARLY_OVERFIT_RISE)} that counts as an upturn" if rise < EARLY_OVERFIT_RISE
                else "")
    if improving:
        return Finding("healthy", f"{message}: no sign of trouble; {' and '.join(improving)} still improving at "
                                  "the end", evidence)
    return Finding("healthy", message + ": no sign of trouble", evidence)


def make_curve(name: str, points: list[tuple[int, float]], sign: float = 1.0) -> Curve | None:
    finite = [(s, v) for s, v in points if math.isfinite(v)]
    if len(finite) < MIN_POINTS:
        return None
    return Curve(name, [s for s, _ in finite], [sign * v for _, v in finite], sign)
