"""``lr_probe=true``: the learning-rate range test (:mod:`hpo.train.lr_probe`) once per study,
before its first trial, on a Ray worker holding one trial's resources; its choice narrows the
module's ``learning_rate`` range for every trial of the study.

* :func:`check` (in ``hpo search``'s checks, before anything is written) refuses, in one line, a
  sweep the probe cannot serve: a module with its own ``train`` (the probe trains the built-in
  recipe), a space without a ``learning_rate`` drawn by ``trial.suggest_float``, or one that
  samples the base ``model`` (the probe tests one).
* :func:`for_study` (in the driver, under the study lock, so processes that start one study
  together probe it once) reuses the choice a study recorded (its user attr ``lr_probe``), or
  runs the test -- the space's centre config (every parameter at the middle of its range, on
  its own scale) with the rate rising -- and records the :class:`~hpo.train.lr_probe.Choice`.
  A study that already holds sampled trials is not probed: they were drawn over the module's
  range, and TPE models one range per parameter (its group search space keeps the first
  trial's distribution), so the range is moved before the first trial or not at all. Such a
  study (one begun before its module turned the probe on, say a nightly study of ``lora.py``)
  goes on over the module's range, and the sweep says so in one line. A study whose recorded
  probe narrowed the range is run with ``lr_probe=true`` again, not without it.

The trials then call ``space`` with a :class:`hpo.space.NarrowedTrial`: the module's file is
never changed, its range stays the outer bound.
"""

from __future__ import annotations

import logging
import warnings
from typing import TYPE_CHECKING, Any

import optuna
from optuna.distributions import BaseDistribution, FloatDistribution
from optuna.trial import FrozenTrial

from hpo import space as spaces
from hpo.errors import HpoError
from hpo.train.lr_probe import Choice, Curve

if TYPE_CHECKING:
    from hpo.train.recipe import TrainJob

logger = logging.getLogger(__name__)
ATTR = "lr_probe"
"""The study user attr holding the probe's :class:`~hpo.train.lr_probe.Choice` (JSON)."""


def check(search_space: spaces.SearchSpace) -> tuple[float, float]:
    """The module's ``learning_rate`` range (low, high), from one sample of its space; HpoError, naming
    the module, when ``lr_probe`` cannot apply to it."""
    path = search_space.path
    fix = "or set lr_probe=false (--set lr_probe=false)"
    if search_space.train is not None:
        raise HpoError(f"{path}: sweep field lr_probe=true tests learning rates with the built-in recipe on the base "
                       f"model, but this module trains with its own train(params, report); {fix}")
    trial = _throwaway_study(search_space).ask()
    params = spaces.call_space(search_space, trial)
    distribution = trial.distributions.get(spaces.LEARNING_RATE)
    if distribution is None:
        raise HpoError(f"{path}: sweep field lr_probe=true narrows the range of learning_rate, which space(trial) does "
                       f"not sample; sample it with trial.suggest_float(\"learning_rate\", low, high, log=True), {fix}")
    if not isinstance(distribution, FloatDistribution):
        raise HpoError(f"{path}: sweep field lr_probe=true narrows a range, but space(trial) samples learning_rate from "
                       f"{type(distribution).__name__}; use trial.suggest_float(\"learning_rate\", low, high, log=True), "
                       f"{fix}")
    if "model" in params:
        raise HpoError(f"{path}: sweep field lr_probe=true tests one base model (the sweep's model), but space(trial) "
                       f"samples model; fix the model in the sweep, {fix}")
    return distribution.low, distribution.high


def recorded(study: optuna.Study) -> Choice | None:
    """The choice the study recorded, or None."""
    stored = study.user_attrs.get(ATTR)
    return Choice.from_dict(stored) if stored else None


