"""The sweep's MLflow mirror: one parent run per sweep (per study), one nested run per trial.

The parent run carries the sweep's settings; each trial's run carries the trial's params
(the same names and values as in Optuna), every evaluation as metric history, its final
state, and tags linking the study and trial number. Only the driver writes here, and the
trial runs' writes go through a thread of their own (:class:`~hpo.record.writer.Writer`),
batched per trial. A resumed sweep reopens its study's parent run, so nested runs stay under
one parent; what the mirror missed is written from the study (:meth:`SweepTracker.fill_trial`).
The store, the study's experiment and the runs of ``hpo promote``: :mod:`hpo.record.tracking`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from hpo.record.tracking import (
    DEFAULT_TRACKING_URI,
    TAG_REASON,
    TAG_ROLE,
    TAG_STATE,
    TAG_STUDY,
    TAG_TRIAL,
    Tracker,
    first_line,
    health,
    is_number,
    mlflow_metrics,
    mlflow_params,
)

if TYPE_CHECKING:
    from mlflow.entities import Metric, Param, RunTag

logger = logging.getLogger(__name__)
# Optuna state -> MLflow run status. A pruned trial was stopped early by the sweep: KILLED,
# with hpo.state=PRUNED telling it apart from an interrupted one.
RUN_STATUS = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}
MIRROR_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                        "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
"""A sweep's client budget against an MLflow server (MLflow's own defaults: 7 retries, back-off
factor 2, 120 s timeout, make one call to a dead server take about 4 minutes): a call gives up
after about 3 s when the server refuses connections, after 30 s when it does not answer at
all. The writer retries on top within its own budget (:class:`hpo.record.writer.Writer`), and
what is still missed is written from the study. Set any of them to override."""


class MlflowDown(Exception):
    """The MLflow store did not answer a call of the sweep's end (or an earlier one): not tried again."""


