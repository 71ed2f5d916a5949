"""bench/label_probe.py plants flips in the user's own file and prints one JSON line per probe
(a tiny random BERT and 2 steps per fold: the plumbing, not the probes' quality)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO, hpo_env

BENCH = REPO / "bench" / "label_probe.py"


def bench(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH), "--work", str(cwd / "work"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300, env=hpo_env())


def _reviews(path: Path) -> Path:
    words = ("fine", "dull", "great", "awful", "warm", "cold", "funny", "tedious")
    path.write_text("review,stars\n" + "".join(f'"{words[i % 8]} film number {i}",{i % 2}\n' for i in range(60)))
    return path


def test_both_probes_print_one_line_each_on_a_csv(tmp_path: Path, tiny_bert: Path) -> None:
    data = _reviews(tmp_path / "mine.csv")
    result = bench("--data", str(data), "--text-column", "review", "--label-column", "stars", "--rows", "50",
                   "--rate", "0.1", "--seeds", "3", "--model", str(tiny_bert), "--max-steps", "2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["probe"] for line in lines] == ["quick", "strong", "strong-alone"]
    for line in lines:
        assert (line["rows"], line["flipped"], line["seed"]) == (50, 5, 3)
        assert 0 <= line["precision_at_k"] <= 1 and 0 <= line["recall"] <= 1 and line["flagged"] >= 0
    assert lines[1]["max_steps"] == 2 and Path(lines[1]["cached"]).is_file()
    planted = (tmp_path / "work" / "planted-3.tsv").read_text().splitlines()
    assert planted[0] == "label\ttext" and len(planted) == 51
    again = bench("--data", str(data), "--text-column", "review", "--label-column", "stars", "--rows", "50",
                  "--rate", "0.1", "--seeds", "3", "--model", str(tiny_bert), "--max-steps", "2", "--probe", "strong",
                  cwd=tmp_path)
    assert json.loads(again.stdout.splitlines()[0])["trained_seconds"] == 0  # the kept probabilities, reused


def test_too_many_rows_are_refused_in_one_line(tmp_path: Path) -> None:
    data = _reviews(tmp_path / "mine.csv")
    result = bench("--data", str(data), "--text-column", "review", "--label-column", "stars", "--rows", "100",
                   cwd=tmp_path)
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1
    assert "bench/label_probe.py: --rows 100: " in result.stderr and "has 60 rows" in result.stderr


def test_the_ceiling_probe_trains_on_rows_that_were_not_drawn(tmp_path: Path, tiny_bert: Path) -> None:
    """``--probe ceiling`` trains once on clean rows apart from the planted ones and ranks the planted
    rows with and without the quick probe's ensemble."""
    data = _reviews(tmp_path / "mine.csv")
    result = bench("--data", str(data), "--text-column", "review", "--label-column", "stars", "--rows", "40",
                   "--rate", "0.1", "--seeds", "1", "--model", str(tiny_bert), "--probe", "ceiling",
                   "--ceiling-rows", "100", "--ceiling-steps", "2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["probe"] for line in lines] == ["ceiling+quick", "ceiling"]
    for line in lines:
        assert (line["rows"], line["flipped"], line["steps"]) == (40, 4, 2)
        assert line["trained_on"] == 18, "the 20 rows not drawn, less the 10% it stops on"
        assert 0 <= line["precision_at_k"] <= 1 and Path(line["cached"]).is_file()
