"""Write a label map as a DICOM SEG that references its source series, as annotation tools export.

highdicom builds the object (binary segmentation, one segment per label value, algorithm type
MANUAL); we only make it reproducible: UIDs come from the seed, and the dates and UIDs that
highdicom takes from the clock or draws afresh are fixed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from pipeline.io.atomic import atomic_path

# Label name -> (SegmentedPropertyCategory, SegmentedPropertyType), codes from CID 7150 / 7151.
PROPERTY_CODES = {
    "organ": (codes.SCT.AnatomicalStructure, codes.SCT.Organ),
    "lesion": (codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.Lesion),
    "neoplasm": (codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.Neoplasm),
    "tissue": (codes.SCT.Tissue, codes.SCT.Tissue),
}
FIXED_DATE, FIXED_TIME = "20260101", "120000"  # never the clock: same seed, same bytes


def write_seg(
    label: np.ndarray,
    source_paths: Sequence[Path],
    out_path: Path,
    label_names: Mapping[int, str],
    seed: int,
) -> Path:
    """Write `label` (slices, rows, columns; uint values) as a BINARY DICOM SEG at `out_path`.

    `source_paths` are the series files in the order of `label`'s first axis. Every label value
    1..max must be named in `label_names` (names from PROPERTY_CODES); each becomes one segment
    whose SegmentNumber is the label value and whose SegmentLabel is its name. The write is
    atomic. Returns `out_path`.
    """
    label = np.asarray(label)
    if label.ndim != 3 or not np.issubdtype(label.dtype, np.integer):
        raise ValueError(
            f"label must be a 3D integer array (slices, rows, columns); got {label.dtype} {label.shape}"
        )
    if len(source_paths) != label.shape[0]:
        raise ValueError(f"{len(source_paths)} source files given for {label.shape[0]} label slices")
    numbers = sorted(int(k) for k in label_names if int(k) != 0)
    if numbers != list(range(1, len(numbers) + 1)) or int(label.max()) > len(numbers):
        raise ValueError(
            f"label_names must name every label 1..{int(label.max())} without gaps; got {dict(label_names)}"
        )
    unknown = {label_names[k] for k in numbers} - set(PROPERTY_CODES)
    if unknown:
        raise ValueError(
            f"no segment codes for label names {sorted(unknown)}; known: {', '.join(PROPERTY_CODES)}"
        )

    sources = [pydicom.dcmread(p, stop_before_pixels=True) for p in source_paths]
    rng = np.random.default_rng(seed)

    def uid() -> str:
        return generate_uid(entropy_srcs=[str(rng.integers(0, 2**63))])

    descriptions = []
    for number in numbers:
        name = label_names[number]
        category, prop_type = PROPERTY_CODES[name]
        description = hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=name,
            segmented_property_category=category,
            segmented_property_type=prop_type,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
            tracking_uid=uid(),
            tracking_id=f"{name}-{number}",
        )
        description.SegmentDescription = name
        descriptions.append(description)

    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=label.astype(np.uint8),  # label-map style: value k is segment k
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=uid(),
        series_number=int(getattr(sources[0], "SeriesNumber", 0) or 0) + 1000,
        sop_instance_uid=uid(),
        instance_number=1,
        manufacturer="unet-pipeline synthetic",
        manufacturer_model_name="demo annotation tool",
        software_versions="1.0",
        device_serial_number="DEMO-0001",
        content_description="Manual annotation",
        content_creator_name="ANNOTATOR^DEMO",
        content_label="ANNOTATION",
        series_description="Manual segmentation",
    )
    for keyword, value in (
        ("InstanceCreationDate", FIXED_DATE),
        ("InstanceCreationTime", FIXED_TIME),
        ("ContentDate", FIXED_DATE),
        ("ContentTime", FIXED_TIME),
        ("SeriesDate", FIXED_DATE),
        ("SeriesTime", FIXED_TIME),
    ):
        setattr(seg, keyword, value)
    for item in seg.get("ContributingEquipmentSequence", []):
        if "ContributionDateTime" in item:
            item.ContributionDateTime = FIXED_DATE + FIXED_TIME
    dimension_uid = uid()  # highdicom draws a fresh one; the index items all refer to it
    for sequence in ("DimensionOrganizationSequence", "DimensionIndexSequence"):
        for item in seg.get(sequence, []):
            item.DimensionOrganizationUID = dimension_uid
    out_path = Path(out_path)
    with atomic_path(out_path) as tmp:
        seg.save_as(tmp, enforce_file_format=True)
    return out_path
