"""Study names become folders (reports, promoted models, Ray runs): one check refuses those
that would write elsewhere; and `hpo report` uploads to MLflow only the files it wrote."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from typer.testing import CliRunner

from hpo.errors import HpoError
from hpo.names import check_study_name, folder_for
from tests.conftest import run_hpo


@pytest.mark.parametrize(("name", "problem"), [
    ("..", "is a parent-folder reference"), ("../etc", "is a parent-folder reference"),
    ("a/b", "contains a path separator"), ("a\\b", "contains a path separator"),
    ("", "is empty"), ("x" * 129, "is 129 characters long"), ("a\nb", "contains a control character"),
    ("a\x00b", "contains a control character"), (" lead", "starts or ends with a space"),
])
def test_unsafe_names_are_refused(name: str, problem: str) -> None:
    with pytest.raises(HpoError, match=problem) as error:
        folder_for(Path("/reports"), name)
    assert str(error.value).startswith("--study ") and "\n" not in str(error.value)


def test_safe_names_pass() -> None:
    for name in ("lora", "lora-v2.1_final", "a..b", "nightly 2026-11-25", "x" * 128):
        assert check_study_name(name) == name
    assert folder_for(Path("/reports"), "lora", "-trial3") == Path("/reports/lora-trial3")


def test_every_study_command_refuses_a_path_as_study_name(tmp_path: Path) -> None:
    for command in (["report"], ["search", "missing.py"]):  # one check on every command's --study
        result = run_hpo([*command, "--study", "../outside"], cwd=tmp_path)
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith("error: --study '../outside': is a parent-folder reference"), result.stderr
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == [], "nothing written"


def make_study(folder: Path, name: str) -> optuna.Study:
    study = optuna.create_study(study_name=name, storage=f"sqlite:///{folder / 'hpo.db'}", direction="maximize")
    study.set_user_attr("hpo", {"sweep": {"metric": "score", "direction": "maximize", "max_steps": 2},
                                "tracking_uri": f"sqlite:///{folder / 'mlflow.db'}"})
    for x in (0.1, 0.5, 0.9):
        trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
        trial.report(x / 2, 1)
        trial.report(x, 2)
        study.tell(trial, x + 0 * trial.params["x"])
    return study


def test_a_stored_study_named_dotdot_writes_no_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A study made outside hpo with an unsafe name: `hpo report` refuses before writing."""
    from hpo.cli import app

    work = tmp_path / "work"
    work.mkdir()
    make_study(work, "..")
    monkeypatch.chdir(work)
    result = CliRunner().invoke(app, ["report"])
    assert isinstance(result.exception, HpoError) and "is a parent-folder reference" in str(result.exception)
    assert not list(tmp_path.rglob("*.html")) and not list(tmp_path.rglob("reports")), "no report anywhere"


def test_report_uploads_only_the_files_it_wrote(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking import MlflowClient

    from hpo.cli import app
    from hpo.record.sweep_tracker import SweepTracker

    make_study(tmp_path, "rep")
    run_id = SweepTracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "rep").start_sweep({}, {})
    (tmp_path / "private-notes.txt").write_text("not for MLflow")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["report", "--output", "."])
    assert result.exit_code == 0, result.output
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    uploaded = {a.path.removeprefix("report/") for a in client.list_artifacts(run_id, "report")}
    assert {"report.html", "diagnosis.json", "optimization_history.png"} <= uploaded
    written = {p.name for p in tmp_path.iterdir() if p.suffix in (".html", ".json", ".png")}
    assert uploaded == written, "exactly the report's files: not hpo.db, mlflow.db, mlruns/ or private-notes.txt"
