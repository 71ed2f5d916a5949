"""The GPU path's defects, each proved where it shows on a CPU (issue 18): the sft gradient
under micro-batching and data parallelism, the OOM retry's memory, peft's hooks and the base
cache on a warm worker, padding-free packing, promote's merge on a reloaded base, and the
cost figures. Only the out-of-memory error itself is injected (a GPU fault a CPU can't make).
"""

from __future__ import annotations

import gc
import json
import os
import weakref
from pathlib import Path

import pytest
import torch

from hpo import Sweep
from hpo.errors import is_out_of_memory
from hpo.train import accelerator, batches, cost, sft, training, worker_cache
from hpo.train.recipe import TrainJob
from tests.conftest import SEARCH_SPACES

REAL_FORWARD = training._forward
OOM = "CUDA out of memory. Tried to allocate 2.00 GiB (injected)"


def sft_data(folder: Path) -> Path:
    """Conversations whose answers differ a lot in length: a mean over examples and a mean over
    answer tokens weigh them differently."""
    rows = []
    for i in range(12):
        answer = "yes" if i % 2 else " ".join(["a long answer with many words"] * (1 + i % 5))
        rows.append({"prompt": f"question number {i}?", "completion": answer})
    path = folder / "uneven.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def sft_job(model: Path, data: Path, **fields) -> TrainJob:
    sweep = Sweep(model=str(model), task="sft", train_data=str(data), eval_data=str(data), max_steps=1,
                  eval_every=1, max_length=96, seed=5, generation_examples=0, device="cpu", **fields)
    return TrainJob.from_sweep(sweep, {"learning_rate": 1e-3, "batch_size": 4, "lora_dropout": 0.0,
                                       "max_grad_norm": 1e9})


def first_gradients(seen: dict[str, torch.Tensor]):
    """A ``clip_grad_norm_`` that keeps, in ``seen``, the gradients of the first step it clips
    (the recipe clips once per step, after the backward passes and the ranks' all-reduce)."""
    real_clip = torch.nn.utils.clip_grad_norm_

    def clip(weights, *args, **kwargs):
        if not seen:
            seen.update({str(i): w.grad.detach().clone() for i, w in enumerate(weights)})
        return real_clip(weights, *args, **kwargs)

    return clip


def gradients_of_one_step(job: TrainJob, monkeypatch, split_to: int | None = None) -> dict[str, torch.Tensor]:
    """The trainable weights' gradients of the first step; ``split_to``: pieces larger than
    that many rows fail with an injected OOM."""
    seen: dict[str, torch.Tensor] = {}
    clip = first_gradients(seen)

    def forward(model, batch):
        if split_to is not None and batch["input_ids"].shape[0] > split_to:
            raise torch.OutOfMemoryError(OOM)
        return REAL_FORWARD(model, batch)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    monkeypatch.setattr(training, "_forward", forward)
    reports: list[dict] = []
    training.fine_tune(job, lambda step, metrics: reports.append(metrics))
    assert reports[-1]["micro_batch_size"] == (split_to or job.params.batch_size)
    return seen


def assert_same_gradients(one: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> None:
    assert one.keys() == other.keys() and one
    for name in one:
        torch.testing.assert_close(other[name], one[name], rtol=1e-4, atol=1e-7)


def test_sft_gradient_with_oom_halving_equals_the_unsplit_batch(tiny_llama: Path, tmp_path: Path,
                                                                monkeypatch) -> None:
    """Micro-batches after an OOM: the loss is the batch's mean over answer tokens, not the
    pieces' means weighted by their share of examples."""
    job = sft_job(tiny_llama, sft_data(tmp_path))
    whole = gradients_of_one_step(job, monkeypatch)
    halved = gradients_of_one_step(job, monkeypatch, split_to=1)
    assert_same_gradients(whole, halved)


# two gloo ranks ---------------------------------------------------------------------------
def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank(rank: int, world: int, job: TrainJob, folder: str, port: int) -> None:
    """One rank of a two-process gloo group: perturb a frozen weight on rank 1 (DDP must not
    send rank 0's frozen base over it), train one step, save the step's gradients."""
    import torch.distributed as dist
    from safetensors.torch import save_file

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TOKENIZERS_PARALLELISM="false")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        tokenizer = worker_cache.load_tokenizer(job.model)
        base = worker_cache.base_model(job, 0, tokenizer, torch.device("cpu"), "fp32")
        frozen = base.model.norm.weight
        if rank == 1:
            with torch.no_grad():
                frozen[0] += 2.0 ** -20  # exact in fp32; too small to move the gradients past the tolerance
        seen: dict[str, torch.Tensor] = {}
        torch.nn.utils.clip_grad_norm_ = first_gradients(seen)
        training.fine_tune(job, lambda step, metrics: None)
        seen["frozen_after"] = frozen.detach()[:1].clone()
        save_file(seen, f"{folder}/rank{rank}.safetensors")
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_compute_the_one_worker_gradient_and_leave_the_frozen_base_alone(
        tiny_llama: Path, tmp_path: Path, monkeypatch) -> None:
    from safetensors.torch import load_file

    job = sft_job(tiny_llama, sft_data(tmp_path))
    one_worker = gradients_of_one_step(job, monkeypatch)
    monkeypatch.undo()
    torch.multiprocessing.spawn(_rank, args=(2, job, str(tmp_path), free_port()), nprocs=2, join=True)
    ranks = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(2)]
    frozen = [r.pop("frozen_after") for r in ranks]
    assert_same_gradients(one_worker, ranks[0])
    assert_same_gradients(ranks[0], ranks[1])  # DDP averaged them
    assert frozen[1] - frozen[0] == pytest.approx(2.0 ** -20), "DDP broadcast the frozen base"


