"""The trial protocol: what runs on a trial's worker, and the result keys it talks to the driver with.

One body, :func:`run_body`, runs every trial: a one-worker trial in :func:`run_trial` (a Tune
function trainable), each rank of a multi-worker trial in
:func:`hpo.run.distributed._rank_loop` (a Ray Train worker). Only the transport differs:
``tune.report`` there, ``ray.train.report`` here (rank 0's results go on to Tune). In order:

1. ``started``: the trial's start on its worker (``time.perf_counter()``), from which
   ``trial_setup_seconds`` counts (imports, model and data loading on a cold worker, a fresh
   adapter on a warm one) up to the first optimizer step.
2. The module's ``train`` (:func:`call_train`) or the built-in recipe, with a checked
   ``report(step, metrics)`` (:class:`hpo.Report`) whose every call becomes a result. The
   recipe's first result also carries what the worker resolved (device, precision,
   target_modules, ...) as ``INFO_PREFIX + name`` entries, the one path by which worker-side
   facts reach the driver's records (``Recorder.on_info``: Optuna user attrs, MLflow params).
3. Every result carries ``HELD_KEY`` (what the trial's workers hold, one entry per rank:
   :func:`hpo.run.cluster.held_resources`) and ``TIME_KEY`` (when it was sent).
4. The end: the recipe's own early stop (patience) sends ``EARLY_STOP_KEY``; a non-finite
   objective or loss sends ``ERROR_KEY`` with ``REASON_KEY`` ``nan``; any other exception
   sends ``ERROR_KEY`` with reason ``oom`` or ``error`` (:func:`failure`) -- on one worker; a
   rank raises it instead, so that Ray Train fails the whole group (a rank that swallowed
   it would leave the others waiting in the next collective) and the trial's driver reports
   it (:func:`hpo.run.distributed.run_distributed_trial`). A recipe trial then gives back
   what it used (:func:`hpo.train.accelerator.release_memory`).

The result keys are hpo's own, all under the ``hpo_`` prefix that :mod:`hpo.train.reporter`
reserves; Tune's own keys are reserved there too (:data:`hpo.train.reporter.RESERVED_KEYS`,
the one list: the worker side may not import this Ray module). :func:`metrics` is what is
left of a result once they are set aside.
"""

from __future__ import annotations

import inspect
import json
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from ray import tune

from hpo.errors import is_out_of_memory
from hpo.run.cluster import held_resources
from hpo.space import TrainFn
from hpo.train.reporter import NonFiniteMetric, Report, is_reserved

if TYPE_CHECKING:
    from hpo.config import Sweep

ERROR_KEY = "hpo_error"
"""The trial failed: the exception's class and message (at most 4,000 characters)."""
REASON_KEY = "hpo_reason"
"""Why it failed, with ``ERROR_KEY``: ``error``, ``oom`` or ``nan``."""
EARLY_STOP_KEY = "hpo_early_stopped"
"""The recipe's own early stop (patience) ended it: the step it stopped at."""
INFO_PREFIX = "hpo_info/"
"""``INFO_PREFIX + name``: a setting the worker resolved (device, precision, target_modules, ...)."""
HELD_KEY = "hpo_held"
"""What the trial's workers hold: a JSON list, one :func:`hpo.run.cluster.held_resources` per rank."""
TIME_KEY = "hpo_time"
"""When the result was sent (``time.time()`` on the worker)."""

Send = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class TrialSpec:
    """What every worker needs besides the trial's own params (sent once via the object store)."""

    sweep: Sweep
    train: TrainFn | None
    score: Any = None
    """The module's own ``score(prediction, reference)`` for task sft, or None (exact match)."""


def run_trial(config: dict[str, Any], spec: TrialSpec) -> None:
    """Ray Tune function trainable for a one-worker trial: :func:`run_body` reporting to Tune."""
    started = time.perf_counter()
    run_body(config["params"], spec, tune.report, [held_resources()], started=started, errors_as_results=True)


