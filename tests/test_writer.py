"""The driver's ordered background writer (hpo.record.writer): order, flush, and a store that is down."""

from __future__ import annotations

import threading
import time

from hpo.record.writer import Writer


def test_writes_run_in_order_off_the_callers_thread_and_flush_waits_for_them() -> None:
    writer, done, threads = Writer("test-writer"), [], set()

    def write(number: int) -> None:
        time.sleep(0.01)
        threads.add(threading.current_thread().name)
        done.append(number)

    for number in range(20):
        writer.submit(lambda number=number: write(number), f"write {number}")
    assert len(done) < 20, "submit does not wait"
    writer.flush()
    assert done == list(range(20)) and threads == {"test-writer"}
    writer.close()


def test_a_store_that_is_down_is_tried_once_per_pause_and_every_missed_write_is_reported() -> None:
    writer, done, missed = Writer("test-writer"), [], []
    writer.PAUSE, writer.ATTEMPTS = 2.0, 1
    up_at = time.monotonic() + 1.0

    def write(number: int) -> None:
        if time.monotonic() < up_at:
            raise ConnectionError("connection refused")
        done.append(number)

    for number in range(5):  # the first fails; the rest come within the pause: not tried
        writer.submit(lambda number=number: write(number), f"write {number}", lambda number=number: missed.append(number))
    writer.flush()
    assert missed == [0, 1, 2, 3, 4] and done == [] and writer.failed == 5
    time.sleep(2.1)  # the pause is over and the store answers again
    writer.submit(lambda: write(5), "write 5", lambda: missed.append(5))
    writer.submit(lambda: write(6), "write 6", lambda: missed.append(6))
    writer.flush()
    assert done == [5, 6] and missed == [0, 1, 2, 3, 4]
    writer.close()


def test_a_write_the_store_refuses_fails_alone() -> None:
    """An error that is not transient (the store answered: an invalid name) is not the store
    being down: that write fails, the next ones are written at once."""
    writer, done, missed = Writer("test-writer"), [], []

    def write(number: int) -> None:
        if number == 0:
            raise ValueError("Invalid value 'acc@5' for parameter 'metrics[0].name'")
        done.append(number)

    for number in range(3):
        writer.submit(lambda number=number: write(number), f"write {number}", lambda number=number: missed.append(number))
    writer.flush()
    assert missed == [0] and done == [1, 2] and not writer.down
    writer.close()


def test_at_the_end_a_store_that_is_down_costs_one_writes_budget() -> None:
    """Once the sweep ends (give_up_when_down) a store that does not answer is tried for one
    write, within BUDGET seconds; the writes left are handed to on_failure untried."""
    writer, tries, missed = Writer("test-writer"), [], []
    writer.BUDGET = 1.0

    def write(number: int) -> None:
        tries.append(number)
        raise ConnectionError("connection refused")

    writer.give_up_when_down()
    started = time.monotonic()
    for number in range(50):
        writer.submit(lambda number=number: write(number), f"write {number}", lambda number=number: missed.append(number))
    writer.flush()
    assert time.monotonic() - started < 2.0
    assert set(tries) == {0} and len(tries) == 2, "retried once within the budget (0.5 s), then no more"
    assert missed == list(range(50)) and writer.down
    writer.close()
