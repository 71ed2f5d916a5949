"""``hpo search``: check everything, open the study and the MLflow experiment, run the
trials on Ray, and close every record truthfully.

The order matters: the module, its sampled parameters, the data and the model are checked
before any storage is opened, so bad input writes nothing; a crashed earlier sweep is
cleaned up (stale RUNNING trials failed, their MLflow runs KILLED) before new trials start.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

from hpo import space as spaces
from hpo.errors import HpoError
from hpo.record import study as studies
from hpo.run.ranking import pruned_on
from hpo.train import data, models

if TYPE_CHECKING:
    import optuna

    from hpo.analysis.checks_report import DataReport
    from hpo.config import Sweep
    from hpo.record.ledger import Ledger
    from hpo.record.mirror import JobParams
    from hpo.record.recorder import Recorder
    from hpo.record.sweep_tracker import SweepTracker
    from hpo.train.lr_probe import Choice


@dataclass
class SearchOptions:
    """The command line's settings for one ``hpo search`` (beyond ``--set``)."""

    module: str
    overrides: list[str] = dataclasses.field(default_factory=list)
    study: str | None = None
    storage: str | None = None
    tracking_uri: str | None = None
    trials: int | None = None
    timeout: float | None = None
    address: str | None = None
    concurrency: int | None = None
    retries: int = 0
    skip_data_check: bool = False
    worker_logs: bool = False
    workdir: str = ".hpo"
    warm_start: str | None = None
    """``STUDY[@STORAGE]``: enqueue that study's best configs first (see :mod:`hpo.record.warmstart`)."""
    warm_start_top: int = 5
    more: int | None = None
    """Run this many more finished trials than the study holds now (instead of ``trials``)."""


@dataclass
class SearchResult:
    study_name: str
    storage: str
    tracking_uri: str
    counts: dict[str, int]
    best: dict[str, Any] | None
    ran: int
    fail_reasons: dict[str, int] = dataclasses.field(default_factory=dict)
    front: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    """A multi-objective sweep's Pareto front (see :func:`hpo.record.study.pareto_front`)."""
    interrupted: list[int] = dataclasses.field(default_factory=list)
    """Trials this run stopped unfinished (Ctrl-C): they run again on the next run."""
    report_page: Path | None = None
    """The study report's HTML page (also logged to the parent MLflow run)."""
    ended: str = "done"
    """done (the study holds its target), timeout, interrupted (Ctrl-C) or short (see ``short_reason``)."""
    short_reason: str | None = None
    """Why the study ended short of --trials for a reason other than --timeout or Ctrl-C."""
    finished: int = 0
    target: int = 0


def prepare(options: SearchOptions, console: Console | None = None) -> spaces.SearchSpace:
    """Load and check the module, its overrides, one sample of its space, data and model."""
    extra = list(options.overrides)
    if options.more is not None and options.trials is not None:
        raise HpoError(f"--trials {options.trials} and --more {options.more}: give one (--trials: the study's total "
                       "finished trials; --more: that many more than it holds now)")
    if options.trials is not None:
        extra.append(f"trials={options.trials}")
    if options.timeout is not None:
        extra.append(f"timeout={options.timeout}")
    if options.concurrency is not None:
        extra.append(f"concurrency={options.concurrency}")
    search_space = spaces.load(options.module, extra)
    spaces.sample_check(search_space)
    sweep = search_space.sweep
    if search_space.train is None:
        if not sweep.train_data:
            raise HpoError(f"{search_space.path}: sweep field train_data is empty; the built-in recipe needs "
                           "training data (set it in the module or with --set train_data=...)")
        from hpo.train.recipe import check_metrics, check_placement

        problem = check_metrics(sweep) or check_placement(sweep)
        if problem:
            raise HpoError(f"{search_space.path}: {problem}")
        models.check_available(sweep.model)
        if sweep.task == "sft":
            _check_sft(search_space, options, console)
        else:
            _check_data(search_space, options, console)
    if sweep.lr_probe:
        from hpo.run import lr_probe

        lr_probe.check(search_space)
    return search_space


