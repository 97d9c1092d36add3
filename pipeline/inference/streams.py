"""Model streams: several cases through the network at once, each in its own thread.

    with ModelStreams(streams, threads_per_stream, on_idle=writers.poll) as model:
        for each case: model.submit(compute, case, ...)   # waits for a free stream
        model.results()                                   # what the finished calls returned
        model.drain()                                     # wait for the last ones

On a CPU of few cores one case at a time with every core in the network's intra-op team leaves
much of the CPU waiting: a forward pass of the U-Net is dozens of small convolutions, and the
team meets at a barrier after each (and spins there, or sleeps, while a core is busy elsewhere).
Several cases at once, each on its own share of the cores, keep the cores busy with no barrier
between them: on the 2-core CI machine two one-thread streams predict the demo's cases in
0.73-0.84 of the time one two-thread stream takes (bench/predict.py prints both bounds). A GPU
runs one stream: its kernels already fill the device.

Each stream thread sets its own intra-op thread count once, when it starts (torch keeps the
count per thread under OpenMP); the count of the threads started later follows the last one set,
so the block restores the caller's count when it ends. A call that raises re-raises from
`results`, in the caller's thread.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any

import torch

log = logging.getLogger(__name__)

# Most streams on a CPU: past four, the cases held in memory at once grow and the gain does not.
MAX_CPU_STREAMS = 4
# How often a caller waiting for a free stream runs its `on_idle` (seconds).
IDLE_POLL_S = 0.1


def stream_layout(requested: int | None, device: torch.device, threads: int) -> tuple[int, int]:
    """(streams, intra-op threads per stream) for `device` with `threads` intra-op threads.

    requested None: one stream on an accelerator; on a CPU one stream per core up to
    MAX_CPU_STREAMS. The cores are shared out evenly, at least one thread per stream (a
    requested count above the cores runs more threads than cores)."""
    threads = max(1, int(threads))
    if requested is not None and requested < 1:
        raise ValueError(f"model streams must be at least 1, got {requested}")
    if device.type != "cpu":
        return (requested or 1), threads
    streams = min(MAX_CPU_STREAMS, threads) if requested is None else int(requested)
    return streams, max(1, threads // streams)


class ModelStreams:
    """A pool of `streams` threads, each with `threads` intra-op threads; see the module docstring."""

    def __init__(self, streams: int, threads: int, *, on_idle: Callable[[], None] | None = None) -> None:
        if streams < 1 or threads < 1:
            raise ValueError(f"streams and threads must be at least 1, got {streams} and {threads}")
        self.streams = streams
        self.threads = threads
        self._on_idle = on_idle or (lambda: None)
        self._caller_threads = torch.get_num_threads()
        self._pool = ThreadPoolExecutor(
            max_workers=streams,
            thread_name_prefix="predict-model",
            initializer=torch.set_num_threads,
            initargs=(threads,),
        )
        self._running: dict[Future, int] = {}
        self._submitted = 0

    def __enter__(self) -> ModelStreams:
        return self

    def __exit__(self, *exc_info: object) -> None:
        # Also on an interrupt: the calls running finish (one case each), then the count is restored.
        try:
            self._pool.shutdown(wait=True)
        finally:
            torch.set_num_threads(self._caller_threads)

    def submit(self, call: Callable[..., Any], *args: Any) -> None:
        """Run `call(*args)` in a stream once one is free (running `on_idle` while waiting)."""
        while True:
            busy = [f for f in self._running if not f.done()]
            if len(busy) < self.streams:
                break
            wait(busy, timeout=IDLE_POLL_S, return_when=FIRST_COMPLETED)
            self._on_idle()
        self._running[self._pool.submit(call, *args)] = self._submitted
        self._submitted += 1

    def drain(self) -> None:
        """Wait until every call submitted has finished (running `on_idle` while waiting); their
        returns are left for `results`."""
        while busy := [f for f in self._running if not f.done()]:
            wait(busy, timeout=IDLE_POLL_S, return_when=FIRST_COMPLETED)
            self._on_idle()

    def results(self) -> list[Any]:
        """What the calls finished since the last look returned, in submission order."""
        done = sorted((f for f in self._running if f.done()), key=self._running.__getitem__)
        for f in done:
            del self._running[f]
        return [f.result() for f in done]
