"""The batch's tables: results.csv (one row per case), quarantine.jsonl and JSON records.

Every writer is atomic (a temporary file renamed into place). Tables hold case IDs, relative
source paths, reason codes and numbers only; the copy that leaves the site (e.g. to MLflow) has
no source paths and no messages.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline.errors import Status
from pipeline.inference.results import CaseResult
from pipeline.io.atomic import atomic_open, write_text
from pipeline.pacs.record import push_cells, push_columns


def result_columns(label_list: Sequence[str], with_sources: bool = True) -> list[str]:
    """results.csv's columns: case, source, status, reason, message, model, then mL and voxels per
    label, seconds.

    Without sources (the copy that leaves the site, e.g. to MLflow) there is no `source` column and
    no `message` (a failure's message may quote a file name).
    """
    cols = [
        "case_id",
        *(["source"] if with_sources else []),
        "status",
        "reason",
        *(["message"] if with_sources else []),
        "model_name",
        "model_version",
    ]
    for name in label_list:
        cols += [f"{name}_ml", f"{name}_voxels"]
    # push state (pipeline.pacs.record); the pushed UIDs stay in OUT's copy only
    return [*cols, "seconds", *push_columns(with_uids=with_sources)]


def write_results_csv(
    path: Path,
    results: Sequence[CaseResult],
    label_list: Sequence[str],
    model_name: str,
    model_version: str,
    *,
    with_sources: bool = True,
    case_root: Path | None = None,
) -> Path:
    """`case_root`: the folder holding the case folders (OUT), whose push records fill the push
    columns; None leaves them blank."""
    with atomic_open(path) as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(result_columns(label_list, with_sources))
        for r in results:
            source = [r.source] if with_sources else []
            message = [r.message] if with_sources else []
            row: list[Any] = [r.case_id, *source, r.status, r.reason, *message, model_name, model_version]
            for name in label_list:
                ok = r.status == Status.OK
                row += [r.volumes_ml.get(name, "") if ok else "", r.voxels.get(name, "") if ok else ""]
            push = (
                push_cells(case_root / r.case_id, with_sources)
                if case_root is not None and r.case_id
                else [""] * len(push_columns(with_sources))
            )
            writer.writerow([*row, f"{r.seconds:.3f}" if r.status == Status.OK else "", *push])
    return path


def write_jsonl(path: Path, records: Sequence[Mapping[str, Any]]) -> Path:
    with atomic_open(path) as fh:
        for rec in records:
            fh.write(json.dumps(rec, default=str) + "\n")
    return path


def write_json(path: Path, data: Any) -> Path:
    write_text(path, json.dumps(data, indent=2, default=str) + "\n")
    return path
