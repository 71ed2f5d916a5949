"""Sampler options: every name builds, seeds repeat, tpe-qmc opens on Sobol points then hands over to TPE."""

from __future__ import annotations

import importlib.util

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from hpo import HpoError, Sweep, config
from hpo import space as spaces
from hpo.record import samplers as hpo_samplers
from hpo.record.samplers import SAMPLERS, QmcStartSampler, RecentHistory, from_unit, make_sampler, startup_trials
from tests.conftest import SEARCH_SPACES

FAST = [name for name in SAMPLERS if name not in ("gp", "cmaes")]


def lora_space(trial: optuna.Trial) -> float:
    lr = trial.suggest_float("learning_rate", 1e-4, 5e-3, log=True)
    batch = trial.suggest_categorical("batch_size", [8, 16, 32])
    dropout = trial.suggest_float("lora_dropout", 0.0, 0.15)
    rank = trial.suggest_int("lora_r", 4, 16, step=4)
    return (lr - 1e-3) ** 2 * 1e6 + batch / 100 + dropout + 1 / rank


def sampled(name: str, seed: int, trials: int = 10) -> list[dict]:
    study = optuna.create_study(sampler=make_sampler(name, seed, trials))
    study.optimize(lora_space, n_trials=trials)
    return [t.params for t in study.trials]


def test_the_config_knows_the_same_names() -> None:
    assert config.SAMPLERS == SAMPLERS
    assert Sweep().sampler == "tpe-qmc"
    for name in config.SAMPLERS:  # every name a sweep accepts builds a sampler (cmaes: or names its package)
        try:
            make_sampler(name, 0, 10)
        except HpoError as error:
            assert name == "cmaes" and "pip install cmaes" in str(error)


def test_an_unknown_sampler_is_refused_in_one_line() -> None:
    with pytest.raises(HpoError) as caught:
        Sweep(sampler="grid")
    assert "\n" not in str(caught.value) and "sampler='grid' must be one of tpe-qmc, tpe, random, qmc, gp, cmaes" in str(caught.value)
    with pytest.raises(HpoError, match="unknown sampler 'grid'; use tpe-qmc"):
        make_sampler("grid", 0, 10)


def test_cmaes_works_or_says_what_to_install() -> None:
    if importlib.util.find_spec("cmaes") is not None:
        assert isinstance(make_sampler("cmaes", 0, 10), optuna.samplers.CmaEsSampler)
    else:
        with pytest.raises(HpoError, match="pip install cmaes"):
            make_sampler("cmaes", 0, 10)


@pytest.mark.parametrize("name", FAST)
def test_the_same_seed_samples_the_same_trials(name: str) -> None:
    assert sampled(name, 3) == sampled(name, 3)
    assert sampled(name, 3) != sampled(name, 4)


def test_tpe_qmc_opens_on_sobol_points_then_hands_over_to_tpe(monkeypatch: pytest.MonkeyPatch) -> None:
    trials, startup = 12, startup_trials(12)
    sampler = make_sampler("tpe-qmc", 5, trials)
    assert isinstance(sampler, QmcStartSampler) and startup == 4
    handed_over: list[int] = []
    tpe = sampler._sampler
    original = tpe.sample_relative

    def spy(study, trial, search_space):  # noqa: ANN001, ANN202
        handed_over.append(trial.number)
        return original(study, trial, search_space)

    monkeypatch.setattr(tpe, "sample_relative", spy)
    study = optuna.create_study(sampler=sampler)
    study.optimize(lora_space, n_trials=trials)

    from scipy.stats import qmc

    points = qmc.Sobol(d=hpo_samplers.QMC_DIMENSIONS, scramble=True, seed=5).random(startup)
    order = ["learning_rate", "batch_size", "lora_dropout", "lora_r"]
    for trial, point in zip(study.trials[:startup], points, strict=True):
        expected = {name: from_unit(point[k], trial.distributions[name]) for k, name in enumerate(order)}
        assert trial.params == expected
    assert handed_over == list(range(startup, trials)), "TPE models every trial after the Sobol ones"


def test_trials_running_beside_the_first_ones_still_get_sobol_points() -> None:
    sampler = make_sampler("tpe-qmc", 0, 12)
    study = optuna.create_study(sampler=sampler)
    asked = [study.ask() for _ in range(6)]  # six at once; none finished yet
    for trial in asked:
        lora_space(trial)
    for k, trial in enumerate(asked):
        lr = from_unit(sampler.point(k)[0], FloatDistribution(1e-4, 5e-3, log=True))
        assert trial.params["learning_rate"] == lr


