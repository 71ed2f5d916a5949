"""What a cheap look at a trial says about its end: pruning signals, ASHA's settings, data subsets.

    python bench/fidelity.py                       # 16 configs on SST-2; prints ONE JSON line
    python bench/fidelity.py --configs 24 --work /tmp/fid
    python bench/fidelity.py --configs 12 --lr-probe --eval-every 10 --screen-steps 0   # the same configs, lr probed

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
   in ``--orders`` random orders, for each prune signal x first rung (grace period) x reduction factor
   x pruner (``asha``: one bracket; ``hyperband``: Ray's ASHA with the brackets ``Sweep.brackets``
   gives, each trial joining one at random with Ray's weights): the mean steps spent, and the mean
   regret (best final accuracy of all configs minus the best of those that ran to the end). No ASHA
   at all costs ``configs x max_steps`` with regret 0.

With ``--lr-probe`` the sweep field ``lr_probe=true`` is applied first: the learning-rate range test
(``hpo.train.lr_probe``, in this process) on the space's centre config with the same rows and
settings, then the configs are drawn from the space through ``hpo.space.NarrowedTrial`` -- the same
Sobol points, the learning rate mapped onto the range the probe chose -- so the two runs compare
config by config. ``passed_0.6`` counts the configs whose final accuracy reaches 0.6.
``--screen-steps 0`` leaves the screen out.

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


def draw_configs(count: int, seed: int, bounds: tuple[float, float] | None = None) -> list[dict]:
    """``count`` configs of the space on a scrambled Sobol sequence; with ``bounds``, the learning rate
    drawn from that part of its range (as a sweep with ``lr_probe`` draws it)."""
    import optuna

    from hpo import space as spaces

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    loaded = spaces.load(str(MODULE))
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.QMCSampler(seed=seed, scramble=True))
    configs = []
    for _ in range(count):
        trial = study.ask()
        configs.append(spaces.call_space(loaded, spaces.NarrowedTrial(trial, bounds) if bounds else trial))
        study.tell(trial, 0.0)
    return configs


def job_for(params: dict, rows: int, steps: int, every: int, seed: int):
    """The recipe's job for one config on the SST-2 rows, as the bench trains it."""
    from hpo.config import Sweep
    from hpo.train.recipe import TrainJob

    folder = sst2()
    sweep = Sweep(model="sentence-transformers/all-MiniLM-L6-v2", task="classification",
                  train_data=str(folder / "train.tsv"), eval_data=str(folder / "dev.tsv"), max_length=64,
                  max_steps=steps, eval_every=every, seed=seed, train_limit=rows)
    return TrainJob.from_sweep(sweep, params)


def probe(rows: int, steps: int, every: int, seed: int) -> dict:
    """The learning-rate range test of ``lr_probe=true`` on the space's centre config: its Choice as a dict."""
    import torch

    torch.set_num_threads(1)
    from hpo import space as spaces
    from hpo.run.lr_probe import centre_params, check
    from hpo.train.lr_probe import choose, range_test

    loaded = spaces.load(str(MODULE))
    outer = check(loaded)
    return choose(range_test(job_for(centre_params(loaded), rows, steps, every, seed), outer), outer).to_dict()


def train_one(task: tuple) -> dict:
    """One config at one fidelity: {step: {eval_accuracy, eval_loss}} and the seconds it took."""
    params, rows, steps, every, seed = task
    import torch

    torch.set_num_threads(1)
    from hpo.train.training import fine_tune

    job = job_for(params, rows, steps, every, seed)
    curve: dict[int, dict] = {}
    started = time.perf_counter()
    fine_tune(job, lambda step, m: curve.__setitem__(step, {"eval_accuracy": m["eval_accuracy"],
                                                           "eval_loss": m["eval_loss"]}))
    return {"curve": {str(k): v for k, v in curve.items()}, "seconds": round(time.perf_counter() - started, 1)}


def spearman(a, b) -> float:
    from scipy.stats import spearmanr

    return round(float(spearmanr(a, b).statistic), 3)


def asha(curves: list[dict], order: list[int], signal: str, grace: int, rf: float, max_t: int, brackets: int = 1,
         rng: np.random.Generator | None = None) -> tuple[int, int]:
    """Replay Ray's ASHA over recorded curves, trials in ``order``, one at a time: ``brackets`` brackets built
    as Ray builds them (bracket s's rungs start at grace x rf^s), each trial joining one at random with Ray's
    softmax weights (``rng``); returns (steps spent, index of the best config that ran to max_t)."""
    built = []
    for s in range(brackets):
        count = int(np.log(max_t / grace) / np.log(rf) - s + 1)
        built.append([(grace * rf ** (k + s), {}) for k in reversed(range(count))])
    sizes = np.array([len(rungs) for rungs in built])
    weights = np.e ** (sizes - sizes.max())
    spent, best, best_value = 0, -1, -1.0
    for index in order:
        rungs = built[rng.choice(len(built), p=weights / weights.sum())] if brackets > 1 else built[0]
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
                break
            if stopped_at is not None:
                break
        spent += stopped_at if stopped_at is not None else steps[-1]
        final = curve[str(steps[-1])]["eval_accuracy"]
        if stopped_at is None and steps[-1] >= max_t and final > best_value:
            best, best_value = index, final
    return spent, best


