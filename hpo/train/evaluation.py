"""Evaluation: a model's mean loss over a validation set, with accuracy (classification), perplexity
(causal LM) or the generation scores (sft, :func:`hpo.train.sft.evaluate`); on a test set too.

Batches of the sweep's ``eval_batch_size``, halved on an out-of-memory error
(:func:`hpo.train.accelerator.halving_on_oom`): the size changes speed and memory, not the metrics.
Every forward pass runs in the run's precision (``torch.autocast``), as training does.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from hpo.train import accelerator, data, sft
from hpo.train.batches import ClassificationSet, blocks, model_inputs, to_device, tokenize
from hpo.train.recipe import TrainJob


def evaluate(job: TrainJob, model: Any, tokenizer: Any, eval_set: Any) -> dict[str, float]:
    """Mean loss over the validation set; accuracy (classification) or perplexity (causal LM).
    Batches of ``eval_batch_size``, halved on an out-of-memory error."""
    metrics, _ = accelerator.halving_on_oom(lambda size: _evaluate(job, model, tokenizer, eval_set, size),
                                            job.sweep.eval_batch_size)
    return metrics


@torch.no_grad()
def _evaluate(job: TrainJob, model: Any, tokenizer: Any, eval_set: Any, size: int) -> dict[str, float]:
    if job.sweep.task == "sft":
        return sft.evaluate(job, model, tokenizer, eval_set, size)
    model.eval()
    device = next(model.parameters()).device
    precision = accelerator.resolve_precision(job.sweep.precision, device)
    total_loss, total_count, correct = 0.0, 0, 0
    for start in range(0, len(eval_set), size):
        batch = to_device(model_inputs(eval_set, range(start, min(start + size, len(eval_set))), tokenizer,
                                       job.sweep.task), device)
        with accelerator.autocast(device, precision):
            out = model(**batch)
        count = batch["labels"].shape[0]
        total_loss += out.loss.item() * count
        total_count += count
        if job.sweep.task == "classification":
            correct += (out.logits.argmax(-1) == batch["labels"]).sum().item()
    eval_loss = total_loss / total_count
    if job.sweep.task == "classification":
        return {"eval_loss": eval_loss, "eval_accuracy": correct / total_count}
    return {"eval_loss": eval_loss, "eval_perplexity": math.exp(min(eval_loss, 50.0))}


def evaluate_source(job: TrainJob, model: Any, tokenizer: Any, source: str) -> dict[str, float]:
    """Evaluate ``model`` on another data source (a test set), the way validation is done."""
    sweep = job.sweep
    if sweep.task == "sft":
        return evaluate(job, model, tokenizer, sft.eval_set(job, tokenizer, sft.read(source), source=source))
    examples = data.read(source, sweep.task, sweep.text_column, sweep.label_column)
    if sweep.task == "causal_lm":
        dataset = blocks(examples, tokenizer, sweep.max_length)
    else:
        dataset = ClassificationSet((tokenize(examples.texts, tokenizer, sweep.max_length), examples.labels))
    return evaluate(job, model, tokenizer, dataset)
