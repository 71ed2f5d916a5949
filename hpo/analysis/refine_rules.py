"""The per-parameter rules of ``hpo refine``: what the next sweep searches for one parameter.

:func:`param_change` gives each searched parameter the first rule that holds, with its reason
(:mod:`hpo.analysis.refine` reads the study and the sweep around it):

1. **regularise**: at least half of the best trials overfit; a searched weight_decay or
   dropout range (``REGULARISERS``) starts at the most the best trials used and reaches
   twice as far (x3 on a log range), but no further than the module's prior for it
   (:mod:`hpo.priors`, recorded on the study) nor the parameter's outer bound (``outer_bound``:
   a dropout ``DROPOUT_CAP``, a range inside [0, 1] 1), whichever is lower; a range already
   past one of them is not raised further (:func:`raise_limit`).
2. **fix**: its importance (the diagnosis' own: fANOVA, :func:`hpo.analysis.diagnose.diagnose_study`)
   is below ``FIX_BELOW``, the diagnosis trusts it (``importance_trusted``: at least
   ``diagnose_thresholds.IMPORTANCE_MIN_TRIALS`` COMPLETE trials, the one rule for both), and
   the best trials disagree on it (their values span ``FIX_SPREAD`` of its range or more, or
   take two choices or more): fixed at the best trial's value. Below the trusted count nothing
   is fixed for its importance (:mod:`hpo.analysis.refine` says so in the module it writes).
   Importance ranks, it does not prove: a parameter that mattered fell below 5% in some
   studies (``FIX_BELOW``); best trials that agree on a value say it matters, whatever the
   importance says.
3. **widen**: the best trials all sit at one bound (``range_edges``): that bound moves to
   the diagnosis' suggestion, the other side narrows as in 4.
4. **narrow**: from ``NARROW_MIN_TRIALS`` finished trials on, the range shrinks to a trust
   region around the best trials: the span of their values with ``NARROW_MARGIN`` of the old
   width to spare on each side (in log space for a log range), unless that keeps
   ``NARROW_MIN_GAIN`` of it anyway. The idea is TuRBO's (Eriksson et al., "Scalable Global
   Optimization via Local Bayesian Optimization", NeurIPS 2019): search a box around the
   incumbent, not the whole space; its box starts at 0.8 of each side, this one at 0.4 or more
   (a second round, warm-started with the incumbent). Choices: a choice tried
   ``CHOICE_MIN_TRIES`` times or more, none of them in the better half of the finished
   trials, is dropped.

Finished trials are ranked as Optuna's TPE ranks them: the COMPLETE ones, best first, then
the PRUNED ones (the later stopped first, then the better objective at that step). With ASHA
most trials of a small sweep are pruned, and they too say where the good region is not. The
best trials are the COMPLETE ones among the best quarter of the finished ones (at least 2),
less those that ended no better than the median finished trial's last evaluation (a trial
that learned nothing in its whole budget, that the pruner let through for want of rivals,
is not a best trial); the best COMPLETE trial always counts.

The module's priors: a range keeps its scale (log or linear, step, integer); it grows only
past a bound the best trials pressed against, one step (the diagnosis' suggestion, which
keeps a non-negative range non-negative and a fraction within [0, 1], and stops at the
module's prior, quoting its reason); a regulariser is raised within its prior; and a list of
choices is the module's own: a choice is dropped on evidence, never invented (the best
trials all at the largest batch size is said, not acted on).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hpo.analysis.diagnose_advice import BEST_SHARE, REGULARISERS
from hpo.analysis.diagnose_curve import first_value
from hpo.analysis.refine_ranges import Fixed, from_unit, rebuild, round_significant, show, tidy, to_unit
from hpo.formatting import num, percent, sci
from hpo.priors import Prior, stored_priors

if TYPE_CHECKING:
    from optuna.distributions import BaseDistribution
    from optuna.trial import FrozenTrial

    from hpo.analysis.diagnose import StudyDiagnosis

FIX_BELOW = 0.05
"""A parameter explaining less than this share of the objective's variation is fixed (with
``FIX_SPREAD``, and only on a trusted importance). Measured by ``python bench/refine_fix.py
--trials 12 16 24 --seeds 30`` (random studies of tests/test_refine.py's planted surface, on
which a log learning rate and x matter and noise, weight_decay and batch_size do not): refine
fixes the irrelevant noise in 30% of 12-trial studies, 63% of 16-trial and 87% of 24-trial ones
(weight_decay 13%, 37%, 73%), and the learning rate, which matters, in 0, 1 and 0 of 30, though
fANOVA gave it under 5% in 20%, 30% and 13% of them: the best trials' agreement on it
(``FIX_SPREAD``) is what keeps it searched."""
FIX_SPREAD = 0.5
"""...and the best trials' values of it must span at least this share of its range (log space for a log range)."""
NARROW_MIN_TRIALS = 6
"""Finished trials before a range is narrowed: fewer do not show where the good region is not."""
NARROW_MARGIN = 0.2
"""Share of the old width kept on each side of the best trials' span (so at least 40% stays)."""
NARROW_MIN_GAIN = 0.8
"""A narrowed range still this wide (share of the old width) is not worth the change."""
CHOICE_MIN_TRIES = 3
"""Tries before a choice may be dropped: a choice that does not matter has all of its 3
tries in the worse half by chance 1 time in 8 (1 in 4 with 2)."""
DROPOUT_CAP = 0.5
"""The most a dropout range is raised to: past it most of the signal is dropped."""


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
class Evidence:
    """The study as the rules read it."""

    ranked: list[FrozenTrial]
    """The COMPLETE trials, best first."""
    pruned: list[FrozenTrial]
    """The PRUNED trials, the later stopped first."""
    diagnosis: StudyDiagnosis
    fit: str | None = None
    """``overfitting`` or ``improving`` when at least half of the best trials show it, else None."""
    fit_reason: str = ""

    @property
    def top(self) -> list[FrozenTrial]:
        """The best trials (see the module docstring), best first."""
        sign = -1.0 if self.diagnosis.direction == "maximize" else 1.0
        lasts = sorted(sign * v for v in map(last_value, self.finished) if v is not None and math.isfinite(v))
        median = statistics.median(lasts) if lasts else math.inf
        count = max(2, math.ceil(BEST_SHARE * len(self.finished)))
        return [t for i, t in enumerate(self.ranked[:count]) if i == 0 or sign * float(first_value(t) or 0.0) < median]

    @property
    def priors(self) -> dict[str, Prior]:
        """The module's priors, as the study recorded them."""
        return stored_priors(self.diagnosis.priors)

    @property
    def finished(self) -> list[FrozenTrial]:
        """The COMPLETE trials, best first, then the PRUNED ones."""
        return self.ranked + self.pruned

    @property
    def better_half(self) -> set[int]:
        return {t.number for t in self.finished[:math.ceil(len(self.finished) / 2)]}

    def numbers(self) -> str:
        """The best trials' numbers, for a reason: ``7, 3, 9``."""
        return ", ".join(str(t.number) for t in self.top)


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
    diagnosis = evidence.diagnosis
    share = diagnosis.importance.get(name)
    if share is None or share >= FIX_BELOW or not diagnosis.importance_trusted:
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
                  f"its importance is {percent(share)} over {diagnosis.importance_trials} complete trials (below "
                  f"{percent(FIX_BELOW)}) and the best trials ({evidence.numbers()}) spread over {spread}: it barely "
                  f"moves {evidence.diagnosis.metric or 'the objective'}, so it is fixed at best trial {best.number}'s "
                  f"{show(value)}, one dimension less to search")


