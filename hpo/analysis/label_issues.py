"""Wrong labels (classification): confident learning on out-of-fold predicted probabilities.

``hpo check-data --labels`` runs the *quick probe* before any sweep: every labelled row
(the training file's, and the eval file's when given) gets class probabilities from a
classifier that never saw it, and cleanlab's confident learning
(``cleanlab.filter.find_label_issues``, Apache-2.0) flags the rows whose given label the
probabilities contradict. The flagged rows are ranked by cleanlab's self-confidence label
quality (the probability given to the given label; lowest first), so the top of the list is
what to read first.

The quick probe's classifier (:func:`quick_probe`) is a logistic regression (C=1) over the
base model's frozen mean-pooled embeddings (:mod:`hpo.analysis.embeddings`) joined with the
TF-IDF of the words and word pairs that occur at least twice (weight 2: they carry sentiment
words the sentence embedding blurs; rarer ones only slowed the fit fourfold), cross-fitted
over 5 stratified folds and averaged over 3 shuffles (``FOLDS``, ``REPEATS``). Measured on
2,000 SST-2 rows with 5% of labels flipped, 4 draws of the flips: embeddings alone put
0.39-0.43 of the flipped rows in the top k (k = rows flipped), 0.405 on average; with the
TF-IDF features and 3 shuffles 0.41-0.47, 0.44 on average (tests/test_label_issues.py). The
embedding takes most of the time; the fits about 2 s.

The strong probe (:mod:`hpo.analysis.label_probe`, after a sweep) is ensembled with the quick
one: :func:`combine` averages the two probes' out-of-fold probabilities weighted by each one's
accuracy (cleanlab's default for an ensemble), since two models rarely err on the same rows with
the same confidence, while a wrong label contradicts both.

A flagged row is a suspect, not a verdict: the table and CSV give the row, its text, the given
label, the label the probe suggests and the probe's confidence in it. :func:`write_clean`
writes a copy of a source without its suspects (or with their labels replaced by the
suggested ones); the original is never touched.
"""

from __future__ import annotations

import csv
import json
import os
import uuid
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from hpo.errors import HpoError

FOLDS = 5
REPEATS = 3
TFIDF_WEIGHT = 2.0
CSV_FIELDS = ("rank", "source", "row", "given_label", "suggested_label", "confidence", "label_quality", "text")


@dataclass(frozen=True)
class Suspect:
    """One row whose given label the probe doubts."""

    source: str
    row: int
    """1-based data row, as ``hpo check-data`` numbers rows."""
    text: str
    given_label: int
    suggested_label: int
    """The class the out-of-fold probabilities favour."""
    confidence: float
    """The out-of-fold probability of ``suggested_label``."""
    label_quality: float
    """The out-of-fold probability of ``given_label`` (cleanlab's self-confidence; low = suspect)."""


