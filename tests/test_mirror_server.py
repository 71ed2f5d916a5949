"""The MLflow mirror against a real `mlflow server` that dies: a trial's batches written while
it was down are kept and go once it answers again, and a server dead at the sweep's end costs
the sweep a bounded wait, a warning, exit 0 and its summary; the next sweep writes the runs."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import hpo_env, stop_group, wait_until_up

pytestmark = pytest.mark.slow


class Server:
    """`mlflow server` on a fixed port and SQLite store, stopped and started again at will."""

    def __init__(self, root: Path):
        from hpo.record import mlflow_store

        self.root = root
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.uri = f"http://127.0.0.1:{self.port}"
        self.store = f"sqlite:///{root / 'mlflow.db'}"
        mlflow_store.seed(self.store)  # no migrations to wait for
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        log = (self.root / "server.log").open("a")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", self.store, "--host", "127.0.0.1",
             "--port", str(self.port), "--workers", "1"],
            cwd=self.root, env=hpo_env({"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}), stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        wait_until_up(f"{self.uri}/health", self.process, self.root / "server.log", 120, "the MLflow server")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            stop_group(self.process, timeout=10)
        self.process = None


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    started = Server(tmp_path_factory.mktemp("mlflow-server"))
    started.start()
    try:
        yield started
    finally:
        started.stop()


def trial_runs(uri: str, study: str) -> dict[int, object]:
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(study)
    runs = client.search_runs([experiment.experiment_id], "tags.`hpo.role` = 'trial'")
    return {int(run.data.tags["hpo.trial_number"]): run for run in runs}


def tracker_with_a_trial(server: Server, monkeypatch: pytest.MonkeyPatch, prefix: str, pause: float):
    """(tracker, study, sweep run id): a sweep and its trial 0 with step 1 written; the writer
    tries once, then pauses ``pause`` seconds; a dead server fails each MLflow call at once."""
    from hpo.record.sweep_tracker import SweepTracker

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    study = f"{prefix}-{uuid.uuid4().hex[:6]}"
    tracker = SweepTracker(server.uri, study)
    parent = tracker.start_sweep({}, {})
    tracker.writer.ATTEMPTS, tracker.writer.PAUSE = 1, pause
    tracker.start_trial(0, {"x": 0.5})
    tracker.log_metrics(0, 1, {"score": 1.0})
    tracker.flush()
    return tracker, study, parent


def test_batches_written_while_the_server_was_down_are_kept(server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    """Step 2 fails (the server is dead), step 3 comes while the writer pauses and is skipped;
    once the server answers again the trial's close takes both, with the end tags, before the
    status: the run is not FINISHED with hpo.state=RUNNING and a hole in its curve."""
    tracker, study, _ = tracker_with_a_trial(server, monkeypatch, "kept", pause=2.0)
    server.stop()
    try:
        tracker.log_metrics(0, 2, {"score": 2.0})
        tracker.flush()  # failed: the store is down for PAUSE seconds
        tracker.log_metrics(0, 3, {"score": 3.0})
        tracker.flush()  # skipped
    finally:
        server.start()
    time.sleep(tracker.writer.PAUSE)  # the pause is over: the next write is tried
    tracker.end_trial(0, "COMPLETE", value=3.0)
    tracker.flush()
    run = trial_runs(server.uri, study)[0]
    assert run.info.status == "FINISHED" and run.data.tags["hpo.state"] == "COMPLETE"
    assert run.data.tags["hpo.objective"] == "3.0"
    history = MlflowClient(server.uri).get_metric_history(run.info.run_id, "score")
    assert sorted((m.step, m.value) for m in history) == [(1, 1.0), (2, 2.0), (3, 3.0)]
    tracker.end_sweep()


def test_a_server_back_before_the_writers_pause_ends_gets_the_sweeps_end(server: Server,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The server dies (a write fails: the writer pauses), then answers again before the pause
    ran out, and the sweep ends (hpo.run.sweep's end: the mirror flushed, the missed runs
    written from the study, the sweep's run closed): the end's writes go. They were skipped as
    if the server were still down: the trial's run left RUNNING without its last point, and the
    sweep's run RUNNING until a later sweep ran trials (a sweep with nothing to run does not)."""
    import io

    import optuna
    from rich.console import Console

    from hpo.run.sweep import _flush_mirror
    tracker, study, parent = tracker_with_a_trial(server, monkeypatch, "back", pause=600.0)
    server.stop()
    try:
        tracker.log_metrics(0, 2, {"score": 2.0})
        tracker.flush()  # failed: the writer does not try for PAUSE seconds
        assert tracker.down
    finally:
        server.start()
    tracker.end_trial(0, "COMPLETE", value=2.0)  # skipped: the writer's pause is not over
    truth = optuna.create_study(direction="maximize")  # what the study holds of trial 0
    truth.add_trial(optuna.trial.create_trial(
        params={"x": 0.5}, distributions={"x": optuna.distributions.FloatDistribution(0, 1)}, value=2.0,
        intermediate_values={1: 1.0, 2: 2.0}))
    said = io.StringIO()
    _flush_mirror(truth, tracker, "score", None, Console(file=said))  # the sweep's end, well within the pause
    tracker.end_sweep("FINISHED", summary={"finished": 1})
    assert "could not be written" not in said.getvalue(), said.getvalue()
    client = MlflowClient(server.uri)
    run = trial_runs(server.uri, study)[0]
    assert run.info.status == "FINISHED" and run.data.tags["hpo.state"] == "COMPLETE"
    assert run.data.tags["hpo.objective"] == "2.0"
    history = client.get_metric_history(run.info.run_id, "score")
    assert sorted((m.step, m.value) for m in history) == [(1, 1.0), (2, 2.0)]
    sweep_run = client.get_run(parent)
    assert sweep_run.info.status == "FINISHED" and sweep_run.data.tags["hpo.finished"] == "1"


