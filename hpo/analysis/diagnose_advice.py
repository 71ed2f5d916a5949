"""The study-wide view of a diagnosis: parameter importance, range edges, base models, advice.

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
from typing import TYPE_CHECKING, Any

from hpo.analysis.diagnose_curve import first_value
from hpo.analysis.diagnose_rules import MIN_POINTS
from hpo.formatting import num, percent, sci

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial

    from hpo.analysis.diagnose import TrialDiagnosis

MIN_TRIALS = 3
"""COMPLETE trials needed for parameter importance and range edges."""
BEST_SHARE = 0.25
"""The best quarter of the COMPLETE trials (at least 2) is what range edges look at."""
EDGE_SHARE = 0.10
"""A value within a tenth of the range (in log space for log ranges) of a bound sits at it."""
REGULARISERS = ("weight_decay", "lora_dropout", "dropout", "hidden_dropout", "attention_dropout")
SEVERITY = {"diverging": 0, "overfitting": 1, "underfitting": 2, "slow_convergence": 3}


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
