"""Soak test: a sweep killed at random moments loses nothing.

    python bench/chaos.py                      # 60 trials, 6 kills (seeded), prints one JSON line
    python bench/chaos.py --trials 12 --kills 2 --seed 1   # the short schedule CI runs

A 60-trial sweep of a fast module runs with ``hpo search``. A seeded schedule
``kill -9``s, at random moments while trials run, either the driver (its whole process
group and every process it started, Ray's included) or one Ray worker running a trial;
after a driver kill the same command is started again (a resume). At the end:

* every finished trial is there exactly once, with the value its params give (the
  module's objective is a pure function of them), and every trial seen finished before a
  kill is unchanged after it;
* nothing is RUNNING or WAITING in the Optuna study, no MLflow run is RUNNING;
* the study holds exactly ``--trials`` finished trials.

Prints ONE JSON line: kills, driver_kills, worker_kills, resumes, trials, losses (must be
0: finished trials lost, changed or missing), duplicates, interrupted, gave_up (configs
interrupted 3 times, FAIL ``interrupted_too_often``), running, mlflow_running, seconds. Exit status 0 when everything holds, else 1.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
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


class Chaos:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.folder = Path(args.workdir or tempfile.mkdtemp(prefix="hpo-chaos-")).resolve()
        self.folder.mkdir(parents=True, exist_ok=True)
        self.module = self.folder / "chaos_sweep.py"
        self.module.write_text(MODULE.replace("TRIALS", str(args.trials)).replace("SECONDS", repr(args.seconds))
                               .replace("CONCURRENCY", str(args.concurrency)))
        self.storage = f"sqlite:///{self.folder / 'hpo.db'}"
        self.tracking = f"sqlite:///{self.folder / 'mlflow.db'}"
        rng = random.Random(args.seed)
        kinds = [rng.choice(["driver", "worker"]) for _ in range(args.kills)]
        if args.kills >= 2:  # at least one of each
            kinds[:2] = ["driver", "worker"]
        rng.shuffle(kinds)
        self.schedule = [(kind, rng.uniform(0.2, args.max_delay)) for kind in kinds]
        self.seen: dict[int, float] = {}
        self.counts = {"driver": 0, "worker": 0}
        self.resumes = 0
        self.outputs: list[str] = []

    def command(self) -> list[str]:
        return [sys.executable, "-m", "hpo", "search", str(self.module), "--storage", self.storage,
                "--tracking-uri", self.tracking]

    def study(self):  # noqa: ANN201
        import optuna

        from hpo.record.study import open_storage

        return optuna.load_study(study_name="chaos_sweep", storage=open_storage(self.storage))

    def snapshot(self) -> None:
        """Remember every finished trial's value before a kill."""
        from optuna.trial import TrialState

        try:
            for trial in self.study().get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
                self.seen.setdefault(trial.number, trial.value)
        except Exception:  # noqa: BLE001 - no study yet
            pass

    def running(self) -> bool:
        from optuna.trial import TrialState

        try:
            return bool(self.study().get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
        except Exception:  # noqa: BLE001 - the study is not created yet
            return False

    def run(self) -> dict:
        started = time.monotonic()
        env = {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}
        schedule = list(self.schedule)
        for attempt in range(len(schedule) + 5):
            process = subprocess.Popen(self.command(), cwd=self.folder, env=env, stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, text=True, start_new_session=True)
            killed_driver = False
            while schedule and process.poll() is None:
                kind, delay = schedule[0]
                if not self._wait_for_trials(process, kind):
                    break
                time.sleep(delay)
                if process.poll() is not None:
                    break
                self.snapshot()
                schedule.pop(0)
                if kind == "driver":
                    kill_all(family(process.pid))
                    killed_driver = True
                else:
                    workers = trial_workers(process.pid)
                    kill_all(workers[:1])
                self.counts[kind] += 1
                if killed_driver:
                    break
            out, _ = process.communicate(timeout=self.args.timeout)
            self.outputs.append(out)
            if killed_driver or (process.returncode != 0 and attempt < len(self.schedule) + 4):
                self.resumes += 1
                continue
            break
        report = self.check()
        report["seconds"] = round(time.monotonic() - started, 1)
        report["exit"] = process.returncode
        return report

    def _wait_for_trials(self, process: subprocess.Popen, kind: str) -> bool:
        deadline = time.monotonic() + self.args.timeout
        while time.monotonic() < deadline and process.poll() is None:
            if self.running() and (kind == "driver" or trial_workers(process.pid)):
                return True
            time.sleep(0.2)
        return False

    def check(self) -> dict:
        from mlflow.tracking import MlflowClient
        from optuna.trial import TrialState

        from hpo.record.ledger import counts_towards_target

        trials = self.study().get_trials()
        by_number = {t.number: t for t in trials}
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        lost = sum(1 for number, value in self.seen.items()
                   if by_number[number].state != TrialState.COMPLETE or by_number[number].value != value)
        wrong = sum(1 for t in complete if t.value != objective(t.params))
        counted = sum(1 for t in trials if counts_towards_target(t))
        keys = [(t.params["x"], t.params["y"]) for t in complete]
        client = MlflowClient(self.tracking)
        experiment = client.get_experiment_by_name("chaos_sweep")
        runs = client.search_runs([experiment.experiment_id], max_results=5000) if experiment else []
        return {
            "kills": self.counts["driver"] + self.counts["worker"],
            "driver_kills": self.counts["driver"],
            "worker_kills": self.counts["worker"],
            "resumes": self.resumes,
            "trials": counted,
            "target": self.args.trials,
            "losses": lost + wrong + max(0, self.args.trials - counted),
            "duplicates": len(keys) - len(set(keys)),
            "interrupted": sum(1 for t in trials if t.user_attrs.get("reason") == "interrupted"),
            # configs interrupted MAX_ATTEMPTS times: FAIL interrupted_too_often (counted, not lost)
            "gave_up": sum(1 for t in trials if t.user_attrs.get("reason") == "interrupted_too_often"),
            "running": sum(1 for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)),
            "mlflow_running": sum(1 for r in runs if r.info.status == "RUNNING"),
            "mlflow_trial_runs": sum(1 for r in runs if r.data.tags.get("hpo.role") == "trial"),
            "optuna_trials": len(trials),
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=60)
    parser.add_argument("--kills", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=0.2, help="sleep per step of a trial (3 steps)")
    parser.add_argument("--max-delay", type=float, default=4.0, help="latest kill, seconds after trials run")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds one sweep process may take")
    parser.add_argument("--workdir", help="folder for the study, MLflow store and module (default: a new temp dir)")
    parser.add_argument("--show-output", action="store_true", help="print the sweeps' output to stderr")
    args = parser.parse_args(argv)
    chaos = Chaos(args)
    report = chaos.run()
    if args.show_output:
        print("\n----\n".join(chaos.outputs), file=sys.stderr)
    print(json.dumps(report), flush=True)
    bad = report["losses"] or report["duplicates"] or report["running"] or report["mlflow_running"] or report["exit"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
