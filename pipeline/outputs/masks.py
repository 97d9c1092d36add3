"""A case's label mask as written beside its source: a NIfTI file and, for DICOM sources, a DICOM SEG.

Every writer is atomic (a temporary file renamed into place), so a crash never leaves a partial
file at a final path. Nothing identifying is written outside the DICOM SEG (which must carry the
source's patient and study modules to be filed beside it).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.io.atomic import atomic_path
from pipeline.io.volume import Volume, save_nifti

if TYPE_CHECKING:
    from pipeline.io.dicom import SeriesGroup

log = logging.getLogger(__name__)


def write_mask_nifti(path: Path, mask: np.ndarray, affine: np.ndarray) -> Path:
    """uint8 label map with the source's affine (qform == sform, code 1), written atomically."""
    return save_nifti(Volume(np.asarray(mask, dtype=np.uint8), affine, "SEG"), path)


def _segment_codes(name: str):
    """(category, type) codes for a label name (CID 7150 / 7151); a generic tissue code otherwise."""
    from pydicom.sr.codedict import codes

    known = {
        "organ": (codes.SCT.AnatomicalStructure, codes.SCT.Organ),
        "lesion": (codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.Lesion),
        "tumor": (codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.Neoplasm),
        "neoplasm": (codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.Neoplasm),
    }
    return known.get(name.lower(), (codes.SCT.Tissue, codes.SCT.Tissue))


