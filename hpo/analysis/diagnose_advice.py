"""The study-wide view of a diagnosis: parameter importance, range edges, base models, advice.

The thresholds named here and why they hold: :mod:`hpo.analysis.diagnose_thresholds`.
Importance is Optuna's fANOVA (seeded, so the same study gives the same shares) over >= ``MIN_TRIALS``
COMPLETE trials whose parameters vary (else ``{}`` and a line saying why); below
``IMPORTANCE_MIN_TRIALS`` it is shown with its trial count and advice names no parameter from
it. A range edge is a searched numeric parameter whose best trials (the best ``BEST_SHARE`` of
the COMPLETE ones, at least 2) all lie within ``EDGE_SHARE`` of one bound, in log space for log
ranges (suggested: x3 beyond a log bound, half the width beyond a linear one, kept in [0, 1]
for a range inside it), or an ordered numeric categorical whose best trials all take its first
or last choice. The module's priors (:mod:`hpo.priors`) bound every suggestion: a range is not
widened, nor a regulariser raised, past its prior; the advice quotes the prior's reason instead.
Advice comes as study-wide :class:`~hpo.analysis.diagnose_rules.Finding` s, each with the trials
behind it: the most shared trial finding first (the more severe on a tie), then edges by
importance, the base-model comparison and the importance.
"""

from __future__ import annotations

import math
import statistics
from typing import TYPE_CHECKING, Any

from hpo.analysis.diagnose_curve import first_value
from hpo.analysis.diagnose_rules import Finding
from hpo.analysis.diagnose_thresholds import (
    BEST_SHARE,
    EARLY_OVERFIT_RISE,
    EDGE_SHARE,
    IMPORTANCE_MIN_TRIALS,
    MIN_POINTS,
    MIN_TRIALS,
    OVERFIT_RISE,
    PRIOR_NEAR,
)
from hpo.formatting import num, percent, sci
from hpo.priors import Prior

if TYPE_CHECKING:
    import optuna
    from optuna.distributions import BaseDistribution
    from optuna.importance import FanovaImportanceEvaluator
    from optuna.trial import FrozenTrial

    from hpo.analysis.diagnose import TrialDiagnosis

REGULARISERS = ("weight_decay", "lora_dropout", "dropout", "hidden_dropout", "attention_dropout")
SEVERITY = {"diverging": 0, "overfitting": 1, "underfitting": 2, "slow_convergence": 3, "early_overfitting": 4}


def importance_evaluator() -> FanovaImportanceEvaluator:
    """fANOVA, seeded. Not Optuna 5's default, PED-ANOVA: that one compares the top 10% of trials
    with the rest (one trial below 20) and ranked the dominant parameter first in 68-80% of
    12-30-trial studies in bench/importance.py, against fANOVA's 90-97%.

    The evaluator remembers its last answer (:class:`RememberedImportance`): the study report asks
    for the same study's importances three times (the diagnosis, the interactive plot, the PNG),
    and fANOVA over a 200-trial study takes ~2 s each time."""
    from optuna.importance import FanovaImportanceEvaluator

    class RememberedFanova(RememberedImportance, FanovaImportanceEvaluator):
        kind = ("fanova", 0)

    return RememberedFanova(seed=0)


class RememberedImportance:
    """An Optuna importance evaluator (mixed in before it) that answers again from memory when
    asked about the same trials: the last answer is kept, keyed by every trial's number, state,
    values, params and distributions, the ``params`` asked for and the evaluator's ``kind`` (its
    method and seed). Only answers for the study's own values (``target=None``) are kept: a
    ``target`` function cannot be compared. ``remembered`` counts the answers given from memory,
    ``computed`` those computed."""

    kind: tuple[Any, ...] = ()
    _last: tuple[Any, dict[str, float]] | None = None
    remembered = computed = 0

    def evaluate(self, study: optuna.Study, params: list[str] | None = None, *, target: Any = None) -> dict[str, float]:
        if target is not None:
            return super().evaluate(study, params=params, target=target)  # type: ignore[misc]
        key = (study.study_name, self.kind, tuple(params) if params is not None else None,
               tuple((t.number, t.state, tuple(t.values or ()), tuple(sorted(t.params.items(), key=lambda kv: kv[0])),
                      repr(sorted(t.distributions.items(), key=lambda kv: kv[0])))
                     for t in study.get_trials(deepcopy=False)))
        last = RememberedImportance._last
        if last is not None and last[0] == key:
            RememberedImportance.remembered += 1
            return dict(last[1])
        answer = super().evaluate(study, params=params, target=target)  # type: ignore[misc]
        RememberedImportance._last = (key, dict(answer))
        RememberedImportance.computed += 1
        return answer


