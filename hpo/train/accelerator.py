"""Where a trial trains and in which precision: the sweep's ``device`` and ``precision``
resolved on the worker, what the worker's hardware can run, and its memory.

Runs in the worker (Ray decides which GPUs it sees through ``CUDA_VISIBLE_DEVICES``, so
trials sharing one GPU with fractional ``gpus_per_trial`` resolve to the same device, and a
trial's GPUs are always ``cuda:0`` ... ``cuda:K-1`` there) and in the driver's pre-flight
probe (:func:`problems`, run as a Ray task with one worker's resources before any trial
starts). Imports torch only.

The decisions are pure functions of a :class:`DeviceFacts` (what :func:`facts` reads from
torch: kind, index, name, compute capability, visible devices), so every GPU branch is
tested on a CPU without patching torch:

* ``device``: ``auto`` is ``cuda`` when the worker sees a CUDA device, else ``mps``, else
  ``cpu``; ``cuda``, ``cuda:N``, ``mps`` and ``cpu`` are taken as given (``cuda:N`` must be
  one of the devices the worker sees: :func:`problems_of`).
* ``precision``: ``auto`` is ``bf16`` on a GPU with native bf16 (CUDA compute capability
  8.0 and later: Ampere, Ada, Hopper, Blackwell), else ``fp32``. ``torch.cuda.is_bf16_supported()``
  is not asked: it also says yes where bf16 is emulated (T4, V100), which is slower than fp32.
  ``bf16`` asked for on such a card is refused; ``fp16`` (loss-scaled) is the fix there.
  ``bf16``/``fp16`` run the forward pass under ``torch.autocast`` with the frozen base
  weights stored in that dtype and the trainable weights in fp32; ``fp16`` adds loss scaling
  (``torch.amp.GradScaler``). Both also run on a CPU (slowly for fp16), which is how the
  test suite covers them. ``fp32`` on an Ampere-or-later GPU lets matmuls use TF32
  (``torch.set_float32_matmul_precision("high")``), as every GPU trainer does.
* QLoRA's compute dtype (:func:`quantization_compute_dtype`): ``fp16`` when the run is fp16 or
  the card has no native bf16, else ``bf16``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from dataclasses import dataclass
from typing import Any

import torch

from hpo.train import lean_loss as lean

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
QUANTIZATIONS = ("none", "4bit", "8bit")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
NATIVE_BF16_CAPABILITY = (8, 0)
"""The first CUDA compute capability with bf16 tensor cores (Ampere)."""


@dataclass(frozen=True)
class DeviceFacts:
    """What the precision and placement rules need to know of a worker's device."""

    kind: str
    """``cpu``, ``cuda`` or ``mps``."""
    index: int | None = None
    name: str = ""
    capability: tuple[int, int] | None = None
    """CUDA compute capability, e.g. (8, 0) for an A100, (7, 5) for a T4."""
    visible: int = 0
    """CUDA devices this process sees (Ray: the trial's GPUs, numbered from 0)."""

    @property
    def native_bf16(self) -> bool:
        """bf16 in hardware: a CUDA GPU of compute capability 8.0 or later, or an Apple GPU."""
        if self.kind == "cuda":
            return self.capability is not None and self.capability >= NATIVE_BF16_CAPABILITY
        return self.kind == "mps"

    @property
    def label(self) -> str:
        return f"{self.kind}:{self.index}" if self.index is not None else self.kind


def facts(device: torch.device) -> DeviceFacts:
    """Read :class:`DeviceFacts` of ``device`` from torch (the one place that asks it)."""
    if device.type != "cuda":
        return DeviceFacts(device.type)
    visible = torch.cuda.device_count()
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index >= visible:  # cuda:N beyond what this worker sees: no name to read
        return DeviceFacts("cuda", index, visible=visible)
    return DeviceFacts("cuda", index, torch.cuda.get_device_name(index),
                       torch.cuda.get_device_capability(index), visible)


