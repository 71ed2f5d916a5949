"""Data-quality checks before a sweep: what ``hpo check-data`` reports.

:func:`check_data` reads the training and validation data the way a sweep does
(:mod:`hpo.data`; without ``eval_source`` the validation set is the held-out
``eval_fraction`` of the training file, :func:`hpo.data.hold_out`) and returns a
:class:`DataReport` of findings. An *error* means a sweep must not start; a *warning* is
worth knowing; *info* is context. Each finding counts the rows affected and names up to
five of them, numbered as :func:`hpo.data.read` numbers them ("row 1" is the first data
row; for a ``.txt`` file, line numbers). Only a missing file, a missing column or an
unreadable file raise :class:`~hpo.errors.HpoError`; bad labels become findings.

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

Causal LM (plain text; paragraphs are runs of non-blank lines, or lines when a file has
no blank line; repeats and overlap only count paragraphs of 5+ words, ``MIN_PARAGRAPH_WORDS``):
``empty_text`` (error when a source holds no text; empty rows of a text column are a
warning above 1%, info below), ``too_little_text`` (error: training text under 4 blocks
of ``max_length`` tokens, ``MIN_TRAIN_BLOCKS``, or validation text under one block),
``duplicate`` (warning: repeated paragraphs) and ``leakage`` (validation paragraphs found
in training, as above).

Instruction tuning (task ``sft``: missing, empty or cut answers, ...): see :mod:`hpo.checks_sft`.

Speed: one pass of plain Python per check; SST-2's 67k rows take about a second without a
tokenizer. A fast tokenizer is called in batches of 2048 texts.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hpo import data
from hpo.errors import HpoError

EMPTY_ERROR_SHARE = 0.01
SHORT_CHARS = 2
SHORT_WARNING_SHARE = 0.05
TRUNCATED_WARNING_SHARE = 0.05
LEAKAGE_ERROR_SHARE = 0.20
MAJORITY_SHARE = 0.8
MINORITY_SHARE = 0.05
TOKENS_PER_WORD = 1.3
MIN_TRAIN_BLOCKS = 4
MIN_PARAGRAPH_WORDS = 5
EXAMPLE_ROWS = 5
TOKENIZER_BATCH = 2048
PERCENTILES = (50, 90, 95, 99)
SEVERITIES = ("error", "warning", "info")
_PUNCTUATION = re.compile(r"[^\w\s]")


@dataclass(frozen=True)
class Finding:
    """One problem in the data, with how many rows it touches and where to look."""

    severity: str
    """``error`` (a sweep must not start), ``warning`` (worth knowing) or ``info``."""
    code: str
    """A stable id: ``empty_text``, ``duplicate``, ``leakage``, ... (see the module docstring)."""
    source: str
    """The file or dataset the finding is about (the training file for a held-out split)."""
    message: str
    """One line for a person: what, how many, and what to do."""
    count: int
    """How many rows are affected: paragraphs for a causal LM, classes for ``missing_class``, the
    majority class's rows for ``class_imbalance``, tokens for ``too_little_text``."""
    rows: list[int] = field(default_factory=list)
    """Up to five example rows, 1-based data rows (line numbers for a .txt file)."""


@dataclass
class DataReport:
    """The findings, errors first, and figures about the splits (rows, classes, token lengths)."""

    findings: list[Finding]
    stats: dict

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "warning"]

    def to_dict(self) -> dict:
        """A JSON-able summary (``hpo check-data --json``)."""
        return {
            "ok": not self.errors, "errors": len(self.errors), "warnings": len(self.warnings),
            "findings": [asdict(f) for f in self.findings], "stats": self.stats,
        }

    def lines(self) -> list[str]:
        """Human-readable lines: findings (errors first), one line per split, a verdict."""
        lines = []
        for finding in sorted(self.findings, key=lambda f: SEVERITIES.index(f.severity)):
            where = ""
            if finding.rows:
                noun = "lines" if Path(finding.source).suffix.lower() == ".txt" else "rows"
                more = ", ..." if finding.count > len(finding.rows) else ""
                where = f" [{noun} {', '.join(map(str, finding.rows))}{more}]"
            lines.append(f"{finding.severity}: {finding.source}: {finding.message}{where}")
        for split in ("train", "eval"):
            if split in self.stats:
                lines.append(f"{split}: {_describe(self.stats[split], self.stats)}")
        verdict = "not ready for a sweep" if self.errors else "ready for a sweep"
        lines.append(f"{len(self.errors)} errors, {len(self.warnings)} warnings: {verdict}")
        return lines


