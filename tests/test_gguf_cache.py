"""The GGUF conversion cache (hpo.train.gguf_convert.converted) heals itself: a folder left
without config.json, staging folders of killed conversions, a GGUF file whose content
changed. The 30-s transformers conversion itself is replaced by one that writes a
config.json (the real one runs in test_sft_sweep.py); the cache, its lock and its renames
are the real ones."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from hpo.train import gguf_convert


@pytest.fixture
def conversions(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """What each conversion read (the GGUF's bytes, as text); it writes a config.json."""
    done: list[str] = []

    def convert(gguf_path: Path, folder: Path) -> None:
        done.append(gguf_path.read_text())
        (folder / "config.json").write_text(json.dumps({"from": done[-1]}))

    monkeypatch.setattr(gguf_convert, "_convert", convert)
    return done


def test_a_folder_without_config_json_and_killed_stagings_are_replaced(tmp_path: Path, conversions: list[str]) -> None:
    gguf = tmp_path / "model.Q4.gguf"
    gguf.write_text("version 1")
    base = tmp_path / "cache" / "models" / "model"
    target = gguf_convert.converted(gguf, base)
    assert (target / "config.json").is_file() and conversions == ["version 1"]

    (target / "config.json").unlink()  # a folder some crash or hand left incomplete
    (target / "model.safetensors").write_text("half")
    killed = target.parent / f".{target.name}-k1ll3d"  # a conversion killed with -9
    killed.mkdir()
    (killed / "model.safetensors").write_text("partial")
    assert gguf_convert.converted(gguf, base) == target
    assert json.loads((target / "config.json").read_text()) == {"from": "version 1"}
    assert sorted(p.name for p in target.iterdir()) == ["config.json"], "the broken folder was replaced whole"
    assert [p.name for p in target.parent.iterdir() if p.is_dir()] == [target.name], "no staging folder left"
    assert gguf_convert.converted(gguf, base) == target and len(conversions) == 2, "then a cache hit"


def test_the_cache_follows_the_gguf_files_content(tmp_path: Path, conversions: list[str]) -> None:
    gguf = tmp_path / "model.Q4.gguf"
    gguf.write_text("version 1")
    base = tmp_path / "cache" / "model"
    first = gguf_convert.converted(gguf, base)
    gguf.write_text("version 2")  # the package was upgraded: same name, new weights
    os.utime(gguf, ns=(1, 1))
    second = gguf_convert.converted(gguf, base)
    assert second != first and conversions == ["version 1", "version 2"]
    assert json.loads((second / "config.json").read_text()) == {"from": "version 2"}
    copy = tmp_path / "elsewhere" / "model.Q4.gguf"  # the same content at another path: the same folder
    copy.parent.mkdir()
    copy.write_text("version 2")
    assert gguf_convert.converted(copy, base) == second and len(conversions) == 2