def param_importance(study: optuna.Study, complete: list[FrozenTrial]) -> tuple[dict[str, float], str | None]:
    """Optuna's parameter importances (fANOVA) over the COMPLETE trials, or ``{}`` and the reason why not."""
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
            first = (lambda t: t.values[0]) if len(study.directions) > 1 else None
            shares = optuna.importance.get_param_importances(study, evaluator=importance_evaluator(), target=first)
    except Exception as error:  # noqa: BLE001 - evaluators raise many types on odd studies
        return {}, f"parameter importance could not be computed ({type(error).__name__}: {error})"
    return {name: float(share) for name, share in shares.items()}, None


def range_edges(complete: list[FrozenTrial], direction: str, priors: dict[str, Prior] | None = None) -> list[dict]:
    """Parameters whose best trials all sit at one bound of the searched range; each suggestion
    kept within the parameter's prior (``held_by_prior`` when the bound is the prior's own)."""
    if len(complete) < MIN_TRIALS:
        return []
    ranked = sorted(complete, key=lambda t: float(first_value(t) or 0.0), reverse=direction == "maximize")
    best = ranked[:max(2, math.ceil(BEST_SHARE * len(ranked)))]
    edges = []
    for name in sorted(set.intersection(*(set(t.params) for t in best))):
        if len({repr(t.params.get(name)) for t in complete}) < 2:
            continue  # the same value in every trial: fixed, not searched
        distribution = max((t for t in complete if name in t.distributions), key=lambda t: t.number).distributions[name]
        edge = numeric_edge(name, distribution, [t.params[name] for t in best]) \
            or choice_edge(name, distribution, [t.params[name] for t in best])
        if edge:
            edges.append({**within_prior(edge, (priors or {}).get(name)), "best_trials": [t.number for t in best],
                          "complete": len(complete)})
    return edges


def within_prior(edge: dict, prior: Prior | None) -> dict:
    """The edge with its suggestion kept inside ``prior``: None and ``held_by_prior`` when the
    bound already is where the prior stops, else clipped to the prior (``clipped_by_prior``)."""
    edge = {**edge, "prior": prior.to_dict() if prior else None, "held_by_prior": False, "clipped_by_prior": False}
    wider, upper = edge["suggestion"], edge["bound"] == "upper"
    limit = None if prior is None else prior.high if upper else prior.low
    if limit is None or wider is None or (wider <= limit if upper else wider >= limit):
        return edge
    if (edge["value"] >= limit if upper else edge["value"] <= limit) or edge["scale"] == "choices":
        return {**edge, "suggestion": None, "held_by_prior": True}  # at the prior already, or the next choice past it
    return {**edge, "suggestion": round(limit) if isinstance(wider, int) else limit, "clipped_by_prior": True}


def numeric_edge(name: str, distribution: BaseDistribution, values: list[float]) -> dict | None:
    from optuna.distributions import FloatDistribution, IntDistribution

    if not isinstance(distribution, (FloatDistribution, IntDistribution)) or distribution.high <= distribution.low:
        return None
    low, high, log = distribution.low, distribution.high, distribution.log
    where = math.log if log else float  # log ranges are judged in log space
    wider: float | None
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


