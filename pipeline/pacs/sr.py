"""A DICOM Structured Report of a case's segment volumes (TID 1500 Measurement Report, highdicom).

One volumetric ROI group per segment of the case's DICOM SEG (TID 1411), each referencing its
segment and the source series, with one measurement: the segment's volume in mL, as predict
computed it (the done-marker's result). Written beside the SEG as sr.dcm when a push asks for
it; kept (same bytes, same UIDs) while it still refers to the current SEG, so a rerun never
pushes a second SR for the same SEG.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from pipeline.io.atomic import atomic_path

SEG_FILE, SR_FILE, DONE_FILE = "seg.dcm", "sr.dcm", "done.json"

# SNOMED CT 363679005 "Imaging (procedure)": the generic procedure code TID 1500 asks for.
_PROCEDURE = ("363679005", "SCT", "Imaging procedure")


def _current(sr_path: Path, seg_uid: str) -> bool:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        sr = pydicom.dcmread(sr_path, stop_before_pixels=True)
    except (OSError, InvalidDicomError, ValueError):
        return False
    refs = {
        str(item.ReferencedSOPInstanceUID)
        for study in getattr(sr, "CurrentRequestedProcedureEvidenceSequence", [])
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    return seg_uid in refs


def write_volume_sr(case_dir: str | Path) -> Path:
    """Write (or keep) CASE_DIR/sr.dcm for CASE_DIR/seg.dcm and the volumes of its done-marker."""
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    case_dir = Path(case_dir)
    # highdicom logs source UIDs at INFO: keep identifiers out of our logs.
    hd_log = logging.getLogger("highdicom")
    level = hd_log.level
    hd_log.setLevel(max(level, logging.WARNING))
    try:
        return _write(case_dir, hd, pydicom, codes)
    finally:
        hd_log.setLevel(level)


def _write(case_dir: Path, hd, pydicom, codes) -> Path:
    seg = pydicom.dcmread(case_dir / SEG_FILE)
    path = case_dir / SR_FILE
    if path.is_file() and _current(path, str(seg.SOPInstanceUID)):
        return path
    volumes = json.loads((case_dir / DONE_FILE).read_text(encoding="utf-8"))["result"]["volumes_ml"]
    source_series = hd.sr.SourceSeriesForSegmentation(seg.ReferencedSeriesSequence[0].SeriesInstanceUID)
    groups = []
    for segment in seg.SegmentSequence:
        label = str(segment.SegmentLabel)
        if label not in volumes:
            continue
        groups.append(
            hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=hd.UID(), identifier=f"segment {segment.SegmentNumber} ({label})"
                ),
                referenced_segment=hd.sr.ReferencedSegment(
                    sop_class_uid=seg.SOPClassUID,
                    sop_instance_uid=seg.SOPInstanceUID,
                    segment_number=int(segment.SegmentNumber),
                    source_series=source_series,
                ),
                finding_type=hd.sr.CodedConcept.from_dataset(segment.SegmentedPropertyTypeCodeSequence[0]),
                measurements=[
                    hd.sr.Measurement(
                        name=codes.SCT.Volume,
                        value=float(volumes[label]),
                        unit=hd.sr.CodedConcept("mL", "UCUM", "milliliter"),
                    )
                ],
            )
        )
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=hd.UID(), name="unet-pipeline", model_name=str(getattr(seg, "ManufacturerModelName", ""))[:64]
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=hd.sr.CodedConcept(*_PROCEDURE),
        imaging_measurements=groups,
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=[seg],
        content=report[0],
        series_instance_uid=hd.UID(),
        series_number=int(getattr(seg, "SeriesNumber", 0) or 0) + 1,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="unet-pipeline",
        is_complete=True,
    )
    with atomic_path(path) as tmp:
        sr.save_as(tmp, enforce_file_format=True)
    return path
