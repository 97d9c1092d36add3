"""First pass over a DICOM file: its header facts, read without decoding a single pixel.

A scan of a hospital folder reads every file once with `stop_before_pixels`, so a folder of
thousands of files is grouped and checked before any pixel is decoded, and a file that declares
more pixels than the configured limit is refused before anything is allocated.

Tag values are data, never paths: nothing here builds a path from a tag (DICOMDIR references are
validated against the DICOM File ID rules and resolved only to test that they stay inside the root).
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import re
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from pipeline.errors import InputRejected, Reason
from pipeline.io.dicom_sniff import plausible_start
from pipeline.io.dicom_syntax import (
    NATIVE,
    check_pixel_data,
    data_set_start,
    detect_transfer_syntax,
    looks_like_data_set,
)

log = logging.getLogger(__name__)

MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"  # the SOP class of a DICOMDIR
SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"

# Image SOP classes that can hold a volume; anything else (CR/DX projections, secondary capture,
# ultrasound, RT, SR, waveforms) is UNSUPPORTED_SOP_CLASS.
SINGLE_FRAME_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.2": "CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.4": "MR Image Storage",
    "1.2.840.10008.5.1.4.1.1.128": "PET Image Storage",
}
MULTI_FRAME_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.2.1": "Enhanced CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.2.2": "Legacy Converted Enhanced CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.4.1": "Enhanced MR Image Storage",
    "1.2.840.10008.5.1.4.1.1.4.4": "Legacy Converted Enhanced MR Image Storage",
    "1.2.840.10008.5.1.4.1.1.130": "Enhanced PET Image Storage",
    "1.2.840.10008.5.1.4.1.1.128.1": "Legacy Converted Enhanced PET Image Storage",
}
SUPPORTED_CLASSES = {**SINGLE_FRAME_CLASSES, **MULTI_FRAME_CLASSES}


def show(value: Any, limit: int = 64) -> str:
    """A tag value fit for a message: repr'd (NUL and control characters escaped) and cut short."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True)
class FrameGeometry:
    """Where one frame (a slice) sits and how its stored values map to modality values."""

    position: tuple[float, float, float] | None  # ImagePositionPatient (LPS mm) of the first voxel
    orientation: tuple[float, ...] | None  # ImageOrientationPatient: row cosines, column cosines
    pixel_spacing: tuple[float, float] | None  # (between rows, between columns) mm
    rescale_slope: float = 1.0
    rescale_intercept: float = 0.0
    echo: float | None = None  # EchoNumbers (single-frame) or EffectiveEchoTime (enhanced MR)
    temporal: int | None = None  # TemporalPositionIdentifier / TemporalPositionIndex
    stack: str | None = None  # StackID (enhanced): frames of different stacks are different volumes

    @property
    def has_geometry(self) -> bool:
        return None not in (self.position, self.orientation, self.pixel_spacing)


@dataclass(frozen=True)
class DicomHeader:
    """One file's header facts from a header-only read (no pixel decoded)."""

    path: Path  # absolute path of the file
    rel: str  # path relative to the source root (POSIX separators): what messages name
    sop_class_uid: str
    study_uid: str
    series_uid: str
    sop_instance_uid: str
    modality: str
    transfer_syntax: str
    rows: int
    columns: int
    number_of_frames: int
    samples_per_pixel: int
    photometric: str
    bits_allocated: int
    bits_stored: int
    pixel_representation: int  # 0 unsigned, 1 two's complement
    image_type: tuple[str, ...]
    acquisition_number: int | None
    instance_number: int | None  # informational only: never used to order slices
    gantry_tilt: float | None  # GantryDetectorTilt (degrees) as written, for messages
    frames: tuple[FrameGeometry, ...]  # one per frame (single-frame files have one); a SEG: none
    # Byte offset of native (uncompressed) pixel data with a defined length, found by the header
    # pass: lets the decoder read such pixels straight from the file. None otherwise.
    pixel_offset: int | None = None
    # (size, mtime in ns) of the file when this header was read: a later change is detectable.
    stamp: tuple[int, int] | None = None
    # False when the file meta did not name the transfer syntax and it was detected from the data.
    syntax_declared: bool = True
    # Set (by read_header(keep_damaged=True)) when the file's identity was read but its pixel data
    # are cut or damaged: the rejection to report. Series assembly uses such a header only to tell
    # whether an intact copy of the instance exists and which part of its series is missing.
    damage: InputRejected | None = None

    @property
    def is_segmentation(self) -> bool:
        """A DICOM SEG: a label map for pipeline.io.seg, not an image for assemble_series."""
        return self.sop_class_uid == SEGMENTATION_STORAGE

    @property
    def is_multiframe(self) -> bool:
        return self.sop_class_uid in MULTI_FRAME_CLASSES

    @property
    def is_localizer(self) -> bool:
        return "LOCALIZER" in self.image_type

    @property
    def sop_class_name(self) -> str:
        return SUPPORTED_CLASSES.get(self.sop_class_uid, "Segmentation Storage")


