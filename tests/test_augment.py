"""Text augmentation and sampling the base model: seeded, visible in training, off by default."""

from __future__ import annotations

from pathlib import Path

import pytest

from hpo import HpoError, Sweep
from hpo.train import training, worker_cache
from hpo.train.augment import Augmenter, load_synonyms
from hpo.train.recipe import TrainJob, TrainParams, check_params
from tests.conftest import SEARCH_SPACES

REVIEWS = SEARCH_SPACES / "data" / "reviews"


def test_augmenter_is_seeded_and_perturbs(tmp_path: Path) -> None:
    table = tmp_path / "syn.tsv"
    table.write_text("good\tfine\tgreat\nfilm\tmovie\n")
    synonyms = load_synonyms(str(table))
    assert synonyms == {"good": ["fine", "great"], "film": ["movie"]}
    text = "A good film, with a good cast and a slow second half."
    make = lambda: Augmenter(word_dropout=0.2, word_swap=0.2, synonym=1.0, synonyms=synonyms, seed=5)  # noqa: E731
    first, again = make(), make()
    outputs = [first(text) for _ in range(5)]
    assert outputs == [again(text) for _ in range(5)], "same seed, same perturbations"
    assert all(o != text for o in outputs)
    # synonym=1.0 replaces every word the table knows; the rest only drop out or trade places
    allowed = set(text.replace("good", "fine").replace("film", "movie").split()) | {"great"}
    assert all(set(o.split()) <= allowed and len(o.split()) <= len(text.split()) for o in outputs), outputs
    assert not [o for o in outputs if "good" in o or "film" in o], outputs
    assert any("movie" in o for o in outputs) and any("fine" in o or "great" in o for o in outputs), outputs
    plain = Augmenter(word_dropout=0.0, word_swap=0.0, synonym=1.0, synonyms=synonyms, seed=1)("Good film.")
    assert plain.split()[1] == "movie." and plain.split()[0] in ("Fine", "Great")


def test_bad_synonym_tables(tmp_path: Path) -> None:
    with pytest.raises(HpoError, match="no such synonym table"):
        load_synonyms(str(tmp_path / "none.tsv"))
    empty = tmp_path / "empty.tsv"
    empty.write_text("lonely\n")
    with pytest.raises(HpoError, match="no synonyms found"):
        load_synonyms(str(empty))


def test_augmentation_params_are_checked() -> None:
    assert check_params({"augment_word_dropout": 0.1}) is None
    assert "expected a number in [0, 1)" in check_params({"augment_word_swap": 1.5})
    assert "classification only" in check_params({"augment_word_dropout": 0.1}, "causal_lm")
    assert not TrainParams().augments and TrainParams(augment_synonym=0.2).augments


def test_training_with_augmentation_differs_and_repeats(tiny_bert: Path) -> None:
    sweep = Sweep(model=str(tiny_bert), train_data=str(REVIEWS / "train.tsv"), eval_data=str(REVIEWS / "eval.tsv"),
                  max_steps=6, eval_every=3, max_length=32)

    def losses(params: dict) -> list[float]:
        out: list[float] = []
        training.fine_tune(TrainJob.from_sweep(sweep, params), lambda step, m: out.append(m["train_loss"]))
        return out

    base = {"learning_rate": 3e-3, "batch_size": 8}
    plain = losses(base)
    augmented = losses({**base, "augment_word_dropout": 0.3, "augment_word_swap": 0.2})
    assert augmented != plain
    assert augmented == losses({**base, "augment_word_dropout": 0.3, "augment_word_swap": 0.2})


def test_a_space_may_choose_the_base_model_and_target_modules(tiny_bert: Path, tmp_path: Path) -> None:
    """Transfer learning as a choice: the same recipe on two base models, chosen by name."""
    import shutil

    other = tmp_path / "other-bert"
    shutil.copytree(tiny_bert, other)
    sweep = Sweep(model="unused-default", train_data=str(REVIEWS / "train.tsv"),
                  eval_data=str(REVIEWS / "eval.tsv"), max_steps=3, eval_every=3, max_length=32)
    assert check_params({"model": str(other), "target_modules": "query,key,value"}) is None
    job = TrainJob.from_sweep(sweep, {"model": str(other), "target_modules": "query,key,value"})
    assert job.model == str(other) and job.params.target_modules == ("query", "key", "value")
    seen: list[dict] = []
    training.fine_tune(job, lambda step, metrics: seen.append(metrics))
    assert seen and ("unused-default",) not in {k[:1] for k in worker_cache._BASE_MODELS}
    assert any(k[0] == str(other) for k in worker_cache._BASE_MODELS)