def check_data(train_source: str, eval_source: str | None, *, task: str, text_column: str | None = None,
               label_column: str | None = None, max_length: int = 128, eval_fraction: float = 0.1,
               tokenizer: Any = None, chat_template: str | None = None) -> DataReport:
    """Read the sweep's data and check it (see the module docstring for every check).

    ``tokenizer`` (a Hugging Face tokenizer, fast ones are quick; sft formats with ``chat_template``)
    counts tokens exactly; without it they are approximated from words. Raises HpoError only when
    a source cannot be read (missing file or column, malformed file) or ``task`` is unknown.
    """
    method = "tokenizer" if tokenizer is not None else f"approximate: {TOKENS_PER_WORD} tokens per word"
    if task == "classification":
        findings, stats = _check_classification(
            train_source, eval_source, text_column, label_column, max_length, eval_fraction, tokenizer, method)
    elif task == "causal_lm":
        findings, stats = _check_text(train_source, eval_source, text_column, max_length, eval_fraction, tokenizer,
                                      method)
    elif task == "sft":
        from hpo.checks_sft import check_sft

        findings, stats = check_sft(train_source, eval_source, max_length, eval_fraction, tokenizer, chat_template)
    else:
        raise HpoError(f"task {task!r}: must be classification, causal_lm or sft (--set task=...)")
    stats = {"task": task, "max_length": max_length, "token_counts": method,
             "validation": eval_source or f"held out {eval_fraction:.0%} of {train_source}", **stats}
    findings.sort(key=lambda f: SEVERITIES.index(f.severity))
    return DataReport(findings, stats)


@dataclass
class _Part:
    """Rows of one split, with their reported numbers, normalized texts, labels and token counts."""

    source: str
    numbers: list[int]
    texts: list[str]
    keys: list[str]
    labels: list[int | None]
    tokens: list[int]

    def take(self, indices: list[int]) -> _Part:
        return _Part(self.source, *([values[i] for i in indices] for values in (
            self.numbers, self.texts, self.keys, self.labels, self.tokens)))


