"""A memory-lean loss for large vocabularies (sweep field ``lean_loss``): the causal LM loss from
the last hidden states and the output layer's weight, without the logits of the whole batch.

The plain loss holds ``tokens x vocabulary`` logits, their fp32 upcast, the log-softmax and the
gradient of each: at batch 8 x 512 with SmolLM2's 49,152-token vocabulary that is 200M
values per copy, 0.8 GB each in fp32, more than the 135M model itself. The kinds:

* ``chunked``: plain torch, on any device: liger-kernel's algorithm -- the rows go through the
  output layer a chunk at a time (at most 16M logits, 64 MB in fp32), each chunk's gradient
  computed in the forward pass and its logits freed.
* ``liger``: liger-kernel's fused linear cross-entropy (Triton, CUDA): the same, in fused kernels.
* ``cce``: Apple's cut-cross-entropy (Triton, CUDA; Ampere and later by its authors): the
  logits never leave the kernel's on-chip memory.

Applied for one trial by replacing the base model's ``forward`` on the instance (as
liger-kernel's ``_apply_liger_kernel_to_instance`` does) and restored when the trial ends: a
call with ``labels`` computes the loss this way and returns no logits; a call without (greedy
generation) runs the model's own forward. Every caller -- peft's wrapper, DistributedDataParallel,
the evaluation -- stays as it is.

It is the loss transformers computes (``ForCausalLMLoss``): labels shifted by one, -100
ignored, summed and divided by ``num_items_in_batch`` when given (the recipe's normalisation over
the micro-batches and ranks of a batch, ``hpo.train.training._loss_normaliser``), else by the
call's own count. Only rows with a label go through the output layer (sft: the answer tokens).
It holds where the output layer is a plain ``Linear`` whose output is the model's logits: an
adapter on ``lm_head``, or a model that scales or caps its logits (Gemma's soft-capping,
Cohere's ``logit_scale``, Granite's ``logits_scaling``), is refused when the trial starts.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable
from typing import Any

import torch

from hpo.errors import HpoError

IGNORE = -100
PACKAGES = {"liger": ("liger_kernel", "liger-kernel"), "cce": ("cut_cross_entropy", "cut-cross-entropy")}
"""The kinds that need a package: its import name and its name on PyPI."""
CHUNK_VALUES = 2**24
"""``chunked``: the most logits one chunk holds (64 MB in fp32; a 49k vocabulary: 341 rows)."""


def installed(kind: str) -> bool:
    """Whether ``kind``'s package imports here (``chunked`` and ``off`` need none)."""
    return kind not in PACKAGES or importlib.util.find_spec(PACKAGES[kind][0]) is not None


def problem(kind: str, device_kind: str, package: bool) -> str | None:
    """Why a worker whose trials run on a ``device_kind`` device (``cuda``, ``cpu``, ``mps``)
    cannot compute ``kind``, with ``package`` its package importable there; or None."""
    if kind not in PACKAGES:
        return None
    pip = PACKAGES[kind][1]
    if device_kind != "cuda":
        return (f"sweep field lean_loss={kind!r} runs Triton kernels on a CUDA GPU, but the trial's device is "
                f"{device_kind}; use --set lean_loss=chunked (plain torch, any device), or give trials a GPU "
                "(--set gpus_per_trial=1)")
    if not package:
        return (f"sweep field lean_loss={kind!r} needs the {pip} package, which the trial's worker cannot import; "
                f"pip install {pip} (or pip install 'hpo[lean]'), or --set lean_loss=chunked")
    return None