@dataclass
class LabelIssues:
    """The probe's verdict: suspects ranked most doubtful first, and how good the probe was."""

    probe: str
    rows: int
    accuracy: float
    """Out-of-fold accuracy against the given labels (a weak probe finds fewer errors)."""
    suspects: list[Suspect]
    seconds: float

    def lines(self, limit: int = 20) -> list[str]:
        """A table of the first ``limit`` suspects and a summary line."""
        head = (f"label check ({self.probe} probe, {self.rows} rows, out-of-fold accuracy {self.accuracy:.1%}, "
                f"{self.seconds:.0f} s): {len(self.suspects)} rows may be mislabelled")
        if not self.suspects:
            return [head]
        files = {s.source for s in self.suspects}
        lines = [head, f"  {'rank':>4}  {'row':>6}  {'given':>5}  {'suggested':>9}  {'confidence':>10}  "
                       f"{'file  ' if len(files) > 1 else ''}text"]
        for rank, suspect in enumerate(self.suspects[:limit], start=1):
            text = suspect.text if len(suspect.text) <= 70 else suspect.text[:67] + "..."
            where = f"{Path(suspect.source).name}  " if len(files) > 1 else ""
            lines.append(f"  {rank:>4}  {suspect.row:>6}  {suspect.given_label:>5}  {suspect.suggested_label:>9}  "
                         f"{suspect.confidence:>10.2f}  {where}{text}")
        if len(self.suspects) > limit:
            lines.append(f"  ... {len(self.suspects) - limit} more in the CSV")
        return lines

    def to_dict(self) -> dict:
        return {"probe": self.probe, "rows": self.rows, "accuracy": round(self.accuracy, 4),
                "seconds": round(self.seconds, 1), "suspects": [asdict(s) for s in self.suspects]}

    def write_csv(self, path: Path) -> Path:
        """All suspects, ranked, as CSV (columns ``CSV_FIELDS``)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        with replacing(path) as handle:
            writer = csv.writer(handle)
            writer.writerow(CSV_FIELDS)
            for rank, s in enumerate(self.suspects, start=1):
                writer.writerow([rank, s.source, s.row, s.given_label, s.suggested_label, f"{s.confidence:.4f}",
                                 f"{s.label_quality:.4f}", s.text])
        return path


def check_labels(train_source: str, eval_source: str | None, *, model: str, text_column: str | None = None,
                 label_column: str | None = None, seed: int = 0, strong: Any = None,
                 ensemble: bool = True) -> LabelIssues:
    """Read the labelled rows of the training file (and of the eval file) and run the quick probe
    over them together, or ``strong(texts, labels)`` (the out-of-fold probabilities of
    :func:`hpo.analysis.label_probe.strong_probe`), with ``ensemble`` combined with the quick
    probe's (:func:`combine`). Rows whose label is not an integer 0..K-1
    are left out (``hpo check-data`` reports them as errors)."""
    import time

    from hpo.train import data

    started = time.perf_counter()
    texts, labels, places = [], [], []
    for source in filter(None, (train_source, eval_source)):
        raw = data.read_raw(source, "classification", text_column, label_column)
        for number, (text, value) in enumerate(zip(raw.texts, raw.labels or [], strict=True), start=1):
            label = data.as_label(value)
            if label is not None and label >= 0:
                texts.append(text)
                labels.append(label)
                places.append((source, number))
    classes = sorted(set(labels))  # the probe's columns are the classes present, in order
    index = [classes.index(label) for label in labels]
    if strong is None:
        probabilities = quick_probe(texts, index, model, seed=seed)
    else:
        _check_classes(index, FOLDS)
        probabilities = strong(texts, index)
        if ensemble:
            probabilities = combine(index, [probabilities, quick_probe(texts, index, model, seed=seed)])
    found = find_issues(probabilities, index, texts, places, probe="strong" if strong else "quick",
                        seconds=time.perf_counter() - started)
    found.suspects = [replace(s, given_label=classes[s.given_label], suggested_label=classes[s.suggested_label])
                      for s in found.suspects]
    return found


def quick_probe(texts: list[str], labels: list[int], model_name: str, *, folds: int = FOLDS,
                repeats: int = REPEATS, seed: int = 0) -> Any:
    """Out-of-fold class probabilities, shape (rows, classes), from the frozen-embedding probe."""
    from scipy.sparse import csr_matrix, hstack
    from sklearn.feature_extraction.text import TfidfVectorizer

    from hpo.analysis.embeddings import embed

    _check_classes(labels, folds)
    features = csr_matrix(embed(texts, model_name))
    try:
        words = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=2).fit_transform(texts)
        features = hstack([features, words * TFIDF_WEIGHT]).tocsr()
    except ValueError:  # no word or word pair occurs twice: the embeddings alone
        pass
    return out_of_fold(features, labels, folds=folds, repeats=repeats, seed=seed)


def combine(labels: list[int], members: list[Any]) -> Any:
    """One set of out-of-fold probabilities from several probes': their average weighted by each
    one's out-of-fold accuracy against the given labels (cleanlab's default for an ensemble,
    ``cleanlab.rank.get_label_quality_ensemble_scores``; ranking the average by self-confidence
    ranks as that function does)."""
    import numpy as np

    given = np.asarray(labels)
    weights = np.array([(member.argmax(1) == given).mean() for member in members])
    return sum(w * m for w, m in zip(weights, members, strict=True)) / weights.sum()


def out_of_fold(features: Any, labels: list[int], *, folds: int = FOLDS, repeats: int = REPEATS, seed: int = 0) -> Any:
    """Logistic-regression probabilities for each row from the folds that held it out, averaged
    over ``repeats`` shuffles of the folds."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    target = np.asarray(labels)
    total = 0
    for repeat in range(repeats):
        total = total + cross_val_predict(
            LogisticRegression(C=1.0, max_iter=3000), features, target,
            cv=StratifiedKFold(folds, shuffle=True, random_state=seed + repeat), method="predict_proba")
    return total / repeats


