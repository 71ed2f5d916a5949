"""The built-in fine-tuning recipe: a base model + a fresh LoRA adapter, AdamW, evaluation
every ``eval_every`` steps, each evaluation handed to ``report(step, metrics)``.

A sampled batch size too large for the device is a setting, not a dead trial: on an
out-of-memory error the step is redone with half the micro-batch and gradients
accumulated over the pieces, so the effective batch (and the loss) stays the sampled one;
``micro_batch_size`` and ``grad_accum`` are reported. Only when one example does not fit
does the error propagate (the trial fails with reason ``oom``).

It knows nothing of Optuna, Ray or MLflow: it runs the same under Ray, in a plain
process, or in a test. ``report`` may raise to end the run early (Ray's stop does).

Load once per worker: the frozen base model and the tokenized data are cached in this
process, keyed by model, task and data (the base also by device, precision, quantization and
attention kernel: it stays on its device across trials); each run seeds torch, re-initialises
the task head, wraps the base in a new adapter and removes the adapter in ``finally``, so a
run on a warm worker gives exactly the results of a fresh load with the same seed.

Device and precision (:mod:`hpo.train.accelerator`): batches move to the device the worker
resolved; with bf16/fp16 the frozen base is stored in that dtype, the trainable weights
(adapter, head) in fp32, and every forward pass runs under ``torch.autocast`` (fp16 with a
``GradScaler``). Every report carries ``peak_memory_mb`` (the trial's high-water mark: GPU
memory, else the process's peak RSS) and ``resident_memory_mb`` (the worker's memory when
the trial started, after the cached base model: flat across trials when nothing leaks).
"""

from __future__ import annotations

import contextlib
import functools
import math
import statistics
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from hpo.errors import is_out_of_memory
from hpo.train import accelerator, answers, cost, data, lean_loss, models, sft
from hpo.train.recipe import TrainJob

Reporter = Callable[[int, dict[str, float]], None]
T = TypeVar("T")
# peft asks transformers a deprecated question on every wrap; it is not ours to answer.
warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)

_BASE_MODELS: dict[tuple, Any] = {}
_TOKENIZERS: dict[str, Any] = {}
_DATASETS: dict[tuple, tuple[Any, Any, int]] = {}
_RETAIN: dict[tuple, tuple[sft.SftSet, dict[str, float]]] = {}


def fine_tune(job: TrainJob, report: Reporter, on_trained: Callable[[Any, Any], None] | None = None,
              on_start: Callable[[dict[str, Any]], None] | None = None,
              score: Callable[[str, str], float] | None = None, started: float | None = None) -> dict[str, float]:
    """Train one LoRA adapter as ``job`` says; return the final model's metrics.

    With ``job.patience``, training stops once ``job.watch`` (eval_loss unless promote says
    otherwise; ``job.watch_mode`` is its better direction, ties go to the lower eval_loss) has
    not improved for that many evaluations, but not before ``job.min_steps``; with
    ``job.restore_best`` the weights of the best evaluation are restored at the end (and
    evaluated again). The returned metrics then also hold ``best_step`` and
    ``stopped_early_at`` (0 when it ran to ``max_steps``).
    ``on_trained(peft_model, tokenizer)`` is called at the end, before the adapter is removed
    from the cached base model (to save it, for example). ``on_start(settings)`` is called
    once the adapter is in place, with what the run resolved: device, precision,
    target_modules, trainable_params, ...
    ``score(prediction, reference)`` (task sft, from the search-space module) scores
    generated answers as ``eval_score``.
    The first report also holds ``trial_setup_seconds``: from ``started`` (a
    ``time.perf_counter()`` reading; default: this call) to the start of the first optimizer
    step, its batch drawn -- imports, model and data loading on a cold worker, a fresh
    adapter and optimizer on a warm one; not the step's own compute, which is training.
    """
    with adapter(job, score, started) as fresh:
        if on_start is not None:
            on_start(_settings(job, fresh.model, fresh.run, fresh.run.trainable_params))
        metrics = _train(job, fresh.model, fresh.tokenizer, fresh.train_set, fresh.eval_set, report, fresh.run)
        if on_trained is not None:
            on_trained(fresh.model, fresh.tokenizer)
        return metrics


@dataclass
class Adapter:
    """One run's fresh LoRA adapter on the worker's cached base model, and its data (what
    :func:`adapter` yields)."""

    model: Any
    """The peft model: the cached base with a new adapter and a re-initialised task head."""
    tokenizer: Any
    train_set: Any
    eval_set: Any
    run: _Run


