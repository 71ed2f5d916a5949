"""Reading datasets: local TSV/CSV/JSONL/TXT files and Hugging Face datasets.

A *source* is a local file path or a hub id ``NAME[:CONFIG]:SPLIT`` (``imdb:train``,
``nyu-mll/glue:sst2:validation``). Classification data needs an integer label column and
a text column; both are detected when not named (a headerless two-column file with an
integer label is recognised). Causal-LM data is plain text, or a text column.

Errors are HpoError and name the file, the row or column, and what to do.
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass
from pathlib import Path

from hpo.errors import HpoError

TEXT_CANDIDATES = ("text", "sentence", "content", "review", "document", "body", "sentence1")
LABEL_CANDIDATES = ("label", "labels", "target", "class", "category", "y")
# Holding out a validation share uses its own seed: the split must not change with the
# trial seed, or trials would be compared on different data.
SPLIT_SEED = 1234


@dataclass(frozen=True)
class Examples:
    """Texts, and integer labels for classification (None for causal LM)."""

    source: str
    texts: list[str]
    labels: list[int] | None


@dataclass(frozen=True)
class RawExamples:
    """Texts and labels as they stand in the source, before labels are checked.

    ``labels`` holds each row's raw label value (a string from TSV/CSV, any JSON or hub
    value), so a checker can count every bad label where :func:`read` stops at the first.
    Index ``i`` of ``texts`` and ``labels`` is "row i+1" in :func:`read`'s errors.
    """

    source: str
    texts: list[str]
    labels: list[object] | None
    label_column: str | None


def read(source: str, task: str, text_column: str | None = None, label_column: str | None = None) -> Examples:
    """Read one source into :class:`Examples` (see the module docstring for the forms)."""
    raw = read_raw(source, task, text_column, label_column)
    if raw.labels is None:
        if Path(source).suffix.lower() == ".txt" and not raw.texts[0].strip():
            raise HpoError(f"{source}: the file is empty; give a text file with some content")
        return Examples(source, raw.texts, None)
    labels = [_label(source, i, value, raw.label_column or "") for i, value in enumerate(raw.labels)]
    return Examples(source, raw.texts, labels)


def read_raw(source: str, task: str, text_column: str | None = None, label_column: str | None = None) -> RawExamples:
    """Read one source as :func:`read` does, but leave labels unchecked and an empty .txt
    file as it is. A missing file, a missing column or an unreadable file still raise."""
    path = Path(source)
    if path.suffix.lower() == ".txt":
        if not path.is_file():
            raise HpoError(f"{source}: no such file; check --set train_data/eval_data")
        text = path.read_text(encoding="utf-8", errors="replace")
        if task == "classification":
            if not text.strip():
                raise HpoError(f"{source}: the file is empty; give a text file with some content")
            raise HpoError(f"{source}: a .txt file holds plain text, but classification needs labels; use TSV/CSV/JSONL")
        return RawExamples(source, [text], None, None)
    rows, columns = _read_rows(source)
    if not rows:
        raise HpoError(f"{source}: the file has no data rows; give a file with examples")
    if task == "causal_lm":
        text_key = _pick(source, columns, text_column, TEXT_CANDIDATES, "text_column")
        return RawExamples(source, [str(r.get(text_key) or "") for r in rows], None, None)
    label_key = _label_key(source, rows, columns, label_column)
    text_key = _text_key(source, rows, columns, text_column, label_key)
    texts = ["" if r.get(text_key) is None else str(r.get(text_key)) for r in rows]
    return RawExamples(source, texts, [r.get(label_key) for r in rows], label_key)


def as_label(value: object) -> int | None:
    """A raw label's integer value (``"1"``, ``" 2 "``, ``"-1"``, ``3``), or None when it is not an integer."""
    if not _is_int(value):
        return None
    return value if isinstance(value, int) else int(str(value).strip())


