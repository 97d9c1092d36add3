"""Converting one case: decode its image (and label) and write them as NIfTI with its record.

Runs in worker processes. A case holds one volume at a time; a bad input raises InputRejected,
which `convert_safely` turns into the case's rejection (never the batch's traceback).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pipeline.errors import InputRejected, Reason
from pipeline.ingest.jobs import CaseJob
from pipeline.ingest.limits import IngestLimits
from pipeline.io.atomic import atomic_open
from pipeline.io.batchdir import sha256_file
from pipeline.io.dicom import load_series
from pipeline.io.nifti import load_label, load_nifti, value_counts
from pipeline.io.seg import read_seg_labels
from pipeline.io.volume import Volume, save_nifti

# Bump when the conversion itself changes, so reruns redo cases converted by older code.
CONVERTER_VERSION = "2"  # 2: DICOM transfer syntax detected from the data when the meta lacks it
# STAGING/.records/<case_id>.json: each converted case's manifest record, written after its
# outputs: the case's done record (it stands while its inputs' sha256 and its outputs do).
RECORDS_DIR = ".records"


def _remap_labels(label: Volume, names: dict[int, str], table: dict[str, int]) -> Volume:
    """Renumber a label map's values so that equal names get equal values across cases."""
    lut = np.arange(max(256, int(label.data.max()) + 1), dtype=np.int64)
    for value, name in names.items():
        lut[value] = table[name]
    if all(lut[v] == v for v in names):
        return label
    data = lut[label.data].astype(label.data.dtype)
    return Volume(data, label.affine, "SEG", label.meta)


def _seg_label(job: CaseJob, source: Path, grid: Volume, table: dict[str, int] | None) -> Volume | None:
    """The label Volume of a DICOM case's SEGs on the image's grid (None without SEGs).

    Only the image's shape, affine and modality are used: `grid` may be a stand-in without voxels.
    """
    label: Volume | None = None
    for rel in job.segs:
        seg_label, names = read_seg_labels(source / rel, rel, job.group.headers, grid)  # type: ignore[union-attr]
        if table is not None:
            seg_label = _remap_labels(seg_label, names, table)
        if label is None:
            label = seg_label
        else:  # several SEGs for one series: later segments paint over earlier ones
            label.data[seg_label.data > 0] = seg_label.data[seg_label.data > 0]
    return label


def _stand_in(image: Volume) -> Volume:
    """The image's grid, dtype and facts with a zero-byte stand-in for its voxels."""
    return Volume(
        np.broadcast_to(image.data.dtype.type(0), image.shape), image.affine, image.modality, image.meta
    )


def _nifti_image(job: CaseJob, source: Path, limits: IngestLimits) -> Volume:
    assert job.nifti is not None  # a NIfTI job always names its files
    return load_nifti(
        source / job.nifti.image,
        job.nifti.image,
        max_voxels=limits.max_voxels,
        max_bytes=limits.max_bytes,
        allow_no_orientation=limits.allow_no_orientation,
    )


def _nifti_label(job: CaseJob, source: Path, grid: Volume, limits: IngestLimits) -> Volume:
    """The NIfTI case's label on the image's grid (`grid` may be a stand-in without voxels)."""
    assert job.nifti is not None and job.nifti.label
    return load_label(
        source / job.nifti.label,
        job.nifti.label,
        grid,
        allowed_labels=job.allowed_labels,
        max_voxels=limits.max_voxels,
        max_bytes=limits.max_bytes,
        allow_no_orientation=limits.allow_no_orientation,
    )


def load_case(
    job: CaseJob, source: Path, limits: IngestLimits, table: dict[str, int] | None = None
) -> tuple[Volume, Volume | None]:
    """Decode one case: its image Volume and, when the source has one, its label Volume.

    `table` maps label names to values across cases (DICOM SEG segment numbers are renumbered by
    name); without it, SEG segment numbers are kept. Raises InputRejected for a bad input.
    """
    label: Volume | None = None
    if job.kind == "dicom":
        if job.group is None:
            raise ValueError(f"case {job.case_id}: a DICOM job without its series group")
        image = load_series(job.group, max_voxels=limits.max_voxels)
        return image, _seg_label(job, source, image, table)
    if job.nifti is None:
        raise ValueError(f"case {job.case_id}: a NIfTI job without its files")
    image = _nifti_image(job, source, limits)
    if job.nifti.label:
        label = _nifti_label(job, source, image, limits)
    return image, label


