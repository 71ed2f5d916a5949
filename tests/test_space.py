"""Search-space modules: every shipped one loads and samples; bad modules give one clear line."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from hpo import HpoError, Sweep
from hpo import space as spaces
from hpo.train.recipe import TrainJob, TrainParams
from tests.conftest import SEARCH_SPACES

SHIPPED = sorted(SEARCH_SPACES.glob("*.py"))


def test_the_shipped_modules_are_there() -> None:
    assert {p.name for p in SHIPPED} >= {"lora.py", "causal_lm_lora.py"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_module_loads_samples_and_builds_a_job(path: Path) -> None:
    loaded = spaces.load(path)
    assert isinstance(loaded.sweep, Sweep)
    assert "hpo search search_spaces/" in (loaded.module.__doc__ or ""), "docstring opens with the command"
    assert Path(loaded.sweep.train_data).is_file(), "shipped data resolves relative to the module"
    study = optuna.create_study(direction=loaded.sweep.direction, sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(5):
        params = spaces.call_space(loaded, study.ask())
        job = TrainJob.from_sweep(loaded.sweep, params)
        assert isinstance(job.params, TrainParams)
        assert job.params.learning_rate == params["learning_rate"]


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_a_shipped_module_samples_within_its_own_priors(path: Path) -> None:
    """A prior names a parameter the space samples, and the space never samples past it."""
    loaded = spaces.load(path)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        params = spaces.call_space(loaded, study.ask())
        for name, prior in loaded.priors.items():
            assert name in params and prior.allows(params[name]), f"{path.name}: {name}={params.get(name)} vs {prior}"


def test_lora_module_states_its_cited_priors() -> None:
    priors = spaces.load(SEARCH_SPACES / "lora.py").priors
    assert priors["batch_size"].high == 32 and "LoRA Without Regret" in priors["batch_size"].why
    assert set(priors) == {"batch_size", "weight_decay", "lora_dropout"}


def test_lora_module_samples_the_issue_parameters() -> None:
    params = spaces.sample_check(spaces.load(SEARCH_SPACES / "lora.py"))
    assert set(params) >= {"learning_rate", "batch_size", "lora_dropout", "weight_decay", "lora_r"}
    # lora_alpha stays at the recipe's constant (the update scales by alpha / r): with it fixed the
    # best learning rate hardly moves with the rank, and sampling it would only duplicate the
    # learning rate (see the module's docstring)
    assert "lora_alpha" not in params and TrainJob.from_sweep(Sweep(), params).params.lora_alpha == 16.0


def test_overrides_apply_and_paths_resolve_against_the_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "mine.tsv").write_text("label\ttext\n1\tgood\n")
    monkeypatch.chdir(tmp_path)
    loaded = spaces.load(SEARCH_SPACES / "lora.py", ["max_steps=30", "eval_every=10", "train_data=mine.tsv"])
    assert loaded.sweep.max_steps == 30 and loaded.sweep.eval_every == 10
    assert loaded.sweep.train_data == str(tmp_path / "mine.tsv")


def write(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "space.py"
    path.write_text(body)
    return path


GOOD_SWEEP = "import hpo\nsweep = hpo.Sweep(train_data='x.tsv')\n"


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ("import hpo\ndef space(trial):\n  return {\n", "space.py:3: syntax error"),
        (GOOD_SWEEP, "defines no function space(trial)"),
        ("def space(trial):\n    return {}\n", "defines no `sweep = hpo.Sweep(...)`"),
        ("sweep = {'model': 'x'}\ndef space(trial):\n    return {}\n", "`sweep` is a dict, expected hpo.Sweep"),
        ("import hpo\nsweep = hpo.Sweep(max_steps=-5)\n", "max_steps=-5 must be a whole number"),
        ("import missing_module_xyz\n", "space.py:1: raised ModuleNotFoundError at import"),
        ("raise SystemExit(3)\n", "raised SystemExit at import"),
        (GOOD_SWEEP + "def space(trial):\n    return {}\npriors = ['batch_size']\n",
         "`priors` is a list; expected a dict of parameter name -> hpo.Prior"),
        (GOOD_SWEEP + "def space(trial):\n    return {}\npriors = {'batch_size': 32}\n",
         "priors['batch_size'] is a int; expected hpo.Prior"),
        (GOOD_SWEEP + "priors = {'lr': hpo.Prior(low=0.1, high=0.01, why='x')}\n",
         "hpo.Prior: low=0.1 is above high=0.01; swap them"),
        (GOOD_SWEEP + "priors = {'lr': hpo.Prior(high=1e-2)}\n", "hpo.Prior: why= is empty"),
        (GOOD_SWEEP + "priors = {'lr': hpo.Prior(why='a paper')}\n", "hpo.Prior: give low=, high= or both"),
    ],
)
def test_bad_modules(tmp_path: Path, body: str, words: str) -> None:
    with pytest.raises(HpoError) as caught:
        spaces.load(write(tmp_path, body))
    assert words in str(caught.value)
    assert "space.py" in str(caught.value)


@pytest.mark.parametrize(
    ("space_body", "words"),
    [
        ("return [trial.suggest_float('lr', 1e-4, 1e-2)]", "returned list, expected a dict"),
        ("return {'learning_rate': trial.suggest_float('learning_rate', 1e-2, 1e-4)}", "space(trial) raised ValueError"),
        ("return {'learning_rate': trial.suggest_float('learning_rate', 0.0, 1e-2, log=True)}", "raised ValueError"),
        ("return {'learing_rate': trial.suggest_float('learing_rate', 1e-4, 1e-2)}", "'learing_rate', which the built-in recipe does not know"),
        ("return {'batch_size': 0}", "batch_size=0, expected a positive number"),
        ("return {'target_modules': {'query'}}", "target_modules={'query'} (set), which the study cannot store as JSON"),
    ],
)
def test_bad_spaces_are_caught_by_one_sample(tmp_path: Path, space_body: str, words: str) -> None:
    loaded = spaces.load(write(tmp_path, GOOD_SWEEP + f"def space(trial):\n    {space_body}\n"))
    with pytest.raises(HpoError) as caught:
        spaces.sample_check(loaded)
    assert words in str(caught.value)


def test_a_custom_train_function_may_use_any_parameter_names(tmp_path: Path) -> None:
    loaded = spaces.load(write(tmp_path, GOOD_SWEEP + (
        "def space(trial):\n    return {'depth': trial.suggest_int('depth', 1, 4)}\n"
        "def train(params, report):\n    report(1, {'eval_accuracy': params['depth'] / 4})\n")))
    assert loaded.train is not None
    assert 1 <= spaces.sample_check(loaded)["depth"] <= 4


def test_a_new_metric_brings_its_own_direction() -> None:
    lora = SEARCH_SPACES / "lora.py"  # maximizes eval_accuracy
    assert spaces.load(lora, ["metric=eval_loss"]).sweep.direction == "minimize"
    assert spaces.load(lora, ["metric=eval_loss", "direction=maximize"]).sweep.direction == "maximize"
    assert spaces.load(lora, ["metric=eval_accuracy"]).sweep.direction == "maximize"
    with pytest.raises(HpoError, match="say which way my_metric is better with --set direction="):
        spaces.load(lora, ["metric=my_metric"])
    assert spaces.load(lora, ["metric=my_metric", "direction=minimize"]).sweep.direction == "minimize"