def _float(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return out if out == out and abs(out) != float("inf") else None  # NaN/Inf are not geometry


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):
        return None


def _floats(value: Any, n: int) -> tuple[float, ...] | None:
    """Exactly `n` finite numbers from a multi-valued DS, or None (missing or malformed)."""
    if value is None:
        return None
    try:
        items = list(value) if not isinstance(value, str | bytes) else [value]
    except TypeError:
        return None
    if len(items) != n:
        return None
    out = tuple(_float(v) for v in items)
    return None if None in out else out  # type: ignore[return-value]


def _get(ds: Dataset, keyword: str) -> Any:
    """A tag's value, or None when absent or unparseable (hostile files must not raise here)."""
    try:
        return ds.get(keyword)
    except (ValueError, TypeError, KeyError, OverflowError):
        return None


def _text(ds: Dataset, keyword: str) -> str:
    value = _get(ds, keyword)
    return "" if value is None else str(value).strip()


def _first_item(seq: Any) -> Dataset | None:
    try:
        return seq[0] if seq else None
    except (TypeError, IndexError):
        return None


def _single_frame_geometry(ds: Dataset) -> FrameGeometry:
    slope = _float(_get(ds, "RescaleSlope"))
    intercept = _float(_get(ds, "RescaleIntercept"))
    echo = _get(ds, "EchoNumbers")
    if echo is not None and not isinstance(echo, str | int | float):
        echo = next(iter(echo), None)  # EchoNumbers is multi-valued (IS, VM 1-n)
    return FrameGeometry(
        position=_floats(_get(ds, "ImagePositionPatient"), 3),  # type: ignore[arg-type]
        orientation=_floats(_get(ds, "ImageOrientationPatient"), 6),
        pixel_spacing=_floats(_get(ds, "PixelSpacing"), 2),  # type: ignore[arg-type]
        rescale_slope=1.0 if slope is None else slope,
        rescale_intercept=0.0 if intercept is None else intercept,
        echo=_float(echo),
        temporal=_int(_get(ds, "TemporalPositionIdentifier")),
    )


def _multi_frame_geometry(ds: Dataset, n_frames: int) -> tuple[FrameGeometry, ...]:
    """Per-frame geometry of an enhanced image: per-frame functional groups over shared ones."""
    shared = _first_item(_get(ds, "SharedFunctionalGroupsSequence")) or Dataset()
    per_frame = _get(ds, "PerFrameFunctionalGroupsSequence") or []
    if len(per_frame) != n_frames:
        # Without one functional group per frame the geometry of some frames is unknown.
        return tuple(FrameGeometry(None, None, None) for _ in range(n_frames))

    def item(frame: Dataset, keyword: str) -> Dataset:
        return _first_item(_get(frame, keyword)) or _first_item(_get(shared, keyword)) or Dataset()

    frames = []
    for frame in per_frame:
        plane = item(frame, "PlanePositionSequence")
        orient = item(frame, "PlaneOrientationSequence")
        measures = item(frame, "PixelMeasuresSequence")
        value = item(frame, "PixelValueTransformationSequence")
        content = item(frame, "FrameContentSequence")
        echo = item(frame, "MREchoSequence")
        slope = _float(_get(value, "RescaleSlope"))
        intercept = _float(_get(value, "RescaleIntercept"))
        stack = _get(content, "StackID")
        frames.append(
            FrameGeometry(
                position=_floats(_get(plane, "ImagePositionPatient"), 3),  # type: ignore[arg-type]
                orientation=_floats(_get(orient, "ImageOrientationPatient"), 6),
                pixel_spacing=_floats(_get(measures, "PixelSpacing"), 2),  # type: ignore[arg-type]
                rescale_slope=1.0 if slope is None else slope,
                rescale_intercept=0.0 if intercept is None else intercept,
                echo=_float(_get(echo, "EffectiveEchoTime")),
                temporal=_int(_get(content, "TemporalPositionIndex")),
                stack=None if stack is None else str(stack),
            )
        )
    return tuple(frames)


