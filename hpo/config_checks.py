"""The checks of a :class:`hpo.config.Sweep`, run when one is built: each names the field, what is
wrong with its value and how to fix it (in the module or with ``--set``), so that the
:class:`hpo.errors.HpoError` it raises can be shown to the user as it is.

Only what is known without a worker is checked here; what depends on the worker's hardware and
packages (CUDA, bitsandbytes, a lean loss's kernels) is checked on a worker
(:func:`hpo.train.accelerator.problems`). A new sweep field gets its check here.
"""

from __future__ import annotations

import math
import typing
from typing import Any

from hpo.config import (
    DIRECTIONS,
    KNOWN_DIRECTIONS,
    LEAN_LOSSES,
    MAX_SEED,
    OBJECTIVES,
    PRECISIONS,
    PRUNERS,
    QUANTIZATIONS,
    SAMPLERS,
    TASKS,
    Sweep,
    split_commas,
)


def problems(sweep: Sweep) -> typing.Iterator[str]:
    if sweep.task not in TASKS:
        yield _bad("task", sweep.task, f"must be one of {', '.join(TASKS)}")
    if sweep.is_multi_objective:
        yield from _objectives_problems(sweep)
    elif sweep.direction not in DIRECTIONS:
        yield _bad(
            "direction", sweep.direction,
            f"must be maximize or minimize (needed for the metric {sweep.metric!r})",
        )
    if not sweep.model:
        yield _bad("model", sweep.model, "must name a Hugging Face model id or a local folder")
    if sweep.objective not in OBJECTIVES:
        yield _bad("objective", sweep.objective, f"must be one of {', '.join(OBJECTIVES)}")
    yield from _prune_problems(sweep)
    if sweep.pruner not in PRUNERS:
        yield _bad("pruner", sweep.pruner, f"must be one of {', '.join(PRUNERS)}")
    if sweep.sampler not in SAMPLERS:
        yield _bad("sampler", sweep.sampler, f"must be one of {', '.join(SAMPLERS)}")
    for name in ("trials", "max_steps", "eval_every", "max_length", "eval_batch_size"):
        value = getattr(sweep, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            yield _bad(name, value, "must be a whole number of at least 1")
    if isinstance(sweep.eval_every, int) and isinstance(sweep.max_steps, int):
        if sweep.eval_every > sweep.max_steps:
            yield _bad("eval_every", sweep.eval_every, f"must not exceed max_steps={sweep.max_steps}")
    if not isinstance(sweep.generation_examples, int) or sweep.generation_examples < 0:
        yield _bad("generation_examples", sweep.generation_examples, "must be a whole number of at least 0")
    if {"eval_exact_match", "eval_score"} & set(sweep.metrics) and sweep.generation_examples == 0:
        yield _bad("generation_examples", 0, f"leaves nothing to compute metric={sweep.metric} from; set it above 0")
    if not isinstance(sweep.max_new_tokens, int) or isinstance(sweep.max_new_tokens, bool) or sweep.max_new_tokens < 1:
        yield _bad("max_new_tokens", sweep.max_new_tokens, "must be a whole number of at least 1")
    yield from _answer_problems(sweep)
    for name in ("train_limit", "patience"):
        value = getattr(sweep, name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            yield _bad(name, value, "must be a whole number of at least 0, or none")
    if sweep.concurrency is not None and (not isinstance(sweep.concurrency, int) or sweep.concurrency < 1):
        yield _bad("concurrency", sweep.concurrency, "must be a whole number of at least 1, or none")
    if sweep.timeout is not None and not (_finite_number(sweep.timeout) and sweep.timeout > 0):
        yield _bad("timeout", sweep.timeout, "must be a positive number of seconds, or none")
    if not (_finite_number(sweep.eval_fraction) and 0 < sweep.eval_fraction < 1):
        yield _bad("eval_fraction", sweep.eval_fraction, "must lie between 0 and 1")
    most = sweep.max_steps if isinstance(sweep.max_steps, int) else sweep.grace_period
    if sweep.grace_period is not None and (not isinstance(sweep.grace_period, int) or isinstance(sweep.grace_period, bool)
                                          or not 1 <= sweep.grace_period <= most):
        yield _bad("grace_period", sweep.grace_period, f"must be a whole number of steps from 1 to max_steps="
                   f"{sweep.max_steps}, or none (the evaluation nearest 20% of max_steps)")
    if not (_finite_number(sweep.reduction_factor) and sweep.reduction_factor > 1):
        yield _bad("reduction_factor", sweep.reduction_factor, "must be a number above 1")
    if not (_finite_number(sweep.cpus_per_trial) and sweep.cpus_per_trial > 0):
        yield _bad("cpus_per_trial", sweep.cpus_per_trial, "must be a positive number")
    if not (_finite_number(sweep.gpus_per_trial) and sweep.gpus_per_trial >= 0):
        yield _bad("gpus_per_trial", sweep.gpus_per_trial, "must be 0 or a positive number")
    elif sweep.gpus_per_trial > 1 and sweep.gpus_per_trial != int(sweep.gpus_per_trial):
        yield _bad("gpus_per_trial", sweep.gpus_per_trial, "above 1 must be a whole number")
    if not isinstance(sweep.seed, int) or isinstance(sweep.seed, bool) or not 0 <= sweep.seed <= MAX_SEED:
        # numpy (and so transformers' set_seed) takes seeds 0..2**32-1 only
        yield _bad("seed", sweep.seed, f"must be a whole number from 0 to {MAX_SEED}")
    if not isinstance(sweep.lr_probe, bool):
        yield _bad("lr_probe", sweep.lr_probe, "must be true or false")
    yield from _accelerator_problems(sweep)
    yield from _worker_problems(sweep)

def _answer_problems(sweep: Sweep) -> typing.Iterator[str]:
    """answer_format and retain_data: sft only, a valid regular expression, something generated."""
    import re

    for name in ("answer_format", "retain_data"):
        value = getattr(sweep, name)
        if value is None:
            continue
        if not isinstance(value, str) or not value:
            yield _bad(name, value, "must be a non-empty string, or none")
        elif sweep.task != "sft":
            yield _bad(name, value, f"applies to task=sft only, not task={sweep.task}; remove it")
        elif sweep.generation_examples == 0:
            yield _bad(name, value, "needs generated answers to judge; set generation_examples above 0")
    if isinstance(sweep.answer_format, str) and sweep.answer_format:
        try:
            re.compile(sweep.answer_format)
        except re.error as error:
            yield _bad("answer_format", sweep.answer_format, f"is not a valid regular expression ({error}); "
                       "write one Python's re module reads, e.g. \\d{4}-\\d{2}-\\d{2}")

def _objectives_problems(sweep: Sweep) -> typing.Iterator[str]:
    """A multi-objective sweep: names, one direction per name, what needs a single objective."""
    names = sweep.metrics
    if not all(names) or len(set(names)) != len(names):
        yield _bad("metric", sweep.metric, "must list distinct metric names separated by commas, "
                   "e.g. eval_accuracy,peak_memory_mb")
        return
    if sweep.direction is None:
        unknown = [name for name in names if name not in KNOWN_DIRECTIONS]
        yield _bad("direction", None, f"must give one direction per metric, comma-separated (e.g. "
                   f"{','.join(KNOWN_DIRECTIONS.get(n, 'maximize') for n in names)}): the better direction of "
                   f"{', '.join(unknown)} is not known")
        return
    words = split_commas(str(sweep.direction))
    if len(words) != len(names):
        yield _bad("direction", sweep.direction, f"gives {len(words)} direction(s) for the {len(names)} metrics "
                   f"{sweep.metric}; give one per metric, comma-separated, in the same order")
    elif any(word not in DIRECTIONS for word in words):
        bad = next(word for word in words if word not in DIRECTIONS)
        yield _bad("direction", sweep.direction, f"has {bad!r}; each direction must be maximize or minimize")
    if sweep.objective == "best":
        yield _bad("objective", "best", "needs a single metric: a trial's best evaluation is not defined for "
                   f"several objectives ({sweep.metric}); use --set objective=last")
    if sweep.sampler == "cmaes":
        yield _bad("sampler", "cmaes", f"optimizes a single objective, not {sweep.metric}; use tpe, random, gp "
                   "or qmc")

def _prune_problems(sweep: Sweep) -> typing.Iterator[str]:
    if sweep.prune_metric is not None and (not isinstance(sweep.prune_metric, str) or not sweep.prune_metric):
        yield _bad("prune_metric", sweep.prune_metric, "must name a metric that report records (e.g. eval_loss), "
                   "or none for the sweep's metric")
    elif sweep.prune_direction not in (None, "maximize", "minimize"):
        yield _bad("prune_direction", sweep.prune_direction, "must be maximize or minimize, or none")
    elif sweep.prune_metric not in (None, *sweep.metrics) and sweep.prune_direction is None \
            and sweep.prune_metric not in KNOWN_DIRECTIONS:
        yield _bad("prune_direction", None, f"must be maximize or minimize (needed for the prune_metric "
                   f"{sweep.prune_metric!r}, whose better direction is not known)")

def _accelerator_problems(sweep: Sweep) -> typing.Iterator[str]:
    """The device/precision/memory fields; what depends on the worker's hardware is
    checked later, on a worker (``hpo.train.accelerator.problems``)."""
    import re

    if not isinstance(sweep.device, str) or not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", sweep.device):
        yield _bad("device", sweep.device, "must be auto, cpu, cuda, cuda:N or mps")
    elif sweep.device.startswith("cuda") and sweep.gpus_per_trial == 0 and not sweep.gpus_per_worker:
        yield _bad("device", sweep.device, "needs a GPU reserved for each trial: --set gpus_per_trial=1 "
                   "(or 0.5 to share one), or --set device=auto")
    elif sweep.device.startswith("cuda:") and _placement_known(sweep) \
            and int(sweep.device[5:]) >= (visible := max(1, math.ceil(sweep.worker_resources["GPU"]))):
        yield _bad("device", sweep.device, f"is not a GPU a trial sees: Ray gives each trial worker {visible} "
                   f"GPU(s), numbered from cuda:0 whatever their index on the machine; use --set device=cuda "
                   "(or auto), and choose the machine's GPUs with CUDA_VISIBLE_DEVICES before `ray start`")
    elif sweep.device in ("cpu", "mps") and sweep.quantization not in ("none", None):
        yield _bad("quantization", sweep.quantization, f"needs a CUDA GPU (bitsandbytes), not device={sweep.device}; "
                   "use --set quantization=none")
    if sweep.precision not in PRECISIONS:
        yield _bad("precision", sweep.precision, f"must be one of {', '.join(PRECISIONS)}")
    if sweep.quantization not in QUANTIZATIONS:
        yield _bad("quantization", sweep.quantization, f"must be one of {', '.join(QUANTIZATIONS)}")
    for name in ("gradient_checkpointing", "packing", "group_by_length", "fused_optimizer"):
        if not isinstance(getattr(sweep, name), bool):
            yield _bad(name, getattr(sweep, name), "must be true or false")
    yield from _lean_loss_problems(sweep)
    if not isinstance(sweep.attn_implementation, str) or not sweep.attn_implementation:
        yield _bad("attn_implementation", sweep.attn_implementation, "must name an attention kernel (sdpa, eager, "
                   "flash_attention_2, ...)")

def _lean_loss_problems(sweep: Sweep) -> typing.Iterator[str]:
    """What is known of ``lean_loss`` before a worker looks (whether its package imports and the
    trial's device is a CUDA GPU: ``hpo.train.accelerator.problems``)."""
    if sweep.lean_loss not in LEAN_LOSSES:
        yield _bad("lean_loss", sweep.lean_loss, f"must be one of {', '.join(LEAN_LOSSES)}")
    elif sweep.lean_loss != "off" and sweep.task == "classification":
        yield _bad("lean_loss", sweep.lean_loss, "applies to a language model's output layer (task causal_lm or "
                   "sft), not to task classification; use --set lean_loss=off")
    elif sweep.lean_loss in ("liger", "cce") and sweep.device in ("cpu", "mps"):
        yield _bad("lean_loss", sweep.lean_loss, f"runs Triton kernels on a CUDA GPU, not device={sweep.device}; "
                   "use --set lean_loss=chunked (plain torch, any device)")

def _placement_known(sweep: Sweep) -> bool:
    """Whether the resource fields are valid enough for :attr:`worker_resources`."""
    workers = sweep.workers_per_trial
    return (isinstance(workers, int) and not isinstance(workers, bool) and workers >= 1
            and _finite_number(sweep.gpus_per_trial) and _finite_number(sweep.cpus_per_trial)
            and all(v is None or _finite_number(v) for v in (sweep.gpus_per_worker, sweep.cpus_per_worker)))


def _worker_problems(sweep: Sweep) -> typing.Iterator[str]:
    """workers_per_trial and the per-worker resources, and how they fit the per-trial ones.

    A per-worker amount, when given, defines the trial's total (workers x amount); the
    per-trial field must then be left at its default or agree with that total.
    """
    workers = sweep.workers_per_trial
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        yield _bad("workers_per_trial", workers, "must be a whole number of at least 1")
        return
    defaults = {"cpus_per_trial": 1.0, "gpus_per_trial": 0.0}
    for kind in ("cpus", "gpus"):
        per_worker, per_trial = getattr(sweep, f"{kind}_per_worker"), getattr(sweep, f"{kind}_per_trial")
        if per_worker is None:
            continue
        if not (_finite_number(per_worker) and (per_worker > 0 if kind == "cpus" else per_worker >= 0)):
            yield _bad(f"{kind}_per_worker", per_worker, "must be a positive number, or none" if kind == "cpus"
                       else "must be 0 or a positive number, or none")
        elif kind == "gpus" and per_worker > 1 and per_worker != int(per_worker):
            yield _bad("gpus_per_worker", per_worker, "above 1 must be a whole number")
        elif _finite_number(per_trial) and per_trial != defaults[f"{kind}_per_trial"] \
                and not math.isclose(per_trial, per_worker * workers):
            yield _bad(f"{kind}_per_trial", per_trial,
                       f"disagrees with {kind}_per_worker={per_worker} x workers_per_trial={workers}; "
                       f"set only one of {kind}_per_trial (the trial's total) and {kind}_per_worker")
    if workers > 1 and sweep.gpus_per_worker is None and _finite_number(sweep.gpus_per_trial):
        share = sweep.gpus_per_trial / workers
        if share > 1 and share != int(share):
            yield _bad("gpus_per_trial", sweep.gpus_per_trial,
                       f"split over workers_per_trial={workers} gives {share:g} GPUs per worker; "
                       "above 1 that must be a whole number (or set gpus_per_worker)")
    per_worker = sweep.gpus_per_worker if sweep.gpus_per_worker is not None else (
        sweep.gpus_per_trial / workers if _finite_number(sweep.gpus_per_trial) else 0)
    if workers > 1 and _finite_number(per_worker) and 0 < per_worker < 1:
        field = sweep.gpu_field
        yield _bad(field, getattr(sweep, field),
                   f"gives each of the workers_per_trial={workers} workers {per_worker:g} GPU: the ranks of one "
                   "trial would share a GPU, which NCCL refuses ('Duplicate GPU detected'); give every worker a "
                   f"whole GPU (--set gpus_per_trial={workers}) or train on one worker (--set workers_per_trial=1)")


def _finite_number(value: Any) -> bool:
    """A finite int or float (not a bool): what a numeric field may hold."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _bad(name: str, value: Any, what: str) -> str:
    return f"sweep field {name}={value!r} {what} (fix it in the module or with --set {name}=...)"
