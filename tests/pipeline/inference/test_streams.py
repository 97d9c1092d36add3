"""Model streams: cases through the network at once, each thread with its own share of the cores."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from pipeline.inference.streams import MAX_CPU_STREAMS, ModelStreams, stream_layout

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize(
    ("requested", "device", "threads", "expected"),
    [
        (None, CPU, 1, (1, 1)),
        (None, CPU, 2, (2, 1)),
        (None, CPU, 3, (3, 1)),
        (None, CPU, 16, (MAX_CPU_STREAMS, 16 // MAX_CPU_STREAMS)),
        (1, CPU, 16, (1, 16)),
        (3, CPU, 8, (3, 2)),
        (2, CPU, 1, (2, 1)),  # asked for: more streams than cores, one thread each
        (None, CUDA, 8, (1, 8)),
        (2, CUDA, 8, (2, 8)),
    ],
)
def test_the_stream_layout_shares_the_cores_out(requested, device, threads, expected):
    assert stream_layout(requested, device, threads) == expected


def test_zero_streams_is_refused():
    with pytest.raises(ValueError, match="at least 1"):
        stream_layout(0, CPU, 4)


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
    with ModelStreams(2, 1, on_idle=lambda: idle.append(1)) as streams:
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


def test_a_call_that_raises_raises_in_the_caller():
    def fail() -> None:
        raise RuntimeError("boom")

    with ModelStreams(1, 1) as streams:
        streams.submit(fail)
        streams.drain()
        with pytest.raises(RuntimeError, match="boom"):
            streams.results()