class LosingProxy:
    """A TCP proxy in front of the server that loses the answer to chosen ``runs/create`` calls:
    it passes the request on, reads the server's answer (the run is made), and closes the
    client's connection instead of sending it (a server restarted, or slower than the client's
    timeout, in the middle of a call). One request per connection (``Connection: close``)."""

    def __init__(self, server: Server, lose: set[int]):
        self.server, self.lose, self.creates, self.lost = server, lose, 0, 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.uri = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._pass, args=(client,), daemon=True).start()

    def _pass(self, client: socket.socket) -> None:
        with client, socket.create_connection(("127.0.0.1", self.server.port)) as upstream:
            request = b""
            while b"\r\n\r\n" not in request or len(request.partition(b"\r\n\r\n")[2]) < _length(request):
                chunk = client.recv(65536)
                if not chunk:
                    return
                request += chunk
            head, _, body = request.partition(b"\r\n\r\n")
            lines = [line for line in head.split(b"\r\n") if not line.lower().startswith(b"connection:")]
            upstream.sendall(b"\r\n".join([*lines, b"Connection: close"]) + b"\r\n\r\n" + body)
            answer = b""
            while chunk := upstream.recv(65536):
                answer += chunk
            if b"/runs/create " in lines[0]:
                self.creates += 1
                if self.creates in self.lose:
                    self.lost += 1
                    return  # made, and the answer is lost
            client.sendall(answer)

    def close(self) -> None:
        self.listener.close()


def _length(request: bytes) -> int:
    for line in request.partition(b"\r\n\r\n")[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":")[1])
    return 0


