"""The built-in fine-tuning recipe's loop: a fresh LoRA adapter on the worker's base model, AdamW,
evaluation every ``eval_every`` steps, each evaluation handed to ``report(step, metrics)``.

A sampled batch size too large for the device is a setting, not a dead trial: on an
out-of-memory error the step is redone with half the micro-batch and gradients
accumulated over the pieces, so the effective batch (and the loss) stays the sampled one;
``micro_batch_size`` and ``grad_accum`` are reported. Only when one example does not fit
does the error propagate (the trial fails with reason ``oom``).

It knows nothing of Optuna, Ray or MLflow: it runs the same under Ray, in a plain
process, or in a test. ``report`` may raise to end the run early (Ray's stop does).

Its parts: the base model, tokenizer and data kept per worker and the fresh adapter of each run
(:mod:`hpo.train.worker_cache`: a warm worker trains exactly as a fresh one), the batches
(:mod:`hpo.train.batches`) and evaluation (:mod:`hpo.train.evaluation`).

Device and precision (:mod:`hpo.train.accelerator`): batches move to the device the worker
resolved; every forward pass runs under ``torch.autocast`` for bf16/fp16 (fp16 with a
``GradScaler``). Every report carries ``peak_memory_mb`` (the trial's high-water mark: GPU
memory, else the process's peak RSS) and ``resident_memory_mb`` (the worker's memory when
the trial started, after the cached base model: flat across trials when nothing leaks).
"""

from __future__ import annotations

import functools
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from hpo.train import accelerator, answers, cost, sft, worker_cache
from hpo.train.batches import ROW_TOKENS, is_padding_free, to_device, training_batches
from hpo.train.evaluation import evaluate
from hpo.train.recipe import TrainJob
from hpo.train.worker_cache import Run, adapter

Reporter = Callable[[int, dict[str, float]], None]


def fine_tune(job: TrainJob, report: Reporter, on_trained: Callable[[Any, Any], None] | None = None,
              on_start: Callable[[dict[str, Any]], None] | None = None,
              score: Callable[[str, str], float] | None = None, started: float | None = None) -> dict[str, float]:
    """Train one LoRA adapter as ``job`` says; return the final model's metrics.

    With ``job.sweep.patience``, training stops once ``job.watch`` (eval_loss unless promote says
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


def _settings(job: TrainJob, model: Any, run: Run, trainable: int) -> dict[str, Any]:
    config = model.peft_config["default"]
    sweep = job.sweep
    return {**accelerator.describe(run.device), "precision": run.precision, "quantization": sweep.quantization,
            "gradient_checkpointing": sweep.gradient_checkpointing, "attn_implementation": sweep.attn_implementation,
            "lean_loss": sweep.lean_loss,
            "target_modules": ",".join(sorted(config.target_modules or ())), "trainable_params": trainable}


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
           run: Run) -> dict[str, float]:
    p, sweep = job.params, job.sweep
    trainable = [w for w in model.parameters() if w.requires_grad]
    optimizer = make_optimizer(model, trainable, p, fused=sweep.fused_optimizer)
    warmup = int(p.warmup_ratio * sweep.max_steps)

    def schedule(step: int) -> float:  # linear warmup, then linear decay to 0
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (sweep.max_steps - step) / max(1, sweep.max_steps - warmup))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    batches = training_batches(job, train_set, tokenizer)
    retain = _retain(job, model, tokenizer, run)  # before any step: the base model's answers
    losses: list[float] = []
    norms: list[torch.Tensor] = []
    metrics: dict[str, float] = {}
    watch = _BestWatch(sweep.patience, job.restore_best, job.watch, job.watch_mode, job.min_steps)
    micro = p.batch_size
    runner, rank, world = _data_parallel(model)
    flops = cost.FlopCounter(model, sweep.gradient_checkpointing)

    def evaluate_now() -> dict[str, float]:
        return {**evaluate(job, model, tokenizer, eval_set), **(retain() if retain is not None else {})}

    padding_free = is_padding_free(job)
    started = time.perf_counter()
    model.train()
    for step in range(1, sweep.max_steps + 1):
        batch = next(batches)
        if step == 1:  # training starts: what came before was setup
            run.setup_seconds = time.perf_counter() - run.started
        flops.add_batch(batch[ROW_TOKENS])  # the whole batch: every rank drew it
        loss, micro, norm = optimizer_step(runner, batch, micro, optimizer, trainable, p.max_grad_norm, run,
                                           sweep.task, rank, world, padding_free)
        norms.append(norm)
        scheduler.step()
        losses.append(loss)
        if step % sweep.eval_every == 0 or step == sweep.max_steps:
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


def optimizer_step(runner: Any, batch: dict[str, Any], micro: int, optimizer: torch.optim.Optimizer,
                   trainable: list, max_grad_norm: float, run: Run, task: str, rank: int = 0, world: int = 1,
                   padding_free: bool = False) -> tuple[float, int, torch.Tensor]:
    """One optimizer step on ``batch`` (this rank's shard of it): forward and backward in pieces of
    ``micro`` rows (halved on an out-of-memory error: :func:`hpo.train.accelerator.halving_on_oom`), the
    gradients unscaled (fp16), clipped to ``max_grad_norm`` (0: not clipped), the step taken and the
    gradients zeroed. Returns the batch's loss, the micro-batch size that fitted and the gradient
    norm before clipping (a tensor left on the device, see :func:`_grad_norm`)."""
    normalise = _loss_normaliser(batch, task, world)
    pieces = functools.partial(_accumulate, runner, _shard(batch, rank, world), run=run, normalise=normalise,
                               padding_free=padding_free)  # pieces(micro) -> the step's loss
    loss, micro = accelerator.halving_on_oom(pieces, micro, can_halve=world == 1,  # ranks must stay in step
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


def _accumulate(model: Any, batch: dict[str, Any], micro: int, run: Run, normalise: _Normaliser | None = None,
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
        piece = to_device(piece, run.device)
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


def _retain(job: TrainJob, model: Any, tokenizer: Any, run: Run) -> Callable[[], dict[str, float]] | None:
    """With ``job.sweep.retain_data`` (sft): what scores the retain set now (``retain_loss``,
    ``retain_score``; :mod:`hpo.train.answers`), with the base model's scores beside them
    (``retain_loss_before``, ``retain_score_before``: :func:`hpo.train.worker_cache.retain_set`)."""
    source = job.sweep.retain_data
    if not source:
        return None
    dataset, before = worker_cache.retain_set(job, source, model, tokenizer, run)
    return lambda: {**answers.retain_metrics(evaluate(job, model, tokenizer, dataset)), **before}


def _forward(model: Any, batch: dict[str, Any]) -> Any:
    """The one place the model runs on a training batch (tests inject faults here)."""
    return model(**batch)
