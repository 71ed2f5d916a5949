"""Checks on the texts of every task: repeats, leakage between the splits, truncation.

The checks of each task (:mod:`hpo.analysis.checks_classification`, :mod:`hpo.analysis.checks_causal_lm`,
:mod:`hpo.analysis.checks_sft`) build a :class:`_Part` per split (rows, normalized texts, labels,
token counts) and run these on it; their module docstrings list what each one reports.
Texts are compared after :func:`_normalize` (lowercased, punctuation dropped, whitespace
collapsed). Tokens are counted with a tokenizer (a fast one is called in batches of 2048
texts, ``TOKENIZER_BATCH``), or else approximated as 1.3 tokens per word
(``TOKENS_PER_WORD``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, TypeVar

from hpo.analysis.checks_report import Finding, _finding
from hpo.train import data

EMPTY_ERROR_SHARE = 0.01
TRUNCATED_WARNING_SHARE = 0.05
LEAKAGE_ERROR_SHARE = 0.20
TOKENS_PER_WORD = 1.3
TOKENIZER_BATCH = 2048
PERCENTILES = (50, 90, 95, 99)
_PUNCTUATION = re.compile(r"[^\w\s]")
_T = TypeVar("_T")


def pick(values: list[_T], indices: list[int]) -> list[_T]:
    """The items of ``values`` at ``indices``, in that order."""
    return [values[i] for i in indices]


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
        return _Part(self.source, pick(self.numbers, indices), pick(self.texts, indices), pick(self.keys, indices),
                     pick(self.labels, indices), pick(self.tokens, indices))


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


def _token_counts(texts: list[str], tokenizer: Any, special_tokens: bool) -> list[int]:
    if tokenizer is None:
        return [int(len(text.split()) * TOKENS_PER_WORD + 0.5) for text in texts]
    counts: list[int] = []
    for start in range(0, len(texts), TOKENIZER_BATCH):
        encoded = tokenizer(texts[start:start + TOKENIZER_BATCH], add_special_tokens=special_tokens, truncation=False,
                            verbose=False, return_attention_mask=False, return_token_type_ids=False)
        counts.extend(len(ids) for ids in encoded["input_ids"])
    return counts


def _length_stats(counts: list[int], max_length: int) -> dict:
    ordered = sorted(counts)
    if not ordered:
        return {}
    stats = {f"p{q}": ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)] for q in PERCENTILES}
    return {**stats, "max": ordered[-1], "mean": round(sum(ordered) / len(ordered), 1),
            "truncated_share": round(sum(c > max_length for c in ordered) / len(ordered), 4)}


def _normalize(text: str) -> str:
    return " ".join(_PUNCTUATION.sub("", text.lower()).split())


def train_and_eval(splits: list[Any], train_source: str, eval_source: str | None, eval_fraction: float,
                   rows: int) -> tuple[Any, Any]:
    """The training and validation splits as a sweep sees them: the two files read, or the
    training file's ``rows`` split as :func:`hpo.train.data.hold_out_rows` splits it (anything with
    ``take(indices)``)."""
    if eval_source:
        return splits[0], splits[1]
    kept, held = data.hold_out_rows(train_source, rows, eval_fraction)
    return splits[0].take(kept), splits[0].take(held)
