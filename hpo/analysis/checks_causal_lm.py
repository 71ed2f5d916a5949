"""Data checks for task ``causal_lm``: plain text, read in paragraphs.

Causal LM (plain text; paragraphs are runs of non-blank lines, or lines when a file has
no blank line; repeats and overlap only count paragraphs of 5+ words, ``MIN_PARAGRAPH_WORDS``):
``empty_text`` (error when a source holds no text; empty rows of a text column are a
warning above 1%, info below), ``too_little_text`` (error: training text under 4 blocks
of ``max_length`` tokens, ``MIN_TRAIN_BLOCKS``, or validation text under one block),
``duplicate`` (warning: repeated paragraphs) and ``leakage`` (validation paragraphs found
in training, as above).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from hpo.analysis.checks_report import Finding, _finding
from hpo.analysis.checks_text import (
    EMPTY_ERROR_SHARE,
    _duplicate_findings,
    _leakage_findings,
    _normalize,
    _Part,
    _token_counts,
)
from hpo.train import data

MIN_TRAIN_BLOCKS = 4
MIN_PARAGRAPH_WORDS = 5


def check_causal_lm(train_source: str, eval_source: str | None, text_column: str | None, max_length: int,
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
    long_train, long_eval = ([i for i, text in enumerate(piece.texts) if len(text.split()) >= MIN_PARAGRAPH_WORDS]
                             for piece in (train, evaluation))
    findings += _leakage_findings(train.take(long_train), evaluation.take(long_eval), "paragraphs",
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
    """Paragraphs of the texts joined as :func:`hpo.train.data.hold_out` joins them, each with its
    offset in that joined text and its line (a .txt file) or row number; lines when a
    .txt file has no blank line."""
    by_line = _is_txt(raw.source)
    single_lines = by_line and not re.search(r"\n[ \t]*\n", raw.texts[0])
    numbers, texts, offsets = [], [], []
    offset = 0
    for row, text in enumerate(raw.texts, start=1):
        start = 0
        lines: list[str] = []
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


def _is_txt(source: str) -> bool:
    return Path(source).suffix.lower() == ".txt"
