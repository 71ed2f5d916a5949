"""How many COMPLETE trials a parameter importance needs before it can be believed.

    python bench/importance.py                          # fANOVA and PED-ANOVA, 5-30 trials, 30 seeds
    python bench/importance.py --trials 8 12 20 --seeds 50 --evaluators fanova

No training: trials are sampled from the shipped ``search_spaces/lora.py`` space with its
sampler (``tpe-qmc``) and scored by bench/samplers.py's LoRA-like surface, on which the
learning rate dominates by construction (a parabola in log10 of it, 0.4 per decade squared,
against a few thousandths for the other parameters). Two questions per evaluator and trial
count, over ``--seeds`` studies:

* ``top_is_learning_rate``: the share of studies whose most important parameter is the
  learning rate (a trustworthy ranking says so nearly always);
* ``noise_dominant``: the same studies with the objective replaced by pure noise (no
  parameter matters): the share whose top parameter still gets >= half of the importance
  (what a reader would take for "the objective depends most on X").

Evaluators: ``fanova`` (Optuna's ``FanovaImportanceEvaluator``, seed 0: a random forest of
64 trees over the trials) and ``ped-anova`` (Optuna 5's default, ``PedAnovaImportanceEvaluator``:
where the top 10% of trials sit against all of them; one trial below 20). Prints one JSON line.
What the diagnosis does with it: :data:`hpo.analysis.diagnose_thresholds.IMPORTANCE_MIN_TRIALS`.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import optuna

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from samplers import Surface  # noqa: E402 - the bench folder is not a package


def evaluator(name: str) -> optuna.importance.BaseImportanceEvaluator:
    from optuna.importance import FanovaImportanceEvaluator, PedAnovaImportanceEvaluator

    return FanovaImportanceEvaluator(seed=0) if name == "fanova" else PedAnovaImportanceEvaluator()


def study_of(loaded, seed: int, trials: int, noise_only: bool) -> optuna.Study:
    """``trials`` trials of the module's space with its sampler, scored by the surface (or by noise)."""
    from hpo import space as spaces
    from hpo.record.samplers import make_sampler

    surface = Surface(seed, 0.01)
    rng = np.random.default_rng(seed)
    study = optuna.create_study(direction="maximize", sampler=make_sampler("tpe-qmc", seed, trials))

    def objective(trial: optuna.Trial) -> float:
        params = spaces.call_space(loaded, trial)
        return float(rng.normal(0.8, 0.05)) if noise_only else surface.observe(params)

    study.optimize(objective, n_trials=trials)
    return study


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--module", default=str(REPO / "search_spaces" / "lora.py"))
    parser.add_argument("--trials", type=int, nargs="+", default=[5, 8, 10, 12, 15, 20, 30])
    parser.add_argument("--seeds", type=int, default=30)
    parser.add_argument("--evaluators", nargs="+", default=["fanova", "ped-anova"], choices=["fanova", "ped-anova"])
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore")
    from hpo import space as spaces

    loaded = spaces.load(args.module)
    started = time.perf_counter()
    results: dict[str, dict] = {name: {} for name in args.evaluators}
    for trials in args.trials:
        pairs = [(study_of(loaded, seed, trials, False), study_of(loaded, seed, trials, True))
                 for seed in range(args.seeds)]
        for name in args.evaluators:
            top = dominant = 0
            for real, noise in pairs:
                shares = optuna.importance.get_param_importances(real, evaluator=evaluator(name))
                top += max(shares, key=shares.__getitem__) == "learning_rate"
                dominant += max(optuna.importance.get_param_importances(noise, evaluator=evaluator(name)).values()) >= 0.5
            results[name][str(trials)] = {"top_is_learning_rate": round(top / args.seeds, 2),
                                          "noise_dominant": round(dominant / args.seeds, 2)}
    print(json.dumps({
        "bench": "importance",
        "module": str(Path(args.module).relative_to(REPO)) if Path(args.module).is_relative_to(REPO) else args.module,
        "seeds": args.seeds, "results": results, "seconds": round(time.perf_counter() - started, 1),
        "optuna": optuna.__version__, "machine": f"{platform.machine()} {platform.node()}",
    }))


if __name__ == "__main__":
    main()