@contextlib.contextmanager
def adapter(job: TrainJob, score: Callable[[str, str], float] | None = None,
            started: float | None = None) -> Iterator[Adapter]:
    """The base model (cached), tokenizer and data of ``job``, with a fresh seeded adapter in place
    for the ``with`` block; on the way out (an exception included) the adapter is removed from
    the cached base, so the next run on this worker starts clean. :func:`fine_tune` trains in it,
    and so does the learning-rate range test (:mod:`hpo.train.lr_probe`)."""
    started = time.perf_counter() if started is None else started
    from peft import get_peft_model

    device = accelerator.resolve_device(job.device)
    precision = accelerator.resolve_precision(job.precision, device)
    device_facts = accelerator.facts(device)
    accelerator.configure(device_facts, precision, job.gpu_share)
    tokenizer = _tokenizer(job.model)
    train_set, eval_set, num_labels = _datasets(job, tokenizer)
    base = _base_model(job, num_labels, tokenizer, device, precision)
    if job.task == "sft":
        eval_set = sft.with_score(eval_set, score)
        base.config.use_cache = False  # a KV cache in training turns off packed sequences' own attention
    run = _Run(device, precision, accelerator.grad_scaler(device, precision), accelerator.MemoryMeter(device),
               accelerator.current_memory(device))
    run.facts = device_facts
    run.started = started
    run.meter.start()

    torch.manual_seed(job.seed)
    _reset_head(base, job.task)
    hooks_before = _embedding_hooks(base)
    _set_gradient_checkpointing(base, job.gradient_checkpointing)
    model = get_peft_model(base, _lora_config(job, base.config.model_type))
    restore_forward: Callable[[], None] | None = None
    fresh: Adapter | None = None
    try:
        restore_forward = lean_loss.apply(base, job.lean_loss)  # the model's own forward is back in finally
        run.trainable_params = _upcast_trainable(model)
        fresh = Adapter(model, tokenizer, train_set, eval_set, run)
        yield fresh
    except BaseException as error:  # Ray's early stop (SystemExit) included
        # The exception's traceback keeps the training loop's frame -- optimizer state,
        # gradients, the adapter -- alive as long as someone holds it; drop those locals now.
        traceback.clear_frames(error.__traceback__)
        raise
    finally:
        if restore_forward is not None:
            restore_forward()
        model.unload()  # the cached base is clean again for the next run on this worker
        _remove_new_embedding_hooks(base, hooks_before)  # peft's input-grad hook (checkpointing)
        if fresh is not None:
            fresh.model = None  # the caller's frame may outlive this block (an exception's traceback)
        del model  # the caller frees what is left (hpo.train.accelerator.release_memory)


def _embedding_hooks(base: Any) -> set[int]:
    """Ids of the forward hooks on the base's input embeddings now."""
    embeddings = base.get_input_embeddings()
    return set(embeddings._forward_hooks) if embeddings is not None else set()


def _remove_new_embedding_hooks(base: Any, before: set[int]) -> None:
    """Remove the forward hooks added to the input embeddings since ``before``: with gradient
    checkpointing, peft's ``get_peft_model`` registers one (``enable_input_require_grads``) on
    every wrap and ``unload()`` leaves it, so a warm worker's base would gather one per trial."""
    embeddings = base.get_input_embeddings()
    if embeddings is None:
        return
    for key in set(embeddings._forward_hooks) - before:
        embeddings._forward_hooks.pop(key, None)
        embeddings._forward_hooks_with_kwargs.pop(key, None)
        embeddings._forward_hooks_always_called.pop(key, None)
    if hasattr(base, "_require_grads_hooks"):
        base._require_grads_hooks = []
    if hasattr(base, "_require_grads_hook"):
        del base._require_grads_hook


class _Run:
    """Where and how one run computes, and its memory meter."""

    def __init__(self, device: torch.device, precision: str, scaler: Any, meter: accelerator.MemoryMeter,
                 resident: int):
        self.device, self.precision, self.scaler, self.meter, self.resident = device, precision, scaler, meter, resident
        self.started = time.perf_counter()
        self.facts = accelerator.DeviceFacts(device.type)
        """The device's facts (kind, name, compute capability), read once per run."""
        self.setup_seconds: float | None = None
        """From the start to the start of the first optimizer step; reported once, then None."""
        self.trainable_params = 0
        """The adapter's (and task head's) trainable weights: reported with every evaluation, a cost
        objective of a multi-objective sweep (``metric="eval_accuracy,trainable_params"``)."""

    def memory(self) -> dict[str, float]:
        mib = 1024 * 1024
        return {"peak_memory_mb": round(self.meter.peak() / mib), "peak_reserved_memory_mb": round(self.meter.peak_reserved() / mib),
                "resident_memory_mb": round(self.resident / mib), "trainable_params": self.trainable_params}


def _settings(job: TrainJob, model: Any, run: _Run, trainable: int) -> dict[str, Any]:
    config = model.peft_config["default"]
    return {**accelerator.describe(run.device), "precision": run.precision, "quantization": job.quantization,
            "gradient_checkpointing": job.gradient_checkpointing, "attn_implementation": job.attn_implementation,
            "lean_loss": job.lean_loss,
            "target_modules": ",".join(sorted(config.target_modules or ())), "trainable_params": trainable}


def _upcast_trainable(model: Any) -> int:
    """Trainable weights (adapter, task head) in fp32 whatever the base's dtype: the optimizer
    and the grad scaler work on fp32 master weights. Returns their number."""
    count = 0
    for weight in model.parameters():
        if weight.requires_grad:
            if weight.dtype != torch.float32:
                weight.data = weight.data.float()
            count += weight.numel()
    return count


def _set_gradient_checkpointing(base: Any, enabled: bool) -> None:
    """On or off for this run (the cached base keeps whatever the last run set)."""
    if enabled:
        # non-reentrant checkpointing needs no input that requires grad (the embeddings are frozen)
        base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        base.config.use_cache = False
    elif base.is_activation_checkpointing:
        base.activation_checkpointing_disable()


