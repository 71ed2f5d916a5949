"""Where a trial trains and in which precision: the sweep's ``device`` and ``precision``
resolved on the worker, what the worker's hardware can run, and its memory.

Runs in the worker (Ray decides which GPUs it sees through ``CUDA_VISIBLE_DEVICES``, so
trials sharing one GPU with fractional ``gpus_per_trial`` resolve to the same device) and
in the driver's pre-flight probe (:func:`problems`, run as a Ray task with the trial's
resources before any trial starts). Imports torch only; everything here is a plain
function so the CPU test suite can check the GPU branches with ``torch.cuda`` mocked.

* ``device``: ``auto`` is ``cuda`` when the worker sees a CUDA device, else ``mps``, else
  ``cpu``; ``cuda``, ``cuda:N``, ``mps`` and ``cpu`` are taken as given.
* ``precision``: ``auto`` is ``bf16`` where the device supports it (CUDA with bf16), else
  ``fp32``. ``bf16``/``fp16`` run the forward pass under ``torch.autocast`` with the frozen
  base weights stored in that dtype and the trainable weights in fp32; ``fp16`` adds loss
  scaling (``torch.amp.GradScaler``). Both also run on a CPU (slowly for fp16), which is
  how the test suite covers them.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
from typing import Any

import torch

DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
QUANTIZATIONS = ("none", "4bit", "8bit")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


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


def supports_bf16(device: torch.device) -> bool:
    """Whether ``device`` can run bf16 autocast: a CUDA GPU that has it (Ampere and later), an
    Apple GPU, or a CPU (emulated on most: allowed when asked for, never chosen by ``auto``)."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    return device.type in ("cpu", "mps")


def resolve_precision(requested: str, device: torch.device) -> str:
    """``bf16``, ``fp16`` or ``fp32``: ``auto`` picks bf16 on a GPU that has it, else fp32."""
    if requested != "auto":
        return requested
    return "bf16" if device.type == "cuda" and supports_bf16(device) else "fp32"


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The context every forward pass (training and evaluation) runs in."""
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
    """What to record about a trial's device: on a GPU its name and the GPUs Ray made
    visible (trials sharing a GPU with fractional ``gpus_per_trial`` show the same one)."""
    if device.type != "cuda":
        return {"device": str(device)}
    index = device.index if device.index is not None else torch.cuda.current_device()
    return {"device": f"cuda:{index}", "device_name": torch.cuda.get_device_name(index),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", "")}


def problems(device: str, precision: str, quantization: str) -> list[str]:
    """What this worker cannot run of the sweep's settings, one fix-it line each.

    Called inside a Ray task holding one trial's resources, so it sees what a trial would.
    """
    found: list[str] = []
    if device.startswith("cuda") and not torch.cuda.is_available():
        found.append(f"sweep field device={device!r}: the trial's worker sees no CUDA device "
                     f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')!r}); "
                     "give trials a GPU with --set gpus_per_trial=1, or --set device=auto")
        return found
    mps = getattr(torch.backends, "mps", None)
    if device == "mps" and not (mps is not None and mps.is_available()):
        found.append("sweep field device='mps': this worker has no Apple MPS device; use --set device=auto")
        return found
    chosen = resolve_device(device)
    if precision == "bf16" and not supports_bf16(chosen):
        name = torch.cuda.get_device_name(chosen) if chosen.type == "cuda" else chosen.type
        found.append(f"sweep field precision='bf16': the trial's device {chosen} ({name}) has no bfloat16; "
                     "use --set precision=fp16 (loss-scaled) or --set precision=fp32")
    if quantization != "none":
        if not bitsandbytes_installed():
            found.append(f"sweep field quantization={quantization!r} needs the bitsandbytes package, which the "
                         "trial's worker cannot import; pip install bitsandbytes, or --set quantization=none")
        elif chosen.type != "cuda":
            found.append(f"sweep field quantization={quantization!r} needs a CUDA GPU (bitsandbytes), but the "
                         f"trial's device is {chosen}; give trials a GPU (--set gpus_per_trial=1) or "
                         "--set quantization=none")
    return found


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
    """Peak memory of one trial: GPU memory allocated by torch on a CUDA device, else the
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
