"""Where trials run: start a local Ray or join a running cluster, and note what each trial held.

``connect`` is called once per ``hpo search``, before anything is written, so a cluster that
cannot be joined leaves no study or MLflow run behind. Three ways in:

* no address: a local Ray on this machine (Ray turns token authentication on for it);
* ``auto`` (or running on the head of a ``ray start`` cluster, or ``ray job submit``, which
  sets ``RAY_ADDRESS``): the local cluster, whose token Ray finds by itself;
* ``HOST:PORT`` / ``ray://HOST:10001``: a remote cluster. Ray 2.60 sends a token to an
  explicit address only when ``RAY_AUTH_MODE=token`` is set, with the token in
  ``RAY_AUTH_TOKEN``, the file ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token`` (the way Ray
  documents it: https://docs.ray.io/en/latest/ray-security/token-auth.html). Giving a token
  (either variable) is taken as meaning token mode. A refused or missing token becomes one
  line that says which token is missing and how to give it, instead of Ray's half minute of
  retries ending in "Failed to connect".

Before any trial, :func:`preflight` starts Ray and refuses, in one line, a sweep no node
can run (``gpus_per_trial``/``cpus_per_trial`` above the largest node's) or whose device,
precision or quantization the trial's worker cannot run (a Ray task with the trial's
resources asks :func:`hpo.train.accelerator.problems`).

``held_resources`` runs in a trial's worker: the resources Ray assigned to it, so that the
study records what each trial held and when (``resources`` user attr).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeGuard

import psutil

from hpo.errors import HpoError

if TYPE_CHECKING:
    from hpo.config import Sweep

logger = logging.getLogger(__name__)
AUTH_MODE = "RAY_AUTH_MODE"
TOKEN = "RAY_AUTH_TOKEN"
TOKEN_PATH = "RAY_AUTH_TOKEN_PATH"
DEFAULT_TOKEN_FILE = Path.home() / ".ray" / "auth_token"
PROBE_TIMEOUT = 180.0
"""Seconds :func:`preflight` waits for a worker to answer its device check."""
LOCAL_START_TRIES = 2
"""Starts of a local Ray tried when its raylet registers late (see :func:`_init`)."""
LATE_RAYLET = "timed out during startup"
"""In the error Ray raises when a new node's raylet has not registered in time (``ray/_private/node.py``)."""
WORKER_ENV = {
    "TOKENIZERS_PARALLELISM": "false", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error",
    # Each trial runs in a new thread of a reused worker: glibc would give each its own
    # malloc arena (up to 8 per core), and freed memory stays resident in all of them.
    "MALLOC_ARENA_MAX": "2",
    # A reused worker takes its next trial once the last trial's thread has ended: after its
    # final report a trial may still evaluate, generate and free memory (minutes for an LLM on
    # a busy CPU). Past this timeout (Tune's default: 2 s) Ray 2.60 errors the next trial
    # without telling the searcher, and the whole sweep stalls (seen with SmolLM2 under load;
    # tests/test_faults.py::test_slow_trial_cleanup_does_not_stall_the_sweep). So wait: a
    # thread that never ends would hold its trial forever anyway.
    "TUNE_FUNCTION_THREAD_TIMEOUT_S": "86400",
}


def worker_env() -> dict[str, str]:
    """:data:`WORKER_ENV`, where the driver's environment does not set a name itself."""
    return {name: os.environ.get(name, value) for name, value in WORKER_ENV.items()}


def resolve_address(address: str | None) -> str | None:
    """``--address``, else ``RAY_ADDRESS``, else None (a local Ray)."""
    return address or os.environ.get("RAY_ADDRESS") or None


def is_explicit(address: str | None) -> TypeGuard[str]:
    """An address Ray connects to as given (no local discovery, no automatic token)."""
    return address not in (None, "", "auto", "local")


def connect(address: str | None, *, worker_logs: bool = False) -> None:
    """Start or join Ray once for this process (later calls do nothing).

    Raises HpoError (one line) when nothing answers at ``address`` or the cluster refuses
    this process's token.
    """
    import ray

    if ray.is_initialized():
        return
    address = resolve_address(address)
    if is_explicit(address):
        _use_given_token()
        if not address.startswith("ray://"):
            _probe(address)
    # Ray enables token auth for a local cluster and says so on every start; keep it, quietly.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    from hpo.secrets import without_credentials

    try:
        with without_credentials():  # a local Ray's processes never inherit the MLflow password
            _init(ray, address, worker_logs)
    except Exception as error:  # noqa: BLE001 - every way of failing to join gets the same kind of line
        if address is None:
            raise
        if _is_auth_error(error):
            raise HpoError(_token_message(address)) from None
        raise HpoError(f"could not join the Ray cluster at {address}: {type(error).__name__}: "
                       f"{str(error).splitlines()[0] if str(error) else ''} (check --address / RAY_ADDRESS; "
                       "`ray status` on the head shows the cluster)") from None


