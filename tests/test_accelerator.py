"""Device, precision and memory of the recipe on a CPU (GPU facts mocked: there is no GPU
here), the checked report contract, and bad accelerator settings refused before a trial."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from hpo import HpoError, Report, ReportError, Sweep
from hpo.config import parse_overrides
from hpo.run import trial as protocol
from hpo.run.trial import call_train
from hpo.train import accelerator, training
from hpo.train.recipe import TrainJob
from hpo.train.reporter import NonFiniteMetric, is_reserved
from tests.conftest import SEARCH_SPACES, run_hpo

REVIEWS = SEARCH_SPACES / "data" / "reviews"
REAL_FORWARD = training._forward


def job(model: Path, **fields) -> TrainJob:
    sweep = Sweep(model=str(model), train_data=str(REVIEWS / "train.tsv"), eval_data=str(REVIEWS / "eval.tsv"),
                  max_steps=6, eval_every=3, max_length=32, seed=3, **fields)
    return TrainJob.from_sweep(sweep, {"learning_rate": 3e-3, "batch_size": 8, "lora_dropout": 0.0})


H100 = accelerator.DeviceFacts("cuda", 0, "NVIDIA H100 80GB HBM3", (9, 0), visible=1)
A100 = accelerator.DeviceFacts("cuda", 0, "NVIDIA A100-SXM4-40GB", (8, 0), visible=1)
T4 = accelerator.DeviceFacts("cuda", 0, "Tesla T4", (7, 5), visible=1)
V100 = accelerator.DeviceFacts("cuda", 0, "Tesla V100-SXM2-16GB", (7, 0), visible=1)
CPU = accelerator.DeviceFacts("cpu")


# device and precision ------------------------------------------------------------------
def test_device_auto_is_the_cpu_here_and_explicit_devices_are_kept() -> None:
    assert not torch.cuda.is_available()
    assert accelerator.resolve_device("auto") == torch.device("cpu")
    assert accelerator.resolve_device("cpu") == torch.device("cpu")
    assert accelerator.resolve_device("cuda:1") == torch.device("cuda", 1)
    assert accelerator.resolved("auto", "auto") == {"device": "cpu", "precision": "fp32"}
    assert accelerator.resolve_precision("bf16", torch.device("cpu")) == "bf16"
    assert accelerator.facts(torch.device("cpu")) == CPU


def test_precision_auto_is_bf16_only_where_the_card_has_it_natively() -> None:
    """torch.cuda.is_bf16_supported() says yes on a T4 or V100 (emulated bf16, slower than
    fp32); the choice is made on the compute capability instead (8.0 and later)."""
    assert [accelerator.choose_precision("auto", d) for d in (H100, A100, T4, V100, CPU)] == \
        ["bf16", "bf16", "fp32", "fp32", "fp32"]
    assert accelerator.choose_precision("fp16", T4) == "fp16" and accelerator.choose_precision("bf16", H100) == "bf16"
    assert (H100.native_bf16, A100.native_bf16, T4.native_bf16, CPU.native_bf16) == (True, True, False, False)
    assert accelerator.DeviceFacts("mps").native_bf16


def test_qlora_computes_in_bf16_only_where_native_else_fp16() -> None:
    assert accelerator.quantization_compute_dtype("auto", H100) == torch.bfloat16
    assert accelerator.quantization_compute_dtype("bf16", A100) == torch.bfloat16
    assert accelerator.quantization_compute_dtype("fp32", A100) == torch.bfloat16
    assert accelerator.quantization_compute_dtype("fp16", H100) == torch.float16
    for precision in ("auto", "fp32"):
        assert accelerator.quantization_compute_dtype(precision, T4) == torch.float16
        assert accelerator.quantization_compute_dtype(precision, V100) == torch.float16


def test_tf32_and_the_shared_gpu_memory_cap_follow_the_device() -> None:
    assert accelerator.allow_tf32(A100, "fp32") and accelerator.allow_tf32(H100, "fp32")
    assert not accelerator.allow_tf32(T4, "fp32") and not accelerator.allow_tf32(A100, "bf16")
    assert not accelerator.allow_tf32(CPU, "fp32")
    assert accelerator.memory_fraction(0.5) == 0.5 and accelerator.memory_fraction(0.25) == 0.25
    assert accelerator.memory_fraction(1) is None and accelerator.memory_fraction(0) is None
    assert accelerator.memory_fraction(2) is None
    assert TrainJob.from_sweep(Sweep(gpus_per_trial=0.5), {}).gpu_share == 0.5
    assert TrainJob.from_sweep(Sweep(workers_per_trial=2, gpus_per_trial=2), {}).gpu_share == 1


def test_what_a_worker_cannot_run_is_one_line_each() -> None:
    assert accelerator.problems("auto", "bf16", "none") == []  # bf16 autocast runs on a CPU
    (no_cuda,) = accelerator.problems("cuda", "auto", "none")
    assert "device='cuda'" in no_cuda and "gpus_per_trial" in no_cuda
    (no_bnb,) = accelerator.problems("auto", "auto", "4bit")  # bitsandbytes is not installed here
    assert "quantization='4bit'" in no_bnb and "pip install bitsandbytes" in no_bnb and "\n" not in no_bnb
    (old_gpu,) = accelerator.problems_of(T4, "auto", "bf16", "none", bitsandbytes=True)
    assert "precision='bf16'" in old_gpu and "Tesla T4" in old_gpu and "7.5" in old_gpu
    assert "--set precision=fp16" in old_gpu and "\n" not in old_gpu
    assert accelerator.problems_of(V100, "auto", "bf16", "none", bitsandbytes=True)
    assert accelerator.problems_of(A100, "auto", "bf16", "none", bitsandbytes=True) == []
    assert accelerator.problems_of(T4, "auto", "fp16", "none", bitsandbytes=False) == []
    assert accelerator.problems_of(T4, "auto", "fp16", "8bit", bitsandbytes=True) == []
    (cpu_4bit,) = accelerator.problems_of(CPU, "cpu", "auto", "4bit", bitsandbytes=True)
    assert "needs a CUDA GPU" in cpu_4bit


def test_cuda_n_beyond_the_devices_a_worker_sees_is_refused() -> None:
    """Ray shows a trial its GPUs as cuda:0..K-1; cuda:1 on a one-GPU worker would fail at model.to."""
    beyond = accelerator.DeviceFacts("cuda", 1, visible=1)
    (line,) = accelerator.problems_of(beyond, "cuda:1", "auto", "none", bitsandbytes=True)
    assert "device='cuda:1'" in line and "sees 1 CUDA device" in line and "--set device=cuda" in line
    assert "\n" not in line
    two = accelerator.DeviceFacts("cuda", 1, "NVIDIA H100", (9, 0), visible=2)
    assert accelerator.problems_of(two, "cuda:1", "auto", "none", bitsandbytes=True) == []


def test_sweep_fields_are_checked_and_settable() -> None:
    values = parse_overrides(["gradient_checkpointing=yes", "precision=bf16", "quantization=4bit", "device=cuda:1",
                              "attn_implementation=eager"])
    assert values == {"gradient_checkpointing": True, "precision": "bf16", "quantization": "4bit",
                      "device": "cuda:1", "attn_implementation": "eager"}
    assert parse_overrides(["gradient_checkpointing=0"]) == {"gradient_checkpointing": False}
    with pytest.raises(HpoError, match=r"--set gradient_checkpointing=maybe: must be true or false"):
        parse_overrides(["gradient_checkpointing=maybe"])
    with pytest.raises(HpoError, match=r"--set precision=fp8: must be one of auto, bf16, fp16, fp32"):
        parse_overrides(["precision=fp8"])
    with pytest.raises(HpoError, match=r"sweep field device='tpu' must be auto, cpu, cuda, cuda:N or mps"):
        Sweep(device="tpu")
    with pytest.raises(HpoError, match=r"sweep field device='cuda' needs a GPU reserved .* gpus_per_trial=1"):
        Sweep(device="cuda")
    with pytest.raises(HpoError, match=r"sweep field quantization='4bit' needs a CUDA GPU"):
        Sweep(device="cpu", quantization="4bit")
    job = TrainJob.from_sweep(Sweep(device="cuda:0", gpus_per_trial=0.5, precision="bf16",
                                    gradient_checkpointing=True), {})
    assert (job.device, job.precision, job.gradient_checkpointing, job.quantization, job.attn_implementation) == \
        ("cuda:0", "bf16", True, "none", "sdpa")
    described = job.describe()
    assert described["warmup_ratio"] == 0.0 and described["max_grad_norm"] == 1.0
    assert described["gradient_checkpointing"] is True and "device" not in described  # the worker reports it


# the recipe in bf16, fp16, with checkpointing ----------------------------------------------
def dtypes_seen(model: Path, monkeypatch, **fields) -> tuple[list[dict], set[torch.dtype], dict]:
    """Run the recipe; the dtypes of the base's Linear outputs in training forward passes."""
    seen: set[torch.dtype] = set()

    def forward(model, batch):
        handles = [m.register_forward_hook(lambda m, i, out: seen.add(out.dtype))
                   for m in model.modules() if isinstance(m, torch.nn.Linear)]
        try:
            return REAL_FORWARD(model, batch)
        finally:
            for handle in handles:
                handle.remove()

    monkeypatch.setattr(training, "_forward", forward)
    reports: list[dict] = []
    settings: dict = {}
    training.fine_tune(job(model, **fields), lambda step, m: reports.append(m), on_start=settings.update)
    return reports, seen, settings


