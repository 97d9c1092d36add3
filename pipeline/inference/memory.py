"""How many cases predict may hold in memory at once: planned case sizes against a memory budget.

Each case's peak memory is planned from its headers (voxel count and spacing, read before any
voxel is), with the per-voxel costs measured on predict's own path (see PEAK_BYTES_PER_VOXEL).
The loader then reads the next case ahead of the one computing only while both planned peaks
fit the budget; a case whose plan alone exceeds the budget still runs, alone. Cases computing in
the other model streams (`streams`: their planned peaks) and cases whose outputs are still being
written (`writers`: they hold their volume and mask until done, `planned_write_bytes`) count
against the same budget (`Writing`), so a load waits for them when the budget has no room.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Generic, TypeVar

from pipeline.system import available_memory_bytes

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

# Planned bytes of peak memory per voxel of the source grid and per voxel of the preprocessed
# grid (the slices the network sees). Measured with bench/predict_memory.py (CT, 512 x 512 x 60 to
# 240 slices, NIfTI): the peak grows by about 18 bytes per voxel (4.5x the float32 volume: the
# stored volume, its float32 copy and MONAI's in-plane resampling grid while preprocessing, then
# the float32 slices, the uint8 mask and its post-processing), plus one batch of activations that
# does not grow with the volume (0.7 GB for base 4, batch 16, 502 x 458 slices). The plan below
# (24 + 16 = 40 bytes per voxel when the grids match) keeps a margin for allocator slack: over-
# planning only costs overlap, under-planning costs memory.
PEAK_BYTES_PER_VOXEL = 24
PEAK_BYTES_PER_PREPROCESSED_VOXEL = 16
# Planned bytes per source voxel of a case whose outputs are being written: the volume as read
# (at most float32, 4), the uint8 mask (1) and the DICOM SEG's frames while highdicom builds them
# (up to 3); the slices are gone by then.
WRITE_BYTES_PER_VOXEL = 8
# Without a stated budget, cases in flight may use this share of the memory available at start.
DEFAULT_BUDGET_SHARE = 0.5


def planned_case_bytes(voxels: int, spacing: Sequence[float], *, target_spacing: float) -> int:
    """Planned peak memory (bytes) of predicting one case of `voxels` voxels at `spacing` (mm).

    In-plane resampling to `target_spacing` scales the preprocessed grid by the two finest
    spacings over the target's square (never below 1: a coarser target is not counted as a
    saving). `voxels` 0 (size unknown) plans 0: such a case is never the reason to wait.
    """
    if voxels <= 0:
        return 0
    finest = sorted(float(s) for s in spacing)[:2]
    scale = max(1.0, math.prod(finest) / float(target_spacing) ** 2) if len(finest) == 2 else 1.0
    return int(voxels * (PEAK_BYTES_PER_VOXEL + PEAK_BYTES_PER_PREPROCESSED_VOXEL * scale))


def planned_write_bytes(case_bytes: int) -> int:
    """Planned bytes a case holds while its outputs are written, from its planned peak
    (`planned_case_bytes`); counted as if its grids matched, so never under the plan."""
    per_voxel = PEAK_BYTES_PER_VOXEL + PEAK_BYTES_PER_PREPROCESSED_VOXEL
    return int(case_bytes) * WRITE_BYTES_PER_VOXEL // per_voxel


class Writing:
    """The planned bytes of the cases computing or being written now, shared by the model
    streams and writer threads (which hold and release them) and the loader (which waits for
    room)."""

    def __init__(self) -> None:
        self._held = 0
        self._changed = threading.Condition()

    @property
    def held(self) -> int:
        with self._changed:
            return self._held

    def hold(self, n: int) -> None:
        with self._changed:
            self._held += int(n)

    def release(self, n: int) -> None:
        with self._changed:
            self._held -= int(n)
            self._changed.notify_all()

    def wait_for_room(self, n: int, budget: int) -> None:
        """Return once `n` more bytes fit `budget` beside the writes, or no write is left."""
        with self._changed:
            while self._held > 0 and self._held + n > budget:
                self._changed.wait()


def default_budget() -> int:
    """DEFAULT_BUDGET_SHARE of the memory available to this process now (cgroup limit aware)."""
    return int(available_memory_bytes() * DEFAULT_BUDGET_SHARE)


def max_cases_in_flight(case_bytes: Sequence[int], budget: int, cap: int) -> int:
    """How many cases may run at once (workers, task slots) so that any `n` of them fit `budget`:
    the largest `n <= cap` whose `n` largest planned peaks sum to at most `budget`, at least 1."""
    largest = sorted((int(b) for b in case_bytes), reverse=True)
    n, total = 0, 0
    for size in largest[: max(1, cap)]:
        if n and total + size > budget:
            break
        total += size
        n += 1
    return max(1, min(n, cap)) if largest else max(1, cap)


class Pending(Generic[R]):
    """A case being loaded; `take()` hands its result over once and forgets it, so the caller's
    reference is the only one and the memory goes when the caller is done with it."""

    def __init__(self, future: Future) -> None:
        self._future: Future | None = future

    @classmethod
    def run(cls, load: Callable[[], R]) -> Pending[R]:
        """Load now, in this thread (an exception is raised by `take`)."""
        future: Future = Future()
        try:
            future.set_result(load())
        except Exception as exc:  # noqa: BLE001 - raised again by take(), where the case is classified
            future.set_exception(exc)
        return cls(future)

    def take(self) -> R:
        future, self._future = self._future, None
        if future is None:
            raise RuntimeError("a pending case was taken twice")
        return future.result()


def prefetch(
    items: Sequence[T],
    load: Callable[[T], Any],
    *,
    cost: Callable[[T], int],
    budget: int,
    writing: Writing | None = None,
    on_start: Callable[[], None] | None = None,
) -> Iterator[tuple[T, Pending]]:
    """Yield (item, its Pending load) in order, loading in one background thread (which runs
    `on_start` first: its settings, such as its intra-op thread count, made explicit).

    The next item is loaded while the current one computes only when the planned costs of both,
    plus the bytes `writing` holds, fit `budget`; otherwise its load starts once the consumer
    asks for it and `writing` leaves it room (or holds nothing). A consumer that computes
    several items at once holds the planned cost of each in `writing` while it computes, and
    must release them without waiting on this generator (as the model streams do), or a wait
    for room would never end.
    """
    if not items:
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="predict-load", initializer=on_start) as pool:
        ahead: Pending | None = None
        for i, item in enumerate(items):
            if ahead is None and writing is not None:
                writing.wait_for_room(cost(item), budget)
            current = ahead if ahead is not None else Pending(pool.submit(load, item))
            ahead = None
            if i + 1 < len(items):
                held = writing.held if writing is not None else 0
                if cost(item) + cost(items[i + 1]) + held <= budget:
                    ahead = Pending(pool.submit(load, items[i + 1]))
                else:
                    log.debug("next case not loaded ahead: the two planned peaks exceed the memory budget")
            yield item, current
            del current
