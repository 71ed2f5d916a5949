"""The study report: Optuna's plots and the diagnosis, as files a person opens.

``write_report`` produces, in one folder:

* ``report.html``: the diagnosis, each finding with the trials or data rows behind it (what to
  try next, what ``hpo check-data`` recorded for the study, each trial's findings, base models
  compared) and Optuna's interactive plots (optimization history, intermediate values, parallel
  coordinates, parameter importances, slice; a multi-objective study's Pareto front, its other
  plots showing the first objective), with plotly.js embedded so it opens offline;
* one PNG per plot (Optuna's matplotlib versions), for a quick look in the MLflow UI;
* ``diagnosis.json``: what ``hpo diagnose --json`` prints.

The sweep writes it at its end and logs it to the parent MLflow run (``report/``);
``hpo report`` writes it again. Plots that need more trials than there are are skipped
and listed as such. Knows Optuna and plotly/matplotlib only.
"""

from __future__ import annotations

import html
import json
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import optuna

from hpo.formatting import cell, short

PLOTS = (
    ("optimization_history", "Optimization history: the objective per trial and the best so far"),
    ("intermediate_values", "Learning curves: the objective at each evaluation (pruned curves end early)"),
    ("parallel_coordinate", "Parallel coordinates: how parameters combine in good and bad trials"),
    ("param_importances", "Parameter importances (fANOVA over COMPLETE trials, as the diagnosis computes them)"),
    ("slice", "Slice: the objective against each parameter"),
)
PARETO = ("pareto_front", "Pareto front: each COMPLETE trial's objectives; the non-dominated ones highlighted")


def preload() -> None:
    """Import what :func:`write_report` needs: plotly (Optuna's plots), matplotlib (the PNGs)
    and scikit-learn (``optuna.importance`` imports it for fANOVA): 2-3 s on a 2-core machine,
    which a sweep spends on a background thread while Ray starts, not after its last trial."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401
    import optuna.importance  # noqa: F401
    import optuna.visualization  # noqa: F401
    import optuna.visualization.matplotlib  # noqa: F401
    import plotly.offline  # noqa: F401


def write_report(study: optuna.Study, folder: Path, diagnosis: dict[str, Any] | None = None) -> list[Path]:
    """Write the report files into ``folder`` (created); returns the paths written."""
    folder.mkdir(parents=True, exist_ok=True)
    if diagnosis is None:
        from hpo.analysis.data_findings import diagnose_with_checks

        diagnosis = diagnose_with_checks(study).to_dict()
    written = [folder / "diagnosis.json"]
    written[0].write_text(json.dumps(diagnosis, indent=2, default=_jsonable) + "\n")

    sections, skipped = [], []
    multi = len(study.directions) > 1
    for name, title in ((PARETO, *PLOTS) if multi else PLOTS):
        if multi and name == "intermediate_values":
            skipped.append(f"{name}: a multi-objective study keeps no intermediate values in Optuna "
                           "(the curves are in MLflow and `hpo diagnose`)")
            continue
        options = _first_objective(study) if multi and name not in ("pareto_front", "intermediate_values") else {}
        if name == "param_importances":
            from hpo.analysis.diagnose_advice import importance_evaluator

            options = {**options, "evaluator": importance_evaluator()}
        figure = _plot(optuna.visualization, name, study, options, skipped)
        if figure is not None:
            sections.append((title, figure.to_html(full_html=False, include_plotlyjs=False)))
        axes = _plot(optuna.visualization.matplotlib, name, study, options, [])
        if axes is not None:
            png = folder / f"{name}.png"
            _save_png(axes, png)
            written.append(png)
    page = folder / "report.html"
    page.write_text(_page(study, diagnosis, sections, skipped), encoding="utf-8")
    written.append(page)
    return written


def _first_objective(study: optuna.Study) -> dict[str, Any]:
    """Plot options of a multi-objective study's single-objective plots: they show its first objective."""
    name = (study.metric_names or ["objective 0"])[0]
    return {"target": lambda trial: trial.values[0], "target_name": name}


