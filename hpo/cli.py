"""The ``hpo`` command: parses arguments and calls the modules that do the work.

Heavy libraries (torch, transformers, peft, ray, mlflow) are imported inside commands,
so ``hpo --help`` stays instant. A problem the user can fix (:class:`HpoError`) is one
line on stderr and exit status 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Annotated, Any

import typer
from rich.console import Console

from hpo.errors import HpoError
from hpo.formatting import STATE_STYLE, cell, params_text, short

app = typer.Typer(
    help="Hyperparameter search for fine-tuning language models (Optuna + Ray Tune + MLflow).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)
_state = {"debug": False}

def _checked_study(name: str | None) -> str | None:
    from hpo.names import check_study_name

    return None if name is None else check_study_name(name)


Study = Annotated[str | None, typer.Option("--study", callback=_checked_study, help="Study name (default: the module's file name; for other commands, the only study in the storage).")]
Storage = Annotated[str | None, typer.Option("--storage", envvar="HPO_STORAGE", help="Optuna storage, an SQLAlchemy URL (default: sqlite:///hpo.db in this folder).")]
Tracking = Annotated[str | None, typer.Option("--tracking-uri", envvar="MLFLOW_TRACKING_URI", help="MLflow tracking URI (default: sqlite:///mlflow.db in this folder).")]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


@app.callback()
def _root(debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks.")] = False) -> None:
    _state["debug"] = debug


@app.command()
def search(
    module: Annotated[str, typer.Argument(help="Search-space module, e.g. search_spaces/lora.py")],
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a sweep field: KEY=VALUE (repeatable).")] = None,
    study: Study = None,
    storage: Storage = None,
    tracking_uri: Tracking = None,
    trials: Annotated[int | None, typer.Option("--trials", help="Finished trials the study should hold at the end.")] = None,
    timeout: Annotated[float | None, typer.Option("--timeout", help="Seconds after which no new trial starts.")] = None,
    address: Annotated[str | None, typer.Option("--address", help="Join a running Ray cluster: HEAD:PORT or auto (token: RAY_AUTH_MODE=token + RAY_AUTH_TOKEN_PATH); default: RAY_ADDRESS, else a local Ray.")] = None,
    concurrency: Annotated[int | None, typer.Option("--concurrency", help="Most trials running at once.")] = None,
    retries: Annotated[int, typer.Option("--retries", min=0, help="Run a failed trial (error, oom) again up to N times.")] = 0,
    skip_data_check: Annotated[bool, typer.Option("--skip-data-check", help="Start even if `hpo check-data` finds errors.")] = False,
    worker_logs: Annotated[bool, typer.Option("--worker-logs", help="Show what trials print (otherwise it stays in Ray's log files).")] = False,
    resume: Annotated[bool, typer.Option("--resume", hidden=True, help="Gone: a study resumes by its name.")] = False,
    more: Annotated[int | None, typer.Option("--more", min=1, help="Run K more finished trials than the study holds now (nightly runs; instead of --trials).")] = None,
    warm_start: Annotated[str | None, typer.Option("--warm-start", envvar="HPO_WARM_START", help="STUDY\\[@STORAGE]: first enqueue that earlier study's best configs (those that fit this space), once per study.")] = None,
    warm_start_top: Annotated[int, typer.Option("--warm-start-top", min=1, help="How many of the earlier study's best configs --warm-start enqueues.")] = 5,
) -> None:
    """Run a sweep: sample trials, train them on Ray, stop weak ones early, record everything."""
    if resume:  # accepted and ignored once; an error now, so a script learns it never did anything
        raise HpoError("--resume: hpo search always resumes the study of that name (default: the module's file "
                       "name, or --study NAME); run the same command without --resume")
    from hpo.run.sweep import SearchOptions
    from hpo.run.sweep import search as run_search

    options = SearchOptions(module=module, overrides=set_ or [], study=study, storage=storage,
                            tracking_uri=tracking_uri, trials=trials, timeout=timeout, address=address,
                            concurrency=concurrency, retries=retries, skip_data_check=skip_data_check,
                            worker_logs=worker_logs, more=more, warm_start=warm_start, warm_start_top=warm_start_top)
    result = run_search(options, console)
    counts = result.counts
    console.print(
        f"\n[bold]{result.study_name}[/]: {counts.get('COMPLETE', 0)} complete, {counts.get('PRUNED', 0)} pruned, "
        f"{counts.get('FAIL', 0)} failed, {counts.get('RUNNING', 0)} running"
    )
    if result.best:
        best = result.best
        at = f" (step {best['best_step']})" if "best_step" in best else ""
        console.print(f"best: trial {best['number']} {best['metric']}={short(best['value'])}{at}  "
                      f"{params_text(best['config'], 3)}")
    elif result.front:
        console.print(f"Pareto front: trials {', '.join(str(t['number']) for t in result.front)} "
                      "(`hpo best` lists them; promote one with `hpo promote --trial N`)")
    if result.report_page:
        console.print(f"report: {result.report_page} (also in MLflow, parent run, report/)")
    storage_flag = f" --storage '{result.storage}'" if storage else ""
    tracking_flag = f" --tracking-uri '{result.tracking_uri}'" if tracking_uri else ""
    console.print(
        f"look:   hpo status --study {result.study_name}{storage_flag}\n"
        f"        hpo dashboard{storage_flag}   (Optuna dashboard, http://127.0.0.1:8080)\n"
        f"        hpo ui{tracking_flag}   (MLflow UI, http://127.0.0.1:5000)"
    )
    if result.ended == "interrupted":
        err_console.print(f"interrupted: trials {result.interrupted or '-'} stopped unfinished; run the same command "
                          "again to run them and finish the sweep", markup=False, highlight=False)
        raise typer.Exit(130)
    if result.ended == "short":
        err_console.print(f"error: study {result.study_name!r} ended with {result.finished} of {result.target} "
                          f"finished trials: {result.short_reason}; run the same command again to continue",
                          markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(1)
    if counts.get("COMPLETE", 0) + counts.get("PRUNED", 0) == 0:
        _fail_summary(result)


def _fail_summary(result: Any) -> None:
    reasons = ", ".join(f"{count} {reason}" for reason, count in result.fail_reasons.items()) or "none ran"
    err_console.print(
        f"error: no trial of study {result.study_name!r} finished ({reasons}); "
        f"see `hpo status --study {result.study_name}` for each trial's error", markup=False, highlight=False)
    raise typer.Exit(1)


@app.command("check-data")
def check_data(
    module: Annotated[str | None, typer.Argument(help="Search-space module whose data to check (or give --set train_data=...).")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a sweep field: KEY=VALUE (repeatable).")] = None,
    as_json: AsJson = False,
    tokenizer: Annotated[bool, typer.Option("--tokenizer/--no-tokenizer", help="Count tokens with the model's tokenizer (exact) or estimate from words (fast).")] = True,
    labels: Annotated[bool, typer.Option("--labels", help="Also look for wrong labels (classification): confident learning on a quick probe over the base model's embeddings.")] = False,
    paraphrases: Annotated[bool, typer.Option("--paraphrases", help="Also look for near-duplicates (MinHash) and paraphrases (embeddings) within train and between train and eval.")] = False,
    out: Annotated[str | None, typer.Option("--out", help="Folder for the results: checks.json (what hpo diagnose and hpo report read for study NAME) and the CSVs of --labels/--paraphrases (default: .hpo/checks/NAME, NAME the --study, the module's file name, or the training file's).")] = None,
    write_clean: Annotated[str | None, typer.Option("--write-clean", help="With --labels: write a copy of the training file without the suspect rows to this .tsv/.csv/.jsonl (the original is never touched).")] = None,
    relabel: Annotated[bool, typer.Option("--relabel", help="With --write-clean: keep the suspect rows, with the suggested label.")] = False,
    tracking_uri: Annotated[str | None, typer.Option("--tracking-uri", help="Log the CSVs to MLflow here (under checks/ of the study's sweep run, or of a new check-data run); with --study, default: the sweep's own.")] = None,
    study: Annotated[str | None, typer.Option("--study", callback=_checked_study, help="With --labels: the strong probe, the study's best trial cross-fitted over 5 folds through the recipe (the study's data; each fold early-stopped, at least 3 epochs; --set max_steps=N sets each fold's steps), ensembled with the quick probe.")] = None,
    storage: Storage = None,
) -> None:
    """Check the data before a sweep: empty texts, duplicates, leakage, labels, imbalance, lengths; sft: answers.

    --labels and --paraphrases embed the texts with the base model (seconds per thousand rows on a CPU)."""
    import dataclasses
    from pathlib import Path

    from hpo.analysis.data_findings import CHECKS_ROOT, checks_folder, write_checks
    from hpo.config import Sweep, resolve_paths
    from hpo.overrides import parse_overrides
    from hpo.run.sweep import check_data as run_check

    strong = None
    if study:
        if not labels:
            raise HpoError("hpo check-data --study: the strong probe looks for wrong labels; add --labels")
        from hpo.analysis.label_probe import best_trial_setup
        from hpo.record import study as studies

        sweep, params, trial_number, recorded_uri = best_trial_setup(studies.load(storage, study), set_ or [])
        strong = (params, trial_number, "max_steps" in parse_overrides(set_ or []))
        tracking_uri = tracking_uri or recorded_uri  # the suspects go beside the sweep's own report
    elif module:
        from hpo import space as spaces

        sweep = spaces.load(module, set_ or []).sweep
    else:
        try:
            sweep = resolve_paths(dataclasses.replace(Sweep(), **parse_overrides(set_ or [])), Path.cwd())
        except HpoError as error:
            raise HpoError(f"hpo check-data: {error}") from None
    if not sweep.train_data:
        raise HpoError("hpo check-data: no data to check; give a module or --set train_data=... [--set eval_data=...]")
    if labels and sweep.task != "classification":
        raise HpoError(f"hpo check-data --labels: task is {sweep.task!r}; wrong labels are looked for in classification data only")
    if (write_clean or relabel) and not labels:
        raise HpoError("hpo check-data: --write-clean and --relabel need --labels (they act on the suspect rows it finds)")
    if relabel and not write_clean:
        raise HpoError("hpo check-data --relabel: give --write-clean FILE, the copy to write (the original is never touched)")
    loaded_tokenizer = None
    if tokenizer:
        from hpo.train import models

        try:
            from transformers import AutoTokenizer

            loaded_tokenizer = AutoTokenizer.from_pretrained(models.resolve(sweep.model))
        except Exception as error:  # noqa: BLE001 - fall back to the estimate, and say so
            err_console.print(f"note: no tokenizer for {sweep.model!r} ({type(error).__name__}); estimating lengths")
    report = run_check(sweep, loaded_tokenizer)
    name = study or (Path(module).stem if module else Path(sweep.train_data).stem)
    folder = Path(out) if out else checks_folder(name)
    deeper = _deeper_checks(sweep, labels, paraphrases, folder, write_clean, relabel, strong) \
        if (labels or paraphrases) and not report.errors else {}
    results = {**report.to_dict(), **{key: deeper[key].to_dict() for key in ("labels", "paraphrases") if key in deeper},
               **({"clean": deeper["clean"]} if "clean" in deeper else {}),
               "files": [str(f) for f in deeper.get("files", [])]}
    recorded = write_checks(folder, results, sweep.train_data, sweep.eval_data)  # what hpo diagnose reads back
    if tracking_uri and deeper.get("files"):
        from hpo.record.tracking import check_tracking, log_data_checks

        check_tracking(tracking_uri)
        deeper["mlflow_run"] = log_data_checks(tracking_uri, name, [*deeper["files"], recorded])
    if as_json:
        print(json.dumps({**results, **({"mlflow_run": deeper["mlflow_run"]} if "mlflow_run" in deeper else {}),
                          "recorded": str(recorded)}, default=str))
    else:
        from rich.text import Text

        styles = {"error": "bold red", "warning": "yellow", "info": "dim"}
        for line in report.lines():
            console.print(Text(line, style=styles.get(line.split(":", 1)[0], "")))
        for key in ("labels", "paraphrases"):
            if key in deeper:
                for line in deeper[key].lines():
                    console.print(Text(line, style="yellow" if line.startswith("eval score suspect") else ""))
        for path in deeper.get("files", []):
            console.print(f"wrote {path}", highlight=False)
        if "clean" in deeper:
            console.print(deeper["clean"], highlight=False)
        if "mlflow_run" in deeper:
            console.print(f"logged to MLflow run {deeper['mlflow_run']} under checks/", highlight=False)
        read = f"for study {folder.name}" if folder.resolve().parent == CHECKS_ROOT.resolve() else \
            f"when it is at {checks_folder('STUDY') / recorded.name}"
        console.print(f"recorded in {recorded} (hpo diagnose and hpo report read it {read})", highlight=False)
    if report.errors:
        if labels or paraphrases:
            err_console.print("note: --labels/--paraphrases did not run: fix the errors above first", highlight=False)
        raise typer.Exit(1)


def _deeper_checks(sweep: Any, labels: bool, paraphrases: bool, folder: Any, write_clean: str | None,
                   relabel: bool, strong: tuple[dict, int, bool] | None = None) -> dict:
    """``--labels`` and ``--paraphrases``: their results, the CSVs written, and the clean copy;
    ``strong`` (the best trial's params and number, and whether ``--set max_steps`` chose each
    fold's steps) makes the label probe the strong one."""
    results: dict[str, Any] = {"files": []}
    if labels:
        from hpo.analysis.label_issues import check_labels
        from hpo.analysis.label_issues import write_clean as write_copy
        from hpo.train import data

        if write_clean:  # a bad target fails before minutes of embedding
            from pathlib import Path

            if Path(write_clean).suffix.lower() not in (".tsv", ".csv", ".jsonl"):
                raise HpoError(f"--write-clean {write_clean}: name a .tsv, .csv or .jsonl file")
            if Path(write_clean).resolve() in {Path(s).resolve() for s in (sweep.train_data, sweep.eval_data) if s}:
                raise HpoError(f"--write-clean {write_clean}: that is a data file itself; the original is never "
                               "overwritten: name another file")
        probe = None
        if strong is not None:
            from hpo.analysis.label_probe import planned_steps, strong_probe

            chosen = sweep.max_steps if strong[2] else None  # --set max_steps=N: each fold's run exactly

            def probe(texts: list[str], labels: list[int]) -> Any:
                steps = chosen or planned_steps(sweep, strong[0], len(texts))
                err_console.print(f"strong probe: trial {strong[1]}'s params, 5 folds of {steps} steps each (fewer "
                                  "where the loss on 10% of the fold's training rows stops falling), ensembled with "
                                  "the quick probe", highlight=False)
                return strong_probe(sweep, strong[0], texts, labels, max_steps=chosen)
        found = check_labels(sweep.train_data, sweep.eval_data, model=sweep.model, text_column=sweep.text_column,
                             label_column=sweep.label_column, strong=probe)
        results["labels"] = found
        results["files"].append(found.write_csv(folder / "label_issues.csv"))
        if write_clean:
            column = data.read_raw(sweep.train_data, "classification", sweep.text_column, sweep.label_column).label_column
            if column is None:  # not for classification data: read_raw names the column it found, or raises
                raise HpoError(f"{sweep.train_data}: no label column; set one with --set label_column=...")
            changed = write_copy(sweep.train_data, write_clean, found.suspects, column, relabel)
            results["clean"] = (f"wrote {write_clean}: {sweep.train_data} with {changed} suspect rows "
                                f"{'relabelled' if relabel else 'left out'}")
    if paraphrases:
        from hpo.analysis.near_duplicates import check_pairs

        pairs = check_pairs(sweep.train_data, sweep.eval_data, task=sweep.task, model=sweep.model,
                            text_column=sweep.text_column, label_column=sweep.label_column,
                            eval_fraction=sweep.eval_fraction)
        results["paraphrases"] = pairs
        results["files"].append(pairs.write_csv(folder / "near_duplicates.csv"))
    return results


@app.command()
def status(study: Study = None, storage: Storage = None, as_json: AsJson = False) -> None:
    """Table of the study's trials: number, state, value, steps, params, reason."""
    from hpo.record import study as studies

    loaded = studies.load(storage, study)
    rows = [_trial_row(t) for t in loaded.get_trials(deepcopy=False)]
    if as_json:
        print(json.dumps({"study": loaded.study_name, "trials": rows}, default=str))
        return
    from rich.table import Table

    table = Table(title=f"study {loaded.study_name} ({','.join(d.name.lower() for d in loaded.directions)})",
                  header_style="bold")
    for column in ("trial", "state", "value", "steps", "seconds", "params", "reason"):
        table.add_column(column, justify="right" if column in ("trial", "value", "steps", "seconds") else "left")
    from rich.text import Text

    for row in rows:
        table.add_row(
            str(row["number"]), Text(row["state"], style=STATE_STYLE.get(row["state"], "")),
            _value_text(row["value"]), str(row["steps"] or "-"),
            "-" if row["seconds"] is None else f"{row['seconds']:.0f}", params_text(row["params"], 3),
            Text(row["reason"] or ""),
        )
    console.print(table)
    counts = studies.state_counts(loaded)
    console.print("  ".join(f"{k.lower()}: {v}" for k, v in sorted(counts.items())))


def _value_text(value: Any) -> str:
    """A trial's value for a table: one number, or several (a multi-objective trial's), or -."""
    return ", ".join(short(v) for v in value) if isinstance(value, list) else short(value)


def _trial_row(trial: Any) -> dict[str, Any]:
    from hpo.record.study import last_step

    seconds = None
    if trial.datetime_start and trial.datetime_complete:
        seconds = (trial.datetime_complete - trial.datetime_start).total_seconds()
    value = (trial.values[0] if len(trial.values or []) == 1 else trial.values) if trial.state.name == "COMPLETE" else None
    reason = trial.user_attrs.get("reason")
    if trial.user_attrs.get("error"):
        reason = f"{reason}: {trial.user_attrs['error']}"
    params = trial.params
    if trial.state.name == "WAITING":  # enqueued to run again: its params are fixed, not sampled yet
        params = trial.system_attrs.get("fixed_params", {})
        reason = f"queued to run again (retry of trial {trial.user_attrs.get('retry_of')})"
    return {"number": trial.number, "state": trial.state.name, "value": value, "steps": last_step(trial),
            "seconds": seconds, "params": params, "reason": reason}


@app.command()
def best(study: Study = None, storage: Storage = None, as_json: AsJson = False) -> None:
    """The best trial's parameters and value; of a multi-objective study, the Pareto front."""
    from hpo.record import study as studies

    loaded = studies.load(storage, study)
    if studies.is_multi_objective(loaded):
        _front(loaded, as_json)
        return
    summary = studies.best_summary(loaded)
    if summary is None:
        raise HpoError(f"study {loaded.study_name!r} has no COMPLETE trial yet; run more trials or see `hpo status`")
    if as_json:
        print(json.dumps(summary, default=str))
        return
    at = f" (its best evaluation, at step {summary['best_step']} of {summary['steps']})" if "best_step" in summary else ""
    console.print(f"best trial {summary['number']} of {summary['study']}: {summary['metric']} = {short(summary['value'], 6)}{at}")
    for key, value in summary["config"].items():
        console.print(f"  {key} = {value}")


def _front(loaded: Any, as_json: bool) -> None:
    """``hpo best`` of a multi-objective study: its non-dominated COMPLETE trials."""
    from hpo.record import study as studies

    front = studies.pareto_front(loaded)
    if not front:
        raise HpoError(f"study {loaded.study_name!r} has no COMPLETE trial yet; run more trials or see `hpo status`")
    directions = dict(zip(loaded.metric_names or [], (d.name.lower() for d in loaded.directions), strict=False))
    if as_json:
        print(json.dumps({"study": loaded.study_name, "directions": directions, "front": front}, default=str))
        return
    console.print(f"Pareto front of {loaded.study_name} ({', '.join(f'{k} {v}' for k, v in directions.items())}): "
                  f"{len(front)} trial(s); promote one with `hpo promote --trial N`")
    for point in front:
        values = "  ".join(f"{k}={short(v, 6)}" for k, v in point["values"].items())
        console.print(f"trial {point['number']}: {values}  {params_text(point['config'], 3)}", highlight=False)


@app.command()
def promote(
    study: Study = None,
    storage: Storage = None,
    tracking_uri: Annotated[str | None, typer.Option("--tracking-uri", envvar="MLFLOW_TRACKING_URI", help="MLflow tracking URI (default: the one the sweep used).")] = None,
    trial: Annotated[int | None, typer.Option("--trial", help="Trial number to promote (default: the best COMPLETE trial; required for a multi-objective study: one of its Pareto front).")] = None,
    output: Annotated[str | None, typer.Option("--output", help="Folder for the model (default: promoted/STUDY-trialN).")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a sweep field: KEY=VALUE (repeatable), e.g. max_steps=600.")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Seed of the final run (default: the sweep's).")] = None,
    merge: Annotated[bool, typer.Option("--merge", help="Write the base model with the adapter merged in, instead of the adapter.")] = False,
    register: Annotated[str | None, typer.Option("--register", help="Registered model name in MLflow (default: the study name).")] = None,
) -> None:
    """Train the final model with a trial's parameters, save it, register it in MLflow."""
    from hpo.run.promote import PromoteOptions
    from hpo.run.promote import promote as run_promote

    overrides = list(set_ or []) + ([f"seed={seed}"] if seed is not None else [])
    result = run_promote(PromoteOptions(study=study, storage=storage, tracking_uri=tracking_uri, trial=trial,
                                        output=output, overrides=overrides, merge=merge, register=register), console)
    shown = "  ".join(f"{k}={short(v)}" for k, v in result.metrics.items()
                      if k.startswith(("eval_", "test_")) or k in ("best_step", "stopped_early_at"))
    console.print(f"\n[bold]promoted[/] trial {result.trial_number}: {shown}")
    console.print(f"model:  {result.output}")
    console.print(f"MLflow: run {result.run_id}, registered model {result.model_name!r} version {result.model_version}")
    console.print("load it:\n" + "\n".join(f"    {line}" for line in result.load_code.splitlines()), highlight=False)


