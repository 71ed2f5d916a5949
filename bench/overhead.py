"""Per-trial overhead: hpo's bookkeeping against hand-wired Ray Tune and plain Optuna, side by side.

    python bench/overhead.py                  # 40 no-op trials each way; prints ONE JSON line
    python bench/overhead.py --trials 80 --only hpo raytune_lean
    python bench/overhead.py --growth-trials 5000   # the same, then hpo alone over 5,000 trials

Every way runs the same no-op trials one at a time (concurrency 1), each way in a fresh
process (a fresh local Ray where there is one). A trial samples ``x`` in [0, 1] with Optuna's
TPE, notes the time it started (a line appended to a file), reports ``score = x`` once and
returns:

* ``hpo``: ``hpo search`` (in process, as ``bench/scaling.py`` runs it) on a module whose
  ``train`` does only that; the Optuna study in an SQLite file, every trial an MLflow run
  (params, metrics, state) in an SQLite store, ASHA, the live view drawn to /dev/null.
* ``raytune_default``: ``Tuner`` + ``OptunaSearch`` + ``ASHAScheduler``, Ray's defaults for
  everything else (a new actor per trial, the CSV/JSON/TensorBoard loggers, progress output).
* ``raytune_lean``: the same with ``reuse_actors=True``, the auto loggers off
  (``TUNE_DISABLE_AUTO_CALLBACK_LOGGERS=1``) and ``verbose=0``: the Tune settings hpo
  itself uses, recording nothing.
* ``raytune_lean_sqlite``: the same, with ``OptunaSearch`` keeping its study in an SQLite file
  (``storage=RDBStorage(...)``, SQLite's default journal): what hand-wiring takes to keep a
  study that survives the process, as hpo's does -- still no MLflow, no liveness, no retries.
* ``optuna``: ``study.optimize`` in one process, in-memory storage (the floor), and
  ``optuna_sqlite``: the same on an SQLite file.

**Per-trial overhead** is the mean time between the starts of consecutive trials:
``(start of the last trial - start of the first) / (trials - 1)``. A trial does nothing, so
that interval is all bookkeeping -- its result travelling to the driver, the scheduler, the
searcher's tell, loggers and MLflow, then the next ask, MLflow run and hand-over to the
worker -- and the one-time setup (Ray start, store creation, the first worker's start) and
teardown (hpo's report) fall outside it. ``wall_s`` is each way's whole run, setup included.

**Growth** (``--growth-trials N``, after the ways above): hpo alone runs N no-op trials in a
fresh process, and ``growth`` is the mean gap between trial starts over the last 100 trials
divided by the same over the first 100: how much more a trial costs once the study holds N
trials (1.0: flat). Every way's own run gives the same figure when it has 200 trials or more
(``growth_by_way``).

The targets: hpo <= 1.5x ``raytune_lean_sqlite`` per trial (issue 21; 1.5x ``raytune_lean``
and 0.05 s in issue 11), and at 5,000 trials ``growth`` <= 1.5.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WAYS = ("hpo", "raytune_default", "raytune_lean", "raytune_lean_sqlite", "optuna", "optuna_sqlite")
TARGET_RATIO, TARGET_GROWTH = 1.5, 1.5
GROWTH_WINDOW = 100
"""Trials at each end of a run whose gaps between starts are compared (``growth``)."""

MODULE = '''
import time

import hpo

sweep = hpo.Sweep(metric="score", direction="maximize", trials={trials}, max_steps=1, eval_every=1,
                  pruner="asha", sampler="tpe", seed=0, concurrency=1, cpus_per_trial=1)


def space(trial):
    return {{"x": trial.suggest_float("x", 0.0, 1.0)}}


def train(params, report):
    with open({starts!r}, "a") as starts:
        starts.write(f"{{time.time()}}\\n")
    report(1, {{"score": params["x"]}})
'''


def note_start(path: str) -> None:
    with open(path, "a") as starts:
        starts.write(f"{time.time()}\n")


def run_hpo(folder: Path, trials: int, starts: str) -> None:
    from rich.console import Console

    from hpo.run.sweep import SearchOptions, search

    module = folder / "overhead.py"
    module.write_text(MODULE.format(trials=trials, starts=starts))
    os.chdir(folder)
    result = search(SearchOptions(module=str(module), storage=f"sqlite:///{folder / 'hpo.db'}",
                                  tracking_uri=f"sqlite:///{folder / 'mlflow.db'}", workdir=str(folder / ".hpo")),
                    Console(file=open(os.devnull, "w")))
    assert result.finished == trials, result


def run_raytune(folder: Path, trials: int, starts: str, lean: bool, sqlite: bool = False) -> None:
    import logging

    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    ray.init(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)

    def trainable(config: dict) -> None:
        note_start(starts)
        tune.report({"score": config["x"]})

    storage = {}
    if sqlite:
        import optuna

        storage = {"storage": optuna.storages.RDBStorage(f"sqlite:///{folder / 'optuna.db'}"), "study_name": "overhead"}

    tuner = tune.Tuner(
        trainable,
        param_space={"x": tune.uniform(0.0, 1.0)},
        tune_config=tune.TuneConfig(search_alg=OptunaSearch(seed=0, **storage), scheduler=ASHAScheduler(), metric="score",
                                    mode="max", num_samples=trials, max_concurrent_trials=1,
                                    **({"reuse_actors": True} if lean else {})),
        run_config=tune.RunConfig(storage_path=str(folder / "ray_results"), **({"verbose": 0} if lean else {})),
    )
    results = tuner.fit()
    assert len(results) == trials and not results.errors, results.errors
    ray.shutdown()


def run_optuna(folder: Path, trials: int, starts: str, sqlite: bool) -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = f"sqlite:///{folder / 'optuna.db'}" if sqlite else None
    study = optuna.create_study(direction="maximize", storage=storage, sampler=optuna.samplers.TPESampler(seed=0))

    def objective(trial: optuna.Trial) -> float:
        note_start(starts)
        return trial.suggest_float("x", 0.0, 1.0)

    study.optimize(objective, n_trials=trials)


def measure(way: str, trials: int) -> dict:
    """One way, in this process."""
    folder = Path(tempfile.mkdtemp(prefix=f"hpo-overhead-{way}-"))
    starts = str(folder / "starts.txt")
    started = time.perf_counter()
    if way == "hpo":
        run_hpo(folder, trials, starts)
    elif way.startswith("raytune"):
        run_raytune(folder, trials, starts, lean=way.startswith("raytune_lean"), sqlite=way.endswith("sqlite"))
    else:
        run_optuna(folder, trials, starts, sqlite=way == "optuna_sqlite")
    wall = time.perf_counter() - started
    times = sorted(float(line) for line in Path(starts).read_text().split())
    assert len(times) == trials, (way, len(times))
    return {"way": way, "per_trial_s": round((times[-1] - times[0]) / (trials - 1), 4), "wall_s": round(wall, 2),
            **growth(times)}


def growth(times: list[float]) -> dict:
    """The mean gap between trial starts over the first and the last ``GROWTH_WINDOW`` trials,
    and their ratio; nothing for a run too short to have two separate windows."""
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    if len(gaps) < 2 * GROWTH_WINDOW:
        return {}
    first, last = sum(gaps[:GROWTH_WINDOW]) / GROWTH_WINDOW, sum(gaps[-GROWTH_WINDOW:]) / GROWTH_WINDOW
    return {"first_100_s": round(first, 4), "last_100_s": round(last, 4), "growth": round(last / first, 2)}


def run_one(way: str, trials: int) -> dict:
    """One way in a fresh process (a fresh Ray, nothing warm from another way); its result or its error."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    if way.startswith("raytune_lean"):
        env["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--one", way, "--trials", str(trials)],
                          capture_output=True, text=True, env=env, cwd=tempfile.gettempdir())
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode == 0 and lines:
        return json.loads(lines[-1])
    return {"way": way, "error": (done.stderr or done.stdout).strip().splitlines()[-3:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--only", nargs="+", choices=WAYS, default=list(WAYS), help="run only these ways")
    parser.add_argument("--growth-trials", type=int, default=0,
                        help="then run hpo alone over this many trials (>= 200) for the growth figure")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: one way in this process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.trials)), flush=True)
        return
    if args.growth_trials and args.growth_trials < 2 * GROWTH_WINDOW:
        parser.error(f"--growth-trials {args.growth_trials}: needs at least {2 * GROWTH_WINDOW} trials")
    per_trial, wall, errors, growth_by_way = {}, {}, {}, {}
    for way in args.only:
        result = run_one(way, args.trials)
        if "error" in result:
            errors[way] = result["error"]
            continue
        per_trial[way], wall[way] = result["per_trial_s"], result["wall_s"]
        if "growth" in result:
            growth_by_way[way] = result["growth"]
    grown = run_one("hpo", args.growth_trials) if args.growth_trials else None
    if grown is not None and "error" in grown:
        errors["growth"] = grown["error"]
    hpo = per_trial.get("hpo")

    def ratio(peer: str) -> float | None:
        return round(hpo / per_trial[peer], 2) if hpo and per_trial.get(peer) else None

    report = {
        "trials": args.trials,
        "per_trial_s": per_trial,
        "ratio_vs_raytune_default": ratio("raytune_default"),
        "ratio_vs_raytune_lean": ratio("raytune_lean"),
        "ratio_vs_raytune_lean_sqlite": ratio("raytune_lean_sqlite"),
        "wall_s": wall,
        "growth_by_way": growth_by_way,
        "growth": {"trials": args.growth_trials, **{k: grown.get(k) for k in ("first_100_s", "last_100_s", "growth",
                                                                               "wall_s")}} if grown else None,
        "target": {"ratio_vs_raytune_lean_sqlite": TARGET_RATIO, "growth": TARGET_GROWTH,
                   "met": None if ratio("raytune_lean_sqlite") is None
                   else ratio("raytune_lean_sqlite") <= TARGET_RATIO
                   and (grown is None or grown.get("growth", float("inf")) <= TARGET_GROWTH)},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_avg_1m": round(os.getloadavg()[0], 2)},
        "definition": "(start of last trial - start of first) / (trials - 1); no-op trials, concurrency 1",
    }
    if errors:
        report["errors"] = errors
    print(json.dumps(report))


if __name__ == "__main__":
    main()
