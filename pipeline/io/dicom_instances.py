"""Copies of one instance, damaged copies, and the files a series lost: settled around assembly.

Hospitals send the same image more than once: a PACS re-send (byte-identical), a copy in another
folder, a transcoded export, a copy cut short by a failed transfer. A SOPInstanceUID names one
instance, so these files are one slice, not a second acquisition at the same position: one intact
copy is kept and each other copy is listed (DUPLICATE_INSTANCE, ignored; a damaged copy keeps its
own TRUNCATED or UNREADABLE). Only different instances at one position are DUPLICATE_POSITION.

A file refused on its own (damaged without an intact copy, or without a position) leaves its
series short. Such a series is never staged silently: it is refused as SERIES_INCOMPLETE naming
how many files are missing and where, or, when the configuration accepts partial series, staged
with that description attached (`SeriesGroup.partial`).
"""

from __future__ import annotations

import filecmp
import logging
from collections import Counter, defaultdict
from typing import Any

import numpy as np
from pydicom.uid import UID

from pipeline.errors import InputRejected, Reason
from pipeline.io.dicom_header import DicomHeader, show

log = logging.getLogger(__name__)

POSITION_TOL_MM = 0.01  # positions closer than this are the same; offsets under it are rounding


def _facts(h: DicomHeader) -> tuple:
    """What makes two files with one SOPInstanceUID the same image (encoding aside)."""
    frames = tuple(
        (
            None if f.position is None else tuple(round(v, 2) for v in f.position),
            None if f.orientation is None else tuple(round(v, 4) for v in f.orientation),
        )
        for f in h.frames
    )
    return (h.study_uid, h.series_uid, h.sop_class_uid, h.rows, h.columns, h.number_of_frames, frames)


def _same_bytes(a: DicomHeader, b: DicomHeader) -> bool:
    try:
        return filecmp.cmp(a.path, b.path, shallow=False)
    except OSError:
        return False


def resolve_instances(
    headers: list[DicomHeader],
) -> tuple[list[DicomHeader], list[InputRejected], list[DicomHeader]]:
    """One header per instance: (headers to assemble, rejections, damaged headers with no intact copy).

    Intact copies of one instance (same SOPInstanceUID and the same image facts: series, class,
    matrix, per-frame position and orientation): the copy kept is the one in the folder holding
    most of its series (then the first by path), so a stray copy elsewhere is the one listed; the
    others are DUPLICATE_INSTANCE. Files that share a UID but differ in those facts are not one instance
    (a de-identifier that reused UIDs): all are kept and assembly judges them as slices.
    A damaged header (`DicomHeader.damage`) is listed with its own reason; when no intact copy of
    its instance exists it is returned as lost, for `series_losses`.
    """
    intact = sorted((h for h in headers if h.damage is None), key=lambda h: h.rel)
    damaged = sorted((h for h in headers if h.damage is not None), key=lambda h: h.rel)
    clusters: dict[tuple, list[DicomHeader]] = defaultdict(list)
    for h in intact:
        if h.sop_instance_uid:
            clusters[(h.sop_instance_uid, _facts(h))].append(h)
    # Files of each series per folder: the copy among its series' other files is the one kept.
    folders = Counter((h.series_uid, h.path.parent) for h in intact)
    rejected: list[InputRejected] = []
    dropped: set[str] = set()
    for _key, copies in sorted(clusters.items(), key=lambda kv: kv[1][0].rel):
        copies.sort(key=lambda h: (-folders[(h.series_uid, h.path.parent)], h.rel))
        first = copies[0]
        for other in copies[1:]:
            dropped.add(other.rel)
            identical = _same_bytes(first, other)
            how = (
                "a byte-identical copy"
                if identical
                else f"the same image in other bytes ({show(UID(other.transfer_syntax).name)} against "
                f"{show(UID(first.transfer_syntax).name)}, or a changed header)"
            )
            rejected.append(
                InputRejected(
                    Reason.DUPLICATE_INSTANCE,
                    other.rel,
                    f"another copy of the instance in {first.rel} ({how}: same SOPInstanceUID, position "
                    "and matrix); the series uses that copy once.",
                    {"kept": first.rel, "identical": identical},
                )
            )
    uid_counts = Counter(h.sop_instance_uid for h in intact if h.sop_instance_uid and h.rel not in dropped)
    reused = sum(1 for n in uid_counts.values() if n > 1)
    if reused:
        log.warning(
            "%d SOPInstanceUID(s) each name different images (UIDs reused by a de-identifier?): "
            "kept as separate slices",
            reused,
        )
    kept = [h for h in intact if h.rel not in dropped]
    by_uid = {
        (h.study_uid, h.series_uid, h.sop_instance_uid): h for h in reversed(kept) if h.sop_instance_uid
    }
    lost: list[DicomHeader] = []
    lost_uids: set[tuple[str, str, str]] = set()
    for h in damaged:
        err = h.damage
        if err is None:  # filtered above; narrows the type
            continue
        twin = by_uid.get((h.study_uid, h.series_uid, h.sop_instance_uid)) if h.sop_instance_uid else None
        if twin is not None:
            rejected.append(
                InputRejected(
                    err.reason,
                    err.path,
                    f"{err.message} An intact copy of the same instance ({twin.rel}) is used instead.",
                    {**err.details, "intact_copy": twin.rel},
                )
            )
        else:
            rejected.append(err)
            key = (h.study_uid, h.series_uid, h.sop_instance_uid)
            if not h.sop_instance_uid or key not in lost_uids:  # two cut copies: one slice lost
                lost.append(h)
                lost_uids.add(key)
    return kept, rejected, lost