def resolve_device(requested: str = "auto") -> torch.device:
    """The device a trial trains on, for the sweep's ``device`` field."""
    if requested != "auto":
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda")  # the first device Ray made visible to this worker
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def choose_precision(requested: str, device: DeviceFacts) -> str:
    """``bf16``, ``fp16`` or ``fp32``: ``auto`` is bf16 on a GPU with native bf16, else fp32;
    an explicit choice is kept (:func:`problems_of` refuses bf16 on a GPU without it)."""
    if requested != "auto":
        return requested
    return "bf16" if device.kind == "cuda" and device.native_bf16 else "fp32"


def resolve_precision(requested: str, device: torch.device) -> str:
    """:func:`choose_precision` for a torch device."""
    return choose_precision(requested, facts(device))


def quantization_compute_dtype(precision: str, device: DeviceFacts) -> torch.dtype:
    """The dtype bitsandbytes computes a 4-bit layer in: fp16 for an fp16 run or a card without
    native bf16 (T4, V100: emulated bf16 is slower than fp32), else bf16."""
    if precision == "fp16" or not device.native_bf16:
        return torch.float16
    return torch.bfloat16


def allow_tf32(device: DeviceFacts, precision: str) -> bool:
    """Whether fp32 matmuls may use TF32 tensor cores: fp32 on an Ampere-or-later GPU (10 bits of
    mantissa in the product, fp32 accumulation: what PyTorch Lightning, HF Trainer's ``tf32``
    and JAX do by default on those cards). Set once per worker by :func:`configure`."""
    return device.kind == "cuda" and precision == "fp32" and device.native_bf16


def memory_fraction(gpus_per_worker: float) -> float | None:
    """The share of its GPU a worker may allocate: ``gpus_per_worker`` when trials share a GPU
    (0.5: two trials, each capped at half the card, so one cannot take the other's memory and
    fail it), None (no cap) for a whole GPU or more."""
    if 0 < gpus_per_worker < 1:
        return float(gpus_per_worker)
    return None


def configure(device: DeviceFacts, precision: str, gpus_per_worker: float = 0.0) -> None:
    """Once per trial in the worker, before the model is placed: TF32 for fp32 on Ampere and
    later, and the process's memory cap on a shared GPU (:func:`memory_fraction`)."""
    if device.kind != "cuda":
        return
    if allow_tf32(device, precision):
        torch.set_float32_matmul_precision("high")
    fraction = memory_fraction(gpus_per_worker)
    if fraction is not None:
        torch.cuda.set_per_process_memory_fraction(fraction, device.index)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The context every forward pass (training, evaluation and generation) runs in."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[precision])


def grad_scaler(device: torch.device, precision: str) -> Any:
    """A ``torch.amp.GradScaler`` for fp16 (its small range needs loss scaling), else None."""
    if precision != "fp16":
        return None
    return torch.amp.GradScaler(device.type)


def bitsandbytes_installed() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


def resolved(device: str, precision: str) -> dict[str, str]:
    """What a trial on this worker trains with: ``{"device": "cuda:0", "precision": "bf16"}``."""
    chosen = resolve_device(device)
    return {"device": describe(chosen)["device"], "precision": resolve_precision(precision, chosen)}


def describe(device: torch.device) -> dict[str, str]:
    """What to record about a trial's device: on a GPU its name, compute capability and the
    GPUs Ray made visible (trials sharing a GPU with fractional ``gpus_per_trial`` show the
    same one)."""
    if device.type != "cuda":
        return {"device": str(device)}
    device_facts = facts(device)
    described = {"device": device_facts.label, "device_name": device_facts.name,
                 "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", "")}
    if device_facts.capability is not None:
        described["compute_capability"] = "{}.{}".format(*device_facts.capability)
    return described


def problems(device: str, precision: str, quantization: str, lean_loss: str = "off") -> list[str]:
    """What this worker cannot run of the sweep's settings, one fix-it line each.

    Called inside a Ray task holding one worker's resources, so it sees what a trial would.
    """
    if device.startswith("cuda") and not torch.cuda.is_available():
        return [f"sweep field device={device!r}: the trial's worker sees no CUDA device "
                f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')!r}); "
                "give trials a GPU with --set gpus_per_trial=1, or --set device=auto"]
    mps = getattr(torch.backends, "mps", None)
    if device == "mps" and not (mps is not None and mps.is_available()):
        return ["sweep field device='mps': this worker has no Apple MPS device; use --set device=auto"]
    return problems_of(facts(resolve_device(device)), device, precision, quantization, bitsandbytes_installed(),
                       lean_loss, lean.installed(lean_loss))


