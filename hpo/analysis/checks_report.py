"""What a data check finds and how ``hpo check-data`` shows it: :class:`Finding`, :class:`DataReport`.

Each finding counts the rows affected and names up to five of them (``EXAMPLE_ROWS``),
numbered as :func:`hpo.train.data.read` numbers them ("row 1" is the first data row; for a
``.txt`` file, line numbers). :meth:`DataReport.lines` prints the findings errors first,
one line per split and a verdict.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

EXAMPLE_ROWS = 5
SEVERITIES = ("error", "warning", "info")


@dataclass(frozen=True)
class Finding:
    """One problem in the data, with how many rows it touches and where to look."""

    severity: str
    """``error`` (a sweep must not start), ``warning`` (worth knowing) or ``info``."""
    code: str
    """A stable id: ``empty_text``, ``duplicate``, ``leakage``, ... (each task's ``hpo.analysis.checks_*`` module lists its own)."""
    source: str
    """The file or dataset the finding is about (the training file for a held-out split)."""
    message: str
    """One line for a person: what, how many, and what to do."""
    count: int
    """How many rows are affected: paragraphs for a causal LM, classes for ``missing_class``, the
    majority class's rows for ``class_imbalance``, tokens for ``too_little_text``."""
    rows: list[int] = field(default_factory=list)
    """Up to five example rows, 1-based data rows (line numbers for a .txt file)."""


@dataclass
class DataReport:
    """The findings, errors first, and figures about the splits (rows, classes, token lengths)."""

    findings: list[Finding]
    stats: dict

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "warning"]

    def to_dict(self) -> dict:
        """A JSON-able summary (``hpo check-data --json``)."""
        return {
            "ok": not self.errors, "errors": len(self.errors), "warnings": len(self.warnings),
            "findings": [asdict(f) for f in self.findings], "stats": self.stats,
        }

    def lines(self) -> list[str]:
        """Human-readable lines: findings (errors first), one line per split, a verdict."""
        lines = []
        for finding in sorted(self.findings, key=lambda f: SEVERITIES.index(f.severity)):
            where = ""
            if finding.rows:
                noun = "lines" if Path(finding.source).suffix.lower() == ".txt" else "rows"
                more = ", ..." if finding.count > len(finding.rows) else ""
                where = f" [{noun} {', '.join(map(str, finding.rows))}{more}]"
            lines.append(f"{finding.severity}: {finding.source}: {finding.message}{where}")
        for split in ("train", "eval"):
            if split in self.stats:
                lines.append(f"{split}: {_describe(self.stats[split], self.stats)}")
        verdict = "not ready for a sweep" if self.errors else "ready for a sweep"
        lines.append(f"{len(self.errors)} errors, {len(self.warnings)} warnings: {verdict}")
        return lines


def _finding(severity: str, code: str, source: str, indices: list[int], message: str,
             numbers: list[int] | None = None) -> Finding:
    """A finding about rows given as 0-based indices (into ``numbers`` when given)."""
    examples = [numbers[i] if numbers else i + 1 for i in indices[:EXAMPLE_ROWS]]
    return Finding(severity, code, source, message, len(indices), examples)


def _describe(split: dict, stats: dict) -> str:
    if "answer_tokens" in split:
        from hpo.analysis.checks_sft import describe

        return describe(split, stats)
    if "blocks" in split:
        return (f"{split['paragraphs']} paragraphs, about {split['tokens']} tokens = {split['blocks']} blocks of "
                f"{stats['max_length']} ({split['source']})")
    classes = ", ".join(f"{c}: {n}" for c, n in split["classes"].items())
    tokens = split["tokens"]
    lengths = (f"; tokens p50 {tokens['p50']}, p95 {tokens['p95']}, max {tokens['max']}, "
               f"{tokens['truncated_share']:.1%} over max_length {stats['max_length']}") if tokens else ""
    return f"{split['rows']} rows ({split['source']}); classes {classes or 'none'}{lengths}"
