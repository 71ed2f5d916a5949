"""Instruction tuning (task ``sft``): conversations in, token ids with answer-only labels out.

Data: any source :mod:`hpo.train.data` reads (JSONL, CSV/TSV, a hub id, a ``save_to_disk``
folder) with either

* ``prompt`` and ``completion`` columns (strings: one user turn and the answer; or lists of
  ``{role, content}`` messages, TRL's conversational prompt/completion form), or
* a ``messages`` column: a list of ``{role, content}`` (a JSON string in a CSV cell).

Formatting is the model's chat template (``tokenizer.apply_chat_template``), or the one the
``chat_template`` sweep field names (a Jinja file, or a model whose template to borrow).

Labels: the loss is on the assistant turns only. Each assistant turn's characters are found
by rendering the conversation up to the turn with ``add_generation_prompt=True`` and up to
its end; a token is labelled when its first character lies in such a span (so the turn's end
token, ``<|im_end|>`` for ChatML, is learned and generation stops); every other token's
label is -100. This needs a template whose rendering of a conversation's first turns is a
prefix of the whole conversation's; one that is not is refused, with the reason.

Packing (``packing=true``): whole tokenized examples are laid one after another into blocks
of ``max_length`` tokens (never split); each example's ``position_ids`` restart at 0 and its
first label is -100 (so no token learns to predict the next example's start). With sdpa or
eager attention and no 2-D attention mask, transformers builds a block-diagonal causal mask
from the positions, so an example attends only to itself. Flash attention reads packed
positions only from a single row, so with ``attn_implementation=flash_attention_*`` each
micro-batch goes padding-free (:func:`padding_free`, as TRL's ``padding_free`` does): its
rows flattened into one, padding dropped, with ``cu_seq_lens_q/k`` and ``max_length_q/k``
marking the examples for the varlen kernel. Evaluation is never packed (eval_loss stays
comparable).

Evaluation (:func:`evaluate`): token-weighted ``eval_loss``, ``eval_perplexity``, and a
generation score on the first ``generation_examples`` eval conversations: greedy decoding
of up to ``max_new_tokens`` from the prompt (left-padded batches), compared with the last
assistant turn: ``eval_exact_match`` (after strip) always, and ``eval_score`` when the
search-space module defines ``score(prediction, reference) -> float``; and what the answers show
besides (unfinished, repeating, in the wrong format: :mod:`hpo.train.answers`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hpo.errors import HpoError
from hpo.train import answers, data, models

Score = Callable[[str, str], float]
Messages = list[dict[str, str]]
IGNORE = -100


def read(source: str) -> list[Messages]:
    """The conversations in ``source``, one per row; HpoError for a row or file that is not one."""
    conversations = read_raw(source)
    for index, messages in enumerate(conversations):
        if not has_answer(messages):
            raise HpoError(f"{source}: row {index + 1}: no assistant message after the first one, so nothing to "
                           "learn; each conversation needs an answer (role 'assistant')")
    return conversations


def read_raw(source: str) -> list[Messages]:
    """The conversations as :func:`read` reads them, but those without an answer left in, so a
    checker (:mod:`hpo.analysis.checks_sft`) can count them all where :func:`read` stops at the first.
    A missing or malformed file or row (not a list of ``{role, content}``) still raises."""
    rows, columns = data.read_rows(source)
    if not rows:
        raise HpoError(f"{source}: the file has no data rows; give a file with examples")
    if "messages" in columns:
        return [_messages(source, i, row.get("messages")) for i, row in enumerate(rows)]
    if "prompt" in columns and "completion" in columns:
        return [_pair(source, i, row.get("prompt"), row.get("completion")) for i, row in enumerate(rows)]
    raise HpoError(f"{source}: sft data needs `prompt` and `completion` columns or a `messages` column "
                   f"(a list of {{role, content}}); found columns: {', '.join(columns) or 'none'}")


def has_answer(messages: Messages) -> bool:
    """Whether an assistant turn follows the first message: something to learn and to score."""
    return any(m["role"] == "assistant" for m in messages[1:])


def _messages(source: str, index: int, value: Any) -> Messages:
    where = f"{source}: row {index + 1}, column 'messages'"
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise HpoError(f"{where}: not a JSON list of {{role, content}} messages") from None
    if not isinstance(value, list) or not value:
        raise HpoError(f"{where}: expected a non-empty list of {{role, content}} messages, got {type(value).__name__}")
    for message in value:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) \
                or not isinstance(message.get("content"), str):
            raise HpoError(f"{where}: every message needs a string `role` and a string `content`; got {message!r:.80}")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _pair(source: str, index: int, prompt: Any, completion: Any) -> Messages:
    where = f"{source}: row {index + 1}"
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if isinstance(completion, str):
        completion = [{"role": "assistant", "content": completion}]
    if not isinstance(prompt, list) or not isinstance(completion, list):
        raise HpoError(f"{where}: `prompt` and `completion` must be strings (or lists of {{role, content}})")
    return _messages(source, index, prompt + completion)  # checked like a messages row


def chat_template(model: str, tokenizer: Any, override: str | None) -> str:
    """The Jinja chat template to format with: ``override`` (a file, or a model to borrow it
    from), else the tokenizer's own. HpoError naming the fix when there is none."""
    if override:
        path = Path(override).expanduser()
        if path.is_file():
            return path.read_text(encoding="utf-8")
        if path.suffix in (".jinja", ".j2", ".txt") or override.startswith((".", "/", "~")):
            raise HpoError(f"chat_template={override!r}: no such file; give a Jinja file or a model id")
        from transformers import AutoTokenizer

        try:
            borrowed = AutoTokenizer.from_pretrained(models.resolve(override)).chat_template
        except OSError as error:
            raise HpoError(f"chat_template={override!r}: could not load that model's tokenizer ({error})"[:300]) from None
        if not borrowed:
            raise HpoError(f"chat_template={override!r}: that model's tokenizer has no chat template either")
        return borrowed
    if not getattr(tokenizer, "chat_template", None):
        raise HpoError(f"model {model!r}: its tokenizer has no chat template, which task=sft formats with; "
                       "give one with --set chat_template=FILE.jinja or borrow a model's with "
                       f"--set chat_template={models.SMOLLM2}")
    return tokenizer.chat_template