def test_bf16_autocast_runs_the_forward_in_bf16_on_a_cpu_and_trains(tiny_bert: Path, monkeypatch) -> None:
    fp32, seen32, _ = dtypes_seen(tiny_bert, monkeypatch, precision="fp32")
    bf16, seen16, settings = dtypes_seen(tiny_bert, monkeypatch, precision="bf16")
    assert seen32 == {torch.float32} and torch.bfloat16 in seen16
    assert settings["precision"] == "bf16" and settings["device"] == "cpu"
    base = training._BASE_MODELS[next(k for k in training._BASE_MODELS if k[0] == str(tiny_bert) and k[4] == "bf16")]
    assert base.bert.embeddings.word_embeddings.weight.dtype == torch.bfloat16, "the frozen base is stored in bf16"
    assert all(math.isfinite(r["train_loss"]) for r in bf16)
    for low, full in zip(bf16, fp32, strict=True):  # the same run, in lower precision
        assert low["eval_loss"] == pytest.approx(full["eval_loss"], abs=0.02)
    assert bf16[-1]["peak_memory_mb"] >= bf16[-1]["resident_memory_mb"] > 50


def test_fp16_scales_the_loss_with_a_grad_scaler(tiny_bert: Path, monkeypatch) -> None:
    """fp16 runs on a CPU too (slower than fp32 there: useful for tests, not for work)."""
    scalers: list = []
    original = accelerator.grad_scaler

    def spy(device, precision):
        scalers.append(original(device, precision))
        return scalers[-1]

    assert original(torch.device("cpu"), "bf16") is None
    monkeypatch.setattr(accelerator, "grad_scaler", spy)
    reports, seen, settings = dtypes_seen(tiny_bert, monkeypatch, precision="fp16")
    assert settings["precision"] == "fp16" and torch.float16 in seen
    (scaler,) = scalers
    assert isinstance(scaler, torch.amp.GradScaler) and scaler.is_enabled()
    assert scaler.get_scale() > 1 and scaler._growth_tracker == 6, "six unskipped steps under loss scaling"
    assert all(math.isfinite(r["eval_loss"]) for r in reports)