def _check_classification(train_source: str, eval_source: str | None, text_column: str | None,
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
    if eval_source:
        train, evaluation = parts
    else:
        kept, held = data.hold_out_rows(train_source, len(parts[0].texts), eval_fraction)
        train, evaluation = parts[0].take(kept), parts[0].take(held)
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
            f"(row {bad[0] + 1}: {raw.labels[bad[0]]!r}); labels must be integers 0..K-1: map names to "
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


def _duplicate_findings(part: _Part, noun: str, where: str) -> list[Finding]:
    """Exact repeats, near repeats (same normalized text) and repeats whose labels disagree;
    ``noun`` names what ``part`` holds (rows), ``where`` one number (row, line)."""
    first_exact: dict[str, int] = {}
    groups: dict[str, list[int]] = {}
    exact, near = [], []
    for i, (text, key) in enumerate(zip(part.texts, part.keys, strict=True)):
        if not text.strip():
            continue
        if text in first_exact:
            exact.append(i)
        else:
            first_exact[text] = i
            if key in groups:
                near.append(i)
        if key:
            groups.setdefault(key, []).append(i)
    total, number = len(part.texts), part.numbers
    findings = []
    if exact:
        first = first_exact[part.texts[exact[0]]]
        findings.append(_finding(
            "warning", "duplicate", part.source, exact,
            f"{len(exact)} of {total} {noun} repeat an earlier one exactly ({where} {number[exact[0]]} = "
            f"{where} {number[first]}); repeats weigh more in training and can leak into validation: "
            "drop them", numbers=number))
    if near:
        first = groups[part.keys[near[0]]][0]
        findings.append(_finding(
            "warning", "near_duplicate", part.source, near,
            f"{len(near)} of {total} {noun} repeat an earlier one up to case, spacing and punctuation "
            f"({where} {number[near[0]]} ~ {where} {number[first]}); consider dropping them", numbers=number))
    conflicts = [rows for rows in groups.values() if len({part.labels[i] for i in rows} - {None}) > 1]
    if conflicts:
        rows = [i for group in conflicts for i in group]
        example = conflicts[0][:2]
        findings.append(_finding(
            "warning", "conflicting_labels", part.source, rows,
            f"{len(conflicts)} texts appear with different labels ({len(rows)} rows; {where} {number[example[0]]} "
            f"says {part.labels[example[0]]}, {where} {number[example[1]]} says {part.labels[example[1]]}); "
            "no model can fit both: fix or drop them", numbers=number))
    return findings


def _truncation_findings(part: _Part, max_length: int, method: str) -> list[Finding]:
    over = [i for i, count in enumerate(part.tokens) if count > max_length]
    if not over:
        return []
    share = len(over) / len(part.tokens)
    lengths = _length_stats(part.tokens, max_length)
    return [_finding(
        "warning" if share > TRUNCATED_WARNING_SHARE else "info", "truncated", part.source, over,
        f"{len(over)} of {len(part.tokens)} texts ({share:.1%}) are longer than max_length={max_length} tokens "
        f"({method}; longest {lengths['max']}, p95 {lengths['p95']}) and will be cut; "
        "raise --set max_length=... if the end matters")]


def _leakage_findings(train: _Part, evaluation: _Part, noun: str, held_out: bool) -> list[Finding]:
    train_keys = set(train.keys) - {""}
    leaked = [i for i, key in enumerate(evaluation.keys) if key and key in train_keys]
    if not leaked:
        return []
    share = len(leaked) / len(evaluation.keys)
    if held_out:
        what, fix = f"also appear among the training {noun} (the file repeats them)", "deduplicate the file"
    else:
        what, fix = f"also appear in {train.source}", "remove them from one side"
    return [_finding(
        "error" if share >= LEAKAGE_ERROR_SHARE else "warning", "leakage", evaluation.source, leaked,
        f"{len(leaked)} of {len(evaluation.keys)} {'held-out ' if held_out else ''}validation {noun} ({share:.1%}) "
        f"{what}, up to case, spacing and punctuation; validation scores will flatter the model: {fix}",
        numbers=evaluation.numbers)]


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


def _check_text(train_source: str, eval_source: str | None, text_column: str | None, max_length: int,
                eval_fraction: float, tokenizer: Any, method: str) -> tuple[list[Finding], dict]:
    findings: list[Finding] = []
    files = [data.read_raw(source, "causal_lm", text_column) for source in filter(None, (train_source, eval_source))]
    parts = []
    for raw in files:
        findings += _empty_text_findings(raw)
        part, offsets = _paragraphs(raw, tokenizer)
        long_enough = [i for i, text in enumerate(part.texts) if len(text.split()) >= MIN_PARAGRAPH_WORDS]
        findings += _duplicate_findings(part.take(long_enough), f"paragraphs of {MIN_PARAGRAPH_WORDS}+ words",
                                        "line" if _is_txt(raw.source) else "row")
        parts.append((part, offsets))
    if eval_source:
        (train, _), (evaluation, _) = parts
    else:
        part, offsets = parts[0]
        head, _ = data.hold_out(data.Examples(train_source, files[0].texts, None), eval_fraction)
        cut = len(head.texts[0])
        train = part.take([i for i, offset in enumerate(offsets) if offset < cut])
        evaluation = part.take([i for i, offset in enumerate(offsets) if offset >= cut])
    stats = {}
    for split, piece, minimum in (("train", train, MIN_TRAIN_BLOCKS), ("eval", evaluation, 1)):
        tokens = sum(piece.tokens)
        stats[split] = {"source": piece.source, "paragraphs": len(piece.texts),
                        "characters": sum(len(t) for t in piece.texts), "tokens": tokens,
                        "blocks": tokens // max_length}
        if tokens // max_length < minimum:
            fix = "add text or lower --set max_length" + ("; or raise --set eval_fraction" if split == "eval"
                                                          and not eval_source else "")
            findings.append(Finding(
                "error", "too_little_text", piece.source,
                f"the {'training' if split == 'train' else 'validation'} text has about {tokens} tokens ({method}): "
                f"{tokens // max_length} blocks of max_length={max_length}, fewer than the {minimum} a run needs: "
                f"{fix}", tokens, []))
    long_enough = [[i for i, text in enumerate(piece.texts) if len(text.split()) >= MIN_PARAGRAPH_WORDS]
                   for piece in (train, evaluation)]
    findings += _leakage_findings(train.take(long_enough[0]), evaluation.take(long_enough[1]), "paragraphs",
                                  held_out=not eval_source)
    return findings, stats


def _empty_text_findings(raw: data.RawExamples) -> list[Finding]:
    if not any(text.strip() for text in raw.texts):
        return [Finding("error", "empty_text", raw.source, "holds no text; give a source with some content",
                        len(raw.texts), [])]
    empty = [i for i, text in enumerate(raw.texts) if not text.strip()]
    if not empty:
        return []
    share = len(empty) / len(raw.texts)
    return [_finding(
        "warning" if share > EMPTY_ERROR_SHARE else "info", "empty_text", raw.source, empty,
        f"{len(empty)} of {len(raw.texts)} rows ({share:.1%}) have an empty text; check --set text_column")]


def _paragraphs(raw: data.RawExamples, tokenizer: Any) -> tuple[_Part, list[int]]:
    """Paragraphs of the texts joined as :func:`hpo.data.hold_out` joins them, each with its
    offset in that joined text and its line (a .txt file) or row number; lines when a
    .txt file has no blank line."""
    by_line = _is_txt(raw.source)
    single_lines = by_line and not re.search(r"\n[ \t]*\n", raw.texts[0])
    numbers, texts, offsets = [], [], []
    offset = 0
    for row, text in enumerate(raw.texts, start=1):
        start, lines = 0, []
        for line_number, line in enumerate(text.split("\n"), start=1):
            if line.strip():
                if not lines:
                    numbers.append(line_number if by_line else row)
                    offsets.append(offset + start)
                lines.append(line)
            if lines and (single_lines or not line.strip()):
                texts.append("\n".join(lines))
                lines = []
            start += len(line) + 1
        if lines:
            texts.append("\n".join(lines))
        offset += len(text) + 2
    part = _Part(raw.source, numbers, texts, [_normalize(t) for t in texts], [None] * len(texts),
                 _token_counts(texts, tokenizer, special_tokens=False))
    return part, offsets


def _token_counts(texts: list[str], tokenizer: Any, special_tokens: bool) -> list[int]:
    if tokenizer is None:
        return [int(len(text.split()) * TOKENS_PER_WORD + 0.5) for text in texts]
    counts: list[int] = []
    for start in range(0, len(texts), TOKENIZER_BATCH):
        encoded = tokenizer(texts[start:start + TOKENIZER_BATCH], add_special_tokens=special_tokens, truncation=False,
                            verbose=False, return_attention_mask=False, return_token_type_ids=False)
        counts.extend(len(ids) for ids in encoded["input_ids"])
    return counts


def _split_stats(part: _Part, max_length: int) -> dict:
    classes = Counter(label for label in part.labels if label is not None)
    return {"source": part.source, "rows": len(part.texts),
            "classes": {str(c): classes[c] for c in sorted(classes)},
            "tokens": _length_stats(part.tokens, max_length)}


def _length_stats(counts: list[int], max_length: int) -> dict:
    ordered = sorted(counts)
    if not ordered:
        return {}
    stats = {f"p{q}": ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)] for q in PERCENTILES}
    return {**stats, "max": ordered[-1], "mean": round(sum(ordered) / len(ordered), 1),
            "truncated_share": round(sum(c > max_length for c in ordered) / len(ordered), 4)}


