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
    writer.PAUSE = 2.0
    up_at = time.monotonic() + 1.0

    def write(number: int) -> None:
        if time.monotonic() < up_at:
            raise RuntimeError("the store refused it")
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
