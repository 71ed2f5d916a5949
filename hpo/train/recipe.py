"""What the built-in fine-tuning recipe takes: one trial's parameters and its job.

Kept apart from the training loop (which imports torch and transformers) so that the
command line can check a search space's parameter names without loading either.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from hpo.config import Sweep


@dataclass(frozen=True)
class TrainParams:
    """The hyperparameters ``space(trial)`` may return for the built-in recipe."""

    learning_rate: float = 5e-4
    """Peak learning rate of AdamW (after warmup, decayed linearly to 0)."""
    batch_size: int = 16
    """Examples per optimizer step."""
    weight_decay: float = 0.0
    """AdamW weight decay on the trainable (adapter and head) weights."""
    lora_r: int = 8
    """Rank of the LoRA update matrices."""
    lora_alpha: float = 16.0
    """LoRA scaling numerator: the update is scaled by lora_alpha / lora_r."""
    lora_dropout: float = 0.1
    """Dropout on the LoRA branch's input."""
    warmup_ratio: float = 0.0
    """Share of max_steps spent warming the learning rate up from 0."""
    max_grad_norm: float = 1.0
    """Gradient norm clip; 0 disables clipping."""
    loraplus_lr_ratio: float = 0.0
    """LoRA+ (Hayou et al. 2024): the lora_B matrices learn at this many times learning_rate. Its
    authors: at least 1, larger for harder tasks, with learning_rate about half plain LoRA's. 0: off."""
    target_modules: tuple[str, ...] | None = None
    """Module names that get LoRA adapters; None uses peft's default for the model type.
    A search space may sample it as a comma-separated string ("query,value,key")."""
    augment_word_dropout: float = 0.0
    """Text augmentation: chance to drop each word of a training text (0: off)."""
    augment_word_swap: float = 0.0
    """Text augmentation: chance to swap each word with its neighbour (0: off)."""
    augment_synonym: float = 0.0
    """Text augmentation: chance to replace a word found in the sweep's synonym table (0: off)."""

    def __post_init__(self) -> None:
        modules = self.target_modules
        if isinstance(modules, str):
            modules = tuple(m.strip() for m in modules.split(",") if m.strip())
        if modules is not None and not isinstance(modules, tuple):
            modules = tuple(modules)
        object.__setattr__(self, "target_modules", modules or None)

    @property
    def augments(self) -> bool:
        return bool(self.augment_word_dropout or self.augment_word_swap or self.augment_synonym)


PARAM_NAMES = tuple(f.name for f in dataclasses.fields(TrainParams))
# What the recipe reports at every evaluation (hpo.train.training, hpo.train.sft), by task.
REPORTED = {
    "classification": ("eval_accuracy", "eval_loss"),
    "causal_lm": ("eval_loss", "eval_perplexity"),
    "sft": ("eval_loss", "eval_perplexity", "eval_exact_match", "eval_score", "generation_seconds",
            "eval_unfinished", "eval_repetition", "eval_format_fail", "eval_score_fail",  # hpo.train.answers
            "retain_loss", "retain_score", "retain_loss_before", "retain_score_before"),
}
REPORTED_BY_ALL = ("train_loss", "train_loss_max", "grad_norm", "grad_norm_max", "learning_rate", "train_seconds",
                   "micro_batch_size", "grad_accum", "peak_memory_mb", "peak_reserved_memory_mb", "resident_memory_mb",
                   "trainable_params", "tokens_per_second")
"""What every built-in recipe evaluation reports (``mfu`` too, on a CUDA device)."""
# Besides the hyperparameters, a space may choose the base model (transfer learning) and seed.
JOB_KEYS = ("model", "seed")


def check_params(params: dict[str, Any], task: str = "classification") -> str | None:
    """Why ``params`` cannot drive the built-in recipe, or None if it can."""
    unknown = sorted(set(params) - set(PARAM_NAMES) - set(JOB_KEYS))
    if unknown:
        return (
            f"returned {', '.join(map(repr, unknown))}, which the built-in recipe does not know; "
            f"use {', '.join(PARAM_NAMES + JOB_KEYS)} or define train(params, report) in the module"
        )
    if "model" in params and (not isinstance(params["model"], str) or not params["model"]):
        return f"returned model={params['model']!r}, expected a Hugging Face model id or a local folder"
    positive = ("learning_rate", "batch_size", "lora_r", "lora_alpha")
    for name, value in params.items():
        if name in ("target_modules", "model"):
            continue
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            return f"returned {name}={value!r}, expected a finite number"
        if name in positive and value <= 0:
            return f"returned {name}={value!r}, expected a positive number"
        if value < 0:
            return f"returned {name}={value!r}, expected a number of at least 0"
    if not 0 <= params.get("lora_dropout", 0) < 1:
        return f"returned lora_dropout={params['lora_dropout']!r}, expected a number in [0, 1)"
    for name in ("warmup_ratio", "augment_word_dropout", "augment_word_swap", "augment_synonym"):
        if not 0 <= params.get(name, 0) < 1:
            return f"returned {name}={params[name]!r}, expected a number in [0, 1)"
    if task != "classification" and any(params.get(k) for k in ("augment_word_dropout", "augment_word_swap",
                                                                   "augment_synonym")):
        return "returned a text augmentation, which applies to classification only"
    return None