# the OOM retry ------------------------------------------------------------------------------
def test_the_oom_retry_runs_after_the_failed_steps_tensors_are_freed(tiny_bert: Path, monkeypatch) -> None:
    """The failed attempt's activations (here a 64 MB tensor its frame holds) must be gone when
    the cache is released and the smaller piece retried, not kept alive by the traceback."""
    alive_at_release: list[bool] = []
    held: list[weakref.ref] = []

    def forward(model, batch):
        if batch["input_ids"].shape[0] > 2:
            activations = torch.ones(16 * 1024 * 1024)
            held.append(weakref.ref(activations))
            raise torch.OutOfMemoryError(OOM)
        return REAL_FORWARD(model, batch)

    real_release = accelerator.release_memory

    def release():
        alive_at_release.append(any(ref() is not None for ref in held))
        real_release()

    monkeypatch.setattr(training, "_forward", forward)
    monkeypatch.setattr(accelerator, "release_memory", release)
    sweep = Sweep(model=str(tiny_bert), train_data=str(SEARCH_SPACES / "data/reviews/train.tsv"),
                  eval_data=str(SEARCH_SPACES / "data/reviews/eval.tsv"), max_steps=1, eval_every=1, max_length=32)
    reports: list[dict] = []
    training.fine_tune(TrainJob.from_sweep(sweep, {"batch_size": 8}), lambda step, m: reports.append(m))
    assert reports[-1]["micro_batch_size"] == 2
    assert alive_at_release and not any(alive_at_release), "the failed step's tensors were alive at the release"


def test_cublas_alloc_failed_is_out_of_memory() -> None:
    assert is_out_of_memory(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"))
    assert is_out_of_memory(torch.OutOfMemoryError(OOM))
    assert not is_out_of_memory(RuntimeError("CUDA error: CUBLAS_STATUS_EXECUTION_FAILED"))


# a warm worker: hooks and the base cache ------------------------------------------------------
def test_no_input_grad_hook_is_left_on_the_base_after_warm_trials_with_checkpointing(tiny_llama: Path,
                                                                                      tmp_path: Path) -> None:
    job = sft_job(tiny_llama, sft_data(tmp_path)).with_settings(gradient_checkpointing=True)
    counts = []
    for _ in range(5):
        training.fine_tune(job, lambda step, metrics: None)
        base = next(m for k, m in worker_cache._BASE_MODELS.items() if k[0] == str(tiny_llama))
        counts.append(len(base.get_input_embeddings()._forward_hooks))
    assert counts == [0] * 5


def test_a_warm_worker_keeps_one_base_per_device_training_a_b_a_b(tiny_bert: Path, tiny_llama: Path,
                                                                  tmp_path: Path) -> None:
    """Loading another model frees the one before it (weakly referenced: nothing holds it)."""
    bert = TrainJob.from_sweep(Sweep(model=str(tiny_bert), train_data=str(SEARCH_SPACES / "data/reviews/train.tsv"),
                                     eval_data=str(SEARCH_SPACES / "data/reviews/eval.tsv"), max_steps=1,
                                     eval_every=1, max_length=32, device="cpu"), {"batch_size": 4})
    llama = sft_job(tiny_llama, sft_data(tmp_path))
    worker_cache._BASE_MODELS.clear()
    previous: list[weakref.ref] = []
    for job in (bert, llama, bert, llama):
        training.fine_tune(job, lambda step, metrics: None)
        gc.collect()
        assert len(worker_cache._BASE_MODELS) == 1, list(worker_cache._BASE_MODELS)
        assert all(ref() is None for ref in previous), "an earlier base is still alive"
        previous.append(weakref.ref(next(iter(worker_cache._BASE_MODELS.values()))))


# padding-free packing -------------------------------------------------------------------------
def test_padding_free_packing_gives_the_rows_loss_and_marks_every_example(tiny_llama: Path, tmp_path: Path) -> None:
    """Flash attention reads packed examples from one flattened row (cu_seq_lens); the same row
    through sdpa (which builds the block mask from the positions) gives the [B, L] rows' loss."""
    from transformers import AutoModelForCausalLM

    job = sft_job(tiny_llama, sft_data(tmp_path)).with_settings(packing=True, max_length=64)
    tokenizer = worker_cache.load_tokenizer(job.model)
    train, _ = sft.datasets(job, tokenizer)
    batch = batches.collate(train, [0, 1, 2], tokenizer, "sft")
    rows = batch.pop(batches.ROW_TOKENS)
    flat = sft.padding_free(batch, rows)
    assert flat["input_ids"].shape == (1, int(rows.sum()))
    starts = [0] + [i for i, p in enumerate(flat["position_ids"][0].tolist()) if p == 0][1:] + [int(rows.sum())]
    assert flat["cu_seq_lens_q"].tolist() == starts and flat["cu_seq_lens_q"].dtype == torch.int32
    assert flat["max_length_q"] == max(b - a for a, b in zip(starts, starts[1:], strict=False))
    assert all(flat["labels"][0, s] == sft.IGNORE for s in starts[:-1])  # nothing predicts across a boundary
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation="sdpa").eval()
    model.config.use_cache = False
    with torch.no_grad():
        as_rows = model(**batch).loss
        as_one_row = model(**{k: flat[k] for k in ("input_ids", "labels", "position_ids")}).loss
    torch.testing.assert_close(as_one_row, as_rows, rtol=1e-5, atol=1e-6)
    assert sft.wants_padding_free("flash_attention_2") and sft.wants_padding_free("flash_attention_3")
    assert not sft.wants_padding_free("sdpa") and not sft.wants_padding_free("eager")


