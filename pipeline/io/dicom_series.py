"""Series assembly: header facts -> geometrically coherent volumes, or a reason why not.

Ours, not a library's: MONAI's folder reader stacks every file of a folder and orders slices by
InstanceNumber, and dcm2niix writes a volume (plus an "_Eq" copy) even when a slice is missing.
Here a series is split until each group is one coherent grid, ordered by ImagePositionPatient on
the slice normal, spaced from positions (never SliceThickness) and refused, with the measured
values, when it is not a uniform grid. Nothing is ever interpolated.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydicom.uid import UID

from pipeline.errors import InputRejected, Reason
from pipeline.io.dicom_decode import iter_frames, require_decoder
from pipeline.io.dicom_header import DicomHeader, FrameGeometry, show
from pipeline.io.dicom_instances import (
    POSITION_TOL_MM,
    compatible,
    incomplete,
    resolve_instances,
    series_losses,
)
from pipeline.io.volume import Volume

log = logging.getLogger(__name__)

SPACING_REL_TOL = 0.01  # a gap may differ from the median gap by 1 % (scanners round positions)
ORIENTATION_SPLIT = 0.05  # cosines further apart than this (about 3 degrees) are different planes
ORIENTATION_TOL = 1e-4  # within one plane, every slice's cosines agree this closely
MIN_SLICES = 3


@dataclass
class SeriesGroup:
    """One geometrically coherent volume-to-be: its files in spatial order and its grid."""

    key: str  # series UID + split descriptor: stable across runs; HMAC it, never write it in clear
    headers: list[DicomHeader]  # the files, in the spatial order of their first frame
    frames: list[tuple[int, int]]  # per slice, in spatial order: (index into headers, frame index)
    affine: np.ndarray  # (4, 4) voxel (column, row, slice) -> RAS mm
    slice_spacing: float  # mm between slice centres, from positions
    modality: str
    # Set only when partial series are accepted and files of this series were refused one by
    # one: how many, and where the missing slices lie (dicom_instances.series_losses).
    partial: dict[str, Any] | None = None

    @property
    def files(self) -> list[str]:
        return [h.rel for h in self.headers]

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.headers[0].columns, self.headers[0].rows, len(self.frames))


@dataclass
class _Slice:
    header: DicomHeader
    frame: int
    geom: FrameGeometry


def _unique_files(slices: Iterable[_Slice]) -> list[str]:
    return list(dict.fromkeys(s.header.rel for s in slices))


def _reject(reason: Reason, files: list[str], message: str, **details: Any) -> InputRejected:
    """One rejection per group: named by its first file, listing every file it covers."""
    return InputRejected(reason, files[0], message, {"files": files, "n_files": len(files), **details})


def assemble_series(
    headers: list[DicomHeader], *, accept_partial: bool = False
) -> tuple[list[SeriesGroup], list[InputRejected]]:
    """Group headers into volumes; return the accepted groups and one rejection per refused group.

    First, copies of one instance are settled (dicom_instances.resolve_instances): one intact copy
    is used, other copies are DUPLICATE_INSTANCE, damaged headers (`DicomHeader.damage`) are listed
    with their own reason. Grouping: study and series UID, then orientation, matrix size, pixel
    spacing, echo, temporal position and stack; acquisition number splits a series only where
    acquisitions repeat positions (some CT scanners number every slice of one helix as its own
    acquisition). A group whose series lost files one by one (damaged without an intact copy, or
    without a position while others have one) is SERIES_INCOMPLETE, naming how many and where;
    with `accept_partial` it is accepted instead (unless the loss leaves a gap), its
    `partial` describing what is missing.
    Order and results are deterministic for a given set of files, whatever their order in `headers`.
    """
    kept, rejected, lost = resolve_instances(headers)
    by_series: dict[tuple[str, str], list[DicomHeader]] = defaultdict(list)
    for h in kept:
        by_series[(h.study_uid, h.series_uid)].append(h)
    lost_by_series: dict[tuple[str, str], list[DicomHeader]] = defaultdict(list)
    for h in lost:
        lost_by_series[(h.study_uid, h.series_uid)].append(h)
    groups: list[SeriesGroup] = []
    for study_series in sorted(by_series):
        series = sorted(by_series[study_series], key=lambda h: h.rel)
        _assemble_one(
            study_series[1], series, groups, rejected, lost_by_series.get(study_series, []), accept_partial
        )
    return groups, rejected


def _assemble_one(
    series_uid: str,
    headers: list[DicomHeader],
    groups: list[SeriesGroup],
    rejected: list[InputRejected],
    lost: list[DicomHeader],
    accept_partial: bool,
) -> None:
    seg, photometric, localizer, no_geometry, usable = [], [], [], [], []
    for h in headers:
        if h.is_segmentation:
            seg.append(h)
        elif h.samples_per_pixel != 1 or h.photometric not in ("MONOCHROME1", "MONOCHROME2"):
            photometric.append(h)
        elif h.is_localizer:
            localizer.append(h)
        elif not all(f.has_geometry for f in h.frames):
            no_geometry.append(h)
        else:
            usable.append(h)
    if seg:
        rejected.append(
            _reject(
                Reason.UNSUPPORTED_SOP_CLASS,
                [h.rel for h in seg],
                "a DICOM SEG is a label map, not an image: read it with pipeline.io.seg against the "
                "series it references.",
                sop_class="Segmentation Storage",
            )
        )
    if photometric:
        found = sorted({f"{show(h.photometric, 24)} x {h.samples_per_pixel}" for h in photometric})
        rejected.append(
            _reject(
                Reason.UNSUPPORTED_PHOTOMETRIC,
                [h.rel for h in photometric],
                f"expected MONOCHROME1 or MONOCHROME2 with 1 sample per pixel; found {', '.join(found)}. "
                "Colour images are not segmentation inputs.",
                found=found,
            )
        )
    if localizer:
        rejected.append(
            _reject(
                Reason.LOCALIZER,
                [h.rel for h in localizer],
                f"{len(localizer)} localizer (scout) image(s), ImageType LOCALIZER: listed, not converted.",
                n_slices=sum(len(h.frames) for h in localizer),
            )
        )
    if no_geometry:
        missing = {h.rel: _missing_geometry(h) for h in no_geometry}
        tags = sorted({t for found in missing.values() for t in found})
        rejected.append(
            _reject(
                Reason.MISSING_GEOMETRY,
                list(missing),
                "ImagePositionPatient, ImageOrientationPatient and PixelSpacing are needed to place "
                f"every slice; missing or malformed: {', '.join(tags)}.",
                missing=missing,
            )
        )

    if usable:
        lost = lost + no_geometry  # placed among slices that have positions: the series lacks them
    slices = [_Slice(h, i, g) for h in usable for i, g in enumerate(h.frames)]
    centres: list[np.ndarray] = []
    split: dict[tuple, list[_Slice]] = defaultdict(list)
    for s in slices:
        iop = np.asarray(s.geom.orientation)
        plane = next((i for i, c in enumerate(centres) if np.abs(iop - c).max() < ORIENTATION_SPLIT), None)
        if plane is None:
            plane, _ = len(centres), centres.append(iop)
        ps = s.geom.pixel_spacing
        key = (
            s.header.rows,
            s.header.columns,
            round(ps[0], 4),  # type: ignore[index]
            round(ps[1], 4),  # type: ignore[index]
            plane,
            _sortable(s.geom.echo),
            _sortable(s.geom.temporal),
            _sortable(s.geom.stack),
        )
        split[key].append(s)

    seen_keys: set[str] = set()
    for key in sorted(split):
        for acq, members in _split_acquisitions(split[key]):
            rows, cols, ps0, ps1, plane, echo, temporal, stack = key
            iop = ",".join(f"{v:.2f}" for v in centres[plane] + 0.0)  # + 0.0: no "-0.00"
            parts = [series_uid, f"{rows}x{cols}", f"ps={ps0:.4f},{ps1:.4f}", f"iop={iop}"]
            for name, value in (("echo", echo), ("t", temporal), ("stack", stack), ("acq", acq)):
                if value[1] is not None:
                    parts.append(f"{name}={value[1]}")
            group_key = "|".join(parts)
            n = 2
            while group_key in seen_keys:
                group_key = "|".join(parts) + f"#{n}"
                n += 1
            seen_keys.add(group_key)
            result = _check_group(group_key, members)
            if lost:
                result = _with_losses(result, members, lost, acq[1] is not None, accept_partial)
            (groups if isinstance(result, SeriesGroup) else rejected).append(result)


def _with_losses(
    result: SeriesGroup | InputRejected,
    members: list[_Slice],
    lost: list[DicomHeader],
    split_by_acquisition: bool,
    accept_partial: bool,
) -> SeriesGroup | InputRejected:
    """Apply the series' refused files to one group's outcome (see `assemble_series`)."""
    mine = [h for h in lost if compatible(h, members[0].header, split_by_acquisition)]
    gap = isinstance(result, InputRejected) and result.reason == Reason.NON_UNIFORM_SPACING
    if not mine or not (isinstance(result, SeriesGroup) or gap):
        return result  # another refusal (duplicates, tilt, too few slices) stands as it is
    normal = _normal(members[0].geom)
    along = np.sort([np.dot(s.geom.position, normal) for s in members])  # type: ignore[arg-type]
    headers = list({s.header.rel: s.header for s in members}.values())
    losses = series_losses(headers, along, mine, len(members))
    files = _unique_files(members)
    if gap or losses["gap_inside"] or not accept_partial:
        return incomplete(files, losses, gap=gap or losses["gap_inside"])
    log.warning("a series is staged partial: %s", losses["message"])
    result.partial = losses  # type: ignore[union-attr]
    return result


def _sortable(value: Any) -> tuple[int, Any]:
    """None sorts before values (split keys hold Nones)."""
    return (0, None) if value is None else (1, value)


def _missing_geometry(h: DicomHeader) -> list[str]:
    missing = set()
    for f in h.frames:
        if f.position is None:
            missing.add("ImagePositionPatient")
        if f.orientation is None:
            missing.add("ImageOrientationPatient")
        if f.pixel_spacing is None:
            missing.add("PixelSpacing")
    return sorted(missing)


def _split_acquisitions(slices: list[_Slice]) -> list[tuple[tuple[int, Any], list[_Slice]]]:
    """Split by AcquisitionNumber only when acquisitions revisit the same positions."""
    by_acq: dict[Any, list[_Slice]] = defaultdict(list)
    for s in slices:
        by_acq[_sortable(s.header.acquisition_number)].append(s)
    if len(by_acq) == 1:
        return [((0, None), slices)]
    if _has_duplicates(slices) and not any(_has_duplicates(v) for v in by_acq.values()):
        return [(k, by_acq[k]) for k in sorted(by_acq)]
    return [((0, None), slices)]


def _normal(geom: FrameGeometry) -> np.ndarray:
    iop = np.asarray(geom.orientation, float)
    row, col = iop[:3] / np.linalg.norm(iop[:3]), iop[3:] / np.linalg.norm(iop[3:])
    return np.cross(row, col)


def _has_duplicates(slices: list[_Slice]) -> bool:
    d = np.sort([np.dot(s.geom.position, _normal(s.geom)) for s in slices])  # type: ignore[arg-type]
    return bool(len(d) > 1 and np.diff(d).min() < POSITION_TOL_MM)


def _check_group(key: str, slices: list[_Slice]) -> SeriesGroup | InputRejected:
    """Apply the geometry rules to one split group; return the group or its rejection."""
    files = _unique_files(slices)
    iops = np.array([s.geom.orientation for s in slices], float)
    deviation = float(np.abs(iops - iops[0]).max())
    if deviation > ORIENTATION_TOL:
        angles = [_angle_deg(_normal(slices[0].geom), _normal(s.geom)) for s in slices]
        worst = int(np.argmax(np.abs(iops - iops[0]).max(axis=1)))
        return _reject(
            Reason.ORIENTATION_VARIES,
            files,
            f"ImageOrientationPatient varies within the series: {slices[worst].header.rel} differs from "
            f"{slices[0].header.rel} by {deviation:.6f} in a direction cosine (slice normals up to "
            f"{max(angles):.3f} degrees apart); expected one orientation for every slice.",
            max_cosine_difference=round(deviation, 6),
            max_normal_angle_deg=round(max(angles), 4),
        )
    if len(slices) < MIN_SLICES:
        return _reject(
            Reason.TOO_FEW_SLICES,
            files,
            f"{len(slices)} slice(s) in this series; a volume needs at least {MIN_SLICES}. "
            "Listed, not converted.",
            n_slices=len(slices),
        )

    normal = _normal(slices[0].geom)
    positions = np.array([s.geom.position for s in slices], float)
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    slices = [slices[i] for i in order]
    positions, along = positions[order], along[order]
    names = [
        s.header.rel if len(s.header.frames) == 1 else f"{s.header.rel}#frame{s.frame + 1}" for s in slices
    ]
    gaps = np.diff(along)

    dup = np.flatnonzero(gaps < POSITION_TOL_MM)
    if dup.size:
        pairs = [{"position_mm": round(float(along[i]), 4), "files": [names[i], names[i + 1]]} for i in dup]
        return _reject(
            Reason.DUPLICATE_POSITION,
            files,
            f"{dup.size} pair(s) of slices at the same position, first {names[dup[0]]} and "
            f"{names[dup[0] + 1]} at {along[dup[0]]:.3f} mm along the normal; expected one slice per "
            "position (two acquisitions or echoes mixed in one series?).",
            duplicates=pairs,
        )

    offsets = positions - positions[0]
    perpendicular = np.linalg.norm(offsets - np.outer(offsets @ normal, normal), axis=1)
    if perpendicular.max() > POSITION_TOL_MM:
        angle = math.degrees(math.atan2(perpendicular[-1], along[-1] - along[0]))
        tag = slices[0].header.gantry_tilt
        return _reject(
            Reason.GANTRY_TILT,
            files,
            f"slices step {angle:.3f} degrees off their normal (gantry tilt; GantryDetectorTilt "
            f"{'absent' if tag is None else f'{tag:g}'}): up to {perpendicular.max():.3f} mm sideways "
            f"between {names[0]} and {names[-1]}. A tilted stack is not a rectilinear grid; "
            "reconstruct without tilt or resample it explicitly.",
            tilt_angle_deg=round(angle, 4),
            max_offset_mm=round(float(perpendicular.max()), 4),
            gantry_detector_tilt=tag,
        )

    expected = float(np.median(gaps))
    tol = max(POSITION_TOL_MM, SPACING_REL_TOL * expected)
    bad = np.flatnonzero(np.abs(gaps - expected) > tol)
    uniform = along[0] + np.arange(len(along)) * (along[-1] - along[0]) / (len(along) - 1)
    drift = float(np.abs(along - uniform).max())
    if bad.size or drift > tol:
        found = [
            {"found_spacing_mm": round(float(gaps[i]), 4), "between": [names[i], names[i + 1]]} for i in bad
        ]
        if bad.size:
            i = bad[0]
            where = f"found {gaps[i]:.3f} mm between {names[i]} and {names[i + 1]}"
            missing = int(sum(max(round(gaps[j] / expected) - 1, 0) for j in bad))
            hint = f" ({missing} missing slice(s)?)" if missing else ""
        else:
            where, hint = f"positions drift up to {drift:.3f} mm from a uniform grid", ""
        return _reject(
            Reason.NON_UNIFORM_SPACING,
            files,
            f"expected a uniform slice spacing of {expected:.3f} mm (the median gap); {where}{hint}. "
            "Not interpolated: find the missing slices or convert the parts separately.",
            expected_spacing_mm=round(expected, 4),
            gaps=found,
            max_drift_mm=round(drift, 4),
        )

    # Voxel (i, j, k) = (column, row, slice). DICOM PixelSpacing is (between rows, between columns).
    first = slices[0].geom
    iop = np.asarray(first.orientation, float)
    row_cos, col_cos = iop[:3] / np.linalg.norm(iop[:3]), iop[3:] / np.linalg.norm(iop[3:])
    step = (positions[-1] - positions[0]) / (len(slices) - 1)  # as dcm2niix: first to last slice
    lps = np.eye(4)
    lps[:3, 0] = row_cos * first.pixel_spacing[1]  # type: ignore[index]
    lps[:3, 1] = col_cos * first.pixel_spacing[0]  # type: ignore[index]
    lps[:3, 2] = step
    lps[:3, 3] = positions[0]
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # LPS -> RAS

    headers: list[DicomHeader] = []
    index: dict[str, int] = {}
    frames = []
    for s in slices:
        if s.header.rel not in index:
            index[s.header.rel] = len(headers)
            headers.append(s.header)
        frames.append((index[s.header.rel], s.frame))
    return SeriesGroup(
        key=key,
        headers=headers,
        frames=frames,
        affine=affine,
        slice_spacing=float(np.linalg.norm(step)),
        modality=headers[0].modality,
    )


def _angle_deg(a: np.ndarray, b: np.ndarray) -> float:
    return math.degrees(math.acos(float(np.clip(np.dot(a, b), -1.0, 1.0))))


def _invert_monochrome1(stored: np.ndarray, header: DicomHeader) -> np.ndarray:
    """MONOCHROME1 (low values bright) -> MONOCHROME2 by mirroring the stored range.

    Unsigned: (2**BitsStored - 1) - v; signed: -1 - v. Both map the representable range onto
    itself, so no value leaves it and the inversion is exact.
    """
    values = stored.astype(np.int64)
    if header.pixel_representation == 1:
        return -1 - values
    return (2**header.bits_stored - 1) - values


# The output dtypes of an integer rescale, narrowest first (float64 holds integers beyond int32).
_INTEGRAL_DTYPES = (np.int16, np.int32, np.float64)


def _holds(dtype: type, lo: float, hi: float) -> bool:
    if dtype is np.float64:
        return True
    info = np.iinfo(dtype)
    return info.min <= lo and hi <= info.max


class _Output:
    """The volume's one array of the final dtype, filled slice by slice as frames are decoded.

    The dtype rule needs every value (see `load_series`), so an integer volume starts as int16 and
    is widened, once per step, when a slice's values leave it: while widening the old and the new
    array coexist, 2 + 4 (or 4 + 8) bytes a voxel, 1.5x the final volume. Slices are written in
    any order; `written` says which hold data (only those are copied when widening).
    """

    def __init__(self, n_slices: int, rows: int, cols: int, integral: bool) -> None:
        self.integral = integral
        self.array = np.empty((n_slices, rows, cols), np.int16 if integral else np.float32)
        self.written = np.zeros(n_slices, bool)
        self.lo, self.hi = math.inf, -math.inf

    def put(self, k: int, stored: np.ndarray, slope: float, intercept: float) -> None:
        """Rescale one slice's stored values into slice `k` (exact for an integer rescale)."""
        s_lo, s_hi = int(stored.min()), int(stored.max())
        ends = (s_lo * slope + intercept, s_hi * slope + intercept)
        lo, hi = min(ends), max(ends)
        self.lo, self.hi = min(self.lo, lo), max(self.hi, hi)
        if self.integral and not _holds(self.array.dtype.type, self.lo, self.hi):
            self._widen(next(t for t in _INTEGRAL_DTYPES if _holds(t, self.lo, self.hi)))
        out = self.array[k]
        if self.integral and slope == 1 and intercept == 0:
            out[...] = stored  # the common identity rescale: a plain (safe) copy
        elif self.integral:
            # Exact integer arithmetic, then a narrowing that loses nothing (this slice's values
            # lie in [lo, hi], which the array's dtype holds). int32 suffices when |stored * slope|
            # <= |value| + |intercept| stays below 2**31, and is 7x faster than int64.
            wide = np.int32 if max(abs(lo), abs(hi)) + abs(intercept) < 2**31 - 1 else np.int64
            if slope == 1:
                np.add(stored, wide(intercept), out=out, dtype=wide, casting="unsafe")
            else:
                out[...] = stored.astype(wide) * wide(slope) + wide(intercept)
        else:
            out[...] = stored.astype(np.float64) * slope + intercept
        self.written[k] = True

    def _widen(self, dtype: type) -> None:
        wider = np.empty(self.array.shape, dtype)
        for k in np.flatnonzero(self.written):  # slice by slice: no full-size temporary
            wider[k] = self.array[k]
        self.array = wider


