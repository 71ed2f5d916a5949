"""What the next sweep should search, from a study and its diagnosis: the decisions of ``hpo refine``.

:func:`plan_refinement` reads a finished study through :func:`hpo.analysis.diagnose.diagnose_study`
and returns a :class:`Plan`: for each searched parameter a new distribution, a fixed value or
no change, and for the sweep a larger ``max_steps`` or early stopping, each with the one-line
reason that :mod:`hpo.analysis.refine_module` writes beside it. Nothing is written here.

The best trials are the best quarter of the COMPLETE ones, at least 2 (what ``hpo diagnose``
calls range edges on). Each searched parameter gets the first rule that holds:

1. **regularise**: at least half of the best trials overfit; a searched weight_decay or
   dropout range (``REGULARISERS``) starts at the most the best trials used and reaches
   twice as far (x3 on a log range; a dropout stays at or below ``DROPOUT_CAP``).
2. **fix**: its importance is below ``FIX_BELOW``, rests on at least
   ``IMPORTANCE_MIN_TRIALS`` COMPLETE trials, and the best trials disagree on it (their
   values span ``FIX_SPREAD`` of its range or more, or take two choices or more): fixed at
   the best trial's value. Importance over a dozen trials is noisy (an irrelevant parameter
   took 53%, and one that mattered 3%, in draws of 12 trials here); best trials that agree
   on a value say it matters, whatever the importance says.
3. **widen**: the best trials all sit at one bound (``range_edges``): that bound moves to
   the diagnosis' suggestion, the other side narrows as in 4.
4. **narrow**: from ``NARROW_MIN_TRIALS`` COMPLETE trials on, the range shrinks to the span
   of the best trials' values with ``NARROW_MARGIN`` of the old width to spare on each side
   (in log space for a log range), unless that keeps ``NARROW_MIN_GAIN`` of it anyway.
   Choices: a choice tried ``CHOICE_MIN_TRIES`` times or more, none of them in the better
   half of the COMPLETE trials, is dropped.

The sweep: when at least half of the best trials were still improving at the end (a
validation curve still falling by ``diagnose_rules.still_falling``, or found slow or
underfitting), ``max_steps`` doubles; when at least half of them overfit, early stopping is
switched on (``patience`` ``PATIENCE``).

The module's priors: a range keeps its scale (log or linear, step, integer); it grows only
past a bound the best trials pressed against, one step (the diagnosis' suggestion, which
keeps a non-negative range non-negative and a fraction within [0, 1]); and a list of
choices is the module's own: a choice is dropped on evidence, never invented (the best
trials all at the largest batch size is said, not acted on).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from hpo.analysis.diagnose import diagnose_study
from hpo.analysis.diagnose_advice import BEST_SHARE, REGULARISERS
from hpo.analysis.diagnose_curve import first_value, to_points
from hpo.analysis.diagnose_rules import make_curve, still_falling
from hpo.errors import HpoError
from hpo.formatting import num, percent, sci

if TYPE_CHECKING:
    import optuna
    from optuna.distributions import BaseDistribution
    from optuna.trial import FrozenTrial

    from hpo.analysis.diagnose import StudyDiagnosis

IMPORTANCE_MIN_TRIALS = 10
"""COMPLETE trials an importance must rest on before a parameter is fixed for it: with fewer,
a parameter that does not matter often takes a fifth of the share by chance (8 trials, 3
parameters: an irrelevant one got 23% here). To be aligned with the diagnosis' own trust rule."""
FIX_BELOW = 0.05
"""A parameter explaining less than this share of the objective's variation is fixed."""
FIX_SPREAD = 0.5
"""...and the best trials' values of it must span at least this share of its range (log space for a log range)."""
NARROW_MIN_TRIALS = 6
"""COMPLETE trials before a range is narrowed: around 2 of 3 trials it would be a guess."""
NARROW_MARGIN = 0.2
"""Share of the old width kept on each side of the best trials' span (so at least 40% stays)."""
NARROW_MIN_GAIN = 0.8
"""A narrowed range still this wide (share of the old width) is not worth the change."""
CHOICE_MIN_TRIES = 3
"""Tries before a choice may be dropped: a choice that does not matter has all of its 3
tries in the worse half by chance 1 time in 8 (1 in 4 with 2)."""
STEPS_FACTOR = 2
"""max_steps grows by this when the best trials were still improving (as ``hpo diagnose`` advises)."""
PATIENCE = 2
"""Evaluations without a lower eval_loss before a trial stops, when the best trials overfit."""
DROPOUT_CAP = 0.5
"""The most a dropout range is raised to: past it most of the signal is dropped."""


