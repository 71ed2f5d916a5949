"""``hpo promote``: the best trial (or ``--trial N``) becomes the final training run.

The run re-applies the trial's parameters exactly (the ``config`` the sweep trained it
with, the sweep's recorded settings and seed), on all the training data (no
``train_limit``), for the full budget (3x the sweep's ``max_steps`` unless
``--set max_steps=N``). Its evaluation cadence and early stopping are scaled to that
budget (:func:`final_schedule`), and judge evaluations by the study's own ``metric`` in its
direction (ties to the lower eval_loss), not by eval_loss: a classifier's loss rises from
overconfidence while its accuracy still climbs. The weights of the best evaluation are
restored -- which is also how a sweep with ``objective="best"`` is honoured: the final run
trains on more data for longer than the trial, so the trial's ``best_step`` is recorded for
reference rather than trained to. Then:

1. the output folder is written whole or not at all (built in a staging folder beside
   it, then renamed: :mod:`hpo.run.atomic_folder`): the LoRA adapter in safetensors (or,
   with ``--merge``, the merged model), the tokenizer, ``hpo_promote.json`` and a model card
   ``README.md`` (:mod:`hpo.run.model_card`);
2. MLflow gets a run of its own in the study's experiment, tagged with the study, the
   trial and the sweep's parent run, with the metric history, the folder as artifacts,
   and a registered model version (``--register NAME``, default the study name).

Nothing here knows Ray (tests/test_boundaries.py holds it to that): the final run trains in
this process. It lives in ``hpo/run/`` all the same, beside ``hpo search``: ``run/`` holds the
two flows that train (a sweep, a final run), each driving ``train/`` and writing ``record/``.
"""

from __future__ import annotations

import dataclasses
import math
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from hpo.config import Sweep, resolve_paths
from hpo.errors import HpoError
from hpo.names import folder_for
from hpo.overrides import parse_overrides
from hpo.record import study as studies
from hpo.record.sweep_record import SweepRecord
from hpo.run import ranking
from hpo.run.atomic_folder import publish, remove_stale_staging, staging_folder
from hpo.run.model_card import load_code, trial_value, write_records

BUDGET_FACTOR = 3
EVALUATIONS = 20
"""About this many evaluations over a final run (never more often than the sweep evaluated)."""
PATIENCE_SHARE = 0.5
"""Early stopping ends a final run after this share of its steps without a better evaluation...
Half, not less: an evaluation set of a few hundred rows scores accuracy with a noise of about
a point, and on SST-2 (600 steps, 872 dev rows) a quarter stopped at step 360 at 0.839 while
the curve was still rising."""
MIN_SHARE = 0.5
"""... but never before this share of its steps."""


@dataclass
class PromoteOptions:
    study: str | None = None
    storage: str | None = None
    tracking_uri: str | None = None
    trial: int | None = None
    output: str | None = None
    overrides: list[str] = field(default_factory=list)
    merge: bool = False
    register: str | None = None


@dataclass(frozen=True)
class FinalSchedule:
    """How often a final run evaluates and when it may stop early."""

    eval_every: int
    patience: int
    """Evaluations without a better one before the run stops (0: never)."""
    min_steps: int
    """No early stop before this step."""


def final_schedule(max_steps: int, sweep_eval_every: int, *, eval_every: int | None = None,
                   patience: int | None = None) -> FinalSchedule:
    """Cadence and patience for a final run of ``max_steps``, whatever the sweep's length.

    Evaluate about :data:`EVALUATIONS` times, but never more often than the sweep did
    (``sweep_eval_every``) nor less than once; stop after :data:`PATIENCE_SHARE` of the steps
    without a better evaluation, never before :data:`MIN_SHARE` of them. ``eval_every`` and
    ``patience`` (in evaluations; 0 turns early stopping off), when the user gives them with
    ``--set``, are kept as they are. For example, a sweep at ``eval_every=20`` and a 600-step
    final run: every 30 steps, patience 10 evaluations (300 steps), not before step 300.
    """
    if eval_every is None:
        eval_every = min(max_steps, max(sweep_eval_every, math.ceil(max_steps / EVALUATIONS)))
    if patience is None:
        patience = max(1, math.ceil(PATIENCE_SHARE * max_steps / eval_every))
    return FinalSchedule(eval_every, patience, math.ceil(MIN_SHARE * max_steps))


@dataclass
class PromoteResult:
    output: Path
    run_id: str
    model_name: str
    model_version: str
    metrics: dict[str, float]
    trial_number: int
    load_code: str