def series_voxels(group: SeriesGroup) -> int:
    """Voxels of the volume a group makes (columns x rows x slices), from its headers."""
    return group.headers[0].rows * group.headers[0].columns * len(group.frames)


def planned_series_bytes(group: SeriesGroup) -> int:
    """Bytes of the volume `load_series` will make, from the headers (before any pixel is read).

    The dtype the stored range allows (BitsStored, signedness, every slope and intercept): an
    estimate for memory planning, exact unless pixels carry bits above BitsStored.
    """
    geoms = [group.headers[i].frames[f] for i, f in group.frames]
    if not all(
        float(g.rescale_slope).is_integer() and float(g.rescale_intercept).is_integer() for g in geoms
    ):
        return 4 * series_voxels(group)  # float32
    lo, hi = math.inf, -math.inf
    for h in group.headers:
        bits = h.bits_stored
        s_lo, s_hi = (
            (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if h.pixel_representation == 1 else (0, 2**bits - 1)
        )
        if h.photometric == "MONOCHROME1":  # inverted within the same range (see _invert_monochrome1)
            s_lo, s_hi = (-1 - s_hi, -1 - s_lo) if h.pixel_representation == 1 else (s_lo, s_hi)
        for g in h.frames:
            ends = (
                s_lo * g.rescale_slope + g.rescale_intercept,
                s_hi * g.rescale_slope + g.rescale_intercept,
            )
            lo, hi = min(lo, *ends), max(hi, *ends)
    dtype = next(t for t in _INTEGRAL_DTYPES if _holds(t, lo, hi))
    return np.dtype(dtype).itemsize * series_voxels(group)


def load_series(group: SeriesGroup, *, max_voxels: int | None = None) -> Volume:
    """Decode an assembled group into a Volume of modality values (rescale applied per slice).

    dtype: when every slope and intercept is an integer, the smallest of int16 and int32 that holds
    the actual values exactly (float64 beyond int32); otherwise float32. MONOCHROME1 is inverted to
    MONOCHROME2 on stored values before rescale. The affine maps (column, row, slice) to RAS mm.
    Memory: each frame is decoded and written straight into the one output array, so a
    conversion holds the volume plus one file's frame (plus, for an integer volume whose values
    outgrow int16 or int32, the narrower array while it is widened: 1.5x the volume at most;
    a compressed or non-native multi-frame file also holds its encoded pixel data).
    Raises InputRejected: TOO_LARGE (more than `max_voxels`, before any pixel is decoded),
    MISSING_DECODER, TRUNCATED, UNREADABLE.
    """
    voxels = series_voxels(group)
    if max_voxels is not None and voxels > max_voxels:
        raise _reject(
            Reason.TOO_LARGE,
            group.files,
            f"the series makes a volume of {voxels} voxels ({' x '.join(map(str, group.shape))}), over "
            f"the limit of {max_voxels}; raise ingest.memory_budget_gb (the limits follow from it).",
            voxels=voxels,
            max_voxels=max_voxels,
            shape=list(group.shape),
        )
    # Every decoder is checked before the first pixel is decoded, so a missing package is one error.
    for ts in dict.fromkeys(h.transfer_syntax for h in group.headers):
        require_decoder(ts, next(h.rel for h in group.headers if h.transfer_syntax == ts))

    geoms = [group.headers[i].frames[f] for i, f in group.frames]
    integral = all(
        float(g.rescale_slope).is_integer() and float(g.rescale_intercept).is_integer() for g in geoms
    )
    rows, cols = group.headers[0].rows, group.headers[0].columns
    output = _Output(len(group.frames), rows, cols, integral)
    slot: dict[int, dict[int, int]] = defaultdict(dict)  # header index -> frame -> slice
    for k, (header_index, frame) in enumerate(group.frames):
        slot[header_index][frame] = k
    inverted = False
    # File by file, frame by frame: each file is opened once, whatever its frames' spatial order.
    for header_index, slices in sorted(slot.items()):
        header = group.headers[header_index]
        for frame, stored in iter_frames(header, slices):
            if header.photometric == "MONOCHROME1":
                stored, inverted = _invert_monochrome1(stored, header), True
            geom = header.frames[frame]
            output.put(slices[frame], stored, geom.rescale_slope, geom.rescale_intercept)
            del stored
    out = output.array
    del output

    first = group.headers[0]
    geom = first.frames[group.frames[0][1]]
    meta = {
        "source_format": "DICOM",
        "sop_class": first.sop_class_name,
        "transfer_syntaxes": sorted({show(UID(h.transfer_syntax).name, 100) for h in group.headers}),
        # Files without a declared syntax were read in the one their data show (dicom_syntax).
        "transfer_syntax_detected": sum(not h.syntax_declared for h in group.headers),
        "photometric": "MONOCHROME1 (inverted)" if inverted else "MONOCHROME2",
        "bits_stored": first.bits_stored,
        "signed": first.pixel_representation == 1,
        "rescale": "integer" if integral else "fractional",
        "n_slices": len(group.frames),
        "n_files": len(group.headers),
        "pixel_spacing_mm": [float(v) for v in geom.pixel_spacing],  # type: ignore[union-attr]
        "slice_spacing_mm": group.slice_spacing,
    }
    # (slice, row, column) -> (column, row, slice): a transposed view, F-ordered as NIfTI stores it.
    return Volume(data=out.transpose(2, 1, 0), affine=group.affine, modality=group.modality, meta=meta)