def preflight(sweep: Sweep, *, address: str | None, recipe: bool, worker_logs: bool = False) -> None:
    """Start (or join) Ray and refuse a sweep it cannot run, before anything is written.

    Raises HpoError, one line: a ``gpus_per_trial``/``cpus_per_trial`` above every node's
    (the largest node's numbers are given), or -- for the built-in recipe, when the sweep asks
    for a device, precision, quantization or lean loss a worker may lack -- what a probe task holding
    one trial's resources found (:func:`hpo.train.accelerator.problems`).
    """
    import ray

    connect(address, worker_logs=worker_logs)
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    per_worker = sweep.worker_resources  # one trial's share of one node (all of it for a one-worker trial)
    for key, field in (("GPU", "gpus_per_trial"), ("CPU", "cpus_per_trial")):
        wanted = per_worker[key]
        if wanted > 0 and not any(node.get(key, 0.0) >= wanted for node in nodes):
            largest: dict[str, float] = max(nodes, key=lambda node: node.get(key, 0.0), default={})
            raise HpoError(
                f"sweep field {field}={wanted:g}: no node of the Ray cluster has that many "
                f"({'the largest has' if len(nodes) > 1 else 'it has'} {largest.get('GPU', 0.0):g} GPU, "
                f"{largest.get('CPU', 0.0):g} CPU); lower it with --set {field}=... or add such a node")
    if recipe and (sweep.device != "auto" or sweep.precision in ("bf16", "fp16") or sweep.quantization != "none"
                   or sweep.lean_loss in ("liger", "cce")):
        found = _worker_problems(ray, sweep)
        if found:
            raise HpoError(found[0])


def _worker_problems(ray: Any, sweep: Sweep) -> list[str]:
    """:func:`hpo.train.accelerator.problems` in a Ray task with one worker's resources (so with
    the GPUs Ray would give one worker of a trial: a multi-worker trial's total may fit no
    node); a cluster too busy to answer in time is not an error."""

    def probe(device: str, precision: str, quantization: str, lean_loss: str) -> list[str]:
        from hpo.train import accelerator

        return accelerator.problems(device, precision, quantization, lean_loss)

    per_worker = sweep.worker_resources  # what each rank of a multi-worker trial sees, not the trial's total
    task = ray.remote(num_cpus=per_worker["CPU"], num_gpus=per_worker["GPU"])(probe)
    ref = task.remote(sweep.device, sweep.precision, sweep.quantization, sweep.lean_loss)
    try:
        return ray.get(ref, timeout=PROBE_TIMEOUT)
    except ray.exceptions.GetTimeoutError:
        ray.cancel(ref, force=True)
        logger.warning("hpo: no worker answered the device check within %.0f s; trials will report it", PROBE_TIMEOUT)
        return []


def _init(ray: Any, address: str | None, worker_logs: bool) -> None:
    """``ray.init``; a local Ray whose raylet registered late is started once more.

    Ray waits a fixed 30 s for a new node's raylet to register with its GCS and then raises
    "The current node timed out during startup" (``ray/_private/node.py``). A busy machine can
    take longer (seen on a loaded 2-core machine). The half-started node's processes (GCS,
    raylet, reaper, log monitor, and what they started) are this process's children that were
    not there before the try: they are ended, so they neither linger nor slow the second start.
    """
    for attempt in range(1, LOCAL_START_TRIES + 1):
        before = {child.pid for child in psutil.Process().children()}
        try:
            ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING,
                     log_to_driver=worker_logs, runtime_env={"env_vars": worker_env()})
            return
        except Exception as error:
            if address not in (None, "local") or attempt == LOCAL_START_TRIES or \
                    LATE_RAYLET not in str(error):
                raise
            ended = _end_started_since(before)
            logger.warning("hpo: the local Ray's raylet did not register within Ray's 30 s (a busy machine?); "
                           "ended the half-started node's %d processes and starting Ray once more", ended)


def _end_started_since(before: set[int]) -> int:
    """Kill this process's Ray children not in ``before``, with their descendants; how many."""
    procs: list[psutil.Process] = []
    for child in psutil.Process().children():
        if child.pid in before:
            continue
        with contextlib.suppress(psutil.Error):
            if any("ray" in part for part in child.cmdline()):
                procs += [child, *child.children(recursive=True)]
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(procs, timeout=10)
    return len(procs)