def hold_out(examples: Examples, fraction: float) -> tuple[Examples, Examples]:
    """Split off ``fraction`` as validation: a seeded shuffle (classification) or the
    tail of the text (causal LM, split by characters at a paragraph or line break)."""
    if examples.labels is None:
        text = "\n\n".join(examples.texts)
        cut = int(len(text) * (1 - fraction))
        newline = text.rfind("\n", 0, cut)
        cut = newline if newline > len(text) // 2 else cut
        return Examples(examples.source, [text[:cut]], None), Examples(examples.source, [text[cut:]], None)
    labels = examples.labels  # a list: a causal-LM text returned above
    kept, held = hold_out_rows(examples.source, len(examples.texts), fraction)

    def take(indices: list[int]) -> Examples:
        return Examples(
            examples.source,
            [examples.texts[i] for i in indices],
            [labels[i] for i in indices],
        )

    return take(kept), take(held)


def hold_out_rows(source: str, count: int, fraction: float) -> tuple[list[int], list[int]]:
    """The 0-based rows :func:`hold_out` keeps for training and holds out, each in file order."""
    order = list(range(count))
    random.Random(SPLIT_SEED).shuffle(order)
    n_eval = max(1, int(round(len(order) * fraction)))
    if n_eval >= len(order):
        raise HpoError(f"{source}: too few rows ({len(order)}) to hold out a validation set; set eval_data")
    return sorted(order[n_eval:]), sorted(order[:n_eval])


def sample(examples: Examples, limit: int) -> Examples:
    """At most ``limit`` examples: a seeded sample kept in file order (classification), or
    the first ``limit`` lines (plain text for a causal LM)."""
    if examples.labels is None:
        lines = "\n\n".join(examples.texts).splitlines(keepends=True)
        return Examples(examples.source, ["".join(lines[:limit])], None)
    if len(examples.texts) <= limit:
        return examples
    chosen = sorted(random.Random(SPLIT_SEED).sample(range(len(examples.texts)), limit))
    return Examples(examples.source, [examples.texts[i] for i in chosen], [examples.labels[i] for i in chosen])


def read_rows(source: str) -> tuple[list[dict], list[str]]:
    """The rows of a TSV/CSV/JSONL file, a ``save_to_disk`` folder or a hub split, and its columns."""
    return _read_rows(source)


def _read_rows(source: str) -> tuple[list[dict], list[str]]:
    path = Path(source)
    suffix = path.suffix.lower()
    if suffix in (".tsv", ".csv"):
        if not path.is_file():
            raise HpoError(f"{source}: no such file; check --set train_data/eval_data")
        return _read_delimited(path, "\t" if suffix == ".tsv" else ",")
    if suffix in (".jsonl", ".json"):
        if not path.is_file():
            raise HpoError(f"{source}: no such file; check --set train_data/eval_data")
        return _read_jsonl(path)
    if path.is_dir():
        return _read_hub(source, from_disk=True)
    if path.suffix or source.startswith((".", "/", "~")):
        raise HpoError(f"{source}: unsupported or missing data file; use .tsv, .csv, .jsonl or .txt")
    return _read_hub(source, from_disk=False)


def _read_delimited(path: Path, delimiter: str) -> tuple[list[dict], list[str]]:
    with path.open(newline="", encoding="utf-8", errors="replace") as handle:
        raw = [row for row in csv.reader(handle, delimiter=delimiter, quoting=csv.QUOTE_MINIMAL) if row]
    if not raw:
        return [], []
    first = raw[0]
    has_header = not _looks_like_data(first, raw[1:2])
    if has_header:
        columns = [c.strip() for c in first]
        body = raw[1:]
    else:
        columns = [str(i) for i in range(len(first))]
        body = raw
    rows = []
    for number, row in enumerate(body, start=2 if has_header else 1):
        if len(row) != len(columns):
            raise HpoError(
                f"{path}: line {number} has {len(row)} fields, expected {len(columns)} "
                f"({'tab' if delimiter == chr(9) else 'comma'}-separated); quote fields that contain the separator"
            )
        rows.append(dict(zip(columns, row, strict=True)))
    return rows, columns


def _looks_like_data(first: list[str], second: list[list[str]]) -> bool:
    """A first row is data (no header) when a column is an integer in it and in the next row."""
    for i, value in enumerate(first):
        if _is_int(value) and (not second or (i < len(second[0]) and _is_int(second[0][i]))):
            return True
    return False


