"""``lr_probe=true``: the learning-rate range test, the range it chooses, the narrowed trials, the
refusals, and a probed sweep whose study and MLflow parent run record the choice."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from hpo import HpoError, Sweep
from hpo import space as spaces
from hpo.overrides import parse_overrides
from hpo.record.locks import StudyLock
from hpo.record.study import open_storage
from hpo.run import lr_probe
from hpo.train import worker_cache
from hpo.train.lr_probe import MIN_STEPS, STEPS, Choice, Curve, choose, range_test, schedule, steps_for
from hpo.train.recipe import TrainJob
from tests.conftest import SEARCH_SPACES, run_hpo

REVIEWS = SEARCH_SPACES / "data" / "reviews"
OUTER = (1e-4, 5e-3)  # lora.py's learning-rate range


def falling_at(centre: float, outer: tuple[float, float] = OUTER) -> Curve:
    """A smoothed loss that falls from 0.7 to 0.5 around ``centre`` over a test around ``outer``."""
    lrs = [schedule(step, outer) for step in range(STEPS)]
    return Curve(lrs, [0.7 - 0.2 / (1 + math.exp(-6 * math.log10(lr / centre))) for lr in lrs], "end")


@pytest.mark.parametrize(("centre", "expected"), [
    (1e-3, (10**-3.5, 10**-2.5)),  # inside: the decade centred on it
    (2e-4, (1e-4, 2e-4 * 10**0.5)),  # near the low end: the part of that decade inside the module's range
    (4.5e-3, (4.5e-3 / 10**0.5, 5e-3)),  # near the top (SST-2's): not shifted down to a whole decade
    (6.9e-3, (5e-3 / 10**0.5, 5e-3)),  # just above: less than half a decade inside, the top half decade
    (2e-2, (5e-3 / 10**0.5, 5e-3)),  # well above the module's range: its top half decade
    (3e-5, (1e-4, 10**-3.5)),  # below it: its lowest half decade
])
def test_the_range_is_the_decade_where_the_loss_falls_fastest_cut_to_the_modules(
        centre: float, expected: tuple[float, float]) -> None:
    choice = choose(falling_at(centre), OUTER)
    assert OUTER[0] <= choice.low < choice.high <= OUTER[1]
    assert choice.low == pytest.approx(expected[0], rel=0.15) and choice.high == pytest.approx(expected[1], rel=0.15)
    assert choice.steepest == pytest.approx(centre, rel=0.15)
    assert f"{choice.low:.2g}..{choice.high:.2g}" in choice.reason and "fell fastest" in choice.reason
    assert Choice.from_dict(choice.to_dict()) == choice and choice.narrowed


def test_a_loss_that_never_falls_keeps_the_modules_range() -> None:
    lrs = [schedule(step, OUTER) for step in range(STEPS)]
    choice = choose(Curve(lrs, [0.69 + 0.001 * i for i in range(STEPS)], "end"), OUTER)
    assert (choice.low, choice.high, choice.steepest) == (*OUTER, None) and not choice.narrowed
    assert "no fall of the smoothed loss to read" in choice.reason
    early = choose(Curve(lrs[:8], [0.7, 0.6, 0.5, 0.4, 1.0, 2.0, 3.0, 4.0], "diverged"), OUTER)
    assert (early.low, early.high) == OUTER and "stopped where the loss diverged" in early.reason
    narrow = choose(falling_at(1e-3, (1e-3, 2e-3)), (1e-3, 2e-3))  # a module range under a decade: all of it
    assert (narrow.low, narrow.high) == (1e-3, 2e-3)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Torch on one thread, as a trial's worker with one CPU runs: two threads on a busy 2-core
    machine made the test's 200 tiny steps 20x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("one_thread")
def test_the_range_test_ramps_the_rate_trains_and_leaves_the_base_clean(tiny_bert: Path) -> None:
    sweep = Sweep(model=str(tiny_bert), train_data=str(REVIEWS / "train.tsv"), eval_data=str(REVIEWS / "eval.tsv"),
                  max_length=32, seed=0)
    job = TrainJob.from_sweep(sweep, {"batch_size": 8})
    curve = range_test(job, OUTER)
    assert curve.lrs[0] == pytest.approx(OUTER[0] / 10) and curve.lrs[-1] <= OUTER[1] * 10 * (1 + 1e-9)
    ratios = {round(b / a, 9) for a, b in zip(curve.lrs, curve.lrs[1:], strict=False)}
    assert len(ratios) == 1 and ratios.pop() > 1, "exponential"
    assert len(curve.losses) == len(curve.lrs) and all(math.isfinite(loss) for loss in curve.losses)
    base = next(iter(worker_cache._BASE_MODELS.values()))
    assert not any("lora" in name for name, _ in base.named_modules()), "the adapter is removed"
    assert len(curve.lrs) == curve.steps == STEPS, "trials longer than STEPS: a test of STEPS"
    diverged = range_test(job, (3.0, 30.0))  # rates up to 300: the loss blows up and the test stops
    assert diverged.stopped == "diverged" and len(diverged.lrs) < STEPS
    short = range_test(dataclasses.replace(job, sweep=dataclasses.replace(sweep, max_steps=40, eval_every=20)), OUTER)
    assert len(short.lrs) == short.steps == 40, "one trial's worth of steps"
    assert short.lrs[0] == pytest.approx(OUTER[0] / 10) and short.lrs[-1] == pytest.approx(OUTER[1] * 10)
    assert [steps_for(n) for n in (10, 60, 100, 5000)] == [MIN_STEPS, 60, STEPS, STEPS]


def test_a_narrowed_trial_draws_learning_rate_inside_both_ranges_and_nothing_else_changes() -> None:
    loaded = spaces.load(SEARCH_SPACES / "lora.py")
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    plain, narrowed = study.ask(), study.ask()
    spaces.call_space(loaded, plain)
    params = spaces.call_space(loaded, spaces.NarrowedTrial(narrowed, (5e-4, 1e-2)))
    assert narrowed.distributions["learning_rate"] == FloatDistribution(5e-4, 5e-3, log=True)
    assert 5e-4 <= params["learning_rate"] <= 5e-3
    assert {k: v for k, v in narrowed.distributions.items() if k != "learning_rate"} == \
        {k: v for k, v in plain.distributions.items() if k != "learning_rate"}
    old_style = study.ask()
    assert 2e-4 <= spaces.NarrowedTrial(old_style, (2e-4, 3e-4)).suggest_loguniform("learning_rate", 1e-4, 1.0) <= 3e-4
    with pytest.raises(HpoError, match="lies outside the module's range"):
        spaces.NarrowedTrial(study.ask(), (1e-2, 1e-1)).suggest_float("learning_rate", 1e-4, 5e-3, log=True)


MODULE = '''
import hpo

sweep = hpo.Sweep(train_data="data.tsv", lr_probe=True)


def space(trial):
    return {SPACE}
'''


@pytest.mark.parametrize(("space", "train", "said"), [
    ('{"learning_rate": trial.suggest_float("learning_rate", 1e-4, 1e-2, log=True)}', True, "its own train"),
    ('{"batch_size": trial.suggest_categorical("batch_size", [8, 16])}', False, "does not sample"),
    ('{"learning_rate": trial.suggest_categorical("learning_rate", [1e-4, 1e-3])}', False, "CategoricalDistribution"),
    ('{"learning_rate": trial.suggest_float("learning_rate", 1e-4, 1e-2, log=True), '
     '"model": trial.suggest_categorical("model", ["a", "b"])}', False, "samples model"),
])
def test_where_the_probe_cannot_apply_it_is_refused_naming_the_module(tmp_path: Path, space: str, train: bool,
                                                                      said: str) -> None:
    path = tmp_path / "space.py"
    path.write_text(MODULE.replace("{SPACE}", space) + ("\n\ndef train(params, report):\n    pass\n" if train else ""))
    with pytest.raises(HpoError, match=said) as refused:
        lr_probe.check(spaces.load(path))
    assert str(path) in str(refused.value) and "lr_probe=false" in str(refused.value)


def test_the_field_is_checked_and_the_probe_trains_the_spaces_centre() -> None:
    with pytest.raises(HpoError, match="lr_probe=maybe: must be true or false"):
        parse_overrides(["lr_probe=maybe"])
    with pytest.raises(HpoError, match="sweep field lr_probe='yes' must be true or false"):
        Sweep(lr_probe="yes")  # type: ignore[arg-type]
    centre = lr_probe.centre_params(spaces.load(SEARCH_SPACES / "lora.py"))
    assert centre["batch_size"] == 16 and centre["lora_r"] == 8
    assert centre["learning_rate"] == pytest.approx(math.sqrt(1e-4 * 5e-3))


def test_a_study_reuses_its_recorded_range_and_one_begun_without_it_goes_on_unprobed(tmp_path: Path) -> None:
    storage = open_storage(f"sqlite:///{tmp_path / 'hpo.db'}")
    loaded = spaces.load(SEARCH_SPACES / "lora.py", ["lr_probe=true"])
    probed = optuna.create_study(study_name="probed", storage=storage, direction="maximize")
    choice = choose(falling_at(1e-3), OUTER)
    probed.set_user_attr(lr_probe.ATTR, choice.to_dict())
    assert lr_probe.for_study(probed, loaded, StudyLock(probed)) == \
        (choice, f"lr probe (recorded when the study began, not run again): {choice.reason}")  # no Ray: no probe
    with pytest.raises(HpoError, match="run it with --set lr_probe=true"):
        lr_probe.for_study(probed, spaces.load(SEARCH_SPACES / "lora.py", ["lr_probe=false"]), StudyLock(probed))

    sampled = optuna.create_study(study_name="sampled", storage=storage, direction="maximize")
    sampled.add_trial(create_trial(state=TrialState.COMPLETE, value=0.5, params={"learning_rate": 1e-4},
                                   distributions={"learning_rate": FloatDistribution(*OUTER, log=True)}))
    choice, said = lr_probe.for_study(sampled, loaded, StudyLock(sampled))  # begun before the probe was on
    assert choice is None and "not run, study 'sampled' already holds 1 trial(s)" in said
    assert "drawn from the module's range 0.0001..0.005" in said and "this run goes on over the module's range" in said
    assert "--study NAME" in said
    assert lr_probe.ATTR not in sampled.user_attrs


def test_a_probed_sweep_draws_every_trial_from_the_recorded_range(tmp_path: Path, tiny_bert: Path) -> None:
    done = run_hpo(["search", str(SEARCH_SPACES / "lora.py"), "--trials", "1", "--set", f"model={tiny_bert}",
                    "--set", "lr_probe=true", "--set", "max_steps=2", "--set", "eval_every=2"], cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    study = optuna.load_study(study_name="lora", storage=f"sqlite:///{tmp_path / 'hpo.db'}")
    choice = Choice.from_dict(study.user_attrs[lr_probe.ATTR])
    assert OUTER[0] <= choice.low < choice.high <= OUTER[1] and choice.outer == OUTER
    assert f"lr probe, {choice.curve.seconds:.0f} s: {choice.reason}" in done.stdout.replace("\n", " ")
    assert len(choice.curve.lrs) == len(choice.curve.losses) > 0
    for trial in study.get_trials():
        assert trial.distributions["learning_rate"] == FloatDistribution(choice.low, choice.high, log=True)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent = client.search_runs([client.get_experiment_by_name("lora").experiment_id],
                                filter_string="tags.`hpo.role` = 'sweep'")[0]
    assert parent.data.params["lr_probe_low"] == str(choice.low) and parent.data.tags["hpo.lr_probe"] == choice.reason
