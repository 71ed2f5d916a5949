"""What a worker keeps between trials, and the fresh adapter each run gets on it.

Load once per worker: the frozen base model, the tokenizer and the tokenized data are cached in
this process, keyed by everything they are built from (the keys below, beside each cache); the
base also by device, precision, quantization and attention kernel, so it stays on its device across
trials, one base per device. Each run (:func:`adapter`) seeds torch, re-initialises the task head,
wraps the base in a new LoRA adapter and removes it on the way out, whatever happened, with the
input-embedding hooks peft added. So a run on a warm worker gives exactly the results of a fresh
load with the same seed: a setting that changes what a cache holds must be in its key.

Device and precision (:mod:`hpo.train.accelerator`): with bf16/fp16 the frozen base is stored in
that dtype and the trainable weights (adapter, head) in fp32; a quantized base is loaded by
bitsandbytes and prepared by peft for k-bit training.
"""

from __future__ import annotations

import contextlib
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from hpo.train import accelerator, answers, lean_loss, models, sft
from hpo.train.batches import build_datasets
from hpo.train.evaluation import evaluate
from hpo.train.recipe import TrainJob

# peft asks transformers a deprecated question on every wrap; it is not ours to answer.
warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)

_BASE_MODELS: dict[tuple, Any] = {}
"""Frozen bases by (model, task, num_labels, device, precision, quantization, attn_implementation)."""
_TOKENIZERS: dict[str, Any] = {}
"""Tokenizers by model."""
_DATASETS: dict[tuple, tuple[Any, Any, int]] = {}
"""Tokenized (train, eval, num_labels) by the model and every data setting (:func:`datasets`)."""
_RETAIN: dict[tuple, tuple[sft.SftSet, dict[str, float]]] = {}
"""The retain set and the base's scores on it (:func:`retain_set`)."""


@dataclass
class Adapter:
    """One run's fresh LoRA adapter on the worker's cached base model, and its data (what
    :func:`adapter` yields)."""

    model: Any
    """The peft model: the cached base with a new adapter and a re-initialised task head."""
    tokenizer: Any
    train_set: Any
    eval_set: Any
    run: Run


@contextlib.contextmanager
def adapter(job: TrainJob, score: Callable[[str, str], float] | None = None,
            started: float | None = None) -> Iterator[Adapter]:
    """The base model (cached), tokenizer and data of ``job``, with a fresh seeded adapter in place
    for the ``with`` block; on the way out (an exception included) the adapter is removed from
    the cached base, so the next run on this worker starts clean. :func:`hpo.train.training.fine_tune`
    trains in it, and so does the learning-rate range test (:mod:`hpo.train.lr_probe`)."""
    started = time.perf_counter() if started is None else started
    from peft import get_peft_model

    device = accelerator.resolve_device(job.sweep.device)
    precision = accelerator.resolve_precision(job.sweep.precision, device)
    device_facts = accelerator.facts(device)
    accelerator.configure(device_facts, precision, job.gpu_share)
    tokenizer = load_tokenizer(job.model)
    train_set, eval_set, num_labels = datasets(job, tokenizer)
    base = base_model(job, num_labels, tokenizer, device, precision)
    if job.sweep.task == "sft":
        eval_set = sft.with_score(eval_set, score)
        base.config.use_cache = False  # a KV cache in training turns off packed sequences' own attention
    run = Run(device, precision, accelerator.grad_scaler(device, precision), accelerator.MemoryMeter(device),
              accelerator.current_memory(device))
    run.facts = device_facts
    run.started = started
    run.meter.start()

    torch.manual_seed(job.seed)
    _reset_head(base, job.sweep.task)
    hooks_before = _embedding_hooks(base)
    _set_gradient_checkpointing(base, job.sweep.gradient_checkpointing)
    model = get_peft_model(base, lora_config(job, base.config.model_type))
    restore_forward: Callable[[], None] | None = None
    fresh: Adapter | None = None
    try:
        restore_forward = lean_loss.apply(base, job.sweep.lean_loss)  # the model's own forward is back in finally
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


class Run:
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


def lora_config(job: TrainJob, model_type: str) -> Any:
    """The run's LoRA adapter, as its parameters say (peft's default target modules unless chosen)."""
    from peft import LoraConfig, TaskType

    p = job.params
    return LoraConfig(
        fan_in_fan_out=model_type == "gpt2",  # GPT-2 stores its projections transposed (Conv1D)
        task_type=TaskType.SEQ_CLS if job.sweep.task == "classification" else TaskType.CAUSAL_LM,
        r=p.lora_r,
        lora_alpha=p.lora_alpha,  # type: ignore[arg-type]  # peft annotates int; it only divides it by r
        lora_dropout=p.lora_dropout,
        target_modules=list(p.target_modules) if p.target_modules else None,
    )


def load_tokenizer(model_name: str) -> Any:
    """The model's tokenizer, loaded once per worker (padding with the end-of-text token where it has none)."""
    if model_name not in _TOKENIZERS:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(models.resolve(model_name))
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        _TOKENIZERS[model_name] = tokenizer
    return _TOKENIZERS[model_name]


