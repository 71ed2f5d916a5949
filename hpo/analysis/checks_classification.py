"""Data checks for task ``classification``: labels, classes, and the texts of each row.

Classification, per file (train, and the eval file when given):

* ``label_unparseable`` (error): a label that is not an integer.
* ``label_out_of_range`` (error): a negative label.
* ``empty_text``: an empty or whitespace-only text; an error above 1% of the rows
  (``EMPTY_ERROR_SHARE``), a warning below.
* ``duplicate`` (warning): a row whose text repeats an earlier row exactly.
* ``near_duplicate`` (warning): the same text as an earlier row once lowercased, with
  punctuation dropped and whitespace collapsed, but not exactly the same.
* ``conflicting_labels`` (warning): such (near) duplicates that carry different labels.
* ``too_short``: at most 2 characters, or a single word; a warning above 5% of the rows
  (``SHORT_WARNING_SHARE``), info below.
* ``truncated``: longer than ``max_length`` tokens, so cut; a warning above 5% of the rows
  (``TRUNCATED_WARNING_SHARE``), info below. Tokens are counted with ``tokenizer`` (with
  special tokens, as training encodes them), or else approximated as 1.3 tokens per word
  (``TOKENS_PER_WORD``), which the message and ``stats["token_counts"]`` then say.

Classification, between the splits:

* ``leakage``: validation rows whose normalized text is in the training split; a
  warning, an error from 20% of the validation rows (``LEAKAGE_ERROR_SHARE``).
* ``label_out_of_range`` (error): a validation label never seen in training.
* ``missing_class`` (warning): a class in 0..K-1 that neither split has (K = largest label + 1).
* ``single_class``: one class in training (error) or in validation (warning).
* ``class_imbalance`` (warning): the majority class above 80% of training
  (``MAJORITY_SHARE``) or a class under 5% (``MINORITY_SHARE``); the message gives the
  accuracy of always predicting the majority class, the baseline to beat.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from hpo.analysis.checks_report import Finding, _finding
from hpo.analysis.checks_text import (
    EMPTY_ERROR_SHARE,
    _duplicate_findings,
    _leakage_findings,
    _length_stats,
    _normalize,
    _Part,
    _token_counts,
    _truncation_findings,
    train_and_eval,
)
from hpo.train import data

SHORT_CHARS = 2
SHORT_WARNING_SHARE = 0.05
MAJORITY_SHARE = 0.8
MINORITY_SHARE = 0.05


def check_classification(train_source: str, eval_source: str | None, text_column: str | None,
                          label_column: str | None, max_length: int, eval_fraction: float, tokenizer: Any,
                          method: str) -> tuple[list[Finding], dict]:
    findings: list[Finding] = []
    parts = []
    for source in filter(None, (train_source, eval_source)):
        raw = data.read_raw(source, "classification", text_column, label_column)
        labels = [data.as_label(value) for value in raw.labels or []]
        part = _Part(source, list(range(1, len(raw.texts) + 1)), raw.texts, [_normalize(t) for t in raw.texts],
                     labels, _token_counts(raw.texts, tokenizer, special_tokens=True))
        findings += _label_findings(raw, labels)
        findings += _text_findings(part)
        findings += _duplicate_findings(part, "rows", "row")
        findings += _truncation_findings(part, max_length, method)
        parts.append(part)
    train, evaluation = train_and_eval(parts, train_source, eval_source, eval_fraction, len(parts[0].texts))
    findings += _leakage_findings(train, evaluation, "rows", held_out=not eval_source)
    findings += _class_findings(train, evaluation)
    stats = {split: _split_stats(part, max_length) for split, part in (("train", train), ("eval", evaluation))}
    return findings, stats


def _label_findings(raw: data.RawExamples, labels: list[int | None]) -> list[Finding]:
    findings = []
    column, total = raw.label_column, len(labels)
    bad = [i for i, label in enumerate(labels) if label is None]
    if bad:
        findings.append(_finding(
            "error", "label_unparseable", raw.source, bad,
            f"{len(bad)} of {total} rows have a label in column {column!r} that is not an integer "
            f"(row {bad[0] + 1}: {(raw.labels or [])[bad[0]]!r}); labels must be integers 0..K-1: map names to "
            "numbers, or pick another --set label_column"))
    negative = [i for i, label in enumerate(labels) if label is not None and label < 0]
    if negative:
        findings.append(_finding(
            "error", "label_out_of_range", raw.source, negative,
            f"{len(negative)} of {total} rows have a negative label in column {column!r} "
            f"(row {negative[0] + 1}: {labels[negative[0]]}); labels must be 0..K-1"))
    return findings


def _text_findings(part: _Part) -> list[Finding]:
    findings = []
    total = len(part.texts)
    empty = [i for i, text in enumerate(part.texts) if not text.strip()]
    if empty:
        severity = "error" if len(empty) / total > EMPTY_ERROR_SHARE else "warning"
        findings.append(_finding(
            severity, "empty_text", part.source, empty,
            f"{len(empty)} of {total} rows ({len(empty) / total:.1%}) have an empty text; "
            "drop them, or check --set text_column"))
    short = [i for i, text in enumerate(part.texts)
             if text.strip() and (len(text.strip()) <= SHORT_CHARS or len(text.split()) == 1)]
    if short:
        severity = "warning" if len(short) / total > SHORT_WARNING_SHARE else "info"
        findings.append(_finding(
            severity, "too_short", part.source, short,
            f"{len(short)} of {total} rows ({len(short) / total:.1%}) are a single word or at most "
            f"{SHORT_CHARS} characters (row {short[0] + 1}: {part.texts[short[0]]!r}); check they carry the label"))
    return findings


def _class_findings(train: _Part, evaluation: _Part) -> list[Finding]:
    train_counts = Counter(label for label in train.labels if label is not None and label >= 0)
    eval_counts = Counter(label for label in evaluation.labels if label is not None and label >= 0)
    if not train_counts:
        return []  # every label is unparseable or negative: already errors
    findings = []
    unseen = [i for i, label in enumerate(evaluation.labels) if label in eval_counts and label not in train_counts]
    if unseen:
        classes = sorted(set(eval_counts) - set(train_counts))
        findings.append(_finding(
            "error", "label_out_of_range", evaluation.source, unseen,
            f"{len(unseen)} validation rows have labels never seen in training ({_join(classes)}); "
            "the model cannot learn them: add training examples or drop those rows", numbers=evaluation.numbers))
    top = max(set(train_counts) | set(eval_counts))
    missing = [c for c in range(top + 1) if c not in train_counts and c not in eval_counts]
    if missing:
        findings.append(Finding(
            "warning", "missing_class", train.source,
            f"labels run to {top} but class {_join(missing)} never appears; the model still gets an output for "
            "each class in 0..K-1: renumber the labels", len(missing), []))
    if len(train_counts) == 1:
        only, count = next(iter(train_counts.items()))
        findings.append(Finding(
            "error", "single_class", train.source,
            f"every training label is {only}; a classifier needs at least two classes: check --set label_column",
            count, []))
        return findings
    if len(eval_counts) == 1:
        only, count = next(iter(eval_counts.items()))
        findings.append(Finding(
            "warning", "single_class", evaluation.source,
            f"every validation label is {only}; accuracy on it says nothing about the other classes", count, []))
    total = sum(train_counts.values())
    majority, majority_count = train_counts.most_common(1)[0]
    rare = sorted(c for c, n in train_counts.items() if n / total < MINORITY_SHARE)
    if majority_count / total > MAJORITY_SHARE or rare:
        rare_text = "; ".join(f"class {c} is {train_counts[c] / total:.1%}" for c in rare)
        findings.append(Finding(
            "warning", "class_imbalance", train.source,
            f"class {majority} is {majority_count / total:.1%} of the training rows"
            f"{'; ' + rare_text if rare else ''}; always predicting class {majority} scores "
            f"{_baseline(majority, train_counts, eval_counts):.1%} accuracy on validation, the baseline a model must "
            "beat: consider class weights or resampling", majority_count, []))
    return findings


def _split_stats(part: _Part, max_length: int) -> dict:
    classes = Counter(label for label in part.labels if label is not None)
    return {"source": part.source, "rows": len(part.texts),
            "classes": {str(c): classes[c] for c in sorted(classes)},
            "tokens": _length_stats(part.tokens, max_length)}


def _baseline(majority: int, train_counts: Counter, eval_counts: Counter) -> float:
    counts = eval_counts or train_counts
    return counts[majority] / sum(counts.values())


def _join(values: list[int]) -> str:
    return ", ".join(map(str, values))
