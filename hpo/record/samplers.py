"""Optuna samplers by name, for sweeps of a few dozen trials up to nightly studies of thousands.

``make_sampler(name, seed, trials)`` is the one place a sweep's sampler is built. What each
name gives (measured against each other by ``bench/samplers.py``):

* ``tpe-qmc`` (the default): the first ``startup`` trials (a third of the budget, 4-10) sit
  on a scrambled Sobol sequence (:class:`QmcStartSampler`), so a small budget's opening
  covers every range evenly instead of by chance; then multivariate, grouped TPE with
  ``constant_liar`` (concurrent trials don't all sample the same point).
* ``tpe``: the same TPE with random opening trials.
* ``random``, ``qmc`` (Optuna's scrambled Sobol ``QMCSampler`` throughout), ``gp`` (Optuna's
  Gaussian-process sampler after a random opening of the same size: the best at 12-20 trials
  in the bench, but with no constant liar concurrent trials may get the same point), ``cmaes``
  (needs ``pip install cmaes``; categorical parameters are sampled at random by it).

TPE (``tpe-qmc``, ``tpe``) models at most ``HISTORY`` finished trials and the best ones
(:class:`RecentHistory`): its time per trial grows with the trials it models (Optuna's sampler
table gives it a budget of 100-1,000 trials); at 5,000 trials it was most of a no-op trial's cost.
"""

from __future__ import annotations

import bisect
import heapq
import importlib.util
import math
import warnings
from typing import Any, cast

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState

from hpo.config import SAMPLERS
from hpo.errors import HpoError
from hpo.record.optuna_access import StudyView, cached_trials

warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # TPE group, QMCSampler

QMC_DIMENSIONS = 64
"""Parameters per trial placed on the Sobol sequence; any further ones are sampled at random."""
HISTORY = 1000
"""The most recent finished trials TPE models (with the ``KEEP_BEST`` best): the top of Optuna's
recommended TPE budget. Below it TPE sees the whole study."""
KEEP_BEST = 25
"""The best COMPLETE trials TPE always models: as many as its "good" group ever holds (Optuna's
``default_gamma`` caps it at 25), so that group is the one the whole study gives."""


def startup_trials(trials: int) -> int:
    """Trials before a model-based sampler starts modelling: a third of the budget, 4-10."""
    return max(4, min(10, trials // 3))


def make_sampler(name: str, seed: int, trials: int) -> optuna.samplers.BaseSampler:
    """The sampler ``name`` (one of :data:`SAMPLERS`), seeded, sized for a ``trials`` budget.
    Raises HpoError for an unknown name, or for ``cmaes`` without its package. The seed
    wraps at 2**32 (numpy's limit): a sweep's seed plus its run index may pass it."""
    seed %= 2**32
    startup = startup_trials(trials)
    if name == "tpe-qmc":
        return QmcStartSampler(_tpe(seed, startup), startup, seed=seed)
    if name == "tpe":
        return _tpe(seed, startup)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "qmc":
        return optuna.samplers.QMCSampler(seed=seed, scramble=True)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=startup)
    if name == "cmaes":
        if importlib.util.find_spec("cmaes") is None:
            raise HpoError("sampler cmaes needs the cmaes package: pip install cmaes (or --set sampler=tpe-qmc)")
        return optuna.samplers.CmaEsSampler(seed=seed, n_startup_trials=1)
    raise HpoError(f"unknown sampler {name!r}; use {', '.join(SAMPLERS)}")


def _tpe(seed: int, startup: int) -> RecentHistory:
    return RecentHistory(optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup, multivariate=True,
                                                    group=True, constant_liar=True))


class RecentHistory(optuna.samplers.BaseSampler):
    """``sampler`` (TPE) modelling a single-objective study's ``history`` most recent finished
    trials, its ``keep_best`` best COMPLETE ones and its running ones, not every trial.

    Why: TPE reads, splits and converts every finished trial at each suggestion, so its time
    per trial grows with the study. Its "good" density is fitted to the best trials (at most
    ``keep_best`` of them), which stay in: that density is the whole study's. Its "rest" density
    is fitted to the ``history`` most recent trials instead of all (TPE's own weights already
    fade the older ones). A study with at most ``history`` finished trials, and a
    multi-objective one, is modelled whole, as by ``sampler`` alone.

    Each trial is sampled on one snapshot of the study (:class:`~hpo.record.optuna_access.StudyView`), read once per trial
    (Optuna's own per-trial cache), where TPE alone reads the study again for its running trials.
    Which trials are in it is kept up to date from the trials new or unfinished since the last
    one, so choosing them does not take longer as the study grows. One study per sampler, as
    for Optuna's grouped TPE.
    """

    def __init__(self, sampler: optuna.samplers.BaseSampler, history: int = HISTORY, keep_best: int = KEEP_BEST):
        self._sampler = sampler
        self._history = history
        self._keep_best = keep_best
        self._view: tuple[int, StudyView] | None = None
        self._looked = 0
        """Trials ``0 .. _looked - 1`` were looked at (a trial's number is its place in the study's list)."""
        self._open: set[int] = set()
        """Those of them not finished then (RUNNING, WAITING): looked at again each time."""
        self._finished: list[int] = []
        """The COMPLETE and PRUNED trials, by number."""
        self._best: list[tuple[float, int]] = []
        """The ``keep_best`` best COMPLETE trials, a heap of (value, number), the worst first (values
        negated when minimizing)."""

    def _seen(self, study: optuna.Study, trial: FrozenTrial) -> optuna.Study:
        """What the wrapped sampler sees of ``study`` while it samples ``trial``: a
        :class:`~hpo.record.optuna_access.StudyView`, which stands in for the study (its trials are
        the chosen ones, all else is forwarded)."""
        if self._view is None or self._view[0] != trial.number:
            self._view = (trial.number, self._build(study))
        return cast(optuna.Study, self._view[1])

    def _build(self, study: optuna.Study) -> StudyView:
        trials = cached_trials(study)  # by number
        if len(study.directions) > 1:
            return StudyView(study, trials)
        self._catch_up(study, trials)
        if len(self._finished) <= self._history:
            return StudyView(study, trials)
        chosen = {*self._finished[-self._history:], *(number for _, number in self._best),
                  *(number for number in self._open if trials[number].state == TrialState.RUNNING)}
        return StudyView(study, [trials[number] for number in sorted(chosen)])

    def _catch_up(self, study: optuna.Study, trials: list[FrozenTrial]) -> None:
        """Take in the trials that are new, or were not finished when last looked at (a FAIL
        trial is never modelled; a finished one never changes)."""
        sign = 1.0 if study.direction == optuna.study.StudyDirection.MAXIMIZE else -1.0
        fresh = [*sorted(self._open), *range(self._looked, len(trials))]
        self._open, self._looked = set(), len(trials)
        for number in fresh:
            trial = trials[number]
            if trial.state in (TrialState.RUNNING, TrialState.WAITING):
                self._open.add(number)
            elif trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
                bisect.insort(self._finished, number)
                if trial.state == TrialState.COMPLETE:
                    heapq.heappush(self._best, (sign * trial.value, number))
                    if len(self._best) > self._keep_best:
                        heapq.heappop(self._best)

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return self._sampler.infer_relative_search_space(self._seen(study, trial), trial)

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        return self._sampler.sample_relative(self._seen(study, trial), trial, search_space)

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        return self._sampler.sample_independent(self._seen(study, trial), trial, param_name, param_distribution)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self._sampler.before_trial(study, trial)

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState, values: Any) -> None:
        self._view = None
        self._sampler.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self._sampler.reseed_rng()


