"""What ``hpo check-data`` found, kept for the study, and read back as diagnosis findings.

``hpo check-data`` records each run in ``checks.json`` (:func:`write_checks`) in its results
folder: ``--out``, by default ``.hpo/checks/NAME`` where NAME is ``--study``, else the module's
file name (which is also the default study name of ``hpo search MODULE``), else the training
file's name. It holds everything ``--json`` prints (the plain checks' findings, and the label
suspects and near-duplicate pairs of ``--labels`` / ``--paraphrases``) and the data files checked.
With a tracking URI it is logged beside the CSVs, under ``checks/`` of the study's MLflow sweep run.

A study is tied to those results by its name only: :func:`with_data_checks` reads
``.hpo/checks/STUDY/checks.json`` (or a folder the caller fetched from MLflow) into findings of
scope ``data``, each with the rows behind it, and says when the files checked are not the ones
the study's sweep trained on. Knows neither Optuna nor MLflow.
"""

from __future__ import annotations

import dataclasses
import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hpo.analysis.diagnose_rules import Finding

if TYPE_CHECKING:
    import optuna

    from hpo.analysis.diagnose import StudyDiagnosis

CHECKS_FILE = "checks.json"
CHECKS_ROOT = Path(".hpo") / "checks"
"""Where ``hpo check-data`` keeps its results by default (relative to the folder it runs in)."""


def write_checks(folder: Path, results: dict[str, Any], train_data: str, eval_data: str | None) -> Path:
    """Record one ``hpo check-data`` run: ``results`` (what ``--json`` prints) with the files checked
    and the time, as ``folder/checks.json`` (replaced whole, never half-written)."""
    from hpo.analysis.label_issues import replacing

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / CHECKS_FILE
    record = {**results, "train_data": train_data, "eval_data": eval_data,
              "checked_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    with replacing(path) as handle:
        json.dump(record, handle, indent=1, default=str)
        handle.write("\n")
    return path


def checks_folder(study_name: str) -> Path:
    """The folder ``hpo check-data`` writes to by default for this study (it may not exist)."""
    return CHECKS_ROOT / study_name


def with_data_checks(diagnosis: StudyDiagnosis, folder: Path | None, sweep: dict | None = None,
                     source: str | None = None) -> StudyDiagnosis:
    """``diagnosis`` with the data findings of ``folder/checks.json`` (``source``: where the folder
    came from, e.g. an MLflow run; by default the folder). Without one, ``data_checks`` says where
    it was looked for and how to make it. ``sweep`` (the study's sweep settings) tells whether the
    same files were checked."""
    path = folder / CHECKS_FILE if folder is not None else None
    if path is None or not path.is_file():
        where = str(path) if path is not None else str(checks_folder(diagnosis.study) / CHECKS_FILE)
        note = (f"no `hpo check-data` results for study {diagnosis.study} (looked for {where}): run `hpo check-data "
                f"MODULE --labels --paraphrases` in this folder (add --out {checks_folder(diagnosis.study)} when the "
                "study is not named after the module)")
        return dataclasses.replace(diagnosis, data_checks={"found": False, "looked": where, "note": note})
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(stored, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as error:
        note = f"{path}: unreadable ({type(error).__name__}: {error}); run `hpo check-data` again"
        return dataclasses.replace(diagnosis, data_checks={"found": False, "looked": str(path), "note": note})
    info: dict[str, Any] = {"found": True, "source": source or str(path), "checked_at": stored.get("checked_at"),
                            "train_data": stored.get("train_data"), "eval_data": stored.get("eval_data")}
    other = other_data(stored, sweep or {})
    if other:
        info["note"] = other
    return dataclasses.replace(diagnosis, data_findings=data_findings(stored), data_checks=info)


def other_data(stored: dict, sweep: dict) -> str | None:
    """A line when the files checked are not the study's (same path, compared resolved)."""
    def same(a: Any, b: Any) -> bool:
        return (not a and not b) or (bool(a) and bool(b) and os.path.realpath(str(a)) == os.path.realpath(str(b)))

    if not sweep or (same(stored.get("train_data"), sweep.get("train_data"))
                     and same(stored.get("eval_data"), sweep.get("eval_data"))):
        return None
    return (f"these checks read {stored.get('train_data')} / {stored.get('eval_data')}, but the study trained on "
            f"{sweep.get('train_data')} / {sweep.get('eval_data')}: they may not describe its data")


def data_findings(stored: dict) -> list[Finding]:
    """The findings of one ``checks.json``: each plain check's, the label suspects, the pairs and
    the leaked validation rows, each with its rows."""
    found = [Finding(f.get("code", "data"), f"{f.get('source')}: {f.get('message')}",
                     {"severity": f.get("severity"), "count": f.get("count"), "source": f.get("source")},
                     rows=[{"row": row, "source": f.get("source")} for row in f.get("rows") or []], scope="data")
             for f in stored.get("findings") or [] if isinstance(f, dict)]
    labels = stored.get("labels")
    if isinstance(labels, dict):
        suspects = [s for s in labels.get("suspects") or [] if isinstance(s, dict)]
        found.append(Finding("label_issues", f"{len(suspects)} rows may be mislabelled ({labels.get('probe')} probe "
                                             f"over {labels.get('rows')} rows, out-of-fold accuracy "
                                             f"{float(labels.get('accuracy') or 0):.1%})",
                             {k: labels.get(k) for k in ("probe", "rows", "accuracy", "seconds")},
                             rows=suspects, scope="data"))
    pairs = stored.get("paraphrases")
    if isinstance(pairs, dict):
        listed = [p for p in pairs.get("pairs") or [] if isinstance(p, dict)]
        within = sum(p.get("scope") == "train" for p in listed)
        found.append(Finding("near_duplicates", f"{len(listed)} near-duplicate or paraphrase pairs ({within} within "
                                                f"train, {len(listed) - within} between train and eval)",
                             {"seconds": pairs.get("seconds")},
                             rows=listed, scope="data"))
        if pairs.get("warning"):
            found.append(Finding("eval_leakage", pairs["warning"], {"leaked": len(pairs.get("leaked") or [])},
                                 rows=[{"row": row, "split": "eval"} for row in pairs.get("leaked") or []],
                                 scope="data"))
    return found


def diagnose_with_checks(study: optuna.Study, folder: Path | None = None, source: str | None = None) -> StudyDiagnosis:
    """:func:`hpo.analysis.diagnose.diagnose_study` with the data findings of ``folder`` (by default
    this study's :func:`checks_folder`, relative to the current folder)."""
    from hpo.analysis.diagnose import diagnose_study
    from hpo.record.sweep_record import SweepRecord

    record = SweepRecord.load(study)
    return with_data_checks(diagnose_study(study), folder if folder is not None else checks_folder(study.study_name),
                            record.sweep if record else None, source)
