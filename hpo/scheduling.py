"""Ray Tune: runs the trials on resources, stops weak ones early (ASHA), and streams
every result back to the driver's :class:`~hpo.recorder.Recorder`.

How a trial flows (Tune calls all of this in one driver thread):

1. ``OptunaBridge.suggest`` asks the recorder for the next trial (Optuna ``ask`` +
   ``space(trial)``), or says to wait, or that the sweep is done.
2. A worker runs :func:`run_trial`: the module's ``train`` or the built-in recipe, whose
   ``report(step, metrics)`` becomes ``tune.report``. Exceptions become an error result,
   so the reason reaches the driver; a non-finite objective ends the trial (``nan``).
3. Tune gives each result to the scheduler first (``_ASHA`` may answer STOP and notes
   when that is an early stop), then to ``OptunaBridge.on_trial_result``, except the
   result on which the scheduler stops: ``on_trial_complete`` reports that one.
4. ``on_trial_complete`` decides the truthful end -- COMPLETE, PRUNED (stopped early by
   ASHA), FAIL (error/nan/worker died) or interrupted -- and hands it to the recorder.

A searcher exception is only logged by Tune and would leave the trial RUNNING, so every
hook here is defensive; the driver also closes whatever is left when ``fit`` returns.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import warnings
from dataclasses import dataclass
from typing import Any

from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search import Searcher

from hpo.cluster import HELD_KEY, TIME_KEY, held_resources
from hpo.errors import is_out_of_memory
from hpo.recipe import TrainJob
from hpo.recorder import Outcome, Recorder
from hpo.space import TrainFn

logger = logging.getLogger(__name__)
ERROR_KEY = "hpo_error"
REASON_KEY = "hpo_reason"
EARLY_STOP_KEY = "hpo_early_stopped"


@dataclass(frozen=True)
class TrialSpec:
    """What every worker needs besides the trial's own params (sent once via the object store)."""

    sweep: Any  # hpo.Sweep
    train: TrainFn | None


class _NonFinite(Exception):
    """The objective or training loss became NaN/inf: the trial cannot recover."""


