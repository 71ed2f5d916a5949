"""Soak test: a sweep killed at random moments loses nothing, and MLflow agrees with the study.

    python bench/chaos.py --kills 50 --trials 200   # the soak of issue 19 (the defaults)
    python bench/chaos.py --trials 8 --kills 2 --server-kills 1 --seed 1   # the short form CI runs

A sweep of a fast module (``--trials``, two at once) runs with ``hpo search``, logging to a
real ``mlflow server --workers 1`` on 127.0.0.1 (an SQLite store in the work folder). A
seeded schedule ``kill -9``s, while trials run, either the driver (its whole process group
and every process it started, Ray's included) or one Ray worker running a trial; each kill
comes either a random moment (up to ``--max-delay`` s) after trials run, or just after a
trial ended, while the driver writes the study and MLflow (``mid_write``). After a driver
kill the same command is started again (a resume). ``--server-kills`` times, at random
places in the schedule, the MLflow server's process group is ``kill -9``ed while the sweep
writes to it and started again a few seconds later on the same port and store; a resume
waits for it (``hpo search`` refuses a tracking server that does not answer, exit 2). If the
last sweep ends saying the next ``hpo search`` writes MLflow runs it could not (the server
was down at its end), that search is run (``repairs``). At the end:

* every finished trial is there exactly once, with the value its params give (the
  module's objective is a pure function of them), and every trial seen finished before a
  kill is unchanged after it;
* nothing is RUNNING or WAITING in the Optuna study, no MLflow run is RUNNING;
* the study holds exactly ``--trials`` finished trials;
* every finished trial has one MLflow run that agrees with it: the run's status and
  ``hpo.state`` tag match the trial's state, a COMPLETE trial's ``hpo.objective`` tag and last
  ``score`` are its value, its params are the trial's (checked here, not with hpo's own check).

Prints ONE JSON line: kills, driver_kills, worker_kills, mid_write_kills, server_kills,
resumes, repairs, trials, losses (must be 0: finished trials lost, changed or missing),
duplicates, interrupted, gave_up (configs interrupted 3 times, FAIL ``interrupted_too_often``),
running, mlflow_running, mlflow_disagree (finished trials whose run is missing or disagrees;
the first few in mlflow_disagreeing), mlflow_duplicate_runs (trials with more than one run),
seconds. Exit status 0 when everything holds, else 1.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

MODULE = '''
import time
import hpo

sweep = hpo.Sweep(metric="score", direction="maximize", trials=TRIALS, max_steps=3, eval_every=1,
                  pruner="none", sampler="random", seed=0, concurrency=CONCURRENCY)


def space(trial):
    return {"x": trial.suggest_float("x", 0.0, 1.0), "y": trial.suggest_int("y", 0, 1000)}


def objective(params, step):
    return params["x"] * 1000 + params["y"] + step


def train(params, report):
    for step in (1, 2, 3):
        time.sleep(SECONDS)
        report(step, {"score": objective(params, step)})
'''


def objective(params: dict, step: int = 3) -> float:
    return params["x"] * 1000 + params["y"] + step


def family(pid: int) -> list:
    """The process and all its descendants (psutil.Process objects)."""
    import psutil

    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def trial_workers(pid: int) -> list:
    """Ray worker processes of the sweep ``pid`` that run a trial (``ray::...`` actors)."""
    found = []
    for process in family(pid)[1:]:
        try:
            title = " ".join(process.cmdline()) or process.name()
        except Exception:  # noqa: BLE001 - gone meanwhile
            continue
        if title.startswith("ray::") and any(word in title for word in ("ImplicitFunc", "run_trial", "_Inner")):
            found.append(process)
    return found


def kill_all(processes: list) -> None:
    for process in processes:
        try:
            os.kill(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


class MlflowServer:
    """``mlflow server --workers 1`` on 127.0.0.1 and an SQLite store in ``folder``: killed
    (``kill -9`` of its process group) and started again on the same port and store."""

    def __init__(self, folder: Path):
        from hpo.record import mlflow_store

        self.folder = folder
        self.store = f"sqlite:///{folder / 'mlflow.db'}"
        mlflow_store.seed(self.store)  # migrated once per MLflow version: the server starts sooner
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None
        self.restarts: list[threading.Thread] = []

    def start(self, timeout: float = 180) -> None:
        env = {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
        with (self.folder / "server.log").open("a") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", self.store, "--host", "127.0.0.1",
                 "--port", str(self.port), "--workers", "1"],
                cwd=self.folder, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while not self.answers():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the MLflow server did not start: "
                                   + (self.folder / "server.log").read_text()[-3000:])
            time.sleep(0.25)

    def answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=2):
                return True
        except OSError:
            return False

    def kill(self) -> None:
        if self.process is not None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait()

    def kill_and_restart(self, down: float) -> None:
        """Kill the server now; start it again ``down`` seconds later (on a thread)."""
        self.kill()

        def restart() -> None:
            time.sleep(down)
            self.start()

        thread = threading.Thread(target=restart, daemon=True)
        thread.start()
        self.restarts.append(thread)

    def wait_up(self) -> None:
        """Until a restart under way has brought the server back."""
        for thread in self.restarts:
            thread.join()
        if not self.answers():
            raise RuntimeError("the MLflow server does not answer: " + (self.folder / "server.log").read_text()[-3000:])

    def stop(self) -> None:
        for thread in self.restarts:
            thread.join()
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


class Chaos:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.folder = Path(args.workdir or tempfile.mkdtemp(prefix="hpo-chaos-")).resolve()
        self.folder.mkdir(parents=True, exist_ok=True)
        self.module = self.folder / "chaos_sweep.py"
        self.module.write_text(MODULE.replace("TRIALS", str(args.trials)).replace("SECONDS", repr(args.seconds))
                               .replace("CONCURRENCY", str(args.concurrency)))
        self.storage = f"sqlite:///{self.folder / 'hpo.db'}"
        self.server = MlflowServer(self.folder)
        rng = random.Random(args.seed)
        kinds = [rng.choice(["driver", "worker"]) for _ in range(args.kills)]
        if args.kills >= 2:  # at least one of each
            kinds[:2] = ["driver", "worker"]
        rng.shuffle(kinds)
        for _ in range(args.server_kills):  # anywhere in the schedule, the end included
            kinds.insert(rng.randint(0, len(kinds)), "server")
        # (kind, moment, delay): "running" kills ``delay`` s after trials run, "mid_write" as soon as
        # a trial ends (the driver tells the study, closes the MLflow run, claims the next trial);
        # the server is killed while trials run, and comes back ``down`` seconds later
        self.schedule = [(kind, "running" if kind == "server" else rng.choice(["running", "mid_write"]),
                          rng.uniform(0.2, args.max_delay), rng.uniform(1.0, args.max_down)) for kind in kinds]
        self.seen: dict[int, float] = {}
        self.counts = {"driver": 0, "worker": 0, "server": 0, "mid_write": 0}
        self.resumes = 0
        self.repairs = 0
        self.outputs: list[str] = []
        self._study = None

    def command(self) -> list[str]:
        return [sys.executable, "-m", "hpo", "search", str(self.module), "--storage", self.storage,
                "--tracking-uri", self.server.uri]

    def study(self):  # noqa: ANN201
        import optuna

        from hpo.record.study import open_storage

        if self._study is None:
            self._study = optuna.load_study(study_name="chaos_sweep", storage=open_storage(self.storage))
        return self._study

    def trials(self, states: tuple) -> list:
        try:
            return self.study().get_trials(deepcopy=False, states=states)
        except Exception:  # noqa: BLE001 - the study is not created yet
            return []

    def snapshot(self) -> None:
        """Remember every finished trial's value before a kill."""
        from optuna.trial import TrialState

        for trial in self.trials((TrialState.COMPLETE,)):
            self.seen.setdefault(trial.number, trial.value)

    def running(self) -> bool:
        from optuna.trial import TrialState

        return bool(self.trials((TrialState.RUNNING,)))

    def finished(self) -> int:
        from optuna.trial import TrialState

        return len(self.trials((TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)))

    def run(self) -> dict:
        started = time.monotonic()
        self.server.start()
        try:
            report = self._run()
        finally:
            self.server.stop()
        report["seconds"] = round(time.monotonic() - started, 1)
        return report

    def _run(self) -> dict:
        env = {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}
        schedule = list(self.schedule)
        for attempt in range(len(schedule) + 5):
            self.server.wait_up()  # hpo search refuses a tracking server that does not answer
            process = subprocess.Popen(self.command(), cwd=self.folder, env=env, stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, text=True, start_new_session=True)
            killed_driver = False
            while schedule and process.poll() is None:
                kind, moment, delay, down = schedule[0]
                if not self._wait_for_trials(process, kind):
                    break
                if moment == "mid_write":
                    if not self._wait_for_a_trial_end(process, kind):
                        break
                else:
                    time.sleep(delay)
                if process.poll() is not None:
                    break
                self.snapshot()
                schedule.pop(0)
                if kind == "driver":
                    kill_all(family(process.pid))
                    killed_driver = True
                elif kind == "worker":
                    kill_all(trial_workers(process.pid)[:1])
                else:
                    self.server.kill_and_restart(down)
                self.counts[kind] += 1
                self.counts["mid_write"] += moment == "mid_write"
                if killed_driver:
                    break
            out, _ = process.communicate(timeout=self.args.timeout)
            self.outputs.append(out)
            if killed_driver or (process.returncode != 0 and attempt < len(self.schedule) + 4):
                self.resumes += 1
                continue
            break
        report = self.check()
        if report["mlflow_disagree"] or report["mlflow_running"]:
            said = " ".join(out.split())
            if "the next `hpo search` on study" in said:  # what the sweep said it left to the next one
                self.server.wait_up()
                self.repairs += 1
                repair = subprocess.run(self.command(), cwd=self.folder, env=env, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True, timeout=self.args.timeout)
                self.outputs.append(repair.stdout)
                report = self.check()
        report["exit"] = process.returncode
        return report

    def _wait_for_trials(self, process: subprocess.Popen, kind: str) -> bool:
        deadline = time.monotonic() + self.args.timeout
        while time.monotonic() < deadline and process.poll() is None:
            if self.running() and (kind != "worker" or trial_workers(process.pid)):
                return True
            time.sleep(0.2)
        return False

    def _wait_for_a_trial_end(self, process: subprocess.Popen, kind: str) -> bool:
        """Until a trial ends (the driver now writes its end), and a worker runs a trial for a worker kill."""
        before = self.finished()
        deadline = time.monotonic() + self.args.timeout
        while time.monotonic() < deadline and process.poll() is None:
            if self.finished() > before and (kind != "worker" or trial_workers(process.pid)):
                return True
            time.sleep(0.05)
        return False

    def check(self) -> dict:
        from mlflow.tracking import MlflowClient
        from optuna.trial import TrialState

        from hpo.record.ledger import counts_towards_target

        self._study = None  # read afresh
        trials = self.study().get_trials()
        by_number = {t.number: t for t in trials}
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        lost = sum(1 for number, value in self.seen.items()
                   if by_number[number].state != TrialState.COMPLETE or by_number[number].value != value)
        wrong = sum(1 for t in complete if t.value != objective(t.params))
        counted = sum(1 for t in trials if counts_towards_target(t))
        keys = [(t.params["x"], t.params["y"]) for t in complete]
        client = MlflowClient(self.server.store)  # the store itself: the server may be down
        experiment = client.get_experiment_by_name("chaos_sweep")
        runs = client.search_runs([experiment.experiment_id], max_results=50000) if experiment else []
        trial_runs: dict[int, list] = {}
        for run in runs:
            if run.data.tags.get("hpo.role") == "trial":
                trial_runs.setdefault(int(run.data.tags["hpo.trial_number"]), []).append(run)
        disagreeing = {}
        for trial in trials:
            if trial.state.is_finished():
                why = disagreement(trial, trial_runs.get(trial.number, []), by_number)
                if why:
                    disagreeing[trial.number] = why
        return {
            "kills": self.counts["driver"] + self.counts["worker"],
            "driver_kills": self.counts["driver"],
            "worker_kills": self.counts["worker"],
            "mid_write_kills": self.counts["mid_write"],
            "server_kills": self.counts["server"],
            "resumes": self.resumes,
            "repairs": self.repairs,
            "trials": counted,
            "target": self.args.trials,
            "losses": lost + wrong + max(0, self.args.trials - counted),
            "duplicates": len(keys) - len(set(keys)),
            "interrupted": sum(1 for t in trials if t.user_attrs.get("reason") == "interrupted"),
            # configs interrupted MAX_ATTEMPTS times: FAIL interrupted_too_often (counted, not lost)
            "gave_up": sum(1 for t in trials if t.user_attrs.get("reason") == "interrupted_too_often"),
            "running": sum(1 for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)),
            "mlflow_running": sum(1 for r in runs if r.info.status == "RUNNING"),
            "mlflow_disagree": len(disagreeing),
            "mlflow_disagreeing": dict(list(disagreeing.items())[:5]),
            "mlflow_duplicate_runs": sum(1 for found in trial_runs.values() if len(found) > 1),
            "mlflow_trial_runs": sum(len(found) for found in trial_runs.values()),
            "optuna_trials": len(trials),
        }


