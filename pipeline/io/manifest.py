"""STAGING/manifest.jsonl, read back: one reader for ingest, planning, training and inference."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MANIFEST = "manifest.jsonl"


def read_manifest(staging: str | Path, *, resolve: bool = False) -> list[dict[str, Any]]:
    """The manifest's records, as written (paths relative to STAGING).

    resolve=True gives rows ready for training and inference: `image`/`label` as absolute paths
    (label None when absent) and `modality` upper-cased ("UNKNOWN" when missing).
    Raises FileNotFoundError for a folder without a manifest, ValueError naming the line for a
    line that is not JSON or lacks case_id or image.
    """
    staging = Path(staging)
    path = staging / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: is {staging} a staging folder made by `unet-pipeline ingest`?"
        )
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{n} is not valid JSON: {exc}") from exc
        missing = {"case_id", "image"} - set(row)
        if missing:
            raise ValueError(f"{path}:{n} lacks {', '.join(sorted(missing))}")
        if resolve:
            row["image"] = str(staging / row["image"])
            row["label"] = str(staging / row["label"]) if row.get("label") else None
            row["modality"] = str(row.get("modality") or "unknown").upper()
        rows.append(row)
    return rows