def run_body(params: dict[str, Any], spec: TrialSpec, transport: Send, held: list[dict[str, Any]], *,
             started: float, errors_as_results: bool) -> None:
    """One trial on one worker (or rank): see the module's docstring for the order of things.

    ``transport`` takes each result (``tune.report``, ``ray.train.report``); ``held`` is what the
    trial's workers hold; ``started`` the trial's start on this worker. With
    ``errors_as_results`` an exception becomes an error result, else it is raised (a rank)."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*(Some weights|newly initialized).*")
    info: dict[str, Any] = {}
    held_text = json.dumps(held)

    def send(result: dict[str, Any]) -> None:
        """A result with what this trial holds and, on the first one after they are known, the
        worker's resolved settings."""
        if info:
            result.update({INFO_PREFIX + k: v for k, v in info.items()})
            info.clear()
        transport({**result, HELD_KEY: held_text, TIME_KEY: time.time()})

    report = Report(cast(str, spec.sweep.metric), lambda step, values: send({"step": step, **values}),
                    prune_metric=spec.sweep.pruned_on if spec.sweep.pruner != "none" else None)
    try:
        if spec.train is not None:
            call_train(spec.train, params, report, spec.sweep)
        else:
            from hpo.train import training
            from hpo.train.recipe import TrainJob

            final = training.fine_tune(TrainJob.from_sweep(spec.sweep, params), report, on_start=info.update,
                                       score=spec.score, started=started)
            if final.get("stopped_early_at"):  # patience ended it (on every rank alike): tell the driver why
                send({"step": report.last_step, EARLY_STOP_KEY: int(final["stopped_early_at"])})
    except NonFiniteMetric as error:  # the same on every rank (the loss is all-reduced): each reports it
        send({"step": report.last_step, ERROR_KEY: f"non-finite loss: {error}", REASON_KEY: "nan"})
    except Exception as error:  # noqa: BLE001 - any trial error becomes FAIL with its reason
        if not errors_as_results:
            raise
        send({"step": report.last_step, **failure(error)})
    finally:
        if spec.train is None:  # a recipe trial (its exception, if any, handled): back to the resident baseline
            from hpo.train import accelerator

            accelerator.release_memory()


def failure(error: BaseException) -> dict[str, Any]:
    """The result keys of a trial that raised ``error``: its text and the reason (``oom`` or ``error``)."""
    reason = "oom" if is_out_of_memory(error) else "error"
    return {ERROR_KEY: f"{type(error).__name__}: {error}"[:4000], REASON_KEY: reason}


def metrics(result: dict[str, Any]) -> dict[str, float]:
    """The trial's own metrics in a result: its numbers, without the keys Tune and hpo reserve."""
    return {k: v for k, v in result.items()
            if not is_reserved(k) and isinstance(v, (int, float)) and not isinstance(v, bool)}


def worker_settings(result: dict[str, Any]) -> dict[str, Any]:
    """The worker's resolved settings in a result (``INFO_PREFIX`` entries), by name."""
    return {k.removeprefix(INFO_PREFIX): v for k, v in result.items() if k.startswith(INFO_PREFIX)}


def call_train(train: TrainFn, params: dict[str, Any], report: Report, sweep: Sweep) -> Any:
    """A module's own ``train``: ``train(params, report, sweep)`` when it takes a third (or a
    ``sweep``) parameter -- the effective sweep, after ``--set`` -- else ``train(params, report)``."""
    try:
        signature = inspect.signature(train)
    except (TypeError, ValueError):  # a builtin or C callable: the two-argument form
        return train(params, report)
    kinds = [p.kind for p in signature.parameters.values()]
    positional = [p for p in signature.parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if "sweep" in signature.parameters and signature.parameters["sweep"].kind == inspect.Parameter.KEYWORD_ONLY:
        return train(params, report, sweep=sweep)
    if len(positional) >= 3 or inspect.Parameter.VAR_POSITIONAL in kinds:
        return train(params, report, sweep)
    return train(params, report)
