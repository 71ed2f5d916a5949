"""The data as the model sees it: a job's tokenized datasets, the run's endless seeded batches, and
how a batch is put together and moved to the device.

Every rank of a multi-worker trial draws the same batches (same seed) and takes its share of each
(:func:`hpo.train.training.optimizer_step`). Classification may augment its texts per batch
(:mod:`hpo.train.augment`), so each epoch sees other perturbations; sft batches may be grouped by
length, or packed (:mod:`hpo.train.sft`). The tokenized datasets are built here and cached per worker
by :mod:`hpo.train.worker_cache`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch

from hpo.train import data, sft
from hpo.train.recipe import TrainJob

ROW_TOKENS = "hpo_row_tokens"
"""Batch key (not a model input): each row's real tokens (padding left out), for tokens/s."""


def build_datasets(job: TrainJob, tokenizer: Any) -> tuple[Any, Any, int]:
    """The tokenized training and validation sets of ``job`` and its number of labels (0 but for
    classification): sft's through :func:`hpo.train.sft.datasets`, causal LM's as blocks of
    ``max_length`` tokens. Read afresh: :func:`hpo.train.worker_cache.datasets` keeps them per worker."""
    sweep = job.sweep
    if sweep.task == "sft":
        return (*sft.datasets(job, tokenizer), 0)
    train = data.read(sweep.train_data, sweep.task, sweep.text_column, sweep.label_column)
    if sweep.eval_data:
        evaluation = data.read(sweep.eval_data, sweep.task, sweep.text_column, sweep.label_column)
    else:
        train, evaluation = data.hold_out(train, sweep.eval_fraction)
    if sweep.train_limit:
        train = data.sample(train, sweep.train_limit)
    if sweep.task == "causal_lm":
        return blocks(train, tokenizer, sweep.max_length), blocks(evaluation, tokenizer, sweep.max_length), 0
    num_labels = max(max(train.labels), max(evaluation.labels)) + 1  # type: ignore[arg-type]
    return (ClassificationSet((tokenize(train.texts, tokenizer, sweep.max_length), train.labels, train.texts)),
            ClassificationSet((tokenize(evaluation.texts, tokenizer, sweep.max_length), evaluation.labels)),
            max(2, num_labels))


class ClassificationSet(tuple):
    """(token features, labels) with a length, so both tasks' datasets have ``len``."""

    def __len__(self) -> int:
        return len(self[1])


def tokenize(texts: list[str], tokenizer: Any, max_length: int) -> list[dict]:
    encoded = tokenizer(texts, truncation=True, max_length=max_length)
    return [{k: encoded[k][i] for k in encoded.keys()} for i in range(len(texts))]


def blocks(examples: data.Examples, tokenizer: Any, block_size: int) -> Any:
    ids: list[int] = []
    for text in examples.texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
    n_blocks = len(ids) // block_size
    if n_blocks == 0:
        from hpo.errors import HpoError

        raise HpoError(f"{examples.source}: only {len(ids)} tokens, fewer than one block of max_length={block_size}")
    return torch.tensor(ids[: n_blocks * block_size]).view(n_blocks, block_size)


def training_batches(job: TrainJob, train_set: Any, tokenizer: Any) -> Iterator[dict[str, Any]]:
    """The run's endless training batches: seeded, augmented (classification with an augmentation
    sampled), grouped by length (sft's ``group_by_length`` without packing)."""
    sweep = job.sweep
    augment = _augmenter(job) if sweep.task == "classification" and job.params.augments else None
    lengths = [len(e.input_ids) for e in train_set.examples] if sweep.task == "sft" and sweep.group_by_length \
        and not sweep.packing else None
    return _batches(train_set, job.params.batch_size, job.seed, tokenizer, sweep.task, augment, sweep.max_length,
                    lengths)


def is_padding_free(job: TrainJob) -> bool:
    """Whether packed sft batches go as one flattened row (flash attention: :func:`hpo.train.sft.padding_free`)."""
    return job.sweep.task == "sft" and job.sweep.packing and sft.wants_padding_free(job.sweep.attn_implementation)


