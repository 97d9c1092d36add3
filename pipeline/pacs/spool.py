"""The resumable spool a PACS source is retrieved into, and what a pull did (the pull report).

Layout under the output folder (OUT/.spool/):

    partial/<series_key>/<instance_key>.dcm   series being retrieved (or left incomplete)
    series/<series_key>/<instance_key>.dcm    complete series only: the folder ingest and predict read

Keys are HMACs of the UIDs keyed by the site secret (the same secret that keys case IDs), so no
UID reaches a path or a table, and the same instance always lands at the same name: a rerun
finds what an interrupted one left and fetches only the rest. Every file is written atomically
(a temporary file renamed into place), so a file at its final name is whole; a series folder is
renamed from partial/ to series/ only once every instance the PACS listed is there, so the
folder ingest reads never holds half a series.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import Reason
from pipeline.io.atomic import atomic_path, write_text

log = logging.getLogger(__name__)

SPOOL_DIR = ".spool"
PULL_REPORT = "pull_report.json"


class SeriesStatus:
    """What became of one series of a pull (values of SeriesPull.status)."""

    COMPLETE = "complete"  # every listed instance is spooled; the series goes to ingest
    INCOMPLETE = "incomplete"  # some listed instances did not arrive: quarantined with a reason
    SKIPPED = "skipped"  # not an image series for this use (SEG, SR, PR... when predicting)


@dataclass(frozen=True)
class SeriesRef:
    """One series a search found (UIDs stay in memory; reports carry its spool key)."""

    study_uid: str
    series_uid: str
    modality: str
    n_instances: int | None  # NumberOfSeriesRelatedInstances when the PACS gives it


@dataclass
class SeriesPull:
    """One series of a pull; nothing identifying (the key is an HMAC of its UIDs)."""

    key: str
    modality: str
    status: str = SeriesStatus.INCOMPLETE
    reason: str = ""  # a Reason value when incomplete
    message: str = ""
    listed: int = 0  # instances the PACS listed for the series
    reused: int = 0  # instances already spooled intact by an earlier pull
    fetched: int = 0  # instances retrieved now
    bytes: int = 0  # bytes written now
    seconds: float = 0.0


@dataclass
class PullReport:
    """What a pull did: series and instance counts, bytes and time, and its quarantine records.

    Accounting: listed = reused + fetched + missing for every series, and found = complete +
    incomplete + skipped series. No query value is kept (it may be an accession number).
    """

    source: str  # PacsUrl.describe(): protocol, host, path and query keys only
    folder: str  # the spool folder of complete series, which ingest/predict then read
    series: list[SeriesPull] = field(default_factory=list)
    study_date: str = ""  # the resolved StudyDate filter, when the query had one
    search_seconds: float = 0.0
    seconds: float = 0.0

    def count(self, status: str) -> int:
        return sum(s.status == status for s in self.series)

    @property
    def bytes(self) -> int:
        return sum(s.bytes for s in self.series)

    def quarantine(self) -> list[dict[str, Any]]:
        """One record per incomplete series, like ingest's quarantine.jsonl lines."""
        return [
            {
                "path": f"{SPOOL_DIR}/partial/{s.key}",
                "reason": s.reason,
                "message": s.message,
                "listed": s.listed,
                "received": s.reused + s.fetched,
            }
            for s in self.series
            if s.status == SeriesStatus.INCOMPLETE
        ]

    def to_json(self) -> dict[str, Any]:
        listed = sum(s.listed for s in self.series)
        received = sum(s.reused + s.fetched for s in self.series)
        return {
            "source": self.source,
            "folder": self.folder,
            "study_date": self.study_date,
            "counts": {
                "series_found": len(self.series),
                "series_complete": self.count(SeriesStatus.COMPLETE),
                "series_incomplete": self.count(SeriesStatus.INCOMPLETE),
                "series_skipped": self.count(SeriesStatus.SKIPPED),
                "instances_listed": listed,
                "instances_reused": sum(s.reused for s in self.series),
                "instances_fetched": sum(s.fetched for s in self.series),
                "instances_missing": listed - received,
                "bytes_fetched": self.bytes,
            },
            "search_seconds": round(self.search_seconds, 3),
            "seconds": round(self.seconds, 3),
            "series": [asdict(s) for s in self.series],
            "quarantine": self.quarantine(),
        }

    def write(self, out: Path) -> Path:
        path = out / PULL_REPORT
        write_text(path, json.dumps(self.to_json(), indent=2) + "\n")
        return path