def read_header(path: Path, root: Path, max_pixels: int, *, keep_damaged: bool = False) -> DicomHeader:
    """Read one file's header (no pixels) or raise InputRejected with the reason.

    Reasons: NOT_DICOM (empty or not DICOM), DICOMDIR (an index file, ignored), UNREADABLE,
    UNSUPPORTED_SOP_CLASS, TOO_LARGE (Rows x Columns x frames over `max_pixels`, refused before
    any allocation), TRUNCATED (the file ends before its pixel data do: native data shorter than
    declared, encapsulated fragments past the end or without their closing delimiter, or no Pixel
    Data at all), OUTSIDE_ROOT (a link that resolves outside `root`). DICOM SEG files pass (see
    `DicomHeader.is_segmentation`).

    A data set without file meta (or whose meta omits the transfer syntax) is read in the syntax
    its first element shows (see `dicom_syntax`); `transfer_syntax` is always the effective one.
    keep_damaged: a TRUNCATED or UNREADABLE file whose study, series and instance could be read
    is returned with `damage` set instead of raising, so that series assembly can look for an
    intact copy and report what its series lacks.
    """
    path = Path(path)
    root = Path(root)
    rel = Path(os.path.relpath(path, root)).as_posix()
    try:
        path.resolve().relative_to(root.resolve())
    except ValueError:
        raise InputRejected(
            Reason.OUTSIDE_ROOT, rel, "the file is a link that resolves outside the source root; not read."
        ) from None
    try:
        st = path.stat()
        size = st.st_size
        with open(path, "rb") as fh:
            head = fh.read(132)
            if size == 0:
                raise InputRejected(Reason.NOT_DICOM, rel, "empty file (0 bytes).", {"file_size": 0})
            has_preamble = head[128:132] == b"DICM"
            # plausible_start: a raw voxel dump that happens to start with 08 00 is not DICOM.
            if not has_preamble and not (looks_like_data_set(head, size) and plausible_start(head)):
                raise InputRejected(
                    Reason.NOT_DICOM,
                    rel,
                    "no 'DICM' marker at byte 128 and no DICOM data set at byte 0: not a DICOM file.",
                    {"file_size": size},
                )
            fh.seek(0)
            try:
                # force: a data set without preamble or file meta is still DICOM (old archives).
                ds = pydicom.dcmread(fh, stop_before_pixels=True, force=True)
                header = _header_from_dataset(ds, fh, path, rel, max_pixels)
            except zlib.error as exc:  # a deflated data set whose stream was cut
                header = _cut_deflated(fh, path, rel, size, max_pixels, exc)
            if header.damage is not None and not keep_damaged:
                raise header.damage
            return dataclasses.replace(header, stamp=(st.st_size, st.st_mtime_ns))
    except InputRejected:
        raise
    except InvalidDicomError as exc:
        raise InputRejected(Reason.NOT_DICOM, rel, f"not a DICOM file: {exc}", {"file_size": size}) from None
    except EOFError as exc:
        raise InputRejected(
            Reason.TRUNCATED, rel, f"the file ends inside its header ({exc}); re-export or re-copy it."
        ) from None
    except OSError as exc:
        raise InputRejected(Reason.UNREADABLE, rel, f"cannot read the file: {exc.strerror or exc}") from None
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - any parser failure on a hostile file is that file's reason
        raise InputRejected(
            Reason.UNREADABLE,
            rel,
            f"the DICOM header cannot be parsed: {type(exc).__name__}: {show(str(exc))}",
        ) from None