def apply(model: Any, kind: str) -> Callable[[], None]:
    """Compute ``model``'s loss the ``kind`` way until the returned function is called (it puts
    the model's own ``forward`` back). ``model`` is the transformers causal LM (inside peft's
    wrapper, adapters in place). ``off`` changes nothing.

    Raises HpoError, naming the field and the fix, for a model whose logits are not its output
    layer applied to its body's last hidden states, or a ``kind`` this device cannot run."""
    if kind == "off":
        return lambda: None
    device = next(model.parameters()).device
    found = problem(kind, device.type, installed(kind))
    if found:
        raise HpoError(found)
    body, head = _body_and_head(model, kind)
    own = model.__dict__.get("forward")  # an instance-level forward already there (a hook's wrapper)
    original = model.forward
    _check_plain_head(model, original, body, head, kind)

    @functools.wraps(original)  # generate() reads the signature: the model's own
    def forward(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("labels") is None:
            return original(*args, **kwargs)
        return _lean_forward(body, head, kind, *args, **kwargs)

    model.forward = forward

    def restore() -> None:
        if own is not None:
            model.forward = own
        else:
            del model.forward

    return restore


def _body_and_head(model: Any, kind: str) -> tuple[Any, torch.nn.Linear]:
    head = model.get_output_embeddings()
    body = model.base_model
    fix = "use --set lean_loss=off"
    if head is not None and hasattr(head, "base_layer"):
        raise HpoError(f"sweep field lean_loss={kind!r} computes the loss from the output layer's weight, but the "
                       "output layer (lm_head) carries a LoRA adapter; leave lm_head out of target_modules, or "
                       f"{fix}")
    if type(head) is not torch.nn.Linear or body is model:
        raise HpoError(f"sweep field lean_loss={kind!r}: {type(model).__name__} has no plain linear output layer "
                       f"over a separate body (lm_head is {type(head).__name__}); {fix}")
    if kind == "cce" and head.bias is not None:
        raise HpoError(f"sweep field lean_loss='cce': {type(model).__name__}'s output layer has a bias, which "
                       "cut-cross-entropy does not take; use --set lean_loss=liger or chunked")
    return body, head


def _check_plain_head(model: Any, original: Callable, body: Any, head: torch.nn.Linear, kind: str) -> None:
    """Refuse a model whose logits are not ``head(body(...).last_hidden_state)``: one 8-token
    forward, the logits compared with what the output layer returned (exactly: the same tensor
    unless the model scales or caps it) and its input with the body's last hidden states."""
    seen: dict[str, torch.Tensor] = {}
    handle = head.register_forward_hook(lambda module, args, out: seen.update(hidden=args[0], logits=out))
    probe = (torch.arange(1, 9, device=head.weight.device) % head.out_features).unsqueeze(0)
    training = model.training
    model.eval()  # no dropout: the two forwards see the same weights the same way
    try:
        with torch.no_grad():
            logits = original(input_ids=probe).logits
            hidden = body(input_ids=probe).last_hidden_state
    finally:
        handle.remove()
        model.train(training)
    plain = ("logits" in seen and logits.shape == seen["logits"].shape
             and torch.equal(logits.float(), seen["logits"].float())
             and torch.allclose(hidden.float(), seen["hidden"].float(), rtol=1e-3, atol=1e-4))
    if not plain:
        raise HpoError(f"sweep field lean_loss={kind!r}: {type(model).__name__}'s logits are not its output layer applied to "
                       "its last hidden states (it scales, caps or slices them), so a loss from the output layer's "
                       "weight would differ from the model's own; use --set lean_loss=off")


def _lean_forward(body: Any, head: torch.nn.Linear, kind: str, input_ids: Any = None, *, labels: torch.Tensor,
                  num_items_in_batch: Any = None, logits_to_keep: Any = 0, **inputs: Any) -> Any:
    """The model's forward with labels: its body, then the loss of the rows that have a label
    (position t predicts label t+1), summed, over ``num_items_in_batch`` or their own count."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    hidden = body(input_ids=input_ids, **inputs).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != IGNORE
    rows, wanted = hidden[:, :-1][keep], targets[keep]
    # no label in this piece: a zero that still reaches the weights, as the plain loss's would
    summed = _summed_loss(kind, rows, head, wanted) if len(wanted) else hidden.sum() * 0.0
    count = num_items_in_batch if num_items_in_batch is not None else keep.sum()
    return CausalLMOutputWithPast(loss=summed.float() / count)


def _summed_loss(kind: str, hidden: torch.Tensor, head: torch.nn.Linear, targets: torch.Tensor) -> torch.Tensor:
    """The cross-entropy of ``head(hidden)`` against ``targets`` (rows ``[N, H]``, ``[N]``),
    summed over the rows."""
    if kind == "chunked":
        return chunked_cross_entropy(hidden, head.weight, head.bias, targets)
    hidden = hidden.to(head.weight.dtype)  # the kernels take one dtype (autocast has cast the body's already)
    if kind == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        return LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE, reduction="sum")(head.weight, hidden, targets,
                                                                                       head.bias)
    from cut_cross_entropy import linear_cross_entropy

    return linear_cross_entropy(hidden, head.weight, targets, ignore_index=IGNORE, reduction="sum", impl="cce")


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                          targets: torch.Tensor, rows: int | None = None) -> torch.Tensor:
    """Summed cross-entropy of ``linear(hidden, weight, bias)`` against ``targets`` (-100:
    ignored), ``rows`` at a time (default: as many as keep a chunk's logits within
    :data:`CHUNK_VALUES`); see :class:`_ChunkedLinearCrossEntropy`."""
    rows = rows or max(1, CHUNK_VALUES // weight.shape[0])
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, bias, targets, rows)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """liger-kernel's fused linear cross-entropy in torch operations: each chunk's logits give its
    loss and, at once, its gradients (softmax minus the one-hot target, through the linear layer),
    then are freed; the backward pass only scales the gradients kept (the size of ``hidden``,
    and of ``weight`` when it trains). No chunk is computed twice, so it costs what the plain loss
    costs, without its ``rows x vocabulary`` tensors."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor, rows: int) -> torch.Tensor:
        wants = ctx.needs_input_grad[:3]  # False for a bias that is None
        grad_hidden = torch.zeros_like(hidden, dtype=torch.float32) if wants[0] else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if wants[1] else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if wants[2] and bias is not None else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], rows):
            part, labels = hidden[start : start + rows], targets[start : start + rows]
            logits = torch.nn.functional.linear(part, weight, bias).float()  # upcast, as transformers' loss does
            log_p = torch.log_softmax(logits, dim=-1)
            del logits
            valid = labels != IGNORE
            picked = labels.clamp(min=0).unsqueeze(1)
            total -= (log_p.gather(1, picked).squeeze(1) * valid).sum()
            if not any(wants):
                continue
            grad = log_p.exp_()  # the softmax, in place: d loss / d logits is softmax - one-hot
            grad.scatter_add_(1, picked, valid.unsqueeze(1).to(grad.dtype).neg())
            if not valid.all():
                grad[~valid] = 0.0
            if grad_hidden is not None:
                grad_hidden[start : start + rows] = grad.to(weight.dtype) @ weight
            if grad_weight is not None:
                grad_weight += grad.T @ part.float()
            if grad_bias is not None:
                grad_bias += grad.sum(0)
        grads = (grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        ctx.save_for_backward(*(g for g in grads if g is not None))
        ctx.kept = [g is not None for g in grads]
        return total

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple:
        kept = iter(ctx.saved_tensors)
        grads = [(next(kept) * grad_output).to(dtype) if wanted else None
                 for wanted, dtype in zip(ctx.kept, ctx.dtypes, strict=True)]
        return (*grads, None, None)