@dataclass
class Example:
    """One tokenized conversation (or, packed, several): ids, labels and position ids."""

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int] | None = None


@dataclass
class SftSet:
    """Tokenized examples, plus the generation prompts and references of the scored subset."""

    examples: list[Example]
    pad_id: int
    prompts: list[list[int]] = field(default_factory=list)
    references: list[str] = field(default_factory=list)
    score: Score | None = None
    reference_lengths: list[int] = field(default_factory=list)
    """Each reference's tokens: an answer that needs more than ``max_new_tokens`` cannot end in time."""

    def __len__(self) -> int:
        return len(self.examples)


def tokenize(messages: Messages, tokenizer: Any, template: str, max_length: int) -> Example:
    """``messages`` as token ids, labels -100 except on the assistant turns (see module doc)."""
    def render(turns: Messages, prompt: bool = False) -> str:
        return tokenizer.apply_chat_template(turns, chat_template=template, tokenize=False,
                                             add_generation_prompt=prompt)

    text = render(messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or i == 0:
            continue
        before, through = render(messages[:i], prompt=True), render(messages[: i + 1])
        if not (through.startswith(before) and text.startswith(through)):
            raise HpoError("the chat template renders a conversation's first turns differently from the whole "
                           "conversation, so the answer tokens cannot be found; use another --set chat_template=...")
        spans.append((len(before), len(through)))
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoded["input_ids"])
    labels = [token if any(a <= start < b for a, b in spans) else IGNORE
              for token, (start, _) in zip(ids, encoded["offset_mapping"], strict=True)]
    return Example(ids[:max_length], labels[:max_length])


def last_answer(messages: Messages) -> str:
    """The last assistant turn's text: what generation is scored against."""
    return next(m["content"] for m in reversed(messages) if m["role"] == "assistant")


def prompt_ids(messages: Messages, tokenizer: Any, template: str, max_length: int) -> tuple[list[int], str]:
    """The tokens a model generates the last assistant turn from, and that turn's text."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    text = tokenizer.apply_chat_template(messages[:last], chat_template=template, tokenize=False,
                                         add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return list(ids[-max_length:]), messages[last]["content"]


def pack(examples: list[Example], max_length: int) -> list[Example]:
    """Lay whole examples one after another into blocks of at most ``max_length`` tokens,
    in order; each example's positions restart at 0 (so attention stays within it)."""
    blocks: list[Example] = []
    current = Example([], [], [])
    for example in examples:
        if current.input_ids and len(current.input_ids) + len(example.input_ids) > max_length:
            blocks.append(current)
            current = Example([], [], [])
        current.input_ids += example.input_ids
        current.labels += [IGNORE, *example.labels[1:]]  # the previous example's last token predicts nothing
        current.position_ids += list(range(len(example.input_ids)))  # type: ignore[operator]  # a block's start as []
    if current.input_ids:
        blocks.append(current)
    return blocks


