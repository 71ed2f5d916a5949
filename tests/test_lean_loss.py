"""The memory-lean loss (sweep field ``lean_loss``, :mod:`hpo.train.lean_loss`) on the CPU.

``chunked`` gives the plain loss and gradients -- sft with uneven answers, whole and in
OOM-halved micro-batches (the ``num_items_in_batch`` normalisation), and causal_lm over several
chunks -- with no logits returned and a lower peak; generation still runs the model's own
forward. What it cannot serve is refused: a model that scales its logits, an adapter on
lm_head, the Triton kinds off a CUDA GPU or without their package, classification; the
sweep's refusals through the real CLI. ``liger`` and ``cce`` need a CUDA GPU: tests/test_gpu.py
and bench/gpu_check.py's ``lean_loss`` section.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from hpo import HpoError, Sweep
from hpo.overrides import parse_overrides
from hpo.train import accelerator, lean_loss, training, worker_cache
from hpo.train.recipe import TrainJob
from tests.conftest import SEARCH_SPACES, run_hpo
from tests.test_accelerator import A100, CPU
from tests.test_gpu_path import OOM, REAL_FORWARD, assert_same_gradients, first_gradients, sft_data, sft_job

CORPUS = SEARCH_SPACES / "data" / "text" / "corpus.txt"


def one_step(job: TrainJob, monkeypatch, split_to: int | None = None) -> tuple[dict, list, dict]:
    """The first step's gradients, whether each forward returned logits, and the report; pieces
    larger than ``split_to`` rows fail with an injected OOM."""
    seen: dict[str, torch.Tensor] = {}
    logits: list[bool] = []

    def forward(model, batch):
        if split_to is not None and batch["input_ids"].shape[0] > split_to:
            raise torch.OutOfMemoryError(OOM)
        out = REAL_FORWARD(model, batch)
        logits.append(out.logits is not None)
        return out

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", first_gradients(seen))
    monkeypatch.setattr(training, "_forward", forward)
    reports: list[dict] = []
    training.fine_tune(job, lambda step, metrics: reports.append(metrics))
    monkeypatch.undo()
    return seen, logits, reports[-1]


def test_chunked_gives_the_plain_sft_gradients_whole_and_in_micro_batches(tiny_llama: Path, tmp_path: Path,
                                                                           monkeypatch) -> None:
    data = sft_data(tmp_path)
    plain, plain_logits, plain_report = one_step(sft_job(tiny_llama, data), monkeypatch)
    lean, lean_logits, lean_report = one_step(sft_job(tiny_llama, data, lean_loss="chunked"), monkeypatch)
    halved, _, halved_report = one_step(sft_job(tiny_llama, data, lean_loss="chunked"), monkeypatch, split_to=1)
    assert all(plain_logits) and lean_logits and not any(lean_logits), "the lean loss returned logits"
    assert halved_report["micro_batch_size"] == 1
    assert_same_gradients(plain, lean)
    assert_same_gradients(plain, halved)  # each piece over the batch's answer tokens, as the plain loss
    for report in (lean_report, halved_report):
        assert report["train_loss"] == pytest.approx(plain_report["train_loss"], rel=1e-5)
        assert report["eval_loss"] == pytest.approx(plain_report["eval_loss"], rel=1e-5)
    base = next(iter(worker_cache._BASE_MODELS.values()))
    assert "forward" not in vars(base), "the model's own forward is not back on the cached base"


def test_chunked_causal_lm_over_several_chunks_matches_with_a_lower_peak(tiny_llama: Path) -> None:
    """8 blocks of 128 tokens: 1,016 rows of 49,152 logits, three chunks of 341; the plain loss
    holds the whole batch's logits, log-probabilities and their gradient (200 MB each)."""
    sweep = Sweep(model=str(tiny_llama), task="causal_lm", train_data=str(CORPUS), eval_fraction=0.1, max_steps=1,
                  eval_every=1, max_length=128, seed=1, device="cpu", eval_batch_size=8)
    job = TrainJob.from_sweep(sweep, {"batch_size": 8, "lora_dropout": 0.0})
    finals = {}
    for kind in ("chunked", "off"):
        reports: list[dict] = []
        training.fine_tune(job.with_settings(lean_loss=kind), lambda step, metrics, reports=reports: reports.append(metrics))
        accelerator.release_memory()
        finals[kind] = reports[-1]
    for name in ("train_loss", "eval_loss"):
        assert finals["chunked"][name] == pytest.approx(finals["off"][name], rel=1e-5)
    above = {kind: f["peak_memory_mb"] - f["resident_memory_mb"] for kind, f in finals.items()}
    assert above["chunked"] < 0.6 * above["off"], above