def choice_edge(name: str, distribution: BaseDistribution, values: list[Any]) -> dict | None:
    """A categorical parameter whose choices are ordered numbers, the best trials all at one end."""
    from optuna.distributions import CategoricalDistribution

    if not isinstance(distribution, CategoricalDistribution) or len(distribution.choices) < 2:
        return None
    choices = [c for c in distribution.choices if isinstance(c, (int, float)) and not isinstance(c, bool)]
    if len(choices) < len(distribution.choices):
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


def study_findings(trials: list[TrialDiagnosis], sweep: dict, importance: dict[str, float], edges: list[dict],
                   models: dict[str, dict], direction: str, metric: str | None, *, complete: list[int] | None = None,
                   priors: dict[str, Prior] | None = None, importance_why_not: str | None = None) -> list[Finding]:
    """What to try next, as study-wide findings with the trials behind each: trial findings shared
    by the most trials first (the more severe first on a tie), then range edges by parameter
    importance, the model comparison, the importance (``complete``: the COMPLETE trials it rests on)."""
    if not trials:
        return [Finding("no_trials", "no finished trials to diagnose yet: run `hpo search` (or raise --trials)",
                        scope="study")]
    priors = priors or {}
    total = len(trials)
    groups: dict[str, list[TrialDiagnosis]] = {}
    for trial in trials:
        for kind in dict.fromkeys(trial.kinds):
            groups.setdefault(kind, []).append(trial)
    ranked = sorted((kind for kind in groups if kind in SEVERITY), key=lambda k: (-len(groups[k]), SEVERITY[k]))
    found = [finding_advice(kind, groups[kind], trials, total, sweep, priors) for kind in ranked]
    undiagnosed = [t for t in trials if not t.findings]
    if undiagnosed:
        every = sweep.get("eval_every")
        hint = f" (e.g. --set eval_every={max(1, every // 2)})" if isinstance(every, int) else ""
        have = "has" if len(undiagnosed) == 1 else "have"
        found.append(Finding("too_few_evaluations", f"{len(undiagnosed)} of {total} trials {have} fewer than "
                                                    f"{MIN_POINTS} evaluations, too few to judge: evaluate more often"
                                                    f"{hint} to see their curves",
                             {"points": {t.number: t.points for t in undiagnosed}},
                             trials=[t.number for t in undiagnosed], scope="study"))
    healthy = groups.get("healthy", [])
    if not ranked and len(healthy) == total - len(undiagnosed) > 0:
        found.insert(0, Finding("healthy", f"all {len(healthy)} diagnosed trials look healthy: no divergence, "
                                           "overfitting, underfitting or slow convergence",
                                trials=[t.number for t in healthy], scope="study"))
    for edge in sorted(edges, key=lambda e: -importance.get(e["param"], 0.0)):
        found.append(Finding("range_edge", edge_advice(edge), edge, trials=list(edge["best_trials"]), scope="study"))
    rated = [(name, m) for name, m in models.items() if m["best"] is not None]
    if len(rated) >= 2:
        shown = "; ".join(f"{name}: best {num(m['best'])}, median {num(m['median'])} over {m['complete']} trials"
                          for name, m in rated)
        found.append(Finding("models", f"base models by best {metric or 'objective'} ({direction}): {shown}. "
                                       f"{rated[0][0]} starts closer to the task", {"models": models},
                             trials=[t.number for t in trials if t.params.get("model") is not None], scope="study"))
    if importance or importance_why_not:
        found.append(importance_finding(importance, complete or [], importance_why_not))
    return found


def importance_finding(importance: dict[str, float], complete: list[int], why_not: str | None) -> Finding:
    """The importance as advice: the parameters to spend the next sweep on, only when it rests on
    ``IMPORTANCE_MIN_TRIALS`` COMPLETE trials; else its trial count and why no parameter is named."""
    evidence = {"importance": importance, "complete_trials": len(complete), "min_trials": IMPORTANCE_MIN_TRIALS,
                "trusted": importance_trusted(importance, len(complete))}
    if why_not:
        return Finding("importance", why_not, evidence, trials=complete, scope="study")
    if not evidence["trusted"]:
        return Finding("importance", f"parameter importance rests on {len(complete)} COMPLETE trials, fewer than the "
                                     f"{IMPORTANCE_MIN_TRIALS} it takes to rank parameters reliably: no parameter is "
                                     "singled out yet (run more trials to learn which matter)",
                       evidence, trials=complete, scope="study")
    top = sorted(importance.items(), key=lambda kv: -kv[1])[:3]
    return Finding("importance", f"over {len(complete)} COMPLETE trials, the objective depends most on "
                                 + ", ".join(f"{name} ({percent(share)})" for name, share in top)
                                 + ": spend the next sweep's range on these", evidence, trials=complete, scope="study")