@app.command()
def diagnose(study: Study = None, storage: Storage = None, as_json: AsJson = False) -> None:
    """What went wrong in each trial (curves, unstable steps, sft answers, forgetting), what matters, what to try, and what hpo check-data found in the data."""
    from hpo.record import study as studies

    loaded = studies.load(storage, study)
    result = _diagnosis(loaded).to_dict()
    if as_json:
        print(json.dumps(result, default=str))
        return
    from rich.table import Table

    table = Table(title=f"diagnosis of study {loaded.study_name}", header_style="bold", show_lines=False)
    for column in ("trial", "state", "finding", "evidence"):
        table.add_column(column)
    for trial in result["trials"]:
        for finding in trial["findings"] or [{"kind": "no finding", "message": trial.get("note") or "", "evidence": {}}]:
            evidence = ", ".join(f"{k}={cell(v, missing='None')}" for k, v in finding.get("evidence", {}).items())
            table.add_row(str(trial["number"]), trial.get("state", ""), f"{finding['kind']}: {finding['message']}",
                          evidence)
    console.print(table)
    if result.get("importance"):
        trust = "" if result["importance_trusted"] else ", too few to trust"
        console.print(f"importance over {result['importance_trials']} COMPLETE trials{trust}: "
                      + "  ".join(f"{k}={v:.2f}" for k, v in result["importance"].items()), highlight=False)
    for model, summary in (result.get("models") or {}).items():
        console.print(f"model {model}: {summary}")
    checks = result["data_checks"]
    console.print(f"[bold]the data[/] ({checks['source'] if checks.get('found') else 'hpo check-data'}):")
    for finding in result["data_findings"]:
        console.print(f"  - {finding['kind']}: {finding['message']}{_rows_text(finding['rows'])}", highlight=False)
    if checks.get("note"):
        console.print(f"  {checks['note']}", highlight=False)
    console.print("[bold]what to try next:[/]")
    for finding in result["study_findings"]:
        trials = finding["trials"]
        behind = f" (trial{'s' if len(trials) > 1 else ''} {', '.join(map(str, trials))})" if trials else ""
        console.print(f"  - {finding['message']}{behind}", highlight=False)