def test_gradient_checkpointing_recomputes_and_gives_the_same_loss(tiny_bert: Path) -> None:
    runs = {}
    for enabled in (False, True):
        calls = {"layer": 0, "checkpointing": None}

        def on_trained(model, tokenizer, calls=calls):
            calls["checkpointing"] = model.base_model.model.is_activation_checkpointing

        reports: list[dict] = []
        this = job(tiny_bert, gradient_checkpointing=enabled)
        base = training._base_model(this, 2, training._tokenizer(this.model), torch.device("cpu"), "fp32")
        inner = base.bert.encoder.layer[0].intermediate  # hooks inside a checkpointed layer see the recompute
        handle = inner.register_forward_hook(lambda *a, calls=calls: calls.__setitem__("layer", calls["layer"] + 1))
        try:
            training.fine_tune(this, lambda step, m, reports=reports: reports.append(m), on_trained=on_trained)
        finally:
            handle.remove()
        runs[enabled] = (reports, calls)
    (plain, plain_calls), (checkpointed, checkpointed_calls) = runs[False], runs[True]
    assert plain_calls["checkpointing"] is False and checkpointed_calls["checkpointing"] is True
    evaluations = plain_calls["layer"] - 6  # 6 training forwards, the rest evaluation
    assert checkpointed_calls["layer"] == plain_calls["layer"] + 6, "each training step recomputes the layer"
    assert evaluations > 0
    for a, b in zip(plain, checkpointed, strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5)
        assert b["eval_loss"] == pytest.approx(a["eval_loss"], rel=1e-5)


