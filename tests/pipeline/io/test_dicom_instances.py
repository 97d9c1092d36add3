"""Copies and damaged copies of one instance; series that lost files are never staged silently."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import DeflatedExplicitVRLittleEndian, RLELossless

from pipeline.errors import IGNORED_REASONS, InputRejected, Reason
from pipeline.io.dicom import assemble_series, load_series, read_header
from pipeline.synthetic.dicom import SeriesSpec, write_dicom_series
from tests.pipeline.io.dicom_helpers import MAX_PIXELS, retag, stored_volume

N = 8
SPACING = 2.5
ORIGIN_Z = -50.0  # slice k lies at ORIGIN_Z + k * SPACING mm along the normal (+z)


def scan(root: Path, accept_partial: bool = False):
    """The planner's header pass: damaged files kept for assembly."""
    headers, rejected = [], []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        try:
            headers.append(read_header(path, root, MAX_PIXELS, keep_damaged=True))
        except InputRejected as exc:
            rejected.append(exc)
    groups, more = assemble_series(headers, accept_partial=accept_partial)
    return groups, rejected + more


def series(root: Path, spec: SeriesSpec | None = None, seed: int = 0) -> tuple[np.ndarray, list[Path]]:
    """N slices; paths returned in slice order (file names are shuffled by the writer)."""
    vol = stored_volume(N, rows=17, cols=19, seed=seed)
    spec = spec or SeriesSpec(origin=(-100.0, -120.0, ORIGIN_Z), slice_spacing=SPACING, seed=seed)
    return vol, write_dicom_series(vol, root / "series", spec)


def by_reason(rejected) -> dict[str, list[InputRejected]]:
    out: dict[str, list[InputRejected]] = {}
    for r in rejected:
        out.setdefault(r.reason.value, []).append(r)
    return out


def cut_pixels(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - int(17 * 19 * 2 * (1 - keep))])


def test_byte_identical_resend_is_one_instance(root):
    vol, _paths = series(root)
    shutil.copytree(root / "series", root / "resend")  # the PACS sent the whole series again
    (group,), rejected = scan(root)
    assert [r.reason for r in rejected] == [Reason.DUPLICATE_INSTANCE] * N
    assert all(r.details["identical"] for r in rejected) and Reason.DUPLICATE_INSTANCE in IGNORED_REASONS
    # one whole copy is used (the first folder by path when both hold the whole series)
    assert {r.path.split("/")[0] for r in rejected} == {"series"}
    assert {rel.split("/")[0] for rel in group.files} == {"resend"}
    np.testing.assert_array_equal(load_series(group).data.transpose(2, 1, 0), vol)


def test_transcoded_copy_is_the_same_instance(root):
    _vol, paths = series(root)
    copy = root / "other" / "copy.dcm"
    copy.parent.mkdir()
    ds = pydicom.dcmread(paths[3])
    ds.compress(RLELossless, generate_instance_uid=False)
    ds.save_as(copy)
    (group,), rejected = scan(root)
    (dup,) = rejected
    assert dup.reason is Reason.DUPLICATE_INSTANCE and not dup.details["identical"]
    assert dup.path == "other/copy.dcm" and dup.details["kept"] == f"series/{paths[3].name}"
    assert len(group.frames) == N


@pytest.mark.parametrize("syntax", [None, RLELossless], ids=["native", "encapsulated"])
def test_truncated_copy_beside_an_intact_one(root, syntax):
    spec = SeriesSpec(origin=(-100.0, -120.0, ORIGIN_Z), slice_spacing=SPACING)
    if syntax:
        spec.transfer_syntax = syntax
    vol, paths = series(root, spec)
    damaged = root / "elsewhere" / "cut.dcm"
    damaged.parent.mkdir()
    data = paths[5].read_bytes()
    damaged.write_bytes(data[: len(data) - 40])  # a transfer that stopped early
    (group,), rejected = scan(root)
    (r,) = rejected
    assert r.reason is Reason.TRUNCATED and r.path == "elsewhere/cut.dcm"
    assert r.details["intact_copy"] == f"series/{paths[5].name}"
    assert "intact copy" in r.message
    np.testing.assert_array_equal(load_series(group).data.transpose(2, 1, 0), vol)


def test_different_instances_at_one_position_stay_duplicate_position(root):
    series(root)
    spec = SeriesSpec(origin=(-100.0, -120.0, ORIGIN_Z), slice_spacing=SPACING, seed=0)
    write_dicom_series(stored_volume(1, rows=17, cols=19, seed=9), root / "extra", spec)
    extra = next((root / "extra").iterdir())
    ref = pydicom.dcmread(next((root / "series").iterdir()), stop_before_pixels=True)
    retag([extra], SeriesInstanceUID=ref.SeriesInstanceUID, StudyInstanceUID=ref.StudyInstanceUID)
    groups, rejected = scan(root)
    assert groups == [] and [r.reason for r in rejected] == [Reason.DUPLICATE_POSITION]


