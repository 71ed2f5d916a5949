"""The strong label probe (``hpo check-data --labels --study NAME``): the study's best trial,
cross-fitted through the built-in recipe.

The labelled rows are split into 5 stratified folds (``FOLDS``); for each, the recipe
(:func:`hpo.train.training.fine_tune`) trains a fresh adapter with the best trial's params on
the other four folds and gives class probabilities for the held-out fold, so every row is
scored by a model that never saw it. A sweep's trials are short (they only have to rank
configs), so each fold's run is given at least ``EPOCHS`` passes over its rows, and it stops
early on a slice of its own training part (``STOP_FRACTION``): trained on, a model learns the
wrong labels it is given too, and then vouches for them. :mod:`hpo.analysis.label_issues`
averages these probabilities with the quick probe's (an ensemble, weighted by each one's
out-of-fold accuracy, as cleanlab does) and hands them to cleanlab. It trains five times:
minutes on a CPU per thousand rows; ``max_steps`` sets each run's length instead.
"""

from __future__ import annotations

import csv
import dataclasses
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import optuna

    from hpo.config import Sweep
    from hpo.train.recipe import TrainJob

FOLDS = 5
STOP_FRACTION = 0.1
"""Share of each fold's training part held back to stop on: the run ends at its lowest loss there."""
EVALUATIONS = 10
"""Evaluations on that slice per fold's run (every ``max_steps / EVALUATIONS`` steps)."""
PATIENCE = 4
"""Evaluations without a lower loss on the slice before a fold's run stops."""
EPOCHS = 3
"""Unless ``max_steps`` is given, each fold's run is long enough for this many passes over its
training part (or the sweep's ``max_steps``, if longer): a sweep's short trials rank configs,
but a probe that has not converged scores every row near the class shares."""


def strong_probe(sweep: Sweep, params: dict[str, Any], texts: list[str], labels: list[int], *,
                 folds: int = FOLDS, max_steps: int | None = None, seed: int = 0) -> Any:
    """Out-of-fold class probabilities, shape (rows, classes), from the recipe run with ``params``
    on each fold's complement; ``labels`` are 0..K-1. Each run takes ``max_steps`` steps, or by
    default the longer of the sweep's ``max_steps`` and ``EPOCHS`` passes over its training rows.

    Each fold's training part keeps ``STOP_FRACTION`` of its rows (stratified) apart: the run is
    evaluated on them ``EVALUATIONS`` times, stops after ``PATIENCE`` evaluations without a lower
    loss, and predicts with the weights of its best one. A run that goes on past that point
    starts to fit the wrong labels it was given, and a fitted wrong label is one the held-out fold's
    model would agree with less confidently elsewhere."""
    import numpy as np
    from sklearn.model_selection import StratifiedKFold, train_test_split

    from hpo.train.recipe import TrainJob

    classes = max(labels) + 1
    probabilities = np.zeros((len(texts), classes), dtype=np.float64)
    base = TrainJob.from_sweep(sweep, params)
    batch = int(base.params.batch_size)
    with tempfile.TemporaryDirectory(prefix="hpo-label-probe-") as folder:
        splitter = StratifiedKFold(folds, shuffle=True, random_state=seed)
        for fold, (kept, held) in enumerate(splitter.split(np.zeros(len(labels)), labels)):
            fit, stop = train_test_split(kept, test_size=max(classes, round(len(kept) * STOP_FRACTION)),
                                         random_state=seed, stratify=[labels[i] for i in kept])
            steps = max_steps or fold_steps(base.sweep.max_steps, batch, len(fit))
            probabilities[held] = fit_and_predict(
                base, [(labels[i], texts[i]) for i in fit], [(labels[i], texts[i]) for i in stop],
                [texts[i] for i in held], steps, Path(folder) / str(fold))[:, :classes]
    return probabilities / probabilities.sum(1, keepdims=True)


