"""Text augmentation for small classification datasets: word dropout, neighbour swaps and
synonym replacement from a table the user gives. Off unless a search space returns a
positive strength (``augment_word_dropout``, ``augment_word_swap``, ``augment_synonym``),
so the sweep itself can find out whether augmentation helps. Seeded: a trial's augmented
batches are the same every time it runs.

The synonym table is a TSV (or a JSON object) mapping a word to its synonyms::

    good<TAB>fine<TAB>great
    film<TAB>movie
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from hpo.errors import HpoError


def load_synonyms(path: str | None) -> dict[str, list[str]]:
    """The table at ``path`` as {word: [synonyms]} (lower-case keys); {} for None."""
    if not path:
        return {}
    file = Path(path)
    if not file.is_file():
        raise HpoError(f"{path}: no such synonym table; fix --set synonyms=... (a TSV: word, then synonyms)")
    if file.suffix.lower() == ".json":
        try:
            loaded = json.loads(file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise HpoError(f"{path}: not valid JSON ({error.msg}); expected {{\"word\": [\"synonym\", ...]}}") from None
        if not isinstance(loaded, dict):
            raise HpoError(f"{path}: expected a JSON object mapping words to lists of synonyms")
        return {str(k).lower(): [str(v) for v in values] for k, values in loaded.items() if values}
    table: dict[str, list[str]] = {}
    for line in file.read_text(encoding="utf-8").splitlines():
        fields = [f.strip() for f in line.split("\t") if f.strip()]
        if len(fields) >= 2:
            table[fields[0].lower()] = fields[1:]
    if not table:
        raise HpoError(f"{path}: no synonyms found; each line is a word, a tab, then its synonyms separated by tabs")
    return table


class Augmenter:
    """Turns a text into a randomly perturbed one; one instance per training run."""

    def __init__(self, *, word_dropout: float, word_swap: float, synonym: float,
                 synonyms: dict[str, list[str]], seed: int):
        self.word_dropout = word_dropout
        self.word_swap = word_swap
        self.synonym = synonym
        self.synonyms = synonyms
        self.rng = random.Random(seed)

    def __call__(self, text: str) -> str:
        words = text.split()
        if len(words) < 2:
            return text
        if self.synonym and self.synonyms:
            words = [self._synonym(w) if self.rng.random() < self.synonym else w for w in words]
        if self.word_dropout:
            kept = [w for w in words if self.rng.random() >= self.word_dropout]
            words = kept or [self.rng.choice(words)]
        if self.word_swap:
            i = 0
            while i < len(words) - 1:
                if self.rng.random() < self.word_swap:
                    words[i], words[i + 1] = words[i + 1], words[i]
                    i += 1
                i += 1
        return " ".join(words)

    def _synonym(self, word: str) -> str:
        core = word.strip(".,;:!?\"'()").lower()
        choices = self.synonyms.get(core)
        if not choices:
            return word
        replacement = self.rng.choice(choices)
        if word[:1].isupper():
            replacement = replacement[:1].upper() + replacement[1:]
        start = word.lower().find(core)
        return word[:start] + replacement + word[start + len(core):]
