"""One prepared check for the first GPU machine: what only a GPU shows, in at most 8 minutes.

    python bench/gpu_check.py --dry-run      # the plan, and whether everything it needs imports
    python bench/gpu_check.py                # on a machine with torch built for CUDA
    python bench/gpu_check.py --only env,precision --model /path/to/model

From a clean checkout (``make install-dev TORCH=torch`` puts a CUDA torch in .venv) on one
GPU. Prints one JSON line per section, then a summary line; exits 1 when a section failed.
Each section is bounded in time; a section that needs what the machine lacks (bitsandbytes,
flash-attn, a second GPU) says ``skipped`` with the reason. The sections:

* ``env``: the card, compute capability, memory, torch and CUDA versions, native bf16,
  whether flash-attn and bitsandbytes import.
* ``warm_trials``: five sft trials of SmolLM2-135M-Instruct on one warm worker (this process):
  ``resident_memory_mb`` flat (the cached base, nothing left over), peak memory per trial.
* ``precision``: the same 20 steps in fp32, bf16 (where native) and fp16: eval_loss agrees.
* ``quantization``: 4-bit (QLoRA) and 8-bit bases train 10 steps, losses finite, and
  promote's merge reloads the base unquantized.
* ``packing``: a packed batch's loss equals the unpacked examples' (sdpa), and the
  padding-free row's under flash_attention_2 where flash-attn is installed.
* ``oom``: a real out-of-memory error recovered: the process capped
  (``torch.cuda.set_per_process_memory_fraction``) below what batch 64 needs, the recipe
  halves the micro-batch and finishes with the sampled batch's loss.
* ``cuda_n``: ``--set device=cuda:1`` on a one-GPU trial is refused in one line, exit 2.
* ``shared_gpu``: a 4-trial sweep at ``gpus_per_trial=0.5``: two trials at once on one card,
  each capped at half its memory.
* ``throughput``: ``bench/throughput.py`` on the GPU (the recipe against transformers'
  Trainer, same precision), with tokens/s and MFU.
* ``lean_loss``: the same 10 sft steps with the plain loss and each memory-lean one
  (``chunked``; ``liger`` and ``cce`` where installed: ``pip install -e '.[lean]'``): eval_loss
  agrees, the peak memory is lower.
* ``pytest_gpu``: ``pytest -m gpu`` (the suite's GPU tests).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATES = REPO / "search_spaces" / "data" / "dates"
SECTIONS = ("env", "warm_trials", "precision", "quantization", "packing", "oom", "cuda_n", "shared_gpu",
            "throughput", "lean_loss", "pytest_gpu")
BUDGET_SECONDS = {"env": 10, "warm_trials": 50, "precision": 45, "quantization": 50, "packing": 30, "oom": 40,
                  "cuda_n": 20, "shared_gpu": 85, "throughput": 50, "lean_loss": 35, "pytest_gpu": 65}
"""Each section's share of the 8 minutes: a section still running at its end is stopped and failed."""
NEEDED = ("torch", "transformers", "peft", "ray.tune", "optuna", "mlflow", "hpo")
OPTIONAL = ("bitsandbytes", "flash_attn", "liger_kernel", "cut_cross_entropy")