def _cut_deflated(fh: Any, path: Path, rel: str, size: int, max_pixels: int, exc: Exception) -> DicomHeader:
    """The header of a deflated file whose stream ends early, marked TRUNCATED (damage).

    zlib gives back what it inflated before the cut; the data set's elements read from that part
    still name the instance and its series. Raises TRUNCATED when even those are not there.
    """
    cut = InputRejected(
        Reason.TRUNCATED,
        rel,
        f"the deflated data set ends early ({show(str(exc), 100)}): the file was cut short. Re-export "
        "or re-copy the file.",
        {"file_size": size},
    )
    try:
        meta = pydicom.filereader.read_file_meta_info(path)
        start = data_set_start(fh)
        fh.seek(start)
        inflated = zlib.decompressobj(-zlib.MAX_WBITS).decompress(fh.read())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom notes the cut element
            ds = pydicom.filereader.read_dataset(io.BytesIO(inflated), False, True)
        ds.file_meta = meta
        header = _header_from_dataset(ds, io.BytesIO(), path, rel, max_pixels)
    except InputRejected:
        raise cut from None
    except Exception:  # noqa: BLE001 - nothing more can be read: the cut is the reason
        raise cut from None
    return dataclasses.replace(header, damage=cut)


def _header_from_dataset(ds: Dataset, fh: Any, path: Path, rel: str, max_pixels: int) -> DicomHeader:
    meta = getattr(ds, "file_meta", None) or Dataset()
    media_class = str(meta.get("MediaStorageSOPClassUID", ""))
    if media_class == MEDIA_STORAGE_DIRECTORY or "DirectoryRecordSequence" in ds:
        raise InputRejected(
            Reason.DICOMDIR,
            rel,
            "a DICOMDIR (an index of the files of a DICOM media), not an image; the images it lists "
            "are read by the folder scan itself.",
        )
    sop_class = _text(ds, "SOPClassUID")
    if not sop_class and media_class:
        sop_class = media_class
    if sop_class not in SUPPORTED_CLASSES and sop_class != SEGMENTATION_STORAGE:
        name = UID(sop_class).name if sop_class else "none"
        raise InputRejected(
            Reason.UNSUPPORTED_SOP_CLASS,
            rel,
            f"SOP class {show(name)} is not a volume image; supported: "
            f"{', '.join(sorted(SUPPORTED_CLASSES.values()))}.",
            {"sop_class": show(name)},
        )
    study_uid, series_uid = _text(ds, "StudyInstanceUID"), _text(ds, "SeriesInstanceUID")
    if not series_uid or not study_uid:
        missing = " and ".join(
            k for k, v in (("StudyInstanceUID", study_uid), ("SeriesInstanceUID", series_uid)) if not v
        )
        raise InputRejected(
            Reason.UNREADABLE, rel, f"{missing} missing: the file cannot be placed in a series."
        )
    declared = str(meta.get("TransferSyntaxUID", "")).strip() or None
    syntax = declared or ""
    if declared is None or declared in NATIVE:  # compressed syntaxes say how they are written
        here = fh.tell()
        syntax = detect_transfer_syntax(fh, declared, rel)
        fh.seek(here)
    rows, columns = _int(_get(ds, "Rows")), _int(_get(ds, "Columns"))
    n_frames = max(_int(_get(ds, "NumberOfFrames")) or 1, 1)
    samples = _int(_get(ds, "SamplesPerPixel")) or 1
    bits_allocated = _int(_get(ds, "BitsAllocated")) or 16
    damage: InputRejected | None = None
    pixel_offset: int | None = None
    if not rows or not columns or rows < 0 or columns < 0:
        # Its series and instance are known: kept (keep_damaged) so that the series it belongs to
        # is known to lack it. Rows and Columns 0 stand for "unknown" in such a header.
        damage = InputRejected(
            Reason.UNREADABLE,
            rel,
            f"Rows {show(_get(ds, 'Rows'))} / Columns {show(_get(ds, 'Columns'))}: expected positive "
            "integers (an image without pixel data, or a file cut inside its header?).",
        )
        rows = columns = 0
    else:
        pixels = rows * columns * n_frames
        if pixels > max_pixels:
            raise InputRejected(
                Reason.TOO_LARGE,
                rel,
                f"{rows} rows x {columns} columns x {n_frames} frames = {pixels} pixels, over the limit "
                f"of {max_pixels}; raise the pixel limit if this image is expected.",
                {"rows": rows, "columns": columns, "frames": n_frames, "pixels": pixels, "limit": max_pixels},
            )
        expected = (pixels * samples * bits_allocated + 7) // 8
        try:
            pixel_offset = check_pixel_data(fh, syntax, expected, rel)
        except InputRejected as err:  # the identity is known: the caller may keep the header
            damage = err

    if sop_class == SEGMENTATION_STORAGE:
        # A SEG's frames are placed when its labels are read (`pipeline.io.seg`); parsing its
        # per-frame groups here would only slow the scan of a folder with annotations.
        frames: tuple[FrameGeometry, ...] = ()
    elif sop_class in MULTI_FRAME_CLASSES:
        frames = _multi_frame_geometry(ds, n_frames)
    else:
        frames = (_single_frame_geometry(ds),)
    image_type = _get(ds, "ImageType")
    if isinstance(image_type, str):
        image_type = [image_type]
    return DicomHeader(
        path=path.absolute(),
        rel=rel,
        sop_class_uid=sop_class,
        study_uid=study_uid,
        series_uid=series_uid,
        sop_instance_uid=_text(ds, "SOPInstanceUID"),
        modality=_text(ds, "Modality").upper() or "unknown",
        transfer_syntax=syntax,
        rows=rows,
        columns=columns,
        number_of_frames=n_frames,
        samples_per_pixel=samples,
        photometric=_text(ds, "PhotometricInterpretation").upper(),
        bits_allocated=bits_allocated,
        bits_stored=_int(_get(ds, "BitsStored")) or bits_allocated,
        pixel_representation=_int(_get(ds, "PixelRepresentation")) or 0,
        image_type=tuple(str(v).strip().upper() for v in (image_type or [])),
        acquisition_number=_int(_get(ds, "AcquisitionNumber")),
        instance_number=_int(_get(ds, "InstanceNumber")),
        gantry_tilt=_float(_get(ds, "GantryDetectorTilt")),
        frames=frames,
        pixel_offset=pixel_offset,
        syntax_declared=declared is not None,
        damage=damage,
    )