def make_optimizer(model: Any, trainable: list, p: Any, fused: bool = False) -> torch.optim.Optimizer:
    """AdamW over the trainable weights at ``p.learning_rate`` (``fused``: its fused kernel). With
    ``p.loraplus_lr_ratio`` > 0, LoRA+ (Hayou et al. 2024) through peft's ``create_loraplus_optimizer``:
    the lora_B matrices (and, as peft does, 1-D trainable weights such as biases) learn at ratio x
    the rate, the rest (lora_A, the task head's matrices) at the rate; 1-D weights get no weight decay."""
    options: dict[str, Any] = {"fused": True} if fused else {}
    if not p.loraplus_lr_ratio:
        return torch.optim.AdamW(trainable, lr=p.learning_rate, weight_decay=p.weight_decay, **options)
    from peft.optimizers import create_loraplus_optimizer

    return create_loraplus_optimizer(model, torch.optim.AdamW, lr=p.learning_rate,
                                     loraplus_lr_ratio=p.loraplus_lr_ratio, loraplus_weight_decay=p.weight_decay,
                                     **options)


def _train(job: TrainJob, model: Any, tokenizer: Any, train_set: Any, eval_set: Any, report: Reporter,
           run: _Run) -> dict[str, float]:
    p = job.params
    trainable = [w for w in model.parameters() if w.requires_grad]
    optimizer = make_optimizer(model, trainable, p, fused=job.fused_optimizer)
    warmup = int(p.warmup_ratio * job.max_steps)

    def schedule(step: int) -> float:  # linear warmup, then linear decay to 0
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (job.max_steps - step) / max(1, job.max_steps - warmup))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    batches = training_batches(job, train_set, tokenizer)
    retain = _retain(job, model, tokenizer, run)  # before any step: the base model's answers
    losses: list[float] = []
    norms: list[torch.Tensor] = []
    metrics: dict[str, float] = {}
    watch = _BestWatch(job.patience, job.restore_best, job.watch, job.watch_mode, job.min_steps)
    micro = p.batch_size
    runner, rank, world = _data_parallel(model)
    flops = cost.FlopCounter(model, job.gradient_checkpointing)

    def evaluate_now() -> dict[str, float]:
        return {**evaluate(job, model, tokenizer, eval_set), **(retain() if retain is not None else {})}

    padding_free = is_padding_free(job)
    started = time.perf_counter()
    model.train()
    for step in range(1, job.max_steps + 1):
        batch = next(batches)
        if step == 1:  # training starts: what came before was setup
            run.setup_seconds = time.perf_counter() - run.started
        flops.add_batch(batch[ROW_TOKENS])  # the whole batch: every rank drew it
        loss, micro, norm = optimizer_step(runner, batch, micro, optimizer, trainable, p.max_grad_norm, run,
                                           job.task, rank, world, padding_free)
        norms.append(norm)
        scheduler.step()
        losses.append(loss)
        if step % job.eval_every == 0 or step == job.max_steps:
            metrics = {**evaluate_now(), **_step_stats(losses, norms, world)}
            metrics["micro_batch_size"] = micro
            metrics["grad_accum"] = math.ceil(p.batch_size / micro)
            metrics["learning_rate"] = float(scheduler.get_last_lr()[0])
            metrics["train_seconds"] = _synchronised_seconds(run.device, started)
            metrics.update(cost.throughput(flops, metrics["train_seconds"], run.facts, run.precision, gpus=world))
            metrics.update(run.memory())
            if run.setup_seconds is not None:
                metrics["trial_setup_seconds"], run.setup_seconds = run.setup_seconds, None
            losses.clear()
            norms.clear()
            report(step, metrics)
            if watch.should_stop(step, metrics, model):
                break
            model.train()
    return watch.finish(step, metrics, model, evaluate_now)


def training_batches(job: TrainJob, train_set: Any, tokenizer: Any) -> Iterator[dict[str, Any]]:
    """The run's endless training batches: seeded, augmented (classification with an augmentation
    sampled), grouped by length (sft's ``group_by_length`` without packing)."""
    augment = _augmenter(job) if job.task == "classification" and job.params.augments else None
    lengths = [len(e.input_ids) for e in train_set.examples] if job.task == "sft" and job.group_by_length \
        and not job.packing else None
    return _batches(train_set, job.params.batch_size, job.seed, tokenizer, job.task, augment, job.max_length, lengths)


def is_padding_free(job: TrainJob) -> bool:
    """Whether packed sft batches go as one flattened row (flash attention: :func:`hpo.train.sft.padding_free`)."""
    return job.task == "sft" and job.packing and sft.wants_padding_free(job.attn_implementation)


