"""What an ingest writes for the batch: the manifest, the quarantine list, the report and
dataset.json, and the accounting that gives every discovered file exactly one disposition."""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import IGNORED_REASONS, InputRejected, Reason, Status
from pipeline.io.atomic import atomic_open, write_text
from pipeline.io.manifest import MANIFEST
from pipeline.io.walk import printable, printable_record

log = logging.getLogger(__name__)

ACCEPTED = "accepted"  # a file's disposition beside Status.QUARANTINED and Status.IGNORED


def rejection_status(reason: Reason) -> Status:
    """IGNORED for a file that is not an input at all (NOT_DICOM, ...), else QUARANTINED."""
    return Status.IGNORED if reason in IGNORED_REASONS else Status.QUARANTINED


@dataclass
class IngestReport:
    """What happened to every discovered file, and to every case."""

    discovered: int = 0
    accepted: int = 0  # files that went into a case (images, SEGs, labels, dataset.json)
    quarantined: int = 0
    ignored: int = 0  # not inputs at all (reports, Thumbs.db, empty files, DICOMDIR)
    cases: int = 0
    cases_converted: int = 0
    cases_skipped: int = 0  # unchanged since the last run
    by_reason: dict[str, int] = field(default_factory=dict)
    # case_id -> what its series lacks (n_missing_files, missing_mm, message), for partial cases
    partial: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def balanced(self) -> bool:
        return self.accepted + self.quarantined + self.ignored == self.discovered

    @property
    def clean(self) -> bool:
        """Nothing quarantined: every rejection, if any, is an ignored non-input (NOT_DICOM, ...)."""
        return self.quarantined == 0 and all(Reason(r) in IGNORED_REASONS for r in self.by_reason)


def account(
    files: list[str], accepted: list[str], records: dict[str, dict], rejected: list[InputRejected]
) -> IngestReport:
    """Give every discovered file exactly one disposition and count them."""
    status: dict[str, str] = {}
    for err in rejected:
        # "files": the discovered files the rejection covers; [] for a note about no file of its
        # own (a dataset.json entry naming a file outside the dataset, a DICOMDIR's absent files).
        rels = err.details.get("files", [err.path])
        for rel in rels:
            status.setdefault(rel, rejection_status(err.reason))
    for record in records.values():
        for rel in record["source"]["files"]:
            status.setdefault(rel, ACCEPTED)
    for rel in accepted:
        status.setdefault(rel, ACCEPTED)
    report = IngestReport(discovered=len(files), cases=len(records))
    counts = Counter(status.get(rel) for rel in files)
    report.accepted, report.quarantined = counts[ACCEPTED], counts[Status.QUARANTINED]
    report.ignored = counts[Status.IGNORED]
    if counts[None]:
        missing = [rel for rel in files if rel not in status]
        log.error(
            "ingest left %d files unaccounted for, e.g. %s", len(missing), [printable(m) for m in missing[:3]]
        )
    report.by_reason = dict(sorted(Counter(err.reason.value for err in rejected).items()))
    return report


def write_outputs(
    staging: Path,
    records: dict[str, dict],
    rejected: list[InputRejected],
    report: IngestReport,
    table: dict[str, int],
) -> None:
    # Paths are written in their printable form: a name that is not valid UTF-8 shows its bytes
    # as \xNN instead of breaking the JSON (or the tools that read it).
    with atomic_open(staging / MANIFEST) as fh:
        for case_id in sorted(records):
            fh.write(json.dumps(printable_record(records[case_id])) + "\n")
    with atomic_open(staging / "quarantine.jsonl") as fh:
        for err in sorted(rejected, key=lambda e: (e.path, e.reason.value)):
            record = {"status": rejection_status(err.reason).value, **err.to_record()}
            record = json.loads(json.dumps(record, default=str))
            fh.write(json.dumps(printable_record(record)) + "\n")
    report_dict = asdict(report) | {"balanced": report.balanced, "clean": report.clean}
    write_text(staging / "ingest_report.json", json.dumps(report_dict, indent=2) + "\n")
    dataset = {
        "name": "unet-pipeline staging",
        "labels": dict(sorted(table.items(), key=lambda kv: kv[1])),
        "modalities": sorted({r["modality"] for r in records.values()}),
        "numCases": len(records),
        "numLabelled": sum(1 for r in records.values() if r["label"]),
        "file_ending": ".nii.gz",
    }
    write_text(staging / "dataset.json", json.dumps(dataset, indent=2) + "\n")