# the report contract ---------------------------------------------------------------------
def test_report_checks_every_call() -> None:
    sunk: list = []
    report = Report("score", lambda step, values: sunk.append((step, values)))
    report(1, {"score": 0.5, "n": 3})
    assert sunk == [(1, {"score": 0.5, "n": 3.0})] and report.last_step == 1
    for step, metrics, message in [
        (1, {"score": 1}, r"step must be an int greater than the last \(1\)"),
        (2.0, {"score": 1}, r"step must be an int"),
        (2, {"loss": 1}, r"got no 'score' \(the sweep's metric\)"),
        (2, {"score": 1, "step": 2}, r"'step' are reserved"),
        (2, {"score": 1, "time_total_s": 2, "config/x": 1}, r"'config/x', 'time_total_s' are reserved"),
        (2, {"score": 1, "hpo_error": 1}, r"'hpo_error' are reserved"),
        (2, {"score": "high"}, r"score='high' is a str; metric values must be numbers"),
        (2, {"score": True}, r"score=True is a bool"),
        (2, [("score", 1)], r"metrics must be a dict"),
    ]:
        with pytest.raises(ReportError, match=message):
            report(step, metrics)
    assert len(sunk) == 1, "a rejected call reaches nobody"
    with pytest.raises(NonFiniteMetric, match="train_loss is nan at step 2"):
        report(2, {"score": 1.0, "train_loss": float("nan")})
    assert sunk[-1][0] == 2 and math.isnan(sunk[-1][1]["train_loss"]), "the diverged value is still recorded"
    assert all(is_reserved(key) for key in TUNE_RESULT_KEYS), "every key Tune adds to a result is reserved"
    result = {**dict.fromkeys(TUNE_RESULT_KEYS, 1), "config/x": 1.0, "hpo_info/trainable_params": 7,
              protocol.HELD_KEY: "[]", protocol.TIME_KEY: 2.0, "score": 0.5, "eval_loss": 1}
    assert protocol.metrics(result) == {"score": 0.5, "eval_loss": 1}, "only the trial's own metrics are left"


# What Tune adds to a function trainable's result (Ray 2.60): trial.metrics sets them aside.
TUNE_RESULT_KEYS = {"step", "done", "trial_id", "training_iteration", "time_this_iter_s", "time_total_s", "timestamp",
                    "time_since_restore", "iterations_since_restore", "pid", "hostname", "node_ip", "date",
                    "experiment_tag", "checkpoint_dir_name", "should_checkpoint"}


def test_a_modules_train_gets_the_sweep_when_it_asks() -> None:
    sweep = Sweep(extra={"a": 1})
    got: list = []
    call_train(lambda params, report: got.append(2), {}, None, sweep)
    call_train(lambda params, report, sweep: got.append(sweep.extra["a"]), {}, None, sweep)
    call_train(lambda params, report, *, sweep=None: got.append(sweep is not None), {}, None, sweep)
    call_train(lambda *args: got.append(len(args)), {}, None, sweep)
    assert got == [2, 1, True, 3]


# refused before any trial, through the CLI -------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize(("flags", "message"), [
    (["--set", "gpus_per_trial=1"], "error: sweep field gpus_per_trial=1: no node of the Ray cluster has that many "
                                    "(it has 0 GPU, "),
    (["--set", "quantization=4bit"], "error: sweep field quantization='4bit' needs the bitsandbytes package"),
])
def test_what_no_worker_can_run_is_refused_before_anything_is_written(tmp_path: Path, flags, message) -> None:
    result = run_hpo(["search", str(SEARCH_SPACES / "lora.py"), "--skip-data-check", *flags], cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "no hpo.db, no mlflow.db, no .hpo"


def test_a_static_mistake_is_refused_without_starting_ray(tmp_path: Path) -> None:
    result = run_hpo(["search", str(SEARCH_SPACES / "lora.py"), "--set", "device=cuda"], cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {SEARCH_SPACES / 'lora.py'}: sweep field device='cuda' needs a GPU reserved for each trial: "
        "--set gpus_per_trial=1 (or 0.5 to share one), or --set device=auto (fix it in the module or with --set "
        "device=...)"]
    assert list(tmp_path.iterdir()) == []