def replay(full: list[dict], final: list[float], args: argparse.Namespace) -> dict:
    """``asha_replay``: each prune signal x first rung x reduction factor x pruner (asha, and hyperband where
    the budget has room for more than one bracket), the mean steps and regret over the arrival orders."""
    from hpo.config import Sweep

    rng = np.random.default_rng(args.seed)
    orders = [rng.permutation(args.configs).tolist() for _ in range(args.orders)]
    graces = sorted({args.eval_every * k for k in (1, 2, 3, 4) if args.eval_every * k * 2 <= args.max_steps}
                    | {Sweep(max_steps=args.max_steps, eval_every=args.eval_every).first_rung})
    settings = {}
    for signal in ("eval_accuracy", "eval_loss"):
        for grace in graces:
            for rf in (2, 3, 4):
                for pruner in ("asha", "hyperband"):
                    brackets = Sweep(max_steps=args.max_steps, eval_every=args.eval_every, pruner=pruner,
                                     grace_period=grace, reduction_factor=rf).brackets
                    if pruner == "hyperband" and brackets == 1:
                        continue
                    draws = np.random.default_rng(args.seed)
                    outcomes = [asha(full, order, signal, grace, rf, args.max_steps, brackets, draws) for order in orders]
                    settings[f"{signal} grace={grace} rf={rf} {pruner}"] = {
                        "mean_steps": round(statistics.fmean(s for s, _ in outcomes), 1),
                        "mean_regret": round(statistics.fmean(max(final) - final[b] for _, b in outcomes), 4)}
    return {"orders": args.orders, "no_asha_steps": args.configs * args.max_steps, "settings": settings}


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
    parser.add_argument("--lr-probe", action="store_true", help="apply lr_probe=true first (see above)")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    store = work / "curves.json"
    key = f"{args.configs}-{args.seed}-{args.max_steps}-{args.eval_every}-{args.rows}-{args.screen_rows}-{args.screen_steps}"
    key += "-lr_probe" if args.lr_probe else ""
    saved = json.loads(store.read_text()) if store.exists() and not args.fresh else {}
    runs = saved.get(key) or {}
    if args.lr_probe and "probe" not in runs:
        runs["probe"] = probe(args.rows, args.max_steps, args.eval_every, args.seed)
        saved[key] = runs
        store.write_text(json.dumps(saved))
        print(f"fidelity: lr probe: {runs['probe']['reason']}", file=sys.stderr, flush=True)
    chosen = runs.get("probe")
    configs = draw_configs(args.configs, args.seed, (chosen["low"], chosen["high"]) if chosen else None)
    tasks = {}
    for i, params in enumerate(configs):
        tasks[f"full-{i}"] = (params, args.rows, args.max_steps, args.eval_every, args.seed)
        if args.screen_steps:
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
    top = set(np.argsort(final)[-4:].tolist())
    screened = None
    if args.screen_steps:
        screen = [runs[f"screen-{i}"]["curve"][str(args.screen_steps)]["eval_accuracy"] for i in range(args.configs)]
        screened = {"rows": args.screen_rows, "steps": args.screen_steps, "rank_correlation": spearman(screen, final),
                    "top4_kept": len(top & set(np.argsort(screen)[-4:].tolist())),
                    "cost_share": round(args.screen_steps / args.max_steps, 3)}
    print(json.dumps({
        "bench": "fidelity", "dataset": "sst2", "configs": args.configs, "seed": args.seed,
        "max_steps": args.max_steps, "eval_every": args.eval_every, "rows": args.rows,
        "lr_probe": {k: chosen[k] for k in ("low", "high", "steepest")} | {"seconds": chosen["curve"]["seconds"]}
        if chosen else None,
        "learning_rates": [round(params["learning_rate"], 6) for params in configs],
        "final_accuracy": {"min": round(min(final), 4), "median": round(statistics.median(final), 4),
                           "max": round(max(final), 4), "passed_0.6": sum(1 for a in final if a >= 0.6),
                           "each": [round(a, 4) for a in final]},
        "rung_rank_correlation": rungs,
        "screen": screened,
        "asha_replay": replay(full, final, args),
        "train_seconds": round(sum(r["seconds"] for name, r in runs.items() if name != "probe"), 1),
        "machine": f"{platform.machine()} {os.cpu_count()} cpus"}))


if __name__ == "__main__":
    main()
