"""What a cheap look at a trial says about its end: pruning signals, ASHA's settings, data subsets.

    python bench/fidelity.py                       # 16 configs on SST-2; prints ONE JSON line
    python bench/fidelity.py --configs 24 --work /tmp/fid

One set of learning curves answers three questions by rank correlation and replay, instead of
a sweep per setting. ``--configs`` configs are drawn from ``search_spaces/lora.py``'s space
(scrambled Sobol, seeded) and each is trained twice with hpo's own recipe
(``hpo.train.training.fine_tune``, LoRA on the pretrained all-MiniLM-L6-v2, max_length 64, validated
on the full 872-row SST-2 dev set):

* **full**: the 2,000 rows ``train_limit=2000`` samples, ``--max-steps`` (120) steps, evaluated
  every ``--eval-every`` (20) steps: eval_accuracy and eval_loss at each;
* **screen**: ``--screen-rows`` (500) rows for ``--screen-steps`` (30) steps, about one epoch with
  the full learning-rate schedule: a data-fraction fidelity at a quarter of the data and of the
  steps (a two-stage sweep screens on it, then re-runs the best on all the data, see docs/guides/objectives-and-pruning.md).

It reports:

1. ``rung_rank_correlation``: Spearman's rho between each early evaluation (step 20, 40, 60) and
   the final accuracy, for eval_accuracy and for eval_loss (negated): which signal ASHA should
   rank trials on (``prune_metric``).
2. ``screen``: rho between the screen's accuracy and the full run's, and how many of the full
   run's top 4 the screen's top 4 hold.
3. ``asha_replay``: ASHA as Ray runs it (``_Bracket``'s rungs and cutoff rule, copied from Ray
   2.60's ``async_hyperband.py``) replayed on the recorded curves, trials arriving one at a time
   in ``--orders`` random orders, for each prune signal x grace period x reduction factor:
   the mean steps spent, and the mean regret (best final accuracy of all configs minus the best
   of those that ran to the end). No ASHA at all costs ``configs x max_steps`` with regret 0.

Curves are kept in ``WORK/curves.json``; a rerun reuses them (``--fresh`` to retrain).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
MODULE = REPO / "search_spaces" / "lora.py"


def sst2() -> Path:
    folder = Path(os.environ.get("HPO_SHARED_DATA", REPO.parent / "shared" / "data")) / "sst2"
    if not (folder / "train.tsv").exists():
        sys.exit(f"bench/fidelity.py: SST-2 not found at {folder} (set HPO_SHARED_DATA)")
    return folder


def draw_configs(count: int, seed: int) -> list[dict]:
    import optuna

    from hpo import space as spaces

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    loaded = spaces.load(str(MODULE))
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.QMCSampler(seed=seed, scramble=True))
    configs = []
    for _ in range(count):
        trial = study.ask()
        configs.append(spaces.call_space(loaded, trial))
        study.tell(trial, 0.0)
    return configs


def train_one(task: tuple) -> dict:
    """One config at one fidelity: {step: {eval_accuracy, eval_loss}} and the seconds it took."""
    params, rows, steps, every, seed = task
    import torch

    torch.set_num_threads(1)
    from hpo.config import Sweep
    from hpo.train.recipe import TrainJob
    from hpo.train.training import fine_tune

    folder = sst2()
    sweep = Sweep(model="sentence-transformers/all-MiniLM-L6-v2", task="classification",
                  train_data=str(folder / "train.tsv"), eval_data=str(folder / "dev.tsv"), max_length=64,
                  max_steps=steps, eval_every=every, seed=seed, train_limit=rows)
    job = TrainJob.from_sweep(sweep, params)
    curve: dict[int, dict] = {}
    started = time.perf_counter()
    fine_tune(job, lambda step, m: curve.__setitem__(step, {"eval_accuracy": m["eval_accuracy"],
                                                           "eval_loss": m["eval_loss"]}))
    return {"curve": {str(k): v for k, v in curve.items()}, "seconds": round(time.perf_counter() - started, 1)}


def spearman(a, b) -> float:
    from scipy.stats import spearmanr

    return round(float(spearmanr(a, b).statistic), 3)


def asha(curves: list[dict], order: list[int], signal: str, grace: int, rf: float, max_t: int) -> tuple[int, int]:
    """Replay Ray's ASHA (one bracket, stop_last_trials) over recorded curves, trials in ``order``, one at
    a time; returns (steps spent, index of the best config that ran to max_t)."""
    count = int(np.log(max_t / grace) / np.log(rf) + 1)
    rungs = [(grace * rf ** k, {}) for k in reversed(range(count))]
    spent, best, best_value = 0, -1, -1.0
    for index in order:
        curve = curves[index]
        steps = sorted(int(s) for s in curve)
        stopped_at = None
        for step in steps:
            reward = curve[str(step)][signal] * (-1 if signal == "eval_loss" else 1)
            for milestone, recorded in rungs:
                if step < milestone or index in recorded:
                    continue
                values = list(recorded.values())
                if values and reward < np.nanpercentile(values, (1 - 1 / rf) * 100):
                    stopped_at = step
                recorded[index] = reward
            if stopped_at is not None:
                break
        spent += stopped_at if stopped_at is not None else steps[-1]
        final = curve[str(steps[-1])]["eval_accuracy"]
        if stopped_at is None and steps[-1] >= max_t and final > best_value:
            best, best_value = index, final
    return spent, best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-steps", type=int, default=120)
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--screen-rows", type=int, default=500)
    parser.add_argument("--screen-steps", type=int, default=30)
    parser.add_argument("--orders", type=int, default=200)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--work", default="/tmp/hpo-bench-fidelity")
    parser.add_argument("--fresh", action="store_true")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    store = work / "curves.json"
    key = f"{args.configs}-{args.seed}-{args.max_steps}-{args.eval_every}-{args.rows}-{args.screen_rows}-{args.screen_steps}"
    saved = json.loads(store.read_text()) if store.exists() and not args.fresh else {}
    runs = saved.get(key) or {}
    configs = draw_configs(args.configs, args.seed)
    tasks = {}
    for i, params in enumerate(configs):
        tasks[f"full-{i}"] = (params, args.rows, args.max_steps, args.eval_every, args.seed)
        tasks[f"screen-{i}"] = (params, args.screen_rows, args.screen_steps, args.screen_steps, args.seed)
    todo = [name for name in tasks if name not in runs]
    with ProcessPoolExecutor(args.workers) as pool:
        for done, (name, result) in enumerate(zip(todo, pool.map(train_one, [tasks[n] for n in todo]), strict=True), 1):
            runs[name] = result
            saved[key] = runs
            store.write_text(json.dumps(saved))
            print(f"fidelity: {done}/{len(todo)} {name} {result['seconds']} s", file=sys.stderr, flush=True)

    full = [runs[f"full-{i}"]["curve"] for i in range(args.configs)]
    final = [c[str(args.max_steps)]["eval_accuracy"] for c in full]
    rungs = {}
    for step in range(args.eval_every, args.max_steps, args.eval_every):
        rungs[str(step)] = {
            "eval_accuracy": spearman([c[str(step)]["eval_accuracy"] for c in full], final),
            "eval_loss": spearman([-c[str(step)]["eval_loss"] for c in full], final)}
    screen = [runs[f"screen-{i}"]["curve"][str(args.screen_steps)]["eval_accuracy"] for i in range(args.configs)]
    top = set(np.argsort(final)[-4:].tolist())
    screen_top = set(np.argsort(screen)[-4:].tolist())
    rng = np.random.default_rng(args.seed)
    orders = [rng.permutation(args.configs).tolist() for _ in range(args.orders)]
    replay = {}
    for signal in ("eval_accuracy", "eval_loss"):
        for grace in (args.eval_every, 2 * args.eval_every):
            for rf in (2, 3, 4):
                outcomes = [asha(full, order, signal, grace, rf, args.max_steps) for order in orders]
                replay[f"{signal} grace={grace} rf={rf}"] = {
                    "mean_steps": round(statistics.fmean(s for s, _ in outcomes), 1),
                    "mean_regret": round(statistics.fmean(max(final) - final[b] for _, b in outcomes), 4)}
    print(json.dumps({
        "bench": "fidelity", "dataset": "sst2", "configs": args.configs, "seed": args.seed,
        "max_steps": args.max_steps, "eval_every": args.eval_every, "rows": args.rows,
        "final_accuracy": {"min": round(min(final), 4), "median": round(statistics.median(final), 4),
                           "max": round(max(final), 4)},
        "rung_rank_correlation": rungs,
        "screen": {"rows": args.screen_rows, "steps": args.screen_steps, "rank_correlation": spearman(screen, final),
                   "top4_kept": len(top & screen_top),
                   "cost_share": round(args.screen_steps / args.max_steps, 3)},
        "asha_replay": {"orders": args.orders, "no_asha_steps": args.configs * args.max_steps, "settings": replay},
        "train_seconds": round(sum(r["seconds"] for r in runs.values()), 1),
        "machine": f"{platform.machine()} {os.cpu_count()} cpus"}))


if __name__ == "__main__":
    main()
