"""What a trial's training costs: tokens per second and, on a CUDA GPU, model FLOPs
utilisation (MFU), reported with every evaluation (``tokens_per_second``, ``mfu``) and
usable as objectives of a multi-objective sweep.

FLOPs of one LoRA training token (a matmul of an ``n x k`` weight costs ``2nk`` per token
forward; its backward costs the same for the input's gradient and the same again for the
weight's, which a frozen weight skips):

    F_linear    = (4 + 2c) * N + 2 * N_train
    F_attention = (3 + c) * 4 * n_layers * d_model * S

with ``N`` the parameters of the base's matmuls (the input embedding is a lookup, not a
matmul: left out; a tied output head counts), ``N_train`` the trainable ones (adapter, task
head), ``c`` = 1 with gradient checkpointing (the forward runs twice) else 0, and ``S`` the
mean row length in tokens (attention's two matmuls, ``QK^T`` and ``AV``, cost ``2 * S * d``
each per token and layer forward; their backward computes the gradients of both inputs,
twice the forward). Full fine-tuning (``N_train = N``, ``c = 0``) gives the familiar
``6N + 12 L d S``.

MFU = tokens per second x F / the peak dense FLOP/s of the trial's GPUs in the training
precision (:data:`PEAK_TFLOPS` x the data-parallel ranks, each on its own GPU; fp32 counts
TF32's rate on cards where TF32 is used). A card not in the table reports no ``mfu``.
"""

from __future__ import annotations

from typing import Any

import torch

PEAK_TFLOPS: dict[str, dict[str, float]] = {
    # dense tensor-core TFLOP/s per precision (vendor datasheets; no sparsity)
    "H200": {"bf16": 989.0, "fp16": 989.0, "fp32": 494.5},
    "H100 SXM": {"bf16": 989.0, "fp16": 989.0, "fp32": 494.5},
    "H100 NVL": {"bf16": 835.0, "fp16": 835.0, "fp32": 417.5},
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "fp32": 378.0},
    "H100": {"bf16": 989.0, "fp16": 989.0, "fp32": 494.5},
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 156.0},
    "L40S": {"bf16": 362.0, "fp16": 362.0, "fp32": 183.0},
    "L4": {"bf16": 121.0, "fp16": 121.0, "fp32": 60.0},
    "A10G": {"bf16": 70.0, "fp16": 70.0, "fp32": 35.0},
    "A10": {"bf16": 125.0, "fp16": 125.0, "fp32": 62.5},
    "RTX 4090": {"bf16": 165.0, "fp16": 165.0, "fp32": 82.6},
    "V100": {"fp16": 125.0, "fp32": 15.7},
    "T4": {"fp16": 65.0, "fp32": 8.1},
}


def peak_flops(device_name: str, precision: str) -> float | None:
    """The card's peak dense FLOP/s in ``precision``, from the longest table name in ``device_name``."""
    for name in sorted(PEAK_TFLOPS, key=len, reverse=True):
        if name in device_name:
            tflops = PEAK_TFLOPS[name].get(precision)
            return tflops * 1e12 if tflops else None
    return None


class FlopCounter:
    """Counts the tokens a trial trains on and their FLOPs (module docstring's formula)."""

    def __init__(self, model: Any, checkpointing: bool):
        self.matmul_params, self.trainable = _matmul_params(model)
        config = getattr(model, "config", None)
        self.layers = _config_value(config, ("num_hidden_layers", "n_layer"))
        self.width = _config_value(config, ("hidden_size", "n_embd", "d_model"))
        self.recompute = 1 if checkpointing else 0
        self.tokens = 0
        self.flops = 0.0

    def per_token(self, row_length: float) -> float:
        linear = (4 + 2 * self.recompute) * self.matmul_params + 2 * self.trainable
        attention = (3 + self.recompute) * 4 * self.layers * self.width * row_length
        return linear + attention

    def add_batch(self, row_tokens: torch.Tensor) -> None:
        """Add one training batch (the whole sampled batch), given each row's real tokens."""
        tokens = int(row_tokens.sum())
        self.tokens += tokens
        if tokens:
            self.flops += tokens * self.per_token(tokens / len(row_tokens))


def throughput(counter: FlopCounter, seconds: float, device: Any, precision: str, gpus: int = 1) -> dict[str, float]:
    """``tokens_per_second`` since training started and, on a CUDA card in the table, ``mfu``
    over the ``gpus`` that trained the counted batches (a multi-worker trial's ranks)."""
    if seconds <= 0:
        return {}
    values = {"tokens_per_second": counter.tokens / seconds}
    if device.kind == "cuda":
        peak = peak_flops(device.name, precision)
        if peak:
            values["mfu"] = counter.flops / seconds / (peak * gpus)
    return values


def _matmul_params(model: Any) -> tuple[int, int]:
    """(weights of the Linear-like layers, trainable weights); the input embedding is left out."""
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    skip = {id(p) for p in embedding.parameters()} if embedding is not None else set()
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied_head = output is not None and embedding is not None and output.weight is embedding.weight
    matmul = trainable = 0
    seen: set[int] = set()
    for weight in model.parameters():
        if id(weight) in seen:
            continue
        seen.add(id(weight))
        if weight.requires_grad:
            trainable += weight.numel()
        if weight.dim() >= 2 and id(weight) not in skip:
            matmul += _numel(weight)
    if tied_head and embedding is not None:
        matmul += embedding.weight.numel()
    return matmul, trainable


def _numel(weight: torch.Tensor) -> int:
    """Logical parameters (a bitsandbytes 4-bit weight packs two in a byte)."""
    shape = getattr(weight, "quant_state", None)
    if shape is not None and getattr(shape, "shape", None) is not None:
        return int(torch.Size(shape.shape).numel())
    return weight.numel()


def _config_value(config: Any, names: tuple[str, ...]) -> int:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return 0