def promote(options: PromoteOptions, console: Console) -> PromoteResult:
    study = studies.load(options.storage, options.study)
    recorded = SweepRecord.load(study)
    if recorded is None:
        raise HpoError(f"study {study.study_name!r} was not made by `hpo search`; nothing records how to train it")
    trial = _pick_trial(study, options.trial)
    sweep, schedule = _final_sweep(recorded, options.overrides)
    if recorded.custom_train:
        raise HpoError(
            f"study {study.study_name!r} trained with the module's own train(params, report) "
            f"({recorded.module}); hpo promote runs the built-in recipe only: train trial "
            f"{trial.number}'s params (`hpo best --study {study.study_name} --json`) with your own code"
        )
    from hpo.record.tracking import check_tracking
    from hpo.train.recipe import TrainJob

    _check_data(sweep)
    params = trial.user_attrs.get("config") or trial.params
    job = TrainJob.from_sweep(sweep, params).with_settings(train_limit=None, eval_every=schedule.eval_every,
                                                           patience=schedule.patience)
    job = dataclasses.replace(job, restore_best=True, min_steps=schedule.min_steps, watch=sweep.metrics[0],
                              watch_mode=ranking.mode(sweep))
    output = (Path(options.output) if options.output
              else folder_for(Path("promoted"), study.study_name, f"-trial{trial.number}")).resolve()
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise HpoError(f"--output {output}: the folder exists and is not empty; choose another or remove it")
    if not output.parent.is_dir():
        output.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(output)
    tracking_uri = options.tracking_uri or recorded.tracking_uri
    if tracking_uri and "***" in tracking_uri:
        raise HpoError("the study's MLflow URI has a hidden password: give it again with --tracking-uri")
    check_tracking(tracking_uri)
    model_name = options.register or _registry_name(study.study_name)

    from hpo.record.tracking import PromoteTracker

    tracker = PromoteTracker(tracking_uri, study.study_name)
    run_id = tracker.start(
        trial_number=trial.number, parent_run_id=recorded.mlflow_parent_run_id,
        params={**job.describe(), **params, "seed": job.seed, "max_steps": job.sweep.max_steps,
                "eval_every": job.sweep.eval_every, "patience": job.sweep.patience, "min_steps": job.min_steps,
                "watch": job.watch, "model": job.model, "train_data": job.sweep.train_data,
                "eval_data": job.sweep.eval_data or "", "merge": options.merge, "source_trial": trial.number},
    )
    at = f" at step {trial.user_attrs['best_step']}" if "best_step" in trial.user_attrs else ""
    stopping = (f"early stopping after {job.sweep.patience} evaluations without a better {job.watch} (not before "
                f"step {job.min_steps})" if job.sweep.patience else "no early stopping")
    console.print(f"[bold]hpo promote[/] study {study.study_name} trial {trial.number} "
                  f"({recorded.sweep['metric']}={trial_value(trial)}{at}): {job.sweep.max_steps} steps, evaluating "
                  f"every {job.sweep.eval_every}, {stopping}, the best {job.watch}'s weights kept; MLflow run {run_id}")
    staging = staging_folder(output)
    try:
        metrics = _train_and_save(job, sweep, params, options, study, trial, staging, tracker, console)
        publish(staging, output)
        tracker.log_folder(output)
        version = tracker.register(model_name, trial.number)
        tracker.finish(metrics, "FINISHED")
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        _finish_failed(tracker, error, console)
        raise
    return PromoteResult(output, run_id, model_name, version, metrics, trial.number,
                         load_code(output, sweep.task, options.merge, metrics.get("num_labels")))


def _pick_trial(study: Any, number: int | None) -> Any:
    from optuna.trial import TrialState

    if number is None and studies.is_multi_objective(study):
        front = [str(point["number"]) for point in studies.pareto_front(study)]
        raise HpoError(f"study {study.study_name!r} has several objectives and no single best trial; pick one of "
                       f"its Pareto front with --trial N (trials {', '.join(front) or 'none yet'}; `hpo best` lists them)")
    if number is None:
        best = studies.best_summary(study)
        if best is None:
            raise HpoError(f"study {study.study_name!r} has no COMPLETE trial to promote; run more trials "
                           f"(`hpo status --study {study.study_name}` shows why they ended)")
        number = best["number"]
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    if number not in trials:
        raise HpoError(f"--trial {number}: study {study.study_name!r} has trials 0..{len(trials) - 1}")
    trial = trials[number]
    if trial.state not in (TrialState.COMPLETE, TrialState.PRUNED):
        raise HpoError(f"--trial {number} is {trial.state.name}; promote a COMPLETE (or PRUNED) trial")
    return trial


def _final_sweep(recorded: SweepRecord, overrides: list[str]) -> tuple[Sweep, FinalSchedule]:
    """The sweep as it ran, then ``--set`` on top; the budget grows unless max_steps is set,
    and the evaluation cadence and patience follow the budget (:func:`final_schedule`)
    unless eval_every or patience is set. The sweep's own ``patience`` was for its trials."""
    values = dict(recorded.sweep)
    chosen = parse_overrides(overrides)
    if "max_steps" not in chosen:
        values["max_steps"] = values["max_steps"] * BUDGET_FACTOR
    max_steps, every = chosen.get("max_steps", values["max_steps"]), chosen.get("eval_every", 1)
    schedule = FinalSchedule(values["eval_every"], 0, 0)
    if all(isinstance(n, int) and n >= 1 for n in (max_steps, every)):  # else Sweep refuses them, below
        schedule = final_schedule(max_steps, values["eval_every"], eval_every=chosen.get("eval_every"),
                                  patience=chosen.get("patience"))
        values.update(max_steps=max_steps, eval_every=schedule.eval_every, patience=None)
    try:
        sweep = dataclasses.replace(Sweep(**values), **chosen)
    except HpoError as error:
        raise HpoError(f"hpo promote: {error}") from None
    return resolve_paths(sweep, Path.cwd()), schedule