# cost in every trial's record -------------------------------------------------------------------
def test_flops_formula_and_the_cost_metrics(tiny_llama: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    config = model.config
    counter = cost.FlopCounter(model, checkpointing=False)  # full fine-tuning: every weight trains
    n, every = counter.matmul_params, sum(w.numel() for w in model.parameters())
    layer = 2 * 32 * 32 + 2 * 32 * 16 + 3 * 32 * 64  # q and o; k and v (2 of 4 heads); the MLP
    assert n == config.num_hidden_layers * layer + config.vocab_size * 32  # the tied head counts
    assert counter.trainable == every
    assert counter.per_token(100) == 4 * n + 2 * every + 12 * config.num_hidden_layers * 32 * 100
    assert cost.FlopCounter(model, checkpointing=True).per_token(100) == 6 * n + 2 * every + 16 * 2 * 32 * 100
    for weight in model.parameters():  # LoRA-like: nothing trains, the backward still runs through
        weight.requires_grad_(False)
    assert cost.FlopCounter(model, checkpointing=False).per_token(100) == 4 * n + 12 * 2 * 32 * 100

    h100 = accelerator.DeviceFacts("cuda", 0, "NVIDIA H100 80GB HBM3", (9, 0), visible=1)
    counter.add_batch(torch.tensor([100, 100]))
    values = cost.throughput(counter, 0.5, h100, "bf16")
    assert counter.tokens == 200 and values["tokens_per_second"] == 400
    assert values["mfu"] == pytest.approx(counter.per_token(100) * 200 / 0.5 / 989e12)
    # two ranks (each counts the whole batch) on two GPUs: the same work over twice the peak
    assert cost.throughput(counter, 0.5, h100, "bf16", gpus=2)["mfu"] == pytest.approx(values["mfu"] / 2)
    assert "mfu" not in cost.throughput(counter, 0.5, accelerator.DeviceFacts("cpu"), "fp32")
    assert cost.peak_flops("NVIDIA H100 PCIe", "bf16") == 756e12 and cost.peak_flops("Tesla T4", "bf16") is None

    reports: list[dict] = []
    training.fine_tune(sft_job(tiny_llama, sft_data(tmp_path)), lambda step, metrics: reports.append(metrics))
    assert reports[-1]["tokens_per_second"] > 0 and "mfu" not in reports[-1]  # no GPU here
    assert reports[-1]["peak_reserved_memory_mb"] >= reports[-1]["resident_memory_mb"] > 0
    assert Sweep(metric="eval_loss,tokens_per_second").direction == "minimize,maximize"


# promote --merge of a quantized base ---------------------------------------------------------------
def test_merging_onto_a_reloaded_base_gives_the_trained_model(tiny_bert: Path) -> None:
    """A 4-bit base is not merged into (re-quantized weights); the adapter and head go onto a
    base loaded again unquantized. Shown on a CPU with the reload forced: same outputs."""
    sweep = Sweep(model=str(tiny_bert), train_data=str(SEARCH_SPACES / "data/reviews/train.tsv"),
                  eval_data=str(SEARCH_SPACES / "data/reviews/eval.tsv"), max_steps=4, eval_every=4, max_length=32)
    job = TrainJob.from_sweep(sweep, {"batch_size": 4, "learning_rate": 5e-2, "lora_dropout": 0.0})
    outputs: dict[str, torch.Tensor] = {}
    inputs = worker_cache.load_tokenizer(job.model)(["a fine film", "dull and long"], return_tensors="pt", padding=True)

    def keep(model, tokenizer) -> None:
        model.eval()
        with torch.no_grad():
            outputs["trained"] = model(**inputs).logits
            reloaded = worker_cache.merged(job, model, tokenizer, reload=True)
            assert reloaded is not model.base_model.model, "merged into the trained base, not a reloaded one"
            assert not hasattr(reloaded, "peft_config")
            outputs["reloaded"] = reloaded.eval()(**inputs).logits

    training.fine_tune(job, lambda step, metrics: None, on_trained=keep)
    torch.testing.assert_close(outputs["reloaded"], outputs["trained"], rtol=1e-4, atol=1e-5)


# what a GPU user expects of a trainer ---------------------------------------------------------------
def test_fused_adamw_trains_as_the_plain_one(tiny_bert: Path) -> None:
    sweep = Sweep(model=str(tiny_bert), train_data=str(SEARCH_SPACES / "data/reviews/train.tsv"),
                  eval_data=str(SEARCH_SPACES / "data/reviews/eval.tsv"), max_steps=6, eval_every=3, max_length=32)
    losses = {}
    for fused in (False, True):
        job = TrainJob.from_sweep(sweep, {"batch_size": 8, "learning_rate": 1e-2}).with_settings(fused_optimizer=fused)
        reports: list[dict] = []
        training.fine_tune(job, lambda step, metrics, reports=reports: reports.append(metrics))
        losses[fused] = [value for r in reports for value in (r["train_loss"], r["eval_loss"])]
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)
    assert Sweep(fused_optimizer=True).fused_optimizer and TrainJob.from_sweep(Sweep(fused_optimizer=True), {}).sweep.fused_optimizer


