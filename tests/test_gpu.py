"""What only a GPU shows, run with ``pytest -m gpu`` on a machine with CUDA (``bench/gpu_check.py``
runs it as its last section). Everywhere else each test is skipped with that reason; the rest
of the suite hides the GPUs (tests/conftest.py) and covers these code paths on the CPU.

Placement on the GPU Ray gives a trial, bf16 only on a card that has it natively, 4-bit and
8-bit bases, the memory-lean losses (liger-kernel's and cut-cross-entropy's Triton kernels where
installed), two trials sharing one GPU (each capped at half its memory), and a real
out-of-memory error recovered by halving the micro-batch.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from hpo import Sweep
from hpo.train import accelerator, training, worker_cache
from hpo.train.recipe import TrainJob
from tests.conftest import SEARCH_SPACES, run_hpo

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _cuda() -> None:
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU: run `pytest -m gpu` on a GPU machine (the rest of the suite hides the "
                    "GPUs and runs on the CPU)")


def sft_data(folder: Path) -> Path:
    rows = [{"prompt": f"what is {i} plus {i}?", "completion": f"{2 * i}"} for i in range(64)]
    path = folder / "sums.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def sft_job(model: Path, data: Path, **fields) -> TrainJob:
    batch_size = fields.pop("batch_size", 8)
    sweep = Sweep(model=str(model), task="sft", train_data=str(data), eval_data=str(data), max_steps=4,
                  eval_every=4, max_length=64, seed=0, generation_examples=4, max_new_tokens=4,
                  gpus_per_trial=1, **fields)
    return TrainJob.from_sweep(sweep, {"batch_size": batch_size, "learning_rate": 1e-3, "lora_dropout": 0.0})


def train(job: TrainJob) -> tuple[dict, dict]:
    reports: list[dict] = []
    settings: dict = {}
    training.fine_tune(job, lambda step, metrics: reports.append(metrics), on_start=settings.update)
    accelerator.release_memory()
    return reports[-1], settings


def test_a_trial_trains_on_the_gpu_in_the_cards_native_precision(tiny_llama: Path, tmp_path: Path) -> None:
    import torch

    final, settings = train(sft_job(tiny_llama, sft_data(tmp_path)))
    facts = accelerator.facts(torch.device("cuda"))
    assert settings["device"] == "cuda:0" and settings["device_name"] == facts.name
    assert settings["precision"] == ("bf16" if facts.native_bf16 else "fp32")
    base = next(iter(worker_cache._BASE_MODELS.values()))
    assert next(base.parameters()).device.type == "cuda"
    assert final["tokens_per_second"] > 0 and final["peak_reserved_memory_mb"] >= final["peak_memory_mb"] > 0
    if facts.name and any(name in facts.name for name in ("H100", "H200", "A100", "L4", "A10", "T4", "V100")):
        assert 0 < final["mfu"] < 1


def test_fp16_and_native_bf16_agree_with_fp32(tiny_llama: Path, tmp_path: Path) -> None:
    import torch

    data = sft_data(tmp_path)
    wanted = ["fp32", "fp16"] + (["bf16"] if accelerator.facts(torch.device("cuda")).native_bf16 else [])
    losses = {p: train(sft_job(tiny_llama, data, precision=p))[0]["eval_loss"] for p in wanted}
    for precision in wanted:
        assert losses[precision] == pytest.approx(losses["fp32"], rel=0.02), losses


@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_quantized_bases_train(tiny_llama: Path, tmp_path: Path, quantization: str) -> None:
    if importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("bitsandbytes is not installed (pip install bitsandbytes)")
    import math

    final, settings = train(sft_job(tiny_llama, sft_data(tmp_path), quantization=quantization))
    assert settings["quantization"] == quantization and math.isfinite(final["eval_loss"])


@pytest.mark.parametrize("kind", ["chunked", "liger", "cce"])
def test_a_lean_loss_trains_as_the_plain_loss(tiny_llama: Path, tmp_path: Path, kind: str) -> None:
    from hpo.train import lean_loss

    if not lean_loss.installed(kind):
        pytest.skip(f"{lean_loss.PACKAGES[kind][1]} is not installed (pip install -e '.[lean]')")
    data = sft_data(tmp_path)
    plain, _ = train(sft_job(tiny_llama, data))
    lean, settings = train(sft_job(tiny_llama, data, lean_loss=kind))
    assert settings["lean_loss"] == kind
    for name in ("train_loss", "eval_loss"):
        assert lean[name] == pytest.approx(plain[name], rel=0.02), (name, lean[name], plain[name])


def test_a_real_oom_is_recovered_with_smaller_micro_batches(tiny_llama: Path, tmp_path: Path) -> None:
    import torch

    job = sft_job(tiny_llama, sft_data(tmp_path), batch_size=64)
    train(sft_job(tiny_llama, sft_data(tmp_path), batch_size=2))  # the base is resident now
    _, total = torch.cuda.mem_get_info()
    resident = torch.cuda.memory_allocated()
    torch.cuda.set_per_process_memory_fraction(min(0.9, (resident + 64 * 2**20) / total), 0)
    try:
        final, _ = train(job)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, 0)
    assert final["micro_batch_size"] < 64 and final["grad_accum"] > 1


def test_two_trials_share_one_gpu(tiny_llama: Path, tmp_path: Path) -> None:
    import optuna

    data = sft_data(tmp_path)
    result = run_hpo(["search", str(SEARCH_SPACES / "sft_lora.py"), "--trials", "2", "--set", f"model={tiny_llama}",
                      "--set", f"train_data={data}", "--set", f"eval_data={data}", "--set", "gpus_per_trial=0.5",
                      "--set", "max_steps=20", "--set", "eval_every=10", "--set", "pruner=none"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    trials = optuna.load_study(study_name=None, storage=f"sqlite:///{tmp_path}/hpo.db").trials
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    assert len({t.user_attrs.get("cuda_visible_devices") for t in trials}) == 1
    first, second = sorted(trials, key=lambda t: t.datetime_start)
    assert second.datetime_start < first.datetime_complete, "the two trials did not run at once"
