"""Trial setup time on a worker: hpo's load-once recipe against a Ray Tune trainable that
loads the model each trial, side by side.

    python bench/setup_time.py                           # MiniLM (packaged), 6 trials each way; ONE JSON line
    python bench/setup_time.py --model /path/to/tiny-bert --trials 4

The same LoRA fine-tuning (rank 8 on BERT's query/value, AdamW, batch 16, max_length 64)
of the same base model on the shipped reviews (search_spaces/data/reviews), one trial at a
time (concurrency 1), each way in a fresh process with a fresh local Ray. A trial's **setup
time** is from its start on the worker to the start of its first optimizer step (its batch
ready; the step's own compute is training, not setup):

* ``hpo``: ``hpo search`` (in process, as ``bench/scaling.py`` runs it) with the built-in
  recipe, 2 steps per trial; each trial records ``trial_setup_seconds`` (Optuna user attr,
  MLflow metric). Ray reuses the worker, which keeps the base model and the tokenized data.
* ``raytune_default``: ``Tuner`` + a function trainable in the usual hand-written style: it
  imports torch/transformers/peft, loads tokenizer and model with ``from_pretrained``,
  tokenizes the data, wraps LoRA and takes a step; Ray's defaults (a new worker per trial).
* ``raytune_reuse``: the same trainable with ``reuse_actors=True``: imports stay warm, the
  model and data are still loaded by every trial.

Prints, per way, the first trial's setup, the median of the later ones and their ratio. The
target (issue 11): later trials on a warm worker <= 0.05x the first's.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REVIEWS = REPO / "search_spaces" / "data" / "reviews"
WAYS = ("hpo", "raytune_default", "raytune_reuse")
TARGET = 0.05

MODULE = '''
import hpo

sweep = hpo.Sweep(model={model!r}, train_data={train!r}, eval_data={eval!r}, max_length=64, trials={trials},
                  max_steps=2, eval_every=2, pruner="none", sampler="random", seed=0, concurrency=1)


def space(trial):
    return {{"learning_rate": trial.suggest_float("learning_rate", 1e-4, 1e-2, log=True), "batch_size": 16,
            "lora_r": 8, "lora_alpha": 16, "target_modules": "query,value"}}
'''


def run_hpo(folder: Path, model: str, trials: int) -> list[float]:
    import optuna
    from rich.console import Console

    from hpo.run.sweep import SearchOptions, search

    module = folder / "setup_time.py"
    module.write_text(MODULE.format(model=model, train=str(REVIEWS / "train.tsv"), eval=str(REVIEWS / "eval.tsv"),
                                    trials=trials))
    os.chdir(folder)
    storage = f"sqlite:///{folder / 'hpo.db'}"
    search(SearchOptions(module=str(module), storage=storage, tracking_uri=f"sqlite:///{folder / 'mlflow.db'}",
                         workdir=str(folder / ".hpo"), skip_data_check=True), Console(file=open(os.devnull, "w")))
    done = optuna.load_study(study_name="setup_time", storage=storage).get_trials()
    assert len(done) == trials and all(t.state.name == "COMPLETE" for t in done), [t.state for t in done]
    return [t.user_attrs["trial_setup_seconds"] for t in done]


def reload_each_time(config: dict) -> None:
    """The peer's trainable: everything from scratch up to its first LoRA step; reports its setup."""
    started = time.perf_counter()
    import torch
    from peft import LoraConfig, get_peft_model
    from ray import tune
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    with open(REVIEWS / "train.tsv") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    tokenizer = AutoTokenizer.from_pretrained(config["model"])
    model = AutoModelForSequenceClassification.from_pretrained(config["model"], num_labels=2)
    encoded = tokenizer([row["text"] for row in rows], truncation=True, max_length=64, padding=True,
                        return_tensors="pt")
    labels = torch.tensor([int(row["label"]) for row in rows])
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16,
                                             target_modules=["query", "value"]))
    optimizer = torch.optim.AdamW([w for w in model.parameters() if w.requires_grad], lr=config["learning_rate"])
    batch = torch.randperm(len(rows))[:16]
    setup = time.perf_counter() - started  # training starts
    loss = model(input_ids=encoded["input_ids"][batch], attention_mask=encoded["attention_mask"][batch],
                 labels=labels[batch]).loss
    loss.backward()
    optimizer.step()
    tune.report({"setup_seconds": setup, "loss": loss.item()})


def run_raytune(folder: Path, model: str, trials: int, reuse: bool) -> list[float]:
    import logging

    import ray
    from ray import tune

    ray.init(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    tuner = tune.Tuner(
        reload_each_time,
        param_space={"model": model, "learning_rate": tune.loguniform(1e-4, 1e-2)},
        tune_config=tune.TuneConfig(num_samples=trials, max_concurrent_trials=1, reuse_actors=reuse),
        run_config=tune.RunConfig(storage_path=str(folder / "ray_results"), verbose=0),
    )
    results = tuner.fit()
    assert not results.errors, results.errors
    frame = results.get_dataframe().sort_values("timestamp")  # trials in the order they ran
    return [float(value) for value in frame["setup_seconds"]]


def measure(way: str, model: str, trials: int) -> dict:
    from hpo.train import models

    resolved = models.resolve(model)
    folder = Path(tempfile.mkdtemp(prefix=f"hpo-setup-{way}-"))
    if way == "hpo":
        seconds = run_hpo(folder, model, trials)
    else:
        seconds = run_raytune(folder, resolved, trials, reuse=way == "raytune_reuse")
    later = statistics.median(seconds[1:])
    return {"way": way, "first_s": round(seconds[0], 3), "later_median_s": round(later, 3),
            "later_over_first": round(later / seconds[0], 4), "all_s": [round(s, 3) for s in seconds]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2")
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--only", nargs="+", choices=WAYS, default=list(WAYS))
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: one way in this process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.model, args.trials)), flush=True)
        return
    report: dict = {"model": args.model, "trials": args.trials}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "TOKENIZERS_PARALLELISM": "false"}
    for way in args.only:  # each in a fresh process: nothing warm from another way
        done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--one", way, "--model", args.model, "--trials",
                               str(args.trials)], capture_output=True, text=True, env=env, cwd=tempfile.gettempdir())
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode == 0 and lines:
            result = json.loads(lines[-1])
            report[result.pop("way")] = result
        else:
            report[way] = {"error": (done.stderr or done.stdout).strip().splitlines()[-3:]}
    ratio = report.get("hpo", {}).get("later_over_first")
    report["target"] = {"later_over_first": TARGET, "met": None if ratio is None else ratio <= TARGET}
    report["machine"] = {"cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2)}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