def test_one_uid_reused_for_every_slice_is_not_one_instance(root):
    # Some de-identifiers replace every SOPInstanceUID by one value: positions tell them apart.
    vol, paths = series(root)
    retag(paths, SOPInstanceUID="1.2.3.4")
    (group,), rejected = scan(root)
    assert rejected == []
    np.testing.assert_array_equal(load_series(group).data.transpose(2, 1, 0), vol)


def test_truncated_top_slice_without_copy_refuses_the_series(root):
    _, paths = series(root)
    cut_pixels(paths[-1])
    groups, rejected = scan(root)
    assert groups == []
    found = by_reason(rejected)
    assert [r.path for r in found["TRUNCATED"]] == [f"series/{paths[-1].name}"]
    (incomplete,) = found["SERIES_INCOMPLETE"]
    assert incomplete.details["n_missing_files"] == 1 and incomplete.details["n_series_files"] == N
    top = ORIGIN_Z + (N - 1) * SPACING
    assert incomplete.details["missing_mm"] == [top, top]
    assert incomplete.details["covered_mm"] == [ORIGIN_Z, top - SPACING]
    assert "1 of 8 files" in incomplete.message and "beyond the last slice" in incomplete.message
    assert sorted(incomplete.details["files"]) == sorted(f"series/{p.name}" for p in paths[:-1])


def test_accepted_partial_series_says_what_is_missing(root):
    vol, paths = series(root)
    cut_pixels(paths[0])
    cut_pixels(paths[1])
    (group,), rejected = scan(root, accept_partial=True)
    assert sorted(r.reason.value for r in rejected) == ["TRUNCATED", "TRUNCATED"]
    assert group.partial["n_missing_files"] == 2
    assert group.partial["missing_mm"] == [ORIGIN_Z, ORIGIN_Z + SPACING]
    assert "before the first slice" in group.partial["message"]
    np.testing.assert_array_equal(load_series(group).data.transpose(2, 1, 0), vol[2:])


def test_a_gap_is_refused_even_when_partial_series_are_accepted(root):
    _, paths = series(root)
    cut_pixels(paths[4])
    groups, rejected = scan(root, accept_partial=True)
    assert groups == []
    (incomplete,) = by_reason(rejected)["SERIES_INCOMPLETE"]
    assert incomplete.details["gap_inside"] and "never staged" in incomplete.message
    assert incomplete.details["missing_mm"] == [ORIGIN_Z + 4 * SPACING] * 2


@pytest.mark.parametrize("accept", [False, True])
def test_files_without_position_make_the_series_incomplete(root, accept):
    vol, paths = series(root)
    retag(paths[-3:], ImagePositionPatient=None)  # the top centimetres lack a position
    groups, rejected = scan(root, accept_partial=accept)
    found = by_reason(rejected)
    (geometry,) = found["MISSING_GEOMETRY"]
    assert sorted(geometry.details["files"]) == sorted(f"series/{p.name}" for p in paths[-3:])
    expected_mm = [ORIGIN_Z + (N - 3) * SPACING, ORIGIN_Z + (N - 1) * SPACING]
    if accept:
        (group,) = groups
        losses = group.partial
        np.testing.assert_array_equal(load_series(group).data.transpose(2, 1, 0), vol[:-3])
    else:
        assert groups == []
        (incomplete,) = found["SERIES_INCOMPLETE"]
        losses = incomplete.details
        assert "3 of 8 files" in incomplete.message and "MISSING_GEOMETRY 3" in incomplete.message
    # placed by InstanceNumber, which follows position in this series
    np.testing.assert_allclose(losses["missing_mm"], expected_mm, atol=1e-6)
    assert {e["from"] for e in losses["missing"]} == {"InstanceNumber"}


def test_position_unknown_when_instance_numbers_do_not_follow_position(root):
    spec = SeriesSpec(
        origin=(-100.0, -120.0, ORIGIN_Z), slice_spacing=SPACING, instance_numbers=[5, 1, 7, 2, 8, 3, 6, 4]
    )
    _, paths = series(root, spec)
    retag(paths[:1], ImagePositionPatient=None)
    _, rejected = scan(root)
    (incomplete,) = by_reason(rejected)["SERIES_INCOMPLETE"]
    assert incomplete.details["missing_mm"] is None and "unknown positions" in incomplete.message


def test_every_file_without_position_is_missing_geometry_only(root):
    _, paths = series(root)
    retag(paths, ImagePositionPatient=None)
    groups, rejected = scan(root)
    assert groups == [] and [r.reason for r in rejected] == [Reason.MISSING_GEOMETRY]


