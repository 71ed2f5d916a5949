"""Bad input through the real command line: one clear line, exit 2, no traceback, nothing written."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from tests.conftest import SEARCH_SPACES, run_hpo

LORA = str(SEARCH_SPACES / "lora.py")


def assert_clean_error(result, *words: str, cwd: Path) -> None:
    assert result.returncode == 2, result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    for word in words:
        assert word in lines[0], lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    leftovers = sorted(p.name for p in cwd.iterdir())
    assert leftovers == [], f"bad input wrote {leftovers}"


def test_missing_module(tmp_path: Path) -> None:
    result = run_hpo(["search", "nowhere/space.py"], cwd=tmp_path)
    assert_clean_error(result, "nowhere/space.py: no such file", cwd=tmp_path)


def test_syntax_error_and_missing_space(tmp_path: Path) -> None:
    modules = tmp_path.parent / f"{tmp_path.name}-modules"
    modules.mkdir()
    broken = modules / "broken.py"
    broken.write_text("import hpo\nsweep = hpo.Sweep(\n")
    assert_clean_error(run_hpo(["search", str(broken)], cwd=tmp_path), "broken.py:2: syntax error", cwd=tmp_path)
    no_space = modules / "nospace.py"
    no_space.write_text("import hpo\nsweep = hpo.Sweep(train_data='x.tsv')\n")
    assert_clean_error(run_hpo(["search", str(no_space)], cwd=tmp_path), "nospace.py: defines no function space(trial)",
                       cwd=tmp_path)


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--set", "max_step=30"], ("unknown sweep field 'max_step'", "did you mean max_steps?")),
        (["--set", "max_steps=-5"], ("lora.py", "max_steps=-5 must be a whole number of at least 1", "--set max_steps=")),
        (["--set", "eval_every=many"], ("--set eval_every=many: must be a whole number",)),
        (["--set", "train_data=missing.tsv"], ("missing.tsv: no such file",)),
        (["--set", "label_column=stars"], ("train.tsv: no column 'stars'", "--set label_column")),
        (["--set", "model=./no/such/model"], ("no such folder", "--set model=")),
        (["--trials", "0"], ("trials=0 must be a whole number of at least 1",)),
        # GPU placements that would fail on the first GPU machine (issue 18), refused on any machine
        (["--set", "workers_per_trial=2", "--set", "gpus_per_trial=1"],
         ("gpus_per_trial=1", "workers_per_trial=2", "Duplicate GPU", "--set gpus_per_trial=2")),
        (["--set", "workers_per_trial=2", "--set", "gpus_per_worker=0.5"], ("gpus_per_worker=0.5", "NCCL")),
        (["--set", "gpus_per_trial=1", "--set", "device=cuda:1"],
         ("device='cuda:1' is not a GPU a trial sees", "1 GPU(s)", "--set device=cuda")),
        (["--set", "gpus_per_trial=2"], ("gpus_per_trial=2", "idle", "--set workers_per_trial=2")),
        (["--set", "seed=-1"], ("seed=-1 must be a whole number from 0 to 4294967295", "--set seed=")),
        (["--set", f"seed={2**32}"], ("seed=4294967296 must be a whole number from 0", "--set seed=")),
    ],
)
def test_bad_overrides(tmp_path: Path, flags: list[str], words: tuple[str, ...]) -> None:
    assert_clean_error(run_hpo(["search", LORA, *flags], cwd=tmp_path), *words, cwd=tmp_path)


def test_unreachable_storage_hides_the_password(tmp_path: Path) -> None:
    started = time.monotonic()
    result = run_hpo(["search", LORA, "--storage", "postgresql://alice:s3cret-pw@127.0.0.1:1/nodb"], cwd=tmp_path)
    assert_clean_error(result, "--storage postgresql://alice:***@127.0.0.1:1/nodb", "cannot open", cwd=tmp_path)
    assert "s3cret-pw" not in result.stderr + result.stdout
    assert time.monotonic() - started < 60


def test_ui_on_a_tracking_server_that_does_not_answer(tmp_path: Path) -> None:
    """Checked before anything is printed: one line, exit 2, in seconds (it used to print the
    link, then spend minutes in MLflow's retries)."""
    import socket

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = time.monotonic()
    result = run_hpo(["ui", "--tracking-uri", f"http://bob:s3cret-pw@127.0.0.1:{port}"], cwd=tmp_path, timeout=90)
    assert_clean_error(result, f"--tracking-uri http://bob:***@127.0.0.1:{port}", "does not answer", cwd=tmp_path)
    assert result.stdout == "" and "s3cret-pw" not in result.stderr
    assert time.monotonic() - started < 30


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    result = run_hpo(["--debug", "search", "nowhere.py"], cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_resume_is_an_error_that_says_what_to_do(tmp_path: Path) -> None:
    """``--resume`` was accepted and ignored (a study always resumes by its name): now one line
    that says to drop it, before anything is loaded or written; ``--help`` no longer offers it."""
    result = run_hpo(["search", LORA, "--resume"], cwd=tmp_path)
    assert_clean_error(result, "--resume", "resumes the study of that name", "without --resume", cwd=tmp_path)
    assert "--resume" not in run_hpo(["search", "--help"], cwd=tmp_path).stdout


def test_help_shows_what_rich_would_read_as_markup_and_names_the_tools(tmp_path: Path) -> None:
    """Rich reads ``[@STORAGE]`` as a markup tag and dropped it (``STUDY:``); ``ui`` and
    ``dashboard`` say which tool each serves."""
    wide = {"COLUMNS": "400", "TERMINAL_WIDTH": "400"}
    search = run_hpo(["search", "--help"], cwd=tmp_path, env=wide)
    assert search.returncode == 0 and "STUDY[@STORAGE]: first enqueue" in search.stdout, search.stdout
    listing = run_hpo(["--help"], cwd=tmp_path, env=wide).stdout
    dashboard = next(line for line in listing.splitlines() if "│ dashboard " in line)
    ui = next(line for line in listing.splitlines() if "│ ui " in line)
    assert "optuna-dashboard" in dashboard and "MLflow UI" in ui, listing


def test_help_does_not_import_the_heavy_libraries(tmp_path: Path) -> None:
    import subprocess

    code = ("import sys; sys.argv=['hpo','--help']\nfrom hpo.cli import main\ntry:\n    main()\nexcept SystemExit:\n    pass\n"
            "heavy=[m for m in ('torch','transformers','peft','ray','mlflow','optuna') if m in sys.modules]\n"
            "print('HEAVY', heavy)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert "HEAVY []" in result.stdout, result.stdout + result.stderr
    assert "search" in result.stdout and "dashboard" in result.stdout


@pytest.mark.parametrize(
    ("module_body", "words"),
    [
        ("import hpo\nraise RuntimeError('no GPU here')\n", ("bad.py:2: raised RuntimeError at import: no GPU here",)),
        ("import hpo\nsweep = hpo.Sweep(train_data='x.tsv')\ndef space(trial):\n    return 3\n",
         ("bad.py: space(trial) returned int, expected a dict",)),
        ("import hpo\nsweep = hpo.Sweep(train_data='x.tsv')\ndef space(trial):\n"
         "    return {'learning_rate': trial.suggest_float('learning_rate', 1e-2, 1e-5)}\n",
         ("bad.py:4: space(trial) raised ValueError", "low")),
        ("import hpo\nsweep = hpo.Sweep(train_data='x.tsv')\ndef space(trial):\n"
         "    return {'learning_rate': trial.suggest_float('learning_rate', 0, 1e-2, log=True)}\n",
         ("space(trial) raised ValueError",)),
    ],
)
def test_bad_modules_through_the_cli(tmp_path: Path, module_body: str, words: tuple[str, ...]) -> None:
    modules = tmp_path.parent / f"{tmp_path.name}-modules"
    modules.mkdir()
    (modules / "bad.py").write_text(module_body)
    assert_clean_error(run_hpo(["search", str(modules / "bad.py")], cwd=tmp_path), *words, cwd=tmp_path)


@pytest.mark.parametrize(
    ("content", "words"),
    [
        ("label\ttext\n1\tgood\n0\tbad\n", ("no column 'review'",)),  # with --set text_column=review below
        ("label\ttext\npositive\tgood\n", ("the data check found 1 error", "not an integer (row 1: 'positive')")),
        ("", ("the file has no data rows",)),
    ],
)
def test_bad_data_through_the_cli(tmp_path: Path, content: str, words: tuple[str, ...]) -> None:
    data_dir = tmp_path.parent / f"{tmp_path.name}-data"
    data_dir.mkdir()
    (data_dir / "train.tsv").write_text(content)
    flags = ["--set", f"train_data={data_dir / 'train.tsv'}"]
    if "review" in words[0]:
        flags += ["--set", "text_column=review"]
    assert_clean_error(run_hpo(["search", LORA, *flags], cwd=tmp_path), "train.tsv", *words, cwd=tmp_path)


@pytest.fixture
def read_only_folder(tmp_path: Path):
    """An empty folder hpo cannot write: mode 555 for a normal user; for root, whom modes do
    not stop, a read-only tmpfs mounted there (skipped where root may not mount)."""
    import os
    import subprocess

    folder = tmp_path / "read-only"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"root cannot mount a read-only tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


@pytest.mark.parametrize(("stores", "words"), [
    ([], ("--storage sqlite:///hpo.db: cannot write", "point --storage at one")),
    (["--storage", "sqlite:///{elsewhere}/hpo.db"], ("--tracking-uri sqlite:///mlflow.db: cannot write",
                                                     "point --tracking-uri at one")),
    (["--storage", "sqlite:///{elsewhere}/hpo.db", "--tracking-uri", "sqlite:///{elsewhere}/mlflow.db"],
     ("cannot write hpo's working folder", "run hpo from a folder you can write")),
])
def test_a_read_only_folder_names_what_cannot_be_written(read_only_folder: Path, tmp_path: Path,
                                                         stores: list[str], words: tuple[str, ...]) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    flags = [flag.format(elsewhere=elsewhere) for flag in stores]
    assert_clean_error(run_hpo(["search", LORA, "--trials", "1", *flags], cwd=read_only_folder), *words,
                       cwd=read_only_folder)
    assert list(elsewhere.iterdir()) == [], "nothing written anywhere"