def collate(dataset: SftSet, indices: Any) -> dict[str, torch.Tensor]:
    """Right-padded batch; packed blocks get ``position_ids`` and no attention mask (the
    padding tail is a segment of its own, with labels -100)."""
    chosen = [dataset.examples[i] for i in indices]
    width = max(len(e.input_ids) for e in chosen)
    ids = torch.full((len(chosen), width), dataset.pad_id, dtype=torch.long)
    labels = torch.full((len(chosen), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(chosen), width), dtype=torch.long)
    positions = torch.zeros((len(chosen), width), dtype=torch.long)
    for row, example in enumerate(chosen):
        n = len(example.input_ids)
        ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        mask[row, :n] = 1
        positions[row, :n] = torch.tensor(example.position_ids or range(n))
        positions[row, n:] = torch.arange(width - n)
    if chosen[0].position_ids is not None:
        return {"input_ids": ids, "labels": labels, "position_ids": positions}
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def wants_padding_free(attn_implementation: str) -> bool:
    """Whether packed batches must go as one flattened row: the flash-attention kernels (and hub
    kernels built on them) read packed sequences from ``cu_seq_lens``, or from the positions of
    a batch of one row; sdpa and eager read them from the positions of any batch."""
    return "flash" in attn_implementation


def padding_free(batch: dict[str, torch.Tensor], row_tokens: torch.Tensor | None) -> dict[str, Any]:
    """A packed batch (``[B, L]`` rows, ``position_ids`` restarting per example, padding at each
    row's end) as one row without padding: ``input_ids``, ``labels``, ``position_ids`` of shape
    ``[1, T]`` and the varlen kernel's ``cu_seq_lens_q/k`` (int32 offsets of the examples) and
    ``max_length_q/k``. The loss over it equals the rows' loss: every example's first label is
    -100 (:func:`pack`), so no token predicts across a boundary."""
    lengths = row_tokens.tolist() if row_tokens is not None else [batch["input_ids"].shape[1]] * len(batch["input_ids"])
    keep = [(row, int(n)) for row, n in enumerate(lengths) if n > 0]
    ids = torch.cat([batch["input_ids"][row, :n] for row, n in keep]).unsqueeze(0)
    labels = torch.cat([batch["labels"][row, :n] for row, n in keep]).unsqueeze(0)
    positions = torch.cat([batch["position_ids"][row, :n] for row, n in keep]).unsqueeze(0)
    starts = (positions[0] == 0).nonzero().flatten()
    offsets = torch.cat([starts, torch.tensor([positions.shape[1]])]).to(torch.int32)
    longest = int((offsets[1:] - offsets[:-1]).max())
    return {"input_ids": ids, "labels": labels, "position_ids": positions, "cu_seq_lens_q": offsets,
            "cu_seq_lens_k": offsets, "max_length_q": longest, "max_length_k": longest}


def datasets(job: Any, tokenizer: Any) -> tuple[SftSet, SftSet]:
    """The tokenized training set (packed if ``job.packing``) and validation set of ``job``."""
    template = chat_template(job.model, tokenizer, job.chat_template)
    train = read(job.train_data)
    if job.eval_data:
        evaluation = read(job.eval_data)
    else:
        kept, held = data.hold_out_rows(job.train_data, len(train), job.eval_fraction)
        train, evaluation = [train[i] for i in kept], [train[i] for i in held]
    if job.train_limit and len(train) > job.train_limit:
        train = [train[i] for i in sorted(random.Random(data.SPLIT_SEED).sample(range(len(train)), job.train_limit))]
    train_examples = _labelled(job.train_data, [tokenize(m, tokenizer, template, job.max_length) for m in train])
    if job.packing:
        train_examples = pack(train_examples, job.max_length)
    return (SftSet(train_examples, tokenizer.pad_token_id),
            eval_set(job, tokenizer, evaluation, template, job.eval_data or job.train_data))


def eval_set(job: Any, tokenizer: Any, conversations: list[Messages], template: str | None = None,
             source: str = "") -> SftSet:
    """A validation (or test) set: all conversations for the loss, the first
    ``job.generation_examples`` as generation prompts and references."""
    template = template or chat_template(job.model, tokenizer, job.chat_template)
    examples = _labelled(source, [tokenize(m, tokenizer, template, job.max_length) for m in conversations])
    scored = [prompt_ids(m, tokenizer, template, job.max_length) for m in conversations[: job.generation_examples]]
    references = [r for _, r in scored]
    return SftSet(examples, tokenizer.pad_token_id, [p for p, _ in scored], references,
                  reference_lengths=[len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in references])