def _describe(split: dict, stats: dict) -> str:
    if "answer_tokens" in split:
        from hpo.checks_sft import describe

        return describe(split, stats)
    if "blocks" in split:
        return (f"{split['paragraphs']} paragraphs, about {split['tokens']} tokens = {split['blocks']} blocks of "
                f"{stats['max_length']} ({split['source']})")
    classes = ", ".join(f"{c}: {n}" for c, n in split["classes"].items())
    tokens = split["tokens"]
    lengths = (f"; tokens p50 {tokens['p50']}, p95 {tokens['p95']}, max {tokens['max']}, "
               f"{tokens['truncated_share']:.1%} over max_length {stats['max_length']}") if tokens else ""
    return f"{split['rows']} rows ({split['source']}); classes {classes or 'none'}{lengths}"


def _baseline(majority: int, train_counts: Counter, eval_counts: Counter) -> float:
    counts = eval_counts or train_counts
    return counts[majority] / sum(counts.values())


def _finding(severity: str, code: str, source: str, indices: list[int], message: str,
             numbers: list[int] | None = None) -> Finding:
    """A finding about rows given as 0-based indices (into ``numbers`` when given)."""
    examples = [numbers[i] if numbers else i + 1 for i in indices[:EXAMPLE_ROWS]]
    return Finding(severity, code, source, message, len(indices), examples)


def _normalize(text: str) -> str:
    return " ".join(_PUNCTUATION.sub("", text.lower()).split())


def _join(values: list[int]) -> str:
    return ", ".join(map(str, values))


def _is_txt(source: str) -> bool:
    return Path(source).suffix.lower() == ".txt"