def optimizer_step(runner: Any, batch: dict[str, Any], micro: int, optimizer: torch.optim.Optimizer,
                   trainable: list, max_grad_norm: float, run: _Run, task: str, rank: int = 0, world: int = 1,
                   padding_free: bool = False) -> tuple[float, int, torch.Tensor]:
    """One optimizer step on ``batch`` (this rank's shard of it): forward and backward in pieces of
    ``micro`` rows (halved on an out-of-memory error, see :func:`_halving_on_oom`), the gradients
    unscaled (fp16), clipped to ``max_grad_norm`` (0: not clipped), the step taken and the
    gradients zeroed. Returns the batch's loss, the micro-batch size that fitted and the gradient
    norm before clipping (a tensor left on the device, see :func:`_grad_norm`)."""
    normalise = _loss_normaliser(batch, task, world)
    pieces = functools.partial(_accumulate, runner, _shard(batch, rank, world), run=run, normalise=normalise,
                               padding_free=padding_free)  # pieces(micro) -> the step's loss
    loss, micro = _halving_on_oom(pieces, micro, can_halve=world == 1,  # ranks must stay in step
                                  before_retry=lambda: optimizer.zero_grad(set_to_none=True))
    if run.scaler is not None:
        run.scaler.unscale_(optimizer)  # clip and step on the true gradients
    norm = _grad_norm(trainable, max_grad_norm)
    if run.scaler is not None:
        run.scaler.step(optimizer)  # skipped when the scaled gradients overflowed
        run.scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, micro, norm


class _BestWatch:
    """Early stopping with patience, and the best weights kept to restore.

    An evaluation is better than the best so far when its ``watch`` metric is better (by
    ``mode``), or equal with a lower ``eval_loss`` (accuracy plateaus while the loss still
    moves). Patience never ends the run before ``min_steps``."""

    def __init__(self, patience: int | None, restore_best: bool, watch: str = "eval_loss", mode: str = "min",
                 min_steps: int = 0):
        self.patience = patience or 0
        self.restore_best = restore_best
        self.watch = watch
        self.sign = 1.0 if mode == "max" else -1.0
        self.min_steps = min_steps
        self.best: tuple[float, float] | None = None
        """(sign x watch, -eval_loss) of the best evaluation: larger is better."""
        self.best_step = 0
        self.best_state: dict[str, Any] | None = None
        self.since_best = 0
        self.stopped_at = 0

    def should_stop(self, step: int, metrics: dict[str, float], model: Any) -> bool:
        if not (self.patience or self.restore_best):
            return False
        key = (self.sign * metrics[self.watch], -metrics["eval_loss"])
        if self.best is None or key > self.best:
            self.best, self.best_step, self.since_best = key, step, 0
            if self.restore_best:
                self.best_state = {n: w.detach().clone() for n, w in model.named_parameters() if w.requires_grad}
            return False
        self.since_best += 1
        if self.patience and self.since_best >= self.patience and step >= self.min_steps:
            self.stopped_at = step
            return True
        return False

    def finish(self, step: int, metrics: dict[str, float], model: Any, evaluate_now: Callable[[], dict]) -> dict:
        if not (self.patience or self.restore_best):
            return metrics
        final = dict(metrics)
        if self.restore_best and self.best_state is not None and self.best_step != step:
            with torch.no_grad():
                for name, weight in model.named_parameters():
                    if name in self.best_state:
                        weight.copy_(self.best_state[name])
            final = {**metrics, **evaluate_now()}
        final["best_step"] = self.best_step
        final["stopped_early_at"] = self.stopped_at
        return final


ROW_TOKENS = "hpo_row_tokens"
"""Batch key (not a model input): each row's real tokens (padding left out), for tokens/s."""


@dataclass(frozen=True)
class _Normaliser:
    """How a piece's loss becomes its part of the sampled batch's loss (see :func:`_loss_normaliser`)."""

    by_tokens: bool
    whole: float
    """Examples (by_tokens False) or answer tokens (True) of the whole sampled batch, per rank."""


def _loss_normaliser(batch: dict[str, Any], task: str, world: int) -> _Normaliser:
    """The denominator that makes the pieces' losses (over micro-batches after an OOM halving,
    and over the ranks of a multi-worker trial) add up to the sampled batch's loss.

    classification and causal_lm (every row alike: one label, or a full block of tokens): the
    mean over examples, so a piece weighs its share of the batch's examples. sft: the mean over
    the batch's answer tokens (as one unsplit forward computes it), so each piece's loss is its
    summed token loss over the answer tokens of the whole batch -- passed to the model as
    ``num_items_in_batch`` -- whatever the answers' lengths. Every rank drew the whole batch, so
    the count is known on each without a collective; it is divided by ``world`` because DDP
    averages the ranks' gradients.
    """
    if task == "sft":
        answer_tokens = int((batch["labels"][:, 1:] != sft.IGNORE).sum())  # the labels the shifted loss uses
        return _Normaliser(True, max(1, answer_tokens) / world)
    return _Normaliser(False, batch["labels"].shape[0] / world)