def test_the_sobol_start_covers_the_ranges_better_than_chance() -> None:
    """The reason for tpe-qmc: 8 opening points leave no half of a range empty, per parameter."""
    sampler = QmcStartSampler(optuna.samplers.RandomSampler(seed=0), startup=8, seed=0)
    values = [from_unit(sampler.point(k)[0], FloatDistribution(0.0, 1.0)) for k in range(8)]
    assert sorted(int(v * 8) for v in values) == list(range(8)), "one point in each eighth"


@pytest.mark.parametrize(
    ("u", "distribution", "expected"),
    [
        (0.0, FloatDistribution(1e-4, 1e-2, log=True), 1e-4),
        (0.5, FloatDistribution(1e-4, 1e-2, log=True), 1e-3),
        (0.999999, FloatDistribution(0.0, 0.1), 0.0999999),
        (0.5, FloatDistribution(0.0, 1.0, step=0.25), 0.5),
        (0.99, IntDistribution(4, 16, step=4), 16),
        (0.0, IntDistribution(1, 64, log=True), 1),
        (0.999, IntDistribution(1, 64, log=True), 64),
        (0.34, CategoricalDistribution([8, 16, 32]), 16),
        (1.0, CategoricalDistribution(["a", "b"]), "b"),
    ],
)
def test_unit_values_map_onto_each_distribution(u: float, distribution: object, expected: object) -> None:
    value = from_unit(u, distribution)
    assert value == pytest.approx(expected) if isinstance(expected, float) else value == expected
    assert distribution._contains(distribution.to_internal_repr(value))


def test_the_shipped_modules_sample_with_the_default_sampler() -> None:
    for path in sorted(SEARCH_SPACES.glob("*.py")):
        loaded = spaces.load(path)
        study = optuna.create_study(direction=loaded.sweep.direction,
                                    sampler=make_sampler(loaded.sweep.sampler, loaded.sweep.seed, loaded.sweep.trials))
        for _ in range(startup_trials(loaded.sweep.trials) + 2):
            trial = study.ask()
            spaces.call_space(loaded, trial)
            study.tell(trial, 0.5)


@pytest.mark.parametrize("name", ["tpe-qmc", "random", "qmc"])
def test_a_seed_near_the_limit_plus_a_run_index_still_samples(name: str) -> None:
    """A resumed sweep seeds its sampler with seed + run index, which may pass numpy's 2**32."""
    study = optuna.create_study(sampler=make_sampler(name, 2**32 - 1 + 3, 4))
    study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=2)
    assert len(study.trials) == 2


def test_up_to_its_history_tpe_samples_as_optuna_s_own() -> None:
    """The window changes nothing while the study holds at most ``history`` finished trials."""
    wrapped = hpo_samplers._tpe(7, 4)
    alone = hpo_samplers._tpe(7, 4)._sampler
    assert isinstance(wrapped, RecentHistory) and isinstance(alone, optuna.samplers.TPESampler)
    params = []
    for sampler in (wrapped, alone):
        study = optuna.create_study(sampler=sampler)
        study.optimize(lora_space, n_trials=16)
        params.append([t.params for t in study.trials])
    assert params[0] == params[1]


@pytest.mark.parametrize("direction", ["maximize", "minimize"])
def test_past_its_history_tpe_models_the_recent_trials_the_best_ones_and_the_running(
        monkeypatch: pytest.MonkeyPatch, direction: str) -> None:
    tpe = optuna.samplers.TPESampler(seed=0, n_startup_trials=2, multivariate=True, group=True, constant_liar=True)
    seen: list[tuple[list[int], list[int]]] = []
    original = tpe.sample_relative

    def spy(study, trial, search_space):  # noqa: ANN001, ANN202
        finished = study._get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
        running = study._get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        seen.append(([t.number for t in finished], [t.number for t in running]))
        return original(study, trial, search_space)

    monkeypatch.setattr(tpe, "sample_relative", spy)
    study = optuna.create_study(sampler=RecentHistory(tpe, history=10, keep_best=3), direction=direction)
    better = 1.0 if direction == "maximize" else -1.0
    study.ask().suggest_float("x", 0.0, 1.0)  # trial 0 stays RUNNING (another process's, say)
    for number in range(1, 31):
        trial = study.ask()
        x = trial.suggest_float("x", 0.0, 1.0)
        if number == 3:
            study.tell(trial, state=TrialState.FAIL)
        else:  # the best trials are early ones
            study.tell(trial, better * (100.0 - number) if number in (2, 5, 7, 11) else x)
    assert seen[10] == ([1, 2, *range(4, 10)], [0, 10]), "8 finished trials (a FAIL is never modelled): all"
    assert seen[12] == ([1, 2, *range(4, 12)], [0, 12]), "10: still all"
    assert seen[30] == ([2, 5, 7, *range(20, 30)], [0, 30]), "the 10 most recent, the 3 best, the running"
