"""Ray Tune: runs the trials on resources, stops weak ones early (ASHA), and streams
every result back to the driver's :class:`~hpo.record.recorder.Recorder`.

How a trial flows (Tune calls all of this in one driver thread):

1. ``OptunaBridge.suggest`` asks the recorder for the next trial (Optuna ``ask`` +
   ``space(trial)``), or says to wait, or that the sweep is done -- or, when other
   processes' running trials fill a shared study, ends Tune's run (see :func:`run`).
2. A worker runs the trial (:mod:`hpo.run.trial`, the protocol: one worker, or each rank of
   a multi-worker trial, :mod:`hpo.run.distributed`): the module's ``train`` or the built-in
   recipe, whose checked ``report(step, metrics)`` (:class:`hpo.Report`) becomes a result.
   Exceptions become an error result, so the reason reaches the driver; a non-finite
   objective ends the trial (``nan``). The recipe's first result also carries what the
   worker resolved (device, precision, target_modules, ...) as ``hpo_info/<name>`` entries
   (strings and numbers; Tune flattens a nested dict that way anyway), which the bridge
   hands to ``Recorder.on_info`` (Optuna user attrs, MLflow params): the one path by which
   worker-side facts reach the driver's records.
3. Tune gives each result to the scheduler first (``_ASHA`` may answer STOP and notes
   when that is an early stop), then to ``OptunaBridge.on_trial_result``, except the
   result on which the scheduler stops: ``on_trial_complete`` reports that one. ASHA
   ranks trials on the sweep's ``prune_metric`` (default ``metric``); the study, and so
   the bridge, records ``metric``.
4. ``on_trial_complete`` decides the truthful end -- COMPLETE, PRUNED (stopped early by
   ASHA), FAIL (error/nan/oom) or interrupted (worker died, Ctrl-C) -- and hands it to the
   recorder.

A searcher exception is only logged by Tune and would leave the trial RUNNING, so every
hook here is defensive; the driver also closes whatever is left when ``fit`` returns.

Ctrl-C is hpo's, not Tune's (:func:`ctrl_c_stops_the_sweep`): the first SIGINT tells the
recorder, which starts no trial from then on, and :class:`_Interrupted` has Tune stop the
running trials at the end of its current step (they end as interrupted and run again on the
next run); a second SIGINT raises ``KeyboardInterrupt`` at once. Tune's own handler would
only end its loop after the current step, and hpo would not know why.

Before any trial, :func:`hpo.run.cluster.preflight` has started Ray and refused a sweep no
node can run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search import Searcher

from hpo.record.ledger import AskedTrial
from hpo.record.recorder import NoTrial, Outcome, Recorder
from hpo.run import cluster, ranking
from hpo.run import trial as protocol
from hpo.run.trial import EARLY_STOP_KEY, ERROR_KEY, HELD_KEY, REASON_KEY, TIME_KEY, TrialSpec, run_trial
from hpo.space import TrainFn

if TYPE_CHECKING:
    from hpo.config import Sweep

logger = logging.getLogger(__name__)


class _LiveTrialsFirst:
    """Tune's FIFO choice of the next trial to start (the first PENDING trial, else PAUSED),
    looked for among the run's live trials. Tune's own looks through every trial of the run,
    twice on each turn of its loop where none is pending (most turns), which at 5,000 trials
    was a share of each trial's cost that grew with the study. Same order: the claim's."""

    def choose_trial_to_run(self, tune_controller: Any) -> Any:
        from ray.tune.experiment import Trial

        live = sorted(tune_controller.get_live_trials(), key=lambda trial: trial.config.get("number", -1))
        for status in (Trial.PENDING, Trial.PAUSED):
            for trial in live:
                if trial.status == status:
                    return trial
        return None


class _ASHA(_LiveTrialsFirst, ASHAScheduler):
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


def make_scheduler(sweep: Sweep) -> _ASHA | _NoStop:
    """The sweep's pruner as a Tune scheduler: ``asha`` and ``hyperband`` are Ray's ASHA, first rung at
    ``sweep.first_rung``, one bracket or ``sweep.brackets`` (asynchronous Hyperband); ``none`` stops nothing."""
    if sweep.pruner == "none":
        return _NoStop()
    return _ASHA(time_attr="step", metric=ranking.pruned_on(sweep), mode=ranking.prune_mode(sweep),
                 max_t=sweep.max_steps, grace_period=sweep.first_rung, reduction_factor=sweep.reduction_factor,
                 brackets=sweep.brackets)


class _NoStop(_LiveTrialsFirst, FIFOScheduler):
    """No early stop (``pruner="none"``): every trial runs to its end."""

    def __init__(self) -> None:
        super().__init__()
        self.stopped_early: dict[str, int] = {}


class OptunaBridge(Searcher):
    """Tune searcher whose trials are Optuna trials; all writes go through the recorder."""

    def __init__(self, recorder: Recorder, scheduler: _ASHA | _NoStop, metric: str, mode: str,
                 first: AskedTrial | None = None):
        super().__init__(metric=metric, mode=mode)
        self.recorder = recorder
        self.scheduler = scheduler
        self.first = first
        """A trial the recorder claimed before this run (:meth:`Recorder.wait_for_a_trial`): the first suggestion."""
        self.numbers: dict[str, int] = {}
        self.held: dict[str, dict[str, Any]] = {}

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles searchers (tuner.pkl); the study is the state that matters, and the
        # recorder holds connections and a live display.
        state = self.__dict__.copy()
        state["recorder"] = state["first"] = None
        return state

    def save(self, checkpoint_path: str) -> None:
        """Nothing to save: the Optuna study is the searcher's state."""

    def restore(self, checkpoint_path: str) -> None:
        """Nothing to restore: see :meth:`save`."""

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec: Any) -> bool:
        return True

    def suggest(self, trial_id: str) -> dict | str | None:  # type: ignore[override]  # Ray's annotation omits FINISHED
        """The next trial's config; None: ask again; ``FINISHED``: no more trials in this run,
        both when the sweep is done and when other processes' trials fill the study (``ELSEWHERE``):
        Tune then keeps no idle worker for reuse (its cache is emptied at the end of each step
        once the search is finished), and ends its run when this process's own trials end."""
        try:
            asked, self.first = self.first or self.recorder.next_trial(), None
        except Exception as error:  # noqa: BLE001 - retried already (transient errors); the sweep ends short
            logger.debug("hpo: asking for the next trial failed", exc_info=True)
            self.recorder.stop(f"asking for the next trial failed ({type(error).__name__}: "
                               f"{str(error).splitlines()[0][:200] if str(error) else ''})")
            return Searcher.FINISHED
        if asked is NoTrial.WAIT:
            return None
        if asked is NoTrial.DONE or asked is NoTrial.ELSEWHERE:
            return Searcher.FINISHED
        self.numbers[trial_id] = asked.number
        return {"number": asked.number, "params": asked.params}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        _note_held(self.held, trial_id, result)
        number = self.numbers.get(trial_id)
        if number is not None:
            self._info(number, result)
        if number is None or ERROR_KEY in result or "step" not in result:
            return
        try:
            self.recorder.on_result(number, int(result["step"]), protocol.metrics(result))
        except Exception:  # noqa: BLE001
            logger.exception("hpo: recording a result of trial %s failed", number)

    def _info(self, number: int, result: dict) -> None:
        info = protocol.worker_settings(result)
        if info:
            try:
                self.recorder.on_info(number, info)
            except Exception:  # noqa: BLE001
                logger.exception("hpo: recording the settings of trial %s failed", number)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        number = self.numbers.pop(trial_id, None)
        if number is None:
            return
        if result:
            self._info(number, result)  # Tune skips on_trial_result for the result it stops on
        try:
            outcome = self._outcome(trial_id, number, result, error)
        except Exception as problem:  # noqa: BLE001 - never leave a trial RUNNING
            logger.exception("hpo: deciding the end of trial %s failed", number)
            outcome = Outcome("fail", reason="error", error=f"hpo internal error: {problem}")
        _note_held(self.held, trial_id, result or {})
        if trial_id in self.held:  # recorded with the end, in the same write
            outcome = dataclasses.replace(outcome, attrs={**outcome.attrs, "resources": self.held.pop(trial_id)})
        try:
            self.recorder.on_end(number, outcome)
        except Exception:  # noqa: BLE001 - Tune only logs it; the trial is reclaimed and re-queued
            logger.exception("hpo: recording the end of trial %s failed; it runs again", number)

    def _outcome(self, trial_id: str, number: int, result: dict | None, error: bool) -> Outcome:
        stopped_at = self.scheduler.stopped_early.pop(trial_id, None)
        if error:
            # A trial's own exception arrives as an ERROR_KEY result; error=True means its
            # worker process died (killed, out of host memory): the trial runs again, a
            # bounded number of times (Ledger.max_attempts).
            return Outcome("interrupted", error="the trial's worker process died (see the Ray logs)")
        if result is None:
            return Outcome("interrupted")
        if ERROR_KEY in result:
            return Outcome("fail", reason=result.get(REASON_KEY, "error"), error=result[ERROR_KEY])
        if "step" in result and self.metric in result:
            self.recorder.on_result(number, int(result["step"]), protocol.metrics(result))
        if stopped_at is not None:
            return Outcome("pruned", step=stopped_at)
        if result.get("done") and EARLY_STOP_KEY in result:
            return Outcome("complete", reason="early_stopped", step=int(result[EARLY_STOP_KEY]))
        if result.get("done"):
            return Outcome("complete")
        return Outcome("interrupted")


