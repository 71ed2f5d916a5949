"""Task sft end to end: the real SmolLM2 GGUF converted once into a cached safetensors
folder, a sweep on Ray with the tiny llama, and ``hpo promote`` of that study."""

from __future__ import annotations

import json
import time
from pathlib import Path

import optuna
import pytest
import torch

from hpo.train import models
from tests.conftest import run_hpo
from tests.test_sft import DATES, write_module

pytestmark = pytest.mark.slow


def test_the_gguf_is_converted_once_into_a_plain_safetensors_folder(tmp_path: Path, monkeypatch) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("HPO_CACHE", str(tmp_path / "cache"))
    started = time.perf_counter()
    folder = Path(models.resolve(models.SMOLLM2_ALIAS))
    converting = time.perf_counter() - started
    started = time.perf_counter()
    assert models.resolve(models.SMOLLM2) == str(folder)  # the hub id, offline, is the same folder
    assert time.perf_counter() - started < 1.0, "the second resolve is a cache hit"
    print(f"GGUF conversion: {converting:.1f} s")
    assert folder.parent == tmp_path / "cache" / "models"
    assert [p.name for p in folder.parent.iterdir() if p.is_dir()] == [folder.name], "no staging folder left"
    names = {p.name for p in folder.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "chat_template.jinja"} <= names
    assert not [n for n in names if n.endswith((".gguf", ".bin", ".pt"))], "safetensors only"
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


@pytest.fixture(scope="module")
def sft_study(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    cwd = tmp_path_factory.mktemp("sft-sweep")
    retain = cwd / "retain.jsonl"  # four eval conversations stand in for general ones
    retain.write_text("".join((DATES / "eval.jsonl").read_text().splitlines(keepends=True)[:4]))
    checks = f'answer_format=r"\\d{{4}}-\\d{{2}}-\\d{{2}}", retain_data={str(retain)!r}'
    module = write_module(cwd, tiny_llama, DATES / "train.jsonl", score=True, extra=checks)
    # the memory-lean loss chosen on the command line (tests/test_lean_loss.py: the plain loss's gradients)
    result = run_hpo(["search", str(module), "--set", "lean_loss=chunked"], cwd=cwd)
    assert result.returncode == 0, result.stdout + result.stderr
    return cwd


def test_an_sft_sweep_on_ray_records_the_generation_scores(sft_study: Path) -> None:
    study = optuna.load_study(study_name="tiny_sft", storage=f"sqlite:///{sft_study / 'hpo.db'}")
    trials = study.get_trials()
    states = {t.state for t in trials}
    assert len(trials) == 3 and states <= {optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED}
    assert optuna.trial.TrialState.COMPLETE in states
    for trial in trials:
        assert trial.user_attrs["lean_loss"] == "chunked"
        curves = trial.user_attrs["curves"]
        steps = sorted(trial.intermediate_values)
        assert steps and [step for step, _ in curves["eval_exact_match"]] == steps
        assert all(0.0 <= value <= 1.0 for _, value in curves["eval_exact_match"])
        assert [(step, value) for step, value in curves["eval_score"]] == [(step, 0.25) for step in steps]  # the module's score
        assert curves["eval_perplexity"] and curves["eval_loss"]


def test_diagnose_finds_that_the_random_model_never_stops_with_its_numbers(sft_study: Path) -> None:
    """A random tiny model never says the end token (it repeats the prompt's last one, a
    newline): each trial's answers are unfinished, looping and in the wrong format, and hpo
    diagnose says so with the recorded numbers; the steps' loss and gradient norm and the
    retain set's scores are recorded too."""
    study = optuna.load_study(study_name="tiny_sft", storage=f"sqlite:///{sft_study / 'hpo.db'}")
    result = run_hpo(["diagnose", "--json"], cwd=sft_study)
    assert result.returncode == 0, result.stderr
    findings = {entry["number"]: {f["kind"]: f["evidence"] for f in entry["findings"]}
                for entry in json.loads(result.stdout)["trials"]}
    for trial in study.get_trials():
        curves = trial.user_attrs["curves"]
        assert {"train_loss_max", "grad_norm", "grad_norm_max", "eval_unfinished", "eval_repetition", "eval_format_fail",
                "eval_score_fail", "retain_loss", "retain_score", "retain_loss_before", "retain_score_before"} <= set(curves)
        last = {name: points[-1][1] for name, points in curves.items()}
        assert findings[trial.number]["never_stops"]["eval_unfinished"] == last["eval_unfinished"] == 1.0
        assert findings[trial.number]["wrong_format"]["eval_format_fail"] == last["eval_format_fail"] == 1.0
        assert findings[trial.number]["repeats"]["eval_repetition"] == last["eval_repetition"] > 0.5
        assert last["eval_score_fail"] == 0.0  # the module's score gives every answer 0.25
    table = run_hpo(["diagnose"], cwd=sft_study)
    assert "never_stops" in table.stdout and "max_new_tokens" in table.stdout


def test_promote_an_sft_study_adapter_and_merged(sft_study: Path, tiny_llama: Path) -> None:
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    answers = {}
    for name, extra in (("adapter", []), ("merged", ["--merge"])):
        result = run_hpo(["promote", "--output", name, "--set", "max_steps=4", *extra], cwd=sft_study)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "apply_chat_template" in result.stdout and "model.generate(" in result.stdout
        folder = sft_study / name
        names = {p.name for p in folder.iterdir()}
        weights = "adapter_model.safetensors" if name == "adapter" else "model.safetensors"
        assert {weights, "tokenizer.json", "chat_template.jinja", "hpo_promote.json"} <= names
        record = json.loads((folder / "hpo_promote.json").read_text())
        assert record["task"] == "sft" and "eval_exact_match" in record["metrics"]
        assert record["metrics"]["eval_score"] == 0.25

        tokenizer = AutoTokenizer.from_pretrained(folder)
        assert tokenizer.chat_template == AutoTokenizer.from_pretrained(tiny_llama).chat_template
        loader = AutoPeftModelForCausalLM if name == "adapter" else AutoModelForCausalLM
        model = loader.from_pretrained(str(folder)).eval()
        inputs = tokenizer.apply_chat_template([{"role": "user", "content": "Write the date May 1, 2020 as YYYY-MM-DD."}],
                                               add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=6, do_sample=False)
        assert output.shape[1] > inputs["input_ids"].shape[1]
        answers[name] = output[0, inputs["input_ids"].shape[1]:].tolist()
    assert answers["adapter"] == answers["merged"]  # same training, same seed: merging changes nothing
