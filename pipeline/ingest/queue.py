"""Which found cases may convert now: at most a number of slots, within a memory budget.

`ingest`'s process pool and the ingest flow's tasks share it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from pipeline.ingest.limits import IngestLimits, planned_peak_bytes
from pipeline.io.batchdir import BatchDir


class ConversionQueue:
    """Which cases of a batch may convert now, for `ingest`'s process pool and the ingest flow's tasks.

        queue = ConversionQueue(staging, case_ids, limits, slots)
        while queue.busy:
            for case_id in queue.ready(): start it
            ... when one ends: queue.finished(case_id)

    At most `slots` run at once (fewer when the budget cannot hold that many of the smallest);
    with `limits.memory_budget` set, cases start only while the planned peaks of those running
    (`planned_peak_bytes` of each case's largest volume, from its case record) fit the budget; a case
    larger than the budget runs alone. Cases not in `todo` (given: the others are unchanged and
    cost no conversion) count no memory.
    """

    def __init__(
        self,
        staging: str | Path,
        case_ids: list[str],
        limits: IngestLimits,
        slots: int,
        todo: Iterable[str] | None = None,
    ) -> None:
        batch = BatchDir(Path(staging).resolve())
        convert = set(case_ids if todo is None else todo)
        self.peaks = {
            c: planned_peak_bytes(int(batch.read_case(c).get("volume_bytes", 0))) if c in convert else 0
            for c in case_ids
        }
        self.pending = list(case_ids)
        self.budget = limits.memory_budget
        self.slots = max(1, slots)
        if self.budget is not None and convert:
            self.slots = max(1, min(self.slots, self.budget // min(v for v in self.peaks.values() if v)))
        self.running: dict[str, int] = {}

    @property
    def busy(self) -> bool:
        """Cases are waiting or running."""
        return bool(self.pending or self.running)

    def ready(self) -> list[str]:
        """The cases that may start now (first fit, in order); they count as running."""
        admitted = _admit(self.pending, self.peaks, self.running, self.slots, self.budget)
        for case_id in admitted:
            self.running[case_id] = self.peaks[case_id]
        return admitted

    def finished(self, case_id: str) -> None:
        self.running.pop(case_id)


def _admit(
    pending: list[str], peaks: dict[str, int], running: Mapping[Any, int], workers: int, budget: int | None
) -> list[str]:
    """Take from `pending` (first fit, in order) the cases that may start now; removes them.

    Within the budget the running cases' planned peaks sum to at most `budget`; with nothing
    running one case always starts, so a case larger than the budget runs, alone.
    """
    admitted = []
    used = sum(running.values())
    for case_id in list(pending):
        if len(running) + len(admitted) >= workers:
            break
        fits = budget is None or used + peaks[case_id] <= budget
        if fits or (not running and not admitted):
            admitted.append(case_id)
            pending.remove(case_id)
            used += peaks[case_id]
    return admitted