def importance_trusted(importance: dict[str, float], complete: int) -> bool:
    """Whether an importance may single out parameters: computed, over ``IMPORTANCE_MIN_TRIALS``
    COMPLETE trials or more (why: that constant's docstring)."""
    return bool(importance) and complete >= IMPORTANCE_MIN_TRIALS


def finding_advice(kind: str, group: list[TrialDiagnosis], trials: list[TrialDiagnosis], total: int,
                   sweep: dict, priors: dict[str, Prior]) -> Finding:
    """One trial-finding kind shared by ``group`` as a line of advice, within the module's priors."""
    numbers = [t.number for t in group]
    count = f"{len(group)} of {total} trials"
    were = "was" if len(group) == 1 else "were"
    rate = learning_rate_name(group)
    budget = sweep.get("max_steps")
    longer = f"--set max_steps={2 * budget}" if isinstance(budget, int) else "a larger max_steps"
    evidence: dict[str, Any] = {}
    if kind == "diverging":
        if rate is None:
            message = f"{count} diverged (NaN/inf or a rising training loss): lower the learning rate, add warmup " \
                      "or gradient clipping"
        else:
            lowest = min(t.params[rate] for t in group if rate in t.params)
            safe = [t.params[rate] for t in trials if rate in t.params and t.number not in numbers
                    and t.params[rate] < lowest]
            target, note = bounded(rate, max(safe) if safe else lowest / 2, priors)
            evidence = {"param": rate, "lowest_diverged": lowest, "suggestion": target}
            message = f"{count} diverged (NaN/inf or a rising training loss) at {rate} >= {sci(lowest)}: lower the " \
                      f"{rate} upper bound (e.g. to {sci(target)}{note}), or add warmup / gradient clipping"
    elif kind in ("overfitting", "early_overfitting"):
        message, evidence = overfit_advice(kind, group, trials, count, sweep, priors)
    elif kind == "slow_convergence":
        pruned = sum(1 for t in group if t.state == "PRUNED")
        cut = f" ({pruned} of them stopped early by the pruner)" if pruned else ""
        if rate is not None:
            highest, note = bounded(rate, max(t.params[rate] for t in group if rate in t.params), priors)
            evidence = {"param": rate, "suggestion": highest}
            message = f"{count} {were} still improving when they ended{cut}, at {rate} <= {sci(highest)}: raise " \
                      f"the {rate} lower bound (e.g. to {sci(highest)}{note}) or train longer ({longer})"
        else:
            message = f"{count} {were} still improving when they ended{cut}: raise the learning rate or train " \
                      f"longer ({longer})"
    else:
        space = {name for t in trials for name in t.params}
        rank = "a higher lora_r" if "lora_r" in space else "a larger adapter (lora_r)"
        message = f"{count} stayed high and flat (underfitting): more steps ({longer}), {rank}, or a higher " \
                  "learning rate"
    return Finding(kind, message, evidence, trials=numbers, scope="study")