# ------------------------------------------------------------------------------------------
# Files a series lost


def _normal(orientation: tuple[float, ...]) -> np.ndarray:
    iop = np.asarray(orientation, float)
    row, col = iop[:3] / np.linalg.norm(iop[:3]), iop[3:] / np.linalg.norm(iop[3:])
    return np.cross(row, col)


def compatible(lost: DicomHeader, member: DicomHeader, split_by_acquisition: bool) -> bool:
    """Could `lost` have been a slice of the group that `member` belongs to? Unknown facts agree.

    Localizers, colour images and images of another kind (ImageType ORIGINAL/DERIVED,
    PRIMARY/SECONDARY: a dose report or screen capture kept in the series) are never its slices.
    """
    if lost.is_localizer or lost.is_segmentation or lost.samples_per_pixel != 1:
        return False
    if lost.image_type[:2] and member.image_type[:2] and lost.image_type[:2] != member.image_type[:2]:
        return False
    if lost.rows and (lost.rows, lost.columns) != (member.rows, member.columns):
        return False  # (0 rows: a header cut before its matrix was read)
    if split_by_acquisition and lost.acquisition_number not in (None, member.acquisition_number):
        return False
    ref = member.frames[0]
    for f in lost.frames:
        if f.orientation is not None and np.abs(np.subtract(f.orientation, ref.orientation)).max() > 0.05:
            return False
        spacing = f.pixel_spacing
        if spacing is not None and np.abs(np.subtract(spacing, ref.pixel_spacing)).max() > 1e-3:
            return False
        for name in ("echo", "temporal", "stack"):
            mine, theirs = getattr(f, name), getattr(ref, name)
            if mine is not None and theirs is not None and mine != theirs:
                return False
    return True


def _instance_fit(members: list[DicomHeader], normal: np.ndarray) -> tuple[float, float] | None:
    """(slope, offset) mapping InstanceNumber to mm along the normal, when the members follow one."""
    pairs = [
        (h.instance_number, float(np.dot(h.frames[0].position, normal)))  # type: ignore[arg-type]
        for h in members
        if h.number_of_frames == 1 and h.instance_number is not None
    ]
    if len({n for n, _ in pairs}) < 2:
        return None
    x, y = np.array(pairs, float).T
    slope, offset = np.polyfit(x, y, 1)
    step = float(np.median(np.abs(np.diff(np.sort(y))))) if len(y) > 1 else 0.0
    residual = float(np.abs(slope * x + offset - y).max())
    if abs(slope) < POSITION_TOL_MM or residual > max(0.05 * step, POSITION_TOL_MM):
        return None
    return float(slope), float(offset)


def _place(x: float, along: np.ndarray) -> str:
    """Where a lost slice at `x` mm lies relative to the slices present (sorted `along`)."""
    if x < along[0] - POSITION_TOL_MM:
        return "before"
    if x > along[-1] + POSITION_TOL_MM:
        return "after"
    return "occupied" if np.abs(along - x).min() <= POSITION_TOL_MM else "inside"


_AXES = (("left", "right"), ("posterior", "anterior"), ("head", "feet"))  # +x, +y, +z of LPS