def _diagnosis(loaded: Any, tracking_uri: str | None = None) -> Any:
    """The study's diagnosis with what ``hpo check-data`` recorded for it: ``.hpo/checks/STUDY``
    here, else ``checks/`` of the study's MLflow sweep run (MLflow unreachable: said, and skipped)."""
    import tempfile
    from pathlib import Path

    from hpo.analysis.data_findings import CHECKS_FILE, checks_folder, diagnose_with_checks
    from hpo.record.sweep_record import SweepRecord

    record = SweepRecord.load(loaded)
    uri = tracking_uri or (record.tracking_uri if record else None)
    if (checks_folder(loaded.study_name) / CHECKS_FILE).is_file() or not uri or "***" in uri:
        return diagnose_with_checks(loaded)
    from hpo.record.tracking import fetch_data_checks

    with tempfile.TemporaryDirectory(prefix="hpo-checks-") as folder:
        try:
            run = fetch_data_checks(uri, loaded.study_name, folder)
        except HpoError as error:
            err_console.print(f"note: the data checks logged to MLflow were not read: {error}", highlight=False)
            run = None
        if run is not None:
            return diagnose_with_checks(loaded, Path(folder), f"MLflow run {run}, checks/{CHECKS_FILE}")
    return diagnose_with_checks(loaded)