class Skipped(Exception):
    """A section that this machine cannot run, with the reason."""


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def dry_run() -> int:
    """The plan, and whether the modules the check needs import (on any machine)."""
    missing = []
    for name in NEEDED:
        try:
            importlib.import_module(name)
        except ImportError as error:
            missing.append(f"{name}: {error}")
    optional = {name: importlib.util.find_spec(name.split(".")[0]) is not None for name in OPTIONAL}
    import torch

    emit({"section": "plan", "sections": list(SECTIONS), "budget_seconds": BUDGET_SECONDS,
          "total_budget_seconds": sum(BUDGET_SECONDS.values()), "needed_imports_ok": not missing,
          "missing": missing, "optional": optional, "torch": torch.__version__,
          "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()})
    return 1 if missing else 0


# the sections -----------------------------------------------------------------------------------
DEVICE = "cuda"
"""Where the in-process sections train: ``cuda``; ``--device cpu`` rehearses the check's own code
on a CPU (the GPU-only sections then say skipped)."""


def needs_gpu() -> None:
    if DEVICE != "cuda":
        raise Skipped("needs a CUDA GPU (rehearsal on the CPU)")


def sft_job(model: str, steps: int, **fields):
    from hpo import Sweep
    from hpo.train.recipe import TrainJob

    batch_size = fields.pop("batch_size", 8)
    fields.setdefault("device", DEVICE)
    fields.setdefault("gpus_per_trial", 1 if DEVICE == "cuda" else 0)
    sweep = Sweep(model=model, task="sft", train_data=str(DATES / "train.jsonl"), eval_data=str(DATES / "eval.jsonl"),
                  max_steps=steps, eval_every=steps, max_length=128, seed=0, generation_examples=4,
                  max_new_tokens=16, **fields)
    return TrainJob.from_sweep(sweep, {"learning_rate": 2e-4, "batch_size": batch_size, "lora_r": 8,
                                       "lora_dropout": 0.0})


def train(job) -> dict:
    from hpo.train import accelerator, training

    reports: list[dict] = []
    training.fine_tune(job, lambda step, metrics: reports.append(metrics))
    accelerator.release_memory()
    return reports[-1]


def section_env(args) -> dict:
    import torch

    if DEVICE == "cpu":
        return {"device": "cpu", "torch": torch.__version__, "rehearsal": True}
    if not torch.cuda.is_available():
        raise Skipped(f"torch {torch.__version__} sees no CUDA device (a CPU build, or no GPU)")
    from hpo.train import accelerator

    facts = accelerator.facts(torch.device("cuda"))
    total = torch.cuda.get_device_properties(0).total_memory
    return {"card": facts.name, "compute_capability": "{}.{}".format(*facts.capability), "gpus": facts.visible,
            "memory_gb": round(total / 2**30, 1), "torch": torch.__version__, "cuda": torch.version.cuda,
            "native_bf16": facts.native_bf16, "is_bf16_supported": torch.cuda.is_bf16_supported(),
            "auto_precision": accelerator.choose_precision("auto", facts),
            **{name: importlib.util.find_spec(name) is not None for name in OPTIONAL}}


def section_warm_trials(args) -> dict:
    finals = [train(sft_job(args.model, 10, batch_size=4)) for _ in range(5)]
    resident = [f["resident_memory_mb"] for f in finals]
    flat = max(resident[1:]) - min(resident[1:]) <= max(16, 0.02 * resident[1])
    return {"ok": flat, "resident_memory_mb": resident, "peak_memory_mb": [f["peak_memory_mb"] for f in finals],
            "peak_reserved_memory_mb": [f["peak_reserved_memory_mb"] for f in finals],
            "tokens_per_second": [round(f["tokens_per_second"]) for f in finals],
            "mfu": [round(f.get("mfu", 0.0), 4) for f in finals]}


def section_precision(args) -> dict:
    import torch

    from hpo.train import accelerator

    facts = accelerator.facts(torch.device(DEVICE))
    wanted = ["fp32", "bf16"] if DEVICE == "cpu" else ["fp32", "fp16"] + (["bf16"] if facts.native_bf16 else [])
    losses = {p: train(sft_job(args.model, 20, precision=p))["eval_loss"] for p in wanted}
    spread = max(losses.values()) - min(losses.values())
    return {"ok": spread <= 0.05 * losses["fp32"], "eval_loss": losses, "spread": spread,
            "bf16": "run" if "bf16" in wanted else f"not native on {facts.name}: not run (refused, as it should be)"}


def section_quantization(args) -> dict:
    needs_gpu()
    if importlib.util.find_spec("bitsandbytes") is None:
        raise Skipped("bitsandbytes is not installed (pip install bitsandbytes)")
    import torch

    from hpo.train import training, worker_cache

    results = {}
    for kind in ("4bit", "8bit"):
        final = train(sft_job(args.model, 10, quantization=kind))
        results[kind] = {"eval_loss": final["eval_loss"], "peak_memory_mb": final["peak_memory_mb"]}
    merged_dtypes: set[str] = set()

    def merge(model, tokenizer) -> None:
        merged = worker_cache.merged(job, model, tokenizer)
        merged_dtypes.update(str(w.dtype) for w in merged.parameters())

    job = sft_job(args.model, 2, quantization="4bit")
    training.fine_tune(job, lambda step, metrics: None, on_trained=merge)
    ok = all(torch.isfinite(torch.tensor(r["eval_loss"])) for r in results.values()) \
        and merged_dtypes <= {"torch.bfloat16", "torch.float32"}
    return {"ok": bool(ok), **results, "merged_dtypes": sorted(merged_dtypes)}


def section_packing(args) -> dict:

    import torch
    from transformers import AutoModelForCausalLM

    from hpo.train import batches, models, sft, worker_cache

    job = sft_job(args.model, 1).with_settings(packing=True, max_length=256)
    tokenizer = worker_cache.load_tokenizer(job.model)
    plain_job = job.with_settings(packing=False)
    plain = sft.datasets(plain_job, tokenizer)[0]
    packed = sft.datasets(job, tokenizer)[0]
    batch = batches.collate(packed, [0, 1], tokenizer, "sft")
    rows = batch.pop(batches.ROW_TOKENS)
    n_examples = int((batch["position_ids"] == 0).sum()) - int((rows < batch["input_ids"].shape[1]).sum())
    path = models.resolve(args.model)
    results = {}
    for kernel in ("sdpa", "flash_attention_2"):
        if kernel.startswith("flash") and importlib.util.find_spec("flash_attn") is None:
            results[kernel] = "skipped: flash-attn is not installed"
            continue
        if kernel.startswith("flash") and DEVICE != "cuda":
            results[kernel] = "skipped: needs a CUDA GPU"
            continue
        dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=kernel,
                                                     device_map={"": DEVICE}).eval()
        model.config.use_cache = False
        inputs = sft.padding_free(batch, rows) if sft.wants_padding_free(kernel) else batch
        with torch.no_grad():
            packed_loss = model(**{k: v.to(DEVICE) if torch.is_tensor(v) else v for k, v in inputs.items()}).loss.item()
            alone = sft.collate(plain, list(range(n_examples)))
            plain_loss = model(**{k: v.to(DEVICE) for k, v in alone.items()}).loss.item()
        results[kernel] = {"packed": packed_loss, "unpacked": plain_loss, "diff": abs(packed_loss - plain_loss)}
        del model
    ok = all(isinstance(r, str) or r["diff"] <= 0.02 * r["unpacked"] for r in results.values())
    return {"ok": ok, "examples": n_examples, **results}


def section_oom(args) -> dict:
    needs_gpu()
    import torch

    from hpo.train import accelerator

    free, total = torch.cuda.mem_get_info()
    warm = train(sft_job(args.model, 1, batch_size=2))  # the base is now resident
    base = warm["resident_memory_mb"] * 2**20
    fraction = min(0.95, (base + 1.0 * 2**30) / total)  # about 1 GiB above the base: batch 64 x 128 won't fit
    torch.cuda.set_per_process_memory_fraction(fraction, 0)
    try:
        final = train(sft_job(args.model, 2, batch_size=64))
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, 0)
        accelerator.release_memory()
    return {"ok": final["micro_batch_size"] < 64, "memory_fraction": round(fraction, 3),
            "micro_batch_size": final["micro_batch_size"], "grad_accum": final["grad_accum"],
            "train_loss": final["train_loss"], "free_gb_before": round(free / 2**30, 1)}


