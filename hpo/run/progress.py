"""The live view of a sweep (rich): running / finished / pruned / failed trials and the
best so far. On a terminal it redraws in place; elsewhere (CI logs, pipes) it prints one
line per trial event.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from hpo.formatting import STATE_STYLE, params_text, short


@dataclass
class _Row:
    number: int
    params: dict[str, Any]
    state: str = "RUNNING"
    step: int = 0
    value: float | None = None
    reason: str | None = None
    started: float = field(default_factory=time.monotonic)
    ended: float | None = None


class SweepDisplay:
    """Implements the recorder's Display protocol."""

    REDRAW = 0.25
    """Seconds between redraws of the live view (it refreshes 4 times a second)."""

    def __init__(self, console: Console, *, study: str, metric: str, direction: str, target: int, max_steps: int,
                 already: int = 0, best: tuple[int, float] | None = None):
        self.console = console
        self.study = study
        self.metric = metric
        self.maximize = direction == "maximize"
        self.target = target
        self.max_steps = max_steps
        self.already = already
        self.best = best
        self.rows: dict[int, _Row] = {}
        self.started = time.monotonic()
        self._live: Live | None = None
        self._drawn = 0.0

    def __enter__(self) -> SweepDisplay:
        if self.console.is_terminal:
            self._live = Live(self._render(), console=self.console, refresh_per_second=4, transient=False)
            self._live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._live is not None:
            self._live.update(self._render())
            self._live.__exit__(*exc)
            self._live = None

    # Display protocol -------------------------------------------------------------
    def trial_started(self, number: int, params: dict[str, Any]) -> None:
        self.rows[number] = _Row(number, params)
        if self._live is None:
            self.console.print(f"trial {number} started: {params_text(params)}", highlight=False)
        self.tick()

    def trial_result(self, number: int, step: int, value: float | None) -> None:
        row = self.rows.get(number)
        if row is not None:
            row.step, row.value = step, value
        self.tick()

    def trial_ended(self, number: int, state: str, value: float | None, reason: str | None) -> None:
        row = self.rows.setdefault(number, _Row(number, {}))
        row.state, row.reason, row.ended = state, reason, time.monotonic()
        if state == "COMPLETE" and value is not None:
            row.value = value
            if self.best is None or self._better(value, self.best[1]):
                self.best = (number, value)
        if self._live is None:
            shown = f" {self.metric}={short(row.value)}" if row.value is not None else ""
            why = f" ({reason})" if reason and state != "COMPLETE" else ""
            self.console.print(f"trial {number} {state} at step {row.step}{shown}{why}", highlight=False)
        self.tick()

    def tick(self) -> None:
        """Redraw the live view (called on every event and every turn of Tune's loop): at most
        as often as it refreshes, so a busy loop does not spend its time building tables."""
        now = time.monotonic()
        if self._live is not None and now - self._drawn >= self.REDRAW:
            self._drawn = now
            self._live.update(self._render())

    # rendering ------------------------------------------------------------------
    def _better(self, a: float, b: float) -> bool:
        return a > b if self.maximize else a < b

    def counts(self) -> dict[str, int]:
        counts = {"RUNNING": 0, "COMPLETE": 0, "PRUNED": 0, "FAIL": 0}
        for row in self.rows.values():
            counts[row.state] = counts.get(row.state, 0) + 1
        return counts

    def _render(self) -> Group:
        counts = self.counts()
        finished = self.already + counts["COMPLETE"] + counts["PRUNED"] + counts["FAIL"]
        elapsed = time.monotonic() - self.started
        best = f"best {self.metric} {short(self.best[1])} (trial {self.best[0]})" if self.best else "no trial complete yet"
        head = Text.assemble(
            (f"study {self.study}  ", "bold"),
            (f"{finished}/{self.target} finished  ", ""),
            (f"{counts['RUNNING']} running  ", STATE_STYLE["RUNNING"]),
            (f"{counts['COMPLETE']} complete  ", STATE_STYLE["COMPLETE"]),
            (f"{counts['PRUNED']} pruned  ", STATE_STYLE["PRUNED"]),
            (f"{counts['FAIL']} failed  ", STATE_STYLE["FAIL"]),
            (f"{elapsed:,.0f}s  ", "dim"),
            (best, "bold magenta"),
        )
        table = Table(box=None, pad_edge=False, header_style="bold")
        for column in ("trial", "state", "step", self.metric, "time", "params"):
            table.add_column(column, justify="right" if column in ("trial", "step", "time") else "left")
        rows = sorted(self.rows.values(), key=lambda r: (r.state != "RUNNING", -r.number))[:12]
        for row in rows:
            seconds = (row.ended or time.monotonic()) - row.started
            table.add_row(
                str(row.number),
                Text(row.state, style=STATE_STYLE.get(row.state, "")),
                f"{row.step}/{self.max_steps}",
                short(row.value),
                f"{seconds:.0f}s",
                params_text(row.params),
            )
        return Group(head, table)

