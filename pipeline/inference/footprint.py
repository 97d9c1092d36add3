"""How much memory a planned case needs while it is predicted, from its plan and image headers.

Orchestrators use it to bound the cases in flight on one machine by memory as well as by cores
(a batch of large CTs must not run a worker out of memory). An estimate from headers only: no
pixel data is read.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from pipeline.io.batchdir import BatchDir

log = logging.getLogger(__name__)

# Peak bytes per input voxel while one case is predicted (the decoded image, its float32 copies,
# the preprocessed slices, per-class logits, the mask, the output and QC writers), above a warm
# worker's resting size: `bench/scale.py --footprint X Y Z` measured 61 B/voxel for 256 x 256 x 160
# and 59 for 384 x 384 x 120 on CPU (2026-12-02); rounded up.
BYTES_PER_VOXEL = 64
# Besides the volume: the case's worker process (a warm CPU worker rests at about 440 MiB RSS,
# much of it library pages shared with the forkserver it was forked from).
CASE_OVERHEAD_BYTES = 256 * 2**20


def planned_voxels(out: str | Path, case_id: str) -> int:
    """The voxel count of a planned case from its image headers; 0 when they cannot be read
    (the case then fails on its own, with its record, when it is predicted)."""
    from nibabel.filebasedimages import ImageFileError
    from nibabel.spatialimages import HeaderDataError
    from pydicom.errors import InvalidDicomError

    out = Path(out)
    unreadable = (
        OSError,
        EOFError,
        ValueError,
        KeyError,
        IndexError,
        TypeError,
        ImageFileError,
        HeaderDataError,
    )
    try:
        case = BatchDir(out).read_case(case_id)
        if case["kind"] == "staging":
            return _nifti_voxels(Path(case["image_path"]))
        source = Path(BatchDir(out).read_batch()["source"])
        job = case["job"]
        if case["kind"] == "nifti":
            return sum(_nifti_voxels(source / rel) for rel in job["nifti"]["channels"])
        return _dicom_voxels(source / job["images"][0]) * len(job["images"])
    except (*unreadable, InvalidDicomError) as exc:
        log.debug("case %s: no size estimate (%s)", case_id, type(exc).__name__)
        return 0


def planned_case_bytes(out: str | Path, case_id: str) -> int:
    """Peak memory (bytes) predicting this case is planned to take (see BYTES_PER_VOXEL)."""
    return CASE_OVERHEAD_BYTES + BYTES_PER_VOXEL * planned_voxels(out, case_id)


def _nifti_voxels(path: Path) -> int:
    import nibabel as nib

    return math.prod(int(n) for n in nib.load(path).header.get_data_shape())


def _dicom_voxels(path: Path) -> int:
    """Pixels of one file (all its frames)."""
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["Rows", "Columns", "NumberOfFrames"])
    return int(ds.Rows) * int(ds.Columns) * int(getattr(ds, "NumberOfFrames", 1) or 1)