class Spool:
    """The spool folder of one output folder; see the module docstring for the layout."""

    def __init__(self, out: Path, secret: bytes) -> None:
        self.root = Path(out) / SPOOL_DIR
        self.complete_root = self.root / "series"
        self.partial_root = self.root / "partial"
        self._secret = secret

    def _hmac(self, text: str, n: int) -> str:
        return hmac.new(self._secret, text.encode("utf-8"), hashlib.sha256).hexdigest()[:n]

    def series_key(self, study_uid: str, series_uid: str) -> str:
        return "series_" + self._hmac(f"{study_uid}/{series_uid}", 16)

    def instance_name(self, sop_uid: str) -> str:
        return self._hmac(sop_uid, 24) + ".dcm"

    def complete_count(self, key: str) -> int:
        """Instances in the complete folder of a series (0 when it is not complete)."""
        folder = self.complete_root / key
        return sum(1 for p in folder.glob("*.dcm")) if folder.is_dir() else 0

    def open_partial(self, key: str) -> Path:
        """The series' partial folder, holding whatever an earlier pull spooled (moved back from
        series/ when the PACS now lists more instances than were complete)."""
        partial, complete = self.partial_root / key, self.complete_root / key
        partial.parent.mkdir(parents=True, exist_ok=True)
        if complete.is_dir():
            if partial.is_dir():  # both exist only after a crash between two renames: merge
                for f in complete.iterdir():
                    os.replace(f, partial / f.name)
                complete.rmdir()
            else:
                os.replace(complete, partial)
        partial.mkdir(exist_ok=True)
        return partial

    def intact(self, folder: Path, sop_uid: str) -> bool:
        """True when the instance is spooled whole: its file parses and carries that SOP UID."""
        import pydicom
        from pydicom.errors import InvalidDicomError

        path = folder / self.instance_name(sop_uid)
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
        except (OSError, InvalidDicomError, ValueError, EOFError):
            return False
        return str(getattr(ds, "SOPInstanceUID", "")) == sop_uid

    def write_instance(self, folder: Path, dataset) -> int:
        """Write one retrieved instance atomically under its key; returns the bytes written."""
        final = folder / self.instance_name(str(dataset.SOPInstanceUID))
        with atomic_path(final) as tmp:
            dataset.save_as(tmp, enforce_file_format=True)
            size = tmp.stat().st_size
        return size

    def write_bytes(self, folder: Path, sop_uid: str, data: bytes) -> int:
        final = folder / self.instance_name(sop_uid)
        with atomic_path(final) as tmp:
            tmp.write_bytes(data)
        return len(data)

    def finish(self, key: str) -> Path:
        """Move a series whose instances are all spooled to series/ (temporary leftovers removed)."""
        partial, complete = self.partial_root / key, self.complete_root / key
        for leftover in partial.glob(".*.tmp*"):  # from a pull killed mid-write
            leftover.unlink(missing_ok=True)
        complete.parent.mkdir(parents=True, exist_ok=True)
        if complete.is_dir():
            shutil.rmtree(complete)
        os.replace(partial, complete)
        return complete

    def ready_folder(self) -> Path:
        """The folder of complete series (made if absent, so an empty pull is an empty source)."""
        self.complete_root.mkdir(parents=True, exist_ok=True)
        return self.complete_root


def incomplete(series: SeriesPull, missing: int, why: str = "") -> SeriesPull:
    """Mark a series incomplete with PACS_INCOMPLETE_SERIES and a message saying what to do."""
    series.status = SeriesStatus.INCOMPLETE
    series.reason = series.reason or Reason.PACS_INCOMPLETE_SERIES.value
    received = series.reused + series.fetched
    series.message = (
        f"the PACS listed {series.listed} instances for this series but delivered {received} "
        f"({missing} missing{': ' + why if why else ''}); it is left out of this batch, and the next "
        f"pull fetches only the missing instances"
    )
    return series