def write_dicom_seg(
    path: Path,
    mask: np.ndarray,
    group: SeriesGroup,
    label_names: Mapping[int, str],
    *,
    algorithm_name: str,
    algorithm_version: str,
    software_version: str,
) -> Path:
    """A BINARY DICOM SEG of `mask` (the series' (column, row, slice) grid) referencing its instances.

    One segment per model label (value k is segment k, labelled with the model's label name),
    algorithm type AUTOMATIC, identified by model name and version. Frames map to the source
    instances (or to the frames of one multi-frame source) slice by slice; a segment's frame is
    written only where the segment is present (the standard's and highdicom's default: a reader
    takes a source frame the SEG does not reference as empty), except in an all-empty mask,
    whose SEG keeps every frame (a SEG needs at least one).

    The patient and study modules are copied from the sources. Type 2 attributes they lack (or
    hold in a form the SEG cannot carry, e.g. PatientSex "U") are given empty values, as the
    standard allows (`seg_source`); the source files are only read.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    mask = np.asarray(mask, dtype=np.uint8)
    if mask.shape != group.shape:
        raise ValueError(f"mask shape {mask.shape} != series grid {group.shape}")
    per_slice = mask.transpose(2, 1, 0)  # (slice, row, column) in the series' spatial order
    header_ids = [h for h, _ in group.frames]
    if len(set(header_ids)) == len(header_ids) and all(f == 0 for _, f in group.frames):
        sources = [_read_source(group.headers[h].path, first=i == 0) for i, h in enumerate(header_ids)]
        pixels = per_slice
    elif len(group.headers) == 1:  # one multi-frame image: SEG frames follow its frame order
        sources = [_read_source(group.headers[0].path)]
        pixels = np.zeros((group.headers[0].number_of_frames, *per_slice.shape[1:]), np.uint8)
        for s, (_, f) in enumerate(group.frames):
            pixels[f] = per_slice[s]
    else:
        raise ValueError("a series spread over several multi-frame files: no SEG written")

    algorithm = hd.AlgorithmIdentificationSequence(
        name=algorithm_name, family=codes.cid7162.ArtificialIntelligence, version=algorithm_version
    )
    descriptions = []
    for value in sorted(v for v in label_names if v != 0):
        category, prop_type = _segment_codes(label_names[value])
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=value,
                segment_label=label_names[value],
                segmented_property_category=category,
                segmented_property_type=prop_type,
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algorithm,
            )
        )
    with _quiet_highdicom():
        seg = _segmentation(
            hd, sources, pixels, descriptions, algorithm_name, algorithm_version, software_version
        )
    with atomic_path(path) as tmp:
        seg.save_as(tmp, enforce_file_format=True)
    return path


# Type 2 attributes of the Patient (C.7.1.1) and General Study (C.7.2.1) modules: required, but
# may be empty. highdicom reads each of them from the first source without a default.
TYPE2_PATIENT_STUDY = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)
# Values the SEG's own modules accept (PatientSex's enumerated values, PS3.3 C.7.1.1).
_PATIENT_SEX = {"M", "F", "O"}


def _read_source(path: str | Path, *, first: bool = True):
    """A source header as a dataset in memory (`force`: files without a preamble or file meta).

    The SEG's patient and study modules come from the first source only (highdicom reads the
    others for their UIDs and geometry), so only the first is made fit for them (`seg_source`).
    """
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    return seg_source(ds) if first else ds


def seg_source(ds):
    """`ds` (a dataset in memory, never written back) with every Type 2 patient and study
    attribute the SEG copies present: absent or unusable ones become empty values.

    Unusable: a PatientSex other than M/F/O, or a StudyDate, StudyTime or PatientBirthDate that
    does not parse as DA/TM. The attribute's name is logged, never its value.
    """
    for keyword in TYPE2_PATIENT_STUDY:
        present = keyword in ds
        value = ds.get(keyword) if present else None
        if present and value not in (None, "") and not _usable(keyword, value):
            log.warning("source %s cannot be carried into the SEG: written empty", keyword)
            present = False
        if not present:
            setattr(ds, keyword, "")
        elif keyword == "PatientSex" and value:
            ds.PatientSex = str(value).strip().upper()
    return ds


def _usable(keyword: str, value) -> bool:
    """Whether the SEG writer can carry this Type 2 value (see `seg_source`)."""
    from pydicom.valuerep import DA, TM

    try:
        if keyword == "PatientSex":
            return str(value).strip().upper() in _PATIENT_SEX
        if keyword in ("PatientBirthDate", "StudyDate"):
            DA(value)
        elif keyword == "StudyTime":
            TM(value)
    except (ValueError, TypeError, OverflowError):
        return False
    return True


def _segmentation(hd, sources, pixels, descriptions, algorithm_name, algorithm_version, software_version):
    return hd.seg.Segmentation(
        source_images=sources,
        pixel_array=pixels,  # label-map style: value k is segment k
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=int(getattr(sources[0], "SeriesNumber", 0) or 0) + 2000,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="unet-pipeline",
        manufacturer_model_name=algorithm_name[:64],
        software_versions=software_version[:64],
        device_serial_number="unet-pipeline",
        content_description="Automatic segmentation",
        content_label="AUTOSEG",
        series_description=f"U-Net segmentation {algorithm_name} {algorithm_version}"[:64],
        # Empty frames left out: most of a volume lies outside a label (a lesion spans a few
        # slices), and each frame costs its functional groups in highdicom and pydicom (about a
        # millisecond a frame, the SEG writer's largest cost). An all-empty mask keeps them all
        # (highdicom would, with a warning).
        omit_empty_frames=bool(pixels.any()),
    )


# Writers run in several threads (`pipeline.inference.writers`): the first SEG in raises
# highdicom's log level and the last one out restores it, so no thread restores it while
# another is still writing.
_QUIET = threading.Lock()
_quiet_state = {"holders": 0, "level": logging.NOTSET}


@contextlib.contextmanager
def _quiet_highdicom() -> Iterator[None]:
    """highdicom logs source SOP Instance UIDs at INFO: keep identifiers out of our logs."""
    logger = logging.getLogger("highdicom")
    with _QUIET:
        if _quiet_state["holders"] == 0:
            _quiet_state["level"] = logger.level
            logger.setLevel(max(logger.level, logging.WARNING))
        _quiet_state["holders"] += 1
    try:
        yield
    finally:
        with _QUIET:
            _quiet_state["holders"] -= 1
            if _quiet_state["holders"] == 0:
                logger.setLevel(_quiet_state["level"])
