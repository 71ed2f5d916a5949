"""MLflow: one parent run per sweep (per study), one nested run per trial.

The parent run carries the sweep's settings; each trial's run carries the trial's params
(the same names and values as in Optuna), every evaluation as metric history, its final
state, and tags linking the study and trial number. Only the driver writes here.
A resumed sweep reopens its study's parent run, so nested runs stay under one parent.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from hpo.errors import HpoError
from hpo.record.stores import check_local, connect_once
from hpo.secrets import open_with_credentials, scrub_credentials, use_credentials
from hpo.secrets import redact_url as redact

logger = logging.getLogger(__name__)
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
TAG_STUDY = "hpo.study"
TAG_ROLE = "hpo.role"
TAG_TRIAL = "hpo.trial_number"
TAG_STATE = "hpo.state"
TAG_REASON = "hpo.reason"
CREATE_KEY_TAG = "hpo.create_key"
"""A key of one create_run call (see :meth:`_Tracker._create_run`)."""
# MLflow 3 marks an experiment's kind with this tag; "custom_model_development" is model
# training (runs table), not the GenAI overview. The UI's workflow switch also follows the
# ``workflowType=machine_learning`` query parameter of experiment links (see :func:`ui_link`).
TAG_EXPERIMENT_KIND = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"
# Optuna state -> MLflow run status. A pruned trial was stopped early by the sweep: KILLED,
# with hpo.state=PRUNED telling it apart from an interrupted one.
RUN_STATUS = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}


def check_tracking(uri: str | None) -> None:
    """Make sure the MLflow store can be used, writing nothing (not even an SQLite file).

    Errors show the URI redacted and never quote its secrets (:func:`hpo.secrets.scrub`).
    """
    original = uri = uri or DEFAULT_TRACKING_URI
    if check_local(uri, "--tracking-uri"):
        return
    if uri.startswith(("http://", "https://")):
        try:
            _health(use_credentials(uri), timeout=10)
            return
        except HpoError:
            raise
        except Exception as error:  # noqa: BLE001 - URLError, HTTPError, timeouts
            reason = scrub_credentials(str(error), original)
            raise HpoError(
                f"--tracking-uri {redact(original)}: the MLflow server does not answer ({type(error).__name__}: "
                f"{reason[:200]}); start it (hpo ui, or docker/compose.yaml) or fix the URI"
            ) from None
    if "://" in uri and not uri.startswith(("file:", "databricks")):
        try:
            connect_once(uri)
        except Exception as error:  # noqa: BLE001
            raise HpoError(
                f"--tracking-uri {redact(uri)}: cannot open the MLflow store ({type(error).__name__}); "
                "check the URL, that the server runs, and the credentials"
            ) from None


def _health(uri: str, timeout: float) -> None:
    """GET the MLflow server's ``/health`` (with this process's Basic auth credentials, never
    sent to another origin on a redirect); raises if it does not answer within ``timeout``."""
    with open_with_credentials(uri.rstrip("/") + "/health", timeout):
        return


class _Tracker:
    """An MLflow client on the study's experiment (created on first use), its calls retried
    when a shared SQLite store says 'locked'."""

    def __init__(self, tracking_uri: str | None, study_name: str):
        import logging

        from mlflow.tracking import MlflowClient

        from hpo.record.mlflow_store import seed
        from hpo.record.sqlite import sqlite_file_lock

        logging.getLogger("mlflow").setLevel(logging.WARNING)
        self.shown_uri = redact(tracking_uri or DEFAULT_TRACKING_URI)
        self.uri = use_credentials(tracking_uri or DEFAULT_TRACKING_URI)
        self.study_name = study_name
        with sqlite_file_lock(self.uri):  # concurrent sweeps: one creates the store and experiment
            seed(self.uri)  # a new local store: a copy of one migrated once (see hpo.record.mlflow_store)
            self.client = _RetryWhenLocked(MlflowClient(tracking_uri=self.uri))
            self.experiment_id = _experiment_id(self.client, self.uri, study_name)

    def _create_run(self, run_name: str, tags: dict[str, str], start_time: int | None = None) -> Any:
        """A new run in the study's experiment, made once even when its answer was lost.

        MLflow's client retries a POST whose answer did not come (its urllib3 ``Retry`` allows
        every method): a server that made the run, then restarted, or answered after the client's
        timeout, makes the same run twice, and the one hpo did not get back stayed RUNNING for
        good. Each create carries a key of its own (tag ``hpo.create_key``); the runs found with
        it besides the one returned are deleted. That check is best effort: if it fails, a
        warning (the run itself was made). A local store (no HTTP between) is not checked."""
        import uuid

        if not self.uri.startswith(("http://", "https://")):
            return self.client.create_run(self.experiment_id, start_time=start_time, run_name=run_name, tags=tags)
        key = uuid.uuid4().hex
        run = self.client.create_run(self.experiment_id, start_time=start_time, run_name=run_name,
                                     tags={**tags, CREATE_KEY_TAG: key})
        try:
            made = self.client.search_runs([self.experiment_id], filter_string=f"tags.`{CREATE_KEY_TAG}` = '{key}'",
                                           max_results=10)
            for twin in made:
                if twin.info.run_id != run.info.run_id:
                    self.client.delete_run(twin.info.run_id)
        except Exception as error:  # noqa: BLE001 - the run was made; a twin, if any, stays
            logger.warning("hpo: could not check that MLflow run %s was made once (%s: %s)", run.info.run_id,
                           type(error).__name__, _first_line(error))
        return run

    def _search(self, role: str, trial_number: int | None = None, max_results: int = 1) -> list[Any]:
        """This study's runs of ``role`` (sweep, trial, promote), or only trial ``trial_number``'s."""
        wanted = f"tags.`{TAG_STUDY}` = '{self.study_name}' and tags.`{TAG_ROLE}` = '{role}'"
        if trial_number is not None:
            wanted += f" and tags.`{TAG_TRIAL}` = '{trial_number}'"
        return self.client.search_runs([self.experiment_id], filter_string=wanted, max_results=max_results)

    def _log_metrics(self, run_id: str, step: int, metrics: dict[str, float], now: int | None = None) -> None:
        batch = _metrics(metrics, step, now or int(time.time() * 1000))
        if batch:
            self.client.log_batch(run_id, metrics=batch)

    def _log_params(self, run_id: str, params: dict[str, Any]) -> None:
        items = _params(params)
        for start in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[start : start + 100])


MIRROR_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                        "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
"""A sweep's client budget against an MLflow server (MLflow's own defaults: 7 retries, back-off
factor 2, 120 s timeout, make one call to a dead server take about 4 minutes): a call gives up
after about 3 s when the server refuses connections, after 30 s when it does not answer at
all. The writer retries on top within its own budget (:class:`hpo.record.writer.Writer`), and
what is still missed is written from the study. Set any of them to override."""


class MlflowDown(Exception):
    """The MLflow store did not answer a call of the sweep's end (or an earlier one): not tried again."""