def test_length_grouped_batches_cover_the_epoch_with_less_padding() -> None:
    lengths = [int(x) for x in torch.randint(5, 200, (400,), generator=torch.Generator().manual_seed(0))]
    order = torch.randperm(400, generator=torch.Generator().manual_seed(1)).tolist()
    grouped = batches.grouped_by_length(order, lengths, 8, torch.Generator().manual_seed(2))
    assert sorted(grouped) == sorted(order)  # 400 = 50 batches of 8: nothing dropped

    def padding(sequence: list[int]) -> int:
        batches = [sequence[i : i + 8] for i in range(0, len(sequence), 8)]
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    assert padding(grouped) < padding(order) / 4
    assert max(lengths[i] for i in grouped[:8]) == max(lengths)  # the longest batch first: an OOM shows at once


# the prepared check for the first GPU machine -------------------------------------------------------
def test_gpu_check_dry_run_plans_every_section_and_its_imports_work() -> None:
    import subprocess
    import sys

    from tests.conftest import REPO

    result = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--dry-run"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    (plan,) = [json.loads(line) for line in result.stdout.splitlines()]
    assert plan["needed_imports_ok"] and plan["missing"] == []
    assert plan["sections"][0] == "env" and {"warm_trials", "oom", "shared_gpu", "pytest_gpu"} <= set(plan["sections"])
    assert plan["total_budget_seconds"] <= 8 * 60


def test_gpu_check_rehearsed_on_the_cpu(tiny_llama: Path) -> None:
    """The check's own code, run where it can on a CPU (``--device cpu``), so that the first GPU
    machine does not meet its bugs; the GPU-only sections say skipped."""
    import subprocess
    import sys

    from tests.conftest import REPO, hpo_env

    result = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--device", "cpu", "--model",
                             str(tiny_llama), "--only", "env,packing,oom,cuda_n"], capture_output=True, text=True,
                            timeout=300, env=hpo_env())
    records = {r["section"]: r for r in map(json.loads, result.stdout.splitlines())}
    assert result.returncode == 0, result.stdout + result.stderr
    assert records["packing"]["status"] == "ok" and records["packing"]["examples"] >= 2
    assert records["cuda_n"]["status"] == "ok" and "cuda:1" in records["cuda_n"]["message"]
    assert records["oom"]["status"] == "skipped"
    assert records["summary"]["failed"] == 0