class QmcStartSampler(optuna.samplers.BaseSampler):
    """Scrambled Sobol points until the study holds ``startup`` finished trials, then ``sampler``.

    Works with define-by-run spaces, unlike Optuna's ``QMCSampler`` (which samples its first
    trial at random to learn the space): a trial's k-th suggested parameter takes coordinate
    k of Sobol point ``trial.number``, mapped onto its distribution (log scale for ``log=True``,
    a uniform pick for categorical choices). Finished means COMPLETE or PRUNED, so trials that
    fail, or that run concurrently with the first ones, still get Sobol points and ``sampler``
    (TPE, whose own startup is the same size) never falls back to random ones.
    """

    def __init__(self, sampler: optuna.samplers.BaseSampler, startup: int, seed: int | None = None) -> None:
        self._sampler = sampler
        self._startup = startup
        self._seed = seed
        self._points: dict[int, Any] = {}
        self._order: dict[int, list[str]] = {}
        self._started = False
        """The study held ``startup`` finished trials once, so it always will (finished trials stay so)."""

    def _in_startup(self, study: optuna.Study) -> bool:
        if not self._started:
            finished = cached_trials(study, states=(TrialState.COMPLETE, TrialState.PRUNED))
            self._started = len(finished) >= self._startup
        return not self._started

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        if self._in_startup(study):
            return {}
        return self._sampler.infer_relative_search_space(study, trial)

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        if not search_space:
            return {}
        return self._sampler.sample_relative(study, trial, search_space)

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        if trial.number not in self._points and not self._in_startup(study):
            return self._sampler.sample_independent(study, trial, param_name, param_distribution)
        order = self._order.setdefault(trial.number, [])
        if param_name not in order:
            order.append(param_name)
        dimension = order.index(param_name)
        if dimension >= QMC_DIMENSIONS:
            return self._sampler.sample_independent(study, trial, param_name, param_distribution)
        return from_unit(self.point(trial.number)[dimension], param_distribution)

    def point(self, index: int) -> Any:
        """Sobol point ``index`` (scrambled with the seed), in [0, 1)^QMC_DIMENSIONS."""
        if index not in self._points:
            from scipy.stats import qmc

            engine = qmc.Sobol(d=QMC_DIMENSIONS, scramble=True, seed=self._seed)
            if index:
                engine.fast_forward(index)
            self._points[index] = engine.random(1)[0]
        return self._points[index]

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self._sampler.before_trial(study, trial)

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState, values: Any) -> None:
        self._order.pop(trial.number, None)
        self._points.pop(trial.number, None)
        self._sampler.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self._sampler.reseed_rng()


def from_unit(u: float, distribution: BaseDistribution) -> Any:
    """The value of ``distribution`` at quantile ``u`` in [0, 1) (uniform on its own scale)."""
    u = min(max(float(u), 0.0), math.nextafter(1.0, 0.0))
    if isinstance(distribution, CategoricalDistribution):
        return distribution.choices[int(u * len(distribution.choices))]
    if isinstance(distribution, (FloatDistribution, IntDistribution)):
        low, high, step = distribution.low, distribution.high, distribution.step
        if distribution.log:
            if isinstance(distribution, IntDistribution):
                value = math.exp(math.log(low - 0.5) + u * (math.log(high + 0.5) - math.log(low - 0.5)))
                return int(min(high, max(low, round(value))))
            return float(min(high, math.exp(math.log(low) + u * (math.log(high) - math.log(low)))))
        if step is not None:
            count = int(round((high - low) / step)) + 1
            value = low + int(u * count) * step
            return int(value) if isinstance(distribution, IntDistribution) else float(min(high, value))
        return float(low + u * (high - low))
    raise HpoError(f"cannot place a {type(distribution).__name__} on the Sobol sequence")