class SweepTracker(_Tracker):
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
            run = self._create_run(self.study_name, {TAG_ROLE: "sweep", TAG_STUDY: self.study_name, **tags})
            run_id = run.info.run_id
            self._log_params(run_id, params)
        self.parent_run_id = run_id
        return run_id

    def note_sweep(self, params: dict[str, Any], tags: dict[str, str]) -> None:
        """Params and tags on the parent run, made now or reopened (MLflow takes a param again when
        its value is the same: a resumed sweep notes what its first run noted)."""
        from mlflow.entities import RunTag

        if self.parent_run_id is not None:
            self.client.log_batch(self.parent_run_id, params=_params(params),
                                  tags=[RunTag(key, value) for key, value in tags.items()])

    def _trial_tags(self, number: int, state: str) -> dict[str, str]:
        return {"mlflow.parentRunId": self.parent_run_id or "", TAG_STUDY: self.study_name, TAG_TRIAL: str(number),
                TAG_ROLE: "trial", TAG_STATE: state}

    def start_trial(self, number: int, params: dict[str, Any]) -> None:
        """The trial's run, RUNNING, with its params (written by the writer)."""
        tags, started = self._trial_tags(number, "RUNNING"), int(time.time() * 1000)

        def write() -> None:
            if number not in self.trial_runs:  # a retry after a lost answer must not make a second run
                run = self._create_run(f"trial-{number}", tags, start_time=started)
                self.trial_runs[number] = run.info.run_id

        self.writer.submit(write, f"starting the MLflow run of trial {number}", lambda: self.unwritten.add(number))
        self._add(number, params=_params(params))

    def _add(self, number: int, metrics: list[Any] = (), params: list[Any] = (), tags: list[Any] = ()) -> None:
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
        self._add(number, metrics=_metrics(metrics, step, int(time.time() * 1000)))

    def log_trial_params(self, number: int, params: dict[str, Any]) -> None:
        """More params on a running trial's run (what its worker resolved: device, precision, ...)."""
        if params:
            self._add(number, params=_params(params))

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
            _health(self.uri, timeout=3)
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
                           _first_line(error), self.study_name)

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
                       for step, value in history if int(step) not in logged and _is_number(value)]
        for start in range(0, len(points), 1000):
            self.client.log_batch(run_id, metrics=points[start : start + 1000])
        self._close(run_id, end.state, end.reason, end.value, end.ended)


