"""Reading datasets: formats, header detection, column detection, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hpo import HpoError
from hpo.train import data
from tests.conftest import SEARCH_SPACES, needs_shared_data


def test_shipped_reviews() -> None:
    train = data.read(str(SEARCH_SPACES / "data/reviews/train.tsv"), "classification")
    evaluation = data.read(str(SEARCH_SPACES / "data/reviews/eval.tsv"), "classification")
    assert len(train.texts) == 400 and len(evaluation.texts) == 120
    assert set(train.labels) == {0, 1}
    assert not set(train.texts) & set(evaluation.texts), "no leakage between the shipped splits"


def test_headerless_two_column_file(tmp_path: Path) -> None:
    path = tmp_path / "plain.tsv"
    path.write_text("1\ta fine day\n0\ta dull evening\n1\tbright\n")
    examples = data.read(str(path), "classification")
    assert examples.labels == [1, 0, 1] and examples.texts[0] == "a fine day"


def test_headerless_text_first(tmp_path: Path) -> None:
    path = tmp_path / "plain.csv"
    path.write_text('"great, really",1\nawful,0\n')
    examples = data.read(str(path), "classification")
    assert examples.labels == [1, 0] and examples.texts == ["great, really", "awful"]


def test_named_columns_in_csv_and_jsonl(tmp_path: Path) -> None:
    csv_path = tmp_path / "d.csv"
    csv_path.write_text("id,review,stars\n1,nice,1\n2,bad,0\n")
    examples = data.read(str(csv_path), "classification", text_column="review", label_column="stars")
    assert examples.texts == ["nice", "bad"] and examples.labels == [1, 0]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": t, "label": y}) for t, y in [("a", 0), ("b", 2)]) + "\n")
    assert data.read(str(jsonl), "classification").labels == [0, 2]


@pytest.mark.parametrize(
    ("content", "kwargs", "words"),
    [
        ("label\ttext\npos\tnice\n", {}, "row 1, column 'label': label 'pos' is not an integer"),
        ("label\ttext\n1\tnice\n", {"text_column": "review"}, "no column 'review' (columns: label, text); fix --set text_column"),
        ("", {}, "has no data rows"),
        ("label\ttext\n1\tnice\textra\n", {}, "line 2 has 3 fields, expected 2"),
        ("a\tb\nx\ty\n", {}, "cannot tell which column is the label"),
        ("label\ttext\n-1\tnice\n", {}, "label -1 is negative"),
    ],
)
def test_bad_files(tmp_path: Path, content: str, kwargs: dict, words: str) -> None:
    path = tmp_path / "bad.tsv"
    path.write_text(content)
    with pytest.raises(HpoError) as caught:
        data.read(str(path), "classification", **kwargs)
    assert words in str(caught.value) and "bad.tsv" in str(caught.value)


def test_missing_file_and_unsupported_suffix(tmp_path: Path) -> None:
    with pytest.raises(HpoError, match="no such file"):
        data.read(str(tmp_path / "nope.tsv"), "classification")
    (tmp_path / "d.parquet").write_text("x")
    with pytest.raises(HpoError, match="unsupported or missing data file"):
        data.read(str(tmp_path / "d.parquet"), "classification")


def test_hold_out_is_seeded_and_disjoint() -> None:
    examples = data.read(str(SEARCH_SPACES / "data/reviews/train.tsv"), "classification")
    train, evaluation = data.hold_out(examples, 0.1)
    again, _ = data.hold_out(examples, 0.1)
    assert len(evaluation.texts) == 40 and len(train.texts) == 360
    assert train.texts == again.texts
    assert not set(train.texts) & set(evaluation.texts)


def test_text_hold_out_takes_the_tail() -> None:
    examples = data.read(str(SEARCH_SPACES / "data/text/corpus.txt"), "causal_lm")
    train, evaluation = data.hold_out(examples, 0.1)
    whole = examples.texts[0]
    assert whole.startswith(train.texts[0]) and whole.endswith(evaluation.texts[0])
    assert 0.05 < len(evaluation.texts[0]) / len(whole) < 0.15


@needs_shared_data
def test_sst2_headers_differ_between_splits(shared_data: Path) -> None:
    train = data.read(str(shared_data / "sst2/train.tsv"), "classification")  # label, sentence
    dev = data.read(str(shared_data / "sst2/dev.tsv"), "classification")  # label, content
    assert len(train.texts) > 60000 and len(dev.texts) == 872
    assert set(dev.labels) == {0, 1}
