"""DICOM SEG objects as label maps on the grid of the series they reference.

Each SEG frame is placed on a slice of the referenced image by geometry: its
ImagePositionPatient must fall on a slice centre of the image grid (in-plane origin on the
image's first voxel, orientation and pixel spacing equal). When the frame also names its source
instance (DerivationImageSequence), that instance must be the slice the geometry found (a SEG
without plane positions is unreadable to highdicom, hence UNREADABLE). Anything else is
LABEL_GEOMETRY_MISMATCH: a label is never resampled or shifted to make it fit.

Why not highdicom's ``get_pixels_by_source_instance`` or ``get_volume`` directly: the first
requires source references with SpatialLocationsPreserved, the second builds its own grid from
the frames present (empty frames are omitted, so the grid is partial); we need the referenced
image's exact grid whichever the SEG carries, and a check that both agree. highdicom still reads
the object and decodes every frame (bit-packed BINARY, FRACTIONAL, LABELMAP, compressed).

Segments: the label value of a voxel is its segment number. FRACTIONAL segments count a voxel
when its fraction is >= 0.5. Overlapping segments: the highest segment number wins (frames are
painted in ascending segment order), as highdicom does with ``skip_overlap_checks``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from pipeline.errors import InputRejected, Reason
from pipeline.io.volume import Volume

log = logging.getLogger(__name__)

SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
POSITION_TOL_MM = 0.01  # absolute floor for "on the slice" (DS rounding of positions)
SLICE_REL_TOL = 0.02  # ... or 2 % of the slice spacing: the series builder accepts 1 % irregular gaps
ORIENTATION_TOL = 1e-3  # cosines written with 6 decimals by some tools; 1e-3 is 0.06 degrees


class SeriesHeader(Protocol):
    """What this module needs of a pipeline.io.dicom header: the file and its UIDs."""

    rel: str
    sop_instance_uid: str
    series_uid: str


def _reject(reason: Reason, rel: str, message: str, **details: Any) -> InputRejected:
    return InputRejected(reason, rel, message, details)


def _referenced_series(ds: Dataset) -> list[str]:
    return list(dict.fromkeys(str(item.SeriesInstanceUID) for item in ds.get("ReferencedSeriesSequence", [])))


def _read_header(path: Path, rel: str) -> Dataset:
    """Header of a SEG (no pixels), or InputRejected when it is not one."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
        raise _reject(Reason.UNREADABLE, rel, f"DICOM header cannot be read: {exc}") from exc
    if str(ds.get("SOPClassUID", "")) != SEGMENTATION_STORAGE:
        raise _reject(
            Reason.UNSUPPORTED_SOP_CLASS,
            rel,
            "not a DICOM Segmentation (SEG) object",
            sop_class_uid=str(ds.get("SOPClassUID", "")),
        )
    if not _referenced_series(ds):
        raise _reject(
            Reason.MISSING_LABEL_SOURCE,
            rel,
            "SEG has no ReferencedSeriesSequence: the image series it labels is unknown",
        )
    return ds


def seg_referenced_series_uid(path: Path, rel: str | None = None) -> str:
    """SeriesInstanceUID of the image series a DICOM SEG references (header-only read).

    Raises InputRejected: UNREADABLE (not DICOM), UNSUPPORTED_SOP_CLASS (not a SEG),
    MISSING_LABEL_SOURCE (no ReferencedSeriesSequence). A SEG referencing several series returns
    the first (``read_seg_labels`` accepts any of them, and rejects frames whose source
    instances are not slices of the series given).
    """
    rel = rel or Path(path).name
    series = _referenced_series(_read_header(path, rel))
    if len(series) > 1:
        log.warning("%s: SEG references %d series; pairing it with the first", rel, len(series))
    return series[0]


def segment_names(path: Path, rel: str | None = None) -> dict[int, str]:
    """Segment number -> SegmentLabel of a DICOM SEG (header-only read)."""
    ds = _read_header(path, rel or Path(path).name)
    return {
        int(item.SegmentNumber): str(item.get("SegmentLabel", f"segment_{item.SegmentNumber}"))
        for item in ds.get("SegmentSequence", [])
    }


def _frame_item(ds: Dataset, frame: int, keyword: str) -> Dataset | None:
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is not None and frame < len(per_frame) and per_frame[frame].get(keyword):
        return per_frame[frame].get(keyword)[0]
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared and shared[0].get(keyword):
        return shared[0].get(keyword)[0]
    return None


