"""The job records of ingest: one found case, everything a worker needs to decode it and nothing
identifying, and its JSON form in the batch's work folder (`pipeline.io.batchdir`).

Predict finds its cases by the same rules and keeps the same records (`job_to_json`,
`job_from_json`), so a case's inputs mean the same thing to both stages.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import InputRejected, Reason
from pipeline.ingest.limits import IngestLimits
from pipeline.io.dicom import SeriesGroup, assemble_series, read_header
from pipeline.io.nifti import NiftiCase


@dataclass
class CaseJob:
    """One found case: everything a worker process needs to decode it, nothing identifying."""

    case_id: str
    kind: str  # "dicom" or "nifti"
    sources: list[str]  # relative paths of every input file of the case
    inputs_sha256: str
    group: SeriesGroup | None = None
    segs: list[str] = field(default_factory=list)
    nifti: NiftiCase | None = None
    allowed_labels: set[int] | None = None
    label_names: dict[int, str] = field(default_factory=dict)
    modality: str = "unknown"
    volume_bytes: int = 0  # in-memory size of its largest decoded volume, from the headers


def case_id_for(key: str, secret: bytes) -> str:
    """Pseudonymous, stable case ID: 'case_' + 16 hex digits of HMAC-SHA256(secret, key)."""
    # surrogateescape: a file name that is not valid UTF-8 keys by its bytes (valid names: UTF-8).
    return "case_" + hmac.new(secret, key.encode("utf-8", "surrogateescape"), hashlib.sha256).hexdigest()[:16]


def job_to_json(job: CaseJob) -> dict[str, Any]:
    """The job as JSON (relative paths and facts; a DICOM series as the names of its files)."""
    return {
        "case_id": job.case_id,
        "kind": job.kind,
        "sources": job.sources,
        "inputs_sha256": job.inputs_sha256,
        "images": [h.rel for h in job.group.headers] if job.group else [],
        "partial": job.group.partial if job.group else None,
        "segs": job.segs,
        "nifti": asdict(job.nifti) if job.nifti else None,
        "allowed_labels": sorted(job.allowed_labels) if job.allowed_labels is not None else None,
        "label_names": {str(k): v for k, v in job.label_names.items()},
        "modality": job.modality,
        "volume_bytes": job.volume_bytes,
    }


def job_from_json(data: dict[str, Any], source: Path, secret: bytes, limits: IngestLimits) -> CaseJob:
    """Rebuild a job from `job_to_json`; a DICOM series is re-assembled from its files' headers
    (raises InputRejected when they no longer make the series)."""
    group = None
    if data["kind"] == "dicom":
        headers = [read_header(source / rel, source, limits.max_pixels_per_file) for rel in data["images"]]
        groups, rejected = assemble_series(headers)
        matches = [g for g in groups if case_id_for(f"dicom:{g.key}", secret) == data["case_id"]]
        if len(matches) != 1:
            if rejected:
                raise rejected[0]
            raise InputRejected(
                Reason.CONVERSION_FAILED,
                data["images"][0],
                "the series changed since its cases were found; run ingest again",
                {"files": data["sources"]},
            )
        group = matches[0]
        # The refused files are not among the job's images: what they left missing was found
        # when the cases of the whole source were found.
        group.partial = data.get("partial")
    nifti = data.get("nifti")
    allowed = data.get("allowed_labels")
    return CaseJob(
        case_id=data["case_id"],
        kind=data["kind"],
        sources=list(data["sources"]),
        inputs_sha256=data["inputs_sha256"],
        group=group,
        segs=list(data["segs"]),
        nifti=NiftiCase(**{**nifti, "channels": tuple(nifti["channels"])}) if nifti else None,
        allowed_labels=set(allowed) if allowed is not None else None,
        label_names={int(k): v for k, v in data["label_names"].items()},
        modality=data["modality"],
        volume_bytes=int(data.get("volume_bytes", 0)),
    )


# Jobs found in this process, so a conversion in the same process (or handed to a pool by
# `ingest`), or a prediction in the same process (`pipeline.inference.batch.predict`), skips the
# second header pass; one elsewhere (a flow's task) re-reads the headers from the files its case
# record names. Keyed by the batch's folder (ingest's STAGING, predict's OUT) and case ID. Each
# entry carries the size and mtime of every file it read: a file changed since then sends the
# case down the re-reading path, which notices what changed.
_KEPT: dict[tuple[str, str], tuple[CaseJob, tuple]] = {}


def _file_stamps(job: CaseJob) -> tuple:
    """(size, mtime) of each of the job's DICOM files now."""
    if job.group is None:
        return ()
    stats = (h.path.stat() for h in job.group.headers)
    return tuple((st.st_size, st.st_mtime_ns) for st in stats)


def keep_job(folder: Path, job: CaseJob) -> None:
    """Keep a DICOM job of the batch in `folder` in this process for `kept_job`, with the stamps
    of its files when read (None where unknown: never fresh)."""
    if job.group is not None:
        _KEPT[(str(folder), job.case_id)] = (job, tuple(h.stamp for h in job.group.headers))


def forget_jobs(folder: Path) -> None:
    """Drop the jobs kept for the batch in `folder` (a new batch of it is being prepared, or it
    is over)."""
    for key in [k for k in list(_KEPT) if k[0] == str(folder)]:
        _KEPT.pop(key, None)


def kept_job(folder: Path, case_id: str) -> CaseJob | None:
    """The job kept in this process, if its files are as they were when their headers were read.

    (The caller checks it against the case record on disk: `inputs_sha256`.)"""
    entry = _KEPT.pop((str(folder), case_id), None)
    if entry is None:
        return None
    job, stamps = entry
    try:
        fresh = None not in stamps and _file_stamps(job) == stamps
    except OSError:
        fresh = False
    return job if fresh else None