def _params(params: dict[str, Any]) -> list[Any]:
    from mlflow.entities import Param

    return [Param(str(k), str(v)[:6000]) for k, v in params.items() if v is not None]


def _metrics(metrics: dict[str, Any], step: int, now: int) -> list[Any]:
    """MLflow metric points of the numbers among ``metrics``, at ``step``, timestamped ``now`` (ms)."""
    from mlflow.entities import Metric

    return [Metric(k, float(v), now, step) for k, v in metrics.items() if _is_number(v)]


def _end_tags(state: str, reason: str | None, value: float | None) -> list[Any]:
    from mlflow.entities import RunTag

    tags = [RunTag(TAG_STATE, state)]
    if reason:
        tags.append(RunTag(TAG_REASON, reason[:5000]))
    if value is not None and _is_number(value):
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


def _experiment_id(client: Any, uri: str, study_name: str) -> str:
    """The experiment named after the study (created, or restored if deleted)."""
    try:
        experiment = client.get_experiment_by_name(study_name)
        if experiment is not None:
            if experiment.lifecycle_stage == "deleted":
                client.restore_experiment(experiment.experiment_id)
            if experiment.tags.get(TAG_EXPERIMENT_KIND) != MODEL_TRAINING:  # made before hpo set it
                client.set_experiment_tag(experiment.experiment_id, TAG_EXPERIMENT_KIND, MODEL_TRAINING)
            return experiment.experiment_id
        return client.create_experiment(study_name, tags={TAG_STUDY: study_name, TAG_EXPERIMENT_KIND: MODEL_TRAINING})
    except Exception as error:  # noqa: BLE001 - MLflow raises many types for a bad store
        message = str(error).splitlines()[0] if str(error) else ""
        if any(code in message for code in ("401", "403", "PERMISSION_DENIED", "UNAUTHENTICATED")):
            raise HpoError(
                f"--tracking-uri {redact(uri)}: the MLflow server refused the credentials or the permission "
                f"({redact(message)[:200]}); set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to a user "
                f"allowed to edit experiment {study_name!r}"
            ) from None
        raise HpoError(
            f"--tracking-uri {redact(uri)}: cannot use the MLflow store "
            f"({type(error).__name__}: {scrub_credentials(message, uri)[:300]}); check the URI and that the server runs"
        ) from None


def ui_link(base_url: str, experiment_id: str | None = None) -> str:
    """A link into the MLflow UI that opens on model training: the experiment's runs
    table (or the experiments list), not the GenAI overview MLflow 3 shows by default."""
    page = f"experiments/{experiment_id}" if experiment_id else "experiments"
    return f"{base_url.rstrip('/')}/#/{page}?workflowType=machine_learning"


def sweep_links(tracking_uri: str, base_url: str) -> list[tuple[str, str]]:
    """(study, UI link) for each hpo experiment in the store, newest first; empty when the
    store cannot be read (the UI still serves the experiments list)."""
    try:
        import logging

        from mlflow.tracking import MlflowClient

        logging.getLogger("mlflow").setLevel(logging.WARNING)
        experiments = MlflowClient(tracking_uri=tracking_uri).search_experiments(
            filter_string=f"tags.`{TAG_STUDY}` != ''", order_by=["creation_time DESC"], max_results=20)
    except Exception:  # noqa: BLE001 - a missing or unreachable store: no links, not an error
        return []
    return [(e.name, ui_link(base_url, e.experiment_id)) for e in experiments]