def _check_sft(search_space: spaces.SearchSpace, options: SearchOptions, console: Console | None) -> None:
    """Task sft: a metric the module can produce, the data check (tokens counted with the
    model's tokenizer and chat template), then :func:`hpo.train.sft.check` (the test data too)."""
    from transformers import AutoTokenizer

    from hpo.train import sft

    sweep = search_space.sweep
    if "eval_score" in sweep.metrics and search_space.score is None:
        raise HpoError(f"{search_space.path}: metric eval_score needs a function score(prediction, reference) "
                       "-> float in the module; define one, or use --set metric=eval_exact_match")
    tokenizer = AutoTokenizer.from_pretrained(models.resolve(sweep.model))
    _check_data(search_space, options, console, tokenizer)
    sft.check(sweep, tokenizer)


def check_data(sweep: Sweep, tokenizer: Any = None) -> DataReport:
    """The data-quality report for the sweep's data (see :mod:`hpo.analysis.checks`); for task sft,
    formatted with the sweep's chat template when ``tokenizer`` is given."""
    from hpo.analysis.checks import check_data as run_checks

    template = None
    if sweep.task == "sft" and tokenizer is not None:
        from hpo.train import sft

        template = sft.chat_template(sweep.model, tokenizer, sweep.chat_template)
    return run_checks(sweep.train_data, sweep.eval_data, task=sweep.task, text_column=sweep.text_column,
                      label_column=sweep.label_column, max_length=sweep.max_length,
                      eval_fraction=sweep.eval_fraction, tokenizer=tokenizer, chat_template=template)


def _check_data(search_space: spaces.SearchSpace, options: SearchOptions, console: Console | None,
                tokenizer: Any = None) -> None:
    """Abort on data errors (before anything is written); show warnings and go on."""
    sweep = search_space.sweep
    if options.skip_data_check:
        if sweep.task != "sft":  # sft.check reads sft data
            data.read(sweep.train_data, sweep.task, sweep.text_column, sweep.label_column)
    else:
        findings = check_data(sweep, tokenizer)
        if findings.errors:
            shown = " | ".join(f"{f.source}: {f.message}" + (f" (rows {', '.join(map(str, f.rows))})" if f.rows else "")
                               for f in findings.errors[:3])
            raise HpoError(f"the data check found {len(findings.errors)} error(s): {shown}; fix the data, or run "
                           f"`hpo check-data {search_space.path.name}` for the full report, or --skip-data-check")
        if console is not None:
            for finding in findings.warnings:
                console.print(f"[yellow]data warning:[/] {finding.source}: {finding.message}", highlight=False)
    if sweep.synonyms:
        from hpo.train.augment import load_synonyms

        load_synonyms(sweep.synonyms)


