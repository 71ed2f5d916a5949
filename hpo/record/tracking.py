"""MLflow: the tracking store, one experiment per study, and the runs besides a sweep's.

:func:`check_tracking` makes sure the store answers before anything is written. A
:class:`Tracker` is a client on the study's experiment (made on first use, tagged as model
training), its calls retried when a shared SQLite store says 'locked', each run made once
even when an answer was lost. :class:`PromoteTracker` writes ``hpo promote``'s run and its
registered model version; :func:`log_data_checks` keeps ``hpo check-data``'s files. The
sweep's parent run and its trial runs: :mod:`hpo.record.sweep_tracker`. Only the driver
writes MLflow; how its credentials are kept: :mod:`hpo.secrets`.
"""

from __future__ import annotations

import functools
import logging
import os
import time
import uuid
from typing import Any

from hpo.errors import HpoError
from hpo.record.stores import check_local, connect_once, retry_transient
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
"""A key of one create_run call (see :meth:`Tracker._create_run`)."""
# MLflow 3 marks an experiment's kind with this tag; "custom_model_development" is model
# training (runs table), not the GenAI overview. The UI's workflow switch also follows the
# ``workflowType=machine_learning`` query parameter of experiment links (see :func:`ui_link`).
TAG_EXPERIMENT_KIND = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"


def check_tracking(uri: str | None) -> None:
    """Make sure the MLflow store can be used, writing nothing (not even an SQLite file).

    Errors show the URI redacted and never quote its secrets (:func:`hpo.secrets.scrub`).
    """
    original = uri = uri or DEFAULT_TRACKING_URI
    if check_local(uri, "--tracking-uri"):
        return
    if uri.startswith(("http://", "https://")):
        try:
            health(use_credentials(uri), timeout=10)
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


@functools.cache
def _client_resends_creates() -> bool:
    """Whether MLflow's client sends a POST again when its answer was lost (before 3.18, which
    retries a write that is not idempotent only when the server cannot have processed it)."""
    import re
    from importlib.metadata import version

    major, minor = re.match(r"(\d+)\.(\d+)", version("mlflow")).groups()  # type: ignore[union-attr]
    return (int(major), int(minor)) < (3, 18)


def health(uri: str, timeout: float) -> None:
    """GET the MLflow server's ``/health`` (with this process's Basic auth credentials, never
    sent to another origin on a redirect); raises if it does not answer within ``timeout``."""
    with open_with_credentials(uri.rstrip("/") + "/health", timeout):
        return


