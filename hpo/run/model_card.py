"""What a promoted model's folder says about itself.

``hpo_promote.json``: the record a program reads (study, trial and its value, the params, seed,
schedule, data and the final metrics). ``README.md``: the model card a person reads, with the
Hugging Face front matter (library, base model, tags), how it was trained, its parameters and
metrics, and the code that loads it (:func:`load_code`, which ``hpo promote`` also prints).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hpo.config import Sweep


def trial_value(trial: Any) -> float | list[float] | None:
    """``trial.value``, or the list of a multi-objective trial's values (``trial.value`` raises there)."""
    values = trial.values
    return values[0] if values and len(values) == 1 else values


def write_records(folder: Path, job: Any, sweep: Sweep, params: dict, merged: bool, study: Any, trial: Any,
                  metrics: dict[str, float]) -> None:
    """Write ``hpo_promote.json`` and the model card ``README.md`` of a promoted model into ``folder``."""
    from hpo.train import models

    record = {
        "study": study.study_name,
        "trial": trial.number,
        "trial_value": trial_value(trial),
        "metric": sweep.metric,
        "base_model": sweep.model,
        "base_model_path": models.resolve(sweep.model),
        "task": sweep.task,
        "merged": merged,
        "params": params,
        "seed": job.seed,
        "max_steps": job.sweep.max_steps,
        "eval_every": job.sweep.eval_every,
        "patience": job.sweep.patience,
        "min_steps": job.min_steps,
        "watch": job.watch,
        "objective": sweep.objective,
        "trial_best_step": trial.user_attrs.get("best_step"),
        "train_data": sweep.train_data,
        "eval_data": sweep.eval_data,
        "test_data": sweep.test_data,
        "max_length": sweep.max_length,
        "metrics": metrics,
    }
    (folder / "hpo_promote.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    rows = "\n".join(f"| {k} | {v:.6g} |" for k, v in sorted(metrics.items()))
    param_rows = "\n".join(f"| {k} | {v} |" for k, v in params.items())
    (folder / "README.md").write_text(f"""---
library_name: {"transformers" if merged else "peft"}
base_model: {sweep.model}
tags: [hpo, {"lora" if not merged else "lora-merged"}, {sweep.task}]
---

# {study.study_name}: trial {trial.number}, promoted

{"A merged" if merged else "A LoRA adapter for"} `{sweep.model}` ({sweep.task}), trained by `hpo promote` with
the parameters of trial {trial.number} of the Optuna study `{study.study_name}`
({sweep.metric} = {trial_value(trial)} in the sweep), for up to {job.sweep.max_steps} steps, evaluated every
{job.sweep.eval_every}, with early stopping on the validation {job.watch} (patience {job.sweep.patience} evaluations, not
before step {job.min_steps}); the weights are those of the evaluation with the best validation
{job.watch} (step {int(metrics.get('best_step', 0))}).

Training data: `{sweep.train_data}`; validation: `{sweep.eval_data or f'{sweep.eval_fraction:.0%} held out of the training data'}`.

## Parameters

| parameter | value |
| --- | --- |
{param_rows}
| seed | {job.seed} |

## Metrics (final model)

| metric | value |
| --- | --- |
{rows}

## Load it

```python
{load_code(folder, sweep.task, merged, metrics.get("num_labels"))}
```
""")


def load_code(folder: Path, task: str, merged: bool, num_labels: float | None) -> str:
    if task == "sft":
        return _generate_code(folder, merged)
    labels = f", num_labels={int(num_labels)}" if num_labels and int(num_labels) != 2 else ""
    if merged:
        cls = "AutoModelForSequenceClassification" if task == "classification" else "AutoModelForCausalLM"
        return (f"from transformers import {cls}, AutoTokenizer\n"
                f"model = {cls}.from_pretrained(\"{folder}\")\n"
                f"tokenizer = AutoTokenizer.from_pretrained(\"{folder}\")")
    cls = "AutoPeftModelForSequenceClassification" if task == "classification" else "AutoPeftModelForCausalLM"
    return (f"from peft import {cls}\nfrom transformers import AutoTokenizer\n"
            f"model = {cls}.from_pretrained(\"{folder}\"{labels})\n"
            f"tokenizer = AutoTokenizer.from_pretrained(\"{folder}\")")


def _generate_code(folder: Path, merged: bool) -> str:
    """How to answer a question with a promoted sft model: its chat template, greedy decoding."""
    cls = "AutoModelForCausalLM" if merged else "AutoPeftModelForCausalLM"
    package = "transformers" if merged else "peft"
    return (f"from {package} import {cls}\nfrom transformers import AutoTokenizer\n"
            f"model = {cls}.from_pretrained(\"{folder}\")\n"
            f"tokenizer = AutoTokenizer.from_pretrained(\"{folder}\")\n"
            "messages = [{\"role\": \"user\", \"content\": \"What is the capital of France?\"}]\n"
            "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\", "
            "return_dict=True)\n"
            "output = model.generate(**inputs, max_new_tokens=32, do_sample=False)\n"
            "print(tokenizer.decode(output[0, inputs[\"input_ids\"].shape[1]:], skip_special_tokens=True))")