def find_issues(probabilities: Any, labels: list[int], texts: list[str], places: list[tuple[str, int]], *,
                probe: str, seconds: float) -> LabelIssues:
    """The rows cleanlab flags, ranked by self-confidence; ``labels`` index the columns of
    ``probabilities`` (0..K-1) and ``places`` gives each row's (source, row)."""
    import numpy as np
    from cleanlab.filter import find_label_issues

    given = np.asarray(labels)
    ranked = find_label_issues(given, probabilities, return_indices_ranked_by="self_confidence")
    suspects = [Suspect(places[i][0], places[i][1], texts[i], int(given[i]), int(probabilities[i].argmax()),
                        float(probabilities[i].max()), float(probabilities[i][given[i]])) for i in ranked]
    accuracy = float((probabilities.argmax(1) == given).mean())
    return LabelIssues(probe, len(labels), accuracy, suspects, seconds)


def write_clean(source: str, target: str, suspects: list[Suspect], label_column: str, relabel: bool) -> int:
    """Copy ``source`` to ``target`` without the suspects of ``source`` (or, with ``relabel``,
    with their labels set to the suggested ones); returns how many rows changed. ``target``
    is written whole or not at all, in the format its suffix names (.tsv, .csv, .jsonl)."""
    from hpo.train import data

    out = Path(target)
    if out.suffix.lower() not in (".tsv", ".csv", ".jsonl"):
        raise HpoError(f"--write-clean {target}: name a .tsv, .csv or .jsonl file")
    if Path(source).exists() and out.resolve() == Path(source).resolve():
        raise HpoError(f"--write-clean {target}: that is the data file itself; the original is never "
                       "overwritten: name another file")
    rows, columns = data.read_rows(source)
    mine = {s.row: s for s in suspects if s.source == source}
    kept = []
    for number, row in enumerate(rows, start=1):
        suspect = mine.get(number)
        if suspect is None:
            kept.append(row)
        elif relabel:
            kept.append({**row, label_column: suspect.suggested_label})
    out.parent.mkdir(parents=True, exist_ok=True)
    with replacing(out) as handle:
        if out.suffix.lower() == ".jsonl":
            for row in kept:
                handle.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
        else:
            writer = csv.writer(handle, delimiter="\t" if out.suffix.lower() == ".tsv" else ",")
            if not all(c.isdigit() for c in columns):  # a headerless source stays headerless
                writer.writerow(columns)
            writer.writerows([row.get(c, "") for c in columns] for row in kept)
    return len(mine)


def _check_classes(labels: list[int], folds: int) -> None:
    from collections import Counter

    counts = Counter(labels)
    if len(counts) < 2:
        raise HpoError("label check: the data has one class; confident learning needs at least two")
    rare = sorted(c for c, n in counts.items() if n < folds)
    if rare:
        raise HpoError(f"label check: class {rare[0]} has {counts[rare[0]]} rows, fewer than the {folds} folds "
                       "the probe cross-fits over; add rows of that class or drop it")


class replacing:
    """Open a new file beside ``path``; on success it replaces ``path``, on error it goes. Created
    with ``O_EXCL`` and mode 0666 less the umask, as a plain ``open`` would make ``path``."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self) -> Any:
        self.temporary = self.path.parent / f".{self.path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}"
        handle = os.open(self.temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        self.handle = os.fdopen(handle, "w", newline="", encoding="utf-8")
        return self.handle

    def __exit__(self, kind: Any, error: Any, trace: Any) -> None:
        self.handle.close()
        if kind is None:
            os.replace(self.temporary, self.path)
        else:
            os.unlink(self.temporary)