def regularise(name: str, distribution: Any, values: list[float], evidence: Evidence) -> Change | None:
    """A weight_decay or dropout range raised: from the most the best trials used to twice as far,
    within :func:`raise_limit`. None when that leaves the range as it was (it already reaches the limit)."""
    low, high = distribution.low, distribution.high
    end = high * 3 if distribution.log else high + (high - low)
    limit = raise_limit(name, distribution, evidence.priors.get(name))
    held = ""
    if limit is not None and end > max(limit[0], high):
        end = max(limit[0], high)
        held = f", {limit[1]}" if limit[0] >= high else f", its own upper bound (already past {limit[1]})"
    show = sci if distribution.log else num
    start = round_significant(max(values), up=False)
    after = rebuild(distribution, max(low, start), tidy(end))
    if after.high <= after.low or (after.low, after.high) == (low, high):
        return None
    return Change(name, "regularise", distribution, after,
                  f"{evidence.fit_reason}: more regularisation, from the most the best trials used ({show(start)}) to "
                  f"{show(after.high)}{held}")


def raise_limit(name: str, distribution: Any, prior: Prior | None) -> tuple[float, str] | None:
    """How far a regulariser may be raised, and the words for it: the module's prior's upper
    bound or the parameter's :func:`outer_bound`, whichever is lower; None when neither bounds it."""
    limits = []
    if prior is not None and prior.high is not None:
        limits.append((prior.high, f"the module's prior limit ({prior.text()}: {prior.why})"))
    outer = outer_bound(name, distribution)
    if outer is not None:
        limits.append(outer)
    return min(limits, key=lambda limit: limit[0]) if limits else None


def outer_bound(name: str, distribution: Any) -> tuple[float, str] | None:
    """The most a regulariser can sensibly take whatever the study says: a dropout
    ``DROPOUT_CAP``, a range inside [0, 1] (a fraction, as weight decay is) 1; None otherwise."""
    if "dropout" in name:
        return DROPOUT_CAP, f"the most a dropout is raised to ({num(DROPOUT_CAP)}: past it most of the signal is dropped)"
    if 0 <= distribution.low < distribution.high <= 1:
        return 1.0, "its outer bound (1: a fraction)"
    return None


