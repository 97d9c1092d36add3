"""DICOM SEG labels: exact masks on the referenced image's grid, and every rejection."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from pipeline.errors import InputRejected, Reason
from pipeline.io.seg import read_seg_labels, seg_referenced_series_uid
from pipeline.io.volume import Volume
from pipeline.synthetic.dicom import AXIAL, SAGITTAL, SeriesSpec, slice_normal, write_dicom_series

SLICES, ROWS, COLS = 5, 11, 13
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _oblique() -> tuple[float, ...]:
    a, b = np.radians(20.0), np.radians(-35.0)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    r = rz @ rx
    return (*r[:, 0], *r[:, 1])


ORIENTATIONS = {"axial": AXIAL, "sagittal": SAGITTAL, "oblique": _oblique()}


@dataclass(frozen=True)
class Header:
    """The fields of pipeline.io.dicom's DicomHeader that read_seg_labels uses."""

    path: Path
    rel: str
    sop_instance_uid: str
    series_uid: str


@dataclass
class Series:
    paths: list[Path]  # slice order
    headers: list[Header]
    image: Volume


def write_series(out: Path, orientation, seed: int = 0) -> Series:
    """A real DICOM series and the Volume the series builder would make of it (built here by hand)."""
    spec = SeriesSpec(
        orientation=orientation,
        pixel_spacing=(0.7, 0.9),
        slice_spacing=2.5,
        origin=(-40.0, 25.0, 13.0),
        seed=seed,
    )
    stored = np.arange(SLICES * ROWS * COLS, dtype=np.int16).reshape(SLICES, ROWS, COLS)
    paths = write_dicom_series(stored, out, spec)
    row, col = np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)
    lps = np.eye(4)
    lps[:3, 0] = row * spec.pixel_spacing[1]  # i runs along a row: column spacing
    lps[:3, 1] = col * spec.pixel_spacing[0]  # j runs down a column: row spacing
    lps[:3, 2] = slice_normal(orientation) * spec.slice_spacing
    lps[:3, 3] = spec.origin
    headers = []
    for p in paths:
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        headers.append(Header(p, p.name, str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID)))
    image = Volume(stored.transpose(2, 1, 0), LPS_TO_RAS @ lps, modality="CT")
    return Series(paths, headers, image)


def write_seg(series: Series, pixels: np.ndarray, out: Path, *, fractional: bool = False) -> Path:
    """A highdicom SEG over ``series``: ``pixels`` is (slices, rows, columns[, segments])."""
    n_segments = pixels.shape[3] if pixels.ndim == 4 else max(int(pixels.max()), 1)
    names = ["liver", "tumour", "vessel"]
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=n + 1,
            segment_label=names[n],
            segmented_property_category=codes.SCT.Tissue,
            segmented_property_type=codes.SCT.Tissue,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
        )
        for n in range(n_segments)
    ]
    seg = hd.seg.Segmentation(
        source_images=[pydicom.dcmread(p) for p in series.paths],
        pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.FRACTIONAL
        if fractional
        else hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=generate_uid(),
        series_number=100,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="test",
        manufacturer_model_name="test",
        software_versions="1",
        device_serial_number="1",
    )
    seg.save_as(out, enforce_file_format=True)
    return out


def label_pixels() -> np.ndarray:
    """(slices, rows, columns) segment numbers; slice 0 and 4 empty (highdicom omits their frames)."""
    px = np.zeros((SLICES, ROWS, COLS), np.uint8)
    px[1:4, 2:9, 3:11] = 1
    px[2, 4:6, 5:7] = 2
    px[3, 0, 12] = 2  # a corner voxel: any transposition or flip error moves it
    return px


@pytest.fixture(params=list(ORIENTATIONS))
def series(request, tmp_path) -> Series:
    return write_series(tmp_path / "series", ORIENTATIONS[request.param])


def test_round_trip_gives_the_exact_mask_on_the_image_grid(series, tmp_path):
    px = label_pixels()
    seg_path = write_seg(series, px, tmp_path / "seg.dcm")
    label, names = read_seg_labels(seg_path, "seg.dcm", series.headers, series.image)
    assert names == {1: "liver", 2: "tumour"}
    assert label.data.dtype == np.uint8
    assert label.shape == series.image.shape
    np.testing.assert_array_equal(label.affine, series.image.affine)
    np.testing.assert_array_equal(label.data, px.transpose(2, 1, 0))  # (slice, row, col) -> (i, j, k)
    assert label.meta["label_values"] == [0, 1, 2]
    assert label.meta["frames"] == 5  # 3 slices of liver + 2 of tumour, empty frames omitted


def test_overlapping_segments_highest_number_wins(series, tmp_path):
    stacked = np.zeros((SLICES, ROWS, COLS, 3), bool)
    stacked[1:4, 2:9, 3:11, 0] = True
    stacked[2, 4:8, 5:9, 1] = True  # inside liver
    stacked[2, 6:10, 7:12, 2] = True  # overlaps both
    seg_path = write_seg(series, stacked, tmp_path / "seg.dcm")
    label, names = read_seg_labels(seg_path, "seg.dcm", series.headers, series.image)
    expected = np.zeros((SLICES, ROWS, COLS), np.uint8)
    for n in range(3):
        expected[stacked[..., n]] = n + 1
    np.testing.assert_array_equal(label.data, expected.transpose(2, 1, 0))
    assert names == {1: "liver", 2: "tumour", 3: "vessel"}


