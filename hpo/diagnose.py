"""Learning-curve diagnosis: what went wrong in each trial of a study, and what to try next.

Behind ``hpo diagnose`` and the HTML report; reads the study and writes nothing. Each
finished trial (COMPLETE, PRUNED, or FAIL with reason ``nan``) brings its ``curves`` user
attr (``{"train_loss": [[step, value], ...], "eval_loss": [...], "<metric>": [...]}``; when
it is missing, its ``intermediate_values`` stand in as the objective's curve), ``reason``
and ``config``; the study's ``hpo`` attr brings the sweep's ``metric``, ``direction`` and
``max_steps``. :func:`diagnose_curves` is pure arithmetic on one trial's curves;
:func:`diagnose_study` adds the study-wide view: importance, range edges, base models, advice.

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
:class:`StudyDiagnosis` says why in its ``note``.

The study: importance is Optuna's default evaluator over >= 3 COMPLETE trials whose
parameters vary (else ``{}`` and a line of advice saying why). A range edge is a searched
numeric parameter whose best trials (the best quarter of the COMPLETE ones, at least 2) all
lie within 10% (``EDGE_SHARE``) of one bound, in log space for log ranges (suggested: x3
beyond a log bound, half the width beyond a linear one, kept in [0, 1] for a range inside
it), or an ordered numeric categorical whose best trials all take its first or last choice.
Advice comes most shared finding first (the more severe on a tie), then edges by
importance, the base-model comparison and the most important parameters.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial

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


# --- the study ---------------------------------------------------------------------------

MIN_TRIALS = 3
"""COMPLETE trials needed for parameter importance and range edges."""
BEST_SHARE = 0.25
"""The best quarter of the COMPLETE trials (at least 2) is what range edges look at."""
EDGE_SHARE = 0.10
"""A value within a tenth of the range (in log space for log ranges) of a bound sits at it."""
REGULARISERS = ("weight_decay", "lora_dropout", "dropout", "hidden_dropout", "attention_dropout")
SEVERITY = {"diverging": 0, "overfitting": 1, "underfitting": 2, "slow_convergence": 3}


@dataclass(frozen=True)
class TrialDiagnosis:
    """One finished trial: its state, objective value, parameters and findings."""

    number: int
    state: str
    """``COMPLETE``, ``PRUNED`` or ``FAIL`` (only with reason ``nan``)."""
    findings: list[Finding]
    value: float | None = None
    reason: str | None = None
    params: dict = field(default_factory=dict)
    points: int = 0
    """Evaluations recorded (the longest finite curve)."""
    note: str | None = None
    """Why there are no findings (too few points), else None."""

    @property
    def kinds(self) -> list[str]:
        return [finding.kind for finding in self.findings]

    def to_dict(self) -> dict[str, Any]:
        return json_safe({"number": self.number, "state": self.state,
                          "findings": [finding.to_dict() for finding in self.findings], "value": self.value,
                          "reason": self.reason, "params": self.params, "points": self.points, "note": self.note})


@dataclass(frozen=True)
class StudyDiagnosis:
    """A study's diagnosis: each finished trial's findings, and the study-wide view."""

    study: str
    metric: str | None
    direction: str
    trials: list[TrialDiagnosis]
    importance: dict[str, float]
    """Share of the objective's variation each parameter explains (Optuna's default evaluator)."""
    edges: list[dict]
    """Parameters whose best values sit at a bound of their range: param, bound, value, suggestion..."""
    advice: list[str]
    """What to try next, most pressing first."""
    models: dict[str, dict]
    """Per base model (a ``model`` param or config key): count (trials), complete, best, median, best_trial."""
    skipped: dict[str, int] = field(default_factory=dict)
    """Trials not diagnosed, by state (and fail reason): running, failed with an error, ..."""

    def counts(self) -> dict[str, int]:
        """How many trials have each finding kind."""
        counts = dict.fromkeys(KINDS, 0)
        for trial in self.trials:
            for kind in dict.fromkeys(trial.kinds):
                counts[kind] = counts.get(kind, 0) + 1
        return counts

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data (non-finite numbers as strings): ``json.dumps(..., allow_nan=False)`` works."""
        return json_safe({
            "study": self.study, "metric": self.metric, "direction": self.direction,
            "trials": [trial.to_dict() for trial in self.trials], "importance": self.importance,
            "edges": self.edges, "advice": self.advice, "models": self.models, "counts": self.counts(),
            "skipped": self.skipped,
        })


