"""Text embeddings for the data checks: the base model's frozen, mean-pooled hidden states.

:func:`embed` is the one place the deeper data checks turn texts into vectors: the label
probe (:mod:`hpo.analysis.label_issues`) fits a classifier on them and the paraphrase check
(:mod:`hpo.analysis.near_duplicates`) compares them by cosine. The model is the sweep's base
model (``--set model=...``; the packaged all-MiniLM-L6-v2 by default), loaded with
``AutoModel`` (no task head) and run on the CPU under ``torch.no_grad``; each text's vector is
the mean of its last hidden states over real tokens (padding masked), L2-normalised, so a dot
product is a cosine. That is how sentence-transformers pools all-MiniLM-L6-v2.

Speed: texts are sorted by length and embedded in batches of 64 (``BATCH``), so a batch pads
little; torch gets only the cores the machine's load leaves free (:func:`_free_cores`). SST-2
phrases (about 10 tokens) went at 90-180 a second on one busy core of this 2-core machine.
"""

from __future__ import annotations

from typing import Any

BATCH = 64
MAX_TOKENS = 128
"""Texts are cut to this many tokens for embedding (enough for a sentence's meaning)."""


def embed(texts: list[str], model_name: str, *, max_tokens: int = MAX_TOKENS, batch: int = BATCH) -> Any:
    """A float32 numpy array of shape (len(texts), hidden): one unit-length vector per text.

    Raises HpoError when ``model_name`` cannot be loaded (not downloaded, or no such model).
    """
    import torch

    model, tokenizer = _load(model_name)
    threads = torch.get_num_threads()
    torch.set_num_threads(_free_cores(threads))
    try:
        return _embed(texts, model, tokenizer, max_tokens, batch)
    finally:
        torch.set_num_threads(threads)


def _embed(texts: list[str], model: Any, tokenizer: Any, max_tokens: int, batch: int) -> Any:
    import numpy as np
    import torch

    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    vectors = np.zeros((len(texts), model.config.hidden_size), dtype=np.float32)
    with torch.no_grad():
        for start in range(0, len(order), batch):
            indices = order[start:start + batch]
            encoded = tokenizer([texts[i] or " " for i in indices], padding=True, truncation=True,
                                max_length=max_tokens, return_tensors="pt")
            hidden = model(**encoded).last_hidden_state
            mask = encoded["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            pooled = torch.nn.functional.normalize(pooled, dim=-1)
            vectors[indices] = pooled.float().numpy()
    return vectors


def _free_cores(threads: int) -> int:
    """Threads for torch: the cores not already busy (by the 1-minute load), at least one.

    On a shared machine torch's default (one thread per core) is 3-4 times slower than one
    thread when the cores are already busy: measured on this 2-core machine at load 6, 400
    SST-2 phrases took 3.1-4.4 s on one thread and 13.7-15.9 s on two."""
    import os

    try:
        busy = os.getloadavg()[0]
    except OSError:
        return threads
    return max(1, min(threads, int((os.cpu_count() or 1) - busy + 0.5)))


_LOADED: dict[str, tuple[Any, Any]] = {}


def _load(model_name: str) -> tuple[Any, Any]:
    """The model and tokenizer, loaded once per process (a check may embed several splits)."""
    if model_name not in _LOADED:
        from transformers import AutoModel, AutoTokenizer

        from hpo.errors import HpoError
        from hpo.train import models

        path = models.resolve(model_name)
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
            model = AutoModel.from_pretrained(path).eval()
        except (OSError, ValueError) as error:
            raise HpoError(f"model {model_name!r}: cannot load it to embed texts ({type(error).__name__}); "
                           "check --set model=..., or that it is downloaded") from None
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        _LOADED[model_name] = (model, tokenizer)
    return _LOADED[model_name]
