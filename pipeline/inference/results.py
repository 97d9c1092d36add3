"""What a batch did: one `CaseResult` per row of results.csv and the batch's `PredictSummary`.

A leaf module (it imports no stage), so the output writers and the batch share these types
without importing each other.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import Status

EXIT_OK, EXIT_PARTIAL, EXIT_NOTHING = 0, 1, 2


@dataclass
class CaseResult:
    """One row of results.csv."""

    case_id: str
    source: str
    status: Status  # OK, QUARANTINED or FAILED
    reason: str = ""  # a Reason value for quarantined and failed cases
    volumes_ml: dict[str, float] = field(default_factory=dict)  # label name -> mL
    voxels: dict[str, int] = field(default_factory=dict)  # label name -> voxel count
    seconds: float = 0.0
    skipped: bool = False  # done by an earlier run with the same input and model
    message: str = ""  # one line: why the case was quarantined or failed

    def __post_init__(self) -> None:
        self.status = Status(self.status)  # read back from a done-marker or a record: the enum again

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class PredictSummary:
    """What a batch did; `exit_code` is the CLI's."""

    out: Path
    results: list[CaseResult]
    ignored: int = 0  # files that are not inputs at all (reports, Thumbs.db)

    def count(self, status: Status) -> int:
        return sum(r.status == status for r in self.results)

    @property
    def processed(self) -> int:
        return sum(r.status == Status.OK and not r.skipped for r in self.results)

    @property
    def skipped(self) -> int:
        return sum(r.skipped for r in self.results)

    def counts(self) -> dict[str, int]:
        """The batch's counts, as run_manifest.json records them and the flow reports them."""
        return {
            "cases": len(self.results),
            "ok": self.count(Status.OK),
            "processed": self.processed,
            "skipped": self.skipped,
            "quarantined": self.count(Status.QUARANTINED),
            "failed": self.count(Status.FAILED),
            "ignored_files": self.ignored,
        }

    @property
    def exit_code(self) -> int:
        """0: every case ok; 1: some ok, some quarantined or failed; 2: no case ok."""
        if self.count(Status.OK) == 0:
            return EXIT_NOTHING
        return EXIT_OK if self.count(Status.OK) == len(self.results) else EXIT_PARTIAL
