"""How well does ``hpo search`` keep a cluster's GPUs busy? A simulated cluster per size.

    python bench/scaling.py                      # 4, 16 and 64 GPUs; prints ONE JSON line
    python bench/scaling.py --sizes 16 --step-seconds 1.0 --rounds 3

For each size N a fresh local Ray gets N logical GPUs (``ray.init(num_gpus=N)``, no real
device) and enough logical CPUs; ``hpo search`` then runs ``rounds x N`` trials of a module
whose ``train`` sleeps ``step_seconds`` per step (``max_steps`` steps, an evaluation every
``eval_every``), one GPU per trial, the real driver (Optuna study in SQLite, MLflow in SQLite,
Ray Tune, ASHA off so every trial runs its full length).

Measured, per size, from the study's records of what each trial held (``resources`` attr:
the worker-side start of the trial and its last report):

* ``utilisation``: busy GPU-seconds / (N x the window from the first trial's start to the last
  trial's end) -- the share of the GPUs the sweep kept working once it had started;
* ``trials_per_minute`` over the same window, and ``wall_s`` of the whole ``search`` call
  (Ray start, checks, report writing included).

The target is utilisation >= 0.9 at 16 GPUs. What costs GPU time here is the driver: each
trial start is an Optuna ask (SQLite) + an MLflow run + Tune's actor hand-over, each result an
Optuna report + MLflow metrics, all in one driver thread -- while one trial is started, the
GPU another trial just released waits.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODULE = '''
import os
import time

import hpo

sweep = hpo.Sweep(metric="score", direction="maximize", trials={trials}, max_steps={max_steps},
                  eval_every={eval_every}, pruner="none", sampler="random", seed=0,
                  cpus_per_trial=0.5, gpus_per_trial=1)


def space(trial):
    return {{"x": trial.suggest_float("x", 0.0, 1.0)}}


def train(params, report):
    for step in range(1, {max_steps} + 1):
        time.sleep({step_seconds})
        if step % {eval_every} == 0:
            report(step, {{"score": params["x"] * step}})
'''


def measure(gpus: int, rounds: int, step_seconds: float, max_steps: int, eval_every: int) -> dict:
    """One size, in this process: a fresh local Ray with ``gpus`` logical GPUs and one sweep."""
    import logging

    import optuna
    import ray
    from rich.console import Console

    from hpo.run.sweep import SearchOptions, search

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    folder = Path(tempfile.mkdtemp(prefix=f"hpo-scaling-{gpus}-"))
    module = folder / "scaling.py"
    trials = rounds * gpus
    module.write_text(MODULE.format(trials=trials, max_steps=max_steps, eval_every=eval_every,
                                    step_seconds=step_seconds))
    os.chdir(folder)
    ray.init(num_gpus=gpus, num_cpus=gpus, include_dashboard=False, logging_level=logging.ERROR,
             log_to_driver=False)
    storage = f"sqlite:///{folder / 'hpo.db'}"
    started = time.perf_counter()
    search(SearchOptions(module=str(module), storage=storage, tracking_uri=f"sqlite:///{folder / 'mlflow.db'}",
                         workdir=str(folder / ".hpo")), Console(file=open(os.devnull, "w")))
    wall = time.perf_counter() - started
    ray.shutdown()
    held = [t.user_attrs["resources"] for t in optuna.load_study(study_name="scaling", storage=storage).trials
            if t.state.name == "COMPLETE"]
    first, last = min(h["start"] for h in held), max(h["end"] for h in held)
    busy = sum((h["end"] - h["start"]) * h["workers"][0]["assigned"]["GPU"] for h in held)
    window = last - first
    return {"gpus": gpus, "trials": len(held), "trial_s": round(step_seconds * max_steps, 2),
            "utilisation": round(busy / (gpus * window), 4), "trials_per_minute": round(60 * len(held) / window, 2),
            "window_s": round(window, 2), "wall_s": round(wall, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--rounds", type=int, default=3, help="trials per GPU")
    parser.add_argument("--step-seconds", type=float, default=0.5)
    parser.add_argument("--max-steps", type=int, default=10)
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # internal: a size in this process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.sizes[0], args.rounds, args.step_seconds, args.max_steps, args.eval_every)))
        return
    results = []
    for gpus in args.sizes:  # each size in a fresh process: a fresh Ray with its own GPU count
        done = subprocess.run([sys.executable, __file__, "--one", "--sizes", str(gpus), "--rounds", str(args.rounds),
                               "--step-seconds", str(args.step_seconds), "--max-steps", str(args.max_steps),
                               "--eval-every", str(args.eval_every)], capture_output=True, text=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        results.append(json.loads(lines[-1]) if done.returncode == 0 and lines else
                       {"gpus": gpus, "error": (done.stderr or done.stdout).strip().splitlines()[-1:]})
    at16 = next((r.get("utilisation") for r in results if r["gpus"] == 16), None)
    print(json.dumps({"sizes": results, "target": {"gpus": 16, "utilisation": 0.9,
                                                   "met": None if at16 is None else at16 >= 0.9}}))


if __name__ == "__main__":
    main()
