"""Near-duplicates and paraphrase leakage: pairs of rows that say the same thing in other words.

``hpo check-data --paraphrases`` looks for pairs within the training split and between the
training and validation splits (classification texts, causal-LM paragraphs, sft prompts),
beyond the exact and case/punctuation repeats the plain checks already report
(:mod:`hpo.analysis.checks_text`):

* **near-duplicates** by MinHash LSH (datasketch): each text's set of words and word pairs
  (lowercased, punctuation dropped) is hashed with 128 permutations (``PERMUTATIONS``);
  pairs whose estimated Jaccard similarity reaches 0.7 (``JACCARD``) are reported with it.
* **paraphrases** by the cosine of the base model's mean-pooled embeddings
  (:mod:`hpo.analysis.embeddings`): pairs at or above 0.9 (``COSINE``). Measured on SST-2
  with all-MiniLM-L6-v2 (tests/test_near_duplicates.py): rewritten eval sentences (words
  reordered, synonyms swapped, case and punctuation changed) score 0.90-0.99 against their
  source, while the closest unrelated train row of an eval sentence rarely reaches 0.9.

Each pair carries its kind, similarity and both rows. Eval rows with a partner in training
are *leaked*: the validation score flatters the model, and :meth:`Pairs.warning` says so in
one line with the count.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

JACCARD = 0.7
PARAPHRASE = 0.8
PERMUTATIONS = 128
WORD_BLOCK = 512
"""Rows whose word cosines with every training row are computed at once (a sparse block)."""
_WORD = re.compile(r"\w+")


@dataclass(frozen=True)
class Pair:
    """Two rows that say nearly the same thing; ``first`` is a training row."""

    kind: str
    """``near_duplicate`` (MinHash Jaccard) or ``paraphrase`` (embedding cosine)."""
    scope: str
    """``train`` (both rows in training) or ``train-eval`` (``second`` is a validation row)."""
    similarity: float
    first_row: int
    second_row: int
    first_text: str
    second_text: str


@dataclass
class Pairs:
    """All pairs found, most similar first, and the validation rows they leak."""

    pairs: list[Pair]
    eval_rows: int
    eval_source: str
    seconds: float
    leaked: list[int] = field(default_factory=list)
    """Validation rows (numbers) with a near-duplicate or paraphrase in training."""

    def warning(self) -> str | None:
        """The one line that says the eval score is suspect, or None when nothing leaked."""
        if not self.leaked:
            return None
        return (f"eval score suspect: {len(self.leaked)} of {self.eval_rows} validation rows "
                f"({len(self.leaked) / max(self.eval_rows, 1):.1%}) of {self.eval_source} are near-duplicates or "
                "paraphrases of training rows; remove them from one side")

    def lines(self, limit: int = 20) -> list[str]:
        counts = {(kind, scope): sum(p.kind == kind and p.scope == scope for p in self.pairs)
                  for kind in ("near_duplicate", "paraphrase") for scope in ("train", "train-eval")}
        lines = [f"near-duplicate check ({self.seconds:.0f} s): "
                 + ", ".join(f"{n} {kind.replace('_', '-')} pairs {scope}" for (kind, scope), n in counts.items())]
        for pair in self.pairs[:limit]:
            lines.append(f"  {pair.kind} {pair.similarity:.2f} {pair.scope}: train row {pair.first_row} "
                         f"{_clip(pair.first_text)!r} ~ {'eval' if pair.scope == 'train-eval' else 'train'} row "
                         f"{pair.second_row} {_clip(pair.second_text)!r}")
        if len(self.pairs) > limit:
            lines.append(f"  ... {len(self.pairs) - limit} more in the CSV")
        if warning := self.warning():
            lines.append(warning)
        return lines

    def to_dict(self) -> dict:
        return {"pairs": [asdict(p) for p in self.pairs], "leaked": self.leaked, "warning": self.warning(),
                "seconds": round(self.seconds, 1)}

    def write_csv(self, path: Path) -> Path:
        import csv

        from hpo.analysis.label_issues import replacing

        path.parent.mkdir(parents=True, exist_ok=True)
        with replacing(path) as handle:
            writer = csv.writer(handle)
            writer.writerow(("kind", "scope", "similarity", "train_row", "other_row", "train_text", "other_text"))
            for p in self.pairs:
                writer.writerow((p.kind, p.scope, f"{p.similarity:.4f}", p.first_row, p.second_row,
                                 p.first_text, p.second_text))
        return path


def check_pairs(train_source: str, eval_source: str | None, *, task: str, model: str | None,
                text_column: str | None = None, label_column: str | None = None, eval_fraction: float = 0.1) -> Pairs:
    """Read the sweep's splits as ``hpo check-data`` does (classification rows, causal-LM paragraphs,
    sft prompts; the held-out share of the training file without ``eval_source``) and find the pairs."""
    from hpo.analysis.checks_text import _Part, train_and_eval
    from hpo.train import data

    parts: list[_Part] = []
    paragraphs: list[tuple[_Part, list[int], data.RawExamples]] = []  # causal_lm: each file's, with offsets and rows
    for source in filter(None, (train_source, eval_source)):
        if task == "sft":
            from hpo.analysis.checks_sft import _read

            parts.append(_read(source, 1 << 30, None, None).part)
        elif task == "causal_lm":
            from hpo.analysis.checks_causal_lm import _paragraphs

            raw = data.read_raw(source, task, text_column)
            part, offsets = _paragraphs(raw, None)
            paragraphs.append((part, offsets, raw))
        else:
            texts = data.read_raw(source, task, text_column, label_column).texts
            numbers = list(range(1, len(texts) + 1))
            parts.append(_Part(source, numbers, texts, texts, [None] * len(texts), [0] * len(texts)))
    if task == "causal_lm":
        if eval_source:
            train, evaluation = paragraphs[0][0], paragraphs[1][0]
        else:
            part, offsets, raw = paragraphs[0]
            head, _ = data.hold_out(data.Examples(train_source, raw.texts, None), eval_fraction)
            cut = len(head.texts[0])
            train = part.take([i for i, offset in enumerate(offsets) if offset < cut])
            evaluation = part.take([i for i, offset in enumerate(offsets) if offset >= cut])
    else:
        train, evaluation = train_and_eval(parts, train_source, eval_source, eval_fraction, len(parts[0].texts))
    return find_pairs((train.numbers, train.texts), (evaluation.numbers, evaluation.texts),
                      eval_source or f"the held-out rows of {train_source}", model=model)


def find_pairs(train: tuple[list[int], list[str]], evaluation: tuple[list[int], list[str]], eval_source: str, *,
               model: str | None, jaccard: float = JACCARD, paraphrase: float = PARAPHRASE) -> Pairs:
    """Near-duplicate and paraphrase pairs within ``train`` and between ``train`` and ``evaluation``
    (each given as row numbers and texts). ``model`` None skips the embeddings (MinHash only)."""
    import time

    started = time.perf_counter()
    train_numbers, train_texts = train
    eval_numbers, eval_texts = evaluation
    found: dict[tuple[str, int, int], Pair] = {}
    for kind, scope, i, j, similarity in _minhash_pairs(train_texts, eval_texts, jaccard):
        _add(found, kind, scope, i, j, similarity, train, evaluation)
    if model is not None:
        for kind, scope, i, j, similarity in _paraphrase_pairs(train_texts, eval_texts, model, paraphrase, set(found)):
            _add(found, kind, scope, i, j, similarity, train, evaluation)
    pairs = sorted(found.values(), key=lambda p: (-p.similarity, p.first_row, p.second_row))
    leaked = sorted({p.second_row for p in pairs if p.scope == "train-eval"})
    return Pairs(pairs, len(eval_numbers), eval_source, time.perf_counter() - started, leaked)


def _add(found: dict, kind: str, scope: str, i: int, j: int, similarity: float, train: tuple, evaluation: tuple) -> None:
    other = evaluation if scope == "train-eval" else train
    key = (scope, i, j)
    if key in found:
        return  # a pair both checks find is reported once, as the near-duplicate
    found[key] = Pair(kind, scope, round(float(similarity), 4), train[0][i], other[0][j], train[1][i], other[1][j])


def _shingles(text: str) -> set[str]:
    words = _WORD.findall(text.lower())
    return set(words) | {f"{a} {b}" for a, b in zip(words, words[1:], strict=False)}


def _minhash_pairs(train: list[str], evaluation: list[str], threshold: float) -> list[tuple]:
    """(kind, scope, train index, other index, estimated Jaccard) for pairs over ``threshold``
    whose normalized texts differ (equal ones are the plain checks' duplicates and leakage)."""
    from datasketch import MinHash, MinHashLSH

    def signature(text: str) -> Any:
        shingles = _shingles(text)
        hashed = MinHash(num_perm=PERMUTATIONS, seed=1)
        hashed.update_batch([s.encode() for s in shingles])
        return hashed, shingles

    lsh = MinHashLSH(threshold=threshold, num_perm=PERMUTATIONS)
    train_signatures = []
    for i, text in enumerate(train):
        hashed, shingles = signature(text)
        train_signatures.append((hashed, shingles))
        if shingles:
            lsh.insert(i, hashed)
    pairs = []
    for scope, texts in (("train", None), ("train-eval", evaluation)):
        for j in range(len(texts if texts is not None else train)):
            hashed, shingles = train_signatures[j] if texts is None else signature(texts[j])
            if not shingles:
                continue
            for i in lsh.query(hashed):
                if scope == "train" and i >= j:
                    continue
                other = train_signatures[i][1]
                similarity = len(shingles & other) / len(shingles | other)  # exact, on the two sets
                if threshold <= similarity < 1.0:
                    pairs.append(("near_duplicate", scope, i, j, similarity))
    return pairs


def _paraphrase_pairs(train: list[str], evaluation: list[str], model: str, threshold: float,
                      known: set[tuple[str, int, int]]) -> list[tuple]:
    """(kind, scope, train index, other index, score) for pairs whose paraphrase score (the mean of
    the embedding cosine and the TF-IDF word cosine) reaches ``threshold``, normalized texts differing.

    The embedding cosine is at most 1, so only pairs with a word cosine of at least
    ``2 * threshold - 1`` can reach it: those are found with sparse products, and only their
    texts are embedded (exact, and what keeps 10,000 rows within a minute); pairs in ``known``
    (already near-duplicates, keyed (scope, train index, other index)) are not scored again."""
    import numpy as np
    from sklearn.feature_extraction.text import TfidfVectorizer

    from hpo.analysis.embeddings import embed

    keys = [" ".join(_WORD.findall(t.lower())) for t in train + evaluation]
    words = TfidfVectorizer(sublinear_tf=True, token_pattern=r"\w+").fit_transform([k or "_" for k in keys])
    train_words, floor = words[:len(train)].T.tocsr(), 2 * threshold - 1
    candidates = []  # (scope, train index, other index, other's index into keys, word cosine)
    for scope, offset, count in (("train", 0, len(train)), ("train-eval", len(train), len(evaluation))):
        for start in range(0, count, WORD_BLOCK):
            block = (words[offset + start:offset + min(start + WORD_BLOCK, count)] @ train_words).tocoo()
            keep = block.data >= floor
            for j, i, value in zip(block.row[keep] + start, block.col[keep], block.data[keep], strict=True):
                if ((scope == "train" and i >= j) or not keys[i] or keys[i] == keys[offset + j]
                        or (scope, i, j) in known):
                    continue
                candidates.append((scope, int(i), int(j), offset + int(j), float(value)))
    needed = sorted({c[1] for c in candidates} | {c[3] for c in candidates})
    if not needed:
        return []
    texts = train + evaluation
    vectors = dict(zip(needed, embed([texts[k] for k in needed], model), strict=True))
    pairs = []
    for scope, i, j, other, word_cosine in candidates:
        score = (float(np.dot(vectors[i], vectors[other])) + word_cosine) / 2
        if score >= threshold:
            pairs.append(("paraphrase", scope, i, j, score))
    return pairs


def _clip(text: str, width: int = 60) -> str:
    return text if len(text) <= width else text[:width - 3] + "..."
