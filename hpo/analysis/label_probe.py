"""The strong label probe (``hpo check-data --labels --study NAME``): the study's best trial,
cross-fitted through the built-in recipe.

The labelled rows are split into 5 stratified folds (``FOLDS``); for each, the recipe
(:func:`hpo.train.training.fine_tune`) trains a fresh adapter with the best trial's params on
the other four folds and gives class probabilities for the held-out fold, so every row is
scored by a model that never saw it. :mod:`hpo.analysis.label_issues` hands them to cleanlab
as it does the quick probe's. It trains five times: minutes on a CPU per thousand rows at a
sweep's usual budget; ``max_steps`` shortens each run.
"""

from __future__ import annotations

import csv
import dataclasses
import tempfile
from pathlib import Path
from typing import Any

FOLDS = 5


def strong_probe(sweep: Any, params: dict[str, Any], texts: list[str], labels: list[int], *,
                 folds: int = FOLDS, max_steps: int | None = None, seed: int = 0) -> Any:
    """Out-of-fold class probabilities, shape (rows, classes), from the recipe run with ``params``
    on each fold's complement; ``labels`` are 0..K-1."""
    import numpy as np
    from sklearn.model_selection import StratifiedKFold

    from hpo.train import training
    from hpo.train.recipe import TrainJob

    classes = max(labels) + 1
    probabilities = np.zeros((len(texts), classes), dtype=np.float64)
    base = TrainJob.from_sweep(sweep, params)
    steps = max_steps or base.sweep.max_steps
    with tempfile.TemporaryDirectory(prefix="hpo-label-probe-") as folder:
        splitter = StratifiedKFold(folds, shuffle=True, random_state=seed)
        for fold, (kept, held) in enumerate(splitter.split(np.zeros(len(labels)), labels)):
            train_file, held_file = Path(folder) / f"train{fold}.tsv", Path(folder) / f"held{fold}.tsv"
            for path, rows in ((train_file, kept), (held_file, held)):
                with path.open("w", newline="", encoding="utf-8") as handle:  # csv quotes what needs it
                    writer = csv.writer(handle, delimiter="\t")
                    writer.writerow(("label", "text"))
                    writer.writerows((labels[i], texts[i]) for i in rows)
            job = base.with_settings(train_data=str(train_file), eval_data=str(held_file), text_column="text",
                                     label_column="label", train_limit=None, patience=None, max_steps=steps,
                                     eval_every=steps, grace_period=None)  # ASHA's rung: not past these steps

            def predict(model: Any, tokenizer: Any, rows: Any = held) -> None:
                probabilities[rows] = _predict(model, tokenizer, [texts[i] for i in rows], base.sweep.max_length,
                                               base.sweep.eval_batch_size)[:, :classes]

            training.fine_tune(job, lambda step, metrics: None, on_trained=predict)
    return probabilities / probabilities.sum(1, keepdims=True)


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


def best_trial_setup(study: Any, overrides: list[str]) -> tuple[Any, dict[str, Any], int, str | None]:
    """The sweep as the study ran it (``--set`` on top: ``max_steps`` shortens each fold's run),
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
