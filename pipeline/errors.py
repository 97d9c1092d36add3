"""Rejected inputs: stable reason codes and the error that carries them.

Every input the pipeline refuses gets one `Reason` (a stable UPPER_SNAKE code that scripts and
dashboards may key on), the file it concerns (relative to the source root where known) and a
message with the measured values. The batch goes on; the input is quarantined, never modified.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class Reason(StrEnum):
    """Why an input was rejected or ignored. Values never change once released."""

    # files
    NOT_DICOM = "NOT_DICOM"  # not a DICOM or NIfTI file (reports, Thumbs.db, empty files): ignored
    TRUNCATED = "TRUNCATED"  # the file ends before its header or pixel data says it should
    TOO_LARGE = "TOO_LARGE"  # declared pixel count over the configured limit, refused before allocation
    UNREADABLE = "UNREADABLE"  # a header that cannot be parsed
    OUTSIDE_ROOT = "OUTSIDE_ROOT"  # a DICOMDIR or link that points outside the source root
    DICOMDIR = "DICOMDIR"  # a DICOMDIR index, not an image: the files it lists are found by the scan
    NOT_REGULAR_FILE = "NOT_REGULAR_FILE"  # a FIFO, socket or device in the tree: listed, never opened
    BROKEN_LINK = "BROKEN_LINK"  # a symbolic link whose target does not exist, or a loop of links
    FOLDER_LINK = "FOLDER_LINK"  # a link to a folder inside the source: not followed, files read in place
    MISSING_REFERENCED_FILE = "MISSING_REFERENCED_FILE"  # a DICOMDIR lists files absent from the source
    ANALYZE_FORMAT = "ANALYZE_FORMAT"  # an Analyze 7.5 / NIfTI .hdr/.img pair: convert to one .nii.gz
    # DICOM series
    UNSUPPORTED_SOP_CLASS = "UNSUPPORTED_SOP_CLASS"
    UNSUPPORTED_PHOTOMETRIC = "UNSUPPORTED_PHOTOMETRIC"
    MISSING_DECODER = "MISSING_DECODER"  # a compressed transfer syntax with no installed decoder
    MISSING_GEOMETRY = "MISSING_GEOMETRY"  # no ImagePositionPatient / ImageOrientationPatient / PixelSpacing
    NON_UNIFORM_SPACING = "NON_UNIFORM_SPACING"  # a missing slice or uneven gaps
    GANTRY_TILT = "GANTRY_TILT"
    DUPLICATE_POSITION = "DUPLICATE_POSITION"  # different instances at one slice position
    DUPLICATE_INSTANCE = "DUPLICATE_INSTANCE"  # another copy of an instance already used: ignored
    SERIES_INCOMPLETE = "SERIES_INCOMPLETE"  # files of the series were refused one by one: it is short
    ORIENTATION_VARIES = "ORIENTATION_VARIES"
    TOO_FEW_SLICES = "TOO_FEW_SLICES"
    LOCALIZER = "LOCALIZER"
    # NIfTI and datasets
    QFORM_SFORM_MISMATCH = "QFORM_SFORM_MISMATCH"
    NO_ORIENTATION = "NO_ORIENTATION"  # qform_code = sform_code = 0: left/right unknown (config may opt in)
    NON_ORTHONORMAL_AFFINE = "NON_ORTHONORMAL_AFFINE"
    UNSUPPORTED_DIMENSIONS = "UNSUPPORTED_DIMENSIONS"  # 4D or higher, or fewer than 3
    NON_FINITE_VOXELS = "NON_FINITE_VOXELS"
    NON_INTEGER_LABELS = "NON_INTEGER_LABELS"
    UNEXPECTED_LABELS = "UNEXPECTED_LABELS"
    LABEL_GEOMETRY_MISMATCH = "LABEL_GEOMETRY_MISMATCH"
    MISSING_LABEL_SOURCE = "MISSING_LABEL_SOURCE"  # a label (SEG or NIfTI) whose image is not there
    CONVERSION_FAILED = "CONVERSION_FAILED"  # an unclassified failure while converting a case
    INVALID_DATASET = "INVALID_DATASET"  # a dataset.json that does not describe the files present
    # prediction
    PREDICTION_FAILED = "PREDICTION_FAILED"  # preprocessing, the network or post-processing failed
    READ_FAILED = "READ_FAILED"  # reading or decoding a planned case failed (not a refused input)
    OUTPUT_WRITE_FAILED = "OUTPUT_WRITE_FAILED"  # the case folder or its NIfTI mask could not be written
    SEG_WRITE_FAILED = "SEG_WRITE_FAILED"  # the DICOM SEG could not be built or written
    QC_WRITE_FAILED = "QC_WRITE_FAILED"  # the QC picture could not be drawn or written
    RECORD_WRITE_FAILED = "RECORD_WRITE_FAILED"  # the case's done-marker could not be written
    TIMEOUT = "TIMEOUT"  # the case ran past its time limit; its worker process was killed
    NO_RESULT = "NO_RESULT"  # a planned case left no record: its worker died or it never ran
    # PACS (pull and push)
    PACS_UNREACHABLE = "PACS_UNREACHABLE"  # no answer from the PACS (down, wrong host or port, TLS failure)
    PACS_REFUSED = "PACS_REFUSED"  # the PACS answered with an error (credentials, permissions, bad query)
    PACS_INCOMPLETE_SERIES = "PACS_INCOMPLETE_SERIES"  # fewer instances delivered than the PACS listed
    PUSH_UNREACHABLE = "PUSH_UNREACHABLE"  # the push destination did not answer; a rerun retries the push
    PUSH_REFUSED = "PUSH_REFUSED"  # the push destination refused the object; a rerun retries the push


class Status(StrEnum):
    """What became of one case at one stage (results.csv, reports, job records). Values never change."""

    OK = "ok"  # predicted; every output written
    SKIPPED = "skipped"  # a valid done-marker already stood: nothing was redone
    CONVERTED = "converted"  # ingest: staged by this run
    UNCHANGED = "unchanged"  # ingest: an earlier run's outputs stand (same source bytes, same settings)
    QUARANTINED = "quarantined"  # a refused input; its Reason says why
    IGNORED = "ignored"  # not an image for this use (reports, DICOMDIR, another copy): listed, not an error
    FAILED = "failed"  # a step failed on a valid input; its Reason says which
    PUSH_FAILED = "push_failed"  # predicted, but the PACS did not store the outputs; a rerun retries


# Reasons that mean "not an input at all" rather than "a bad input": listed as ignored.
IGNORED_REASONS = frozenset(
    {Reason.NOT_DICOM, Reason.DICOMDIR, Reason.DUPLICATE_INSTANCE, Reason.FOLDER_LINK}
)


@dataclass
class InputRejected(Exception):
    """An input the pipeline refuses, with the file, a stable reason code and measured values."""

    reason: Reason
    path: str  # the offending file (relative to the source root when known)
    message: str  # what was expected, what was found, what to do
    details: dict[str, Any] = field(default_factory=dict)  # measured values, JSON-serializable

    def __post_init__(self) -> None:
        super().__init__(str(self))

    def __reduce__(self):  # picklable across worker processes (Exception's default uses args)
        return (type(self), (self.reason, self.path, self.message, self.details))

    def __str__(self) -> str:
        return f"{self.path}: {self.reason.value}: {self.message}"

    def to_record(self) -> dict[str, Any]:
        """The quarantine.jsonl line for this rejection."""
        return {"path": self.path, "reason": self.reason.value, "message": self.message, **self.details}
