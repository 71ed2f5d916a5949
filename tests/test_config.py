"""The typed sweep config: defaults, validation messages, --set overrides."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from hpo import HpoError, Sweep, config
from hpo import space as spaces
from hpo.overrides import parse_overrides
from hpo.run.ranking import mode
from hpo.train.recipe import PARAM_NAMES, RESOLVED_ON_WORKER, SEARCH_FIELDS, TRAINING_FIELDS, TrainJob


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
    assert mode(Sweep(metric="f1", direction="maximize")) == "max"


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


def test_a_trial_run_records_every_training_setting_of_the_sweep() -> None:
    """One config path: a training setting is a Sweep field, which the job carries and each trial's MLflow run
    records (device and precision as the worker resolves them); the driver's own fields stay on the sweep's run."""
    assert set(SEARCH_FIELDS) <= {f.name for f in dataclasses.fields(Sweep)}, "a name that is no Sweep field"
    sweep = Sweep(task="sft", train_limit=40, patience=2, synonyms="s.tsv", chat_template="t.jinja",
                  answer_format=r"\d+", retain_data="r.jsonl", eval_data="e.jsonl", text_column="t", label_column="l")
    job = TrainJob.from_sweep(sweep, {"batch_size": 8.0, "model": "other/model", "seed": 3})
    described = job.describe()
    assert set(described) == {*TRAINING_FIELDS, *PARAM_NAMES, "restore_best", "watch", "watch_mode", "min_steps"} \
        - set(RESOLVED_ON_WORKER) - {"target_modules"}, "target_modules only when the space chose them"
    assert {name: described[name] for name in TRAINING_FIELDS if name not in RESOLVED_ON_WORKER} == \
        {**{name: getattr(sweep, name) for name in TRAINING_FIELDS if name not in RESOLVED_ON_WORKER},
         "model": "other/model", "seed": 3}, "the trial's model and seed over the sweep's"
    assert (job.model, job.seed, job.params.batch_size, job.sweep is sweep) == ("other/model", 3, 8, True)
    assert {"max_length", "eval_every", "packing", "lean_loss", "generation_examples"} <= set(described)
    assert not {"metric", "sampler", "trials", "gpus_per_trial", "test_data", "extra"} & set(described)


def test_with_settings_checks_the_changed_sweep_again() -> None:
    job = TrainJob.from_sweep(Sweep(max_steps=20, eval_every=10), {})
    assert job.with_settings(max_steps=40).sweep.max_steps == 40
    with pytest.raises(HpoError, match="eval_every=30 must not exceed max_steps=20"):
        job.with_settings(eval_every=30)


def test_the_choices_of_a_field_are_its_annotations() -> None:
    """One list per choice field: the checks, --set and the docs read the Literal annotation."""
    assert config.SAMPLERS == ("tpe-qmc", "tpe", "random", "qmc", "gp", "cmaes")
    assert (config.PRECISIONS, config.QUANTIZATIONS) == (("auto", "bf16", "fp16", "fp32"), ("none", "4bit", "8bit"))
    assert config.DIRECTIONS == ("maximize", "minimize") and config.TASKS == ("classification", "causal_lm", "sft")
    with pytest.raises(HpoError, match=r"--set precision=fp8: must be one of auto, bf16, fp16, fp32"):
        parse_overrides(["precision=fp8"])


def test_comma_separated_names_read_one_way() -> None:
    assert config.split_commas("eval_accuracy, peak_memory_mb") == ("eval_accuracy", "peak_memory_mb")
    sweep = Sweep(metric="eval_accuracy , peak_memory_mb", direction="maximize , minimize")
    assert (sweep.metric, sweep.metrics, sweep.directions) == (
        "eval_accuracy,peak_memory_mb", ("eval_accuracy", "peak_memory_mb"), ("maximize", "minimize"))
