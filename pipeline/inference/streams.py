"""Model streams: several cases through the network at once, each in its own thread.

    with ModelStreams(stream_layout(None, device, threads), on_idle=writers.poll) as model:
        for each case: model.submit(compute, case, ..., on_withdraw=release)  # waits for a free stream
        for value in model.results(): ...                 # what the finished calls returned
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
so the block restores the caller's count when it ends (threads of the caller's that start torch
work meanwhile should set theirs: the batch's loader does). The cores are shared out whole: 6
cores make four streams of 2, 2, 1 and 1 threads. A call that raises re-raises from `results`,
in the caller's thread, after the calls finished before it. A call is handed over through a
`Handoff`: a caller interrupted while submitting gets `on_withdraw` run exactly when the stream
never started the call.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from queue import SimpleQueue
from typing import Any

import torch

log = logging.getLogger(__name__)

# Most streams on a CPU: past four, the cases held in memory at once grow and the gain does not.
MAX_CPU_STREAMS = 4
# How often a caller waiting for a free stream runs its `on_idle` (seconds).
IDLE_POLL_S = 0.1


def stream_layout(requested: int | None, device: torch.device, threads: int) -> tuple[int, ...]:
    """The intra-op thread count of each model stream for `device` with `threads` intra-op
    threads (as many streams as counts).

    requested None: one stream on an accelerator; on a CPU one stream per core up to
    MAX_CPU_STREAMS. On a CPU the cores are shared out whole and evenly (the first streams take
    the remainder), at least one thread per stream (a requested count above the cores runs more
    threads than cores); on an accelerator each stream keeps every thread (the host's share of
    the work is small)."""
    threads = max(1, int(threads))
    if requested is not None and requested < 1:
        raise ValueError(f"model streams must be at least 1, got {requested}")
    if device.type != "cpu":
        return (threads,) * (requested or 1)
    streams = min(MAX_CPU_STREAMS, threads) if requested is None else int(requested)
    share, extra = divmod(threads, streams)
    return tuple(max(1, share + (i < extra)) for i in range(streams))


class Handoff:
    """Who releases what a case holds (its planned bytes, its lock) once its caller handed it to
    a stream: that thread, when it `take`s the case, or the caller, when it `withdraw`s it
    first (an interrupt that came while, or just after, it handed the case over). Exactly one of
    the two wins, so the bytes are released once and the lock closed once, whatever the timing."""

    def __init__(self) -> None:
        self._owner: str | None = None
        self._guard = threading.Lock()

    def _claim(self, owner: str) -> bool:
        with self._guard:
            if self._owner is None:
                self._owner = owner
            return self._owner == owner

    def take(self) -> bool:
        """In the thread the case was handed to, before it touches the case: True when it now
        owns the case; False when the caller withdrew it (leave it alone)."""
        return self._claim("taken")

    def withdraw(self) -> bool:
        """In the caller, on an error while handing over: True when the case was not taken (the
        caller releases it); False when the other thread owns it."""
        return self._claim("withdrawn")


class ModelStreams:
    """A pool of one thread per entry of `threads`, each with that many intra-op threads; see
    the module docstring."""

    def __init__(self, threads: Sequence[int], *, on_idle: Callable[[], None] | None = None) -> None:
        counts = [int(n) for n in threads]
        if not counts or min(counts) < 1:
            raise ValueError(f"model streams need at least one stream of at least 1 thread, got {counts}")
        self.threads = tuple(counts)
        self.streams = len(counts)
        self._on_idle = on_idle or (lambda: None)
        self._caller_threads = torch.get_num_threads()
        self._unclaimed: SimpleQueue[int] = SimpleQueue()  # counts not yet taken by a stream thread
        for n in counts:
            self._unclaimed.put(n)
        self._pool = ThreadPoolExecutor(
            max_workers=self.streams, thread_name_prefix="predict-model", initializer=self._start_stream
        )
        self._running: dict[Future, int] = {}
        self._submitted = 0

    def _start_stream(self) -> None:
        """In each new stream thread, once: its share of the cores."""
        torch.set_num_threads(self._unclaimed.get_nowait())  # the pool starts at most one per count

    def __enter__(self) -> ModelStreams:
        return self

    def __exit__(self, *exc_info: object) -> None:
        # Also on an interrupt: the calls running finish (one case each), then the count is restored.
        try:
            self._pool.shutdown(wait=True)
        finally:
            torch.set_num_threads(self._caller_threads)

    def submit(
        self, call: Callable[..., Any], *args: Any, on_withdraw: Callable[[], None] | None = None
    ) -> None:
        """Run `call(*args)` in a stream once one is free (running `on_idle` while waiting).

        On an error or interrupt before this returns, `on_withdraw` runs (and the error is raised
        again) exactly when the stream never started `call`: either the caller or the stream
        owns what the call was given, never both, never neither."""
        handoff = Handoff()
        try:
            while True:
                busy = [f for f in self._running if not f.done()]
                if len(busy) < self.streams:
                    break
                wait(busy, timeout=IDLE_POLL_S, return_when=FIRST_COMPLETED)
                self._on_idle()
            self._running[self._pool.submit(_if_taken, handoff, call, args)] = self._submitted
            self._submitted += 1
        except BaseException:
            if handoff.withdraw() and on_withdraw is not None:
                on_withdraw()
            raise

    def drain(self) -> None:
        """Wait until every call submitted has finished (running `on_idle` while waiting); their
        returns are left for `results`."""
        while busy := [f for f in self._running if not f.done()]:
            wait(busy, timeout=IDLE_POLL_S, return_when=FIRST_COMPLETED)
            self._on_idle()

    def results(self) -> Iterator[Any]:
        """What the calls finished since the last look returned, in submission order (iterate
        it). A call that raised raises here, after the ones before it; those after it stay for
        the next look."""
        done = sorted((f for f in self._running if f.done()), key=self._running.__getitem__)
        for f in done:
            del self._running[f]
            yield f.result()


def _if_taken(handoff: Handoff, call: Callable[..., Any], args: tuple) -> Any:
    """In a stream: `call(*args)`, unless its caller withdrew it first."""
    return call(*args) if handoff.take() else None