def is_diagnosed(trial: FrozenTrial) -> bool:
    """COMPLETE, PRUNED, or FAIL because the loss became NaN/inf: trials whose curves tell something."""
    from optuna.trial import TrialState

    return trial.state in (TrialState.COMPLETE, TrialState.PRUNED) or (
        trial.state == TrialState.FAIL and trial.user_attrs.get("reason") == "nan")


def diagnose_trial(trial: FrozenTrial, *, metric: str | None = None, direction: str | None = None,
                   max_steps: int | None = None) -> TrialDiagnosis:
    """Findings for one trial, from its ``curves`` user attr or else its intermediate values.

    A FAIL trial with reason ``nan`` is diverging even when its curves hold no NaN (the loss
    may have blown up between evaluations).
    """
    curves = trial.user_attrs.get("curves")
    if not isinstance(curves, dict) or not curves:
        metric = metric or "objective"
        curves = {metric: sorted(trial.intermediate_values.items())}
    findings = diagnose_curves(curves, max_steps=max_steps, metric=metric, direction=direction)
    reason = trial.user_attrs.get("reason")
    used = [to_points(curves.get(name)) for name in ("train_loss", "eval_loss", metric) if name in curves]
    points = max((sum(math.isfinite(v) for _, v in pairs) for pairs in used), default=0)
    last_step = max((s for pairs in used for s, _ in pairs), default=None)
    if reason == "nan" and not any(f.kind == "diverging" for f in findings):
        findings = [Finding("diverging", f"the trial failed with a NaN/inf loss after step {last_step}: the "
                                         "learning rate is likely too high",
                            {"step": last_step, "reason": "nan", "error": trial.user_attrs.get("error")})]
    note = None
    if not findings:
        where = f" (last at step {last_step})" if last_step is not None else ""
        note = f"only {points} evaluation{'s' if points != 1 else ''}{where}: at least {MIN_POINTS} are needed " \
               "to judge the curves"
    params = trial.user_attrs.get("config") if isinstance(trial.user_attrs.get("config"), dict) else None
    return TrialDiagnosis(trial.number, trial.state.name, findings, _value(trial), reason,
                          {**(params or {}), **trial.params}, points, note)


def diagnose_study(study: optuna.Study) -> StudyDiagnosis:
    """Diagnose every finished trial, then the study: importance, range edges, models, advice.

    Reads the sweep's ``metric``, ``direction`` and ``max_steps`` from the study's ``hpo``
    user attr (the study's own direction when it is missing). Writes nothing.
    """
    from optuna.trial import TrialState

    sweep = (study.user_attrs.get("hpo") or {}).get("sweep") or {}
    # A multi-objective study ("a,b" / "maximize,minimize") is diagnosed on its first objective.
    metric = sweep.get("metric").split(",")[0] if sweep.get("metric") else None
    direction = (sweep.get("direction") or study.directions[0].name.lower()).split(",")[0]
    everything = study.get_trials(deepcopy=False)
    finished = [t for t in everything if is_diagnosed(t)]
    skipped: dict[str, int] = {}
    for trial in everything:
        if not is_diagnosed(trial):
            key = trial.state.name + (f" ({trial.user_attrs['reason']})" if trial.user_attrs.get("reason") else "")
            skipped[key] = skipped.get(key, 0) + 1
    trials = [diagnose_trial(t, metric=metric, direction=direction, max_steps=sweep.get("max_steps"))
              for t in finished]
    complete = [t for t in finished if t.state == TrialState.COMPLETE and _value(t) is not None
                and math.isfinite(_value(t))]
    importance, why_not = param_importance(study, complete)
    edges = range_edges(complete, direction)
    models = compare_models(trials, direction)
    advice = study_advice(trials, sweep, importance, edges, models, direction, metric)
    if why_not:
        advice.append(why_not)
    return StudyDiagnosis(study.study_name, metric, direction, trials, importance, edges, advice, models, skipped)