def _labelled(source: str, examples: list[Example]) -> list[Example]:
    kept = [e for e in examples if any(label != IGNORE for label in e.labels)]
    if not kept:
        raise HpoError(f"{source}: no example keeps an answer token within max_length; raise --set max_length=...")
    return kept


def with_score(dataset: SftSet, score: Score | None) -> SftSet:
    """A view of a (cached) validation set that scores generations with ``score``."""
    return dataclasses.replace(dataset, score=score)


def exact_match(prediction: str, reference: str) -> float:
    return float(prediction.strip() == reference.strip())


@torch.no_grad()
def evaluate(job: Any, model: Any, tokenizer: Any, dataset: SftSet, batch_size: int) -> dict[str, float]:
    """eval_loss (mean over answer tokens), eval_perplexity, the generation scores and what the
    answers show besides (:func:`hpo.train.answers.stats`)."""
    from hpo.train import accelerator

    model.eval()
    device = next(model.parameters()).device
    precision = accelerator.resolve_precision(job.precision, device)
    total_loss, total_tokens = 0.0, 0
    for start in range(0, len(dataset), batch_size):
        batch = collate(dataset, range(start, min(start + batch_size, len(dataset))))
        tokens = int((batch["labels"][:, 1:] != IGNORE).sum())
        with accelerator.autocast(device, precision):
            loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
        total_loss += loss.item() * tokens
        total_tokens += tokens
    eval_loss = total_loss / max(1, total_tokens)
    metrics = {"eval_loss": eval_loss, "eval_perplexity": math.exp(min(eval_loss, 50.0))}
    if dataset.prompts:
        started = time.perf_counter()
        with accelerator.autocast(device, precision):  # as training ran: bf16/fp16 kernels, not fp32 upcasts
            generated = generate(model, tokenizer, dataset.prompts, job.max_new_tokens, batch_size, dataset.pad_id)
        predictions = [a.text for a in generated]
        metrics["eval_exact_match"] = _mean(_scores(exact_match, predictions, dataset.references))
        scores = _scores(dataset.score, predictions, dataset.references) if dataset.score is not None else None
        if scores is not None:
            metrics["eval_score"] = _mean(scores)
        metrics.update(answers.stats(generated, dataset.reference_lengths, job.max_new_tokens, job.answer_format,
                                     scores))
        metrics["generation_seconds"] = time.perf_counter() - started
    return metrics


def _scores(score: Score, predictions: list[str], references: list[str]) -> list[float]:
    return [float(score(p, r)) for p, r in zip(predictions, references, strict=True)]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


@torch.no_grad()
def generate(model: Any, tokenizer: Any, prompts: list[list[int]], max_new_tokens: int, batch_size: int,
             pad_id: int) -> list[answers.Answer]:
    """Greedy completions of ``prompts`` (token ids), in batches left-padded with ``pad_id``."""
    device = next(model.parameters()).device
    eos = {tokenizer.eos_token_id, *_as_list(getattr(model.generation_config, "eos_token_id", None))} - {None}
    decode = functools.partial(tokenizer.decode, skip_special_tokens=True)
    generated: list[answers.Answer] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, prompt in enumerate(chunk):
            ids[row, width - len(prompt):] = torch.tensor(prompt)
            mask[row, width - len(prompt):] = 1
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                             do_sample=False, num_beams=1, temperature=None, top_p=None, top_k=None,
                             pad_token_id=pad_id, eos_token_id=sorted(eos), use_cache=True)
        generated += [answers.answer(row, eos, decode) for row in out[:, width:].tolist()]
    return generated


def _as_list(value: Any) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def check(sweep: Any, tokenizer: Any = None) -> None:
    """Before any trial: the sft data (the retain set too) reads as conversations, its answers
    keep ``answer_format`` (the retain set's need not), and the tokenizer (loaded for
    ``sweep.model`` unless given) can format them."""
    for source in (sweep.train_data, sweep.eval_data, sweep.test_data, sweep.retain_data):
        if source:
            conversations = read(source)
            if sweep.answer_format and source != sweep.retain_data:
                answers.check_format(sweep.answer_format, source, [last_answer(m) for m in conversations])
    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(models.resolve(sweep.model))
    chat_template(sweep.model, tokenizer, sweep.chat_template)