class PromoteTracker(_Tracker):
    """The final training run of ``hpo promote``: a run of its own in the study's
    experiment, linked to the trial and the sweep, with a registered model version."""

    run_id = ""
    trial_number = -1

    def start(self, trial_number: int, parent_run_id: str | None, params: dict[str, Any]) -> str:
        trial_runs = self._search("trial", trial_number, max_results=1)
        tags = {TAG_ROLE: "promote", TAG_STUDY: self.study_name, TAG_TRIAL: str(trial_number),
                "hpo.sweep_run_id": parent_run_id or "", "hpo.trial_run_id": trial_runs[0].info.run_id if trial_runs else ""}
        run = self._create_run(f"promote-trial-{trial_number}", tags)
        self.run_id, self.trial_number = run.info.run_id, trial_number
        self._log_params(self.run_id, params)
        return self.run_id

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self._log_metrics(self.run_id, step, metrics)

    def log_params(self, params: dict[str, Any]) -> None:
        self._log_params(self.run_id, params)

    def log_folder(self, folder: Any) -> None:
        self.client.log_artifacts(self.run_id, str(folder), artifact_path="model")

    def register(self, name: str, trial_number: int) -> str:
        """A new version of registered model ``name`` from this run's ``model`` artifacts."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(
                name, tags={TAG_STUDY: self.study_name},
                description=f"Models promoted by hpo from the Optuna study {self.study_name!r}.")
        except MlflowException as error:
            if "RESOURCE_ALREADY_EXISTS" not in str(error) and "already exists" not in str(error):
                raise
        run = self.client.get_run(self.run_id)
        version = self.client.create_model_version(
            name, source=f"{run.info.artifact_uri}/model", run_id=self.run_id,
            tags={TAG_STUDY: self.study_name, TAG_TRIAL: str(trial_number)},
            description=f"hpo promote of trial {trial_number} of study {self.study_name!r}",
        )
        return str(version.version)

    def finish(self, metrics: dict[str, float], status: str) -> None:
        if not self.run_id:
            return
        final = {f"final_{k}": v for k, v in metrics.items() if _is_number(v)}
        if final:
            self.log_metrics(0, final)
        self.client.set_terminated(self.run_id, status=status)


RETRY_WORDS = ("database is locked", "UNIQUE constraint failed")


class _RetryWhenLocked:
    """The MLflow client, each call retried when a shared SQLite store says 'locked', or when
    another sweep process won the race to insert the same tag or param (MLflow's SQL store
    reads, then inserts: two drivers ending one sweep both set the parent run's tags)."""

    def __init__(self, client: Any):
        self._client = client

    def __getattr__(self, name: str) -> Any:
        from hpo.record.stores import retry_when_locked

        attribute = getattr(self._client, name)
        if not callable(attribute):
            return attribute
        return lambda *args, **kwargs: retry_when_locked(lambda: attribute(*args, **kwargs), words=RETRY_WORDS)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _first_line(error: BaseException) -> str:
    return str(error).splitlines()[0][:200] if str(error) else ""


def fetch_data_checks(tracking_uri: str | None, study_name: str, folder: Any) -> str | None:
    """Download ``checks/checks.json`` (what :func:`log_data_checks` logged) of the study's sweep run,
    else of its ``check-data`` run, to ``folder/checks.json``; returns the run's id, or None when
    there is none. Reads only: no experiment is made, and an SQLite store that is not there is not
    created. Raises HpoError when the store cannot be reached (:func:`check_tracking`)."""
    from pathlib import Path

    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one small file: no bar in the output

    uri = tracking_uri or DEFAULT_TRACKING_URI
    check_tracking(uri)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        return None
    client = MlflowClient(tracking_uri=use_credentials(uri))
    experiment = client.get_experiment_by_name(study_name)
    if experiment is None:
        return None
    for role in ("sweep", "check-data"):
        wanted = f"tags.`{TAG_STUDY}` = '{study_name}' and tags.`{TAG_ROLE}` = '{role}'"
        for run in client.search_runs([experiment.experiment_id], filter_string=wanted, max_results=5):
            if any(a.path == "checks/checks.json" for a in client.list_artifacts(run.info.run_id, "checks")):
                client.download_artifacts(run.info.run_id, "checks/checks.json", str(folder))
                return run.info.run_id
    return None


def log_data_checks(tracking_uri: str | None, study_name: str, files: list[Any]) -> str:
    """Log ``hpo check-data``'s files (the label and near-duplicate CSVs) under ``checks/`` of the
    study's sweep run, or, before any sweep, of a new finished run named ``check-data`` in the
    study's experiment; returns the run's id."""
    tracker = _Tracker(tracking_uri, study_name)
    found = tracker._search("sweep")
    run_id = found[0].info.run_id if found else tracker.client.create_run(
        tracker.experiment_id, run_name="check-data", tags={TAG_ROLE: "check-data", TAG_STUDY: study_name}).info.run_id
    for path in files:
        tracker.client.log_artifact(run_id, str(path), artifact_path="checks")
    if not found:
        tracker.client.set_terminated(run_id, status="FINISHED")
    return run_id