class Tracker:
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
        self._unanswered: set[str] = set()
        """Keys of creates sent whose answer did not come (see :meth:`_create_run`)."""

    def _create_run(self, run_name: str, tags: dict[str, str], start_time: int | None = None,
                    key: str | None = None) -> Any:
        """A new run in the study's experiment, made once even when its answer was lost.

        A server that made the run, then restarted, or answered after the client's timeout,
        leaves the caller with an error though the run exists. Each create carries a key of its
        own (tag ``hpo.create_key``); a caller that tries a create again passes the same
        ``key``, and a create whose earlier try got no answer looks for the run with that key
        before it sends the POST again. MLflow's client before 3.18 sends such a POST again
        itself (its urllib3 ``Retry`` allowed every method): the runs found with the key besides
        the one returned are deleted, as they would stay RUNNING for good; that check is best
        effort: if it fails, a warning (the run itself was made). The look before a create is
        sent again fails as the create would (the caller tries again). A local store (no HTTP
        between) is not checked."""
        if not self.uri.startswith(("http://", "https://")):
            return self.client.create_run(self.experiment_id, start_time=start_time, run_name=run_name, tags=tags)
        key = key or uuid.uuid4().hex
        if key in self._unanswered:  # an earlier try of this create got no answer: was it made?
            made = self._made_with(key)
            if made:
                self._unanswered.discard(key)
                return self._keep_one(made[0], made)
        self._unanswered.add(key)
        run = self.client.create_run(self.experiment_id, start_time=start_time, run_name=run_name,
                                     tags={**tags, CREATE_KEY_TAG: key})
        self._unanswered.discard(key)
        if _client_resends_creates():
            try:
                self._keep_one(run, self._made_with(key))
            except Exception as error:  # noqa: BLE001 - the run was made; a twin, if any, stays
                logger.warning("hpo: could not check that MLflow run %s was made once (%s: %s)", run.info.run_id,
                               type(error).__name__, first_line(error))
        return run

    def _create_run_now(self, run_name: str, tags: dict[str, str], what: str) -> Any:
        """:meth:`_create_run` from the caller's thread, tried again on transient errors under one key."""
        key = uuid.uuid4().hex
        return retry_transient(lambda: self._create_run(run_name, tags, key=key), what=what)

    def _made_with(self, key: str) -> list[Any]:
        """The runs made by the create of ``key``, the first made first."""
        return self.client.search_runs([self.experiment_id], filter_string=f"tags.`{CREATE_KEY_TAG}` = '{key}'",
                                       max_results=10, order_by=["attributes.start_time ASC"])

    def _keep_one(self, run: Any, made: list[Any]) -> Any:
        """``run``, the others of ``made`` (twins of one create) deleted."""
        for twin in made:
            if twin.info.run_id != run.info.run_id:
                self.client.delete_run(twin.info.run_id)
        return run

    def _search(self, role: str, trial_number: int | None = None, max_results: int = 1) -> list[Any]:
        """This study's runs of ``role`` (sweep, trial, promote), or only trial ``trial_number``'s."""
        wanted = f"tags.`{TAG_STUDY}` = '{self.study_name}' and tags.`{TAG_ROLE}` = '{role}'"
        if trial_number is not None:
            wanted += f" and tags.`{TAG_TRIAL}` = '{trial_number}'"
        return self.client.search_runs([self.experiment_id], filter_string=wanted, max_results=max_results)

    def _log_metrics(self, run_id: str, step: int, metrics: dict[str, float], now: int | None = None) -> None:
        batch = mlflow_metrics(metrics, step, now or int(time.time() * 1000))
        if batch:
            self.client.log_batch(run_id, metrics=batch)

    def _log_params(self, run_id: str, params: dict[str, Any]) -> None:
        items = mlflow_params(params)
        for start in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[start : start + 100])


def mlflow_params(params: dict[str, Any]) -> list[Any]:
    """MLflow params of ``params`` (values as text, at most 6000 characters; None left out)."""
    from mlflow.entities import Param

    return [Param(str(k), str(v)[:6000]) for k, v in params.items() if v is not None]


def mlflow_metrics(metrics: dict[str, Any], step: int, now: int) -> list[Any]:
    """MLflow metric points of the numbers among ``metrics``, at ``step``, timestamped ``now`` (ms)."""
    from mlflow.entities import Metric

    return [Metric(k, float(v), now, step) for k, v in metrics.items() if is_number(v)]


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


class PromoteTracker(Tracker):
    """The final training run of ``hpo promote``: a run of its own in the study's
    experiment, linked to the trial and the sweep, with a registered model version."""

    run_id = ""
    trial_number = -1

    def start(self, trial_number: int, parent_run_id: str | None, params: dict[str, Any]) -> str:
        trial_runs = self._search("trial", trial_number, max_results=1)
        tags = {TAG_ROLE: "promote", TAG_STUDY: self.study_name, TAG_TRIAL: str(trial_number),
                "hpo.sweep_run_id": parent_run_id or "", "hpo.trial_run_id": trial_runs[0].info.run_id if trial_runs else ""}
        run = self._create_run_now(f"promote-trial-{trial_number}", tags, "creating the MLflow run of hpo promote")
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
        final = {f"final_{k}": v for k, v in metrics.items() if is_number(v)}
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


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def first_line(error: BaseException) -> str:
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
    tracker = Tracker(tracking_uri, study_name)
    found = tracker._search("sweep")
    run_id = found[0].info.run_id if found else tracker.client.create_run(
        tracker.experiment_id, run_name="check-data", tags={TAG_ROLE: "check-data", TAG_STUDY: study_name}).info.run_id
    for path in files:
        tracker.client.log_artifact(run_id, str(path), artifact_path="checks")
    if not found:
        tracker.client.set_terminated(run_id, status="FINISHED")
    return run_id