def test_a_run_whose_answer_was_lost_is_made_once(server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    """The answers to the sweep run's and to a trial run's create are lost (each run is made).
    MLflow's client before 3.18 sends the POST again and the server makes each run twice (the
    twin stayed RUNNING for good); from 3.18 the client raises, and the sweep's start failed
    (the trial's create, tried again by the writer, made a twin). Each run is there once, closed:
    a create tried again looks up the run its lost answer made, by the create's key."""
    from hpo.record.sweep_tracker import SweepTracker

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    proxy = LosingProxy(server, lose={1, 2})  # the sweep run's create, then trial 0's
    study = f"twice-{uuid.uuid4().hex[:6]}"
    try:
        tracker = SweepTracker(proxy.uri, study)
        tracker.start_sweep({}, {})
        tracker.start_trial(0, {"x": 0.5})
        tracker.log_metrics(0, 1, {"score": 1.0})
        tracker.end_trial(0, "COMPLETE", value=1.0)
        tracker.flush(final=True)
        tracker.end_sweep()
    finally:
        proxy.close()
    assert proxy.lost == 2, "the answers were lost (else this test proves nothing)"
    client = MlflowClient(server.uri)
    runs = client.search_runs([client.get_experiment_by_name(study).experiment_id])
    assert sorted((r.data.tags["hpo.role"], r.info.status) for r in runs) == [("sweep", "FINISHED"),
                                                                                ("trial", "FINISHED")]


MODULE = '''
import time
import hpo

sweep = hpo.Sweep(metric="score", direction="maximize", trials=2, max_steps=6, eval_every=1,
                  pruner="none", sampler="random", seed=0, concurrency=1)


def space(trial):
    return {"x": trial.suggest_float("x", 0.0, 1.0)}


def train(params, report):
    with open(MARKER, "a") as marker:
        marker.write("started\\n")
    for step in range(1, 7):
        time.sleep(1.0)
        report(step, {"score": params["x"] + step})
'''


def test_a_server_dead_at_the_sweeps_end_costs_a_bounded_wait_and_a_warning(server: Server, tmp_path: Path) -> None:
    """The server dies while the last trial trains. The sweep ends within a bounded time (it
    used to hang ~30 minutes in MLflow's retries, then fail with exit 1 and no summary), exits
    0 with its summary and says which runs the next `hpo search` writes; that one does."""
    marker = tmp_path / "started.txt"
    module = tmp_path / "dies.py"
    module.write_text(MODULE.replace("MARKER", repr(str(marker))))
    study = f"dies-{uuid.uuid4().hex[:6]}"
    env = {k: v for k, v in hpo_env().items() if not k.startswith("MLFLOW_HTTP_REQUEST_")}
    args = [sys.executable, "-m", "hpo", "search", str(module), "--study", study, "--tracking-uri", server.uri]
    process = subprocess.Popen(args, cwd=tmp_path, env=env, text=True, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not (marker.is_file() and marker.read_text().count("started") >= 2):
            assert process.poll() is None, process.stdout.read()
            assert time.monotonic() < deadline, "the second trial did not start in 180 s"
            time.sleep(0.2)
        server.stop()
        killed = time.monotonic()
        out, _ = process.communicate(timeout=240)
        ended = time.monotonic() - killed
    except BaseException:
        stop_group(process, timeout=10)
        raise
    finally:
        if server.process is None:
            server.start()
    print(f"\nfrom the server's death to the sweep's exit: {ended:.1f} s (the last trial trained ~6 s of it)")
    assert process.returncode == 0, out[-4000:]
    assert "2 complete" in out, out[-4000:]
    assert f"the next `hpo search` on study {study!r} writes them" in " ".join(out.split()), out[-4000:]
    assert "Traceback" not in out
    assert "View run" not in out, "MLflow's own two lines per closed run stay out of the sweep's output"
    assert ended < 75, f"{ended:.0f} s from the server's death to the exit"

    again = subprocess.run(args, cwd=tmp_path, env=env, text=True, capture_output=True, timeout=240)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "already has 2 finished trials" in again.stdout
    runs = trial_runs(server.uri, study)
    assert sorted(runs) == [0, 1]
    for run in runs.values():
        assert run.info.status == "FINISHED" and run.data.tags["hpo.state"] == "COMPLETE"
        assert "hpo.objective" in run.data.tags and run.data.metrics["score"] >= 6
