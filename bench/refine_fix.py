"""How often ``hpo refine`` fixes a parameter for its low importance, one that matters and one that does not.

    python bench/refine_fix.py                              # 16 and 24 trials, 30 seeds; ONE JSON line
    python bench/refine_fix.py --trials 12 16 24 32 --seeds 50

No training: each study is ``--trials`` COMPLETE trials sampled at random (seeded) from five
parameters, ``lr`` (1e-4..1e-2, log), ``x``, ``noise`` (0..1), ``weight_decay`` (0..0.1) and
``batch_size`` (8, 16, 32), scored by tests/test_refine.py's planted surface: the loss falls
0.3 per decade of ``lr`` and rises ``2 (x - 0.3)^2``; ``noise``, ``weight_decay`` and
``batch_size`` do not enter it. Each study goes through :func:`hpo.analysis.refine.plan_refinement`
(the diagnosis' fANOVA importance, then refine's rules) and counts, per parameter, the studies
whose importance fell below ``FIX_BELOW`` (``below``) and those refine fixed it in (``fixed``).
What refine does with it: :data:`hpo.analysis.refine_rules.FIX_BELOW`.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
import warnings
from pathlib import Path

import optuna

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PARAMS = ("lr", "x", "noise", "weight_decay", "batch_size")


def loss(params: dict) -> float:
    return 1.0 - 0.3 * (math.log10(params["lr"]) + 4) + 2 * (params["x"] - 0.3) ** 2


def objective(trial: optuna.Trial) -> float:
    return loss({"lr": trial.suggest_float("lr", 1e-4, 1e-2, log=True), "x": trial.suggest_float("x", 0.0, 1.0),
                 "noise": trial.suggest_float("noise", 0.0, 1.0),
                 "weight_decay": trial.suggest_float("weight_decay", 0.0, 0.1),
                 "batch_size": trial.suggest_categorical("batch_size", [8, 16, 32])})


def one_study(trials: int, seed: int) -> tuple[dict[str, float], set[str]]:
    """The importance refine read, and the parameters it fixed, for one seeded random study."""
    from hpo.analysis.refine import plan_refinement

    study = optuna.create_study(direction="minimize", sampler=optuna.samplers.RandomSampler(seed))
    study.set_user_attr("hpo", {"sweep": {"metric": "loss", "direction": "minimize", "max_steps": 60}})
    study.optimize(objective, n_trials=trials)
    plan = plan_refinement(study, {"max_steps": 60})
    from hpo.analysis.diagnose_advice import param_importance

    importance, _ = param_importance(study, study.get_trials(deepcopy=False))  # the diagnosis' own, seeded
    return importance, {c.name for c in plan.params if c.action == "fix"}


def main() -> None:
    from hpo.analysis.refine_rules import FIX_BELOW

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, nargs="+", default=[16, 24])
    parser.add_argument("--seeds", type=int, default=30)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.simplefilter("ignore")
    started = time.time()
    results = {}
    for trials in args.trials:
        below, fixed = dict.fromkeys(PARAMS, 0), dict.fromkeys(PARAMS, 0)
        for seed in range(args.seeds):
            importance, fixes = one_study(trials, seed)
            for name in PARAMS:
                below[name] += importance.get(name, 1.0) < FIX_BELOW
                fixed[name] += name in fixes
        results[trials] = {"below": {k: round(v / args.seeds, 2) for k, v in below.items()},
                           "fixed": {k: round(v / args.seeds, 2) for k, v in fixed.items()}}
        print(json.dumps({"trials": trials, **results[trials]}), file=sys.stderr, flush=True)
    print(json.dumps({"bench": "refine_fix", "fix_below": FIX_BELOW, "seeds": args.seeds, "results": results,
                      "seconds": round(time.time() - started, 1), "machine": f"{platform.machine()}"}))


if __name__ == "__main__":
    main()
