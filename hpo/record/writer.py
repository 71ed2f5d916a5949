"""Writes that mirror the study, run in order on one background thread, off the driver's loop.

The sweep's driver records every trial twice: in the Optuna study (the truth, written at
once, in Tune's loop thread) and in MLflow (a mirror). Waiting for MLflow in the loop made
it a large share of the bookkeeping per trial, so :class:`Writer` runs the mirror's writes
on a daemon thread, in the order they were submitted, each retried on transient errors
(:func:`hpo.record.stores.is_transient`: ``ATTEMPTS`` tries, about 15 s, within ``BUDGET`` seconds).

A write that fails otherwise (the store answered and refused it: an invalid name, a
conflicting param) fails alone: it is handed to its ``on_failure`` and the next write is
tried as usual. One that still fails with a transient error means the store is down: it
and the writes of the next ``PAUSE`` seconds are handed to their ``on_failure`` untried (a
store that is down does not make the sweep wait ~15 s for each write in turn), then one
write is tried, once, and so on until one succeeds. Once :meth:`Writer.give_up_when_down`
was called (the sweep is ending), a store that is down is not tried again at all: the
writes left are handed to their ``on_failure`` at once, so the end of a sweep waits for at
most one write's retries. The sweep writes the records so missed from the study at its end
(:func:`hpo.record.mirror.mirror_gaps`), or the next one does.

Nothing is lost by it: :meth:`Writer.flush` waits for every submitted write (the sweep
calls it before it ends, Ctrl-C included), and what a killed driver had not written yet is
written by the next sweep on the study, from the study (:func:`hpo.record.mirror.mirror_gaps`).
Knows nothing of MLflow: a write is any callable.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

logger = logging.getLogger(__name__)


class Writer:
    """An ordered queue of writes and the daemon thread that runs them (started on first use)."""

    PAUSE = 60.0
    """Seconds without trying to write after a write failed with a transient error."""
    ATTEMPTS = 6
    """Tries of a write while the store is up (back-off 0.5, 1, 2, 4, 8 s between them) ..."""
    BUDGET = 30.0
    """... but no new try once this many seconds went by: a store that does not answer at all
    (each call waits for the client's timeout) costs the sweep about this long, once."""

    def __init__(self, name: str):
        self.name = name
        self._queue: queue.Queue[tuple[Callable[[], object], str, Callable[[], object] | None] | None] = \
            queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.failed = 0
        """Writes not made (handed to their ``on_failure``)."""
        self._down_until: float | None = None
        """While the store is down: when to try it again."""
        self._give_up = False

    @property
    def down(self) -> bool:
        """Whether the last write tried failed with a transient error after its retries (the store is down)."""
        return self._down_until is not None

    def give_up_when_down(self) -> None:
        """From now on a store that is down is not tried again: the writes left are handed to
        their ``on_failure`` at once (the sweep is ending; they are written from the study)."""
        self._give_up = True

    def up_again(self) -> None:
        """The store answers again (the caller checked): the next write is tried as usual,
        before the pause that followed its failure runs out."""
        self._down_until = None

    def submit(self, write: Callable[[], object], what: str, on_failure: Callable[[], object] | None = None) -> None:
        """Run ``write()`` after every write submitted before it; ``what`` names it in warnings,
        ``on_failure()`` is called (on the writer's thread) if it still fails after its retries."""
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._thread.start()
        self._queue.put((write, what, on_failure))

    def flush(self) -> None:
        """Wait until every write submitted so far has run (or failed)."""
        done = self._queue.all_tasks_done
        with done:
            while self._queue.unfinished_tasks and self._thread is not None and self._thread.is_alive():
                done.wait(0.5)

    def close(self) -> None:
        """:meth:`flush`, then stop the thread."""
        if self._thread is not None and self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self._thread = None

    def _run(self) -> None:
        from hpo.record.stores import is_transient

        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                write, what, on_failure = item
                down_until = self._down_until  # read once: up_again() may clear it from the caller's thread
                down = down_until is not None
                try:
                    if down_until is not None and (self._give_up or time.monotonic() < down_until):
                        raise _Skipped()
                    if not down:
                        self._retry(write, what)
                    else:  # one try after the pause
                        write()
                        self._down_until = None
                        logger.warning("hpo: %s worked again; the records missed meanwhile are written from the "
                                       "study when the sweep ends", what)
                except Exception as error:  # noqa: BLE001 - counted; the gap is filled from the study
                    self.failed += 1
                    if isinstance(error, _Skipped):
                        pass
                    elif not is_transient(error):  # the store answered and refused this write: it fails alone
                        self._down_until = None
                        logger.warning("hpo: %s failed (%s: %s); the store refused it, it is written from the study "
                                       "when the sweep ends", what, type(error).__name__, _first_line(error))
                    else:
                        if not down:
                            logger.warning("hpo: %s failed (%s: %s); trying again in %.0f s, the records missed "
                                           "meanwhile are written from the study when the sweep ends", what,
                                           type(error).__name__, _first_line(error), self.PAUSE)
                        self._down_until = time.monotonic() + self.PAUSE
                    if on_failure is not None:
                        on_failure()
            finally:
                self._queue.task_done()

    def _retry(self, write: Callable[[], object], what: str) -> None:
        """``write()``, tried again on transient errors within ``ATTEMPTS`` and ``BUDGET``."""
        from hpo.record.stores import is_transient

        started = time.monotonic()
        for attempt in range(self.ATTEMPTS):
            try:
                write()
                return
            except Exception as error:
                wait = min(8.0, 0.5 * 2**attempt)
                if (attempt == self.ATTEMPTS - 1 or not is_transient(error)
                        or time.monotonic() - started + wait >= self.BUDGET):
                    raise
                logger.warning("hpo: %s failed (%s: %s); retrying in %.1f s", what, type(error).__name__,
                               _first_line(error)[:160], wait)
                time.sleep(wait)


class _Skipped(Exception):
    """A write not tried: the store is down."""


def _first_line(error: BaseException) -> str:
    return str(error).splitlines()[0][:200] if str(error) else ""
