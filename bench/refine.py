"""A second round of search, refined by ``hpo refine`` or plain, at the same step budget.

    python bench/refine.py                                  # SST-2, seeds 0 1 2, 480 + 480 steps; ONE JSON line
    python bench/refine.py --seeds 0 --budget 240 --work /tmp/rf   # a quick look

The task is bench/search_quality.py's: LoRA on the pretrained all-MiniLM-L6-v2, the 2,000
SST-2 training rows that ``train_limit=2000`` samples, validated on the 872-row dev set,
max_length 64, trials of ``--max-steps`` steps evaluated every ``--eval-every``, sampled by
``search_spaces/lora.py`` as a user runs it (its defaults: ``tpe-qmc``, ASHA on eval_loss, 2
trials at once). For each seed S:

1. **round 1**: ``hpo search search_spaces/lora.py --study r1 --set seed=S`` (and the data).
2. **plain**: ``hpo search search_spaces/lora.py --study plain --warm-start r1 --warm-start-top K
   --set seed=S+1000``: the same module again, started from round 1's K best configs.
3. **refined**: ``hpo refine r1 --output refined.py``, then ``hpo search refined.py --study
   refined --warm-start r1 --warm-start-top K --set seed=S+1000``: the same, from the module
   refine wrote (its data, model and metric are round 1's, carried by the module).

Both second rounds get a new seed (the Sobol opening of round 1's seed would repeat round 1's
configs) and the same warm start, so the module is all that differs. **Budget**: as in
search_quality.py, each round may spend ``--budget`` optimizer steps: it is given more trials
than it can afford, stopped (Ctrl-C, which hpo takes cleanly) once its finished trials spent
the budget, and only the trials that finished within it, in the order they finished, count
(warm-started ones included: they cost steps too). **Best** is the best ``eval_accuracy`` of
a COMPLETE trial (one that ran its sweep's whole ``max_steps``, or that early stopping ended). The JSON line gives per seed each round's
best, steps and trials, the refined module's changes, the median best of each second round,
and the wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from search_quality import MODULE, curve, dataset_paths


def run_until_spent(command: list[str], work: Path, study: str, budget: int) -> list[dict]:
    """Run an ``hpo search`` command, stop it once its finished trials spent ``budget`` steps,
    and return its finished trials (end time, steps, value if COMPLETE, warm-started or not)."""
    import optuna

    from hpo.record import study as studies

    storage = f"sqlite:///{work}/hpo.db"
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{work}/mlflow.db"}
    sweep = subprocess.Popen(command, cwd=work, env=env, stdout=subprocess.DEVNULL)
    while sweep.poll() is None:
        time.sleep(5)
        try:
            trials = optuna.load_study(study_name=study, storage=storage).get_trials(deepcopy=False)
        except KeyError:  # the study is not created yet
            continue
        if sum(studies.last_step(t) or 0 for t in trials if t.state.is_finished()) >= budget:
            sweep.send_signal(signal.SIGINT)  # again each minute: one sent while Ray starts can be lost
            try:
                sweep.wait(timeout=60)
            except subprocess.TimeoutExpired:
                continue
    return [{"end": t.datetime_complete.timestamp(), "steps": studies.last_step(t) or 0,
             "value": t.value if t.state == optuna.trial.TrialState.COMPLETE else None,
             "warm": "warm_start" in t.user_attrs}
            for t in optuna.load_study(study_name=study, storage=storage).get_trials(deepcopy=False)
            if t.datetime_complete is not None]


def one_seed(args: argparse.Namespace, paths: dict, seed: int, work: Path) -> dict:
    """Round 1, then the plain and the refined second rounds, for one seed."""
    work.mkdir(parents=True, exist_ok=True)
    data = ["--set", f"train_data={paths['train_data']}", "--set", f"eval_data={paths['eval_data']}",
            "--set", f"train_limit={paths['train_limit']}"]
    steps = ["--set", f"max_steps={args.max_steps}", "--set", f"eval_every={args.eval_every}"]
    hpo = [sys.executable, "-m", "hpo"]
    room = ["--trials", str(2 * args.budget // args.max_steps + 4), "--skip-data-check"]
    warm = ["--warm-start", "r1", "--warm-start-top", str(args.warm_start_top), "--set", f"seed={seed + 1000}"]
    started = time.time()
    rounds = {"r1": run_until_spent([*hpo, "search", str(MODULE), "--study", "r1", *room, "--set", f"seed={seed}",
                                     *steps, *data], work, "r1", args.budget)}
    rounds["plain"] = run_until_spent([*hpo, "search", str(MODULE), "--study", "plain", *room, *warm, *steps, *data],
                                      work, "plain", args.budget)
    refined = work / "refined.py"
    written = subprocess.run([*hpo, "refine", "r1", "--output", str(refined), "--force"], cwd=work, check=True,
                             capture_output=True, text=True)
    rounds["refined"] = run_until_spent([*hpo, "search", str(refined), "--study", "refined", *room, *warm], work,
                                        "refined", args.budget)
    result = {"seconds": round(time.time() - started, 1), "refine": written.stdout.splitlines()}
    for name, trials in rounds.items():
        points = curve(trials, args.budget)
        counted = sorted(trials, key=lambda t: t["end"])[:len(points)]
        result[name] = {"best": round(points[-1][1], 4) if points and points[-1][1] is not None else None,
                        "steps": points[-1][0] if points else 0, "trials": len(points),
                        "complete": sum(t["value"] is not None for t in counted),
                        "warm_started": sum(t["warm"] for t in counted)}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="sst2", choices=("sst2", "reviews"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--budget", type=int, default=480, help="optimizer steps each round may spend")
    parser.add_argument("--max-steps", type=int, default=60)
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--warm-start-top", type=int, default=2)
    parser.add_argument("--work", default="/tmp/hpo-bench-refine")
    parser.add_argument("--fresh", action="store_true", help="ignore results of earlier runs")
    args = parser.parse_args()
    paths = dataset_paths(args.dataset)
    folder = Path(args.work) / f"{args.dataset}-b{args.budget}-s{args.max_steps}-e{args.eval_every}-k{args.warm_start_top}"
    seeds = {}
    for seed in args.seeds:
        out = folder / f"seed-{seed}.json"
        if args.fresh or not out.exists():
            print(f"refine bench: {args.dataset} seed {seed} ...", file=sys.stderr, flush=True)
            record = one_seed(args, paths, seed, folder / f"seed-{seed}")
            out.write_text(json.dumps(record))
        seeds[seed] = json.loads(out.read_text())
        row = seeds[seed]
        print(json.dumps({"seed": seed, **{k: row[k] for k in ("r1", "plain", "refined", "seconds")}}), file=sys.stderr)
    medians = {name: statistics.median(s[name]["best"] for s in seeds.values() if s[name]["best"] is not None)
               for name in ("r1", "plain", "refined") if any(s[name]["best"] is not None for s in seeds.values())}
    print(json.dumps({
        "bench": "refine", "dataset": args.dataset, "seeds": args.seeds, "budget_steps": args.budget,
        "max_steps": args.max_steps, "eval_every": args.eval_every, "warm_start_top": args.warm_start_top,
        "median_best": {k: round(v, 4) for k, v in medians.items()},
        "refined_beats_plain": medians.get("refined", 0) > medians.get("plain", 0),
        "per_seed": seeds, "seconds": round(sum(s["seconds"] for s in seeds.values()), 1),
        "machine": f"{platform.machine()} {os.cpu_count()} cpus"}))


if __name__ == "__main__":
    main()