def _value(trial: FrozenTrial) -> float | None:
    """The trial's value; a multi-objective trial's first (``trial.value`` raises there)."""
    return trial.values[0] if trial.values else None


def param_importance(study: optuna.Study, complete: list[FrozenTrial]) -> tuple[dict[str, float], str | None]:
    """Optuna's parameter importances over the COMPLETE trials, or ``{}`` and the reason why not."""
    if len(complete) < MIN_TRIALS:
        return {}, f"parameter importance needs at least {MIN_TRIALS} COMPLETE trials; the study has {len(complete)}"
    varying = {name for name in {n for t in complete for n in t.params}
               if len({repr(t.params.get(name)) for t in complete}) > 1}
    if not varying:
        return {}, "parameter importance needs parameters that vary between COMPLETE trials; none do"
    try:
        import warnings

        import optuna

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            first = {"target": lambda t: t.values[0]} if len(study.directions) > 1 else {}
            shares = optuna.importance.get_param_importances(study, **first)
    except Exception as error:  # noqa: BLE001 - evaluators raise many types on odd studies
        return {}, f"parameter importance could not be computed ({type(error).__name__}: {error})"
    return {name: float(share) for name, share in shares.items()}, None


def range_edges(complete: list[FrozenTrial], direction: str) -> list[dict]:
    """Parameters whose best trials all sit at one bound of the searched range."""
    if len(complete) < MIN_TRIALS:
        return []
    ranked = sorted(complete, key=lambda t: float(_value(t) or 0.0), reverse=direction == "maximize")
    best = ranked[:max(2, math.ceil(BEST_SHARE * len(ranked)))]
    edges = []
    for name in sorted(set.intersection(*(set(t.params) for t in best))):
        if len({repr(t.params.get(name)) for t in complete}) < 2:
            continue  # the same value in every trial: fixed, not searched
        distribution = max((t for t in complete if name in t.distributions), key=lambda t: t.number).distributions[name]
        edge = numeric_edge(name, distribution, [t.params[name] for t in best]) \
            or choice_edge(name, distribution, [t.params[name] for t in best])
        if edge:
            edges.append({**edge, "best_trials": [t.number for t in best]})
    return edges


def numeric_edge(name: str, distribution: Any, values: list[float]) -> dict | None:
    from optuna.distributions import FloatDistribution, IntDistribution

    if not isinstance(distribution, (FloatDistribution, IntDistribution)) or distribution.high <= distribution.low:
        return None
    low, high, log = distribution.low, distribution.high, distribution.log
    where = math.log if log else float  # log ranges are judged in log space
    positions = [(where(v) - where(low)) / (where(high) - where(low)) for v in values]
    if min(positions) >= 1 - EDGE_SHARE:
        bound, at = "upper", high
        wider = high * 3 if log else high + (high - low) / 2
        if 0 <= low < high <= 1 and not log:
            wider = min(wider, 1.0) if high < 1 else None  # a range inside [0, 1] is taken for a fraction
    elif max(positions) <= EDGE_SHARE:
        bound, at = "lower", low
        wider = low / 3 if log else low - (high - low) / 2
        if not log and low >= 0:
            wider = max(wider, 0.0) if low > 0 else None  # nothing below 0 for a non-negative range
    else:
        return None
    if wider is not None and isinstance(distribution, IntDistribution):
        wider = max(1, math.ceil(wider) if bound == "upper" else math.floor(wider)) if log else round(wider)
    return {"param": name, "bound": bound, "value": at, "suggestion": wider, "scale": "log" if log else "linear",
            "best_values": values}