def _load_and_save(job: CaseJob, source: Path, staging: Path, limits: IngestLimits, table: dict[str, int]):
    """Decode the case and write its NIfTI outputs; returns (image geometry Volume, label values).

    A case holds one volume at a time: the image is written and released before its label is
    read (the label needs only the image's grid), so the peak is the larger of the two, not
    their sum. The returned Volume's data is a zero-byte stand-in of the image's shape and dtype.
    """
    image_path = staging / f"images/{job.case_id}.nii.gz"
    label_path = staging / f"labels/{job.case_id}.nii.gz"
    if job.kind == "dicom" and job.group is not None:
        image = load_series(job.group, max_voxels=limits.max_voxels)
        save_nifti(image, image_path)
        grid = _stand_in(image)
        del image
        if not job.segs:
            return grid, None
        try:
            label = _seg_label(job, source, grid, table)
            save_nifti(label, label_path)  # type: ignore[arg-type]
        except BaseException:
            image_path.unlink(missing_ok=True)  # a quarantined case leaves no image behind
            raise
        return grid, sorted(value_counts(label.data))  # type: ignore[union-attr]
    if job.kind == "nifti" and job.nifti is not None:
        image = _nifti_image(job, source, limits)
        save_nifti(image, image_path)
        grid = _stand_in(image)
        del image
        if not job.nifti.label:
            return grid, None
        try:
            label = _nifti_label(job, source, grid, limits)
            save_nifti(label, label_path)
        except BaseException:
            image_path.unlink(missing_ok=True)  # a quarantined case leaves no image behind
            raise
        return grid, sorted(label.meta["label_values"])
    image, label = load_case(job, source, limits, table)
    save_nifti(image, image_path)
    values = None
    if label is not None:
        save_nifti(label, label_path)
        values = sorted(value_counts(label.data))
    return image, values


def _convert(job: CaseJob, source: Path, staging: Path, limits: IngestLimits, table: dict[str, int]) -> dict:
    """Convert one case and write its outputs; returns its manifest record."""
    image, labels_present = _load_and_save(job, source, staging, limits, table)
    image_rel = f"images/{job.case_id}.nii.gz"
    label_rel = f"labels/{job.case_id}.nii.gz" if labels_present is not None else None
    modality = image.modality if image.modality != "unknown" else job.modality
    record = {
        "case_id": job.case_id,
        "image": image_rel,
        "label": label_rel,
        "modality": modality,
        "shape": list(image.shape),
        "spacing": [round(s, 6) for s in image.spacing],
        "affine": [[round(float(v), 6) for v in row] for row in image.affine],
        "dtype": str(image.data.dtype),
        "labels_present": labels_present or [],
        "source": {"kind": job.kind, "files": job.sources},
        # A partial DICOM series (accepted by IngestLimits.accept_partial_series): what it lacks.
        "partial": job.group.partial if job.group is not None else None,
        "sha256": {
            "inputs": job.inputs_sha256,
            "image": sha256_file(staging / image_rel),
            "label": sha256_file(staging / label_rel) if label_rel else None,
        },
    }
    if image.meta.get("affine_source") == "none":  # staged only when the config opts in
        record["orientation"] = "unknown"
    with atomic_open(staging / RECORDS_DIR / f"{job.case_id}.json") as fh:
        json.dump(record, fh)
    return record


def convert_safely(
    job: CaseJob, source: Path, staging: Path, limits: IngestLimits, table: dict[str, int]
) -> tuple[str, dict | None, InputRejected | None]:
    """A case either yields its record or one InputRejected, never an exception."""
    try:
        return job.case_id, _convert(job, source, staging, limits, table), None
    except InputRejected as err:
        # The whole case is quarantined, not just the file that failed: list all its inputs.
        err.details.setdefault("files", job.sources)
        return job.case_id, None, err
    except Exception as exc:  # noqa: BLE001 - one case's failure is its record, never the batch's
        # A failure we did not classify: keep the batch going and say what happened.
        err = InputRejected(
            Reason.CONVERSION_FAILED,
            job.sources[0],
            f"conversion failed with {type(exc).__name__}: {exc}",
            {"files": job.sources},
        )
        return job.case_id, None, err


def previous_record(staging: Path, case_id: str, inputs_sha256: str) -> dict | None:
    """The record of an earlier run for this case, if its inputs are unchanged and outputs exist."""
    path = staging / RECORDS_DIR / f"{case_id}.json"
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if record.get("sha256", {}).get("inputs") != inputs_sha256:
        return None
    outputs = [record.get("image"), record.get("label")]
    if not all((staging / rel).is_file() for rel in outputs if rel):
        return None
    return record