class _Heartbeat(tune.Callback):
    """The recorder's clock on each step of Tune's loop: reclaims dead drivers' trials and
    redraws the display. (Heartbeats themselves come from their own thread.)"""

    def __init__(self, recorder: Recorder):
        self.recorder = recorder

    def __getstate__(self) -> dict[str, Any]:
        return {"recorder": None}

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        if self.recorder is not None:
            self.recorder.tick()


class _Interrupted(tune.Stopper):
    """Stops every trial once the recorder was interrupted (Ctrl-C); Tune's loop then ends."""

    def __init__(self, recorder: Recorder):
        self.recorder = recorder

    def __getstate__(self) -> dict[str, Any]:
        return {"recorder": None}

    def __call__(self, trial_id: str, result: dict) -> bool:
        return False

    def stop_all(self) -> bool:
        return self.recorder is not None and self.recorder.interrupt_requested


@contextlib.contextmanager
def ctrl_c_stops_the_sweep(recorder: Recorder) -> Iterator[None]:
    """While inside (the sweep's run and its closing records): the first SIGINT calls
    ``recorder.interrupt()`` -- no new trial starts, Tune stops the running ones (see
    :class:`_Interrupted`); a second SIGINT raises ``KeyboardInterrupt`` (a hard stop).
    Tune's own SIGINT handler is off meanwhile (``TUNE_DISABLE_SIGINT_HANDLER``): it only sets
    an event that Tune reads between the turns of its loop, and one turn can last up to 600 s
    (``TuneController._update_trial_queue(blocking=True)`` while no trial runs here and the
    searcher answers "wait"), asking the searcher for trials all along; and while other
    processes' trials fill the study, hpo waits outside Tune (:meth:`Recorder.wait_for_a_trial`).
    Outside the main thread, where no handler can be set, nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def first(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # the next one stops at once
        recorder.interrupt()

    previous = signal.signal(signal.SIGINT, first)
    tune_handler = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    try:
        yield
    finally:  # (None: a handler set outside Python, which cannot be put back)
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)
        if tune_handler is None:
            os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
        else:
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = tune_handler


def _note_held(held: dict[str, dict[str, Any]], trial_id: str, result: dict) -> None:
    """Keep what a trial's workers hold: ranks, node, assigned resources, GPU ids, and the
    time from the trial's start on its worker to its last report."""
    if HELD_KEY not in result:
        return
    if trial_id not in held:
        workers = json.loads(result[HELD_KEY])
        held[trial_id] = {"workers": workers, "start": min(worker["start"] for worker in workers)}
    held[trial_id]["end"] = float(result.get(TIME_KEY, time.time()))


