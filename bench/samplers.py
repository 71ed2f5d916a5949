"""Which sampler finds a good LoRA config in few trials: hpo's sampler options side by side.

    python bench/samplers.py                                  # 20 trials x 20 seeds, all samplers
    python bench/samplers.py --trials 12 --seeds 50 --samplers tpe-qmc tpe random

No training: each trial's parameters come from the shipped ``search_spaces/lora.py`` space
and are scored by a synthetic response surface with known optimum, modelled on published
LoRA results (see that module's docstring):

* accuracy is a parabola in log10(learning rate) around an optimum drawn per seed between
  3e-4 and 2e-3 (about 10-15x the 2e-5..1.3e-4 full fine-tuning rates of BERT-sized
  encoders, "LoRA Without Regret"), losing 0.1 half a decade away and floored at 0.5 (the
  majority class: a diverged or frozen run);
* the optimum moves with the square root of the batch size (the usual rule for Adam), and
  bigger batches cost a little (LoRA tolerates large batches less well, same source);
* rank adds a little (+0.004 per doubling: small data does not use the capacity);
* dropout has a shallow optimum drawn in 0.03-0.1, weight decay an almost flat one;
* every evaluation adds Gaussian noise (sd 0.01: an accuracy on a few hundred examples).

Each seed is one problem instance, the same for every sampler. Regret after n trials is
optimum - true value of the trial with the best *observed* value so far (what a user would
promote). Prints one JSON line: per sampler the median (and mean) regret at 8, 12 and 20
trials over the seeds, and its seconds; ``cmaes`` is skipped without its package.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import optuna

REPO = Path(__file__).resolve().parents[1]
CHECKPOINTS = (8, 12, 20)


class Surface:
    """One problem instance: a noisy, LoRA-like accuracy over the recipe's parameters."""

    def __init__(self, seed: int, noise: float) -> None:
        rng = np.random.default_rng(10_000 + seed)
        self.log_lr = rng.uniform(math.log10(3e-4), math.log10(2e-3))  # optimum at batch 16
        self.dropout = rng.uniform(0.03, 0.1)
        self.weight_decay = rng.uniform(0.0, 0.05)
        self.noise = noise
        self.rng = np.random.default_rng(20_000 + seed)

    def true(self, p: dict) -> float:
        batch = p.get("batch_size", 16)
        best_log_lr = self.log_lr + 0.5 * math.log10(batch / 16)
        value = 0.92 - 0.4 * (math.log10(p["learning_rate"]) - best_log_lr) ** 2
        value -= 0.004 * math.log2(batch / 8)
        value += 0.004 * math.log2(p.get("lora_r", 8) / 4)
        value -= 0.4 * (p.get("lora_dropout", 0.05) - self.dropout) ** 2
        value -= 0.1 * (p.get("weight_decay", 0.0) - self.weight_decay) ** 2
        return max(0.5, value)

    def observe(self, p: dict) -> float:
        return self.true(p) + float(self.rng.normal(0.0, self.noise))

    def optimum(self, distributions: dict) -> float:
        """The surface's maximum over the space: each continuous optimum clipped to its range
        (the surface is concave in each), every combination of the categorical choices."""
        import itertools

        names = [n for n, d in distributions.items() if isinstance(d, optuna.distributions.CategoricalDistribution)]
        best = -math.inf
        for combo in itertools.product(*(distributions[n].choices for n in names)):
            p = dict(zip(names, combo, strict=True))
            targets = {"learning_rate": 10 ** (self.log_lr + 0.5 * math.log10(p.get("batch_size", 16) / 16)),
                       "lora_dropout": self.dropout, "weight_decay": self.weight_decay}
            for name, target in targets.items():
                if name in distributions:
                    d = distributions[name]
                    p[name] = min(d.high, max(d.low, target))
            best = max(best, self.true(p))
        return best


def run(sampler_name: str, seed: int, trials: int, noise: float, loaded) -> list[float]:
    from hpo import space as spaces
    from hpo.record.samplers import make_sampler

    surface = Surface(seed, noise)
    study = optuna.create_study(direction="maximize", sampler=make_sampler(sampler_name, seed, trials))

    def objective(trial: optuna.Trial) -> float:
        params = spaces.call_space(loaded, trial)
        trial.set_user_attr("true", surface.true(params))
        return surface.observe(params)

    study.optimize(objective, n_trials=trials)
    optimum = surface.optimum(study.trials[0].distributions)
    regrets, best_seen, best_true = [], -math.inf, None
    for trial in study.trials:
        if trial.value > best_seen:
            best_seen, best_true = trial.value, trial.user_attrs["true"]
        regrets.append(optimum - best_true)
    return regrets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--module", default=str(REPO / "search_spaces" / "lora.py"))
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--noise", type=float, default=0.01)
    parser.add_argument("--samplers", nargs="+", default=["tpe-qmc", "tpe", "random", "qmc", "gp", "cmaes"])
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    import warnings

    warnings.filterwarnings("ignore")
    from hpo import space as spaces

    loaded = spaces.load(args.module)
    checkpoints = [n for n in CHECKPOINTS if n <= args.trials]
    results: dict[str, dict] = {}
    skipped = []
    for name in args.samplers:
        if name == "cmaes" and importlib.util.find_spec("cmaes") is None:
            skipped.append("cmaes (pip install cmaes)")
            continue
        started = time.perf_counter()
        curves = [run(name, seed, args.trials, args.noise, loaded) for seed in range(args.seeds)]
        results[name] = {
            "median_regret": {str(n): round(statistics.median(c[n - 1] for c in curves), 4) for n in checkpoints},
            "mean_regret": {str(n): round(statistics.fmean(c[n - 1] for c in curves), 4) for n in checkpoints},
            "seconds": round(time.perf_counter() - started, 1),
        }
    print(json.dumps({
        "bench": "samplers",
        "module": str(Path(args.module).relative_to(REPO)) if Path(args.module).is_relative_to(REPO) else args.module,
        "trials": args.trials, "seeds": args.seeds, "noise": args.noise,
        "results": results, "skipped": skipped,
        "optuna": optuna.__version__, "machine": f"{platform.machine()} {platform.node()}",
    }))


if __name__ == "__main__":
    main()