def datasets(job: TrainJob, tokenizer: Any) -> tuple[Any, Any, int]:
    """The tokenized training and validation sets of ``job`` and its number of labels, built once per
    worker for a model and data (:func:`hpo.train.batches.build_datasets`)."""
    sweep = job.sweep
    if sweep.task == "sft":
        key: tuple = ("sft", job.model, sweep.train_data, sweep.eval_data, sweep.max_length, sweep.eval_fraction,
                      sweep.train_limit, sweep.packing, sweep.chat_template, sweep.generation_examples)
    else:
        key = (job.model, sweep.task, sweep.train_data, sweep.eval_data, sweep.text_column, sweep.label_column,
               sweep.max_length, sweep.eval_fraction, sweep.train_limit)
    if key not in _DATASETS:
        _DATASETS[key] = build_datasets(job, tokenizer)
    return _DATASETS[key]


def retain_set(job: TrainJob, source: str, model: Any, tokenizer: Any,
               run: Run) -> tuple[sft.SftSet, dict[str, float]]:
    """The retain set ``source`` (sft's ``retain_data``, scored by :func:`hpo.train.answers.contains`) and the
    base model's scores on it (``retain_loss_before``, ``retain_score_before``). Asked before the first step,
    when the fresh adapter changes nothing, so the base's scores are measured then: once per worker for a
    base, device and precision (greedy decoding repeats them exactly), like the cached data."""
    sweep = job.sweep
    key = (job.model, source, sweep.max_length, sweep.generation_examples, sweep.max_new_tokens,
           sweep.chat_template, str(run.device), run.precision, sweep.quantization, sweep.attn_implementation)
    if key not in _RETAIN:
        dataset = sft.eval_set(job, tokenizer, sft.read(source), source=source)
        dataset = sft.with_score(dataset, answers.contains)
        _RETAIN[key] = dataset, answers.retain_metrics(evaluate(job, model, tokenizer, dataset), "_before")
    return _RETAIN[key]


def base_model(job: TrainJob, num_labels: int, tokenizer: Any, device: torch.device | None = None,
               precision: str = "fp32") -> Any:
    """The frozen base, loaded once per worker onto ``device``: stored in the training
    precision's dtype (bf16/fp16, else fp32), or quantized by bitsandbytes (4bit: QLoRA's
    nf4 with double quantization, computing in bf16 where the card has it natively, else
    fp16; 8bit) and prepared by peft for k-bit training.

    One base per device: loading another (a space that samples ``model``, another precision)
    first drops the others cached for that device and frees their memory, so a warm worker
    holds one base on its GPU, not one per model it has seen."""
    device = device or torch.device("cpu")
    sweep = job.sweep
    key = (job.model, sweep.task, num_labels, str(device), precision, sweep.quantization, sweep.attn_implementation)
    if key not in _BASE_MODELS:
        _evict_bases(str(device))
        _BASE_MODELS[key] = load_base(job, num_labels, tokenizer, device, precision, sweep.quantization)
    return _BASE_MODELS[key]


def _evict_bases(device: str) -> None:
    """Drop the cached bases on ``device`` and give their memory back."""
    stale = [key for key in _BASE_MODELS if key[3] == device]
    for key in stale:
        del _BASE_MODELS[key]
    if stale:
        accelerator.release_memory()


def load_base(job: TrainJob, num_labels: int, tokenizer: Any, device: torch.device, precision: str,
              quantization: str) -> Any:
    """A fresh base model for ``job`` on ``device`` (see :func:`base_model`; promote's merge
    reloads an unquantized one with ``quantization="none"``). Loaded straight onto the device
    (``device_map``), not through host memory and a copy."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    path = models.resolve(job.model)
    options: dict[str, Any] = {"dtype": accelerator.DTYPES[precision],
                               "attn_implementation": job.sweep.attn_implementation}
    if device.type == "cuda":  # quantized or not, loaded straight onto the GPU
        options["device_map"] = {"": device.index if device.index is not None else torch.cuda.current_device()}
    if quantization != "none":
        options["dtype"] = accelerator.quantization_compute_dtype(precision, accelerator.facts(device))
        options["quantization_config"] = _quantization_config(quantization, options["dtype"], job.sweep.task)
    if job.sweep.task == "classification":
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


def merged(job: TrainJob, model: Any, tokenizer: Any, reload: bool | None = None) -> Any:
    """The trained adapter merged into its base, for saving as a plain transformers model.

    A quantized base (``reload``, default: ``job.sweep.quantization != "none"``) is not merged into:
    its 4-bit/8-bit weights would be dequantized, summed with the update, and re-quantized,
    losing most of what the adapter learned. The base is loaded again unquantized on the CPU,
    in bf16 where the training GPU has it natively (else fp32), the adapter's (and task head's)
    weights are copied onto a fresh adapter there, and that is merged."""
    if not (job.sweep.quantization != "none" if reload is None else reload):
        return model.merge_and_unload()
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    trained_on = accelerator.facts(next(model.parameters()).device)
    precision = "bf16" if trained_on.native_bf16 else "fp32"
    num_labels = getattr(model.config, "num_labels", 0) if job.sweep.task == "classification" else 0
    base = load_base(job, num_labels, tokenizer, torch.device("cpu"), precision, "none")
    fresh = get_peft_model(base, model.peft_config["default"])
    set_peft_model_state_dict(fresh, {k: v.to("cpu") for k, v in get_peft_model_state_dict(model).items()})
    return fresh.merge_and_unload()