def _read_jsonl(path: Path) -> tuple[list[dict], list[str]]:
    rows: list[dict] = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise HpoError(f"{path}: line {number} is not valid JSON ({error.msg}); one JSON object per line") from None
            if not isinstance(row, dict):
                raise HpoError(f"{path}: line {number} is not a JSON object; one object per line")
            rows.append(row)
    columns = list(dict.fromkeys(k for row in rows[:100] for k in row))
    return rows, columns


def _read_hub(source: str, from_disk: bool) -> tuple[list[dict], list[str]]:
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dependency
        raise HpoError(f"{source}: reading hub datasets needs `pip install datasets`") from None
    datasets.disable_progress_bars()
    try:
        if from_disk:
            data = datasets.load_from_disk(source)
            if isinstance(data, datasets.DatasetDict):
                raise HpoError(f"{source}: holds splits {list(data)}; point at one split's folder")
        else:
            name, config, split = _hub_parts(source)
            data = datasets.load_dataset(name, config, split=split)
    except HpoError:
        raise
    except Exception as error:  # noqa: BLE001 - hub/network errors come in many types
        raise HpoError(
            f"{source}: could not load the dataset ({type(error).__name__}: {str(error).splitlines()[0][:200]}); "
            "give a local file or a hub id as NAME[:CONFIG]:SPLIT"
        ) from None
    return [dict(r) for r in data], list(data.column_names)


def _hub_parts(source: str) -> tuple[str, str | None, str]:
    parts = source.split(":")
    if len(parts) == 1:
        return parts[0], None, "train"
    if len(parts) == 2:
        return parts[0], None, parts[1]
    if len(parts) == 3:
        return parts[0], parts[1], parts[2]
    raise HpoError(f"{source}: expected a hub dataset as NAME[:CONFIG]:SPLIT")


def _pick(source: str, columns: list[str], wanted: str | None, candidates: tuple[str, ...], field: str) -> str:
    if wanted is not None:
        if wanted in columns:
            return wanted
        raise HpoError(f"{source}: no column {wanted!r} (columns: {', '.join(columns)}); fix --set {field}=...")
    for name in candidates:
        for column in columns:
            if column.lower() == name:
                return column
    raise HpoError(
        f"{source}: cannot tell which column is the {field.split('_')[0]} (columns: {', '.join(columns)}); "
        f"name it with --set {field}=..."
    )


def _label_key(source: str, rows: list[dict], columns: list[str], wanted: str | None) -> str:
    if wanted is not None or any(c.lower() in LABEL_CANDIDATES for c in columns):
        return _pick(source, columns, wanted, LABEL_CANDIDATES, "label_column")
    integer_columns = [c for c in columns if all(_is_int(r.get(c)) for r in rows[:50])]
    if len(integer_columns) == 1:
        return integer_columns[0]
    return _pick(source, columns, None, LABEL_CANDIDATES, "label_column")


def _text_key(source: str, rows: list[dict], columns: list[str], wanted: str | None, label_key: str) -> str:
    if wanted is not None or any(c.lower() in TEXT_CANDIDATES for c in columns):
        return _pick(source, columns, wanted, TEXT_CANDIDATES, "text_column")
    others = [c for c in columns if c != label_key]
    if len(others) == 1:
        return others[0]
    return _pick(source, columns, None, TEXT_CANDIDATES, "text_column")


def _is_int(value: object) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    if isinstance(value, str):
        text = value.strip()
        return text.lstrip("-").isdigit()
    return False


def _label(source: str, index: int, value: object, column: str) -> int:
    label = as_label(value)
    if label is None:
        raise HpoError(
            f"{source}: row {index + 1}, column {column!r}: label {value!r} is not an integer; "
            "labels must be integers 0..K-1 (map names to numbers, or pick another --set label_column)"
        )
    if label < 0:
        raise HpoError(f"{source}: row {index + 1}, column {column!r}: label {label} is negative; labels must be 0..K-1")
    return label
