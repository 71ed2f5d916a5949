"""hpo promote: the final run, a folder that loads back with plain peft/transformers and
gives the reported metrics, and a registered model version in MLflow linked to the trial."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch
from mlflow.tracking import MlflowClient

from hpo.train import data
from tests.conftest import SEARCH_SPACES, hpo_env, run_hpo

pytestmark = pytest.mark.slow
REVIEWS = SEARCH_SPACES / "data" / "reviews"


@pytest.fixture(scope="module")
def lora_study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cwd = tmp_path_factory.mktemp("promote")
    result = run_hpo(["search", str(SEARCH_SPACES / "lora.py"), "--trials", "3", "--set", "max_steps=20",
                      "--set", "eval_every=10", "--set", "objective=best"], cwd=cwd)
    assert result.returncode == 0, result.stdout + result.stderr
    return cwd


@torch.no_grad()
def accuracy_of_reloaded(folder: Path) -> tuple[float, float]:
    """Evaluate the saved folder with plain peft + transformers on the shipped eval set."""
    from peft import AutoPeftModelForSequenceClassification
    from transformers import AutoTokenizer

    model = AutoPeftModelForSequenceClassification.from_pretrained(str(folder)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    examples = data.read(str(REVIEWS / "eval.tsv"), "classification")
    correct, loss_sum = 0, 0.0
    for start in range(0, len(examples.texts), 32):
        texts = examples.texts[start : start + 32]
        labels = torch.tensor(examples.labels[start : start + 32])
        batch = tokenizer(texts, truncation=True, max_length=64, padding=True, return_tensors="pt")
        out = model(**batch, labels=labels)
        correct += (out.logits.argmax(-1) == labels).sum().item()
        loss_sum += out.loss.item() * len(texts)
    return correct / len(examples.texts), loss_sum / len(examples.texts)


def killed_promote_leaves_staging(cwd: Path, output: str) -> list[Path]:
    """Start a promote, kill -9 it once its staging folder exists; returns what it left."""
    process = subprocess.Popen([sys.executable, "-m", "hpo", "promote", "--output", output], cwd=cwd, env=hpo_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while not list(cwd.glob(f".{output}.promote-*")) and time.monotonic() < deadline:
        assert process.poll() is None, "the promote ended before its staging folder appeared"
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    return list(cwd.glob(f".{output}.promote-*"))


def test_promote_the_best_trial_reload_and_find_it_registered(lora_study: Path) -> None:
    folder = lora_study / "final"
    folder.mkdir()  # an existing empty --output: the finished model replaces it in one rename
    left = killed_promote_leaves_staging(lora_study, "final")
    assert len(left) == 1 and list(folder.iterdir()) == [], "the kill left staging beside an untouched output"
    live = lora_study / f".final.promote-{socket.gethostname()}-{os.getpid()}-beef"  # a live promote's
    live.mkdir()
    umask = os.umask(0o027)
    try:
        result = run_hpo(["promote", "--output", "final", "--set", "max_steps=40"], cwd=lora_study)
    finally:
        os.umask(umask)
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(lora_study.glob(".final.promote-*")) == [live], "the dead promote's staging was removed"
    live.rmdir()
    assert stat.S_IMODE(folder.stat().st_mode) == 0o750, "the folder's mode follows the umask"
    assert "AutoPeftModelForSequenceClassification.from_pretrained" in result.stdout
    assert str(folder) in result.stdout
    names = {p.name for p in folder.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "hpo_promote.json", "README.md"} <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pkl"))], "safetensors only"
    assert not [p for p in lora_study.iterdir() if p.name.startswith(".final")], "no staging folder left"

    record = json.loads((folder / "hpo_promote.json").read_text())
    study = optuna.load_study(study_name="lora", storage=f"sqlite:///{lora_study / 'hpo.db'}")
    assert record["trial"] == study.best_trial.number
    assert record["params"] == study.best_trial.user_attrs["config"]
    assert record["max_steps"] == 40
    # scaled to the final run (hpo.run.promote.final_schedule), judged by the study's metric
    assert (record["eval_every"], record["patience"], record["min_steps"], record["watch"]) == \
        (10, 2, 20, "eval_accuracy")
    assert record["objective"] == "best" and record["trial_best_step"] == study.best_trial.user_attrs["best_step"]
    assert not 0 < record["metrics"]["stopped_early_at"] < 20, "never before half of the steps"
    accuracy, loss = accuracy_of_reloaded(folder)
    assert accuracy == pytest.approx(record["metrics"]["eval_accuracy"], abs=1e-3)
    assert loss == pytest.approx(record["metrics"]["eval_loss"], abs=1e-3)

    client = MlflowClient(f"sqlite:///{lora_study / 'mlflow.db'}")
    versions = client.search_model_versions("name = 'lora'")
    assert len(versions) == 1
    version = versions[0]
    assert version.tags["hpo.trial_number"] == str(study.best_trial.number)
    run = client.get_run(version.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["hpo.role"] == "promote"
    assert run.data.tags["hpo.sweep_run_id"] == study.user_attrs["hpo"]["mlflow_parent_run_id"]
    trial_run = client.get_run(run.data.tags["hpo.trial_run_id"])
    assert trial_run.data.tags["hpo.trial_number"] == str(study.best_trial.number)
    history = client.get_metric_history(run.info.run_id, "eval_accuracy")
    assert history and all(m.step % 10 == 0 for m in history)
    losses = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "eval_loss")}
    best = max(history, key=lambda m: (m.value, -losses[m.step], -m.step))  # the metric, ties to the lower loss
    assert record["metrics"]["best_step"] == best.step, "the kept weights are those of the best eval_accuracy"
    assert record["metrics"]["eval_accuracy"] == pytest.approx(best.value, abs=1e-6)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "model")}
    assert "model/adapter_model.safetensors" in artifacts
    assert run.data.metrics["final_eval_accuracy"] == pytest.approx(record["metrics"]["eval_accuracy"])


def test_a_failing_mlflow_finish_never_hides_the_error(lora_study: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Training fails, then closing the MLflow run fails too (mocked: a fault not made here):
    the training error is the one raised, with MLflow's noted; nothing is left on disk."""
    from mlflow.exceptions import MlflowException
    from rich.console import Console

    from hpo.record.tracking import PromoteTracker
    from hpo.run import promote

    def fail_training(*args: object, **kwargs: object) -> None:
        raise RuntimeError("disk full while saving the adapter")

    def fail_finish(self: object, metrics: dict, status: str) -> None:
        raise MlflowException("tracking server went away")

    monkeypatch.chdir(lora_study)
    monkeypatch.setattr(promote, "_train_and_save", fail_training)
    monkeypatch.setattr(PromoteTracker, "finish", fail_finish)
    console = Console(record=True, width=200)
    with pytest.raises(RuntimeError, match="disk full while saving the adapter") as raised:
        promote.promote(promote.PromoteOptions(output="never"), console)
    assert any("tracking server went away" in note for note in raised.value.__notes__)
    assert "the MLflow run could not be closed as FAILED (MlflowException)" in console.export_text()
    assert not (lora_study / "never").exists() and not list(lora_study.glob(".never*"))