def _batches(train_set: Any, batch_size: int, seed: int, tokenizer: Any, task: str,
             augment: Callable[[str], str] | None = None, max_length: int = 0, lengths: list[int] | None = None):
    """Endless seeded shuffled batches: each epoch a new permutation of the training set.
    With ``lengths`` (``group_by_length``), batches of similar lengths: see :func:`grouped_by_length`."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(train_set), generator=generator).tolist()
        if lengths is not None:
            order = grouped_by_length(order, lengths, batch_size, generator)
        for start in range(0, len(order) - batch_size + 1 if len(order) >= batch_size else 1, batch_size):
            yield collate(train_set, order[start : start + batch_size], tokenizer, task, augment, max_length)


def grouped_by_length(order: list[int], lengths: list[int], batch_size: int, generator: torch.Generator,
                      mega: int = 50) -> list[int]:
    """An epoch's shuffled ``order`` rearranged so that each batch holds examples of similar
    length, as transformers' ``LengthGroupedSampler`` does: chunks of ``mega`` batches, each
    sorted by length (longest first), cut into batches whose order is then shuffled (the
    longest batch first, so an out-of-memory error shows at the first step)."""
    chunk = mega * batch_size
    batches: list[list[int]] = []
    for start in range(0, len(order), chunk):
        part = sorted(order[start : start + chunk], key=lambda i: -lengths[i])
        batches += [part[i : i + batch_size] for i in range(0, len(part), batch_size)]
    full = [b for b in batches if len(b) == batch_size] or batches
    longest = max(range(len(full)), key=lambda i: lengths[full[i][0]])
    full[0], full[longest] = full[longest], full[0]
    rest = [full[0]] + [full[1:][i] for i in torch.randperm(len(full) - 1, generator=generator).tolist()]
    return [i for batch in rest for i in batch]


def _augmenter(job: TrainJob) -> Callable[[str], str]:
    from hpo.train.augment import Augmenter, load_synonyms

    p = job.params
    return Augmenter(word_dropout=p.augment_word_dropout, word_swap=p.augment_word_swap, synonym=p.augment_synonym,
                     synonyms=load_synonyms(job.sweep.synonyms), seed=job.seed)


def collate(dataset: Any, indices: Any, tokenizer: Any, task: str,
             augment: Callable[[str], str] | None = None, max_length: int = 0) -> dict[str, Any]:
    """A training batch of ``indices``, with each row's real token count under :data:`ROW_TOKENS`."""
    indices = list(indices)
    batch = model_inputs(dataset, indices, tokenizer, task, augment, max_length)
    if task == "sft":
        lengths = [len(dataset.examples[i].input_ids) for i in indices]
        batch[ROW_TOKENS] = torch.tensor(lengths)
    elif "attention_mask" in batch:
        batch[ROW_TOKENS] = batch["attention_mask"].sum(-1)
    else:
        batch[ROW_TOKENS] = torch.full((batch["input_ids"].shape[0],), batch["input_ids"].shape[1])
    return batch


def model_inputs(dataset: Any, indices: Any, tokenizer: Any, task: str,
                  augment: Callable[[str], str] | None = None, max_length: int = 0) -> dict[str, Any]:
    indices = list(indices)
    if task == "sft":
        return sft.collate(dataset, indices)
    if task == "causal_lm":
        blocks = dataset[indices]
        return {"input_ids": blocks, "labels": blocks}
    features, labels = dataset[0], dataset[1]
    if augment is not None:  # tokenized per batch: each epoch sees other perturbations
        texts = [augment(dataset[2][i]) for i in indices]
        batch = tokenizer(texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        batch["labels"] = torch.tensor([labels[i] for i in indices])
        return dict(batch)
    batch = tokenizer.pad([features[i] for i in indices], return_tensors="pt")
    batch["labels"] = torch.tensor([labels[i] for i in indices])
    return dict(batch)


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The batch on ``device``; to a GPU through pinned host memory, so the copy is asynchronous
    (``non_blocking`` from pageable memory is a synchronous copy)."""
    if device.type != "cuda":
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    return {k: v.pin_memory().to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()}
