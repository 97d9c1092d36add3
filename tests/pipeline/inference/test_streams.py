"""Model streams: cases through the network at once, each thread with its own share of the cores."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from pipeline.inference.streams import MAX_CPU_STREAMS, Handoff, ModelStreams, stream_layout

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize(
    ("requested", "device", "threads", "expected"),
    [
        (None, CPU, 1, (1,)),
        (None, CPU, 2, (1, 1)),
        (None, CPU, 3, (1, 1, 1)),
        (None, CPU, 6, (2, 2, 1, 1)),  # every core used: the remainder goes to the first streams
        (None, CPU, 7, (2, 2, 2, 1)),
        (None, CPU, 16, (16 // MAX_CPU_STREAMS,) * MAX_CPU_STREAMS),
        (1, CPU, 16, (16,)),
        (3, CPU, 8, (3, 3, 2)),
        (2, CPU, 1, (1, 1)),  # asked for: more streams than cores, one thread each
        (None, CUDA, 8, (8,)),
        (2, CUDA, 8, (8, 8)),
    ],
)
def test_the_stream_layout_shares_the_cores_out(requested, device, threads, expected):
    layout = stream_layout(requested, device, threads)
    assert layout == expected
    if device == CPU and requested is None:
        assert sum(layout) == threads  # no core left idle


def test_zero_streams_is_refused():
    with pytest.raises(ValueError, match="at least 1"):
        stream_layout(0, CPU, 4)
    with pytest.raises(ValueError, match="at least one stream"):
        ModelStreams(())
    with pytest.raises(ValueError, match="at least 1 thread"):
        ModelStreams((2, 0))


def _count_in_a_new_thread() -> int:
    """The intra-op thread count a thread started now gets (torch's process-wide default)."""
    seen: list[int] = []
    t = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    t.start()
    t.join()
    return seen[0]


def test_streams_run_at_once_each_with_its_thread_count_and_the_callers_count_comes_back():
    caller = torch.get_num_threads()
    both_in = threading.Barrier(2, timeout=10)  # broken (an error) unless two calls run at once
    seen: list[tuple[int, int]] = []
    guard = threading.Lock()
    running, peak = [0], [0]

    def call(i: int) -> int:
        with guard:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        if i < 2:
            both_in.wait()
        time.sleep(0.01 * (3 - i % 3))  # later calls may finish first
        with guard:
            seen.append((threading.get_ident(), torch.get_num_threads()))
            running[0] -= 1
        return i * 10

    got: list[int] = []
    idle: list[int] = []
    before = _count_in_a_new_thread()
    with ModelStreams((1, 1), on_idle=lambda: idle.append(1)) as streams:
        for i in range(6):
            streams.submit(call, i)
            got += streams.results()
        streams.drain()
        got += streams.results()
    assert sorted(got) == [i * 10 for i in range(6)]  # each returned once
    assert peak[0] == 2
    assert {n for _, n in seen} == {1}
    assert len({t for t, _ in seen}) == 2 and threading.get_ident() not in {t for t, _ in seen}
    assert idle  # the caller waited for a free stream, running on_idle meanwhile
    assert torch.get_num_threads() == caller
    # the streams set the default new threads take; the block puts the caller's back
    assert _count_in_a_new_thread() == before == caller


def test_each_stream_thread_takes_its_own_share_of_the_cores():
    both_in = threading.Barrier(2, timeout=10)
    seen: dict[int, int] = {}

    def call() -> None:
        seen[threading.get_ident()] = torch.get_num_threads()
        both_in.wait()  # both streams busy at once: two threads, two counts

    with ModelStreams((3, 1)) as streams:
        streams.submit(call)
        streams.submit(call)
        streams.drain()
        assert list(streams.results()) == [None, None]
    assert sorted(seen.values()) == [1, 3]


def test_a_call_that_raises_raises_in_the_caller():
    def fail() -> None:
        raise RuntimeError("boom")

    with ModelStreams((1,)) as streams:
        streams.submit(lambda: "first")
        streams.drain()
        streams.submit(fail)
        streams.drain()
        streams.submit(lambda: "after")
        streams.drain()
        got: list[str] = []
        with pytest.raises(RuntimeError, match="boom"):
            for value in streams.results():
                got.append(value)
        assert got == ["first"]  # the calls finished before the failed one are handed over
        assert list(streams.results()) == ["after"]  # those after it wait for the next look


def test_an_interrupt_while_waiting_for_a_stream_withdraws_the_call():
    release = threading.Event()
    ran: list[str] = []
    withdrawn: list[str] = []

    def busy() -> None:
        release.wait(10)

    def interrupt() -> None:  # the caller's on_idle: Ctrl-C arrives while it waits
        raise KeyboardInterrupt

    with ModelStreams((1,), on_idle=interrupt) as streams:
        streams.submit(busy)
        with pytest.raises(KeyboardInterrupt):
            streams.submit(ran.append, "late", on_withdraw=lambda: withdrawn.append("late"))
        release.set()
    assert withdrawn == ["late"] and ran == []  # released by the caller, never run


@pytest.mark.parametrize("first", ["take", "withdraw"])
def test_a_handoff_has_exactly_one_owner(first):
    handoff = Handoff()
    second = "withdraw" if first == "take" else "take"
    assert getattr(handoff, first)() is True
    assert getattr(handoff, second)() is False
    assert getattr(handoff, first)() is True  # the owner stays the owner


def _claim(i: int, handoff: Handoff, start: threading.Barrier, won: list[bool]) -> None:
    start.wait()
    won.append(handoff.take() if i % 2 else handoff.withdraw())


def test_a_handoff_raced_from_many_threads_has_one_owner():
    for _ in range(50):
        handoff, start, won = Handoff(), threading.Barrier(8, timeout=10), []
        threads = [threading.Thread(target=_claim, args=(i, handoff, start, won)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert won.count(True) == 4 and won.count(False) == 4  # one side: all its claims agree