def problems_of(found: DeviceFacts, device: str, precision: str, quantization: str,
                bitsandbytes: bool, lean_loss: str = "off", lean_package: bool = True) -> list[str]:
    """:func:`problems` as a pure function of the worker's device facts (and of whether
    bitsandbytes and ``lean_loss``'s package import there)."""
    lines: list[str] = []
    if found.kind == "cuda" and found.index is not None and found.index >= found.visible:
        lines.append(f"sweep field device={device!r}: the trial's worker sees {found.visible} CUDA device(s), "
                     f"numbered from cuda:0 (Ray renumbers the GPUs it gives a trial, whatever their index on "
                     f"the machine); use --set device=cuda (or auto), and choose the machine's GPUs with "
                     f"CUDA_VISIBLE_DEVICES before `ray start`")
        return lines
    if precision == "bf16" and found.kind == "cuda" and not found.native_bf16:
        capability = "{}.{}".format(*found.capability) if found.capability else "unknown"
        lines.append(f"sweep field precision='bf16': the trial's GPU {found.label} ({found.name}, compute "
                     f"capability {capability}) has no native bfloat16 (8.0 or later needed; it would be "
                     "emulated, slower than fp32); use --set precision=fp16 (loss-scaled) or --set precision=fp32")
    if precision == "bf16" and found.kind not in ("cuda", "cpu", "mps"):
        lines.append(f"sweep field precision='bf16': the trial's device {found.label} has no bfloat16; "
                     "use --set precision=fp32")
    if quantization != "none":
        if not bitsandbytes:
            lines.append(f"sweep field quantization={quantization!r} needs the bitsandbytes package, which the "
                         "trial's worker cannot import; pip install bitsandbytes, or --set quantization=none")
        elif found.kind != "cuda":
            lines.append(f"sweep field quantization={quantization!r} needs a CUDA GPU (bitsandbytes), but the "
                         f"trial's device is {found.label}; give trials a GPU (--set gpus_per_trial=1) or "
                         "--set quantization=none")
    lean_problem = lean.problem(lean_loss, found.kind, lean_package)
    if lean_problem:
        lines.append(lean_problem)
    return lines


def release_memory() -> None:
    """Give back what a finished trial used: cyclic garbage, PyTorch's cached CUDA blocks, and
    (glibc) freed heap pages -- without ``malloc_trim`` a worker's RSS creeps up trial after
    trial although nothing is alive (transformers#13019)."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        pass


class MemoryMeter:
    """Peak memory of one trial: GPU memory allocated (and reserved) by torch on a CUDA device, else the
    process's peak resident set (Linux ``VmHWM``, reset through ``/proc/self/clear_refs``;
    elsewhere the largest RSS seen at a reading)."""

    def __init__(self, device: torch.device):
        self.device = device
        self._seen = 0

    def start(self) -> None:
        """Reset the high-water mark (at the start of a trial)."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
        except OSError:
            pass
        self._seen = current_memory(self.device)

    def peak(self) -> int:
        """Bytes at the high-water mark since :meth:`start`."""
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        self._seen = max(self._seen, current_memory(self.device), _status_bytes("VmHWM"))
        return self._seen

    def peak_reserved(self) -> int:
        """Bytes the caching allocator held at its high-water mark since :meth:`start` (on a
        GPU: what ``nvidia-smi`` and another process sharing the card see, allocated plus
        cached blocks); elsewhere the same as :meth:`peak`."""
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_reserved(self.device))
        return self.peak()


def current_memory(device: torch.device) -> int:
    """Bytes in use now: torch's CUDA allocations on a GPU, else the process's RSS."""
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    rss = _status_bytes("VmRSS")
    if rss:
        return rss
    import psutil

    return int(psutil.Process().memory_info().rss)


def _status_bytes(field: str) -> int:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