def section_cuda_n(args) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        result = subprocess.run([sys.executable, "-m", "hpo", "search", str(REPO / "search_spaces" / "sft_lora.py"),
                                 "--set", "gpus_per_trial=1", "--set", "device=cuda:1"], cwd=folder,
                                capture_output=True, text=True, timeout=BUDGET_SECONDS["cuda_n"])
        written = sorted(p.name for p in Path(folder).iterdir())
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    return {"ok": result.returncode == 2 and len(lines) == 1 and not written, "exit": result.returncode,
            "message": lines[-1][:300] if lines else "", "written": written}


def section_shared_gpu(args) -> dict:
    needs_gpu()
    import optuna

    with tempfile.TemporaryDirectory() as folder:
        command = [sys.executable, "-m", "hpo", "search", str(REPO / "search_spaces" / "sft_lora.py"), "--trials", "4",
                   "--set", f"model={args.model}", "--set", "gpus_per_trial=0.5", "--set", "max_steps=20",
                   "--set", "eval_every=10", "--set", "pruner=none", "--set", "generation_examples=4"]
        result = subprocess.run(command, cwd=folder, capture_output=True, text=True,
                                timeout=BUDGET_SECONDS["shared_gpu"])
        if result.returncode != 0:
            return {"ok": False, "exit": result.returncode, "stderr": result.stderr[-1500:]}
        study = optuna.load_study(study_name=None, storage=f"sqlite:///{folder}/hpo.db")
        trials = study.trials
    spans = [(t.datetime_start, t.datetime_complete) for t in trials if t.datetime_complete]
    overlapping = any(a[0] < b[1] and b[0] < a[1] for i, a in enumerate(spans) for b in spans[i + 1:])
    devices = sorted({str(t.user_attrs.get("cuda_visible_devices")) for t in trials})
    return {"ok": len(spans) == 4 and overlapping and len(devices) == 1, "complete": len(spans),
            "two_at_once": overlapping, "cuda_visible_devices": devices,
            "peak_reserved_memory_mb": [t.user_attrs.get("peak_reserved_memory_mb") for t in trials]}


