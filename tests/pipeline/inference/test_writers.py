"""The writer pool: bounded, its memory counted, each case reported once it is done."""

from __future__ import annotations

import threading
import time
from contextlib import ExitStack

import pytest

from pipeline.inference.memory import Writing, planned_write_bytes, prefetch
from pipeline.inference.writers import Writers


def test_writers_run_at_most_their_number_and_report_in_the_submitting_thread():
    running, peak, guard = [0], [0], threading.Lock()
    main = threading.get_ident()
    reported: list[tuple[int, int]] = []
    released: list[int] = []
    writing = Writing()

    def write(i: int) -> int:
        with guard:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.02 * (3 - i % 3))  # later cases may finish first
        with guard:
            running[0] -= 1
        return i

    with Writers(
        write, workers=2, writing=writing, on_done=lambda r: reported.append((r, threading.get_ident()))
    ) as w:
        for i in range(7):
            lock = ExitStack()
            lock.callback(released.append, i)
            w.submit(i, lock, 10)
            assert writing.held <= 20
    assert peak[0] == 2
    assert sorted(r for r, _ in reported) == list(range(7))
    assert {t for _, t in reported} == {main}
    assert sorted(released) == list(range(7)) and writing.held == 0


def test_a_case_is_reported_after_its_lock_is_released():
    order: list[str] = []
    with Writers(
        lambda i: order.append("written") or i,
        workers=1,
        writing=Writing(),
        on_done=lambda r: order.append("done"),
    ) as w:
        lock = ExitStack()
        lock.callback(order.append, "unlocked")
        w.submit(0, lock, 1)
    assert order == ["written", "unlocked", "done"]


def test_a_load_waits_until_the_writes_leave_room():
    writing = Writing()
    writing.hold(15)
    events: list[str] = []
    threading.Timer(0.2, lambda: (events.append("written"), writing.release(15))).start()
    for item, pending in prefetch(
        [0], lambda i: events.append("load") or i, cost=lambda i: 10, budget=20, writing=writing
    ):
        assert pending.take() == item
    assert events == ["written", "load"]


def test_no_load_ahead_when_the_writes_leave_no_room_for_two():
    writing = Writing()
    writing.hold(6)
    started: list[int] = []
    seen = []
    for item, pending in prefetch(
        list(range(3)), lambda i: started.append(i) or i, cost=lambda i: 10, budget=25, writing=writing
    ):
        assert pending.take() == item
        seen.append(list(started))
    assert seen == [[0], [0, 1], [0, 1, 2]]  # never the next one before its turn
    writing.release(6)


@pytest.mark.parametrize("planned", [0, 40, 40 * 1_000_003])
def test_a_write_plans_a_fifth_of_the_case_peak(planned):
    assert planned_write_bytes(planned) == planned * 8 // 40


def test_highdicom_stays_quiet_while_any_writer_thread_writes_a_seg():
    import logging

    from pipeline.outputs.masks import _quiet_highdicom

    logger = logging.getLogger("highdicom")
    before = logger.level
    logger.setLevel(logging.INFO)
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()
    seen: list[int] = []

    def first():
        with _quiet_highdicom():
            first_in.set()
            second_in.wait(5)
        first_out.set()

    def second():
        first_in.wait(5)
        with _quiet_highdicom():
            second_in.set()
            first_out.wait(5)
            seen.append(logger.getEffectiveLevel())  # the first one has left; this one still writes

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    level = logger.level
    logger.setLevel(before)
    assert seen == [logging.WARNING] and level == logging.INFO


def test_several_threads_submit_and_only_the_polling_thread_reports():
    writing = Writing()
    reported: list[tuple[int, int]] = []
    main = threading.get_ident()

    def write(i: int) -> int:
        time.sleep(0.005)
        return i

    with Writers(
        write, workers=2, writing=writing, on_done=lambda r: reported.append((r, threading.get_ident()))
    ) as w:

        def stream(first: int) -> None:
            for i in range(first, first + 5):
                w.submit(i, ExitStack(), 1)

        threads = [threading.Thread(target=stream, args=(k * 5,)) for k in range(3)]
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            w.poll()
            time.sleep(0.001)
        for t in threads:
            t.join()
    assert sorted(r for r, _ in reported) == list(range(15))
    assert {t for _, t in reported} == {main}
    assert writing.held == 0
