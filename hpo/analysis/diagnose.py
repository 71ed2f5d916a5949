"""Learning-curve diagnosis: what went wrong in each trial of a study, and what to try next.

Behind ``hpo diagnose`` and the HTML report; reads the study and writes nothing. Each
finished trial (COMPLETE, PRUNED, or FAIL with reason ``nan``) brings its ``curves`` user
attr (``{"train_loss": [[step, value], ...], "eval_loss": [...], "<metric>": [...]}``; when
it is missing, its ``intermediate_values`` stand in as the objective's curve), ``reason``
and ``config``; the study's ``hpo`` attr brings the sweep's ``metric``, ``direction`` and
``max_steps``, and the module's priors. :func:`diagnose_curves` is pure arithmetic on one
trial's curves; :func:`diagnose_study` adds the study-wide view: importance, range edges, base
models, advice. Every finding carries the trials behind it (and a data check's, the rows):
:meth:`StudyDiagnosis.all_findings` lists them in one place.

The pieces: :mod:`hpo.analysis.diagnose_thresholds` holds every threshold and why,
:mod:`hpo.analysis.diagnose_rules` the curve rules (one trial), :mod:`hpo.analysis.diagnose_curve`
the arithmetic on one curve, :mod:`hpo.analysis.diagnose_advice` the study-wide view, and
:mod:`hpo.analysis.data_findings` the findings ``hpo check-data`` stored for the study.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from hpo.analysis.diagnose_advice import (
    compare_models,
    importance_trusted,
    param_importance,
    range_edges,
    study_findings,
)
from hpo.analysis.diagnose_curve import first_value, to_points
from hpo.analysis.diagnose_rules import KINDS, MIN_POINTS, Finding, diagnose_curves
from hpo.analysis.diagnose_sft import step_advice, with_step_findings
from hpo.formatting import json_safe
from hpo.priors import stored_priors

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial

__all__ = ["KINDS", "MIN_POINTS", "Finding", "StudyDiagnosis", "TrialDiagnosis", "diagnose_curves", "diagnose_study",
           "diagnose_trial", "is_diagnosed"]


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
    """Share of the objective's variation each parameter explains (Optuna's fANOVA), over
    ``importance_trials`` COMPLETE trials; advice names parameters from it only when
    ``importance_trusted``."""
    edges: list[dict]
    """Parameters whose best values sit at a bound of their range: param, bound, value, suggestion..."""
    advice: list[str]
    """What to try next, most pressing first: the messages of ``study_findings``."""
    models: dict[str, dict]
    """Per base model (a ``model`` param or config key): count (trials), complete, best, median, best_trial."""
    skipped: dict[str, int] = field(default_factory=dict)
    """Trials not diagnosed, by state (and fail reason): running, failed with an error, ..."""
    study_findings: list[Finding] = field(default_factory=list)
    """The advice as findings (scope ``study``), each with the trials behind it and its evidence."""
    importance_trials: int = 0
    """The COMPLETE trials the importance rests on."""
    importance_trusted: bool = False
    """Whether that is enough to single out parameters (``IMPORTANCE_MIN_TRIALS``)."""
    priors: dict[str, dict] = field(default_factory=dict)
    """The module's priors as the study recorded them (:class:`hpo.priors.Prior` as dicts)."""
    data_findings: list[Finding] = field(default_factory=list)
    """What ``hpo check-data`` found in the study's data (scope ``data``, with the rows behind
    each), when its results were found: :func:`hpo.analysis.data_findings.with_data_checks`."""
    data_checks: dict = field(default_factory=dict)
    """Where those came from (``source``, ``files``), or where they were looked for and a ``note``."""

    def counts(self) -> dict[str, int]:
        """How many trials have each finding kind."""
        counts = dict.fromkeys(KINDS, 0)
        for trial in self.trials:
            for kind in dict.fromkeys(trial.kinds):
                counts[kind] = counts.get(kind, 0) + 1
        return counts

    def all_findings(self) -> list[Finding]:
        """Every finding in one list: the study's advice first, then the data's, then each trial's."""
        return [*self.study_findings, *self.data_findings, *(f for t in self.trials for f in t.findings)]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data (non-finite numbers as strings): ``json.dumps(..., allow_nan=False)`` works."""
        return json_safe({
            "study": self.study, "metric": self.metric, "direction": self.direction,
            "trials": [trial.to_dict() for trial in self.trials], "importance": self.importance,
            "importance_trials": self.importance_trials, "importance_trusted": self.importance_trusted,
            "edges": self.edges, "advice": self.advice, "models": self.models, "counts": self.counts(),
            "skipped": self.skipped, "study_findings": [f.to_dict() for f in self.study_findings],
            "priors": self.priors, "data_findings": [f.to_dict() for f in self.data_findings],
            "data_checks": self.data_checks,
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
    findings = with_step_findings(findings, curves)  # answers (sft), loss spikes, gradient norm
    findings = [replace(finding, trials=[trial.number]) for finding in findings]
    note = None
    if not findings:
        where = f" (last at step {last_step})" if last_step is not None else ""
        note = f"only {points} evaluation{'s' if points != 1 else ''}{where}: at least {MIN_POINTS} are needed " \
               "to judge the curves"
    params = trial.user_attrs.get("config") if isinstance(trial.user_attrs.get("config"), dict) else None
    return TrialDiagnosis(trial.number, trial.state.name, findings, first_value(trial), reason,
                          {**(params or {}), **trial.params}, points, note)


def diagnose_study(study: optuna.Study) -> StudyDiagnosis:
    """Diagnose every finished trial, then the study: importance, range edges, models, advice.

    Reads the sweep's ``metric``, ``direction`` and ``max_steps`` and the module's priors from
    the study's ``hpo`` user attr (the study's own direction when it is missing). Writes nothing.
    """
    from optuna.trial import TrialState

    from hpo.record.sweep_record import SweepRecord

    record = SweepRecord.load(study)
    sweep = record.sweep if record else {}
    # A multi-objective study ("a,b" / "maximize,minimize") is diagnosed on its first objective.
    metric = named.split(",")[0] if (named := sweep.get("metric")) else None
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
    complete = [t for t in finished if t.state == TrialState.COMPLETE and (value := first_value(t)) is not None
                and math.isfinite(value)]
    importance, why_not = param_importance(study, complete)
    priors = stored_priors(record.priors if record else None)
    edges = range_edges(complete, direction, priors)
    models = compare_models(trials, direction)
    found = step_advice(trials) + study_findings(trials, sweep, importance, edges, models, direction, metric,
                           complete=[t.number for t in complete], priors=priors, importance_why_not=why_not)
    return StudyDiagnosis(study.study_name, metric, direction, trials, importance, edges, [f.message for f in found],
                          models, skipped, found, len(complete), importance_trusted(importance, len(complete)),
                          {name: prior.to_dict() for name, prior in priors.items()})