def run_trial(config: dict[str, Any], spec: TrialSpec) -> None:
    """Ray Tune function trainable for one trial (runs on a worker)."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*(Some weights|newly initialized).*")
    metric = spec.sweep.metric
    params = config["params"]
    last = {"step": 0}
    held = json.dumps([held_resources()])

    def send(values: dict[str, Any]) -> None:
        """``tune.report`` with what this trial holds (see :func:`hpo.cluster.held_resources`)."""
        tune.report({**values, HELD_KEY: held, TIME_KEY: time.time()})

    def report(step: int, metrics: dict[str, float]) -> None:
        """Record one evaluation; Ray may end the trial here (early stop)."""
        if not isinstance(step, int) or isinstance(step, bool) or step <= last["step"]:
            raise ValueError(f"report(step={step!r}): step must be an int greater than the last ({last['step']})")
        if not isinstance(metrics, dict) or metric not in metrics:
            raise ValueError(f"report() got no {metric!r} (the sweep's metric); got {sorted(metrics or {})}")
        values = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        last["step"] = step
        bad = [k for k in (metric, "train_loss", "eval_loss") if k in values and not math.isfinite(values[k])]
        if bad:
            send({"step": step, **values})
            raise _NonFinite(f"{bad[0]} is {values[bad[0]]} at step {step}")
        send({"step": step, **values})

    try:
        if spec.train is not None:
            spec.train(params, report)
        else:
            from hpo import training

            final = training.fine_tune(TrainJob.from_sweep(spec.sweep, params), report)
            if final.get("stopped_early_at"):  # patience ended it: tell the driver why
                send({"step": last["step"], EARLY_STOP_KEY: int(final["stopped_early_at"])})
    except _NonFinite as error:
        send({"step": last["step"], ERROR_KEY: f"non-finite loss: {error}", REASON_KEY: "nan"})
    except Exception as error:  # noqa: BLE001 - any trial error becomes FAIL with its reason
        reason = "oom" if is_out_of_memory(error) else "error"
        message = f"{type(error).__name__}: {error}"
        send({"step": last["step"], ERROR_KEY: message[:4000], REASON_KEY: reason})
    finally:
        if spec.train is None:
            _release_memory()


def _release_memory() -> None:
    import gc

    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover
        pass


class _ASHA(ASHAScheduler):
    """Ray's ASHA, noting the trials it stops *before* ``max_t`` (an early stop).

    ASHA also answers STOP when a trial reaches ``max_t``; that is a finished trial.
    """

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.stopped_early: dict[str, int] = {}

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        decision = super().on_trial_result(tune_controller, trial, result)
        step = result.get(self._time_attr)
        if decision == TrialScheduler.STOP and step is not None and step < self._max_t and not result.get("done"):
            self.stopped_early[trial.trial_id] = step
        return decision


class _NoStop(FIFOScheduler):
    """No early stop (``pruner="none"``): every trial runs to its end."""

    def __init__(self) -> None:
        super().__init__()
        self.stopped_early: dict[str, int] = {}


class OptunaBridge(Searcher):
    """Tune searcher whose trials are Optuna trials; all writes go through the recorder."""

    def __init__(self, recorder: Recorder, scheduler: _ASHA | _NoStop, metric: str, mode: str):
        super().__init__(metric=metric, mode=mode)
        self.recorder = recorder
        self.scheduler = scheduler
        self.numbers: dict[str, int] = {}
        self.held: dict[str, dict[str, Any]] = {}

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles searchers (tuner.pkl); the study is the state that matters, and the
        # recorder holds connections and a live display.
        state = self.__dict__.copy()
        state["recorder"] = None
        return state

    def save(self, checkpoint_path: str) -> None:
        """Nothing to save: the Optuna study is the searcher's state."""

    def restore(self, checkpoint_path: str) -> None:
        """Nothing to restore: see :meth:`save`."""

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec: Any) -> bool:
        return True

    def suggest(self, trial_id: str) -> dict | str | None:
        try:
            asked = self.recorder.next_trial()
        except Exception:  # noqa: BLE001 - logged; the sweep ends rather than spin
            logger.exception("hpo: asking for the next trial failed")
            return Searcher.FINISHED
        if asked is None:
            return None
        if asked == Recorder.DONE:
            return Searcher.FINISHED
        self.numbers[trial_id] = asked.number
        return {"number": asked.number, "params": asked.params}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        _note_held(self.held, trial_id, result)
        number = self.numbers.get(trial_id)
        if number is None or ERROR_KEY in result or "step" not in result:
            return
        try:
            self.recorder.on_result(number, int(result["step"]), _metrics(result))
        except Exception:  # noqa: BLE001
            logger.exception("hpo: recording a result of trial %s failed", number)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        number = self.numbers.pop(trial_id, None)
        if number is None:
            return
        try:
            _note_held(self.held, trial_id, result or {})
            if trial_id in self.held:
                self.recorder.ledger.set_attr(number, "resources", self.held.pop(trial_id))
        except Exception:  # noqa: BLE001 - a missing record of resources must not block the end
            logger.exception("hpo: recording the resources of trial %s failed", number)
        try:
            outcome = self._outcome(trial_id, number, result, error)
        except Exception as problem:  # noqa: BLE001 - never leave a trial RUNNING
            logger.exception("hpo: deciding the end of trial %s failed", number)
            outcome = Outcome("fail", reason="error", error=f"hpo internal error: {problem}")
        self.recorder.on_end(number, outcome)

    def _outcome(self, trial_id: str, number: int, result: dict | None, error: bool) -> Outcome:
        stopped_at = self.scheduler.stopped_early.pop(trial_id, None)
        if error:
            return Outcome("fail", reason="crash", error="the trial's worker process died (see the Ray logs)")
        if result is None:
            return Outcome("interrupted")
        if ERROR_KEY in result:
            return Outcome("fail", reason=result.get(REASON_KEY, "error"), error=result[ERROR_KEY])
        if "step" in result and self.metric in result:
            self.recorder.on_result(number, int(result["step"]), _metrics(result))
        if stopped_at is not None:
            return Outcome("pruned", step=stopped_at)
        if result.get("done") and EARLY_STOP_KEY in result:
            return Outcome("complete", reason="early_stopped", step=int(result[EARLY_STOP_KEY]))
        if result.get("done"):
            return Outcome("complete")
        return Outcome("interrupted")