def _rows_text(rows: list[dict], shown: int = 5) -> str:
    """`` (rows 3, 17, 40 and 12 more)`` for a data finding's rows (a pair: its second row)."""
    numbers = [r.get("row", r.get("second_row")) for r in rows]
    if not numbers:
        return ""
    more = f" and {len(numbers) - shown} more" if len(numbers) > shown else ""
    return f" (rows {', '.join(str(n) for n in numbers[:shown])}{more})"


@app.command()
def refine(
    study: Annotated[str, typer.Argument(help="The study to learn from.", callback=_checked_study)],
    storage: Storage = None,
    output: Annotated[str | None, typer.Option("--output", "-o", help="The module to write (default: STUDY_refined.py in this folder).")] = None,
    module: Annotated[str | None, typer.Option("--module", help="The search-space module to rewrite (default: the one the study ran).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace --output if it exists.")] = False,
) -> None:
    """Write the next search-space module from a study and its diagnosis: ranges narrowed or widened, unimportant
    parameters fixed, more steps or more regularisation, each change with its reason as a comment."""
    from hpo.analysis.refine_module import describe_any, refine_study
    from hpo.analysis.refine_ranges import describe
    from hpo.record import study as studies

    loaded = studies.load(storage, study)
    storage_flag = f" --storage '{studies.redact(storage)}'" if storage else ""
    result = refine_study(loaded, output, module=module, force=force, storage_flag=storage_flag)
    plan = result.plan
    changes = [c for c in [*plan.params, *plan.sweep] if c.changed]
    console.print(f"wrote {result.path} from study {plan.study} ({plan.counts.get('COMPLETE', 0)} complete of "
                  f"{sum(plan.counts.values())} trials; best trial {plan.best[0]}, {plan.metric} = {short(plan.best[1])}): "
                  f"{len(changes) or 'no'} change{'' if len(changes) == 1 else 's'}", highlight=False)
    for change in changes:
        console.print(f"  {change.name}: {describe_any(change.before)} -> {describe_any(change.after)}\n"
                      f"    {change.reason}", highlight=False)
    for change in plan.params:
        if not change.changed:
            console.print(f"  {change.name}: kept {describe(change.before)}: {change.reason}", highlight=False)
    for note in plan.notes:
        console.print(f"  note: {note}", highlight=False)
    for name in result.unapplied:
        err_console.print(f"warning: {name}: no trial.suggest_*({name!r}, ...) call with a literal name in "
                          f"{result.module}; change its range in {result.path} by hand", highlight=False)
    console.print(f"next: {result.command}", highlight=False)