def search(options: SearchOptions, console: Console) -> SearchResult:
    """Run one sweep to its target number of finished trials (or its timeout)."""
    from hpo.names import check_study_name
    from hpo.record.ledger import Ledger
    from hpo.record.sweep_tracker import SweepTracker
    from hpo.record.tracking import check_tracking

    search_space = prepare(options, console)
    sweep = search_space.sweep
    name = check_study_name(options.study or search_space.default_study_name)
    from hpo.analysis import study_report
    from hpo.run import cluster, scheduling

    threading.Thread(target=study_report.preload, name="hpo-report-imports", daemon=True).start()

    _check_writable(options)  # a read-only folder: said at once
    # Ray's resources and the trial's device before either store is written
    cluster.preflight(sweep, address=options.address or os.environ.get("RAY_ADDRESS"),
                      recipe=search_space.train is None, worker_logs=options.worker_logs)
    studies.check_storage(options.storage)  # both stores reachable before either is written
    check_tracking(options.tracking_uri)
    warm_source = _open_warm_source(options, name)
    from hpo.record.sqlite import use_wal

    use_wal()  # the driver's SQLite stores commit without waiting for the disk (see hpo/record/sqlite.py)
    # MLflow first: a tracking server that refuses the credentials must stop the sweep
    # before the study is created (the storage itself was checked above).
    tracker = SweepTracker(options.tracking_uri, name)
    storage = studies.open_storage(options.storage, concurrency=sweep.concurrency or os.cpu_count())
    study = studies.create_or_resume(storage, name, sweep.directions,
                                     studies.make_sampler(sweep.sampler, sweep.seed, sweep.trials), metrics=sweep.metrics)
    ledger = Ledger(study, lambda trial: spaces.call_space(search_space, trial), target=sweep.trials,
                    retries=options.retries)
    with ledger.lock:
        # The n-th process to run this study seeds its sampler with seed + n: a new study is
        # reproducible, while a resumed or shared one does not replay the samples it has.
        run_index = studies.next_run_index(study)
    study.sampler = studies.make_sampler(sweep.sampler, sweep.seed + run_index, sweep.trials)

    from hpo.record.mirror import mirror_gaps
    from hpo.record.recorder import Recorder
    from hpo.record.sweep_record import SweepRecord
    from hpo.train.recipe import TrainJob

    def job_params(params: dict[str, Any]) -> dict[str, Any]:
        """The full job a worker trains with (defaults filled in), for the trial's MLflow run."""
        return TrainJob.from_sweep(sweep, params).describe()

    job = None if search_space.train else job_params
    reclaimed = ledger.reclaim()
    closed = mirror_gaps(study, tracker, metric=sweep.metrics[0], job_params=job)
    if reclaimed or closed:
        console.print(f"[yellow]cleaned up after an interrupted sweep:[/] trials {reclaimed or '-'} failed as "
                      f"interrupted (they run again), MLflow runs of trials {closed or '-'} written from the study")
    already = ledger.finished()
    record = SweepRecord.load(study)
    earlier = record.sweep.get("objective", "last") if record else "last"
    if already and earlier != sweep.objective:
        raise HpoError(f"study {name!r} holds trials valued by objective={earlier}, but this sweep has "
                       f"objective={sweep.objective}: their values would mean different things; "
                       f"use --set objective={earlier} or another --study name")
    if options.more is not None:  # a nightly run: K more finished trials than the study holds now
        sweep = dataclasses.replace(sweep, trials=already + options.more)
        ledger.target = sweep.trials
    probed = _probe_learning_rate(study, search_space, ledger, console) if already < sweep.trials else None
    if warm_source is not None and already < sweep.trials:
        from hpo.record.warmstart import warm_start

        with ledger.lock:
            warmed = warm_start(study, warm_source[0], warm_source[1], options.warm_start_top, ledger.space,
                                room=sweep.trials - already)
        for line in warmed.lines():
            console.print(f"[cyan]{line}[/]" if not line.startswith("  ") else line, highlight=False)
    result = SearchResult(name, studies.redact(storage.url), tracker.shown_uri, {}, None, 0)
    if already >= sweep.trials:
        console.print(f"study {name!r} already has {already} finished trials (target {sweep.trials}); "
                      f"raise --trials to run more")
        result.counts, result.best = studies.state_counts(study), studies.best_summary(study)
        result.front = studies.pareto_front(study) if sweep.is_multi_objective else []
        return result

    sweep_params = {k: v for k, v in sweep.to_dict().items() if k != "extra"}
    with ledger.lock:  # one parent run per study, even when several processes start at once
        parent = tracker.start_sweep(
            {**sweep_params, "module": str(search_space.path), "study": name},
            {"hpo.storage": result.storage, "hpo.module": str(search_space.path)},
        )
        SweepRecord(module=str(search_space.path), sweep=sweep_params, tracking_uri=result.tracking_uri,
                    mlflow_experiment_id=tracker.experiment_id, mlflow_parent_run_id=parent,
                    custom_train=search_space.train is not None,
                    priors={name: prior.to_dict() for name, prior in search_space.priors.items()}).save(study)
    if probed is not None:
        from hpo.run import lr_probe

        tracker.note_sweep(*lr_probe.mlflow_notes(probed))
    console.print(f"[bold]hpo search[/] {search_space.path.name}: study [bold]{name}[/] in {result.storage}, "
                  f"MLflow {result.tracking_uri}; {sweep.trials - already} trials to go "
                  f"({sweep.max_steps} steps, evaluate every {sweep.eval_every}, pruner {sweep.pruner}"
                  f"{f' on {pruned_on(sweep)}' if sweep.pruner != 'none' and pruned_on(sweep) != sweep.metric else ''}"
                  f"{_rungs(sweep)}"
                  f"{', a trial is worth its best evaluation' if sweep.objective == 'best' else ''}"
                  f"{f', Pareto front of {sweep.metric} ({sweep.direction})' if sweep.is_multi_objective else ''})")

    from hpo.run.progress import SweepDisplay

    deadline = time.time() + sweep.timeout if sweep.timeout else None
    best = studies.best_summary(study)
    display = SweepDisplay(console, study=name, metric=sweep.metrics[0], direction=sweep.directions[0], target=sweep.trials,
                           max_steps=sweep.max_steps, already=already,
                           best=(best["number"], best["value"]) if best else None)
    recorder = Recorder(ledger, tracker, display, metrics=sweep.metrics, deadline=deadline, job_params=job,
                        objective=sweep.objective, direction=sweep.directions[0])
    status, hard_stop = "FINISHED", False
    # The first Ctrl-C from here on starts no new trial and stops the running ones (they run
    # again on the next run), then the records are closed; a second one stops at once.
    with scheduling.ctrl_c_stops_the_sweep(recorder):
        try:
            with display:
                scheduling.run(
                    recorder, sweep, search_space.train, address=options.address or os.environ.get("RAY_ADDRESS"),
                    module=search_space.module, storage_path=str(Path(options.workdir).resolve() / "ray_results"),
                    name=name, worker_logs=options.worker_logs, score=search_space.score,
                )
        except KeyboardInterrupt:  # a second Ctrl-C: stop at once
            status, hard_stop = "KILLED", True
            raise
        finally:
            recorder.close_leftovers()
            _flush_mirror(study, tracker, sweep.metrics[0], job, console)
            _ending(result, recorder, ledger.finished(), sweep.trials)
            if result.ended == "interrupted":
                status = "KILLED"
            elif result.ended == "short":
                status = "FAILED"
            result.counts, result.best = studies.state_counts(study), studies.best_summary(study)
            result.ran = recorder.started
            result.front = studies.pareto_front(study) if sweep.is_multi_objective else []
            result.fail_reasons = studies.fail_reasons(study)
            if hard_stop:  # the plots can wait
                console.print(f"stopped at once (a second Ctrl-C): no study report; `hpo report --study {name}` "
                              "writes it", highlight=False)
            else:
                result.report_page = _write_study_report(study, tracker, Path(options.workdir), console)
            tracker.end_sweep(status, summary={"finished": ledger.finished(),
                                               **({"best_value": result.best["value"],
                                                   "best_trial": result.best["number"]} if result.best else {}),
                                               **({"pareto_front": ",".join(str(p["number"]) for p in result.front)}
                                                  if result.front else {})})
    return result