def _check_data(sweep: Sweep) -> None:
    """Read every data source the final run will use (training, validation, test) before
    anything is trained or recorded: a bad ``test_data`` found only after training would
    throw the trained model away. The error names the field to fix."""
    from hpo.train import data, sft

    for name in ("train_data", "eval_data", "test_data"):
        source = getattr(sweep, name)
        if not source:
            continue
        try:
            if sweep.task == "sft":
                sft.read(source)
            else:
                data.read(source, sweep.task, sweep.text_column, sweep.label_column)
        except HpoError as error:
            message = str(error).replace("check --set train_data/eval_data", f"fix --set {name}=...")
            raise HpoError(f"hpo promote: {name}: {message}") from None


def _finish_failed(tracker: Any, error: BaseException, console: Console) -> None:
    """Close the MLflow run as FAILED; if MLflow fails too, say so and let the original error
    (the one the caller re-raises) be the one reported."""
    try:
        tracker.finish({}, "FAILED")
    except Exception as finish_error:  # noqa: BLE001 - never hide ``error``
        if sys.version_info >= (3, 11):  # add_note is 3.11's; on 3.10 the warning below says it alone
            error.add_note(f"(also: the MLflow run could not be closed: {type(finish_error).__name__}: {finish_error})")
        console.print(f"[yellow]warning:[/] the MLflow run could not be closed as FAILED "
                      f"({type(finish_error).__name__}); the error that stopped hpo promote follows", highlight=False)


def _train_and_save(job: Any, sweep: Sweep, params: dict, options: PromoteOptions, study: Any, trial: Any,
                    staging: Path, tracker: Any, console: Console) -> dict[str, float]:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from hpo.train import evaluation, training, worker_cache
    from hpo.train.reporter import Report

    saved: dict[str, Any] = {}
    started = time.perf_counter()

    def save(model: Any, tokenizer: Any) -> None:
        if sweep.test_data:
            saved["test"] = evaluation.evaluate_source(job, model, tokenizer, sweep.test_data)
        if sweep.task == "sft":  # the saved folder formats and generates as the trials did
            from hpo.train import sft

            tokenizer.chat_template = sft.chat_template(job.model, tokenizer, job.sweep.chat_template)
            model.config.use_cache = True
        if options.merge:  # onto an unquantized copy of the base when it trained quantized
            worker_cache.merged(job, model, tokenizer).save_pretrained(staging)
        else:
            model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        saved["num_labels"] = getattr(model.config, "num_labels", None) if sweep.task == "classification" else None

    try:
        with Progress(TextColumn("[bold]training"), BarColumn(), TextColumn("step {task.completed}/{task.total}"),
                      TextColumn("{task.fields[shown]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                      console=console, transient=False) as progress:
            task = progress.add_task("train", total=job.sweep.max_steps, shown="")

            def show(step: int, metrics: dict[str, float]) -> None:
                tracker.log_metrics(step, metrics)
                shown = f"{sweep.metrics[0]}={metrics[sweep.metrics[0]]:.4f} eval_loss={metrics['eval_loss']:.4f}"
                progress.update(task, completed=step, shown=shown)

            final = training.fine_tune(job, Report(sweep.metrics, show), on_trained=save, score=_module_score(sweep, study),
                                       on_start=lambda settings: tracker.log_params(
                                           {k: settings[k] for k in ("device", "precision")}))
            progress.update(task, completed=job.sweep.max_steps)
        metrics = {k: v for k, v in final.items() if isinstance(v, (int, float))}
        metrics["train_minutes"] = (time.perf_counter() - started) / 60
        metrics.update({f"test_{k.removeprefix('eval_')}": v for k, v in saved.get("test", {}).items()})
        if saved.get("num_labels"):
            metrics["num_labels"] = saved["num_labels"]
        write_records(staging, job, sweep, params, options.merge, study, trial, metrics)
        return metrics
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _module_score(sweep: Sweep, study: Any) -> Any:
    """The search-space module's own ``score`` (task sft), if its file still loads."""
    record = SweepRecord.load(study)
    module = record.module if record else None
    if sweep.task != "sft" or not module or not Path(module).is_file():
        return None
    from hpo import space

    return space.load(module).score


def _registry_name(study_name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", study_name).strip("-") or "hpo-model"