@dataclass(frozen=True)
class Fixed:
    """A parameter the next sweep no longer searches: this value in every trial."""

    value: Any


@dataclass(frozen=True)
class Change:
    """One decision: a parameter's new distribution (or :class:`Fixed` value), or a sweep field's new value."""

    name: str
    action: str
    """``narrow``, ``widen``, ``regularise``, ``fix``, ``drop choices``, ``raise`` or ``keep``."""
    before: Any
    after: Any
    reason: str
    note: str | None = None
    """Something seen and not acted on (a choice the module does not list, say), for the docstring."""

    @property
    def changed(self) -> bool:
        return self.action != "keep"


@dataclass(frozen=True)
class Plan:
    """What :func:`plan_refinement` decided, and from what."""

    study: str
    metric: str | None
    direction: str
    counts: dict[str, int]
    """Trials by state."""
    best: tuple[int, float]
    """The best COMPLETE trial's number and value."""
    params: list[Change]
    sweep: list[Change]
    notes: list[str] = field(default_factory=list)
    """What was seen but not acted on, and why."""




@dataclass(frozen=True)
class Evidence:
    """The study as the rules read it."""

    ranked: list[FrozenTrial]
    """The COMPLETE trials, best first."""
    diagnosis: StudyDiagnosis
    fit: str | None = None
    """``overfitting`` or ``improving`` when at least half of the best trials show it, else None."""
    fit_reason: str = ""

    @property
    def top(self) -> list[FrozenTrial]:
        return self.ranked[:max(2, math.ceil(BEST_SHARE * len(self.ranked)))]

    @property
    def better_half(self) -> set[int]:
        return {t.number for t in self.ranked[:math.ceil(len(self.ranked) / 2)]}

    def numbers(self, trials: list[FrozenTrial] | None = None) -> str:
        return ", ".join(str(t.number) for t in (self.top if trials is None else trials))


def plan_refinement(study: optuna.Study, sweep: dict) -> Plan:
    """The next sweep's space and budget from ``study`` (``sweep``: its recorded settings).

    Raises HpoError when the study has several objectives or no COMPLETE trial with a finite value.
    """
    if len(study.directions) > 1:
        raise HpoError(f"study {study.study_name!r} has {len(study.directions)} objectives; hpo refine ranks trials "
                       "by one: refine the module by hand from `hpo best` (its Pareto front) and `hpo diagnose`")
    diagnosis = diagnose_study(study)
    complete = [t for t in study.get_trials(deepcopy=False)
                if t.state.name == "COMPLETE" and first_value(t) is not None and math.isfinite(first_value(t))]
    if not complete:
        raise HpoError(f"study {study.study_name!r} has no COMPLETE trial to learn from; run more trials first "
                       f"(`hpo status --study {study.study_name}` shows how each one ended)")
    evidence = read_evidence(complete, diagnosis, sweep)
    params = [param_change(name, distribution, evidence) for name, distribution in searched(study).items()]
    notes = [change.note for change in params if change.note]
    if evidence.fit == "overfitting" and not any(change.action == "regularise" for change in params):
        notes.append(f"{evidence.fit_reason}, and the space searches no {'/'.join(REGULARISERS[:2])} range to raise: "
                     "add one")
    counts: dict[str, int] = {}
    for trial in study.get_trials(deepcopy=False):
        counts[trial.state.name] = counts.get(trial.state.name, 0) + 1
    best = evidence.ranked[0]
    return Plan(study.study_name, diagnosis.metric, diagnosis.direction, counts, (best.number, float(first_value(best))),
                params, sweep_changes(evidence, sweep), notes)


