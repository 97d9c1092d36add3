"""Push each case's DICOM outputs (the SEG, optionally an SR of the volumes) to a PACS.

`push_batch` runs after a predict batch (its cases' outputs are final): per ok case it sends the
files the case's push record (pipeline.pacs.record) does not list as pushed to that destination
with those exact bytes, over STOW-RS (dicomweb+http(s)://) or C-STORE (dimse://AET@HOST:PORT),
and records the stored SOP Instance UIDs, or `push_failed` with the reason. The masks stay
written whatever the destination does; the next run retries what failed and skips what is
stored, so a case is never pushed twice.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline.errors import Reason
from pipeline.io.atomic import write_text
from pipeline.io.batchdir import exclusive, sha256_file
from pipeline.pacs.common import PULL_PREFIX, PUSH_PREFIX, Credentials, PacsError
from pipeline.pacs.record import PUSH_FILE, PushStatus, read_push_record
from pipeline.pacs.url import PacsUrl, parse_pacs_url

log = logging.getLogger(__name__)

SEG_FILE = "seg.dcm"  # written by predict (pipeline.inference.records.SEG_FILE)
SR_FILE = "sr.dcm"  # written here, from the SEG and the case's volumes, when asked for
DONE_FILE = "done.json"  # predict's done-marker (pipeline.inference.records.DONE_FILE)


@dataclass
class PushReport:
    """What a push did: per-case outcomes (pseudonymous IDs), counts, bytes and time."""

    destination: str  # PacsUrl.describe()
    cases: dict[str, dict[str, Any]] = field(default_factory=dict)  # case_id -> outcome
    seconds: float = 0.0
    bytes: int = 0

    def count(self, status: str) -> int:
        return sum(c["status"] == status for c in self.cases.values())

    def to_json(self) -> dict[str, Any]:
        return {
            "destination": self.destination,
            "counts": dict(Counter(c["status"] for c in self.cases.values())),
            "pushed_now": sum(c.get("pushed_now", 0) for c in self.cases.values()),
            "bytes": self.bytes,
            "seconds": round(self.seconds, 3),
            "cases": self.cases,
        }


def destination(text: str) -> PacsUrl:
    """Parse a push destination; a query has no meaning there and is refused."""
    url = parse_pacs_url(text)
    if url.query:
        raise ValueError(
            f"a push destination takes no query (got keys {sorted(url.query)}): {url.describe()}"
        )
    return url


def push_credentials() -> Credentials:
    """UNET_PUSH_* credentials, each falling back to UNET_PACS_*."""
    return Credentials.from_env(PUSH_PREFIX, fallback=PULL_PREFIX)


def push_case(
    out: str | Path,
    case_id: str,
    target: str | PacsUrl,
    *,
    credentials: Credentials | None = None,
    with_sr: bool = False,
) -> dict[str, Any]:
    """Push one case's DICOM outputs; returns {"case_id", "status", "reason", "pushed_now", "bytes"}.

    Never raises for the destination (down, refusing): that is the case's `push_failed` record.
    A case without a done-marker is not pushed (FileNotFoundError: predict it first).
    """
    url = target if isinstance(target, PacsUrl) else destination(target)
    case_dir = Path(out) / case_id
    if not (case_dir / DONE_FILE).is_file():
        raise FileNotFoundError(f"{case_dir} has no done-marker: predict the case before pushing it")
    creds = (
        credentials if credentials is not None else Credentials.from_env(PUSH_PREFIX, fallback=PULL_PREFIX)
    )
    with exclusive(case_dir / ".push.lock"):  # two pushes of one case (a flow and a CLI run) take turns
        if with_sr and (case_dir / SEG_FILE).is_file():
            from pipeline.pacs.sr import write_volume_sr

            write_volume_sr(case_dir)
        return _push_locked(case_dir, case_id, url, creds)


def _push_locked(case_dir: Path, case_id: str, url: PacsUrl, creds: Credentials) -> dict[str, Any]:
    import pydicom

    record = read_push_record(case_dir)
    where = url.describe()
    entry = record.setdefault("destinations", {}).setdefault(where, {"objects": {}})
    files = [name for name in (SEG_FILE, SR_FILE) if (case_dir / name).is_file()]
    outcome = {"case_id": case_id, "status": "", "reason": "", "pushed_now": 0, "bytes": 0}
    if not files:
        entry.update(status=PushStatus.NOTHING_TO_PUSH.value, reason="", message="no DICOM output")
        outcome["status"] = PushStatus.NOTHING_TO_PUSH.value
    else:
        hashes = {name: sha256_file(case_dir / name) for name in files}
        objects = entry["objects"]
        for name in list(objects):  # outputs that a later predict run replaced or removed
            if name not in hashes:
                del objects[name]
        todo = [
            n for n in files if not (objects.get(n, {}).get("pushed") and objects[n]["sha256"] == hashes[n])
        ]
        if todo:
            datasets = [pydicom.dcmread(case_dir / n) for n in todo]
            now = datetime.now(UTC).isoformat(timespec="seconds")
            try:
                if url.protocol == "dicomweb":
                    from pipeline.pacs.dicomweb import store
                else:
                    from pipeline.pacs.dimse import store  # type: ignore[assignment]
                store(url, datasets, creds)
                pushed, reason, message = True, "", ""
            except PacsError as err:
                pushed, reason, message = False, err.reason.value, err.message
            for n, ds in zip(todo, datasets, strict=True):
                objects[n] = {
                    "sha256": hashes[n],
                    "sop_instance_uid": str(ds.SOPInstanceUID),
                    "pushed": pushed,
                    "at": now,
                }
            if pushed:
                outcome["pushed_now"] = len(todo)
                outcome["bytes"] = sum((case_dir / n).stat().st_size for n in todo)
            entry["attempted_at"] = now
        else:
            reason, message = "", ""
        ok = all(objects.get(n, {}).get("pushed") for n in files)
        entry.update(
            status=(PushStatus.PUSHED if ok else PushStatus.PUSH_FAILED).value,
            reason="" if ok else reason or Reason.PUSH_REFUSED.value,
            message="" if ok else message,
        )
        outcome["status"], outcome["reason"] = entry["status"], entry["reason"]
    record["last"] = where
    write_text(case_dir / PUSH_FILE, json.dumps(record, indent=2) + "\n")
    return outcome


def push_batch(
    out: str | Path,
    target: str,
    case_ids: list[str],
    *,
    credentials: Credentials | None = None,
    with_sr: bool = False,
) -> PushReport:
    """Push the given (ok) cases of a predicted batch; see the module docstring. Logs one line per
    failed case (its reason) and a summary; identifiers never appear (case IDs only)."""
    url = destination(target)
    out = Path(out).resolve()
    creds = (
        credentials if credentials is not None else Credentials.from_env(PUSH_PREFIX, fallback=PULL_PREFIX)
    )
    report = PushReport(destination=url.describe())
    t0 = time.perf_counter()
    for case_id in case_ids:
        outcome = push_case(out, case_id, url, credentials=creds, with_sr=with_sr)
        report.cases[case_id] = outcome
        report.bytes += outcome["bytes"]
        if outcome["status"] == PushStatus.PUSH_FAILED:
            entry = read_push_record(out / case_id)["destinations"][url.describe()]
            log.warning("case %s: push failed: %s: %s", case_id, entry["reason"], entry["message"])
    report.seconds = time.perf_counter() - t0
    log.info(
        "push to %s: %d pushed (%d objects now), %d failed, %d with nothing to push",
        report.destination,
        report.count(PushStatus.PUSHED),
        report.to_json()["pushed_now"],
        report.count(PushStatus.PUSH_FAILED),
        report.count(PushStatus.NOTHING_TO_PUSH),
    )
    return report