def fit_and_predict(base: TrainJob, train: list[tuple[int, str]], stop: list[tuple[int, str]], texts: list[str],
                    steps: int, folder: Path) -> Any:
    """One run of the recipe with ``base``'s params on the ``(label, text)`` rows of ``train``, for
    ``steps`` steps, evaluated ``EVALUATIONS`` times on ``stop`` and ended after ``PATIENCE``
    evaluations without a lower loss there; returns the class probabilities its best weights give
    ``texts``, shape (len(texts), the model's classes). ``folder`` takes the rows' files."""
    from hpo.train import training

    folder.mkdir(parents=True, exist_ok=True)
    files = {name: folder / f"{name}.tsv" for name in ("train", "stop")}
    for name, rows in (("train", train), ("stop", stop)):
        with files[name].open("w", newline="", encoding="utf-8") as handle:  # csv quotes what needs it
            writer = csv.writer(handle, delimiter="\t")
            writer.writerow(("label", "text"))
            writer.writerows(rows)
    job = dataclasses.replace(base, restore_best=True, watch="eval_loss", watch_mode="min", min_steps=0)
    job = job.with_settings(train_data=str(files["train"]), eval_data=str(files["stop"]), text_column="text",
                            label_column="label", train_limit=None, max_steps=steps,
                            eval_every=max(steps // EVALUATIONS, 1), patience=PATIENCE,
                            grace_period=None)  # ASHA's first rung: not past these steps
    out: list[Any] = []

    def predict(model: Any, tokenizer: Any) -> None:
        out.append(_predict(model, tokenizer, texts, base.sweep.max_length, base.sweep.eval_batch_size))

    training.fine_tune(job, lambda step, metrics: None, on_trained=predict)
    return out[0]


def fold_steps(max_steps: int, batch_size: int, rows: int) -> int:
    """The steps of one fold's run when none are chosen: the longer of ``max_steps`` and ``EPOCHS``
    passes over ``rows`` training rows in batches of ``batch_size``."""
    return max(max_steps, -(-EPOCHS * rows // batch_size))


def planned_steps(sweep: Any, params: dict[str, Any], rows: int, folds: int = FOLDS) -> int:
    """About the steps each fold's run of :func:`strong_probe` takes for ``rows`` labelled rows
    (before early stopping), for the message that announces it."""
    training_rows = rows - rows // folds
    return fold_steps(sweep.max_steps, int(params.get("batch_size", 16)),
                      training_rows - max(2, round(training_rows * STOP_FRACTION)))


def _predict(model: Any, tokenizer: Any, texts: list[str], max_length: int, batch: int) -> Any:
    import numpy as np
    import torch

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(texts), batch):
            encoded = tokenizer(texts[start:start + batch], padding=True, truncation=True, max_length=max_length,
                                return_tensors="pt").to(device)
            out.append(torch.softmax(model(**encoded).logits.float(), dim=-1).cpu().numpy())
    model.train(was_training)
    return np.concatenate(out)


def best_trial_setup(study: optuna.Study, overrides: list[str]) -> tuple[Sweep, dict[str, Any], int, str | None]:
    """The sweep as the study ran it (``--set`` on top: ``max_steps`` sets each fold's run),
    the best trial's params, its number, and the sweep's MLflow tracking URI (None when the
    record hides a password in it). Raises HpoError for a study ``hpo search`` did not
    make, one trained by the module's own ``train``, or one with no COMPLETE trial."""
    from hpo.config import Sweep
    from hpo.errors import HpoError
    from hpo.overrides import parse_overrides
    from hpo.record import study as studies
    from hpo.record.sweep_record import SweepRecord

    recorded = SweepRecord.load(study)
    if recorded is None:
        raise HpoError(f"--study {study.study_name}: not made by `hpo search`; nothing records how to train it")
    if recorded.custom_train:
        raise HpoError(f"--study {study.study_name}: trained with the module's own train(params, report); the strong "
                       "probe runs the built-in recipe only: drop --study for the quick probe")
    best = studies.best_summary(study)
    if best is None:
        raise HpoError(f"--study {study.study_name}: no single best COMPLETE trial to cross-fit; run more trials, "
                       "or drop --study for the quick probe")
    chosen = parse_overrides(overrides)
    if isinstance(chosen.get("max_steps"), int) and "eval_every" not in chosen:  # each fold evaluates at its end
        chosen["eval_every"] = min(int(recorded.sweep.get("eval_every", 1)), max(chosen["max_steps"], 1))
    try:
        sweep = dataclasses.replace(Sweep(**recorded.sweep), **chosen)
    except (TypeError, ValueError) as error:
        raise HpoError(f"--study {study.study_name}: its recorded sweep cannot be rebuilt ({error})") from None
    uri = recorded.tracking_uri if recorded.tracking_uri and "***" not in recorded.tracking_uri else None
    return sweep, best["config"], best["number"], uri