def for_study(study: optuna.Study, search_space: spaces.SearchSpace, lock: Any) -> tuple[Choice | None, str]:
    """``(choice, said)``: the study's recorded choice, or a new probe's, recorded, and the line the
    sweep prints about it; ``(None, "")`` when the sweep has ``lr_probe=false``; ``(None, said)``
    for a study that already holds trials drawn over the module's range (not probed). See the
    module's docstring for what is refused (HpoError)."""
    sweep = search_space.sweep
    if not sweep.lr_probe:
        earlier = recorded(study)
        if earlier is not None and earlier.narrowed:
            raise HpoError(f"study {study.study_name!r} samples learning_rate over the range its lr probe chose "
                           f"({earlier.low:.3g}..{earlier.high:.3g}); run it with --set lr_probe=true (the recorded range "
                           "is reused, nothing is probed again), or start a new study with --study NAME")
        return None, ""
    outer = check(search_space)
    with lock:
        earlier = recorded(study)
        if earlier is not None:
            spaces.narrowed_range(outer, (earlier.low, earlier.high))  # the module's range still meets it
            return earlier, line(earlier, reused=True)
        sampled = sum(1 for t in study.get_trials(deepcopy=False) if spaces.LEARNING_RATE in t.params)
        if sampled:
            return None, (f"lr probe: not run, study {study.study_name!r} already holds {sampled} trial(s) whose "
                          f"learning_rate was drawn from the module's range {outer[0]:.2g}..{outer[1]:.2g}, and the "
                          "probe moves the range before a study's first trial only (the sampler models one range "
                          "per parameter): this run goes on over the module's range; a new study (--study NAME) "
                          "is probed")
        from hpo.train.lr_probe import choose
        from hpo.train.recipe import TrainJob

        job = TrainJob.from_sweep(sweep, centre_params(search_space))
        choice = choose(_run_on_worker(job, outer, sweep.worker_resources), outer)
        study.set_user_attr(ATTR, choice.to_dict())
        return choice, line(choice, reused=False)


def line(choice: Choice, reused: bool) -> str:
    """What the sweep prints about the probe, one line."""
    if reused:
        return f"lr probe (recorded when the study began, not run again): {choice.reason}"
    seconds = f", {choice.curve.seconds:.0f} s" if choice.curve is not None else ""
    return f"lr probe{seconds}: {choice.reason}"


def mlflow_notes(choice: Choice) -> tuple[dict[str, Any], dict[str, str]]:
    """The probe's params and tags for the sweep's parent MLflow run."""
    params = {"lr_probe_low": choice.low, "lr_probe_high": choice.high}
    if choice.steepest is not None:
        params["lr_probe_steepest"] = choice.steepest
    return params, {"hpo.lr_probe": choice.reason}


class _Centre(optuna.samplers.BaseSampler):
    """Every parameter at the middle of its distribution, on its own scale (the middle choice of a
    categorical one): the config the probe trains, whatever the space samples."""

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return {}

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        return {}

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        from hpo.record.samplers import from_unit

        return from_unit(0.5, param_distribution)


def centre_params(search_space: spaces.SearchSpace) -> dict[str, Any]:
    """The space's centre config (see :class:`_Centre`)."""
    return spaces.call_space(search_space, _throwaway_study(search_space, _Centre()).ask())


def _throwaway_study(search_space: spaces.SearchSpace, sampler: optuna.samplers.BaseSampler | None = None) -> optuna.Study:
    """An in-memory study to sample the space on (quietly: Optuna logs each study it creates)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(directions=list(search_space.sweep.directions), sampler=sampler)


def _run_on_worker(job: TrainJob, outer: tuple[float, float], resources: dict[str, float]) -> Curve:
    """:func:`hpo.train.lr_probe.range_test` in a Ray task with one (worker of a) trial's resources,
    in a worker process that exits afterwards (``max_calls=1``): the base model it loaded must not
    stay in memory, or on the GPU, beside the trials."""
    import ray

    def probe(job: TrainJob, outer: tuple[float, float]) -> Curve:
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*(Some weights|newly initialized).*")
        from hpo.train import accelerator, lr_probe

        try:
            return lr_probe.range_test(job, outer)
        finally:
            accelerator.release_memory()

    task = ray.remote(num_cpus=resources["CPU"], num_gpus=resources["GPU"], max_calls=1)(probe)
    try:
        return ray.get(task.remote(job, outer))
    except ray.exceptions.RayTaskError as error:
        cause = error.cause if getattr(error, "cause", None) is not None else error
        said = str(cause).splitlines()[0][:300] if str(cause) else ""
        raise HpoError(f"the lr probe (sweep field lr_probe=true) failed on its worker: {type(cause).__name__}: {said}; "
                       "fix that, or set lr_probe=false") from None