def read_evidence(complete: list[FrozenTrial], diagnosis: StudyDiagnosis, sweep: dict) -> Evidence:
    """The trials ranked, and whether the best of them mostly overfit or were still improving at the end."""
    ranked = sorted(complete, key=lambda t: float(first_value(t) or 0.0), reverse=diagnosis.direction == "maximize")
    evidence = Evidence(ranked, diagnosis)
    top = evidence.top
    findings = {t.number: t.findings for t in diagnosis.trials}
    rises = {t.number: f.evidence.get("eval_rise") for t in top for f in findings.get(t.number, [])
             if f.kind == "overfitting"}
    improving = {t.number: curve for t in top if t.number not in rises
                 and (curve := improving_curve(t, [f.kind for f in findings.get(t.number, [])], diagnosis))}
    half = math.ceil(len(top) / 2)
    if len(rises) >= half and len(rises) >= len(improving):
        known = sorted(rise for rise in rises.values() if isinstance(rise, (int, float)))
        by = f"{percent(known[0])}-{percent(known[-1])} " if len(known) > 1 else f"{percent(known[0])} " if known else ""
        return Evidence(ranked, diagnosis, "overfitting",
                        f"{len(rises)} of the {len(top)} best trials overfit (their validation loss ended {by}above "
                        f"its lowest: trial{'s' if len(rises) > 1 else ''} {', '.join(str(n) for n in rises)})")
    if len(improving) >= half:
        by_curve: dict[str, list[str]] = {}
        for number, curve in improving.items():
            by_curve.setdefault(curve, []).append(str(number))
        shown = "; ".join(f"{curve}: trial{'s' if len(numbers) > 1 else ''} {', '.join(numbers)}"
                          for curve, numbers in by_curve.items())
        return Evidence(ranked, diagnosis, "improving",
                        f"{len(improving)} of the {len(top)} best trials were still improving when they ended at step "
                        f"{sweep.get('max_steps', '?')} ({shown})")
    return evidence


def improving_curve(trial: FrozenTrial, kinds: list[str], diagnosis: StudyDiagnosis) -> str | None:
    """What says ``trial`` was still improving at its end: found slow or underfitting, or a
    validation curve still falling (``diagnose_rules.still_falling``); None if nothing does."""
    for kind in ("slow_convergence", "underfitting"):
        if kind in kinds:
            return f"found {kind}"
    curves = trial.user_attrs.get("curves")
    metric = diagnosis.metric or "objective"
    if not isinstance(curves, dict) or not curves:
        curves = {metric: sorted(trial.intermediate_values.items())}
    for name, sign in (("eval_loss", 1.0), (metric, -1.0 if diagnosis.direction == "maximize" else 1.0)):
        curve = make_curve(name, to_points(curves.get(name)), sign)
        if curve is not None and still_falling(curve):
            return f"{name} still {'rising' if sign < 0 else 'falling'}"
    return None


def searched(study: optuna.Study) -> dict[str, BaseDistribution]:
    """Each parameter the study searched, with its distribution in the latest finished trial that has it."""
    found: dict[str, BaseDistribution] = {}
    for trial in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        if trial.state.is_finished():
            found.update(trial.distributions)
    return found