class _Heartbeat(tune.Callback):
    """Keeps running trials' heartbeats fresh between results (long evaluation gaps)."""

    def __init__(self, recorder: Recorder):
        self.recorder = recorder

    def __getstate__(self) -> dict[str, Any]:
        return {"recorder": None}

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        if self.recorder is not None:
            self.recorder.tick()


def _note_held(held: dict[str, dict[str, Any]], trial_id: str, result: dict) -> None:
    """Keep what a trial's workers hold: ranks, node, assigned resources, GPU ids, and the
    time from the trial's start on its worker to its last report."""
    if HELD_KEY not in result:
        return
    if trial_id not in held:
        workers = json.loads(result[HELD_KEY])
        held[trial_id] = {"workers": workers, "start": min(worker["start"] for worker in workers)}
    held[trial_id]["end"] = float(result.get(TIME_KEY, time.time()))


_RESULT_KEYS = {"step", "done", "trial_id", "training_iteration", "time_this_iter_s", "time_total_s", "timestamp",
                "time_since_restore", "iterations_since_restore", "pid", "hostname", "node_ip", "date",
                "experiment_tag", "checkpoint_dir_name", "should_checkpoint"}


def _metrics(result: dict) -> dict[str, float]:
    return {k: v for k, v in result.items() if k not in _RESULT_KEYS and not k.startswith(("config/", "hpo_"))
            and isinstance(v, (int, float)) and not isinstance(v, bool)}


def run(recorder: Recorder, sweep: Any, train: TrainFn | None, *, address: str | None, module: Any,
        storage_path: str, name: str, worker_logs: bool = False) -> None:
    """Start (or join) Ray and run trials until the recorder says the sweep is done.

    Workers' output stays in Ray's log files unless ``worker_logs``: the live view stays
    readable, and Ray's own shutdown noise from idle reused workers is not shown. A trial's
    exception reaches the study either way (its ``error`` attr).
    """
    import ray
    import ray.cloudpickle

    from hpo import cluster

    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    if train is not None:
        # The module was loaded from a path workers may not import by name: ship it by value.
        ray.cloudpickle.register_pickle_by_value(module)
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
    # On Ctrl-C Tune stops the trials gracefully (they end as interrupted and run again on
    # resume) and then suggests Tuner.restore: the study, not Tune's state, is what resumes.
    logging.getLogger("ray.tune.tune").setLevel(logging.ERROR)
    cluster.connect(address, worker_logs=worker_logs)
    concurrency = sweep.concurrency or _fit_count(ray.cluster_resources(), sweep.trial_resources)

    if sweep.pruner == "asha":
        scheduler: _ASHA | _NoStop = _ASHA(
            time_attr="step", metric=sweep.metric, mode=sweep.mode, max_t=sweep.max_steps,
            grace_period=sweep.eval_every, reduction_factor=sweep.reduction_factor,
        )
    else:
        scheduler = _NoStop()
    searcher = OptunaBridge(recorder, scheduler, sweep.metric, sweep.mode)
    spec = TrialSpec(sweep, train)
    callbacks: list[tune.Callback] = [_Heartbeat(recorder)]
    if sweep.workers_per_trial == 1:
        trainable = tune.with_resources(tune.with_parameters(run_trial, spec=spec), sweep.trial_resources)
    else:  # a light driver per trial; its Ray Train workers reserve the resources (hpo.distributed)
        from hpo import distributed

        trainable = tune.with_resources(tune.with_parameters(distributed.run_distributed_trial, spec=spec),
                                        {"CPU": 0.01})
        callbacks.append(distributed.ReleaseWorkerGroups())
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=searcher, scheduler=scheduler, num_samples=-1,
            max_concurrent_trials=concurrency, reuse_actors=sweep.workers_per_trial == 1,
        ),
        run_config=tune.RunConfig(
            name=f"{name}-{time.strftime('%Y%m%d-%H%M%S')}",
            storage_path=storage_path,
            verbose=0,
            callbacks=callbacks,
            failure_config=tune.FailureConfig(max_failures=0),
        ),
    )
    tuner.fit()


def _fit_count(available: dict[str, float], per_trial: dict[str, float]) -> int:
    """How many trials fit on the cluster's resources at once (at least 1)."""
    fits = [available.get(k.upper(), 0.0) / v for k, v in per_trial.items() if v > 0]
    return max(1, int(min(fits))) if fits else 1