def overfit_advice(kind: str, group: list[TrialDiagnosis], trials: list[TrialDiagnosis], count: str, sweep: dict,
                   priors: dict[str, Prior]) -> tuple[str, dict]:
    """Overfitting: raise the regularisers that have room left under their priors, or stop earlier.
    Early signs: keep or stop at each trial's best evaluation."""
    found = [f for t in group for f in t.findings if f.kind == kind]
    steps = [f.evidence["best_eval_step"] for f in found]
    rises = [f.evidence["eval_rise"] for f in found]
    evidence: dict[str, Any] = {"best_eval_steps": steps, "eval_rises": rises}
    if kind == "early_overfitting":
        keep = "" if sweep.get("objective") == "best" else "keep each trial's best evaluation (--set objective=best) or "
        curve = found[0].evidence.get("curve", "eval_loss")
        spread = percent(min(rises)) + ("" if len(set(rises)) == 1 else f"-{percent(max(rises))}")
        return (f"{count} showed early signs of overfitting: {curve} ended {spread} worse than its smoothed best "
                f"({percent(EARLY_OVERFIT_RISE)}-{percent(OVERFIT_RISE)} counts as early signs): {keep}stop at it "
                "(--set patience=2)", evidence)
    space = {name for t in trials for name in t.params}
    knobs = [name for name in REGULARISERS if name in space]
    spent = [name for name in knobs if at_prior_limit(name, group, priors)]
    room = [name for name in knobs if name not in spent]
    evidence.update({"raise": room, "at_prior_limit": spent})
    if not knobs:
        how = "add weight_decay/lora_dropout to the search space or stop earlier"
    elif room:
        limits = ", ".join(f"{name} up to {priors[name].high:g}" for name in room
                           if name in priors and priors[name].high is not None)
        within = f" (within the module's priors: {limits})" if limits else ""
        how = f"raise {'/'.join(room)}{within} or stop earlier"
    else:
        how = "stop earlier"
    message = f"{count} overfit after ~{round(statistics.median(steps))} steps: {how} (--set patience=2)"
    if spent:
        message += f"; {'/'.join(spent)} already near the module's prior limit " \
                   f"({', '.join(f'{priors[name].high:g}' for name in spent)}): not raised"
    return message, evidence


def at_prior_limit(name: str, group: list[TrialDiagnosis], priors: dict[str, Prior]) -> bool:
    """The group's trials already reach ``PRIOR_NEAR`` of the parameter's prior upper bound."""
    prior = priors.get(name)
    values = [t.params[name] for t in group if isinstance(t.params.get(name), (int, float))]
    return bool(prior and prior.high is not None and values and max(values) >= PRIOR_NEAR * prior.high)


def bounded(name: str, value: float, priors: dict[str, Prior]) -> tuple[float, str]:
    """``value`` kept within the parameter's prior, and a note when the prior moved it."""
    prior = priors.get(name)
    if prior is None or prior.allows(value):
        return value, ""
    return prior.clamp(value), f", the module's prior limit: {prior.why}"


def edge_advice(edge: dict) -> str:
    name, bound, at, wider = edge["param"], edge["bound"], edge["value"], edge["suggestion"]
    show = sci if edge["scale"] == "log" else num
    who = f" (the best {len(edge['best_trials'])} of {edge['complete']} COMPLETE trials)" if "complete" in edge else ""
    if edge["scale"] == "choices":
        word = "largest" if bound == "upper" else "smallest"
        head = f"best {name} values{who} all use the {word} choice {num(at)} of {edge['choices']}"
    else:
        head = f"best {name} values{who} lie at the {bound} bound {show(at)}"
    prior = Prior.from_dict(edge["prior"]) if edge.get("prior") else None
    if edge.get("held_by_prior") and prior is not None:
        return f"{head}, where the module's prior stops ({prior.text()}: {prior.why}): keep the range"
    if wider is None:
        return f"{head}, which cannot be widened: consider fixing {name} at {show(at)}"
    limit = f", the module's prior limit: {prior.why}" if edge.get("clipped_by_prior") and prior is not None else ""
    if edge["scale"] == "choices":
        return f"{head}: add {'larger' if bound == 'upper' else 'smaller'} choices (e.g. {num(wider)}{limit})"
    return f"{head}: widen the range (e.g. {'up' if bound == 'upper' else 'down'} to {show(wider)}{limit})"


def learning_rate_name(trials: list[TrialDiagnosis]) -> str | None:
    names = {name for t in trials for name in t.params}
    for name in ("learning_rate", "lr"):
        if name in names:
            return name
    return next((name for name in sorted(names) if "learning_rate" in name), None)
