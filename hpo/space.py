"""Loading a search-space module from a path and checking its contract.

The contract (also in docs/guides/search-spaces.md and ``search_spaces/lora.py``):

* ``space(trial) -> dict``: define-by-run, samples with ``trial.suggest_*``; the dict is
  what one trial trains with (for the built-in recipe: learning_rate, batch_size, ...).
* ``sweep = hpo.Sweep(...)``: the sweep's defaults, overridable with ``--set``.
* optional ``train(params, report)`` or ``train(params, report, sweep)``: replaces the
  built-in fine-tuning recipe; ``report`` is an :class:`hpo.Report` (``report(step,
  metrics)`` records one evaluation and may end the trial early); ``sweep`` is the
  effective sweep, after ``--set``.
* optional ``score(prediction, reference) -> float`` (task sft): scores each generated
  answer against the reference; the recipe records the mean as ``eval_score``.
* optional ``priors = {"batch_size": hpo.Prior(high=32, why="...")}``: what the module's author
  knows about a parameter's useful values, and why (:mod:`hpo.priors`); advice never argues past it.

The sweep may narrow the module's ``learning_rate`` range without editing it (``lr_probe``):
``space`` then gets a :class:`NarrowedTrial`, whose ``suggest_float("learning_rate", ...)``
draws from the part of the module's range that the probe chose.

Everything here runs before any storage is touched, so a bad module writes nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from hpo.config import Sweep, direction_follows_metric, parse_overrides, resolve_paths
from hpo.errors import HpoError
from hpo.priors import Prior, check_priors

if TYPE_CHECKING:
    import optuna

Space = Callable[["optuna.Trial"], dict]
"""A module's ``space(trial)``: the sampled config from Optuna's trial."""
TrainFn = Callable[..., Any]
"""A module's own ``train(params, report)`` or ``train(params, report, sweep)`` (see :func:`hpo.run.trial.call_train`)."""


@dataclass(frozen=True)
class SearchSpace:
    """A loaded, checked search-space module with overrides applied."""

    path: Path
    module: ModuleType
    space: Space
    sweep: Sweep
    train: TrainFn | None
    score: Callable[[str, str], float] | None = None
    priors: dict[str, Prior] = dataclasses.field(default_factory=dict)
    """The module's ``priors`` (none: empty)."""

    @property
    def default_study_name(self) -> str:
        return self.path.stem


def load(path: str | Path, overrides: list[str] | None = None) -> SearchSpace:
    """Import the module at ``path``, check its contract, apply ``--set`` overrides.

    Raises HpoError naming the file and what is wrong: missing file, syntax error (with
    line), an exception at import, no ``space``, ``sweep`` of the wrong type, bad values.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise HpoError(f"{path}: no such file; give the path of a search-space module (.py)")
    if path.suffix != ".py":
        raise HpoError(f"{path}: a search-space module must be a Python file ending in .py")
    path = path.resolve()
    module = _import(path)

    space = getattr(module, "space", None)
    if not callable(space):
        raise HpoError(f"{path}: defines no function space(trial) -> dict; add one that samples with trial.suggest_*")
    sweep = getattr(module, "sweep", None)
    if sweep is None:
        raise HpoError(f"{path}: defines no `sweep = hpo.Sweep(...)`; add one with the sweep's model, data and metric")
    if not isinstance(sweep, Sweep):
        raise HpoError(f"{path}: `sweep` is a {type(sweep).__name__}, expected hpo.Sweep(...)")
    train = getattr(module, "train", None)
    if train is not None and not callable(train):
        raise HpoError(f"{path}: `train` must be a function train(params, report)")
    score = getattr(module, "score", None)
    if score is not None and not callable(score):
        raise HpoError(f"{path}: `score` must be a function score(prediction, reference) -> float")
    priors = check_priors(getattr(module, "priors", None), str(path))

    sweep = resolve_paths(sweep, path.parent)
    values = parse_overrides(overrides or [])
    if "extra" in values:  # --set extra.KEY=VALUE: one key each, on top of the module's own
        values["extra"] = {**sweep.extra, **values["extra"]}
    if values:
        try:
            sweep = dataclasses.replace(sweep, **direction_follows_metric(sweep, values))
        except HpoError as error:
            raise HpoError(f"{path}: {error}") from None
        sweep = resolve_paths(sweep, Path.cwd())
    return SearchSpace(path=path, module=module, space=space, sweep=sweep, train=train, score=score, priors=priors)


def _import(path: Path) -> ModuleType:
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:8]
    name = f"hpo_space_{path.stem}_{digest}"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except SyntaxError as error:
        del sys.modules[name]
        raise HpoError(f"{path}:{error.lineno}: syntax error: {error.msg}") from None
    except HpoError as error:
        del sys.modules[name]
        raise HpoError(f"{path}: {error}") from None
    except BaseException as error:  # noqa: BLE001 - user code may raise anything, even SystemExit
        del sys.modules[name]
        line = _user_line(error, path)
        raise HpoError(f"{path}{line}: raised {type(error).__name__} at import: {error}") from error
    return module


def _user_line(error: BaseException, path: Path) -> str:
    frames = [f for f in traceback.extract_tb(error.__traceback__) if f.filename == str(path)]
    return f":{frames[-1].lineno}" if frames else ""


def sample_check(search_space: SearchSpace) -> dict:
    """Sample ``space`` once on a throwaway in-memory study: catches bad distributions,
    non-dict returns and (built-in recipe) unknown parameter names before a sweep starts.

    Returns the sampled dict.
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(directions=list(search_space.sweep.directions))
    trial = study.ask()
    return call_space(search_space, trial)