def run(recorder: Recorder, sweep: Sweep, train: TrainFn | None, *, address: str | None, module: Any,
        storage_path: str, name: str, worker_logs: bool = False, score: Any = None) -> None:
    """Start (or join) Ray and run trials until the recorder says the sweep is done.

    One Tune run lasts while this process has trials to run. When other processes' running
    trials fill a shared study (``NoTrial.ELSEWHERE``), the run ends once this process's own
    trials end, and with it the workers Tune keeps for reuse: idle, they would hold their
    placement groups while the other processes' trials wait for a slot (until Tune's
    600 s wait for a trial gave up). The process then waits on the study
    (:meth:`Recorder.wait_for_a_trial`) and starts a new run for any trial that turns up
    there (one failed, or its driver died): a new run loads the base model again, the price
    of giving the slots back.

    Workers' output stays in Ray's log files unless ``worker_logs``: the live view stays
    readable, and Ray's own shutdown noise from idle reused workers is not shown. A trial's
    exception reaches the study either way (its ``error`` attr).
    """
    import ray.cloudpickle

    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    if train is not None or score is not None:
        # The module was loaded from a path workers may not import by name: ship it by value.
        ray.cloudpickle.register_pickle_by_value(module)
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
    # Tune's end-of-run advice (Tuner.restore) is not for hpo: the study, not Tune's state, is what resumes.
    logging.getLogger("ray.tune.tune").setLevel(logging.CRITICAL)
    # A trial whose worker died is recorded (interrupted, run again); Tune's traceback for it is noise.
    logging.getLogger("ray.tune.execution.tune_controller").setLevel(logging.CRITICAL)
    cluster.connect(address, worker_logs=worker_logs)
    concurrency = sweep.concurrency or _fit_count(ray.cluster_resources(), sweep.trial_resources)

    scheduler = make_scheduler(sweep)
    spec = TrialSpec(sweep, train, score)
    first: AskedTrial | None = None
    started = time.strftime('%Y%m%d-%H%M%S')
    for turn in itertools.count(1):
        searcher = OptunaBridge(recorder, scheduler, sweep.metrics[0], ranking.mode(sweep), first=first)
        callbacks: list[tune.Callback] = [_Heartbeat(recorder)]
        if sweep.workers_per_trial == 1:
            trainable = tune.with_resources(tune.with_parameters(run_trial, spec=spec), sweep.trial_resources)
        else:  # a light driver per trial; its Ray Train workers reserve the resources (hpo.run.distributed)
            from hpo.run import distributed

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
                name=f"{name}-{started}" + (f"-{turn}" if turn > 1 else ""),
                storage_path=storage_path,
                verbose=0,
                callbacks=callbacks,
                stop=_Interrupted(recorder),
                failure_config=tune.FailureConfig(max_failures=0),
            ),
        )
        tuner.fit()
        if not recorder.elsewhere:
            return
        first = recorder.wait_for_a_trial()
        if first is None:
            return


def _fit_count(available: dict[str, float], per_trial: dict[str, float]) -> int:
    """How many trials fit on the cluster's resources at once (at least 1)."""
    fits = [available.get(k.upper(), 0.0) / v for k, v in per_trial.items() if v > 0]
    return max(1, int(min(fits))) if fits else 1