def test_chunked_cross_entropy_equals_the_plain_one_with_every_gradient() -> None:
    """Chunks of 7 rows, ignored rows, a trained weight and bias, and the no-grad path."""
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(50, 8, generator=generator)
    weight, bias = torch.randn(40, 8, generator=generator), torch.randn(40, generator=generator)
    targets = torch.randint(0, 40, (50,), generator=generator)
    targets[::6] = lean_loss.IGNORE
    inputs = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
    chunked = lean_loss.chunked_cross_entropy(*inputs, targets, rows=7)
    (chunked * 3).backward()
    plain_inputs = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
    plain = torch.nn.functional.cross_entropy(torch.nn.functional.linear(*plain_inputs), targets, reduction="sum")
    (plain * 3).backward()
    torch.testing.assert_close(chunked, plain)
    for ours, theirs in zip(inputs, plain_inputs, strict=True):
        torch.testing.assert_close(ours.grad, theirs.grad)
    with torch.no_grad():
        torch.testing.assert_close(lean_loss.chunked_cross_entropy(hidden, weight, bias, targets, rows=7), plain)


def test_generation_runs_the_models_own_forward_and_the_forward_comes_back(tiny_llama: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    prompt = torch.tensor([[1, 2, 3, 4, 5]])
    before = model.generate(prompt, max_new_tokens=4, do_sample=False)
    restore = lean_loss.apply(model, "chunked")
    assert model(input_ids=prompt).logits.shape == (1, 5, model.config.vocab_size)
    assert model(input_ids=prompt, labels=prompt).logits is None
    assert torch.equal(model.generate(prompt, max_new_tokens=4, do_sample=False), before)
    restore()
    assert "forward" not in vars(model) and model(input_ids=prompt, labels=prompt).logits is not None


# what it cannot serve -----------------------------------------------------------------------------
def test_a_model_that_scales_its_logits_and_an_adapter_on_lm_head_are_refused_at_the_start(
        tiny_llama: Path, tmp_path: Path) -> None:
    """Cohere multiplies its logits by logit_scale: a loss from lm_head's weight would not be its loss."""
    from transformers import AutoTokenizer, CohereConfig, CohereForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    config = CohereConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=4, num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    cohere = tmp_path / "tiny-cohere"
    torch.manual_seed(0)
    CohereForCausalLM(config).save_pretrained(cohere)
    tokenizer.save_pretrained(cohere)
    data = sft_data(tmp_path)
    for model, modules, words in ((cohere, "q_proj", "logits are not its output layer applied"),
                                  (tiny_llama, "q_proj,lm_head", "lm_head) carries a LoRA adapter")):
        job = sft_job(model, data, lean_loss="chunked")
        job = dataclasses.replace(job, params=dataclasses.replace(job.params, target_modules=tuple(modules.split(","))))
        with pytest.raises(HpoError, match=r"sweep field lean_loss='chunked'") as refused:
            training.fine_tune(job, lambda step, metrics: None)
        assert words in str(refused.value) and "--set lean_loss=off" in str(refused.value)
        base = next(iter(worker_cache._BASE_MODELS.values()))
        assert "forward" not in vars(base) and not hasattr(base, "peft_config"), "the cached base was left changed"


def test_the_sweep_and_the_worker_refuse_what_cannot_run() -> None:
    assert parse_overrides(["lean_loss=chunked"]) == {"lean_loss": "chunked"}
    with pytest.raises(HpoError, match="must be one of off, chunked, liger, cce"):
        parse_overrides(["lean_loss=fast"])
    with pytest.raises(HpoError, match=r"lean_loss='chunked' applies to .* not to task classification"):
        Sweep(lean_loss="chunked")
    with pytest.raises(HpoError, match=r"lean_loss='liger' runs Triton kernels on a CUDA GPU, not device=cpu; "
                                       r"use --set lean_loss=chunked"):
        Sweep(task="sft", device="cpu", lean_loss="liger")
    assert Sweep(task="sft", lean_loss="cce").lean_loss == "cce"  # device auto: the worker decides
    (no_gpu,) = accelerator.problems("auto", "auto", "none", "cce")
    assert "lean_loss='cce' runs Triton kernels on a CUDA GPU, but the trial's device is cpu" in no_gpu
    (no_package,) = accelerator.problems_of(A100, "cuda", "auto", "none", True, "liger", lean_package=False)
    assert "needs the liger-kernel package" in no_package and "pip install liger-kernel" in no_package
    assert accelerator.problems_of(A100, "cuda", "auto", "none", True, "cce", lean_package=True) == []
    assert accelerator.problems_of(CPU, "cpu", "auto", "none", True, "chunked", lean_package=False) == []


@pytest.mark.slow
@pytest.mark.parametrize(("flags", "message"), [
    (["--set", "device=cpu", "--set", "lean_loss=liger"], "sweep field lean_loss='liger' runs Triton kernels on a "
                                                          "CUDA GPU, not device=cpu"),
    (["--set", "lean_loss=cce"], "error: sweep field lean_loss='cce' runs Triton kernels on a CUDA GPU, but the "
                                 "trial's device is cpu"),  # found by the probe on a worker
])
def test_the_cli_refuses_a_lean_loss_no_worker_can_run(tmp_path: Path, tiny_llama: Path, flags, message) -> None:
    result = run_hpo(["search", str(SEARCH_SPACES / "sft_lora.py"), "--skip-data-check", "--set",
                      f"model={tiny_llama}", *flags], cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "no hpo.db, no mlflow.db, no .hpo"
