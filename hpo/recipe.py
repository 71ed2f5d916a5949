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
    target_modules: tuple[str, ...] | None = None
    """Module names that get LoRA adapters; None uses peft's default for the model type."""

    def __post_init__(self) -> None:
        if self.target_modules is not None and not isinstance(self.target_modules, tuple):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))


PARAM_NAMES = tuple(f.name for f in dataclasses.fields(TrainParams))


def check_params(params: dict[str, Any]) -> str | None:
    """Why ``params`` cannot drive the built-in recipe, or None if it can."""
    unknown = sorted(set(params) - set(PARAM_NAMES) - {"seed"})
    if unknown:
        return (
            f"returned {', '.join(map(repr, unknown))}, which the built-in recipe does not know; "
            f"use {', '.join(PARAM_NAMES)} or define train(params, report) in the module"
        )
    positive = ("learning_rate", "batch_size", "lora_r", "lora_alpha")
    for name, value in params.items():
        if name == "target_modules":
            continue
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            return f"returned {name}={value!r}, expected a finite number"
        if name in positive and value <= 0:
            return f"returned {name}={value!r}, expected a positive number"
        if value < 0:
            return f"returned {name}={value!r}, expected a number of at least 0"
    if not 0 <= params.get("lora_dropout", 0) < 1:
        return f"returned lora_dropout={params['lora_dropout']!r}, expected a number in [0, 1)"
    if not 0 <= params.get("warmup_ratio", 0) < 1:
        return f"returned warmup_ratio={params['warmup_ratio']!r}, expected a number in [0, 1)"
    return None


@dataclass(frozen=True)
class TrainJob:
    """Everything one run of the recipe needs; plain data, picklable to Ray workers."""

    model: str
    task: str
    train_data: str
    eval_data: str | None
    text_column: str | None
    label_column: str | None
    max_length: int
    eval_fraction: float
    max_steps: int
    eval_every: int
    eval_batch_size: int
    seed: int
    params: TrainParams = field(default_factory=TrainParams)
    train_limit: int | None = None
    """Use at most this many training examples (a seeded sample); None: all."""
    patience: int | None = None
    """Stop after this many evaluations without a lower eval_loss; None/0: never."""
    restore_best: bool = False
    """End with the weights of the evaluation with the lowest eval_loss."""

    @classmethod
    def from_sweep(cls, sweep: Sweep, params: dict[str, Any]) -> TrainJob:
        values = {k: v for k, v in params.items() if k != "seed"}
        if "batch_size" in values:
            values["batch_size"] = int(values["batch_size"])
        if "lora_r" in values:
            values["lora_r"] = int(values["lora_r"])
        return cls(
            model=sweep.model,
            task=sweep.task,
            train_data=sweep.train_data,
            eval_data=sweep.eval_data,
            text_column=sweep.text_column,
            label_column=sweep.label_column,
            max_length=sweep.max_length,
            eval_fraction=sweep.eval_fraction,
            max_steps=sweep.max_steps,
            eval_every=sweep.eval_every,
            eval_batch_size=sweep.eval_batch_size,
            seed=int(params.get("seed", sweep.seed)),
            params=TrainParams(**values),
            train_limit=sweep.train_limit,
            patience=sweep.patience,
        )
