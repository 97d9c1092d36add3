"""DICOM series builder: the public API the ingest orchestrator calls.

    headers = [read_header(p, root, max_pixels) for p in files]   # header-only, no pixels
    groups, rejected = assemble_series(headers)                   # grouping and geometry rules
    volume = load_series(group)                                   # pixels decoded only now

Every refusal is an `InputRejected` with a stable `Reason`. The implementation lives in
`dicom_header` (the header pass, with `dicom_syntax` for what only the bytes tell),
`dicom_instances` (copies of one instance, files a series lost), `dicom_series` (assembly) and
`dicom_decode` (pixel values).
"""

from pipeline.io.dicom_decode import decode_stored
from pipeline.io.dicom_header import (
    MULTI_FRAME_CLASSES,
    SEGMENTATION_STORAGE,
    SUPPORTED_CLASSES,
    DicomHeader,
    FrameGeometry,
    dicomdir_references,
    read_header,
)
from pipeline.io.dicom_series import SeriesGroup, assemble_series, load_series, planned_series_bytes

__all__ = [
    "MULTI_FRAME_CLASSES",
    "SEGMENTATION_STORAGE",
    "SUPPORTED_CLASSES",
    "DicomHeader",
    "FrameGeometry",
    "SeriesGroup",
    "assemble_series",
    "decode_stored",
    "dicomdir_references",
    "load_series",
    "planned_series_bytes",
    "read_header",
]