def _accumulate(model: Any, batch: dict[str, Any], micro: int, run: _Run, normalise: _Normaliser | None = None,
                padding_free: bool = False) -> float:
    """Forward and backward ``batch`` in pieces of ``micro`` rows, each piece's loss scaled by
    ``normalise`` (default: this batch's mean over examples), so the gradient is the whole
    sampled batch's. ``padding_free``: each piece goes as one flattened row
    (:func:`hpo.train.sft.padding_free`, for flash attention). Returns the loss."""
    size = batch["labels"].shape[0]
    normalise = normalise or _Normaliser(False, float(size))
    total = 0.0
    for start in range(0, size, micro):
        piece = {k: v[start : start + micro] for k, v in batch.items()}
        row_tokens = piece.pop(ROW_TOKENS, None)
        if padding_free:
            piece = sft.padding_free(piece, row_tokens)
        piece = _to_device(piece, run.device)
        with accelerator.autocast(run.device, run.precision):
            if normalise.by_tokens:  # summed over the piece's answer tokens, divided by the batch's
                loss = _forward(model, {**piece, "num_items_in_batch": normalise.whole}).loss
            else:
                loss = _forward(model, piece).loss * (piece["labels"].shape[0] / normalise.whole)
        (run.scaler.scale(loss) if run.scaler is not None else loss).backward()
        total += loss.item()
    return total


def _synchronised_seconds(device: torch.device, started: float) -> float:
    """Seconds since ``started``, once the device has finished the work queued so far (CUDA
    runs asynchronously: an unsynchronised timer measures the queueing)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The batch on ``device``; to a GPU through pinned host memory, so the copy is asynchronous
    (``non_blocking`` from pageable memory is a synchronous copy)."""
    if device.type != "cuda":
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    return {k: v.pin_memory().to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()}


def _device_of(model: Any) -> torch.device:
    return next(model.parameters()).device


