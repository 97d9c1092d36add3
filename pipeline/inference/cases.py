"""The cases of a source: found by the ingest rules (or a staging folder's manifest), loaded one by one.

SOURCE goes through `CaseFinder` (DICOM series, NIfTI, MSD datasets; MSD datasets predict their
imagesTs, never the cases they were trained on) or is a staging folder (its manifest). A case
carries what to load and its input hash, nothing identifying; `case_to_json`/`case_from_json` are
its record in the batch folder (`batchdir`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import nibabel as nib
import numpy as np

from pipeline.errors import InputRejected
from pipeline.ingest import CaseFinder, CaseJob, IngestLimits, job_to_json, load_case
from pipeline.io.manifest import read_manifest
from pipeline.io.nifti import load_nifti
from pipeline.io.volume import Volume
from pipeline.io.walk import discover


@dataclass
class PredictCase:
    """One case to predict: what to load and how to identify it (nothing identifying)."""

    case_id: str
    source: str  # relative to SOURCE: the series folder, the NIfTI file, or the staged image
    kind: str  # "dicom", "nifti" or "staging"
    inputs_sha256: str
    job: CaseJob | None = None
    image_path: Path | None = None  # staging only
    modality: str = "unknown"


def common_folder(rels: list[str]) -> str:
    """The deepest folder holding every path of `rels` (relative, POSIX); "." when none."""
    parents = [PurePosixPath(r).parent.parts for r in rels]
    common: list[str] = []
    for parts in zip(*parents, strict=False):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    return "/".join(common) or "."


def plan_cases(
    source: Path, secret: bytes, limits: IngestLimits, progress: bool = False
) -> tuple[list[PredictCase], list[InputRejected]]:
    """The cases under `source` by the ingest rules, and the rejected inputs."""
    if (source / "manifest.jsonl").is_file() and (source / "images").is_dir():
        return _staging_cases(source), []
    finder = CaseFinder(source, secret, limits)
    finder.find(discover(source), progress)
    cases = []
    for job in finder.jobs:
        if job.kind == "dicom":
            assert job.group is not None  # CaseFinder always sets it for DICOM jobs
            # Predict ignores annotations: a broken manual SEG must not stop a prediction.
            job = dataclasses.replace(job, segs=[])
            images = job.group.files
            cases.append(PredictCase(job.case_id, common_folder(images), "dicom", job.inputs_sha256, job))
        else:
            assert job.nifti is not None
            if job.nifti.split == "training":
                continue  # an MSD dataset: predict its imagesTs, not the cases it was trained on
            job = dataclasses.replace(job, nifti=dataclasses.replace(job.nifti, label=None))
            cases.append(PredictCase(job.case_id, job.nifti.image, "nifti", job.inputs_sha256, job))
    return cases, finder.rejected


def _staging_cases(staging: Path) -> list[PredictCase]:
    cases = []
    for row in read_manifest(staging):
        sha = row.get("sha256", {})
        cases.append(
            PredictCase(
                case_id=row["case_id"],
                source=row["image"],
                kind="staging",
                inputs_sha256=str(sha.get("image") or sha.get("inputs") or ""),
                image_path=staging / row["image"],
                modality=str(row.get("modality") or "unknown").upper(),
            )
        )
    return cases


def load_staged_volume(
    path: Path, rel: str, modality: str | None, limits: IngestLimits | None = None
) -> Volume:
    """A staged image (NIfTI) as predict reads it; validation during training reads it the same way."""
    limits = limits or IngestLimits()
    volume = load_nifti(path, rel, max_voxels=limits.max_voxels, max_bytes=limits.max_bytes)
    volume.modality = str(modality or "unknown").upper()
    return volume


def load_image(case: PredictCase, source: Path, limits: IngestLimits) -> Volume:
    """Decode one case's image (raises InputRejected for a bad input)."""
    if case.kind == "staging":
        assert case.image_path is not None
        return load_staged_volume(case.image_path, case.source, case.modality, limits)
    assert case.job is not None
    image, _ = load_case(case.job, source, limits)
    if image.modality == "unknown" and case.job.modality != "unknown":
        image.modality = case.job.modality
    return image


def case_to_json(case: PredictCase) -> dict[str, Any]:
    """The case's record in the batch folder (its ingest job included)."""
    return {
        "case_id": case.case_id,
        "source": case.source,
        "kind": case.kind,
        "inputs_sha256": case.inputs_sha256,
        "job": job_to_json(case.job) if case.job is not None else None,
        "image_path": str(case.image_path) if case.image_path is not None else None,
        "modality": case.modality,
    }


def case_from_json(data: dict[str, Any]) -> PredictCase:
    """The case without its job (rebuilding a DICOM job re-reads headers: see `worker.OpenBatch.job_for`)."""
    return PredictCase(
        case_id=data["case_id"],
        source=data["source"],
        kind=data["kind"],
        inputs_sha256=data["inputs_sha256"],
        image_path=Path(data["image_path"]) if data["image_path"] else None,
        modality=data["modality"],
    )


def case_size(case: PredictCase, source: Path) -> tuple[int, tuple[float, ...]]:
    """(voxels, spacing in mm) of a planned case from its headers; (0, ()) when unknown."""
    job = case.job
    try:
        if job is not None and job.group is not None:
            spacing = np.linalg.norm(job.group.affine[:3, :3], axis=0)
            return int(np.prod(job.group.shape)), tuple(float(s) for s in spacing)
        if case.image_path is not None:
            path = case.image_path
        elif job is not None and job.nifti is not None:
            path = source / job.nifti.image
        else:
            return 0, ()
        header = nib.load(path).header  # the header only: no voxel is read
        shape = header.get_data_shape()[:3]
        return int(np.prod(shape)), tuple(float(z) for z in header.get_zooms()[:3])
    except (OSError, ValueError, TypeError, nib.filebasedimages.ImageFileError):
        return 0, ()  # an unreadable header: loading the case will say why