@app.command()
def report(
    study: Study = None,
    storage: Storage = None,
    tracking_uri: Annotated[str | None, typer.Option("--tracking-uri", envvar="MLFLOW_TRACKING_URI", help="MLflow tracking URI (default: the one the sweep used).")] = None,
    output: Annotated[str | None, typer.Option("--output", help="Folder for the report (default: .hpo/reports/STUDY).")] = None,
) -> None:
    """Write the study report again (HTML + PNG plots + diagnosis) and log it to the sweep's MLflow run."""
    from pathlib import Path

    from hpo.analysis.study_report import write_report
    from hpo.names import folder_for
    from hpo.record import study as studies
    from hpo.record.sweep_record import SweepRecord

    loaded = studies.load(storage, study)
    folder = Path(output).resolve() if output else folder_for(Path(".hpo") / "reports", loaded.study_name).resolve()
    written = write_report(loaded, folder, _diagnosis(loaded, tracking_uri).to_dict())
    console.print(f"report: {folder / 'report.html'}")
    record = SweepRecord.load(loaded)
    uri = tracking_uri or (record.tracking_uri if record else None)
    if uri and "***" not in uri:
        from hpo.record.sweep_tracker import SweepTracker
        from hpo.record.tracking import check_tracking

        check_tracking(uri)
        tracker = SweepTracker(uri, loaded.study_name)
        run_id = tracker.find_sweep_run()
        if run_id:
            tracker.log_report(written, run_id)  # only the files written, whatever else --output holds
            console.print(f"logged to MLflow run {run_id} under report/")


