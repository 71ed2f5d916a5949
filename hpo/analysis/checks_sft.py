"""Data checks for instruction tuning (task ``sft``): what ``hpo check-data`` reports for it.

:func:`hpo.analysis.checks.check_data` calls :func:`check_sft` for ``task="sft"``; the findings and
the report are :mod:`hpo.analysis.checks_report`'s, numbered the same way ("row 1" is the first data row).
Conversations are read as training reads them (:func:`hpo.train.sft.read_raw`: the rows of
:func:`hpo.train.sft.read`, with those that have no answer kept so that every one is counted);
without ``eval_source`` the validation set is the held-out ``eval_fraction`` of the training
rows, as :func:`hpo.train.sft.datasets` holds it out (:func:`hpo.train.data.hold_out_rows`).

In a conversation the *answer* is the last assistant turn (what generation is scored
against) and the *prompt* every turn before it (what generation starts from). The prompt's
text is the unit of duplicates, conflicts and leakage, as a row's text is for classification.

Per file (train, and the eval file when given):

* ``no_answer`` (error): no assistant turn after the first message: nothing to learn or
  score (:func:`hpo.train.sft.read` refuses the file).
* ``answer_not_last`` (warning): turns after the last answer; they carry no loss and the
  generation score ignores them (training still learns the earlier answers).
* ``empty_prompt`` (no text before the answer but a system turn's) and ``empty_answer``: an
  error above 1% of the rows (``EMPTY_ERROR_SHARE``), a warning below.
* ``duplicate`` / ``near_duplicate`` (warning): a prompt that repeats an earlier one exactly,
  or once lowercased, punctuation dropped and whitespace collapsed.
* ``conflicting_answers`` (warning): the same (near) prompt with different answers (after
  strip, as ``eval_exact_match`` compares them).
* ``truncated``: conversations longer than ``max_length`` tokens; a warning above 5% of the
  rows (``TRUNCATED_WARNING_SHARE``), info below.
* ``answer_lost``: every answer token lies past ``max_length``, so training drops the
  conversation and learns nothing from it; an error above 1% of the rows, a warning below.
* ``answer_cut`` (warning): some answer tokens lie past ``max_length``: the model learns
  answers without their end, and never the end-of-turn token that stops generation.

Between the splits, ``leakage``: validation prompts also in training (a warning, an error
from 20% of the validation rows, ``LEAKAGE_ERROR_SHARE``).

Tokens: with ``tokenizer``, each conversation is formatted with the chat template and
labelled by :func:`hpo.train.sft.tokenize`, exactly as training does; without, each turn counts
1.3 tokens per word (``TOKENS_PER_WORD``), and the template's own tokens are not counted.
``stats`` per split: ``rows``; ``tokens`` (the whole conversation); ``prompt_tokens`` (the
tokens without loss) and ``answer_tokens`` (those with loss: the assistant turns after the
first message), before truncation; ``loss_token_share``: of the tokens training sees (each
conversation cut at ``max_length``), the share that carry loss.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

from hpo.analysis.checks_report import Finding, _finding
from hpo.analysis.checks_text import (
    EMPTY_ERROR_SHARE,
    TOKENS_PER_WORD,
    _duplicate_findings,
    _leakage_findings,
    _length_stats,
    _normalize,
    _Part,
    _truncation_findings,
    pick,
    train_and_eval,
)
from hpo.train import sft


@dataclass
class _Conversations:
    """One split's conversations: ``part`` holds row numbers, prompt texts, normalized prompts
    and whole-conversation token counts; the rest is per conversation too."""

    part: _Part
    conversations: list[sft.Messages]
    answers: list[str]
    loss: list[int]
    """Tokens with loss (answer tokens), before truncation."""
    kept_loss: list[int]
    """Tokens with loss within the first ``max_length`` tokens."""

    def take(self, indices: list[int]) -> _Conversations:
        return _Conversations(self.part.take(indices), pick(self.conversations, indices), pick(self.answers, indices),
                              pick(self.loss, indices), pick(self.kept_loss, indices))


def check_sft(train_source: str, eval_source: str | None, max_length: int, eval_fraction: float, tokenizer: Any,
              template: str | None) -> tuple[list[Finding], dict]:
    """Findings and per-split stats (see the module docstring); ``template`` is the chat
    template to format with (default: the tokenizer's), unused without ``tokenizer``."""
    if tokenizer is not None:
        template = template or sft.chat_template(getattr(tokenizer, "name_or_path", "?"), tokenizer, None)
        method = "tokenizer and chat template"
    else:
        method = f"approximate: {TOKENS_PER_WORD} tokens per word, chat template not counted"
    findings: list[Finding] = []
    files = []
    for source in filter(None, (train_source, eval_source)):
        split = _read(source, max_length, tokenizer, template)
        findings += _turn_findings(split)
        findings += _duplicate_findings(split.part, "prompts", "row")
        findings += _conflict_findings(split)
        findings += _truncation_findings(split.part, max_length, method)
        findings += _answer_findings(split, max_length)
        files.append(split)
    train, evaluation = train_and_eval(files, train_source, eval_source, eval_fraction, len(files[0].answers))
    findings += _leakage_findings(train.part, evaluation.part, "prompts", held_out=not eval_source)
    stats = {name: _split_stats(split, max_length) for name, split in (("train", train), ("eval", evaluation))}
    return findings, {"token_counts": method, **stats}


def _read(source: str, max_length: int, tokenizer: Any, template: str | None) -> _Conversations:
    conversations = sft.read_raw(source)
    prompts, answers, tokens, loss, kept_loss = [], [], [], [], []
    for messages in conversations:
        last = _last_answer(messages)
        prompts.append("\n\n".join(m["content"] for m in messages[:last]))
        answers.append(messages[last]["content"] if last < len(messages) else "")
        if tokenizer is not None and template is not None:  # check_sft gives both or neither
            labelled = [label != sft.IGNORE for label in sft.tokenize(messages, tokenizer, template, sys.maxsize).labels]
        else:
            labelled = []
            for i, message in enumerate(messages):
                count = int(len(message["content"].split()) * TOKENS_PER_WORD + 0.5)
                labelled += [message["role"] == "assistant" and i > 0] * count
        tokens.append(len(labelled))
        loss.append(sum(labelled))
        kept_loss.append(sum(labelled[:max_length]))
    part = _Part(source, list(range(1, len(conversations) + 1)), prompts, [_normalize(p) for p in prompts],
                 [None] * len(prompts), tokens)
    return _Conversations(part, conversations, answers, loss, kept_loss)


def _last_answer(messages: sft.Messages) -> int:
    """The index of the last assistant turn after the first message, or len(messages) when none."""
    answers = [i for i, m in enumerate(messages) if m["role"] == "assistant" and i > 0]
    return answers[-1] if answers else len(messages)


def _asks(messages: sft.Messages) -> bool:
    """Whether a turn before the answer, other than a system turn, has text."""
    return any(m["content"].strip() for m in messages[:_last_answer(messages)] if m["role"] != "system")


def _turn_findings(split: _Conversations) -> list[Finding]:
    source, total = split.part.source, len(split.answers)
    answered = [i for i, messages in enumerate(split.conversations) if sft.has_answer(messages)]
    findings = []
    missing = sorted(set(range(total)) - set(answered))
    if missing:
        findings.append(_finding(
            "error", "no_answer", source, missing,
            f"{len(missing)} of {total} conversations have no assistant turn after the first message: nothing to "
            "learn or score (training refuses the file); give each conversation its answer (role 'assistant')"))
    trailing = [i for i in answered if split.conversations[i][-1]["role"] != "assistant"]
    if trailing:
        first = split.conversations[trailing[0]]
        findings.append(_finding(
            "warning", "answer_not_last", source, trailing,
            f"{len(trailing)} of {total} conversations go on after their last answer (row {trailing[0] + 1} ends "
            f"with a {first[-1]['role']!r} turn): those turns carry no loss and the generation score ignores "
            "them; end each conversation with the assistant's answer"))
    empty_prompts = [i for i in answered if not _asks(split.conversations[i])]
    empty_answers = [i for i in answered if not split.answers[i].strip()]
    for code, rows, what, fix in (
            ("empty_prompt", empty_prompts, "an empty prompt (no text before the answer but a system turn's)",
             "the model learns answers to no question: drop them, or check the prompt column"),
            ("empty_answer", empty_answers, "an empty answer",
             "the model learns to answer nothing: drop them, or check the completion column")):
        if rows:
            share = len(rows) / total
            findings.append(_finding("error" if share > EMPTY_ERROR_SHARE else "warning", code, source, rows,
                                     f"{len(rows)} of {total} conversations ({share:.1%}) have {what}; {fix}"))
    return findings


def _conflict_findings(split: _Conversations) -> list[Finding]:
    groups: dict[str, list[int]] = {}
    for i, key in enumerate(split.part.keys):
        if key and split.answers[i].strip():
            groups.setdefault(key, []).append(i)
    conflicts = [rows for rows in groups.values() if len({split.answers[i].strip() for i in rows}) > 1]
    if not conflicts:
        return []
    rows = [i for group in conflicts for i in group]
    first = conflicts[0][0]
    second = next(i for i in conflicts[0] if split.answers[i].strip() != split.answers[first].strip())
    return [_finding(
        "warning", "conflicting_answers", split.part.source, rows,
        f"{len(conflicts)} of {len(split.answers)} prompts appear with different answers ({len(rows)} rows; row {first + 1} answers "
        f"{split.answers[first].strip()[:40]!r}, row {second + 1} {split.answers[second].strip()[:40]!r}); "
        "exact match can credit only one: fix or drop them, unless several answers are right")]


def _answer_findings(split: _Conversations, max_length: int) -> list[Finding]:
    source, total = split.part.source, len(split.answers)
    lost = [i for i, (loss, kept) in enumerate(zip(split.loss, split.kept_loss, strict=True)) if loss and not kept]
    cut = [i for i, (loss, kept) in enumerate(zip(split.loss, split.kept_loss, strict=True)) if 0 < kept < loss]
    findings = []
    if lost:
        share = len(lost) / total
        findings.append(_finding(
            "error" if share > EMPTY_ERROR_SHARE else "warning", "answer_lost", source, lost,
            f"{len(lost)} of {total} conversations ({share:.1%}) have their whole answer past max_length={max_length} "
            f"tokens (row {lost[0] + 1}: {split.part.tokens[lost[0]]} tokens, {split.loss[lost[0]]} of them answer): "
            "training drops them and learns nothing from them; raise --set max_length=... or shorten the prompts"))
    if cut:
        findings.append(_finding(
            "warning", "answer_cut", source, cut,
            f"{len(cut)} of {total} conversations have their answer cut at max_length={max_length} tokens (row "
            f"{cut[0] + 1} keeps {split.kept_loss[cut[0]]} of {split.loss[cut[0]]} answer tokens): the model learns "
            "answers without their end, and not to stop; raise --set max_length=..."))
    return findings


def _split_stats(split: _Conversations, max_length: int) -> dict:
    tokens = split.part.tokens
    seen = sum(min(count, max_length) for count in tokens)
    return {"source": split.part.source, "rows": len(tokens), "tokens": _length_stats(tokens, max_length),
            "prompt_tokens": _spread([count - loss for count, loss in zip(tokens, split.loss, strict=True)]),
            "answer_tokens": _spread(split.loss),
            "loss_token_share": round(sum(split.kept_loss) / seen, 4) if seen else 0.0}


def _spread(counts: list[int]) -> dict:
    lengths = _length_stats(counts, 0)
    return {key: lengths[key] for key in ("p50", "p95", "max")} if lengths else {}


def describe(split: dict, stats: dict) -> str:
    """One line for a split in :meth:`hpo.analysis.checks_report.DataReport.lines`."""
    prompt, answer, tokens = split["prompt_tokens"], split["answer_tokens"], split["tokens"]
    if not tokens:
        return f"{split['rows']} conversations ({split['source']})"
    return (f"{split['rows']} conversations ({split['source']}); prompt tokens p50 {prompt['p50']}, p95 "
            f"{prompt['p95']}, max {prompt['max']}; answer tokens p50 {answer['p50']}, p95 {answer['p95']}, max "
            f"{answer['max']}; {split['loss_token_share']:.1%} of the tokens seen carry loss; "
            f"{tokens['truncated_share']:.1%} over max_length {stats['max_length']}")