# A DICOM File ID component: upper-case letters, digits, underscore, at most 8 characters (PS3.10).
_FILE_ID_COMPONENT = re.compile(r"[A-Z0-9_]{1,8}")


def dicomdir_references(path: Path, root: Path) -> tuple[list[Path], list[InputRejected]]:
    """The files a DICOMDIR lists that exist inside `root`, and a rejection for each that does not.

    Never followed: the references are only checked, so the orchestrator can report a DICOMDIR
    that points outside the source root (OUTSIDE_ROOT) or at files that are missing.
    """
    path, root = Path(path), Path(root)
    rel = Path(os.path.relpath(path, root)).as_posix()
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, OSError, EOFError, ValueError) as exc:
        raise InputRejected(
            Reason.UNREADABLE, rel, f"the DICOMDIR cannot be read: {show(str(exc))}"
        ) from None
    root_real = root.resolve()
    found: list[Path] = []
    rejected: list[InputRejected] = []
    for record in _get(ds, "DirectoryRecordSequence") or []:
        file_id = _get(record, "ReferencedFileID")
        if file_id is None:
            continue
        parts = [file_id] if isinstance(file_id, str) else [str(p) for p in file_id]
        if not parts or len(parts) > 8 or not all(_FILE_ID_COMPONENT.fullmatch(p) for p in parts):
            rejected.append(
                InputRejected(
                    Reason.OUTSIDE_ROOT,
                    rel,
                    f"the DICOMDIR references {show('/'.join(parts))}, which is not a valid DICOM File ID "
                    "(upper-case letters, digits, underscore; 8 characters per component); not followed.",
                )
            )
            continue
        target = path.parent.joinpath(*parts)
        try:
            target.resolve().relative_to(root_real)
        except ValueError:
            rejected.append(
                InputRejected(
                    Reason.OUTSIDE_ROOT,
                    rel,
                    f"the DICOMDIR references {show('/'.join(parts))}, which resolves outside the source "
                    "root; not followed.",
                )
            )
            continue
        found.append(target)
    return found, rejected