def param_change(name: str, distribution: BaseDistribution, evidence: Evidence) -> Change:
    """The first rule of the module docstring that holds for one parameter."""
    from optuna.distributions import CategoricalDistribution

    values = [t.params[name] for t in evidence.top if name in t.params]
    if not values:
        return Change(name, "keep", distribution, distribution, f"none of the best trials ({evidence.numbers()}) has it")
    numeric = not isinstance(distribution, CategoricalDistribution)
    if numeric and evidence.fit == "overfitting" and name in REGULARISERS:
        raised = regularise(name, distribution, values, evidence)
        if raised is not None:
            return raised
    fixed = fix(name, distribution, values, evidence)
    if fixed is not None:
        return fixed
    if not numeric:
        return choices_change(name, distribution, evidence)
    return range_change(name, distribution, values, evidence)


def fix(name: str, distribution: Any, values: list[Any], evidence: Evidence) -> Change | None:
    """Fixed at the best trial's value when it barely matters, by its importance and by the best trials' spread."""
    share = evidence.diagnosis.importance.get(name)
    if share is None or share >= FIX_BELOW or len(evidence.ranked) < IMPORTANCE_MIN_TRIALS:
        return None
    if hasattr(distribution, "choices"):
        spread, enough = f"{len({repr(v) for v in values})} choices", len({repr(v) for v in values}) >= 2
    else:
        width = max(to_unit(v, distribution) for v in values) - min(to_unit(v, distribution) for v in values)
        spread, enough = f"{percent(width)} of its range", width >= FIX_SPREAD
    if not enough:
        return None
    best = next(t for t in evidence.ranked if name in t.params)
    value = tidy(best.params[name])
    return Change(name, "fix", distribution, Fixed(value),
                  f"its importance is {percent(share)} over {len(evidence.ranked)} complete trials (below "
                  f"{percent(FIX_BELOW)}) and the best trials ({evidence.numbers()}) spread over {spread}: it barely "
                  f"moves {evidence.diagnosis.metric or 'the objective'}, so it is fixed at best trial {best.number}'s "
                  f"{show(value)}, one dimension less to search")


def regularise(name: str, distribution: Any, values: list[float], evidence: Evidence) -> Change | None:
    """A weight_decay or dropout range raised: from the most the best trials used to twice as far."""
    low, high = distribution.low, distribution.high
    end = high * 3 if distribution.log else high + (high - low)
    cap = DROPOUT_CAP if "dropout" in name else 1.0 if 0 <= low < high <= 1 else None
    if cap is not None:
        end = min(end, max(cap, high))
    show = sci if distribution.log else num
    start = round_significant(max(values), up=False)
    after = rebuild(distribution, max(low, start), tidy(end))
    if after.high <= after.low or (after.low, after.high) == (low, high):
        return None
    return Change(name, "regularise", distribution, after,
                  f"{evidence.fit_reason}: more regularisation, from the most the best trials used ({show(start)}) to "
                  f"{show(after.high)}")


def range_change(name: str, distribution: Any, values: list[float], evidence: Evidence) -> Change:
    """Widened past a bound the best trials pressed against, and/or narrowed around them."""
    low, high = distribution.low, distribution.high
    show = sci if distribution.log else num
    spread = f"{evidence.numbers()}: " + (show(values[0]) if min(values) == max(values) else
                                          f"{show(min(values))}..{show(max(values))}")
    narrowing = len(evidence.ranked) >= NARROW_MIN_TRIALS and high > low
    new_low, new_high = low, high
    if narrowing:
        positions = [to_unit(v, distribution) for v in values]
        new_low = max(low, from_unit(max(0.0, min(positions) - NARROW_MARGIN), distribution, up=False))
        new_high = min(high, from_unit(min(1.0, max(positions) + NARROW_MARGIN), distribution, up=True))
    edge = next((e for e in evidence.diagnosis.edges if e["param"] == name and e["scale"] != "choices"), None)
    if edge is not None and edge["suggestion"] is not None:
        wider = tidy(edge["suggestion"])
        new_low, new_high = (new_low, wider) if edge["bound"] == "upper" else (wider, new_high)
        after = rebuild(distribution, new_low, new_high)
        other = (after.low != low) if edge["bound"] == "upper" else (after.high != high)
        return Change(name, "widen", distribution, after,
                      f"the best trials ({spread}) all sat at its {edge['bound']} bound {show(edge['value'])}: widened "
                      f"past it to {show(wider)}" + (", the other side narrowed around them" if other else ""))
    after = rebuild(distribution, new_low, new_high)
    kept = (to_unit(after.high, distribution) - to_unit(after.low, distribution)) if high > low else 1.0
    if narrowing and kept < NARROW_MIN_GAIN:
        return Change(name, "narrow", distribution, after,
                      f"narrowed around the best trials ({spread}), with {percent(NARROW_MARGIN)} of the old width to "
                      f"spare on each side")
    if edge is not None:
        why = f"the best trials ({spread}) sit at its {edge['bound']} bound {show(edge['value'])}, which cannot be widened"
    elif not narrowing:
        why = f"{len(evidence.ranked)} complete trials: narrowing needs {NARROW_MIN_TRIALS}"
    else:
        why = f"the best trials ({spread}) span most of it"
    return Change(name, "keep", distribution, distribution, why)


