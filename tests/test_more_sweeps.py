"""Sweeps beyond the default: a causal LM on tinyshakespeare, and data given on the command line."""

from __future__ import annotations

import random
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from tests.conftest import SEARCH_SPACES, needs_shared_data, run_hpo

pytestmark = pytest.mark.slow


@needs_shared_data
def test_causal_lm_sweep_on_tinyshakespeare(tmp_path: Path, shared_data: Path) -> None:
    result = run_hpo(["search", str(SEARCH_SPACES / "causal_lm_lora.py"), "--trials", "3",
                      "--set", f"train_data={shared_data / 'tinyshakespeare/input.txt'}",
                      "--set", "max_steps=20", "--set", "eval_every=10", "--set", "max_length=64",
                      # 2% of the text (22 KB) held out: each evaluation costs a fifth of the default 10%'s
                      "--set", "eval_fraction=0.02"], cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    study = optuna.load_study(study_name="causal_lm_lora", storage=f"sqlite:///{tmp_path / 'hpo.db'}")
    assert study.direction == optuna.study.StudyDirection.MINIMIZE
    trials = study.get_trials()
    assert len(trials) == 3 and {t.state for t in trials} <= {TrialState.COMPLETE, TrialState.PRUNED}
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert complete, "ASHA lets the first trial run to the end"
    assert all(t.value > 0 for t in complete)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("causal_lm_lora").experiment_id],
                              filter_string="tags.`hpo.role` = 'trial'")
    assert len(runs) == 3 and all("eval_perplexity" in r.data.metrics for r in runs)


@needs_shared_data
def test_headerless_data_given_with_set(tmp_path: Path, shared_data: Path, tiny_bert: Path) -> None:
    """SST-2 rows rewritten as headerless CSV, text first: columns found, sweep runs."""
    rows = (shared_data / "sst2/train.tsv").read_text().splitlines()[1:]
    random.Random(0).shuffle(rows)

    def write(name: str, chosen: list[str]) -> Path:
        path = tmp_path / name
        with path.open("w") as handle:
            for row in chosen:
                label, text = row.split("\t", 1)
                handle.write('"' + text.replace('"', '""') + f'",{label}\n')
        return path

    train, evaluation = write("train.csv", rows[:400]), write("dev.csv", rows[400:500])
    result = run_hpo(["search", str(SEARCH_SPACES / "lora.py"), "--trials", "2", "--study", "sst2",
                      "--set", f"model={tiny_bert}", "--set", f"train_data={train}", "--set", f"eval_data={evaluation}",
                      "--set", "max_steps=6", "--set", "eval_every=3"], cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    study = optuna.load_study(study_name="sst2", storage=f"sqlite:///{tmp_path / 'hpo.db'}")
    assert len(study.get_trials()) == 2
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.get_trials())
