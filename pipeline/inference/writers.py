"""Writing predicted cases' outputs in a few threads while the model works on the next cases.

    with Writers(write, workers=2, writing=writing, on_done=report) as writers:
        for each case: lock it, predict it, then writers.submit(predicted, lock, planned_bytes)

A writer runs `write` for one case (its NIfTI mask, DICOM SEG, QC picture, then its done-marker,
last), then releases the case's lock and the bytes it held in `writing`. At most `workers` cases
are being written at once; `submit` waits for a free writer, so the queue stays bounded. `submit`
may be called from several threads (the model streams, `streams`); `on_done` fires only in the
thread that calls `poll` and `finish` (the batch's own: progress bars and callbacks stay in one
thread), once a case is fully done; the cases one call reports, in the order they were
submitted.

Threads, not processes: the mask and volume stay where they are (no copy to a child process),
and the writers spend much of their time in zlib, numpy and file I/O, which release the GIL.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import ExitStack
from typing import Generic, TypeVar

from pipeline.inference.memory import Writing

log = logging.getLogger(__name__)

P = TypeVar("P")
R = TypeVar("R")


class Writers(Generic[P, R]):
    """A bounded pool of writer threads; see the module docstring."""

    def __init__(
        self,
        write: Callable[[P], R],
        *,
        workers: int,
        writing: Writing,
        on_done: Callable[[R], None],
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        self._write = write
        self._writing = writing
        self._on_done = on_done
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="predict-write")
        self._free = threading.Semaphore(workers)  # writers not busy
        self._guard = threading.Lock()  # over _running and _submitted
        self._running: dict[Future, int] = {}  # future -> submission number
        self._submitted = 0

    def __enter__(self) -> Writers[P, R]:
        return self

    def __exit__(self, *exc_info: object) -> None:
        # Also on an interrupt: the cases being written finish (each takes well under a minute),
        # so none is left half-written by us; a kill leaves them without a done-marker.
        try:
            if exc_info[0] is None:
                self.finish()
        finally:
            self._pool.shutdown(wait=True)

    def submit(self, item: P, lock: ExitStack, planned_bytes: int) -> None:
        """Write `item` in a writer thread, which closes `lock` (the case's lock) when the case
        is done. Waits for a free writer first; safe to call from several threads."""
        self._free.acquire()
        self._writing.hold(planned_bytes)
        try:
            with self._guard:
                future = self._pool.submit(self._run, item, lock, planned_bytes)
                self._running[future] = self._submitted
                self._submitted += 1
        except BaseException:
            self._writing.release(planned_bytes)
            self._free.release()
            lock.close()
            raise

    def poll(self) -> None:
        """Report the cases finished so far (without waiting)."""
        with self._guard:
            done = {f for f in self._running if f.done()}
        self._collect(done)

    def finish(self) -> None:
        """Wait for every case submitted, reporting each (once no thread submits any more)."""
        while True:
            with self._guard:
                running = set(self._running)
            if not running:
                return
            self._collect(wait(running, return_when=FIRST_COMPLETED).done)

    def _run(self, item: P, lock: ExitStack, planned_bytes: int) -> R:
        try:
            return self._write(item)
        finally:
            self._writing.release(planned_bytes)
            lock.close()
            self._free.release()

    def _collect(self, done: set[Future]) -> None:
        with self._guard:
            order = sorted(done, key=self._running.__getitem__)  # in submission order
            for future in order:
                del self._running[future]
        for future in order:
            self._on_done(future.result())  # `write` records a case's failure; it never raises for one
