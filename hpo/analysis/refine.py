"""What the next sweep should search, from a study and its diagnosis: the decisions of ``hpo refine``.

:func:`plan_refinement` reads a finished study through :func:`hpo.analysis.diagnose.diagnose_study`
and returns a :class:`Plan`: for each searched parameter a new distribution, a fixed value or
no change (the rules are in :mod:`hpo.analysis.refine_rules`), and for the sweep a larger
``max_steps`` or early stopping, each with the one-line reason that
:mod:`hpo.analysis.refine_module` writes beside it. Nothing is written here.

The best trials are the best quarter of the finished ones, at least 2, all COMPLETE (see
:mod:`hpo.analysis.refine_rules`). When at least half of them were still improving at the end (a
validation curve still falling by ``diagnose_rules.still_falling``, or found slow to
converge), ``max_steps`` grows ``STEPS_FACTOR`` times; when at least half of them
overfit, the regularisers' ranges are raised and early stopping is switched on (``patience``
``PATIENCE``), unless more of them were still improving; a regulariser is raised no further than
the module's prior or its outer bound (:func:`hpo.analysis.refine_rules.raise_limit`), and one
already there is said so, not raised. Parameters are fixed for a low importance only when the
diagnosis trusts its importance (``importance_trusted``); below that, the plan's notes say so.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from hpo.analysis.diagnose import diagnose_study
from hpo.analysis.diagnose_advice import REGULARISERS
from hpo.analysis.diagnose_curve import first_value, to_points
from hpo.analysis.diagnose_rules import make_curve, still_falling
from hpo.analysis.diagnose_thresholds import IMPORTANCE_MIN_TRIALS
from hpo.analysis.refine_rules import FIX_BELOW, Change, Evidence, param_change, raise_limit
from hpo.errors import HpoError
from hpo.formatting import percent

if TYPE_CHECKING:
    import optuna
    from optuna.distributions import BaseDistribution
    from optuna.trial import FrozenTrial

    from hpo.analysis.diagnose import StudyDiagnosis

STEPS_FACTOR = 2
"""max_steps grows by this when the best trials were still improving (as ``hpo diagnose`` advises)."""
PATIENCE = 2
"""Evaluations without a lower eval_loss before a trial stops, when the best trials overfit."""


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


def plan_refinement(study: optuna.Study, sweep: dict) -> Plan:
    """The next sweep's space and budget from ``study`` (``sweep``: its recorded settings).

    Raises HpoError when the study has several objectives or no COMPLETE trial with a finite value.
    """
    if len(study.directions) > 1:
        raise HpoError(f"study {study.study_name!r} has {len(study.directions)} objectives; hpo refine ranks trials "
                       "by one: refine the module by hand from `hpo best` (its Pareto front) and `hpo diagnose`")
    from optuna.trial import TrialState

    diagnosis = diagnose_study(study)
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if (value := first_value(t)) is not None and math.isfinite(value)]
    if not complete:
        raise HpoError(f"study {study.study_name!r} has no COMPLETE trial to learn from; run more trials first "
                       f"(`hpo status --study {study.study_name}` shows how each one ended)")
    pruned = study.get_trials(deepcopy=False, states=(TrialState.PRUNED,))
    evidence = read_evidence(complete, pruned, diagnosis, sweep)
    params = [param_change(name, distribution, evidence) for name, distribution in searched(study).items()]
    notes = [change.note for change in params if change.note]
    untrusted = importance_note(diagnosis)
    if untrusted:
        notes.append(untrusted)
    if evidence.fit == "overfitting":
        notes += regularise_notes(evidence, params)
    counts = Counter(trial.state.name for trial in study.get_trials(deepcopy=False))
    best = evidence.ranked[0]
    return Plan(study.study_name, diagnosis.metric, diagnosis.direction, dict(counts),
                (best.number, float(first_value(best) or 0.0)), params, sweep_changes(evidence, sweep), notes)


def importance_note(diagnosis: StudyDiagnosis) -> str | None:
    """Why no parameter is fixed for a low importance when the diagnosis does not trust it
    (``importance_trusted``, the same rule ``hpo diagnose`` names parameters by); None when it does."""
    if diagnosis.importance_trusted:
        return None
    if not diagnosis.importance:
        why = next((f.message for f in diagnosis.study_findings if f.kind == "importance"), "none was computed")
        return f"no parameter is fixed for a low importance: {why}"
    low = ", ".join(f"{name} {percent(share)}" for name, share in diagnosis.importance.items() if share < FIX_BELOW)
    shares = f" (below {percent(FIX_BELOW)} now: {low})" if low else ""
    return (f"parameter importance rests on {diagnosis.importance_trials} COMPLETE trials, fewer than the "
            f"{IMPORTANCE_MIN_TRIALS} `hpo diagnose` trusts it from: no parameter is fixed for a low importance"
            f"{shares}; run more trials to learn which do not matter")


def regularise_notes(evidence: Evidence, params: list[Change]) -> list[str]:
    """When the best trials overfit: each searched regulariser that was not raised, and why (at
    its limit already, :func:`~hpo.analysis.refine_rules.raise_limit`), or that the space searches none."""
    searched_ones = [change for change in params if change.name in REGULARISERS]
    if not searched_ones:
        return [f"{evidence.fit_reason}, and the space searches no {'/'.join(REGULARISERS[:2])} range to raise: "
                "add one"]
    notes = []
    for change in searched_ones:
        if change.action == "regularise":
            continue
        limit = raise_limit(change.name, change.before, evidence.priors.get(change.name)) \
            if hasattr(change.before, "high") else None
        why = f"its range already reaches {limit[1]}" if limit and change.before.high >= limit[0] else change.reason
        notes.append(f"{change.name} not raised although the best trials overfit: {why}")
    return notes


def read_evidence(complete: list[FrozenTrial], pruned: list[FrozenTrial], diagnosis: StudyDiagnosis,
                  sweep: dict) -> Evidence:
    """The trials ranked, and whether the best of them mostly overfit or were still improving at the end."""
    ranked = sorted(complete, key=lambda t: float(first_value(t) or 0.0), reverse=diagnosis.direction == "maximize")
    sign = -1.0 if diagnosis.direction == "maximize" else 1.0

    def stopped(trial: FrozenTrial) -> tuple[int, float]:
        """The later stopped first; at the same step, the better objective there first."""
        step = max(trial.intermediate_values, default=0)
        value = trial.intermediate_values.get(step, math.nan)
        return -step, sign * value if math.isfinite(value) else math.inf

    pruned = sorted(pruned, key=stopped)
    evidence = Evidence(ranked, pruned, diagnosis)
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
        return Evidence(ranked, pruned, diagnosis, "overfitting",
                        f"{len(rises)} of the {len(top)} best trials overfit (their validation loss ended {by}above "
                        f"its lowest: trial{'s' if len(rises) > 1 else ''} {', '.join(str(n) for n in rises)})")
    if len(improving) >= half:
        by_curve: dict[str, list[str]] = {}
        for number, curve in improving.items():
            by_curve.setdefault(curve, []).append(str(number))
        shown = "; ".join(f"{curve}: trial{'s' if len(numbers) > 1 else ''} {', '.join(numbers)}"
                          for curve, numbers in by_curve.items())
        return Evidence(ranked, pruned, diagnosis, "improving",
                        f"{len(improving)} of the {len(top)} best trials "
                        f"{'was still improving when it' if len(improving) == 1 else 'were still improving when they'} "
                        f"ended at step "
                        f"{sweep.get('max_steps', '?')} ({shown})")
    return evidence


def improving_curve(trial: FrozenTrial, kinds: list[str], diagnosis: StudyDiagnosis) -> str | None:
    """What says ``trial`` was still improving at its end: found slow to converge, or a
    validation curve still falling (``diagnose_rules.still_falling``); None if nothing does.
    Found underfitting (flat from the start) does not count: more of the same steps teach such a
    trial little; a higher learning rate does, which the ranges take care of."""
    if "slow_convergence" in kinds:
        return "found slow_convergence"
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