def test_promote_refuses_clearly(lora_study: Path) -> None:
    busy = lora_study / "busy"
    busy.mkdir(exist_ok=True)
    (busy / "x.txt").write_text("keep me")
    result = run_hpo(["promote", "--output", "busy"], cwd=lora_study)
    assert result.returncode == 2 and "the folder exists and is not empty" in result.stderr
    assert (busy / "x.txt").read_text() == "keep me"
    result = run_hpo(["promote", "--trial", "99"], cwd=lora_study)
    assert result.returncode == 2 and "--trial 99: study 'lora' has trials 0..2" in result.stderr
    result = run_hpo(["promote", "--set", "max_steps=-1"], cwd=lora_study)
    assert result.returncode == 2 and "max_steps=-1" in result.stderr


def test_promote_checks_test_data_before_training(lora_study: Path) -> None:
    """A missing or unreadable test_data is refused in one line naming test_data before any
    training starts: no MLflow run, no output, no staging folder."""
    client = MlflowClient(f"sqlite:///{lora_study / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("lora").experiment_id
    runs_before = len(client.search_runs([experiment]))
    (lora_study / "bad-labels.tsv").write_text("label\tsentence\npositive\tgreat film\n")
    for test_data, said in (("missing.tsv", "no such file"), ("bad-labels.tsv", "is not an integer")):
        started = time.monotonic()
        result = run_hpo(["promote", "--output", "never", "--set", f"test_data={test_data}"], cwd=lora_study)
        assert result.returncode == 2, result.stdout + result.stderr
        assert result.stderr.startswith("error: hpo promote: test_data: ") and said in result.stderr, result.stderr
        assert result.stderr.count("\n") == 1 and "train_data/eval_data" not in result.stderr
        assert "training" not in result.stdout, "refused before training"
        print(f"{test_data}: refused after {time.monotonic() - started:.1f} s")
    assert len(client.search_runs([experiment])) == runs_before, "no promote run was started"
    assert not (lora_study / "never").exists() and not list(lora_study.glob(".never*"))


def test_promote_a_causal_lm_merged_and_reproducibly(tmp_path: Path) -> None:
    search = run_hpo(["search", str(SEARCH_SPACES / "causal_lm_lora.py"), "--trials", "2", "--set", "max_steps=10",
                      "--set", "eval_every=5", "--set", "max_length=64", "--set", "pruner=none"], cwd=tmp_path)
    assert search.returncode == 0, search.stdout + search.stderr
    runs = {}
    for name, extra in (("a", []), ("b", []), ("c", ["--seed", "7"])):
        result = run_hpo(["promote", "--output", name, "--merge", "--set", "max_steps=6", *extra], cwd=tmp_path)
        assert result.returncode == 0, result.stdout + result.stderr
        runs[name] = json.loads((tmp_path / name / "hpo_promote.json").read_text())["metrics"]
    assert runs["a"]["eval_loss"] == runs["b"]["eval_loss"], "same trial, same seed: same model"
    assert runs["a"]["eval_loss"] != runs["c"]["eval_loss"], "--seed changes the run"

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "a")).eval()
    assert "model.safetensors" in {p.name for p in (tmp_path / "a").iterdir()}
    assert not any("lora" in name for name, _ in model.named_parameters()), "merged: a plain model"
    versions = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").search_model_versions("name = 'causal_lm_lora'")
    assert sorted(int(v.version) for v in versions) == [1, 2, 3]


def test_promote_needs_a_complete_built_in_trial(tmp_path: Path) -> None:
    module = tmp_path / "custom.py"
    module.write_text("import hpo\nsweep = hpo.Sweep(metric='score', direction='maximize', trials=1, max_steps=1,"
                      " eval_every=1)\ndef space(trial):\n    return {'x': trial.suggest_float('x', 0, 1)}\n"
                      "def train(params, report):\n    report(1, {'score': params['x']})\n")
    assert run_hpo(["search", str(module)], cwd=tmp_path).returncode == 0
    result = run_hpo(["promote", "--study", "custom"], cwd=tmp_path)
    assert result.returncode == 2
    assert "trained with the module's own train(params, report)" in result.stderr
    assert "Traceback" not in result.stderr