def choices_change(name: str, distribution: Any, evidence: Evidence) -> Change:
    """Choices dropped on evidence (tried often, never in the better half); none added."""
    choices = list(distribution.choices)
    edge = next((e for e in evidence.diagnosis.edges if e["param"] == name and e["scale"] == "choices"), None)
    note = None
    if edge is not None:
        word = "largest" if edge["bound"] == "upper" else "smallest"
        note = (f"the best trials ({evidence.numbers()}) all used the {word} {name}, {num(edge['value'])}: no "
                f"{'larger' if edge['bound'] == 'upper' else 'smaller'} choice (e.g. {num(edge['suggestion'])}) is "
                "added, the choices are the module's own (its priors); add one by hand if they allow it")
    dropped: dict[Any, int] = {}
    if len(evidence.ranked) >= NARROW_MIN_TRIALS:
        for choice in choices:
            tries = [t for t in evidence.ranked if repr(t.params.get(name, ...)) == repr(choice)]
            if len(tries) >= CHOICE_MIN_TRIES and not any(t.number in evidence.better_half for t in tries):
                dropped[repr(choice)] = len(tries)
    kept = [choice for choice in choices if repr(choice) not in dropped]
    if not dropped:
        used = sorted({repr(v) for v in (t.params[name] for t in evidence.top if name in t.params)})
        return Change(name, "keep", distribution, distribution,
                      f"no choice was tried {CHOICE_MIN_TRIES}+ times and always in the worse half (best trials: "
                      f"{', '.join(used)})", note)
    why = ", ".join(f"{shown} ({count} tries)" for shown, count in dropped.items())
    reason = f"dropped {why}: none of those trials was in the better half of the {len(evidence.ranked)} complete ones"
    if len(kept) == 1:
        return Change(name, "fix", distribution, Fixed(kept[0]), f"{reason}; {kept[0]!r} is all that is left", note)
    from optuna.distributions import CategoricalDistribution

    return Change(name, "drop choices", distribution, CategoricalDistribution(kept), reason, note)


def sweep_changes(evidence: Evidence, sweep: dict) -> list[Change]:
    """More steps when the best trials were still improving; early stopping when they overfit."""
    if evidence.fit == "improving" and isinstance(sweep.get("max_steps"), int):
        steps = sweep["max_steps"]
        return [Change("max_steps", "raise", steps, steps * STEPS_FACTOR,
                       f"{evidence.fit_reason}: {STEPS_FACTOR}x the steps")]
    if evidence.fit == "overfitting" and not sweep.get("patience"):
        return [Change("patience", "raise", sweep.get("patience"), PATIENCE,
                       f"{evidence.fit_reason}: early stopping ends a trial after {PATIENCE} evaluations without a "
                       "lower eval_loss")]
    return []


# --- numbers -------------------------------------------------------------------------------

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
