"""The typed sweep config: defaults, validation messages, --set overrides."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from hpo import HpoError, Sweep
from hpo import space as spaces
from hpo.config import parse_overrides


def test_defaults_follow_the_task() -> None:
    assert (Sweep().metric, Sweep().direction) == ("eval_accuracy", "maximize")
    causal = Sweep(task="causal_lm")
    assert (causal.metric, causal.direction) == ("eval_loss", "minimize")
    assert Sweep(metric="eval_perplexity").direction == "minimize"


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("max_steps", -5, "max_steps=-5 must be a whole number of at least 1"),
        ("eval_every", 0, "eval_every=0 must be a whole number"),
        ("pruner", "median", "pruner='median' must be one of asha, hyperband, none"),
        ("sampler", "grid", "must be one of tpe"),
        ("gpus_per_trial", 1.5, "above 1 must be a whole number"),
        ("timeout", -1.0, "must be a positive number of seconds"),
        ("eval_fraction", 1.0, "must lie between 0 and 1"),
        ("seed", -1, "seed=-1 must be a whole number from 0 to 4294967295"),
        ("seed", 2**32, "seed=4294967296 must be a whole number from 0 to 4294967295"),
    ],
)
def test_bad_values_name_the_field_and_the_flag(field: str, value: object, words: str) -> None:
    with pytest.raises(HpoError) as caught:
        Sweep(**{field: value})
    message = str(caught.value)
    assert words in message
    assert f"--set {field}=" in message


def test_unknown_metric_needs_a_direction() -> None:
    with pytest.raises(HpoError, match="direction=None must be maximize or minimize"):
        Sweep(metric="f1")
    assert Sweep(metric="f1", direction="maximize").mode == "max"


def test_eval_every_may_not_exceed_max_steps() -> None:
    with pytest.raises(HpoError, match="must not exceed max_steps=10"):
        Sweep(max_steps=10, eval_every=20)


def test_overrides_are_typed_by_the_fields() -> None:
    values = parse_overrides(["max_steps=30", "eval_data=none", "timeout=12.5", "model=org/name",
                              "text_column=review", "pruner=none", "seed=7"])
    assert values == {"max_steps": 30, "eval_data": None, "timeout": 12.5, "model": "org/name",
                      "text_column": "review", "pruner": "none", "seed": 7}
    sweep = dataclasses.replace(Sweep(), **values)
    assert sweep.max_steps == 30 and sweep.eval_data is None


@pytest.mark.parametrize(
    ("pair", "words"),
    [
        ("max_step=30", "unknown sweep field 'max_step'; did you mean max_steps?"),
        ("max_steps=lots", "--set max_steps=lots: must be a whole number"),
        ("pruner=median", "--set pruner=median: must be one of asha, hyperband, none"),
        ("max_steps", "expected KEY=VALUE"),
        ("extra=1", "unknown sweep field 'extra'"),
    ],
)
def test_bad_overrides(pair: str, words: str) -> None:
    with pytest.raises(HpoError) as caught:
        parse_overrides([pair])
    assert words in str(caught.value)


def test_set_extra_key_sets_one_key_of_a_modules_own_settings(tmp_path: Path) -> None:
    assert parse_overrides(["extra.bonus=0.5", "extra.name=abc", "extra.flag=true", "extra.sizes=[1, 2]"]) == \
        {"extra": {"bonus": 0.5, "name": "abc", "flag": True, "sizes": [1, 2]}}
    with pytest.raises(HpoError, match=r"expected extra.KEY=VALUE"):
        parse_overrides(["extra.=1"])
    module = tmp_path / "own.py"
    module.write_text("import hpo\nsweep = hpo.Sweep(metric='score', direction='maximize', extra={'a': 1, 'b': 2})\n"
                      "def space(trial):\n    return {}\n\ndef train(params, report, sweep):\n    pass\n")
    assert spaces.load(module, ["extra.b=3", "extra.c=x"]).sweep.extra == {"a": 1, "b": 3, "c": "x"}, \
        "merged into the module's own, key by key"
    assert spaces.load(module).sweep.extra == {"a": 1, "b": 2}