def disagreement(trial, runs: list, by_number: dict) -> str:  # noqa: ANN001
    """Why the MLflow ``runs`` of the finished ``trial`` disagree with the study ('' if they
    agree): there is not exactly one, or its status, ``hpo.state``, ``hpo.objective``, last
    ``score`` or params are not the trial's. Written apart from hpo's own check
    (hpo.record.mirror.run_agrees), from what docs/concepts/fault-tolerance.md promises of a trial's run."""
    reason = trial.user_attrs.get("reason")
    if not runs:
        if trial.user_attrs.get("late_result_of") is not None or reason in ("superseded", "space"):
            return ""  # never ran as itself: its result is on the run of the trial it names
        return "no run"
    if len(runs) > 1:
        return f"{len(runs)} runs"
    run = runs[0]
    kept = run.data.tags.get("hpo.kept_as_trial", "")
    if kept.isdigit():  # its result was kept as another trial (another process failed it meanwhile)
        trial = by_number.get(int(kept), trial)
        reason = trial.user_attrs.get("reason")
    state = trial.state.name
    interrupted = state == "FAIL" and reason in (None, "interrupted")
    status = "KILLED" if state == "PRUNED" or interrupted else {"COMPLETE": "FINISHED"}.get(state, "FAILED")
    if run.info.status != status:
        return f"status {run.info.status}, not {status}"
    if run.data.tags.get("hpo.state") != state:
        return f"hpo.state {run.data.tags.get('hpo.state')}, not {state}"
    if state == "COMPLETE":
        objective_tag = run.data.tags.get("hpo.objective")
        if objective_tag is None or float(objective_tag) != trial.value:
            return f"hpo.objective {objective_tag}, not {trial.value}"
        if run.data.metrics.get("score") != trial.value:
            return f"last score {run.data.metrics.get('score')}, not {trial.value}"
    for name, value in trial.params.items():
        if run.data.params.get(name) != str(value):
            return f"param {name} {run.data.params.get(name)}, not {value}"
    return ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--kills", type=int, default=50, help="driver and worker kills")
    parser.add_argument("--server-kills", type=int, default=2, help="MLflow server kills (each restarted)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=0.2, help="sleep per step of a trial (3 steps)")
    parser.add_argument("--max-delay", type=float, default=4.0, help="latest kill, seconds after trials run")
    parser.add_argument("--max-down", type=float, default=5.0,
                        help="longest time the killed MLflow server stays down before it is started again")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds one sweep process may take")
    parser.add_argument("--workdir", help="folder for the study, MLflow store and module (default: a new temp dir)")
    parser.add_argument("--show-output", action="store_true", help="print the sweeps' output to stderr")
    args = parser.parse_args(argv)
    chaos = Chaos(args)
    report = chaos.run()
    if args.show_output:
        print("\n----\n".join(chaos.outputs), file=sys.stderr)
    print(json.dumps(report), flush=True)
    bad = (report["losses"] or report["duplicates"] or report["running"] or report["mlflow_running"]
           or report["mlflow_disagree"] or report["mlflow_duplicate_runs"] or report["exit"])
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
