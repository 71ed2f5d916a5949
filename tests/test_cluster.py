"""Joining an existing Ray cluster: a real ``ray start --head`` (4 simulated GPUs) plus a
second node, token authentication, and two ``hpo search`` processes sharing one PostgreSQL
study through it without ever holding more GPUs than the cluster has; on a 2-CPU head, two
(and three) processes sharing one study end as soon as its trials do, none holding an idle
worker's slot that another process's trial waits for.

The cluster lives in its own ``--temp-dir`` and is stopped by killing exactly the processes
started from it (``ray stop`` would stop every Ray on this machine)."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import psutil
import pytest
from optuna.trial import TrialState

from tests.conftest import hpo_env, run_hpo

pytestmark = pytest.mark.slow
RAY = str(Path(sys.executable).with_name("ray"))
GPUS = 4

MODULE = '''
import time

import hpo

sweep = hpo.Sweep(metric="score", direction="maximize", trials=12, max_steps=3, eval_every=1, pruner="none",
                  sampler="random", seed=0, cpus_per_trial=0.25, gpus_per_trial=0.5)


def space(trial):
    return {"x": trial.suggest_float("x", 0.0, 1.0)}


def train(params, report):
    for step in (1, 2, 3):
        time.sleep(0.4)
        report(step, {"score": params["x"] * step})
'''


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_processes_under(folder: Path) -> None:
    """SIGKILL every process started for this cluster: those naming ``folder`` on their command
    line (gcs_server, raylet, agents) and all their descendants (workers rename themselves)."""
    own = [p for p in psutil.process_iter(["pid", "cmdline"])
           if p.pid != os.getpid() and any(str(folder) in part for part in (p.info["cmdline"] or []))]
    family = set(own)
    for process in own:
        try:
            family.update(process.children(recursive=True))
        except psutil.Error:
            pass
    for process in family:
        try:
            process.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(list(family), timeout=20)


@pytest.fixture(scope="module")
def ray_cluster():
    """(address, env with the token): a head with 4 simulated GPUs and a CPU-only second node."""
    folder = Path(tempfile.mkdtemp(prefix="hpo-ray-", dir="/tmp"))  # short: Ray's socket paths must fit
    token = folder / "token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    env = hpo_env({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token), "RAY_USAGE_STATS_ENABLED": "0"})
    if env.get("CUDA_VISIBLE_DEVICES") == "":  # GPUs hidden on a GPU machine (conftest): Ray simulates 4 here
        del env["CUDA_VISIBLE_DEVICES"]
    port = free_port()
    common = ["--temp-dir", str(folder / "ray"), "--disable-usage-stats", "--dashboard-agent-listen-port",
              str(free_port()), "--metrics-export-port", str(free_port())]
    try:
        head = subprocess.run([RAY, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
                               "--num-gpus", str(GPUS), "--num-cpus", "2", "--include-dashboard", "false",
                               "--dashboard-port", str(free_port()),
                               *common], env=env, capture_output=True, text=True, timeout=180)
        assert head.returncode == 0, head.stdout + head.stderr
        node = subprocess.run([RAY, "start", "--address", f"127.0.0.1:{port}", "--num-cpus", "2", "--num-gpus", "0",
                               *common], env=env, capture_output=True, text=True, timeout=180)
        assert node.returncode == 0, node.stdout + node.stderr
        yield f"127.0.0.1:{port}", env, token.read_text()
    finally:
        stop_processes_under(folder)
        shutil.rmtree(folder, ignore_errors=True)


def test_joining_without_the_token_is_one_clear_line(ray_cluster, tmp_path: Path) -> None:
    address, env, token = ray_cluster
    module = tmp_path / "joined.py"
    module.write_text(MODULE)
    no_token = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH")}
    result = subprocess.run([sys.executable, "-m", "hpo", "search", str(module), "--address", address], cwd=tmp_path,
                            env=no_token, capture_output=True, text=True, timeout=180)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: the Ray cluster at {address} requires token authentication and hpo sent no "
                               "token"), lines[0]
    assert "RAY_AUTH_MODE=token" in lines[0] and "RAY_AUTH_TOKEN_PATH" in lines[0] and "ray get-auth-token" in lines[0]
    assert not (tmp_path / "hpo.db").exists() and not (tmp_path / "mlflow.db").exists(), "nothing written"

    wrong = run_hpo(["search", str(module), "--address", address], cwd=tmp_path,
                    env={**{k: v for k, v in env.items() if k != "RAY_AUTH_TOKEN_PATH"}, "RAY_AUTH_TOKEN": "not-it"})
    assert wrong.returncode == 2, wrong.stdout + wrong.stderr
    assert wrong.stderr.startswith(f"error: the Ray cluster at {address} refused the token from RAY_AUTH_TOKEN "
                                   "(environment): it is not this cluster's token"), wrong.stderr
    assert token not in result.stderr + result.stdout + wrong.stderr + wrong.stdout


@pytest.mark.postgres
def test_two_sweeps_share_the_cluster_without_oversubscribing_gpus(ray_cluster, tmp_path: Path,
                                                                   postgres_url: str) -> None:
    address, env, token = ray_cluster
    module = tmp_path / "joined.py"
    module.write_text(MODULE)
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # One asks half a GPU per trial, the other a whole one: together they ask for more than 4.
    flags = [["--set", "gpus_per_trial=0.5", "--concurrency", "4"], ["--set", "gpus_per_trial=1", "--concurrency", "3"]]
    processes = [subprocess.Popen([sys.executable, "-m", "hpo", "search", str(module), "--storage", postgres_url,
                                   "--tracking-uri", tracking, *extra], cwd=tmp_path,
                                  env={**env, "RAY_ADDRESS": address}, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)
                 for extra in flags]
    outputs = [process.communicate(timeout=600)[0] for process in processes]
    for process, out in zip(processes, outputs, strict=True):
        assert process.returncode == 0, out
        assert token not in out

    trials = optuna.load_study(study_name="joined", storage=postgres_url).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 12
    assert len({t.system_attrs["hpo:driver"] for t in trials}) == 2, "both processes ran trials"
    events: dict[str, list[tuple[float, float]]] = {"all": []}
    for trial in trials:
        held = trial.user_attrs["resources"]
        (worker,) = held["workers"]
        gpus = worker["assigned"]["GPU"]
        assert gpus in (0.5, 1.0) and worker["assigned"]["CPU"] == 0.25, worker
        assert len(worker["gpu_ids"]) == 1 and 0 <= int(worker["gpu_ids"][0]) < GPUS, worker
        assert held["start"] < held["end"]
        for key in ("all", worker["gpu_ids"][0]):
            events.setdefault(key, []).extend([(held["start"], gpus), (held["end"], -gpus)])
    most = {key: most_at_once(changes) for key, changes in events.items()}
    peak = most.pop("all")
    assert peak <= GPUS + 1e-9, f"{peak} GPUs in use at once, on a cluster of {GPUS}"
    assert peak > 1.0, "trials ran side by side"
    assert all(share <= 1.0 + 1e-9 for share in most.values()), f"a GPU shared beyond its whole: {most}"


def most_at_once(changes: list[tuple[float, float]]) -> float:
    """The largest sum of amounts held at one moment (a release at the same instant comes first)."""
    in_use = most = 0.0
    for _, change in sorted(changes):
        in_use += change
        most = max(most, in_use)
    return most


SHARED = '''
import time

import hpo

sweep = hpo.Sweep(metric="score", direction="maximize", trials=3, max_steps=2, eval_every=1, pruner="none",
                  sampler="random", seed=0)


def space(trial):
    return {"x": trial.suggest_float("x", 0.0, 1.0)}


def train(params, report):
    for step in (1, 2):
        time.sleep(1.0)
        report(step, {"score": params["x"] * step})
'''


@pytest.fixture(scope="module")
def two_slots():
    """(address, env with the token): a head with 2 CPUs, so 2 one-CPU trials at once, under
    HPO_TEST_RAY_ROOT (its own folder: stopping it stops nothing else)."""
    root = Path(os.environ.get("HPO_TEST_RAY_ROOT", "/tmp"))
    root.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="hpo-slots-", dir=root))
    token = folder / "token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    env = hpo_env({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token), "RAY_USAGE_STATS_ENABLED": "0"})
    port = free_port()
    try:
        head = subprocess.run([RAY, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
                               "--num-cpus", "2", "--num-gpus", "0", "--include-dashboard", "false",
                               "--dashboard-port", str(free_port()), "--temp-dir", str(folder / "ray"),
                               "--disable-usage-stats", "--dashboard-agent-listen-port", str(free_port()),
                               "--metrics-export-port", str(free_port())],
                              env=env, capture_output=True, text=True, timeout=180)
        assert head.returncode == 0, head.stdout + head.stderr
        yield f"127.0.0.1:{port}", env
    finally:
        stop_processes_under(folder)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.postgres
@pytest.mark.parametrize("drivers,trials", [(2, 3), (3, 4)], ids=["two-drivers", "more-drivers-than-slots"])
def test_drivers_sharing_a_study_release_their_idle_workers(two_slots, tmp_path: Path, postgres_url: str,
                                                            drivers: int, trials: int) -> None:
    """Issue 19, item 0: one process ran two trials and had nothing left to run while another's
    trial, claimed in the study, waited for a slot. Tune kept the first process's two idle
    workers for reuse, holding both CPUs in their placement groups, and the other trial started
    only when Tune's 600 s wait for a next trial gave up: ~10 minutes for seconds of work. Now a
    process with nothing of its own to run gives its workers back at once; the sweeps end within
    a minute on an idle machine (30-40 s a case here: 2-3 drivers each starting Python, Ray and
    Tune on 2 cores; the assertion allows 90 s for the suite's other worker)."""
    address, env = two_slots
    module = tmp_path / "shared.py"
    module.write_text(SHARED)
    command = [sys.executable, "-m", "hpo", "search", str(module), "--study", "shared", "--storage", postgres_url,
               "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--address", address, "--trials", str(trials)]
    started = time.time()
    processes = [subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True) for _ in range(drivers)]
    outputs: list[str] = []
    try:
        for process in processes:
            outputs.append(process.communicate(timeout=max(1.0, started + 120 - time.time()))[0])
    except subprocess.TimeoutExpired:
        pass
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                outputs.append(process.communicate()[0])
    took = time.time() - started
    study = optuna.load_study(study_name="shared", storage=postgres_url)
    waited = {t.number: round(t.user_attrs["resources"]["start"] - t.datetime_start.timestamp(), 1)
              for t in study.get_trials() if "resources" in t.user_attrs}
    # Alone, a case takes 30-40 s; the suite runs it beside another worker's tests on 2 cores
    # (61 s seen under load 8). The defect took over 600 s: 90 s tells them apart with room.
    assert took < 90, (f"the sweeps took {took:.0f} s; seconds from claiming each trial to its start on a "
                       f"worker: {waited}; states: {[t.state.name for t in study.get_trials()]}\n"
                       + "\n".join(out[-2000:] for out in outputs))
    for process, out in zip(processes, outputs, strict=True):
        assert process.returncode == 0, out
    assert [t.state for t in study.get_trials()] == [TrialState.COMPLETE] * trials
    assert len(waited) == trials and max(waited.values()) < 20, f"seconds from claim to start on a worker: {waited}"