def test_fractional_segment_counts_voxels_at_half_or_more(tmp_path):
    series = write_series(tmp_path / "series", AXIAL)
    frac = np.zeros((SLICES, ROWS, COLS), np.float32)
    frac[2, 3:6, 4:8] = 0.8
    frac[2, 6, 4:8] = 0.3
    frac[3, 1, 1] = 1.0
    seg_path = write_seg(series, frac, tmp_path / "seg.dcm", fractional=True)
    label, _ = read_seg_labels(seg_path, "seg.dcm", series.headers, series.image)
    np.testing.assert_array_equal(label.data, (frac >= 0.5).astype(np.uint8).transpose(2, 1, 0))


def test_frames_without_plane_positions_are_unreadable(tmp_path):
    series = write_series(tmp_path / "series", _oblique())
    px = label_pixels()
    seg_path = write_seg(series, px, tmp_path / "seg.dcm")
    ds = pydicom.dcmread(seg_path)
    for item in ds.PerFrameFunctionalGroupsSequence:
        del item.PlanePositionSequence
    ds.save_as(seg_path)
    with pytest.raises(InputRejected) as info:
        read_seg_labels(seg_path, "seg.dcm", series.headers, series.image)
    assert info.value.reason == Reason.UNREADABLE  # highdicom needs plane positions; nothing is guessed


def test_referenced_series_uid_is_read_from_the_header(tmp_path):
    series = write_series(tmp_path / "series", AXIAL)
    seg_path = write_seg(series, label_pixels(), tmp_path / "seg.dcm")
    assert seg_referenced_series_uid(seg_path) == series.headers[0].series_uid


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda s, tmp: s.paths[0], Reason.UNSUPPORTED_SOP_CLASS),  # an image, not a SEG
        (
            lambda s, tmp: (tmp / "x.dcm").write_bytes(b"not dicom at all") and tmp / "x.dcm",
            Reason.UNREADABLE,
        ),
    ],
)
def test_referenced_series_uid_rejections(tmp_path, make, reason):
    series = write_series(tmp_path / "series", AXIAL)
    with pytest.raises(InputRejected) as info:
        seg_referenced_series_uid(make(series, tmp_path), "in/x.dcm")
    assert (info.value.reason, info.value.path) == (reason, "in/x.dcm")


def test_missing_source_series(tmp_path):
    series = write_series(tmp_path / "series", AXIAL)
    other = write_series(tmp_path / "other", AXIAL, seed=7)
    seg_path = write_seg(series, label_pixels(), tmp_path / "seg.dcm")
    for headers, image in ((other.headers, other.image), ([], None)):
        with pytest.raises(InputRejected) as info:
            read_seg_labels(seg_path, "seg.dcm", headers, image)
        assert (info.value.reason, info.value.path) == (Reason.MISSING_LABEL_SOURCE, "seg.dcm")


def test_frame_between_slices_is_a_geometry_mismatch(tmp_path):
    series = write_series(tmp_path / "series", _oblique())
    seg_path = write_seg(series, label_pixels(), tmp_path / "seg.dcm")
    shifted = series.image.affine.copy()
    shifted[:3, 3] += 0.5 * shifted[:3, 2]  # the image grid moved by half a slice
    image = Volume(series.image.data, shifted)
    with pytest.raises(InputRejected) as info:
        read_seg_labels(seg_path, "seg.dcm", series.headers, image)
    err = info.value
    assert err.reason == Reason.LABEL_GEOMETRY_MISMATCH
    assert err.details["offset_mm"] == pytest.approx(1.25, abs=1e-6)  # half of the 2.5 mm spacing
    assert err.details["voxel_coordinates"][2] % 1 == pytest.approx(0.5, abs=1e-4)


def test_source_instance_disagreeing_with_position_is_a_geometry_mismatch(tmp_path):
    series = write_series(tmp_path / "series", AXIAL)
    seg_path = write_seg(series, label_pixels(), tmp_path / "seg.dcm")
    with pytest.raises(InputRejected) as info:
        read_seg_labels(seg_path, "seg.dcm", series.headers[::-1], series.image)  # not spatial order
    err = info.value
    assert err.reason == Reason.LABEL_GEOMETRY_MISMATCH
    k, (k_source,) = err.details["slice_by_position"], err.details["slice_by_source"]
    assert k != k_source and k + k_source == SLICES - 1  # the mirror slice


def test_frame_size_differing_from_the_image_is_a_geometry_mismatch(tmp_path):
    series = write_series(tmp_path / "series", AXIAL)
    seg_path = write_seg(series, label_pixels(), tmp_path / "seg.dcm")
    image = Volume(np.zeros((COLS, ROWS + 1, SLICES), np.int16), series.image.affine)
    with pytest.raises(InputRejected) as info:
        read_seg_labels(seg_path, "seg.dcm", series.headers, image)
    assert info.value.reason == Reason.LABEL_GEOMETRY_MISMATCH
    assert info.value.details == {"seg_rows_columns": [ROWS, COLS], "image_rows_columns": [ROWS + 1, COLS]}


def test_orientation_differing_from_the_image_is_a_geometry_mismatch(tmp_path):
    series = write_series(tmp_path / "series", AXIAL)
    seg_path = write_seg(series, label_pixels(), tmp_path / "seg.dcm")
    flipped = series.image.affine @ np.diag([-1.0, 1.0, 1.0, 1.0])  # i axis reversed
    with pytest.raises(InputRejected) as info:
        read_seg_labels(seg_path, "seg.dcm", series.headers, Volume(series.image.data, flipped))
    assert info.value.reason == Reason.LABEL_GEOMETRY_MISMATCH
    assert info.value.details["seg_orientation"] == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    assert info.value.details["image_orientation"] == [-1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