def _direction(normal: np.ndarray) -> tuple[str, str]:
    """Patient directions of increasing and decreasing position along `normal` (its main axis)."""
    axis = int(np.argmax(np.abs(normal)))
    up, down = _AXES[axis]
    return (up, down) if normal[axis] > 0 else (down, up)


def _span(values: list[float]) -> str:
    lo, hi = min(values), max(values)
    return f"at {lo:.2f} mm" if hi - lo < POSITION_TOL_MM else f"from {lo:.2f} to {hi:.2f} mm"


def series_losses(
    members: list[DicomHeader], along: np.ndarray, lost: list[DicomHeader], n_slices: int
) -> dict[str, Any]:
    """Describe what a group lacks: how many files, and where they lie along the slice normal.

    `along`: the members' slice positions (mm along the normal, sorted). A lost file is placed by
    its own ImagePositionPatient when it has one, else by InstanceNumber when the members'
    InstanceNumbers map linearly onto their positions, else it is "at an unknown position".
    """
    normal = _normal(members[0].frames[0].orientation)  # type: ignore[arg-type]
    up, down = _direction(normal)
    lo, hi = float(along[0]), float(along[-1])
    fit = _instance_fit(members, normal)
    entries: list[dict[str, Any]] = []
    at: dict[str, list[float]] = defaultdict(list)  # place -> positions (mm) of lost slices
    unknown = 0
    for h in sorted(lost, key=lambda h: h.rel):
        known = [float(np.dot(f.position, normal)) for f in h.frames if f.position is not None]
        source = "ImagePositionPatient"
        if not known and fit is not None and h.instance_number is not None:
            known, source = [fit[0] * h.instance_number + fit[1]], "InstanceNumber"
        reason = h.damage.reason.value if h.damage is not None else Reason.MISSING_GEOMETRY.value
        entry: dict[str, Any] = {"file": h.rel, "reason": reason, "position_mm": None, "from": None}
        if known:
            entry["position_mm"] = [round(min(known), 3), round(max(known), 3)]
            entry["from"] = source
            for x in known:
                at[_place(x, along)].append(x)
        else:
            unknown += 1
        entries.append(entry)
    reasons = Counter(e["reason"] for e in entries)
    n_files = len({h.rel for h in members}) + len(lost)
    words = {
        "before": f"before the first slice (toward the {down})",
        "after": f"beyond the last slice (toward the {up})",
        "inside": "inside the covered range, leaving a gap",
        "occupied": "where other slices already lie",
    }
    parts = [f"{len(at[k])} {words[k]} {_span(at[k])}" for k in words if at[k]]
    if unknown:
        parts.append(
            f"{unknown} file(s) at unknown positions (no ImagePositionPatient, no usable InstanceNumber)"
        )
    known_mm = [x for xs in at.values() for x in xs]
    estimated = any(e["from"] == "InstanceNumber" for e in entries)
    note = " (placed by InstanceNumber where the position is missing)" if estimated else ""
    message = (
        f"{len(lost)} of {n_files} files of this series were refused one by one "
        f"({', '.join(f'{k} {v}' for k, v in sorted(reasons.items()))}); the other {n_slices} slices "
        f"cover {lo:.2f} to {hi:.2f} mm along the slice normal (increasing toward the {up}). "
        f"Missing: {'; '.join(parts)}{note}."
    )
    return {
        "n_missing_files": len(lost),
        "n_series_files": n_files,
        "covered_mm": [round(lo, 3), round(hi, 3)],
        "missing_mm": [round(min(known_mm), 3), round(max(known_mm), 3)] if known_mm else None,
        "gap_inside": bool(at["inside"]),
        "missing": entries,
        "message": message,
    }


def incomplete(files: list[str], losses: dict[str, Any], *, gap: bool) -> InputRejected:
    """The SERIES_INCOMPLETE refusal of a group whose series lost files (listed under `files`)."""
    if gap:
        advice = (
            "A volume with a gap is never staged (nothing is interpolated): recover the missing "
            "files or convert the parts separately."
        )
    else:
        advice = (
            "Refused so that no shortened volume is staged as if it were whole; recover the missing "
            "files, or set data.accept_partial_series (ingest --accept-partial-series) to stage the "
            "rest marked partial."
        )
    details = {k: v for k, v in losses.items() if k != "message"}
    return InputRejected(
        Reason.SERIES_INCOMPLETE,
        files[0],
        f"{losses['message']} {advice}",
        {"files": files, "n_files": len(files), **details},
    )