def _rungs(sweep: Sweep) -> str:
    """Where ASHA judges trials, for the sweep's first line: `` from step 20`` (and its brackets)."""
    if sweep.pruner == "none":
        return ""
    return f" from step {sweep.first_rung}" + (f", {sweep.brackets} brackets" if sweep.brackets > 1 else "")


def _probe_learning_rate(study: optuna.Study, search_space: spaces.SearchSpace, ledger: Ledger,
                         console: Console) -> Choice | None:
    """``lr_probe``: the study's learning-rate range, recorded or probed now (:mod:`hpo.run.lr_probe`), given
    to every ``space(trial)`` of this run from here on (a :class:`hpo.space.NarrowedTrial`); its
    :class:`~hpo.train.lr_probe.Choice`, or None when the sweep does not probe."""
    from hpo.run import lr_probe

    choice, said = lr_probe.for_study(study, search_space, ledger.lock)
    if said:
        console.print(said, highlight=False)
    if choice is None:
        return None
    bounds = (choice.low, choice.high)
    ledger.space = lambda trial: spaces.call_space(search_space, spaces.NarrowedTrial(trial, bounds))
    return choice


def _check_writable(options: SearchOptions) -> None:
    """Both stores' SQLite files and the working folder (.hpo: Ray's results, the report)
    can be written, before anything is: from a read-only folder a sweep used to fail with
    an unexpected PermissionError after the study existed."""
    from hpo.record.stores import check_writable, why_not_writable
    from hpo.record.tracking import DEFAULT_TRACKING_URI

    check_writable(options.storage or studies.DEFAULT_STORAGE, "--storage")
    check_writable(options.tracking_uri or DEFAULT_TRACKING_URI, "--tracking-uri")
    workdir = Path(options.workdir).resolve()
    existing = next(folder for folder in (workdir, *workdir.parents) if folder.exists())
    if not os.access(existing, os.W_OK):
        raise HpoError(f"{workdir}: cannot write hpo's working folder (Ray's results, the study report) in "
                       f"{existing} ({why_not_writable(str(existing))}); run hpo from a folder you can write")