def check_placement(sweep: Sweep) -> str | None:
    """Why the recipe cannot use the GPUs the sweep reserves, or None: the recipe trains each
    worker's model on one device, so a worker with two or more GPUs would hold the rest idle
    (spread a trial over GPUs with ``workers_per_trial``: one worker per GPU, data-parallel)."""
    gpus = sweep.worker_resources["GPU"]
    if gpus >= 2:
        field = sweep.gpu_field
        return (f"sweep field {field}={getattr(sweep, field)!r} gives one worker {gpus:g} GPUs, but the built-in "
                "recipe trains a worker's model on one GPU and would leave the others idle; train on all of them "
                f"data-parallel with --set workers_per_trial={int(gpus)} (one GPU each), or reserve one GPU "
                f"(--set {field}=1), or define train(params, report) in the module to place the model yourself")
    return None


def check_metrics(sweep: Sweep) -> str | None:
    """Why the recipe cannot report the sweep's ``metric`` or ``prune_metric``, or None.
    (sft's ``eval_score`` needs the module's ``score``; that is checked where the module is known.)"""
    reported = REPORTED.get(sweep.task, ()) + REPORTED_BY_ALL
    fields = [("metric", name) for name in sweep.metrics] + ([("prune_metric", sweep.prune_metric)] if sweep.prune_metric else [])
    for name, metric in fields:
        if metric not in reported:
            return (f"sweep field {name}={metric!r} is not something the built-in recipe reports for task "
                    f"{sweep.task}; use one of {', '.join(reported)} (--set {name}=...), or define "
                    "train(params, report) in the module")
    return None


SEARCH_FIELDS = ("test_data", "metric", "direction", "objective", "prune_metric", "prune_direction", "trials",
                 "timeout", "pruner", "grace_period", "reduction_factor", "sampler", "lr_probe", "cpus_per_trial",
                 "gpus_per_trial", "workers_per_trial", "cpus_per_worker", "gpus_per_worker", "concurrency", "extra")
"""The :class:`~hpo.config.Sweep` fields that choose, judge, place and schedule trials (the driver's, recorded
on the sweep's parent MLflow run), and promote's test set. Every other field is a training setting: the recipe
reads it as ``job.sweep.NAME`` and each trial's MLflow run records it (:meth:`TrainJob.describe`)."""
TRAINING_FIELDS = tuple(f.name for f in dataclasses.fields(Sweep) if f.name not in SEARCH_FIELDS)
"""The sweep's training settings, in the order the Sweep declares them."""
RESOLVED_ON_WORKER = ("device", "precision")
"""Training settings a trial's run records as the worker resolved them (``cuda:0``, ``bf16``), not as asked."""


@dataclass(frozen=True)
class TrainJob:
    """Everything one run of the recipe needs: the sweep's training settings, the trial's parameters,
    and how the run ends; plain data, picklable to Ray workers.

    A training setting is a :class:`~hpo.config.Sweep` field, read as ``job.sweep.NAME``: adding one
    means one ``Sweep`` field and its check, nothing here. Make one with :meth:`from_sweep`.
    """

    sweep: Sweep
    """The sweep's settings: ``max_steps``, ``max_length``, ``device``, ``packing``, ... Its ``model`` and
    ``seed`` give way to the job's own (a space may choose them per trial)."""
    model: str
    """The base model this run trains: the trial's ``model`` when the space chose one, else the sweep's."""
    seed: int
    """The run's seed: the trial's ``seed`` when the space chose one, else the sweep's."""
    params: TrainParams = field(default_factory=TrainParams)
    restore_best: bool = False
    """End with the weights of the best evaluation (by ``watch``)."""
    watch: str = "eval_loss"
    """What early stopping (the sweep's ``patience``) and ``restore_best`` judge an evaluation by (``watch_mode``
    says which way is better; equal values go to the lower eval_loss): eval_loss in trials, the sweep's metric in
    promote."""
    watch_mode: str = "min"
    """``min`` or ``max``: the better direction of ``watch``."""
    min_steps: int = 0
    """Early stopping never ends the run before this step."""

    @property
    def gpu_share(self) -> float:
        """The GPUs one worker of the trial reserves (``Sweep.worker_resources``): below 1 the process
        is capped at that share of the card's memory (:func:`hpo.train.accelerator.memory_fraction`)."""
        return self.sweep.worker_resources["GPU"]

    def with_settings(self, **changes: Any) -> TrainJob:
        """The same job with these sweep fields changed (the sweep checks them again)."""
        return dataclasses.replace(self, sweep=dataclasses.replace(self.sweep, **changes))

    def describe(self) -> dict[str, Any]:
        """The job as flat, loggable values, defaults filled in: what the MLflow trial run
        records when the trial starts. ``device``, ``precision`` and (when not chosen)
        ``target_modules`` are left out: the worker reports what they resolved to."""
        flat: dict[str, Any] = dataclasses.asdict(self.params)
        flat["target_modules"] = ",".join(self.params.target_modules or ()) or None
        flat.update({name: getattr(self.sweep, name) for name in TRAINING_FIELDS})
        flat.update(model=self.model, seed=self.seed, restore_best=self.restore_best, watch=self.watch,
                    watch_mode=self.watch_mode, min_steps=self.min_steps)
        return {k: v for k, v in flat.items() if v is not None and k not in RESOLVED_ON_WORKER}

    @classmethod
    def from_sweep(cls, sweep: Sweep, params: dict[str, Any]) -> TrainJob:
        """The job of one trial: ``params`` from the space (hyperparameters, and ``model`` or ``seed``
        when it chooses them) on the sweep's settings."""
        values = {k: v for k, v in params.items() if k not in JOB_KEYS}
        if "batch_size" in values:
            values["batch_size"] = int(values["batch_size"])
        if "lora_r" in values:
            values["lora_r"] = int(values["lora_r"])
        return cls(sweep=sweep, model=str(params.get("model", sweep.model)), seed=int(params.get("seed", sweep.seed)),
                   params=TrainParams(**values))

