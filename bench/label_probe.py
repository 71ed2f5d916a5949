"""How many planted wrong labels the label probes find: one JSON line per probe and planting seed.

    python bench/label_probe.py                                  # 2,000 SST-2 rows, 5% flipped, seeds 0 1
    python bench/label_probe.py --probe quick --seeds 0 1 2 3    # the quick probe only (about a minute each)
    python bench/label_probe.py --data my.csv --text-column text --label-column label --rows 5000
    python bench/label_probe.py --params '{"learning_rate": 1e-3, "lora_r": 16}' --max-steps 300
    python bench/label_probe.py --probe ceiling --seeds 0 --ceiling-rows 8000   # the strong probe's bound

``--rows`` rows are drawn from ``--data`` (any TSV/CSV/JSONL ``hpo`` reads) and ``--rate`` of them
get a wrong label, exactly as tests/test_label_issues.py plants them (:func:`plant`: a seeded
``random.Random(seed)`` draws the rows, then the rows to flip; a flipped row takes another class
drawn by the same generator, ``1 - label`` for two classes). Each probe runs as ``hpo check-data
--labels`` runs it (:func:`hpo.analysis.label_issues.check_labels`):

* ``quick``: logistic regression over frozen embeddings and TF-IDF, cross-fitted;
* ``strong``: ``--params`` (a tuned config of ``search_spaces/lora.py``'s space; default: the one
  measured in docs/guides/troubleshooting.md) cross-fitted through the recipe over 5 folds of
  ``--max-steps`` steps each, early-stopped on a slice of each fold's training part, and ensembled
  with the quick probe (:mod:`hpo.analysis.label_probe`). ``strong-alone`` is the same run ranked by
  its own probabilities, without the ensemble.
* ``ceiling`` (``--probe ceiling``, on its own): the most the strong probe could reach with this
  model and config. One run of the recipe trains on ``--ceiling-rows`` clean rows of ``--data``
  that were not drawn (more rows than the probe's folds see, none of them flipped) and scores the
  planted rows, ranked as the strong probe's are (``ceiling+quick``: with the quick probe's ensemble).

Each line holds the probe, rows, flipped (k), precision_at_k (the share of the top k suspects
that are flipped rows), flagged (how many rows cleanlab flags), recall (the share of the flipped
rows among them), precision (the share of flagged rows that are flipped), the out-of-fold accuracy
against the given labels, and seconds. The strong probe's out-of-fold probabilities are kept in
``--work`` (``strong-SEED.npy``) and reused by a rerun with the same settings (``--fresh`` retrains).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SST2 = REPO.parent / "shared" / "data" / "sst2" / "train.tsv"
TUNED = {"learning_rate": 1e-3, "batch_size": 16, "lora_r": 16, "lora_dropout": 0.05, "weight_decay": 0.01}
"""The strong probe's default config, from ``search_spaces/lora.py``'s space (chosen by hand, not a
study's best): 0.83 out-of-fold accuracy against the true labels of 2,000 planted SST-2 rows at 300
steps per fold (docs/guides/troubleshooting.md)."""


def fail(message: str) -> None:
    sys.exit(f"bench/label_probe.py: {message}")


def plant(texts: list[str], labels: list[int], rows: int, rate: float,
          seed: int) -> tuple[list[str], list[int], set[int], list[int]]:
    """``rows`` rows drawn at random, and the 0-based positions of the ``rate`` of them whose label
    was replaced by another class (two classes: ``1 - label``); returns texts, noisy labels, flipped,
    and the drawn rows' indices in ``texts``."""
    rng = random.Random(seed)
    picked = rng.sample(range(len(texts)), rows)
    flipped = set(rng.sample(range(rows), round(rows * rate)))
    classes = sorted(set(labels))
    noisy = []
    for position, index in enumerate(picked):
        label = labels[index]
        if position in flipped:
            label = 1 - label if classes == [0, 1] else rng.choice([c for c in classes if c != label])
        noisy.append(label)
    return [texts[i] for i in picked], noisy, flipped, picked


def score(found, flipped: set[int], seconds: float, probe: str) -> dict:
    top = {s.row - 1 for s in found.suspects[:len(flipped)]}
    flagged = {s.row - 1 for s in found.suspects}
    return {"probe": probe, "rows": found.rows, "flipped": len(flipped),
            "precision_at_k": round(len(top & flipped) / len(flipped), 3),
            "recall": round(len(flagged & flipped) / len(flipped), 3), "flagged": len(flagged),
            "precision": round(len(flagged & flipped) / max(len(flagged), 1), 3),
            "accuracy": round(found.accuracy, 4), "seconds": round(seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(SST2), help="TSV/CSV/JSONL with a text and an integer label column")
    parser.add_argument("--text-column")
    parser.add_argument("--label-column")
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--rate", type=float, default=0.05, help="share of the rows whose label is flipped")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="planting seeds")
    parser.add_argument("--probe", choices=("quick", "strong", "both", "ceiling"), default="both")
    parser.add_argument("--ceiling-rows", type=int, default=8000,
                        help="--probe ceiling: clean rows of --data, apart from the drawn ones, it trains on")
    parser.add_argument("--ceiling-steps", type=int,
                        help="--probe ceiling: its steps (default: 3 passes over its rows, as the strong probe's folds)")
    parser.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2")
    parser.add_argument("--params", default=json.dumps(TUNED), help="the strong probe's config (JSON)")
    parser.add_argument("--max-steps", type=int, default=300, help="the strong probe's steps per fold")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--work", default="/tmp/hpo-bench-label-probe")
    parser.add_argument("--fresh", action="store_true")
    args = parser.parse_args()

    import numpy as np

    from hpo.analysis.label_issues import check_labels
    from hpo.errors import HpoError
    from hpo.train import data

    try:
        raw = data.read_raw(args.data, "classification", args.text_column, args.label_column)
    except HpoError as error:
        fail(str(error))
    pairs = [(t, data.as_label(v)) for t, v in zip(raw.texts, raw.labels or [], strict=True)]
    pairs = [(t, v) for t, v in pairs if v is not None and v >= 0]
    if not 0 < args.rate < 1 or round(args.rows * args.rate) < 1:
        fail(f"--rate {args.rate} of --rows {args.rows} flips no row or all of them; give a share between 0 and 1")
    if args.rows > len(pairs):
        fail(f"--rows {args.rows}: {args.data} has {len(pairs)} rows with an integer label 0..K-1; ask for fewer")
    if len({v for _, v in pairs}) < 2:
        fail(f"{args.data}: one class only; flipping a label needs two or more")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    params = json.loads(args.params)
    for seed in args.seeds:
        texts, noisy, flipped, picked = plant([t for t, _ in pairs], [v for _, v in pairs], args.rows, args.rate, seed)
        planted = work / f"planted-{seed}.tsv"
        with planted.open("w", encoding="utf-8", newline="") as handle:
            import csv

            writer = csv.writer(handle, delimiter="\t")
            writer.writerow(("label", "text"))
            writer.writerows(zip(noisy, texts, strict=True))
        if args.probe in ("quick", "both"):
            started = time.perf_counter()
            found = check_labels(str(planted), None, model=args.model)
            print(json.dumps({**score(found, flipped, time.perf_counter() - started, "quick"), "seed": seed}), flush=True)
        if args.probe in ("strong", "both"):
            from hpo.analysis.label_probe import strong_probe
            from hpo.config import Sweep

            sweep = probe_sweep(args)
            key = hashlib.sha256(json.dumps([args.data, args.rows, args.rate, args.model, params, args.max_steps,
                                             args.max_length], sort_keys=True).encode()).hexdigest()[:10]
            cached = work / f"strong-{seed}-{key}.npy"
            trained = {}

            def strong(texts: list[str], labels: list[int], cached: Path = cached, sweep: Sweep = sweep,
                       trained: dict = trained) -> np.ndarray:
                if cached.exists() and not args.fresh:
                    return np.load(cached)
                begun = time.perf_counter()
                probabilities = strong_probe(sweep, params, texts, labels)
                trained["seconds"] = time.perf_counter() - begun
                np.save(cached, probabilities)
                return probabilities

            started = time.perf_counter()
            found = check_labels(str(planted), None, model=args.model, strong=strong)
            line = score(found, flipped, time.perf_counter() - started, "strong")
            alone = check_labels(str(planted), None, model=args.model, strong=strong, ensemble=False)
            print(json.dumps({**line, "seed": seed, "params": params, "max_steps": args.max_steps,
                              "trained_seconds": round(trained.get("seconds", 0), 1), "cached": str(cached)}), flush=True)
            print(json.dumps({**score(alone, flipped, 0.0, "strong-alone"), "seed": seed}), flush=True)
        if args.probe == "ceiling":
            ceiling(args, pairs, picked, planted, flipped, params, seed, work)


def probe_sweep(args: argparse.Namespace) -> Any:
    """The sweep the strong and ceiling probes train under: ``--model``, ``--max-length``, ``--max-steps``."""
    from hpo.config import Sweep

    return Sweep(model=args.model, task="classification", max_length=args.max_length, max_steps=args.max_steps,
                 eval_every=args.max_steps)


def ceiling(args: argparse.Namespace, pairs: list[tuple[str, int]], picked: list[int], planted: Path,
            flipped: set[int], params: dict, seed: int, work: Path) -> None:
    """What the strong probe could reach at best with this model and config: one run of the same
    recipe trained on ``--ceiling-rows`` clean rows of ``--data`` that were not drawn (more rows than
    the planted set holds, none of them flipped), scoring the planted rows, ranked as the strong probe's
    are. A strong probe cross-fitted on the noisy rows themselves sees fewer and noisier rows."""
    import numpy as np
    from sklearn.model_selection import train_test_split

    from hpo.analysis.label_issues import check_labels
    from hpo.analysis.label_probe import STOP_FRACTION, fit_and_predict, fold_steps
    from hpo.train.recipe import TrainJob

    drawn = set(picked)
    others = [pair for i, pair in enumerate(pairs) if i not in drawn]
    random.Random(seed).shuffle(others)
    rows = [(label, text) for text, label in others[:args.ceiling_rows]]
    fit, stop = train_test_split(rows, test_size=STOP_FRACTION, random_state=seed, stratify=[r[0] for r in rows])
    sweep = probe_sweep(args)
    steps = args.ceiling_steps or fold_steps(args.max_steps, int(params.get("batch_size", 16)), len(fit))
    key = hashlib.sha256(json.dumps([args.data, args.rows, args.rate, args.model, params, steps, args.max_length,
                                     args.ceiling_rows], sort_keys=True).encode()).hexdigest()[:10]
    cached = work / f"ceiling-{seed}-{key}.npy"
    trained = 0.0
    if cached.exists() and not args.fresh:
        probabilities = np.load(cached)
    else:
        import tempfile

        begun = time.perf_counter()
        texts = [pairs[index][0] for index in picked]  # the planted file's rows, in its order
        with tempfile.TemporaryDirectory(prefix="hpo-bench-ceiling-") as folder:
            probabilities = fit_and_predict(TrainJob.from_sweep(sweep, params), fit, stop, texts, steps, Path(folder))
        probabilities = probabilities / probabilities.sum(1, keepdims=True)
        trained = time.perf_counter() - begun
        np.save(cached, probabilities)
    for ensemble in (True, False):
        started = time.perf_counter()
        found = check_labels(str(planted), None, model=args.model, strong=lambda texts, labels: probabilities,
                             ensemble=ensemble)
        print(json.dumps({**score(found, flipped, time.perf_counter() - started,
                                  "ceiling+quick" if ensemble else "ceiling"),
                          "seed": seed, "trained_on": len(fit), "steps": steps, "params": params,
                          "trained_seconds": round(trained, 1), "cached": str(cached)}), flush=True)


if __name__ == "__main__":
    main()