def _data_parallel(model: Any) -> tuple[Any, int, int]:
    """``(runner, rank, world_size)``: when torch.distributed is initialised (a trial that spans
    several workers) the runner is ``model`` in DistributedDataParallel, which averages the
    gradients of the ranks; otherwise the model itself, rank 0 of 1."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return model, 0, 1
    device = next(model.parameters()).device
    # Every rank loaded the same frozen base from the same checkpoint: DDP need not broadcast it
    # (its constructor sends every parameter and buffer of rank 0: 16 GB for an 8B base, each trial).
    frozen = [name for name, weight in model.named_parameters() if not weight.requires_grad]
    frozen += [name for name, _ in model.named_buffers()]
    torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, frozen)
    runner = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None,
                                                       broadcast_buffers=False)
    return runner, dist.get_rank(), dist.get_world_size()


def _shard(batch: dict[str, Any], rank: int, world: int) -> dict[str, Any]:
    """This rank's contiguous part of a batch every rank drew alike (same seed), so that the
    ranks together see exactly the batch one worker would; sizes differ by at most one."""
    if world == 1:
        return batch
    size = batch["labels"].shape[0]
    if size < world:
        raise ValueError(f"batch_size={size} is smaller than the {world} workers of the trial; sample batch "
                         "sizes of at least workers_per_trial")
    start, stop = rank * size // world, (rank + 1) * size // world
    return {key: value[start:stop] for key, value in batch.items()}


def _grad_norm(trainable: list, max_norm: float) -> torch.Tensor:
    """The step's gradient norm (all trainable weights as one vector, before clipping), the
    gradients clipped to ``max_norm`` when that is above 0. A tensor left on the device: read at
    the next evaluation, so no step waits for it."""
    if max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(trainable, max_norm)
    return torch.nn.utils.get_total_norm([w.grad for w in trainable if w.grad is not None])


def _step_stats(losses: list[float], norms: list[torch.Tensor], world: int) -> dict[str, float]:
    """What the steps since the last evaluation did, each step recorded: ``train_loss`` (their
    mean batch loss), ``train_loss_max`` (the largest: a spike shows here, not in the mean),
    ``grad_norm`` (the median step's gradient norm before clipping) and ``grad_norm_max``. Steps
    whose gradients overflowed (fp16 loss scaling skips them) are left out of the norms."""
    batch = _batch_losses(losses, world)
    values = {"train_loss": sum(batch) / len(batch), "train_loss_max": max(batch)}
    finite = [norm for norm in torch.stack(norms).float().cpu().tolist() if math.isfinite(norm)]
    if finite:
        values.update(grad_norm=statistics.median(finite), grad_norm_max=max(finite))
    return values


def _batch_losses(losses: list[float], world: int) -> list[float]:
    """Each step's loss over its whole batch: a rank's loss is ``world`` times its shard's share of
    the batch loss (DDP averages the ranks' gradients: :func:`_loss_normaliser`), so the batch's
    is the ranks' sum divided by ``world`` (one collective per evaluation, none per step)."""
    if world == 1:
        return list(losses)
    import torch.distributed as dist

    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    total = torch.tensor(losses, dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return [value / world for value in total.tolist()]


def _retain(job: TrainJob, model: Any, tokenizer: Any, run: _Run) -> Callable[[], dict[str, float]] | None:
    """With ``job.retain_data`` (sft): what scores the retain set now (``retain_loss``,
    ``retain_score``; :mod:`hpo.train.answers`), with the base model's scores beside them
    (``retain_loss_before``, ``retain_score_before``). Called before the first step, when the
    fresh adapter changes nothing, so the base's scores are measured then: once per worker for a
    base, device and precision (greedy decoding repeats them exactly), like the cached data."""
    if not job.retain_data:
        return None
    key = (job.model, job.retain_data, job.max_length, job.generation_examples, job.max_new_tokens, job.chat_template,
           str(run.device), run.precision, job.quantization, job.attn_implementation)
    if key not in _RETAIN:
        dataset = sft.eval_set(job, tokenizer, sft.read(job.retain_data), source=job.retain_data)
        dataset = sft.with_score(dataset, answers.contains)
        _RETAIN[key] = dataset, answers.retain_metrics(evaluate(job, model, tokenizer, dataset), "_before")
    dataset, before = _RETAIN[key]
    return lambda: {**answers.retain_metrics(evaluate(job, model, tokenizer, dataset)), **before}


def _forward(model: Any, batch: dict[str, Any]) -> Any:
    """The one place the model runs on a training batch (tests inject faults here)."""
    return model(**batch)


def evaluate(job: TrainJob, model: Any, tokenizer: Any, eval_set: Any) -> dict[str, float]:
    """Mean loss over the validation set; accuracy (classification) or perplexity (causal LM).
    Batches of ``eval_batch_size``, halved on an out-of-memory error."""
    metrics, _ = _halving_on_oom(lambda size: _evaluate(job, model, tokenizer, eval_set, size), job.eval_batch_size)
    return metrics


def _halving_on_oom(attempt: Callable[[int], T], size: int, can_halve: bool = True,
                    before_retry: Callable[[], None] | None = None) -> tuple[T, int]:
    """``attempt(size)``; on an out-of-memory error, memory released (after ``before_retry``),
    again with half the size, down to 1. Returns the result and the size that worked. Any
    other error, or an out-of-memory error at size 1 or when ``can_halve`` is false, propagates.

    The retry runs outside the ``except`` block, with the failed attempt's frames cleared:
    inside it, the traceback still holds the failed step's activations, so the cache release
    would free too little for the smaller retry to fit."""
    while True:
        try:
            return attempt(size), size
        except Exception as error:
            if not is_out_of_memory(error) or size == 1 or not can_halve:
                raise
            traceback.clear_frames(error.__traceback__)
        # the error, its traceback and the failed step's tensors are gone here
        if before_retry is not None:
            before_retry()
        accelerator.release_memory()
        size = max(1, size // 2)


@torch.no_grad()
def _evaluate(job: TrainJob, model: Any, tokenizer: Any, eval_set: Any, size: int) -> dict[str, float]:
    if job.task == "sft":
        return sft.evaluate(job, model, tokenizer, eval_set, size)
    model.eval()
    device = _device_of(model)
    precision = accelerator.resolve_precision(job.precision, device)
    total_loss, total_count, correct = 0.0, 0, 0
    for start in range(0, len(eval_set), size):
        batch = _to_device(_model_inputs(eval_set, range(start, min(start + size, len(eval_set))), tokenizer,
                                         job.task), device)
        with accelerator.autocast(device, precision):
            out = model(**batch)
        count = batch["labels"].shape[0]
        total_loss += out.loss.item() * count
        total_count += count
        if job.task == "classification":
            correct += (out.logits.argmax(-1) == batch["labels"]).sum().item()
    eval_loss = total_loss / total_count
    if job.task == "classification":
        return {"eval_loss": eval_loss, "eval_accuracy": correct / total_count}
    return {"eval_loss": eval_loss, "eval_perplexity": math.exp(min(eval_loss, 50.0))}


def _batches(train_set: Any, batch_size: int, seed: int, tokenizer: Any, task: str,
             augment: Callable[[str], str] | None = None, max_length: int = 0, lengths: list[int] | None = None):
    """Endless seeded shuffled batches: each epoch a new permutation of the training set.
    With ``lengths`` (``group_by_length``), batches of similar lengths: see :func:`grouped_by_length`."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(train_set), generator=generator).tolist()
        if lengths is not None:
            order = grouped_by_length(order, lengths, batch_size, generator)
        for start in range(0, len(order) - batch_size + 1 if len(order) >= batch_size else 1, batch_size):
            yield _collate(train_set, order[start : start + batch_size], tokenizer, task, augment, max_length)


def grouped_by_length(order: list[int], lengths: list[int], batch_size: int, generator: torch.Generator,
                      mega: int = 50) -> list[int]:
    """An epoch's shuffled ``order`` rearranged so that each batch holds examples of similar
    length, as transformers' ``LengthGroupedSampler`` does: chunks of ``mega`` batches, each
    sorted by length (longest first), cut into batches whose order is then shuffled (the
    longest batch first, so an out-of-memory error shows at the first step)."""
    chunk = mega * batch_size
    batches: list[list[int]] = []
    for start in range(0, len(order), chunk):
        part = sorted(order[start : start + chunk], key=lambda i: -lengths[i])
        batches += [part[i : i + batch_size] for i in range(0, len(part), batch_size)]
    full = [b for b in batches if len(b) == batch_size] or batches
    longest = max(range(len(full)), key=lambda i: lengths[full[i][0]])
    full[0], full[longest] = full[longest], full[0]
    rest = [full[0]] + [full[1:][i] for i in torch.randperm(len(full) - 1, generator=generator).tolist()]
    return [i for batch in rest for i in batch]


def _collate(dataset: Any, indices: Any, tokenizer: Any, task: str,
             augment: Callable[[str], str] | None = None, max_length: int = 0) -> dict[str, Any]:
    """A training batch of ``indices``, with each row's real token count under :data:`ROW_TOKENS`."""
    indices = list(indices)
    batch = _model_inputs(dataset, indices, tokenizer, task, augment, max_length)
    if task == "sft":
        lengths = [len(dataset.examples[i].input_ids) for i in indices]
        batch[ROW_TOKENS] = torch.tensor(lengths)
    elif "attention_mask" in batch:
        batch[ROW_TOKENS] = batch["attention_mask"].sum(-1)
    else:
        batch[ROW_TOKENS] = torch.full((batch["input_ids"].shape[0],), batch["input_ids"].shape[1])
    return batch


def _model_inputs(dataset: Any, indices: Any, tokenizer: Any, task: str,
                  augment: Callable[[str], str] | None = None, max_length: int = 0) -> dict[str, Any]:
    indices = list(indices)
    if task == "sft":
        return sft.collate(dataset, indices)
    if task == "causal_lm":
        blocks = dataset[indices]
        return {"input_ids": blocks, "labels": blocks}
    features, labels = dataset[0], dataset[1]
    if augment is not None:  # tokenized per batch: each epoch sees other perturbations
        texts = [augment(dataset[2][i]) for i in indices]
        batch = tokenizer(texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        batch["labels"] = torch.tensor([labels[i] for i in indices])
        return dict(batch)
    batch = tokenizer.pad([features[i] for i in indices], return_tensors="pt")
    batch["labels"] = torch.tensor([labels[i] for i in indices])
    return dict(batch)


class _Classification(tuple):
    """(token features, labels) with a length, so both tasks' datasets have ``len``."""

    def __len__(self) -> int:
        return len(self[1])


def _datasets(job: TrainJob, tokenizer: Any) -> tuple[Any, Any, int]:
    if job.task == "sft":
        sft_key = ("sft", job.model, job.train_data, job.eval_data, job.max_length, job.eval_fraction,
                   job.train_limit, job.packing, job.chat_template, job.generation_examples)
        if sft_key not in _DATASETS:
            _DATASETS[sft_key] = (*sft.datasets(job, tokenizer), 0)
        return _DATASETS[sft_key]
    key = (job.model, job.task, job.train_data, job.eval_data, job.text_column, job.label_column,
           job.max_length, job.eval_fraction, job.train_limit)
    if key not in _DATASETS:
        train = data.read(job.train_data, job.task, job.text_column, job.label_column)
        if job.eval_data:
            evaluation = data.read(job.eval_data, job.task, job.text_column, job.label_column)
        else:
            train, evaluation = data.hold_out(train, job.eval_fraction)
        if job.train_limit:
            train = data.sample(train, job.train_limit)
        if job.task == "causal_lm":
            _DATASETS[key] = (_blocks(train, tokenizer, job.max_length), _blocks(evaluation, tokenizer, job.max_length), 0)
        else:
            num_labels = max(max(train.labels), max(evaluation.labels)) + 1  # type: ignore[arg-type]
            _DATASETS[key] = (
                _Classification((_tokenize(train.texts, tokenizer, job.max_length), train.labels, train.texts)),
                _Classification((_tokenize(evaluation.texts, tokenizer, job.max_length), evaluation.labels)),
                max(2, num_labels),
            )
    return _DATASETS[key]


def evaluate_source(job: TrainJob, model: Any, tokenizer: Any, source: str) -> dict[str, float]:
    """Evaluate ``model`` on another data source (a test set), the way validation is done."""
    if job.task == "sft":
        return evaluate(job, model, tokenizer, sft.eval_set(job, tokenizer, sft.read(source), source=source))
    examples = data.read(source, job.task, job.text_column, job.label_column)
    if job.task == "causal_lm":
        dataset = _blocks(examples, tokenizer, job.max_length)
    else:
        dataset = _Classification((_tokenize(examples.texts, tokenizer, job.max_length), examples.labels))
    return evaluate(job, model, tokenizer, dataset)


def _tokenize(texts: list[str], tokenizer: Any, max_length: int) -> list[dict]:
    encoded = tokenizer(texts, truncation=True, max_length=max_length)
    return [{k: encoded[k][i] for k in encoded.keys()} for i in range(len(texts))]


def _blocks(examples: data.Examples, tokenizer: Any, block_size: int) -> Any:
    ids: list[int] = []
    for text in examples.texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
    n_blocks = len(ids) // block_size
    if n_blocks == 0:
        from hpo.errors import HpoError

        raise HpoError(f"{examples.source}: only {len(ids)} tokens, fewer than one block of max_length={block_size}")
    return torch.tensor(ids[: n_blocks * block_size]).view(n_blocks, block_size)


def _augmenter(job: TrainJob) -> Callable[[str], str]:
    from hpo.train.augment import Augmenter, load_synonyms

    p = job.params
    return Augmenter(word_dropout=p.augment_word_dropout, word_swap=p.augment_word_swap, synonym=p.augment_synonym,
                     synonyms=load_synonyms(job.synonyms), seed=job.seed)


def _tokenizer(model_name: str) -> Any:
    if model_name not in _TOKENIZERS:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(models.resolve(model_name))
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        _TOKENIZERS[model_name] = tokenizer
    return _TOKENIZERS[model_name]


def _base_model(job: TrainJob, num_labels: int, tokenizer: Any, device: torch.device | None = None,
                precision: str = "fp32") -> Any:
    """The frozen base, loaded once per worker onto ``device``: stored in the training
    precision's dtype (bf16/fp16, else fp32), or quantized by bitsandbytes (4bit: QLoRA's
    nf4 with double quantization, computing in bf16 where the card has it natively, else
    fp16; 8bit) and prepared by peft for k-bit training.

    One base per device: loading another (a space that samples ``model``, another precision)
    first drops the others cached for that device and frees their memory, so a warm worker
    holds one base on its GPU, not one per model it has seen."""
    device = device or torch.device("cpu")
    key = (job.model, job.task, num_labels, str(device), precision, job.quantization, job.attn_implementation)
    if key not in _BASE_MODELS:
        _evict_bases(str(device))
        _BASE_MODELS[key] = load_base(job, num_labels, tokenizer, device, precision, job.quantization)
    return _BASE_MODELS[key]


def merged(job: TrainJob, model: Any, tokenizer: Any, reload: bool | None = None) -> Any:
    """The trained adapter merged into its base, for saving as a plain transformers model.

    A quantized base (``reload``, default: ``job.quantization != "none"``) is not merged into:
    its 4-bit/8-bit weights would be dequantized, summed with the update, and re-quantized,
    losing most of what the adapter learned. The base is loaded again unquantized on the CPU,
    in bf16 where the training GPU has it natively (else fp32), the adapter's (and task head's)
    weights are copied onto a fresh adapter there, and that is merged."""
    if not (job.quantization != "none" if reload is None else reload):
        return model.merge_and_unload()
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    trained_on = accelerator.facts(_device_of(model))
    precision = "bf16" if trained_on.native_bf16 else "fp32"
    num_labels = getattr(model.config, "num_labels", 0) if job.task == "classification" else 0
    base = load_base(job, num_labels, tokenizer, torch.device("cpu"), precision, "none")
    fresh = get_peft_model(base, model.peft_config["default"])
    set_peft_model_state_dict(fresh, {k: v.to("cpu") for k, v in get_peft_model_state_dict(model).items()})
    return fresh.merge_and_unload()


def _evict_bases(device: str) -> None:
    """Drop the cached bases on ``device`` and give their memory back."""
    stale = [key for key in _BASE_MODELS if key[3] == device]
    for key in stale:
        del _BASE_MODELS[key]
    if stale:
        accelerator.release_memory()


def load_base(job: TrainJob, num_labels: int, tokenizer: Any, device: torch.device, precision: str,
              quantization: str) -> Any:
    """A fresh base model for ``job`` on ``device`` (see :func:`_base_model`; promote's merge
    reloads an unquantized one with ``quantization="none"``). Loaded straight onto the device
    (``device_map``), not through host memory and a copy."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    path = models.resolve(job.model)
    options: dict[str, Any] = {"dtype": accelerator.DTYPES[precision], "attn_implementation": job.attn_implementation}
    if device.type == "cuda":  # quantized or not, loaded straight onto the GPU
        options["device_map"] = {"": device.index if device.index is not None else torch.cuda.current_device()}
    if quantization != "none":
        options["dtype"] = accelerator.quantization_compute_dtype(precision, accelerator.facts(device))
        options["quantization_config"] = _quantization_config(quantization, options["dtype"], job.task)
    if job.task == "classification":
        model = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, **options)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(path, **options)
    if quantization != "none":
        from peft import prepare_model_for_kbit_training

        # freezes the base, casts its norms and the rest to fp32; checkpointing is set per run
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    else:
        model.to(device)  # a no-op where device_map placed it
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


def _quantization_config(quantization: str, compute_dtype: torch.dtype, task: str) -> Any:
    from transformers import BitsAndBytesConfig

    # a classification head is new and trained: it stays a plain Linear
    skip = ["classifier", "score"] if task == "classification" else None
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype, llm_int8_skip_modules=skip)


def _reset_head(model: Any, task: str) -> None:
    """Fresh, seeded weights for the task head (it is not in a pretrained checkpoint)."""
    if task != "classification":
        return
    for name in ("classifier", "score"):
        head = getattr(model, name, None)
        if head is None:
            continue
        for module in head.modules():
            if isinstance(module, torch.nn.Linear):
                torch.nn.init.normal_(module.weight, std=model.config.initializer_range if hasattr(model.config, "initializer_range") else 0.02)
                if module.bias is not None:
                    torch.nn.init.zeros_(module.bias)


def _lora_config(job: TrainJob, model_type: str) -> Any:
    from peft import LoraConfig, TaskType

    p = job.params
    return LoraConfig(
        fan_in_fan_out=model_type == "gpt2",  # GPT-2 stores its projections transposed (Conv1D)
        task_type=TaskType.SEQ_CLS if job.task == "classification" else TaskType.CAUSAL_LM,
        r=p.lora_r,
        lora_alpha=p.lora_alpha,  # type: ignore[arg-type]  # peft annotates int; it only divides it by r
        lora_dropout=p.lora_dropout,
        target_modules=list(p.target_modules) if p.target_modules else None,
    )