def section_throughput(args) -> dict:
    result = subprocess.run([sys.executable, str(REPO / "bench" / "throughput.py"), "--model", args.model,
                             "--device", DEVICE, "--steps", "20" if DEVICE == "cuda" else "3", "--batch-size", "8", "--max-length", "256"],
                            capture_output=True, text=True, timeout=BUDGET_SECONDS["throughput"])
    if result.returncode != 0:
        return {"ok": False, "stderr": result.stderr[-1500:]}
    line = json.loads(result.stdout.strip().splitlines()[-1])
    return {"ok": line["ratio"] >= 0.95, **line}


def section_lean_loss(args) -> dict:
    from hpo.train import lean_loss

    kinds = ["off", "chunked"] + [k for k in lean_loss.PACKAGES if DEVICE == "cuda" and lean_loss.installed(k)]
    steps = 10 if DEVICE == "cuda" else 2
    finals = {kind: train(sft_job(args.model, steps, batch_size=16, lean_loss=kind)) for kind in kinds}
    plain = finals["off"]
    same = all(abs(f["eval_loss"] - plain["eval_loss"]) <= 0.02 * plain["eval_loss"] for f in finals.values())
    leaner = all(f["peak_memory_mb"] < plain["peak_memory_mb"] for kind, f in finals.items() if kind != "off")
    not_run = {kind: "needs a CUDA GPU" if DEVICE != "cuda" else f"pip install {pip}"
               for kind, (_, pip) in lean_loss.PACKAGES.items() if kind not in kinds}
    return {"ok": same and leaner, "not_run": not_run,
            **{kind: {"eval_loss": f["eval_loss"], "train_loss": f["train_loss"], "peak_memory_mb": f["peak_memory_mb"],
                      "tokens_per_second": round(f["tokens_per_second"])} for kind, f in finals.items()}}


def section_pytest_gpu(args) -> dict:
    needs_gpu()
    result = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-n", "0", "-q", "tests/test_gpu.py"],
                            cwd=REPO, capture_output=True, text=True, timeout=BUDGET_SECONDS["pytest_gpu"])
    tail = result.stdout.strip().splitlines()[-1:] if result.stdout.strip() else []
    return {"ok": result.returncode == 0, "exit": result.returncode, "summary": tail[0] if tail else "",
            "output": result.stdout[-1500:] if result.returncode else ""}


class OverTime(Exception):
    """A section ran past its share of the check's time."""


def _over_time(signum, frame):
    raise OverTime


def run_section(name: str, function: Callable, args) -> dict:
    started = time.perf_counter()
    signal.signal(signal.SIGALRM, _over_time)
    signal.alarm(BUDGET_SECONDS[name] + 5 if DEVICE == "cuda" else 0)  # subprocesses time out first
    try:
        record = {"section": name, "status": "ok", **function(args)}
        if record.pop("ok", True) is False:
            record["status"] = "failed"
    except Skipped as reason:
        record = {"section": name, "status": "skipped", "reason": str(reason)}
    except OverTime:
        record = {"section": name, "status": "failed", "error": f"over its {BUDGET_SECONDS[name]} s"}
    except Exception as error:  # noqa: BLE001 - a failed section is reported, the others still run
        record = {"section": name, "status": "failed", "error": f"{type(error).__name__}: {error}"[:1000],
                  "where": traceback.format_exc().splitlines()[-3:]}
    finally:
        signal.alarm(0)
    record["seconds"] = round(time.perf_counter() - started, 1)
    emit(record)
    return record


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="print the plan and check imports; run nothing")
    parser.add_argument("--model", default="hpo/smollm2-135m-instruct")
    parser.add_argument("--only", default="", help="comma-separated sections (default: all)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cpu: rehearse the check's code on a CPU (GPU-only sections say skipped)")
    args = parser.parse_args()
    if args.dry_run:
        return dry_run()
    global DEVICE
    DEVICE = args.device
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    chosen = [s for s in SECTIONS if not args.only or s in args.only.split(",")]
    records = []
    started = time.perf_counter()
    for name in chosen:
        records.append(run_section(name, globals()[f"section_{name}"], args))
        if name == "env" and records[-1]["status"] == "skipped":  # no GPU: nothing else can run
            break
    counts = {status: sum(r["status"] == status for r in records) for status in ("ok", "failed", "skipped")}
    emit({"section": "summary", **counts, "seconds": round(time.perf_counter() - started, 1),
          "failed_sections": [r["section"] for r in records if r["status"] == "failed"]})
    return 1 if counts["failed"] or counts["skipped"] == len(records) else 0


if __name__ == "__main__":
    sys.exit(main())