def _flush_mirror(study: optuna.Study, tracker: SweepTracker, metric: str, job: JobParams | None,
                  console: Console) -> None:
    """Wait for the MLflow writes of this run's trials; rewrite from the study the runs of
    trials whose writes failed (a warning if that fails too: the next run tries again). A
    store that is down is not waited for (see :meth:`hpo.record.sweep_tracker.SweepTracker.end_call`)."""
    from hpo.record.mirror import mirror_gaps

    tracker.flush(final=True)
    if tracker.unwritten:
        numbers = sorted(tracker.unwritten)
        try:
            tracker.end_call(lambda: mirror_gaps(study, tracker, metric=metric, job_params=job, only=set(numbers)),
                             "writing trial runs from the study")
            tracker.unwritten.clear()
        except Exception as error:  # noqa: BLE001 - the study holds the truth; the next run writes it
            said = str(error).splitlines()[0][:200] if str(error) else ""
            console.print(f"[yellow]warning:[/] the MLflow runs of trials {numbers} could not be written "
                          f"({type(error).__name__}: {said}); the study holds them, and the next `hpo search` on "
                          f"study {study.study_name!r} writes them from it", highlight=False)


def _ending(result: SearchResult, recorder: Recorder, finished: int, target: int) -> None:
    """How the sweep ended: the study full, --timeout, Ctrl-C, or short for another reason."""
    result.finished, result.target = finished, target
    if finished >= target:
        result.ended, result.interrupted = "done", []
    elif recorder.interrupt_requested:  # Ctrl-C, whatever else happened meanwhile
        result.ended, result.interrupted = "interrupted", list(recorder.interrupted)
    elif recorder.stop_reason:
        result.ended, result.short_reason = "short", recorder.stop_reason
    elif recorder.timed_out:
        result.ended = "timeout"
    elif not recorder.done:
        result.ended, result.interrupted = "interrupted", list(recorder.interrupted)
    else:
        result.ended, result.short_reason = "short", "no trial could be started"


def _open_warm_source(options: SearchOptions, name: str) -> tuple[Any, str] | None:
    """The earlier study of ``--warm-start STUDY[@STORAGE]`` and how to name it in output
    (password hidden); checked before this sweep's study is created."""
    if not options.warm_start:
        return None
    from hpo.record.warmstart import parse_source

    source_name, source_storage = parse_source(options.warm_start, options.storage)
    label = f"{source_name}@{studies.redact(source_storage or studies.DEFAULT_STORAGE)}"
    sqlite_file = (source_storage or studies.DEFAULT_STORAGE).removeprefix("sqlite:///")
    if sqlite_file != (source_storage or studies.DEFAULT_STORAGE) and not Path(sqlite_file).is_file():
        raise HpoError(f"--warm-start {label}: the file {sqlite_file} does not exist; give STUDY@sqlite:///PATH")
    if source_storage == options.storage and source_name == name:
        raise HpoError(f"--warm-start {label}: that is this sweep's own study; name an earlier one")
    try:
        source = studies.load(source_storage, source_name)
    except HpoError as error:
        raise HpoError(f"--warm-start {label}: {error}") from None
    return source, label


def _write_study_report(study: optuna.Study, tracker: SweepTracker, workdir: Path, console: Console) -> Path | None:
    """Write the study report and log it to the sweep's parent run; a failure here only warns."""
    try:
        from hpo.analysis.study_report import write_report
        from hpo.names import folder_for

        folder = folder_for(workdir / "reports", study.study_name).resolve()
        files = write_report(study, folder)
    except Exception as error:  # noqa: BLE001 - the trials are recorded; the pictures are a bonus
        console.print(f"[yellow]warning:[/] the study report could not be written ({type(error).__name__}: {error}); "
                      f"`hpo report --study {study.study_name}` tries again")
        return None
    try:
        tracker.log_report(files)
    except Exception as error:  # noqa: BLE001 - the report is on disk; MLflow gets it later
        said = str(error).splitlines()[0][:200] if str(error) else ""
        console.print(f"[yellow]warning:[/] the study report is in {folder} but not in MLflow ({type(error).__name__}: "
                      f"{said}); `hpo report --study {study.study_name}` logs it", highlight=False)
    return folder / "report.html"
