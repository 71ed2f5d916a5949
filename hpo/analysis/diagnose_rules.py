"""The curve rules: what one trial's learning curves show (:func:`diagnose_curves`).

Reading a curve. Thresholds are shares of the curve's own scale (its start level, or its
lowest level), so they hold for a classification loss of 0.7 and a language-model loss of
10. Curves have 3-30 noisy points, so levels, not points, are compared: a curve's start,
middle and end *level* is the median of k points there (k = 1 for 3-7 points, 2 for 8-11,
3 for 12+), and lowest points are taken on a running median of 3 (5+ points). The rules,
checked in this order; the first that holds is the trial's finding:

* ``diverging`` (learning rate too high): a NaN/inf in a loss curve (evidence ``step``: the
  first one); or the training loss ends >= 10% (``DIVERGE_RISE``) of its start above its
  start, or climbs back from its lowest level by >= 10% of its start, rising on the whole
  from there (Kendall's tau >= 0.3) (``step``: where it turned up). A tenth of the whole
  loss is far above the noise of a settled training loss, far below a real blow-up.
  Without a training loss: the validation curve ends >= 10% above its start.
* ``overfitting``: the validation loss ends >= 8% (``OVERFIT_RISE``) above its lowest
  level, reached before the end, while the training loss ends below its level at that step.
  8% is clear of the 2-3% wobble of a settled validation loss. Evidence:
  ``best_eval_step`` (the lowest recorded value at the smoothed bottom), the losses there
  and at the end, ``eval_rise``, ``train_loss_drop`` since the best step.
* ``slow_convergence`` (learning rate too low): total drop < 35% (``SLOW_MAX_DROP``) of the
  start, and training or validation loss is still falling: its last half removes >= 3%
  (``SLOW_TAIL_DROP``) of the start, >= 0.25x (``SLOW_TAIL_RATIO``) what its first half
  removed, and >= 2x (``SLOW_NOISE_FACTOR``) the curve's own point noise (median absolute
  second difference); the other curve's last half falls too. A converged curve removes
  almost nothing in its second half (ratio < 0.1); a linearly decaying learning rate makes
  even a steadily learning run's ratio about 1/3, hence 0.25.
* ``underfitting``: training and validation loss both end < 10% (``UNDERFIT_MAX_DROP``)
  below their start, without that steady tail: stuck high and flat.
* ``healthy``: none of these (its message says when the loss was still improving at the end).

Measured on the synthetic shapes of tests/test_diagnose.py with 2% noise on every point,
the intended kind comes out in >= 97% of draws for 5-30 points (>= 92% at 3% noise), except
a too-low learning rate under a linear decay, which needs 8+ points (83% at 5); the tests
check >= 90% of 50 draws per shape and length. The objective's curve stands in for
``eval_loss`` when that is missing (a maximised metric turned upside down; evidence keys
then carry its name: ``best_eval_accuracy``). Drops count from the first evaluation (after
``eval_every`` steps), not from step 0; a pretrained model whose loss starts near its floor
(a causal-LM fine-tune) drops little: read ``underfitting`` there with its evidence. With
fewer than 3 finite points (``MIN_POINTS``) only NaN/inf is claimed; otherwise
:func:`diagnose_curves` returns ``[]`` (never ``healthy``) and the trial's entry in
:class:`hpo.analysis.diagnose.StudyDiagnosis` says why in its ``note``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from hpo.analysis.diagnose_curve import Curve, drops, kendall_tau, rounded, to_points
from hpo.formatting import json_safe, num, percent

# The thresholds, as shares of a curve's start (or lowest) level; the module docstring says why.
MIN_POINTS = 3  # finite evaluations needed to judge a curve's shape
DIVERGE_RISE = 0.10  # training loss ends this far above its start, or climbs back this far from its lowest
DIVERGE_STEADY_TAU = 0.3  # ... rising on the whole from its lowest point (Kendall's tau)
OVERFIT_RISE = 0.08  # validation loss ends this far above its lowest level
SLOW_TAIL_DROP = 0.03  # a still-falling curve's last half removes at least this much
SLOW_TAIL_RATIO = 0.25  # ... and at least this share of what its first half removed
SLOW_NOISE_FACTOR = 2.0  # ... and at least this many times its point noise
SLOW_MAX_DROP = 0.35  # slow: less than this dropped in all
UNDERFIT_MAX_DROP = 0.10  # underfitting: less than this dropped, training and validation loss

KINDS = ("diverging", "overfitting", "underfitting", "slow_convergence", "healthy")


@dataclass(frozen=True)
class Finding:
    """One thing a trial's curves show, with the numbers it rests on."""

    kind: str
    """``overfitting``, ``underfitting``, ``diverging``, ``slow_convergence`` or ``healthy``."""
    message: str
    """One line for a person."""
    evidence: dict = field(default_factory=dict)
    """The steps and values behind it (may hold NaN/inf; :meth:`to_dict` makes them strings)."""

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "message": self.message, "evidence": json_safe(self.evidence)}


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
        found = diverging(train) or (overfitting(val, train) if val is not None else None) or slow_or_underfitting(train, val) \
            or healthy(train, val)
    else:
        assert val is not None
        found = diverging_without_train(val) or overfitting(val, None) or slow_or_underfitting(val, None) \
            or healthy(val, None)
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


def overfitting(val: Curve, train: Curve | None) -> Finding | None:
    """Validation loss bottoms out before the end and rises materially while training loss falls."""
    best, best_level = val.bottom()
    end = val.level("end")
    rise = (end - best_level) / (abs(best_level) or 1.0)
    if best >= len(val) - 1 or rise < OVERFIT_RISE:
        return None
    best_step = val.steps[best]
    label = val.name
    evidence: dict[str, Any] = {
        "curve": val.name, "best_eval_step": best_step, f"best_{label}": val.shown(val.values[best]),
        "last_eval_step": val.steps[-1], f"last_{label}": val.shown(val.values[-1]), "eval_rise": rounded(rise),
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
    return Finding("overfitting", f"{label} was best at step {best_step} ({num(val.shown(val.values[best]))}) and "
                                  f"ended {percent(rise)} worse ({num(val.shown(val.values[-1]))} at step "
                                  f"{val.steps[-1]}) while {trend}: overfitting", evidence)


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
    shape = drops(primary)
    evidence: dict[str, Any] = {"curve": primary.name, "start_loss": primary.shown(primary.values[0]),
                                "last_loss": primary.shown(primary.values[-1]), "total_drop": shape["total_drop"]}
    moved = "fell" if primary.sign > 0 else "rose"
    message = f"{primary.name} {moved} {percent(shape['total_drop'])} ({num(primary.shown(primary.values[0]))} -> " \
              f"{num(primary.shown(primary.values[-1]))})"
    if val is not None:
        best = min(range(len(val)), key=lambda i: (val.values[i], i))
        evidence.update({"best_eval_step": val.steps[best], f"best_{val.name}": val.shown(val.values[best]),
                         f"last_{val.name}": val.shown(val.values[-1])})
        message += f"; {val.name} was best at step {val.steps[best]} ({num(val.shown(val.values[best]))})"
    if still_falling(primary):
        return Finding("healthy", message + ": no sign of trouble, and still improving at the end", evidence)
    return Finding("healthy", message + ": no sign of trouble", evidence)


def make_curve(name: str, points: list[tuple[int, float]], sign: float = 1.0) -> Curve | None:
    finite = [(s, v) for s, v in points if math.isfinite(v)]
    if len(finite) < MIN_POINTS:
        return None
    return Curve(name, [s for s, _ in finite], [sign * v for _, v in finite], sign)