def choice_edge(name: str, distribution: Any, values: list[Any]) -> dict | None:
    """A categorical parameter whose choices are ordered numbers, the best trials all at one end."""
    from optuna.distributions import CategoricalDistribution

    if not isinstance(distribution, CategoricalDistribution) or len(distribution.choices) < 2:
        return None
    choices = list(distribution.choices)
    if not all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in choices):
        return None
    ordered = sorted(choices)
    if ordered != choices and ordered != choices[::-1] or len(set(choices)) != len(choices):
        return None
    for bound, at, neighbour in (("upper", ordered[-1], ordered[-2]), ("lower", ordered[0], ordered[1])):
        if all(v == at for v in values):
            if at > 0 and neighbour > 0:
                wider = at * (at / neighbour)  # geometric steps (8, 16, 32 -> 64)
            else:
                wider = at + (at - neighbour)
            if all(isinstance(c, int) for c in choices):
                wider = round(wider)
            return {"param": name, "bound": bound, "value": at, "suggestion": wider, "scale": "choices",
                    "best_values": values, "choices": choices}
    return None


def compare_models(trials: list[TrialDiagnosis], direction: str) -> dict[str, dict]:
    """Per base model (a ``model`` param or config key): how many trials, best and median objective."""
    by_model: dict[str, list[TrialDiagnosis]] = {}
    for trial in trials:
        if trial.params.get("model") is not None:
            by_model.setdefault(str(trial.params["model"]), []).append(trial)
    models = {}
    for model, group in by_model.items():
        done = [t for t in group if t.state == "COMPLETE" and t.value is not None and math.isfinite(t.value)]
        pick = max if direction == "maximize" else min
        values = {t.number: float(t.value or 0.0) for t in done}
        top = pick(values, key=values.__getitem__) if values else None
        models[model] = {"count": len(group), "complete": len(done), "best": values[top] if top is not None else None,
                         "median": statistics.median(values.values()) if values else None, "best_trial": top}
    sign = -1 if direction == "maximize" else 1
    return dict(sorted(models.items(), key=lambda kv: (kv[1]["best"] is None, sign * (kv[1]["best"] or 0.0))))


def study_advice(trials: list[TrialDiagnosis], sweep: dict, importance: dict[str, float], edges: list[dict],
                 models: dict[str, dict], direction: str, metric: str | None) -> list[str]:
    """What to try next: findings shared by the most trials first (the more severe first on a
    tie), then range edges by parameter importance, the model comparison, the importances."""
    if not trials:
        return ["no finished trials to diagnose yet: run `hpo search` (or raise --trials)"]
    total = len(trials)
    groups: dict[str, list[TrialDiagnosis]] = {}
    for trial in trials:
        for kind in dict.fromkeys(trial.kinds):
            groups.setdefault(kind, []).append(trial)
    ranked = sorted((kind for kind in groups if kind in SEVERITY), key=lambda k: (-len(groups[k]), SEVERITY[k]))
    advice = [finding_advice(kind, groups[kind], trials, total, sweep) for kind in ranked]
    undiagnosed = [t for t in trials if not t.findings]
    if undiagnosed:
        every = sweep.get("eval_every")
        hint = f" (e.g. --set eval_every={max(1, every // 2)})" if isinstance(every, int) else ""
        have = "has" if len(undiagnosed) == 1 else "have"
        advice.append(f"{len(undiagnosed)} of {total} trials {have} fewer than {MIN_POINTS} evaluations, too few to "
                      f"judge: evaluate more often{hint} to see their curves")
    if not ranked and len(groups.get("healthy", [])) == total - len(undiagnosed) > 0:
        advice.insert(0, f"all {total - len(undiagnosed)} diagnosed trials look healthy: no divergence, "
                         "overfitting, underfitting or slow convergence")
    for edge in sorted(edges, key=lambda e: -importance.get(e["param"], 0.0)):
        advice.append(edge_advice(edge))
    rated = [(name, m) for name, m in models.items() if m["best"] is not None]
    if len(rated) >= 2:
        shown = "; ".join(f"{name}: best {num(m['best'])}, median {num(m['median'])} over {m['complete']} trials"
                          for name, m in rated)
        advice.append(f"base models by best {metric or 'objective'} ({direction}): {shown}. {rated[0][0]} starts "
                      "closer to the task")
    if importance:
        top = sorted(importance.items(), key=lambda kv: -kv[1])[:3]
        advice.append("the objective depends most on " + ", ".join(f"{name} ({percent(share)})" for name, share in top)
                      + ": spend the next sweep's range on these")
    return advice