def test_a_loss_marks_only_the_group_it_belongs_to(root):
    spec1 = SeriesSpec(modality="MR", echo_number=1, origin=(-100.0, -120.0, ORIGIN_Z), slice_spacing=SPACING)
    vol1, _ = series(root, spec1)
    series_uid = pydicom.dcmread(next((root / "series").iterdir())).SeriesInstanceUID
    study_uid = pydicom.dcmread(next((root / "series").iterdir())).StudyInstanceUID
    spec2 = SeriesSpec(
        modality="MR",
        echo_number=2,
        origin=(-100.0, -120.0, ORIGIN_Z),
        slice_spacing=SPACING,
        series_uid=series_uid,
        study_uid=study_uid,
        file_names=[f"E2_{k}" for k in range(N)],
        seed=1,
    )
    paths2 = write_dicom_series(stored_volume(N, rows=17, cols=19, seed=1), root / "series", spec2)
    cut_pixels(paths2[-1])
    (group,), rejected = scan(root)
    assert sorted(r.reason.value for r in rejected) == ["SERIES_INCOMPLETE", "TRUNCATED"]
    np.testing.assert_array_equal(load_series(group).data.transpose(2, 1, 0), vol1)


def test_damaged_localizer_or_derived_image_does_not_shorten_the_series(root):
    vol, paths = series(root)
    extra = write_dicom_series(
        stored_volume(2, rows=17, cols=19, seed=3),
        root / "series",
        SeriesSpec(
            image_type=("DERIVED", "SECONDARY", "OTHER"),
            file_names=["DOSE1", "DOSE2"],
            seed=3,
        ),
    )
    ref = pydicom.dcmread(paths[0], stop_before_pixels=True)
    retag(extra, SeriesInstanceUID=ref.SeriesInstanceUID, StudyInstanceUID=ref.StudyInstanceUID)
    retag(extra[:1], ImagePositionPatient=None)  # a screen capture without a position
    cut_pixels(extra[1])  # and a damaged one
    (group,), rejected = scan(root)
    assert sorted(r.reason.value for r in rejected) == ["MISSING_GEOMETRY", "TRUNCATED"]
    np.testing.assert_array_equal(load_series(group).data.transpose(2, 1, 0), vol)


def test_damaged_fragment_list_beside_an_intact_copy_is_unreadable(root):
    spec = SeriesSpec(origin=(-100.0, -120.0, ORIGIN_Z), slice_spacing=SPACING, transfer_syntax=RLELossless)
    vol, paths = series(root, spec)
    bad = root / "copy" / "bad.dcm"
    bad.parent.mkdir()
    data = bytearray(paths[2].read_bytes())
    item = data.rindex(b"\xfe\xff\x00\xe0")
    data[item : item + 4] = b"\x08\x00\x10\x00"
    bad.write_bytes(bytes(data))
    (group,), rejected = scan(root)
    (r,) = rejected
    assert r.reason is Reason.UNREADABLE and r.details["intact_copy"] == f"series/{paths[2].name}"
    np.testing.assert_array_equal(load_series(group).data.transpose(2, 1, 0), vol)


def test_file_cut_inside_its_header_still_counts_for_its_series(root):
    _, paths = series(root)
    data = paths[-1].read_bytes()
    paths[-1].write_bytes(data[: data.index(b"\x28\x00\x10\x00US")])  # cut before Rows
    groups, rejected = scan(root)
    assert groups == []
    found = by_reason(rejected)
    assert [r.path for r in found["UNREADABLE"]] == [f"series/{paths[-1].name}"]
    (incomplete,) = found["SERIES_INCOMPLETE"]
    top = ORIGIN_Z + (N - 1) * SPACING
    assert incomplete.details["missing_mm"] == [top, top]
    assert incomplete.details["missing"][0]["from"] == "ImagePositionPatient"


def test_two_cut_copies_of_one_instance_are_one_missing_slice(root):
    _, paths = series(root)
    cut_pixels(paths[-1])
    (root / "again").mkdir()
    shutil.copy(paths[-1], root / "again" / "cut.dcm")
    groups, rejected = scan(root, accept_partial=True)
    assert sorted(r.reason.value for r in rejected) == ["TRUNCATED", "TRUNCATED"]
    (group,) = groups
    assert group.partial["n_missing_files"] == 1 and group.partial["n_series_files"] == N


def test_cut_deflated_file_still_counts_for_its_series(root):
    spec = SeriesSpec(origin=(-100.0, -120.0, ORIGIN_Z), slice_spacing=SPACING)
    spec.transfer_syntax = DeflatedExplicitVRLittleEndian
    _, paths = series(root, spec)
    data = paths[-1].read_bytes()
    paths[-1].write_bytes(data[: len(data) - 200])  # the deflate stream ends inside the pixels
    groups, rejected = scan(root)
    assert groups == []
    found = by_reason(rejected)
    assert "deflated data set ends early" in found["TRUNCATED"][0].message
    top = ORIGIN_Z + (N - 1) * SPACING
    assert found["SERIES_INCOMPLETE"][0].details["missing_mm"] == [top, top]