def _use_given_token() -> None:
    """A token given in the environment means token mode, which Ray needs stated."""
    if os.environ.get(AUTH_MODE) is None and (os.environ.get(TOKEN) or os.environ.get(TOKEN_PATH)):
        os.environ[AUTH_MODE] = "token"
        _reload_ray_config()


def _reload_ray_config() -> None:
    """Ray reads RAY_AUTH_MODE into a cached config when it is imported; read it again (this
    is what Ray itself does when it turns token auth on for a local cluster)."""
    from ray._raylet import AuthenticationTokenLoader, Config  # type: ignore[attr-defined]  # not in ray's _raylet.pyi

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def _probe(address: str) -> None:
    """Is a Ray head listening there, and does it accept us? One quick try each."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise HpoError(f"--address {address!r}: expected HOST:PORT (the head's GCS port, 6379 unless "
                       "`ray start --head --port` said otherwise), ray://HOST:10001, or auto")
    from ray._private.services import canonicalize_bootstrap_address
    from ray._raylet import GcsClient  # type: ignore[attr-defined]  # a Cython class ray's _raylet.pyi leaves out

    resolved = canonicalize_bootstrap_address(address) or address  # 127.0.0.1 means this node's IP to Ray
    try:
        socket.create_connection((resolved.rpartition(":")[0], int(port)), timeout=5).close()
    except OSError as error:
        raise HpoError(f"no Ray cluster answers at {address} ({error.strerror or error}); start one with "
                       f"`ray start --head --port {port}` or fix --address / RAY_ADDRESS") from None
    try:
        with _quiet_stderr():  # Ray's C++ client logs each refused attempt on stderr
            GcsClient(address=resolved)
    except Exception as error:  # noqa: BLE001
        if _is_auth_error(error):
            raise HpoError(_token_message(address)) from None
        raise HpoError(f"the Ray cluster at {address} did not answer: {type(error).__name__}: {error}") from None


def _is_auth_error(error: BaseException | None) -> bool:
    while error is not None:
        text = f"{type(error).__name__} {error}"
        if "AuthenticationError" in text or "InvalidAuthToken" in text or "Unauthenticated" in text \
                or "no authentication token was found" in text:
            return True
        error = error.__cause__ or error.__context__
    return False


def _token_message(address: str) -> str:
    """Which token is missing, and how to give it (never the token itself)."""
    fix = (f"give the cluster's token (print it on the head with `ray get-auth-token`) in {TOKEN_PATH}=FILE "
           f"or {TOKEN}, with {AUTH_MODE}=token")
    if os.environ.get(AUTH_MODE, "").lower() != "token":
        have = f"; {DEFAULT_TOKEN_FILE} exists: set {AUTH_MODE}=token to send it" if DEFAULT_TOKEN_FILE.is_file() else ""
        return (f"the Ray cluster at {address} requires token authentication and hpo sent no token "
                f"({AUTH_MODE} is not 'token'){have}; {fix}; on the head itself --address auto needs none")
    if os.environ.get(TOKEN):
        source = f"{TOKEN} (environment)"
    elif os.environ.get(TOKEN_PATH):
        source = f"the file {TOKEN_PATH}={os.environ[TOKEN_PATH]}"
    elif DEFAULT_TOKEN_FILE.is_file():
        source = f"the file {DEFAULT_TOKEN_FILE}"
    else:
        return f"the Ray cluster at {address} requires a token and none was found ({TOKEN}, {TOKEN_PATH} and " \
               f"{DEFAULT_TOKEN_FILE} are all empty); {fix}"
    return f"the Ray cluster at {address} refused the token from {source}: it is not this cluster's token; {fix}"


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Send file descriptor 2 (where C++ libraries write) to a scratch file for a moment."""
    saved = os.dup(2)
    with tempfile.TemporaryFile() as scratch:
        os.dup2(scratch.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def held_resources() -> dict[str, Any]:
    """In a trial's worker: the node, the resources Ray assigned and the accelerator ids
    (GPU indices as Ray numbers them on that node), and when the trial started holding them."""
    import ray

    context = ray.get_runtime_context()
    group = ray.util.get_current_placement_group()
    assigned = {name: amount for name, amount in context.get_assigned_resources().items() if amount}
    return {"node": ray.util.get_node_ip_address(), "node_id": context.get_node_id(), "pid": os.getpid(),
            "assigned": assigned,
            "gpu_ids": [str(i) for i in context.get_accelerator_ids().get("GPU", [])], "start": time.time(),
            "placement_group": group.id.hex() if group is not None else None}