def finding_advice(kind: str, group: list[TrialDiagnosis], trials: list[TrialDiagnosis], total: int,
                   sweep: dict) -> str:
    count = f"{len(group)} of {total} trials"
    were = "was" if len(group) == 1 else "were"
    rate = learning_rate_name(group)
    budget = sweep.get("max_steps")
    longer = f"--set max_steps={2 * budget}" if isinstance(budget, int) else "a larger max_steps"
    if kind == "diverging":
        if rate is None:
            return f"{count} diverged (NaN/inf or a rising training loss): lower the learning rate, add warmup or " \
                   "gradient clipping"
        numbers = {t.number for t in group}
        lowest = min(t.params[rate] for t in group if rate in t.params)
        safe = [t.params[rate] for t in trials if rate in t.params and t.number not in numbers
                and t.params[rate] < lowest]
        target = max(safe) if safe else lowest / 2
        return f"{count} diverged (NaN/inf or a rising training loss) at {rate} >= {sci(lowest)}: lower the {rate} " \
               f"upper bound (e.g. to {sci(target)}), or add warmup / gradient clipping"
    if kind == "overfitting":
        steps = [f.evidence["best_eval_step"] for t in group for f in t.findings if f.kind == kind]
        space = {name for t in trials for name in t.params}
        knobs = [name for name in REGULARISERS if name in space]
        raise_ = f"raise {'/'.join(knobs)}" if knobs else "add weight_decay/lora_dropout to the search space"
        return f"{count} overfit after ~{round(statistics.median(steps))} steps: {raise_} or stop earlier " \
               "(--set patience=2)"
    if kind == "slow_convergence":
        pruned = sum(1 for t in group if t.state == "PRUNED")
        cut = f" ({pruned} of them stopped early by the pruner)" if pruned else ""
        if rate is not None:
            highest = max(t.params[rate] for t in group if rate in t.params)
            return f"{count} {were} still improving when they ended{cut}, at {rate} <= {sci(highest)}: raise the " \
                   f"{rate} lower bound (e.g. to {sci(highest)}) or train longer ({longer})"
        return f"{count} {were} still improving when they ended{cut}: raise the learning rate or train longer ({longer})"
    space = {name for t in trials for name in t.params}
    rank = "a higher lora_r" if "lora_r" in space else "a larger adapter (lora_r)"
    return f"{count} stayed high and flat (underfitting): more steps ({longer}), {rank}, or a higher learning rate"


def edge_advice(edge: dict) -> str:
    name, bound, at, wider = edge["param"], edge["bound"], edge["value"], edge["suggestion"]
    show = sci if edge["scale"] == "log" else num
    if edge["scale"] == "choices":
        word = "largest" if bound == "upper" else "smallest"
        return f"best {name} values all use the {word} choice {num(at)} of {edge['choices']}: add " \
               f"{'larger' if bound == 'upper' else 'smaller'} choices (e.g. {num(wider)})"
    if wider is None:
        return f"best {name} values lie at the {bound} bound {show(at)}, which cannot be widened: consider fixing " \
               f"{name} at {show(at)}"
    return f"best {name} values lie at the {bound} bound {show(at)}: widen the range " \
           f"(e.g. {'up' if bound == 'upper' else 'down'} to {show(wider)})"


def learning_rate_name(trials: list[TrialDiagnosis]) -> str | None:
    names = {name for t in trials for name in t.params}
    for name in ("learning_rate", "lr"):
        if name in names:
            return name
    return next((name for name in sorted(names) if "learning_rate" in name), None)


# --- helpers -------------------------------------------------------------------------------

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


def make_curve(name: str, points: list[tuple[int, float]], sign: float = 1.0) -> Curve | None:
    finite = [(s, v) for s, v in points if math.isfinite(v)]
    if len(finite) < MIN_POINTS:
        return None
    return Curve(name, [s for s, _ in finite], [sign * v for _, v in finite], sign)


def rounded(share: float) -> float:
    return round(share, 4)


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