class SweepTracker(Tracker):
    """Writes a sweep's runs. Called from the driver's one thread; the trial runs' writes
    (:meth:`start_trial` ... :meth:`end_trial`) go through a :class:`~hpo.record.writer.Writer`, in
    order, off that thread: :meth:`flush` waits for them. A write's time (metric timestamps,
    a run's end) is taken when it is submitted, not when it runs. A trial's params, metrics
    and tags that wait for the writer together go in one ``log_batch``."""

    def __init__(self, tracking_uri: str | None, study_name: str):
        from hpo.record.writer import Writer

        if (tracking_uri or DEFAULT_TRACKING_URI).startswith(("http://", "https://")):
            for name, value in MIRROR_HTTP_DEFAULTS.items():
                os.environ.setdefault(name, value)
            # MLflow's client prints two "View run/experiment at" lines to stdout for every run it
            # closes on a server (from the writer's thread, into the sweep's display) and reads the
            # run back for them: one more call per trial. The sweep prints its own links.
            os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        super().__init__(tracking_uri, study_name)
        self.parent_run_id: str | None = None
        self.trial_runs: dict[int, str] = {}
        """Trial number -> its run's id, once the writer has created the run."""
        self.writer = Writer("hpo-mlflow")
        self.unwritten: set[int] = set()
        """Trials with a write that failed after its retries (see :func:`hpo.record.recorder.mirror_gaps`)."""
        self._pending: dict[int, tuple[list[Any], list[Any], list[Any]]] = {}
        """Trial number -> (metrics, params, tags) submitted to the writer, not written yet."""
        self._queued: set[int] = set()
        """Trials with a batch write in the writer's queue that has not started yet."""
        self._pending_lock = threading.Lock()
        self._down = False

    def start_sweep(self, params: dict[str, Any], tags: dict[str, str]) -> str:
        """Open (or reopen, on resume) the study's parent run; returns its id."""
        run_id = self.find_sweep_run()
        if run_id is not None:
            self.client.update_run(run_id, status="RUNNING")
        else:
            run = self._create_run_now(self.study_name, {TAG_ROLE: "sweep", TAG_STUDY: self.study_name, **tags},
                                       "creating the sweep's MLflow run")
            run_id = run.info.run_id
            self._log_params(run_id, params)
        self.parent_run_id = run_id
        return run_id

    def note_sweep(self, params: dict[str, Any], tags: dict[str, str]) -> None:
        """Params and tags on the parent run, made now or reopened (MLflow takes a param again when
        its value is the same: a resumed sweep notes what its first run noted)."""
        from mlflow.entities import RunTag

        if self.parent_run_id is not None:
            self.client.log_batch(self.parent_run_id, params=mlflow_params(params),
                                  tags=[RunTag(key, value) for key, value in tags.items()])

    def _trial_tags(self, number: int, state: str) -> dict[str, str]:
        return {"mlflow.parentRunId": self.parent_run_id or "", TAG_STUDY: self.study_name, TAG_TRIAL: str(number),
                TAG_ROLE: "trial", TAG_STATE: state}

    def start_trial(self, number: int, params: dict[str, Any]) -> None:
        """The trial's run, RUNNING, with its params (written by the writer)."""
        tags, started, key = self._trial_tags(number, "RUNNING"), int(time.time() * 1000), uuid.uuid4().hex

        def write() -> None:
            if number not in self.trial_runs:  # a retry after a lost answer must not make a second run
                run = self._create_run(f"trial-{number}", tags, start_time=started, key=key)
                self.trial_runs[number] = run.info.run_id

        self.writer.submit(write, f"starting the MLflow run of trial {number}", lambda: self.unwritten.add(number))
        self._add(number, params=mlflow_params(params))

    def _add(self, number: int, metrics: Sequence[Metric] = (), params: Sequence[Param] = (),
             tags: Sequence[RunTag] = ()) -> None:
        """Metrics, params and tags for the trial's run: joined to those still waiting for the
        writer, else submitted as a new batch. A batch the writer could not write (skipped while
        the store was down, or failed) is kept: it goes with the trial's next write."""
        if not (metrics or params or tags):
            return
        with self._pending_lock:
            waiting = self._pending.setdefault(number, ([], [], []))
            waiting[0].extend(metrics)
            waiting[1].extend(params)
            waiting[2].extend(tags)
            if number in self._queued:
                return
            self._queued.add(number)

        def missed() -> None:
            with self._pending_lock:
                self._queued.discard(number)
            self.unwritten.add(number)

        def write() -> None:
            with self._pending_lock:
                self._queued.discard(number)
            run_id = self.trial_runs.get(number)
            if run_id is not None:
                self._write_pending(number, run_id)

        self.writer.submit(write, f"logging to the MLflow run of trial {number}", missed)

    def _write_pending(self, number: int, run_id: str) -> None:
        """What waits for the trial's run, in one ``log_batch`` (or several). If the store is
        down (a transient error) it is put back for the trial's next write; one the store refused
        is dropped (the trial's run is written from the study at the sweep's end)."""
        from hpo.record.stores import is_transient

        with self._pending_lock:
            taken = self._pending.pop(number, None)
        if taken is None or not any(taken):
            return
        try:
            self._log_batch(run_id, *taken)
        except Exception as error:
            if not is_transient(error):
                raise
            with self._pending_lock:  # kept, ahead of what came meanwhile: the next write of the trial takes it
                later = self._pending.get(number, ([], [], []))
                self._pending[number] = (taken[0] + later[0], taken[1] + later[1], taken[2] + later[2])
            raise

    def _log_batch(self, run_id: str, metrics: list[Any], params: list[Any], tags: list[Any]) -> None:
        """One ``log_batch`` when MLflow's limits allow (1000 values, 100 params, 100 tags), else several.
        A param given twice goes once (MLflow refuses a batch that repeats a key); a tag's last value wins."""
        params = list({param.key: param for param in reversed(params)}.values())[::-1]
        tags = list({tag.key: tag for tag in tags}.values())
        while metrics or params or tags:
            some_params, params = params[:100], params[100:]
            some_tags, tags = tags[:100], tags[100:]
            room = 1000 - len(some_params) - len(some_tags)
            some_metrics, metrics = metrics[:room], metrics[room:]
            self.client.log_batch(run_id, metrics=some_metrics, params=some_params, tags=some_tags)

    def _on_run(self, number: int, what: str, write: Any) -> None:
        """Submit ``write(run_id)`` for the trial's run (skipped if the run could not be made)."""

        def on_run() -> None:
            run_id = self.trial_runs.get(number)
            if run_id is not None:
                write(run_id)

        self.writer.submit(on_run, f"{what} of trial {number} in MLflow", lambda: self.unwritten.add(number))

    def log_metrics(self, number: int, step: int, metrics: dict[str, float]) -> None:
        self._add(number, metrics=mlflow_metrics(metrics, step, int(time.time() * 1000)))

    def log_trial_params(self, number: int, params: dict[str, Any]) -> None:
        """More params on a running trial's run (what its worker resolved: device, precision, ...)."""
        if params:
            self._add(number, params=mlflow_params(params))

    def tag_trial(self, number: int, key: str, value: str) -> None:
        from mlflow.entities import RunTag

        self._add(number, tags=[RunTag(key, value)])

    def end_trial(self, number: int, state: str, reason: str | None = None, value: float | None = None) -> None:
        """Close the trial's run with the status matching the Optuna ``state``: its tags (with
        whatever else still waits for the writer) in one batch, then the status."""
        ended = int(time.time() * 1000)
        self._add(number, tags=_end_tags(state, reason, value))

        def write(run_id: str) -> None:
            self._write_pending(number, run_id)  # whatever an earlier write could not write goes first
            self._terminate(run_id, state, reason, ended)
            self.trial_runs.pop(number, None)

        self._on_run(number, "closing the run", write)

    def _close(self, run_id: str, state: str, reason: str | None, value: float | None, ended: int | None) -> None:
        self.client.log_batch(run_id, tags=_end_tags(state, reason, value))
        self._terminate(run_id, state, reason, ended)

    def _terminate(self, run_id: str, state: str, reason: str | None, ended: int | None) -> None:
        """End the run with the MLflow status of the Optuna ``state`` (:func:`run_status`)."""
        self.client.set_terminated(run_id, status=run_status(state, reason), end_time=ended)

    def flush(self, final: bool = False) -> None:
        """Wait until the trial runs' writes submitted so far are written (or failed); ``final``:
        the sweep is ending, so a store that is down is not tried again (see :class:`~hpo.record.writer.Writer`).
        A server that answers its health check again (restarted within the writer's pause) is
        written to as usual: the sweep's end does not leave its runs to the next sweep for it."""
        if final:
            if self.writer.down and self._answers():
                logger.warning("hpo: the MLflow server %s answers again; writing what the sweep could not",
                               self.shown_uri)
                self.writer.up_again()
            self.writer.give_up_when_down()
        self.writer.flush()

    def _answers(self) -> bool:
        """Whether the MLflow server answers its health check within 3 s (other stores are not probed: False)."""
        if not self.uri.startswith(("http://", "https://")):
            return False
        try:
            health(self.uri, timeout=3)
            return True
        except Exception:  # noqa: BLE001 - URLError, HTTPError, timeouts: still down
            return False

    @property
    def down(self) -> bool:
        """Whether the store did not answer the last write, or a call of the sweep's end (:meth:`end_call`)."""
        return self._down or self.writer.down

    def end_call(self, call: Any, what: str) -> Any:
        """``call()``, one of the sweep's end (gap filling, the report, the sweep run's close):
        not tried when the store is known to be down (:class:`MlflowDown`); one that fails with
        a transient error marks it down, so the other end calls are not tried."""
        from hpo.record.stores import is_transient

        if self.down:
            raise MlflowDown(f"{what}: the MLflow store {self.shown_uri} did not answer")
        try:
            return call()
        except Exception as error:
            if is_transient(error):
                self._down = True
            raise

    def end_sweep(self, status: str = "FINISHED", summary: dict[str, Any] | None = None) -> None:
        """Close the sweep's parent run with ``status`` and the ``summary`` tags. Never raises
        (it runs in the sweep's ``finally``): a failure is a warning, and the next ``hpo search``
        on the study that runs trials reopens and closes the run."""
        from mlflow.entities import RunTag

        self.writer.give_up_when_down()
        self.writer.close()
        if self.parent_run_id is None:
            return
        parent = self.parent_run_id
        tags = [RunTag(f"hpo.{key}", str(value)) for key, value in (summary or {}).items()]

        def close() -> None:
            if tags:
                self.client.log_batch(parent, tags=tags)
            self.client.set_terminated(parent, status=status)

        try:
            self.end_call(close, "closing the sweep's MLflow run")
        except Exception as error:  # noqa: BLE001 - the trials are recorded in the study; this is the mirror
            logger.warning("hpo: the sweep's MLflow run %s was not closed (%s: %s); it shows RUNNING until the next "
                           "`hpo search` on study %r that runs trials closes it", parent, type(error).__name__,
                           first_line(error), self.study_name)

    def log_report(self, files: list[Any], run_id: str | None = None) -> None:
        """Log the study report's ``files`` (the paths :func:`hpo.analysis.study_report.write_report` wrote,
        nothing else of their folder) under ``report/`` of the parent run (or ``run_id``)."""
        target = run_id or self.parent_run_id
        if target:
            def log() -> None:
                for path in files:
                    self.client.log_artifact(target, str(path), artifact_path="report")

            self.end_call(log, "logging the study report")

    def find_sweep_run(self) -> str | None:
        found = self._search("sweep", max_results=1)
        return found[0].info.run_id if found else None

    def trial_run_index(self) -> dict[int, Any]:
        """This study's trial runs by trial number (MLflow ``Run`` objects; the first one found
        when a number has several)."""
        found = self._search("trial", max_results=50000)
        runs: dict[int, Any] = {}
        for run in found:
            runs.setdefault(int(run.data.tags.get(TAG_TRIAL, -1)), run)
        return runs

    def fill_trial(self, number: int, run: Any, end: TrialEnd) -> None:
        """Bring a trial's run in line with the study after a driver died: make it if it is
        missing, add the params and metric points it lacks, tag and close it (synchronous)."""
        from mlflow.entities import Metric

        existed = run is not None
        if run is None:
            parent = self.parent_run_id or self.find_sweep_run()
            tags = {**self._trial_tags(number, "RUNNING"), "mlflow.parentRunId": parent or ""}
            run = self._create_run(f"trial-{number}", tags, start_time=end.started)
            have_params: set[str] = set()
        else:
            have_params = set(run.data.params)
        run_id = run.info.run_id
        self._log_params(run_id, {k: v for k, v in end.params.items() if str(k) not in have_params})
        points = []
        for key, history in end.curves.items():
            logged = {m.step for m in self.client.get_metric_history(run_id, key)} if existed else set()
            points += [Metric(key, float(value), end.ended or end.started or 0, int(step))
                       for step, value in history if int(step) not in logged and is_number(value)]
        for start in range(0, len(points), 1000):
            self.client.log_batch(run_id, metrics=points[start : start + 1000])
        self._close(run_id, end.state, end.reason, end.value, end.ended)


def _end_tags(state: str, reason: str | None, value: float | None) -> list[Any]:
    from mlflow.entities import RunTag

    tags = [RunTag(TAG_STATE, state)]
    if reason:
        tags.append(RunTag(TAG_REASON, reason[:5000]))
    if value is not None and is_number(value):
        tags.append(RunTag("hpo.objective", repr(float(value))))
    return tags


def run_status(state: str, reason: str | None) -> str:
    """The MLflow status of a trial's run that ends in Optuna ``state`` (see :data:`RUN_STATUS`);
    an interrupted trial's run is KILLED."""
    return "KILLED" if reason == "interrupted" else RUN_STATUS.get(state, "FAILED")


@dataclass(frozen=True)
class TrialEnd:
    """What the study holds about a finished trial, for :meth:`SweepTracker.fill_trial`."""

    state: str
    """The Optuna state name: COMPLETE, PRUNED or FAIL."""
    reason: str | None
    """What the run's hpo.reason tag says (``interrupted`` closes it KILLED)."""
    value: float | None = None
    params: dict[str, Any] = field(default_factory=dict)
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    """Metric name -> (step, value) points."""
    started: int | None = None
    """Milliseconds since the epoch."""
    ended: int | None = None