def _plot(plots: ModuleType, name: str, study: optuna.Study, options: dict[str, Any], skipped: list[str]) -> Any:
    """``plots.plot_<name>(study, **options)`` (a plotly figure or matplotlib axes), or None with the
    reason added to ``skipped``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return getattr(plots, f"plot_{name}")(study, **options)
    except Exception as error:  # noqa: BLE001 - e.g. importance with one trial; the report says so
        skipped.append(f"{name}: {error}")
        return None


def _save_png(axes: Any, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = axes.flat[0] if hasattr(axes, "flat") else axes
    figure = first.get_figure()
    figure.set_size_inches(10, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tight_layout's complaints about wide legends
        figure.tight_layout()
        figure.savefig(path, dpi=100)
    plt.close(figure)


def _page(study: optuna.Study, diagnosis: dict[str, Any], sections: list[tuple[str, str]], skipped: list[str]) -> str:
    from plotly.offline import get_plotlyjs

    from hpo.record.study import best_summary, state_counts
    from hpo.record.sweep_record import SweepRecord

    counts = state_counts(study)
    best = best_summary(study)
    record = SweepRecord.load(study)
    metric = record.sweep.get("metric", "objective") if record else "objective"
    best_html = (
        f"<p>Best: trial {best['number']}, {html.escape(str(metric))} = {short(best['value'], 6)}</p>"
        + _table(["parameter", "value"], [[k, v] for k, v in best["config"].items()])
        if best else "<p>No COMPLETE trial yet.</p>"
    )
    if len(study.directions) > 1:
        best_html = _front_html(study)
    advice = "".join(f"<li>{html.escape(str(f['message']))}{_trial_links(f.get('trials', []))}</li>"
                     for f in diagnosis.get("study_findings", [])) or "<li>none</li>"
    trial_rows = "".join(
        f'<tr id="trial-{t["number"]}"><td>{t["number"]}</td><td>{html.escape(t.get("state", ""))}</td><td>'
        + ("<br>".join(f"<b>{html.escape(f['kind'])}</b>: {html.escape(f['message'])}" for f in t.get("findings", []))
           or html.escape(t.get("note") or "")) + "</td></tr>"
        for t in diagnosis.get("trials", []))
    importance = diagnosis.get("importance") or {}
    rests = diagnosis.get("importance_trials", 0)
    trust = "" if diagnosis.get("importance_trusted") else ": too few to trust, no parameter is singled out"
    models = diagnosis.get("models") or {}
    model_rows = [[m, v.get("count"), cell(v.get("best")), cell(v.get("median"))] for m, v in models.items()]
    plots = "".join(f"<h2>{html.escape(title)}</h2>{body}" for title, body in sections)
    skipped_html = "".join(f"<li>{html.escape(s)}</li>" for s in skipped)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>hpo report: {html.escape(study.study_name)}</title>
<script>{get_plotlyjs()}</script>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}}h1,h2{{font-weight:600}}</style>
</head><body>
<h1>Study {html.escape(study.study_name)} ({html.escape(_goal(study, str(metric)))})</h1>
<p>{", ".join(f"{v} {k.lower()}" for k, v in sorted(counts.items()))}</p>
{best_html}
<h2>What to try next</h2><ul id="advice">{advice}</ul>
<h2>The data (hpo check-data)</h2><div id="data">{_data_html(diagnosis)}</div>
<h2>Parameter importance (over {rests} COMPLETE trials{trust})</h2>{_table(["parameter", "importance"],
    [[k, cell(v)] for k, v in importance.items()]) if importance else "<p>Not enough COMPLETE trials.</p>"}
{"<h2>Base models</h2>" + _table(["model", "trials", "best", "median"], model_rows) if model_rows else ""}
<h2>Trials</h2><table id="trials"><tr><th>trial</th><th>state</th><th>findings</th></tr>{trial_rows}</table>
{plots}
{"<h2>Plots skipped</h2><ul>" + skipped_html + "</ul>" if skipped else ""}
</body></html>
"""


def _trial_links(numbers: list[int]) -> str:
    """`` (trials 0, 7)``, each a link to the trial's row below."""
    if not numbers:
        return ""
    links = ", ".join(f'<a href="#trial-{int(n)}">{int(n)}</a>' for n in numbers)
    return f' <span class="behind">(trial{"s" if len(numbers) > 1 else ""} {links})</span>'


ROWS_SHOWN = 20
"""Data rows shown under each data finding; the rest are in checks.json and the CSVs."""


def _data_html(diagnosis: dict[str, Any]) -> str:
    """Each data finding with the rows behind it (the first ``ROWS_SHOWN``), or where the checks were looked for."""
    checks = diagnosis.get("data_checks") or {}
    note = f"<p>{html.escape(checks['note'])}</p>" if checks.get("note") else ""
    if not checks.get("found"):
        return note or "<p>No hpo check-data results.</p>"
    parts = [f"<p>From {html.escape(str(checks.get('source')))}, checked {html.escape(str(checks.get('checked_at')))}"
             f" ({html.escape(str(checks.get('train_data')))}, {html.escape(str(checks.get('eval_data')))}).</p>", note]
    for finding in diagnosis.get("data_findings", []):
        rows = finding.get("rows") or []
        more = f"<p>... {len(rows) - ROWS_SHOWN} more rows in checks.json</p>" if len(rows) > ROWS_SHOWN else ""
        parts.append(f'<h3 class="data-finding">{html.escape(finding["kind"])}</h3>'
                     f'<p>{html.escape(finding["message"])}</p>{_rows_table(rows[:ROWS_SHOWN])}{more}')
    return "".join(parts) if diagnosis.get("data_findings") else "".join(parts) + "<p>Nothing found.</p>"


def _rows_table(rows: list[dict]) -> str:
    """Data rows as a table: row numbers first, file names without their folders, short numbers."""
    columns = list(dict.fromkeys(["row", "first_row", "second_row", *(key for row in rows for key in row)]))
    columns = [c for c in columns if any(c in row for row in rows)]

    def shown(column: str, value: Any) -> Any:
        if column == "source" and isinstance(value, str):
            return Path(value).name
        return short(value, 4) if isinstance(value, float) else value

    return _table(columns, [[shown(c, row.get(c, "")) for c in columns] for row in rows]) if rows else ""


def _goal(study: optuna.Study, metric: str) -> str:
    """``maximize eval_accuracy``, or ``maximize eval_accuracy, minimize peak_memory_mb``."""
    names = study.metric_names or metric.split(",")
    return ", ".join(f"{d.name.lower()} {n}" for d, n in zip(study.directions, names, strict=False))


def _front_html(study: optuna.Study) -> str:
    from hpo.record.study import pareto_front

    front = pareto_front(study)
    if not front:
        return "<p>No COMPLETE trial yet.</p>"
    names = list(front[0]["values"])
    rows = [[p["number"], *[cell(v) for v in p["values"].values()],
             ", ".join(f"{k}={cell(v)}" for k, v in p["config"].items())] for p in front]
    return (f"<p>Pareto front: {len(front)} non-dominated trial(s); promote one with "
            f"<code>hpo promote --trial N</code></p>" + _table(["trial", *names, "params"], rows))


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _jsonable(value: Any) -> Any:
    return str(value)
