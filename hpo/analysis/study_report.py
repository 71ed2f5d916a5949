"""The study report: Optuna's plots and the diagnosis, as files a person opens.

``write_report`` produces, in one folder:

* ``report.html``: the diagnosis (advice, per-trial findings, base models compared) and
  Optuna's interactive plots (optimization history, intermediate values, parallel
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna

from hpo.formatting import cell, short

PLOTS = (
    ("optimization_history", "Optimization history: the objective per trial and the best so far"),
    ("intermediate_values", "Learning curves: the objective at each evaluation (pruned curves end early)"),
    ("parallel_coordinate", "Parallel coordinates: how parameters combine in good and bad trials"),
    ("param_importances", "Parameter importances (fANOVA over COMPLETE trials)"),
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
        from hpo.analysis.diagnose import diagnose_study

        diagnosis = diagnose_study(study).to_dict()
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
        figure = _plot(lambda name=name, options=options: getattr(optuna.visualization, f"plot_{name}")(study, **options),
                       name, skipped)
        if figure is not None:
            sections.append((title, figure.to_html(full_html=False, include_plotlyjs=False)))
        axes = _plot(lambda name=name, options=options: getattr(optuna.visualization.matplotlib, f"plot_{name}")(
            study, **options), name, [])
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


def _plot(make: Callable[[], Any], name: str, skipped: list[str]) -> Any:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return make()
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
    advice = "".join(f"<li>{html.escape(str(a))}</li>" for a in diagnosis.get("advice", [])) or "<li>none</li>"
    trial_rows = [
        [t["number"], t.get("state", ""),
         "; ".join(f"{f['kind']}: {f['message']}" for f in t.get("findings", [])) or t.get("note") or ""]
        for t in diagnosis.get("trials", [])
    ]
    importance = diagnosis.get("importance") or {}
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
<h2>What to try next</h2><ul>{advice}</ul>
<h2>Parameter importance</h2>{_table(["parameter", "importance"], [[k, cell(v)] for k, v in importance.items()])
    if importance else "<p>Not enough COMPLETE trials.</p>"}
{"<h2>Base models</h2>" + _table(["model", "trials", "best", "median"], model_rows) if model_rows else ""}
<h2>Trials</h2>{_table(["trial", "state", "findings"], trial_rows)}
{plots}
{"<h2>Plots skipped</h2><ul>" + skipped_html + "</ul>" if skipped else ""}
</body></html>
"""


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