@app.command()
def dashboard(
    storage: Storage = None,
    host: Annotated[str, typer.Option(help="Interface to bind; 127.0.0.1 keeps it on this machine.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to serve on.")] = 8080,
) -> None:
    """Serve optuna-dashboard on the study storage: the trials, their states, values and parameter plots.

    The Optuna study is the truth about every trial; the MLflow runs that mirror it (metric
    curves, artifacts, promoted models) are in the MLflow UI: `hpo ui`.
    """
    from hpo.record import study as studies

    opened = studies.open_storage(storage)
    import optuna_dashboard

    console.print(f"Optuna dashboard on {studies.redact(opened.url)}: http://{host}:{port}  (Ctrl-C stops it)")
    optuna_dashboard.run_server(opened, host=host, port=port)


@app.command()
def ui(
    tracking_uri: Tracking = None,
    host: Annotated[str, typer.Option(help="Interface to bind; 127.0.0.1 keeps it on this machine.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to serve on.")] = 5000,
) -> None:
    """Serve the MLflow UI on the tracking store: the sweep's runs, metric curves, reports and registered models.

    Serves `mlflow server` (one worker) on a local store, or prints the links into a tracking
    server that runs already. The Optuna study itself (trials, parameter plots) is in
    optuna-dashboard: `hpo dashboard`.
    """
    from hpo.record.tracking import DEFAULT_TRACKING_URI, check_tracking, redact, sweep_links, ui_link

    uri = tracking_uri or DEFAULT_TRACKING_URI
    check_tracking(uri)  # a server that does not answer: one line, exit 2 (not minutes in MLflow's retries)
    served = uri.startswith(("http://", "https://"))
    base = redact(uri) if served else f"http://{host}:{port}"
    if served:
        console.print(f"{redact(uri)} is an MLflow server already: open {ui_link(base)}")
    else:
        console.print(f"MLflow UI on {redact(uri)}: {ui_link(base)}  (Ctrl-C stops it)")
    for study, link in sweep_links(uri, base):  # the runs table, not MLflow 3's GenAI overview
        console.print(f"  sweep {study}: {link}", highlight=False)
    if served:
        return
    sys.stdout.flush()
    # The store URI (password included) goes through the environment, which only this user
    # can read, never on the command line, which `ps` shows to everyone. exec replaces this
    # process, so a URI given as --tracking-uri leaves the command line too.
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["MLFLOW_BACKEND_STORE_URI"] = uri
    # MLflow's job runner (GenAI jobs, which sweeps never use) would start 7 more Python processes
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    # Never code from the current folder, where an mlflow.py or uvicorn.py would run with the
    # store password in its environment: -P and PYTHONSAFEPATH (for the `python -m uvicorn`
    # MLflow starts) keep the folder off sys.path, and uvicorn's --app-dir (else "", the
    # folder, put first) is the folder that holds the installed mlflow.
    env["PYTHONSAFEPATH"] = "1"
    import importlib.util
    import shlex
    from pathlib import Path

    packages = Path(importlib.util.find_spec("mlflow").origin).parents[1]  # type: ignore[union-attr, arg-type]
    command = [sys.executable, "-P", "-m", "mlflow", "server", "--host", host, "--port", str(port), "--workers", "1",
               "--uvicorn-opts", f"--app-dir {shlex.quote(str(packages))}"]
    os.execve(sys.executable, command, env)


def main() -> None:
    """Console-script entry point: one-line errors, exit 2 for bad input, never a secret (:mod:`hpo.secrets`)."""
    from hpo.secrets import scrub_known_secrets, secrets_off_the_command_line

    secrets_off_the_command_line()
    try:
        app()
    except HpoError as error:
        if _state["debug"]:
            raise
        err_console.print(f"error: {scrub_known_secrets(str(error))}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
    except Exception as error:  # noqa: BLE001 - a bug or an environment problem: say which, briefly
        if _state["debug"]:
            raise
        err_console.print(f"error: unexpected {type(error).__name__}: {scrub_known_secrets(str(error))} "
                          "(run `hpo --debug ...` for the traceback)",
                          markup=False, highlight=False, soft_wrap=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