def call_space(search_space: SearchSpace, trial: Any) -> dict:
    """Run ``space(trial)`` and check what comes back; errors name the module."""
    path = search_space.path
    try:
        params = search_space.space(trial)
    except Exception as error:  # noqa: BLE001 - user code
        line = _user_line(error, path)
        raise HpoError(f"{path}{line}: space(trial) raised {type(error).__name__}: {error}") from error
    if not isinstance(params, dict):
        raise HpoError(f"{path}: space(trial) returned {type(params).__name__}, expected a dict of parameters")
    bad_keys = [k for k in params if not isinstance(k, str)]
    if bad_keys:
        raise HpoError(f"{path}: space(trial) returned non-string keys {bad_keys!r}")
    for key, value in params.items():  # the study stores the config as JSON
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            raise HpoError(f"{path}: space(trial) returned {key}={value!r} ({type(value).__name__}), which the "
                           "study cannot store as JSON; return numbers, strings, booleans, None, "
                           "or lists and dicts of them") from None
    if search_space.train is None:
        from hpo.train.recipe import check_params

        problem = check_params(params, search_space.sweep.task)
        if problem:
            raise HpoError(f"{path}: space(trial) {problem}")
    return params


LEARNING_RATE = "learning_rate"


class NarrowedTrial:
    """An Optuna trial whose ``learning_rate`` suggestion keeps to ``bounds``: the module's own
    ``low``..``high`` intersected with them (its ``log`` and ``step`` kept); every other call and
    attribute is the trial's own. The module's range stays the outer bound, so its file need not
    change when a sweep narrows the range (:mod:`hpo.run.lr_probe`). Each trial of a study gets
    the same bounds, so the sampler sees one distribution for the parameter throughout.

    Raises HpoError when the two ranges do not meet (the module's range was changed after the
    study recorded ``bounds``)."""

    def __init__(self, trial: Any, bounds: tuple[float, float]):
        self._trial = trial
        self._bounds = bounds

    def __getattr__(self, name: str) -> Any:
        return getattr(self._trial, name)

    def suggest_float(self, name: str, low: float, high: float, *, step: float | None = None,
                      log: bool = False) -> float:
        if name == LEARNING_RATE:
            low, high = narrowed_range((low, high), self._bounds)
        return self._trial.suggest_float(name, low, high, step=step, log=log)

    def suggest_uniform(self, name: str, low: float, high: float) -> float:
        return self.suggest_float(name, low, high)

    def suggest_loguniform(self, name: str, low: float, high: float) -> float:
        return self.suggest_float(name, low, high, log=True)

    def suggest_discrete_uniform(self, name: str, low: float, high: float, q: float) -> float:
        return self.suggest_float(name, low, high, step=q)


def narrowed_range(module: tuple[float, float], bounds: tuple[float, float]) -> tuple[float, float]:
    """The part of the module's learning-rate range inside ``bounds``; HpoError when there is none."""
    low, high = max(module[0], bounds[0]), min(module[1], bounds[1])
    if low > high:
        raise HpoError(f"learning_rate: the range the lr probe chose for this study, {bounds[0]:.3g}..{bounds[1]:.3g}, "
                       f"lies outside the module's range {module[0]:.3g}..{module[1]:.3g} (changed since the study "
                       "began?); put the range back, or start a new study with --study NAME")
    return low, high