def _source_uids(ds: Dataset, frame: int) -> set[str]:
    """ReferencedSOPInstanceUIDs of a frame's DerivationImageSequence."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is None or frame >= len(per_frame):
        return set()
    return {
        str(src.ReferencedSOPInstanceUID)
        for derivation in per_frame[frame].get("DerivationImageSequence", [])
        for src in derivation.get("SourceImageSequence", [])
        if "ReferencedSOPInstanceUID" in src
    }


def read_seg_labels(
    seg_path: Path,
    rel: str,
    series_headers: Sequence[SeriesHeader],
    image: Volume | None,
) -> tuple[Volume, dict[int, str]]:
    """Read a DICOM SEG as a label Volume on ``image``'s exact grid, plus segment number -> name.

    ``series_headers`` are the image's files in spatial order (slice k is ``series_headers[k]``
    for single-frame series) and ``image`` the Volume the series builder made from them. Pass an
    empty list and None when the referenced series is absent or was rejected: the SEG is then
    rejected with MISSING_LABEL_SOURCE. Output dtype uint8 (uint16 for segment numbers > 255),
    affine equal to ``image.affine``. Raises InputRejected: UNREADABLE, UNSUPPORTED_SOP_CLASS,
    MISSING_LABEL_SOURCE, LABEL_GEOMETRY_MISMATCH.
    """
    referenced = set(_referenced_series(_read_header(seg_path, rel)))
    if image is None or not referenced & {h.series_uid for h in series_headers}:
        raise _reject(
            Reason.MISSING_LABEL_SOURCE,
            rel,
            "the image series this SEG references is not among the accepted series (absent from the "
            "source or rejected; see its own quarantine entry)",
        )
    try:
        seg = hd.seg.segread(seg_path)
    except (InvalidDicomError, OSError, ValueError, AttributeError, KeyError, TypeError) as exc:
        raise _reject(Reason.UNREADABLE, rel, f"SEG cannot be read by highdicom: {exc}") from exc

    n_i, n_j, n_k = image.shape
    if (int(seg.Rows), int(seg.Columns)) != (n_j, n_i):
        raise _reject(
            Reason.LABEL_GEOMETRY_MISMATCH,
            rel,
            f"SEG frames are {seg.Rows}x{seg.Columns} (rows x columns) but the image slices are {n_j}x{n_i}",
            seg_rows_columns=[int(seg.Rows), int(seg.Columns)],
            image_rows_columns=[n_j, n_i],
        )
    lps = LPS_TO_RAS @ image.affine  # voxel (i, j, k) -> LPS mm (the matrix is its own inverse)
    inv = np.linalg.inv(lps)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    axes = lps[:3, :3] / spacing
    tol = max(POSITION_TOL_MM, SLICE_REL_TOL * spacing[2])
    uid_to_k = (
        {h.sop_instance_uid: k for k, h in enumerate(series_headers)} if len(series_headers) == n_k else {}
    )
    all_uids = {h.sop_instance_uid for h in series_headers}

    labelmap = seg.segmentation_type == hd.seg.SegmentationTypeValues.LABELMAP
    fractional = seg.segmentation_type == hd.seg.SegmentationTypeValues.FRACTIONAL
    threshold = 0.5 * float(seg.get("MaximumFractionalValue", 1)) if fractional else 0.5
    placed: list[tuple[int, int, int]] = []  # (segment number, frame, slice k)
    for f in range(seg.number_of_frames):
        k = _place_frame(seg, f, rel, lps, inv, axes, spacing, tol, uid_to_k, all_uids, (n_i, n_j, n_k))
        segment = 0  # LABELMAP frames hold segment numbers as pixel values
        if not labelmap:
            ident = _frame_item(seg, f, "SegmentIdentificationSequence")
            if ident is None or "ReferencedSegmentNumber" not in ident:
                raise _reject(
                    Reason.UNREADABLE, rel, f"frame {f + 1} does not say which segment it holds", frame=f + 1
                )
            segment = int(ident.ReferencedSegmentNumber)
        placed.append((segment, f, k))

    names = {int(item.SegmentNumber): str(item.get("SegmentLabel", "")) for item in seg.SegmentSequence}
    top = max(names, default=0)
    out = np.zeros(image.shape, np.uint8 if top <= 255 else np.uint16)
    for segment, f, k in sorted(placed):  # ascending segment number: the highest wins overlaps
        try:
            frame = np.asarray(seg.get_stored_frame(f, as_index=True))
        except (ValueError, RuntimeError, NotImplementedError) as exc:  # e.g. no decoder for its syntax
            raise _reject(Reason.UNREADABLE, rel, f"SEG frame {f + 1} cannot be decoded: {exc}") from exc
        if labelmap:
            out[:, :, k] = np.where(frame.T != 0, frame.T, out[:, :, k])
        else:
            out[:, :, k][threshold <= frame.T if fractional else frame.T != 0] = segment
    present = sorted(int(v) for v in np.unique(out))
    unknown = [v for v in present if v and v not in names]
    if unknown:
        raise _reject(
            Reason.UNEXPECTED_LABELS,
            rel,
            f"pixel values {unknown} have no segment in the SEG's SegmentSequence",
            unexpected=unknown,
        )
    meta = {
        "source_format": "DICOM SEG",
        "segmentation_type": str(seg.segmentation_type.value),
        "label_values": present,
        "frames": int(seg.number_of_frames),
    }
    return Volume(out, image.affine.copy(), modality=image.modality, meta=meta), names


def _place_frame(
    seg: Dataset,
    f: int,
    rel: str,
    lps: np.ndarray,
    inv: np.ndarray,
    axes: np.ndarray,
    spacing: np.ndarray,
    tol: float,
    uid_to_k: dict[str, int],
    all_uids: set[str],
    shape: tuple[int, int, int],
) -> int:
    """Slice index k of SEG frame ``f`` on the image grid, or InputRejected."""
    frame_no = f + 1  # messages use DICOM's 1-based frame numbers
    sources = _source_uids(seg, f)
    foreign = sources - all_uids
    if foreign:
        raise _reject(
            Reason.MISSING_LABEL_SOURCE,
            rel,
            f"frame {frame_no} is derived from {len(foreign)} instance(s) that are not slices of the "
            "image series (another series, or files missing from the source)",
            frame=frame_no,
        )
    by_uid = {uid_to_k[u] for u in sources if u in uid_to_k}
    plane = _frame_item(seg, f, "PlanePositionSequence")
    if plane is None or "ImagePositionPatient" not in plane:
        # highdicom refuses such SEGs on reading; kept so a future reader cannot place frames blindly.
        raise _reject(
            Reason.LABEL_GEOMETRY_MISMATCH, rel, f"frame {frame_no} has no plane position", frame=frame_no
        )
    orient = _frame_item(seg, f, "PlaneOrientationSequence")
    measures = _frame_item(seg, f, "PixelMeasuresSequence")
    if orient is None or measures is None:
        raise _reject(
            Reason.LABEL_GEOMETRY_MISMATCH,
            rel,
            f"frame {frame_no} lacks PlaneOrientationSequence or PixelMeasuresSequence",
            frame=frame_no,
        )
    cosines = np.asarray([float(v) for v in orient.ImageOrientationPatient])
    deviation = float(np.max(np.abs(cosines - np.concatenate([axes[:, 0], axes[:, 1]]))))
    if deviation > ORIENTATION_TOL:
        raise _reject(
            Reason.LABEL_GEOMETRY_MISMATCH,
            rel,
            f"frame {frame_no} orientation {np.round(cosines, 6).tolist()} differs from the image's "
            f"{np.round(np.concatenate([axes[:, 0], axes[:, 1]]), 6).tolist()} (max {deviation:.3g})",
            frame=frame_no,
            seg_orientation=np.round(cosines, 6).tolist(),
            image_orientation=np.round(np.concatenate([axes[:, 0], axes[:, 1]]), 6).tolist(),
        )
    row_spacing, col_spacing = (float(v) for v in measures.PixelSpacing)
    # The far edge of the frame drifts by (n - 1) * spacing error: judge that distance in mm.
    drift = max(
        abs(col_spacing - spacing[0]) * (shape[0] - 1), abs(row_spacing - spacing[1]) * (shape[1] - 1)
    )
    if drift > tol:
        raise _reject(
            Reason.LABEL_GEOMETRY_MISMATCH,
            rel,
            f"frame {frame_no} pixel spacing {[row_spacing, col_spacing]} mm differs from the image's "
            f"{[round(float(spacing[1]), 6), round(float(spacing[0]), 6)]} mm",
            frame=frame_no,
            seg_pixel_spacing=[row_spacing, col_spacing],
            image_pixel_spacing=[float(spacing[1]), float(spacing[0])],
        )
    position = np.asarray([float(v) for v in plane.ImagePositionPatient])
    v = inv @ np.append(position, 1.0)
    k = int(np.rint(v[2]))
    offset = float(np.linalg.norm(position - (lps @ np.array([0.0, 0.0, k, 1.0]))[:3]))
    if not 0 <= k < shape[2] or offset > tol:
        raise _reject(
            Reason.LABEL_GEOMETRY_MISMATCH,
            rel,
            f"frame {frame_no} at {np.round(position, 4).tolist()} (LPS mm) is not on a slice of the image: "
            f"voxel coordinates {np.round(v[:3], 4).tolist()}, {offset:.4g} mm from slice {k} "
            f"(tolerance {tol:.4g} mm, {shape[2]} slices)",
            frame=frame_no,
            voxel_coordinates=np.round(v[:3], 4).tolist(),
            offset_mm=offset,
            tolerance_mm=tol,
        )
    if by_uid and by_uid != {k}:
        raise _reject(
            Reason.LABEL_GEOMETRY_MISMATCH,
            rel,
            f"frame {frame_no} lies on slice {k} by position but names slice(s) {sorted(by_uid)} "
            "as its source",
            frame=frame_no,
            slice_by_position=k,
            slice_by_source=sorted(by_uid),
        )
    return k
