"""The built-in recipe in a plain process: reports, load-once caching, both tasks."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from hpo import Sweep
from hpo.train import training, worker_cache
from hpo.train.recipe import TrainJob
from tests.conftest import SEARCH_SPACES, needs_shared_data

REVIEWS = SEARCH_SPACES / "data" / "reviews"


def run(job: TrainJob) -> list[tuple[int, dict]]:
    """The reports of one run, without the wall-clock timing (which never repeats)."""
    reports: list[tuple[int, dict]] = []
    training.fine_tune(job, lambda step, metrics: reports.append(
        (step, {k: v for k, v in metrics.items()
                if k not in ("train_seconds", "trial_setup_seconds", "tokens_per_second", "mfu")
               and not k.endswith("_memory_mb")})))
    return reports


def classification_job(model: Path, **params: float) -> TrainJob:
    sweep = Sweep(model=str(model), train_data=str(REVIEWS / "train.tsv"), eval_data=str(REVIEWS / "eval.tsv"),
                  max_steps=12, eval_every=5, max_length=32, seed=3)
    return TrainJob.from_sweep(sweep, {"learning_rate": 3e-3, "batch_size": 8, **params})


def test_reports_every_eval_and_at_the_end(tiny_bert: Path) -> None:
    reports = run(classification_job(tiny_bert))
    assert [step for step, _ in reports] == [5, 10, 12]
    for _, metrics in reports:
        assert set(metrics) >= {"eval_loss", "eval_accuracy", "train_loss", "learning_rate"}
        assert 0.0 <= metrics["eval_accuracy"] <= 1.0
    assert reports[-1][1]["learning_rate"] == 0.0  # linear decay reaches 0 at max_steps


def test_a_warm_worker_gives_exactly_a_fresh_loads_results(tiny_bert: Path) -> None:
    job = classification_job(tiny_bert, lora_r=4, lora_dropout=0.1)
    other = classification_job(tiny_bert, lora_r=16, learning_rate=1e-2)
    first = run(job)
    run(other)  # a different trial in between must leave no trace on the cached base model
    warm = run(job)
    worker_cache._BASE_MODELS.clear()
    worker_cache._DATASETS.clear()
    worker_cache._TOKENIZERS.clear()
    fresh = run(job)
    assert first == warm == fresh
    assert run(dataclasses.replace(job, seed=4)) != first, "the seed matters"


def test_the_first_report_holds_the_setup_time_and_a_warm_run_sets_up_faster(tiny_bert: Path) -> None:
    job = classification_job(tiny_bert)
    for cache in (worker_cache._BASE_MODELS, worker_cache._DATASETS, worker_cache._TOKENIZERS):
        cache.clear()  # a cold worker: the base model, tokenizer and data are loaded by the first run

    def setup_seconds() -> list:
        reports: list[dict] = []
        training.fine_tune(job, lambda step, metrics: reports.append(metrics))
        return [metrics.get("trial_setup_seconds") for metrics in reports]

    cold, warm = setup_seconds(), setup_seconds()
    assert cold[0] > 0 and cold[1:] == [None, None], "once, in the first report"
    assert warm[0] < cold[0] / 2, (cold[0], warm[0])


def test_causal_lm_on_the_shipped_text() -> None:
    sweep = Sweep(model="hpo/tiny-gpt2", task="causal_lm", train_data=str(SEARCH_SPACES / "data/text/corpus.txt"),
                  max_steps=30, eval_every=10, max_length=64)
    reports = run(TrainJob.from_sweep(sweep, {"learning_rate": 1e-2, "batch_size": 8}))
    losses = [metrics["eval_loss"] for _, metrics in reports]
    assert losses[-1] < losses[0], "LoRA on the tiny model learns"
    assert reports[-1][1]["eval_perplexity"] == pytest.approx(2.718281828 ** losses[-1], rel=1e-6)


@needs_shared_data
def test_causal_lm_on_tinyshakespeare(shared_data: Path) -> None:
    sweep = Sweep(model="hpo/tiny-gpt2", task="causal_lm", train_data=str(shared_data / "tinyshakespeare/input.txt"),
                  max_steps=10, eval_every=10, max_length=64, eval_batch_size=128, eval_fraction=0.02)
    reports = run(TrainJob.from_sweep(sweep, {"learning_rate": 1e-2, "batch_size": 8}))
    assert reports[-1][0] == 10 and reports[-1][1]["eval_loss"] > 0


def test_an_oom_halves_the_micro_batch_and_keeps_the_effective_batch(tiny_bert: Path, monkeypatch) -> None:
    """A real OOM can't be produced on this CPU: inject torch's OutOfMemoryError where the
    model runs, for any piece of more than 4 examples, and compare with the unsplit run."""
    import torch

    job = classification_job(tiny_bert, batch_size=16, lora_dropout=0.0)
    unsplit = run(job)
    calls: list[int] = []
    real_forward = training._forward

    def forward_with_small_memory(model, batch):
        calls.append(batch["labels"].shape[0])
        if batch["labels"].shape[0] > 4:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return real_forward(model, batch)

    monkeypatch.setattr(training, "_forward", forward_with_small_memory)
    split = run(job)
    assert calls[:4] == [16, 8, 4, 4], "halved twice, then four pieces of 4"
    assert all(metrics["micro_batch_size"] == 4 and metrics["grad_accum"] == 4 for _, metrics in split)
    assert all(metrics["micro_batch_size"] == 16 and metrics["grad_accum"] == 1 for _, metrics in unsplit)
    for (step_a, a), (step_b, b) in zip(unsplit, split, strict=True):
        assert step_a == step_b
        for key in ("train_loss", "eval_loss", "eval_accuracy"):
            assert b[key] == pytest.approx(a[key], abs=1e-5), key


def test_an_oom_with_one_example_is_an_error(tiny_bert: Path, monkeypatch) -> None:
    import torch

    def no_memory_at_all(model, batch):
        raise torch.OutOfMemoryError("out of memory (injected)")

    monkeypatch.setattr(training, "_forward", no_memory_at_all)
    with pytest.raises(torch.OutOfMemoryError):
        run(classification_job(tiny_bert, batch_size=4))