def range_change(name: str, distribution: Any, values: list[float], evidence: Evidence) -> Change:
    """Widened past a bound the best trials pressed against, and/or narrowed around them."""
    low, high = distribution.low, distribution.high
    show = sci if distribution.log else num
    spread = f"{evidence.numbers()}: " + (show(values[0]) if min(values) == max(values) else
                                          f"{show(min(values))}..{show(max(values))}")
    narrowing = len(evidence.finished) >= NARROW_MIN_TRIALS and high > low
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
        pressed = edge["best_values"]
        at = show(pressed[0]) if min(pressed) == max(pressed) else f"{show(min(pressed))}..{show(max(pressed))}"
        return Change(name, "widen", distribution, after,
                      f"the best trials ({', '.join(str(n) for n in edge['best_trials'])}: {at}) all sat at its "
                      f"{edge['bound']} bound {show(edge['value'])}: widened past it to {show(wider)}"
                      + (f", {prior_words(edge)}" if edge.get("clipped_by_prior") else "")
                      + ("" if not other else ", the other side narrowed around them"
                         if edge["best_trials"] == [t.number for t in evidence.top]
                         else f", the other side narrowed around the best trials ({spread})"))
    after = rebuild(distribution, new_low, new_high)
    kept = (to_unit(after.high, distribution) - to_unit(after.low, distribution)) if high > low else 1.0
    if narrowing and kept < NARROW_MIN_GAIN:
        return Change(name, "narrow", distribution, after,
                      f"narrowed around the best trials ({spread}), with {percent(NARROW_MARGIN)} of the old width to "
                      f"spare on each side")
    if edge is not None and edge.get("held_by_prior"):
        why = f"the best trials ({spread}) sit at its {edge['bound']} bound {show(edge['value'])}, where " \
              f"{prior_words(edge)} stops: not widened"
    elif edge is not None:
        why = f"the best trials ({spread}) sit at its {edge['bound']} bound {show(edge['value'])}, which cannot be widened"
    elif not narrowing:
        why = f"{len(evidence.finished)} finished trials: narrowing needs {NARROW_MIN_TRIALS}"
    else:
        why = f"the best trials ({spread}) span most of it"
    return Change(name, "keep", distribution, distribution, why)


def choices_change(name: str, distribution: Any, evidence: Evidence) -> Change:
    """Choices dropped on evidence (tried often, never in the better half); none added."""
    choices = list(distribution.choices)
    edge = next((e for e in evidence.diagnosis.edges if e["param"] == name and e["scale"] == "choices"), None)
    note = None
    if edge is not None:
        word, more = ("largest", "larger") if edge["bound"] == "upper" else ("smallest", "smaller")
        head = (f"the best trials ({', '.join(str(n) for n in edge['best_trials'])}) all used the {word} {name}, "
                f"{num(edge['value'])}")
        if edge.get("held_by_prior"):
            note = f"{head}, where {prior_words(edge)} stops: no {more} choice is added"
        else:
            note = (f"{head}: no {more} choice (e.g. {num(edge['suggestion'])}) is added, the choices are the "
                    "module's own (its priors); add one by hand if they allow it")
    dropped: dict[Any, int] = {}
    if len(evidence.finished) >= NARROW_MIN_TRIALS:
        for choice in choices:
            tries = [t for t in evidence.finished if repr(t.params.get(name, ...)) == repr(choice)]
            if len(tries) >= CHOICE_MIN_TRIES and not any(t.number in evidence.better_half for t in tries):
                dropped[repr(choice)] = len(tries)
    kept = [choice for choice in choices if repr(choice) not in dropped]
    if not dropped:
        used = sorted({repr(v) for v in (t.params[name] for t in evidence.top if name in t.params)})
        return Change(name, "keep", distribution, distribution,
                      f"no choice was tried {CHOICE_MIN_TRIES}+ times and always in the worse half (best trials: "
                      f"{', '.join(used)})", note)
    why = ", ".join(f"{shown} ({count} tries)" for shown, count in dropped.items())
    reason = f"dropped {why}: none of those trials was in the better half of the {len(evidence.finished)} finished ones"
    if len(kept) == 1:
        return Change(name, "fix", distribution, Fixed(kept[0]), f"{reason}; {kept[0]!r} is all that is left", note)
    from optuna.distributions import CategoricalDistribution

    return Change(name, "drop choices", distribution, CategoricalDistribution(kept), reason, note)


def prior_words(edge: dict) -> str:
    """The module's prior an edge met (``range_edges`` records it), in words: ``the module's prior
    (nothing above 32: LoRA pays more ...)``."""
    prior = Prior.from_dict(edge["prior"]) if edge.get("prior") else None
    return f"the module's prior ({prior.text()}: {prior.why})" if prior else "the module's prior"


def last_value(trial: FrozenTrial) -> float | None:
    """A finished trial's objective at its end: a COMPLETE trial's value, a PRUNED one's last report."""
    if trial.values:
        return first_value(trial)
    step = max(trial.intermediate_values, default=None)
    return None if step is None else trial.intermediate_values[step]
