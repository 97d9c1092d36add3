"""The per-case push record (OUT/<case_id>/push.json) and the results.csv push columns (a leaf module).

The record says, per destination, which output files were pushed (by their sha256) and the SOP
Instance UIDs the destination stored, or why the last attempt failed. A push is repeated only
for a file whose bytes the record does not list as pushed to that destination, so a rerun never
pushes a case twice, and a failed push is retried by the next run.
"""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import Any

PUSH_FILE = "push.json"


class PushStatus(StrEnum):
    """A case's push state in results.csv (`push_status`)."""

    PUSHED = "pushed"  # every DICOM output of the case is stored at the destination
    PUSH_FAILED = "push_failed"  # the destination was down or refused; `push_reason` says which
    NOTHING_TO_PUSH = "nothing_to_push"  # no DICOM output (a NIfTI case): masks stay in OUT


def read_push_record(case_dir: Path) -> dict[str, Any]:
    """The case's push record ({} when it was never pushed or the record is unreadable)."""
    try:
        data = json.loads((Path(case_dir) / PUSH_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def push_columns(with_uids: bool = True) -> list[str]:
    """results.csv's push columns; the UIDs only in the copy that stays in OUT."""
    return ["push_status", "push_reason", *(["pushed_sop_instance_uids"] if with_uids else [])]


def push_cells(case_dir: Path, with_uids: bool = True) -> list[str]:
    """The push columns of one case, for its last push destination (blank when never pushed)."""
    record = read_push_record(case_dir)
    last = record.get("destinations", {}).get(record.get("last", ""), {})
    uids = ";".join(obj["sop_instance_uid"] for obj in last.get("objects", {}).values() if obj.get("pushed"))
    cells = [last.get("status", ""), last.get("reason", "")]
    return [*cells, uids] if with_uids else cells
