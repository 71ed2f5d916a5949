"""Wrong labels: the quick probe (frozen MiniLM embeddings + TF-IDF, k-fold logistic regression,
cleanlab) finds planted label flips; ``hpo check-data --labels`` shows them, writes the CSV, the
clean or relabelled copy and the MLflow artifact, and refuses bad requests before any work."""

from __future__ import annotations

import csv
import random
import time
from pathlib import Path

import pytest

from hpo.analysis.label_issues import check_labels
from tests.conftest import SHARED_DATA, needs_shared_data, run_hpo

POSITIVE = ("a wonderful, moving film", "great acting and a lovely story", "i loved every minute of it",
            "brilliant, funny and warm", "a delightful treat", "superb direction and a terrific cast",
            "charming and beautifully made", "an excellent, joyful movie")
NEGATIVE = ("a dull, tedious mess", "awful acting and a boring story", "i hated every minute of it",
            "stupid, lazy and cold", "a dreadful bore", "clumsy direction and a terrible cast",
            "ugly and badly made", "a worthless, miserable movie")


def _small_file(path: Path, flipped: set[int]) -> Path:
    """80 rows: eight clear positive and eight clear negative phrasings, five topics each;
    the 0-based rows in ``flipped`` carry the wrong label."""
    rows = []
    for i in range(80):
        label = i % 2
        text = (POSITIVE if label else NEGATIVE)[(i // 2) % 8] + f" about the {('war', 'city', 'sea', 'farm', 'school')[i % 5]}"
        rows.append((1 - label if i in flipped else label, text))
    path.write_text("label\ttext\n" + "".join(f"{label}\t{text}\n" for label, text in rows))
    return path


@needs_shared_data
def test_quick_probe_finds_flipped_sst2_labels(tmp_path: Path) -> None:
    """2,000 SST-2 rows with 5% of labels flipped at random: at least 40% of the top k suspects
    (k = rows flipped) are flipped rows (issue 20's target; measured 0.46 here)."""
    assert SHARED_DATA is not None
    rows = [line.rstrip("\n").split("\t") for line in (SHARED_DATA / "sst2" / "train.tsv").open()][1:]
    rng = random.Random(0)
    sample = rng.sample(rows, 2000)
    flipped = set(rng.sample(range(2000), 100))
    noisy = tmp_path / "noisy.tsv"
    noisy.write_text("label\tsentence\n" + "".join(
        f"{1 - int(label) if i in flipped else label}\t{text}\n" for i, (label, text) in enumerate(sample)))
    started = time.perf_counter()
    found = check_labels(str(noisy), None, model="sentence-transformers/all-MiniLM-L6-v2")
    seconds = time.perf_counter() - started
    top = {s.row - 1 for s in found.suspects[:len(flipped)]}
    flagged = {s.row - 1 for s in found.suspects}
    precision_at_k = len(top & flipped) / len(flipped)
    print(f"quick probe: precision@k {precision_at_k:.2f}, flagged {len(flagged)}, precision "
          f"{len(flagged & flipped) / len(flagged):.2f}, recall {len(flagged & flipped) / len(flipped):.2f}, "
          f"accuracy {found.accuracy:.3f}, {seconds:.0f} s")
    assert precision_at_k >= 0.4
    assert len(flagged & flipped) / len(flipped) >= 0.6  # the flagged set holds most flips (0.69 measured)
    suspect = found.suspects[0]
    assert suspect.suggested_label != suspect.given_label and suspect.confidence > 0.5
    assert suspect.text == sample[suspect.row - 1][1]


def test_check_data_labels_table_csv_clean_copy_and_mlflow(tmp_path: Path) -> None:
    flipped = {3, 20, 41, 66}
    data = _small_file(tmp_path / "reviews.tsv", flipped)
    original = data.read_text()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = run_hpo(["check-data", "--set", f"train_data={data}", "--set", "eval_fraction=0.2", "--no-tokenizer",
                      "--labels", "--write-clean", str(tmp_path / "clean.tsv"), "--tracking-uri", uri], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "label check (quick probe, 80 rows" in result.stdout
    with (tmp_path / ".hpo" / "checks" / "reviews" / "label_issues.csv").open() as handle:
        suspects = list(csv.DictReader(handle))
    assert list(suspects[0]) == ["rank", "source", "row", "given_label", "suggested_label", "confidence",
                                 "label_quality", "text"]
    assert {int(s["row"]) - 1 for s in suspects[:len(flipped)]} == flipped
    for s in suspects[:len(flipped)]:
        assert int(s["suggested_label"]) == 1 - int(s["given_label"])
    dropped = {int(s["row"]) for s in suspects}
    clean = (tmp_path / "clean.tsv").read_text().splitlines()
    assert clean[0] == "label\ttext" and len(clean) == 1 + 80 - len(dropped)
    assert f"with {len(dropped)} suspect rows left out" in result.stdout
    assert data.read_text() == original  # the original is never touched

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    run_id = result.stdout.split("logged to MLflow run ")[1].split()[0]
    assert client.get_run(run_id).info.run_name == "check-data"
    assert {a.path for a in client.list_artifacts(run_id, "checks")} == {"checks/label_issues.csv",
                                                                         "checks/checks.json"}

    relabelled = run_hpo(["check-data", "--set", f"train_data={data}", "--no-tokenizer", "--labels", "--json",
                          "--write-clean", str(tmp_path / "relabelled.tsv"), "--relabel"], tmp_path)
    assert relabelled.returncode == 0, relabelled.stderr
    rows = [line.split("\t") for line in (tmp_path / "relabelled.tsv").read_text().splitlines()[1:]]
    assert len(rows) == 80
    for number in flipped:
        assert int(rows[number][0]) == number % 2  # the flipped rows carry their true label again


@pytest.mark.parametrize(("args", "message"), [
    (["--labels", "--write-clean", "SELF"], "that is a data file itself; the original is never overwritten"),
    (["--labels", "--write-clean", "clean.parquet"], "name a .tsv, .csv or .jsonl file"),
    (["--labels", "--relabel"], "--relabel: give --write-clean FILE"),
    (["--write-clean", "clean.tsv"], "--write-clean and --relabel need --labels"),
])
def test_bad_label_requests_fail_in_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    data = _small_file(tmp_path / "reviews.tsv", set())
    original = data.read_text()
    args = [str(data) if a == "SELF" else a for a in args]
    result = run_hpo(["check-data", "--set", f"train_data={data}", "--no-tokenizer", *args], tmp_path)
    assert result.returncode == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert data.read_text() == original and not (tmp_path / ".hpo").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reviews.tsv"]


def test_labels_need_classification(tmp_path: Path) -> None:
    text = tmp_path / "book.txt"
    text.write_text("Some text to model.\n\n" * 50)
    result = run_hpo(["check-data", "--set", f"train_data={text}", "--set", "task=causal_lm", "--no-tokenizer",
                      "--labels"], tmp_path)
    assert result.returncode == 2
    assert "task is 'causal_lm'; wrong labels are looked for in classification data only" in result.stderr


def _recorded_study(tmp_path: Path, data: Path, model: Path, *, complete: bool = True) -> str:
    """A real SQLite study as `hpo search` leaves it: the sweep record and one best trial."""
    import dataclasses

    import optuna

    from hpo.config import Sweep
    from hpo.record.sweep_record import SweepRecord

    storage = f"sqlite:///{tmp_path / 'hpo.db'}"
    study = optuna.create_study(study_name="reviews", storage=storage, direction="minimize")
    sweep = dataclasses.replace(Sweep(), train_data=str(data), model=str(model), max_steps=40, eval_every=10)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    SweepRecord(module="reviews.py", sweep=sweep.to_dict(), tracking_uri=uri).save(study)
    if complete:
        trial = study.ask({"learning_rate": optuna.distributions.FloatDistribution(1e-5, 1e-2, log=True)})
        study.tell(trial, 0.5)
    return storage


def test_strong_probe_cross_fits_the_best_trial_through_the_recipe(tmp_path: Path, tiny_bert: Path) -> None:
    """``--study`` trains the best trial's params on 4 of 5 folds and scores the fifth, for every
    fold (a tiny random BERT and 3 steps: this checks the plumbing, not the probe's quality)."""
    from mlflow.tracking import MlflowClient

    from hpo.record.sweep_tracker import SweepTracker

    data = _small_file(tmp_path / "reviews.tsv", {3, 20})
    storage = _recorded_study(tmp_path, data, tiny_bert)
    tracker = SweepTracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "reviews")
    sweep_run = tracker.start_sweep({}, {})
    tracker.end_sweep()
    started = time.perf_counter()
    result = run_hpo(["check-data", "--labels", "--study", "reviews", "--storage", storage, "--set", "max_steps=3",
                      "--no-tokenizer", "--json"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "strong probe: trial 0's params, 5 folds of 3 steps each" in result.stderr
    import json

    found = json.loads(result.stdout)["labels"]
    assert found["probe"] == "strong" and found["rows"] == 80
    assert (tmp_path / ".hpo" / "checks" / "reviews" / "label_issues.csv").is_file()
    assert json.loads(result.stdout)["mlflow_run"] == sweep_run  # the sweep's own run, from its record
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert sorted(a.path for a in client.list_artifacts(sweep_run, "checks")) == ["checks/checks.json",
                                                                                   "checks/label_issues.csv"]
    for suspect in found["suspects"]:
        assert suspect["source"] == str(data) and 0 <= suspect["label_quality"] <= suspect["confidence"] <= 1
    print(f"strong probe plumbing: {time.perf_counter() - started:.0f} s")


@pytest.mark.parametrize(("complete", "args", "message"), [
    (True, [], "the strong probe looks for wrong labels; add --labels"),
    (False, ["--labels"], "--study reviews: no single best COMPLETE trial to cross-fit"),
])
def test_strong_probe_refusals(tmp_path: Path, complete: bool, args: list[str], message: str) -> None:
    data = _small_file(tmp_path / "reviews.tsv", set())
    storage = _recorded_study(tmp_path, data, tmp_path, complete=complete)
    result = run_hpo(["check-data", "--study", "reviews", "--storage", storage, "--no-tokenizer", *args], tmp_path)
    assert result.returncode == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_a_class_smaller_than_the_folds_is_refused_in_one_line(tmp_path: Path) -> None:
    data = tmp_path / "reviews.tsv"
    data.write_text("label\ttext\n" + "".join(f"{int(i < 3)}\t{NEGATIVE[i % 8]} number {i}\n" for i in range(60)))
    result = run_hpo(["check-data", "--set", f"train_data={data}", "--no-tokenizer", "--labels"], tmp_path)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "label check: class 1 has 3 rows, fewer than the 5 folds the probe cross-fits over" in result.stderr
    assert not (tmp_path / ".hpo").exists()


def test_the_ensemble_weights_each_probe_by_its_accuracy() -> None:
    """``combine`` averages the probes' probabilities weighted by out-of-fold accuracy: a probe
    that matches the labels outweighs one that does not, and a row both doubt stays doubted."""
    import numpy as np

    from hpo.analysis.label_issues import combine

    labels = [0, 1, 0, 1]
    sharp = np.array([[0.9, 0.1], [0.2, 0.8], [0.8, 0.2], [0.9, 0.1]])  # 3 of 4 right; doubts row 3
    blunt = np.array([[0.4, 0.6], [0.6, 0.4], [0.6, 0.4], [0.7, 0.3]])  # 1 of 4 right; doubts row 3 too
    combined = combine(labels, [sharp, blunt])
    assert np.allclose(combined, (0.75 * sharp + 0.25 * blunt) / 1.0)
    assert np.allclose(combined.sum(1), 1) and combined[3, 1] == min(combined[i, labels[i]] for i in range(4))


def test_each_fold_runs_long_enough_and_stops_on_its_own_slice() -> None:
    """Unless --set max_steps chose them, a fold's run gets at least EPOCHS passes over its rows;
    the slice it stops on is cut from its training part, a few rows per class at the least."""
    from hpo.analysis.label_probe import EPOCHS, fold_steps, planned_steps
    from hpo.config import Sweep

    assert fold_steps(60, 16, 1440) == EPOCHS * 1440 // 16  # a sweep's 60-step trials: 270 steps per fold
    assert fold_steps(600, 16, 1440) == 600  # a longer sweep keeps its own
    assert fold_steps(60, 32, 1441) == -(-EPOCHS * 1441 // 32)
    assert planned_steps(Sweep(max_steps=60), {"batch_size": 16}, 2000) == fold_steps(60, 16, 1600 - 160)
