"""bench/search_quality.py on a user's own data (``--train``/``--dev``, ``--model``, ``--module``):
the files read by hpo's own loader, the plan (``--dry-run``), and a bad file, module or pairing
stopped with one line before any way runs. The three searches themselves take minutes: not run here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, SEARCH_SPACES, hpo_env

BENCH = REPO / "bench" / "search_quality.py"


def bench(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH), "--work", str(cwd / "work"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120, env=hpo_env())


def test_own_csv_and_jsonl_data_a_model_and_a_module_make_the_plan(tmp_path: Path, tiny_bert: Path) -> None:
    train = tmp_path / "mine.csv"
    train.write_text('review,stars\n"a fine film",2\n"dull and long",0\n"fine, I suppose",1\n"great",2\n')
    dev = tmp_path / "dev.jsonl"
    dev.write_text('{"review": "ok", "stars": 1}\n{"review": "bad", "stars": 0}\n')
    module = tmp_path / "my_space.py"
    module.write_text((SEARCH_SPACES / "lora.py").read_text().replace(
        'max_length=64,', 'max_length=32, text_column="review", label_column="stars",'))
    result = bench("--train", str(train), "--dev", str(dev), "--model", str(tiny_bert), "--module", str(module),
                   "--dry-run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (plan,) = [json.loads(line) for line in result.stdout.splitlines()]
    assert (plan["train_rows"], plan["dev_rows"], plan["num_labels"]) == (4, 2, 3)
    assert (plan["train"], plan["dev"], plan["model"], plan["module"]) == (str(train), str(dev), str(tiny_bert),
                                                                            str(module))
    assert plan["dataset"] == "mine" and Path(plan["work"]).name.startswith("mine-")
    assert not (tmp_path / "work").exists(), "a dry run writes nothing"
    other = json.loads(bench("--train", str(train), "--dev", str(dev), "--module", str(module), "--dry-run",
                             cwd=tmp_path).stdout)
    assert other["model"] == "sentence-transformers/all-MiniLM-L6-v2" and other["work"] != plan["work"]


@pytest.mark.parametrize(("files", "flags", "words"), [
    ({"t.tsv": "text\tlabel\nfine\t1\nbad\tmaybe\n"}, ["--train", "t.tsv", "--dev", "t.tsv"],
     ("t.tsv: row 2, column 'label': label 'maybe' is not an integer",)),
    ({"t.tsv": "text\tlabel\nfine\t1\n"}, ["--train", "t.tsv"], ("--train and --dev go together",)),
    ({"t.tsv": "text\tlabel\nfine\t1\n"}, ["--train", "t.tsv", "--dev", "gone.tsv"], ("gone.tsv: no such file",)),
    ({}, ["--dataset", "reviews", "--module", str(SEARCH_SPACES / "sft_lora.py")],
     ("sft_lora.py: task sft", "give a module of task classification")),
    ({"own.py": "import hpo\nsweep = hpo.Sweep()\ndef space(trial):\n    return {}\n"
                "def train(params, report):\n    pass\n"},
     ["--dataset", "reviews", "--module", "own.py"], ("own.py: defines its own train()",)),
])
def test_a_bad_file_module_or_pairing_stops_the_bench_in_one_line(tmp_path: Path, files: dict, flags: list,
                                                                   words: tuple) -> None:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    result = bench(*flags, cwd=tmp_path)
    assert result.returncode == 1 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bench/search_quality.py: "), result.stderr
    assert all(word in lines[0] for word in words), lines[0]
    assert not (tmp_path / "work").exists()
