"""What an sft evaluation's generated answers show besides their score, and how the retain
set is scored: the numbers ``hpo diagnose`` reads to say why a chat model fails
(:mod:`hpo.analysis.diagnose_sft`).

Each evaluation with generation (:func:`hpo.train.sft.evaluate`) reports, over the answers
generated for the first ``generation_examples`` eval prompts:

* ``eval_unfinished``: the share that reached ``max_new_tokens`` without the end-of-turn token,
  among the answers whose reference fits in ``max_new_tokens`` (so a limit set below the
  answers' length is not blamed on the model): the model has not learned to stop.
* ``eval_repetition``: the mean over the answers of seq-rep-4 (Welleck et al. 2019, "Neural
  Text Generation with Unlikelihood Training"): the share of an answer's token 4-grams that
  repeat an earlier 4-gram of the same answer. 0 for text that never repeats itself; an answer
  stuck in a loop scores near 1.
* ``eval_format_fail`` (with the sweep's ``answer_format``): the share whose stripped text does
  not match that regular expression in full (``re.fullmatch``). The data's own reference
  answers must match it (:func:`check_format`, before any trial).
* ``eval_score_fail`` (with the module's ``score``): the share that score 0 or less.

Forgetting (the sweep's ``retain_data``: general prompts with answers, in sft data's format):
the retain set is scored like the validation set -- its answers' token loss, and its generated
answers' score by :func:`contains` -- once before training (the base model: the fresh adapter
changes nothing yet) and at every evaluation, reported as ``retain_loss_before``,
``retain_score_before``, ``retain_loss`` and ``retain_score``. :func:`contains` rather than the
module's ``score``: that one judges the task being taught, and general answers are rarely
word for word.
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from hpo.errors import HpoError

REPEAT_N = 4
"""The n of seq-rep-n: Welleck et al.'s choice."""
RETAIN_KEYS = {"eval_loss": "retain_loss", "eval_score": "retain_score"}
"""How a retain set's evaluation is named in the reports."""


@dataclass(frozen=True)
class Answer:
    """One generated answer: its text, its tokens (the end token and what follows left out),
    and whether it ended with an end token before ``max_new_tokens``."""

    text: str
    tokens: list[int]
    ended: bool


def answer(tokens: Sequence[int], end_ids: set[int], decode: Callable[[list[int]], str]) -> Answer:
    """The answer held in a row of generated ``tokens`` (padding after an end token included)."""
    tokens = list(tokens)
    end = next((i for i, token in enumerate(tokens) if token in end_ids), None)
    kept = tokens if end is None else tokens[:end]
    return Answer(decode(kept), kept, end is not None)


def repetition(tokens: Sequence[int], n: int = REPEAT_N) -> float:
    """seq-rep-n: the share of the n-grams of ``tokens`` that repeat an earlier one (0 without any)."""
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def stats(answers: list[Answer], reference_lengths: list[int], max_new_tokens: int, answer_format: str | None,
          scores: list[float] | None) -> dict[str, float]:
    """``eval_unfinished``, ``eval_repetition`` and, where they apply, ``eval_format_fail`` and
    ``eval_score_fail`` (see the module doc). ``reference_lengths``: each reference's tokens."""
    fitting = [a for a, length in zip(answers, reference_lengths, strict=True) if length < max_new_tokens]
    values = {"eval_repetition": _share(repetition(a.tokens) for a in answers)}
    if fitting:
        values["eval_unfinished"] = _share(not a.ended for a in fitting)
    if answer_format is not None:
        pattern = re.compile(answer_format)
        values["eval_format_fail"] = _share(pattern.fullmatch(a.text.strip()) is None for a in answers)
    if scores is not None:
        values["eval_score_fail"] = _share(score <= 0 for score in scores)
    return values


def check_format(pattern: str, source: str, references: list[str]) -> None:
    """HpoError when reference answers of ``source`` break ``answer_format``: the model would be
    judged by a format its own data does not keep (a wrong regex, or wrong rows)."""
    compiled = re.compile(pattern)
    bad = [(row, text) for row, text in enumerate(references, 1) if compiled.fullmatch(text.strip()) is None]
    if bad:
        row, text = bad[0]
        raise HpoError(f"{source}: {len(bad)} of {len(references)} reference answers do not match "
                       f"answer_format '{pattern}' in full (row {row}: {text.strip()!r:.60}); fix the regular "
                       "expression (--set answer_format=...) or those rows")


def _share(values: Iterable[float]) -> float:
    """The mean of ``values`` (booleans count 1 and 0): a share of the answers."""
    values = [float(v) for v in values]
    return sum(values) / len(values)


def normalise(text: str) -> str:
    """Lower case, punctuation dropped, whitespace collapsed: how :func:`contains` compares."""
    text = text.lower().translate(str.maketrans(string.punctuation, " " * len(string.punctuation)))
    return " ".join(text.split())


def contains(prediction: str, reference: str) -> float:
    """1.0 when the reference's words appear, in order and together, in the prediction (case and
    punctuation ignored), else 0.0: the retain set's score ("Paris." in "The capital is Paris")."""
    wanted = normalise(reference)
    return float(bool(wanted) and f" {wanted} " in f" {normalise(prediction)} ")


def retain_metrics(evaluation: dict[str, float], suffix: str = "") -> dict[str, float]:
    """A retain set's evaluation under its report names (``retain_loss``, ``retain_score``),
    each with ``suffix`` (``_before`` for the base model's)."""
    return {name + suffix: evaluation[key] for key, name in RETAIN_KEYS.items()}
