"""The header pass: broken, hostile and non-image files, refused with a reason before any pixel."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from pipeline.errors import IGNORED_REASONS, InputRejected, Reason
from pipeline.io.dicom import assemble_series, dicomdir_references, load_series, read_header
from pipeline.io.volume import save_nifti
from pipeline.synthetic.dicom import Patient, SeriesSpec, write_dicom_series
from tests.pipeline.io.dicom_helpers import MAX_PIXELS, retag, stored_volume

DICOMDIR_TESTS = Path(get_testdata_file("CT_small.dcm")).parent / "dicomdirtests"


def rejection(path, root, max_pixels=MAX_PIXELS) -> InputRejected:
    with pytest.raises(InputRejected) as info:
        read_header(path, root, max_pixels)
    return info.value


@pytest.mark.parametrize(
    "name, content",
    [
        ("empty", b""),
        ("report.txt", b"Radiology report: no acute findings.\n" * 10),
        ("Thumbs.db", bytes(range(256)) * 8),
        ("short", b"DI"),
        # raw dumps that start like a group 0008 element: a length past the end of the file, or
        # a "next element" whose tag goes backwards
        ("dump.bin", b"\x08\x00\x05\x00" + bytes(range(256)) * 4),
        ("dump2.bin", b"\x08\x00\x05\x00\x02\x00\x00\x00ab\x02\x00\x01\x00" + bytes(200)),
    ],
)
def test_non_dicom_files_are_ignored(root, name, content):
    (root / name).write_bytes(content)
    r = rejection(root / name, root)
    assert r.reason is Reason.NOT_DICOM and r.reason in IGNORED_REASONS
    assert r.path == name


def test_header_facts(root):
    paths = write_dicom_series(stored_volume(3, lo=0), root / "sub", SeriesSpec(modality="MR", signed=False))
    h = read_header(paths[0], root, MAX_PIXELS)
    assert h.rel == f"sub/{paths[0].name}" and h.path == paths[0].absolute()
    assert (h.rows, h.columns, h.number_of_frames) == (32, 40, 1)
    assert h.modality == "MR" and h.photometric == "MONOCHROME2" and h.pixel_representation == 0
    assert h.frames[0].position == (-100.0, -120.0, -50.0) and h.frames[0].pixel_spacing == (1.0, 1.0)


def test_a_seg_header_names_its_series_without_its_frames_geometry(root):
    from pipeline.synthetic.phantom import make_phantom
    from pipeline.synthetic.seg import write_seg

    image, label = make_phantom((6, 33, 37), (3.0, 1.2, 1.2), seed=4, modality="CT")
    paths = write_dicom_series(np.round(image).astype(np.int16), root / "series", SeriesSpec(seed=4))
    seg_path = write_seg(label, paths, root / "ann" / "case.seg.dcm", {1: "organ", 2: "lesion"}, seed=1)
    frames = int(pydicom.dcmread(seg_path, stop_before_pixels=True).NumberOfFrames)
    h = read_header(seg_path, root, MAX_PIXELS)
    assert h.is_segmentation and h.rel == "ann/case.seg.dcm" and h.number_of_frames == frames > 1
    assert h.frames == ()  # placed when its labels are read, not in the header pass


def test_too_large_is_refused_from_the_header(root):
    (path, *_) = write_dicom_series(stored_volume(3), root, SeriesSpec())
    r = rejection(path, root, max_pixels=32 * 40 - 1)
    assert r.reason is Reason.TOO_LARGE
    assert r.details == {"rows": 32, "columns": 40, "frames": 1, "pixels": 1280, "limit": 1279}


def test_too_large_declared_by_a_tiny_file_is_refused_before_allocation(root):
    (path, *_) = write_dicom_series(stored_volume(1), root, SeriesSpec())
    retag([path], Rows=65535, Columns=65535, NumberOfFrames=5000)
    r = rejection(path, root, max_pixels=10**9)
    assert r.reason is Reason.TOO_LARGE and r.details["pixels"] == 65535 * 65535 * 5000


@pytest.mark.parametrize("keep", [0.5, 0.95])
def test_truncated_pixel_data(root, keep):
    (path, *_) = write_dicom_series(stored_volume(1), root, SeriesSpec())
    data = path.read_bytes()
    pixel_start = len(data) - 32 * 40 * 2
    path.write_bytes(data[: pixel_start + int(32 * 40 * 2 * keep)])
    r = rejection(path, root)
    assert r.reason is Reason.TRUNCATED
    assert r.details["expected_pixel_bytes"] == 2560
    assert r.details["found_pixel_bytes"] == int(2560 * keep)


def test_truncated_inside_the_header(root):
    (path, *_) = write_dicom_series(stored_volume(1), root, SeriesSpec())
    path.write_bytes(path.read_bytes()[:700])
    assert rejection(path, root).reason in (Reason.TRUNCATED, Reason.UNREADABLE)


@pytest.mark.parametrize(
    "cut, found",
    [(600, "past the end of the file"), (8, "without their closing sequence delimiter")],
    ids=["inside-a-fragment", "delimiter-missing"],
)
def test_truncated_compressed_pixel_data_found_in_the_header_pass(root, cut, found):
    spec = SeriesSpec(transfer_syntax=pydicom.uid.JPEG2000Lossless)
    paths = write_dicom_series(stored_volume(3), root, spec)
    data = paths[1].read_bytes()
    assert data[-8:] == b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"  # the sequence delimiter ends the file
    paths[1].write_bytes(data[:-cut])
    r = rejection(paths[1], root)
    assert r.reason is Reason.TRUNCATED and found in r.message
    kept = read_header(paths[1], root, MAX_PIXELS, keep_damaged=True)
    assert kept.damage is not None and kept.damage.reason is Reason.TRUNCATED
    assert read_header(paths[0], root, MAX_PIXELS).damage is None


def test_damaged_fragment_list_is_unreadable(root):
    spec = SeriesSpec(transfer_syntax=pydicom.uid.RLELossless)
    (path, *_) = write_dicom_series(stored_volume(1), root, spec)
    data = bytearray(path.read_bytes())
    item = data.rindex(b"\xfe\xff\x00\xe0")  # the last fragment's item tag
    data[item : item + 4] = b"\x08\x00\x10\x00"
    path.write_bytes(bytes(data))
    r = rejection(path, root)
    assert r.reason is Reason.UNREADABLE and "(0008,0010)" in r.message


def test_cut_stream_in_a_file_changed_after_the_scan_is_found_when_decoded(root):
    spec = SeriesSpec(transfer_syntax=pydicom.uid.JPEG2000Lossless)
    paths = write_dicom_series(stored_volume(3), root, spec)
    (group,), _ = assemble_series([read_header(p, root, MAX_PIXELS) for p in paths])
    paths[1].write_bytes(paths[1].read_bytes()[:-600])
    with pytest.raises(InputRejected) as info:
        load_series(group)
    assert info.value.reason is Reason.TRUNCATED
    assert info.value.path == paths[1].name


def test_unsupported_sop_class(root):
    (path, *_) = write_dicom_series(stored_volume(1), root, SeriesSpec())
    retag([path], SOPClassUID=pydicom.uid.SecondaryCaptureImageStorage)
    r = rejection(path, root)
    assert r.reason is Reason.UNSUPPORTED_SOP_CLASS
    assert "Secondary Capture Image Storage" in r.message


def test_link_outside_root_is_not_read(root, tmp_path):
    outside = write_dicom_series(stored_volume(1), tmp_path / "elsewhere", SeriesSpec())[0]
    (root / "link").symlink_to(outside)
    assert rejection(root / "link", root).reason is Reason.OUTSIDE_ROOT


@pytest.mark.parametrize("name", ["DICOMDIR", "DICOMDIR-bigEnd", "DICOMDIR-implicit", "TINY_ALPHA/DICOMDIR"])
def test_dicomdir_is_identified_and_ignored(name):
    r = rejection(DICOMDIR_TESTS / name, DICOMDIR_TESTS)
    assert r.reason is Reason.DICOMDIR and r.reason in IGNORED_REASONS


@pytest.mark.filterwarnings("ignore:Invalid value for VR:UserWarning")
def test_dicomdir_references_stay_inside_the_root(tmp_path):
    root = tmp_path / "media"
    shutil.copytree(DICOMDIR_TESTS / "TINY_ALPHA", root)
    found, rejected = dicomdir_references(root / "DICOMDIR", root)
    assert len(found) == 50 and rejected == []
    assert all(p.is_file() and p.resolve().is_relative_to(root.resolve()) for p in found)

    # A hostile DICOMDIR: a traversal File ID and a valid-looking one through a link that leaves the root.
    (tmp_path / "outside").mkdir()
    (root / "ESCAPE").symlink_to(tmp_path / "outside", target_is_directory=True)
    ds = pydicom.dcmread(root / "DICOMDIR")
    images = [r for r in ds.DirectoryRecordSequence if "ReferencedFileID" in r]
    images[0].ReferencedFileID = ["..", "..", "etc", "passwd"]
    images[1].ReferencedFileID = ["ESCAPE", "IM000001"]
    ds.save_as(root / "DICOMDIR")
    found, rejected = dicomdir_references(root / "DICOMDIR", root)
    assert len(found) == 48
    assert [r.reason for r in rejected] == [Reason.OUTSIDE_ROOT, Reason.OUTSIDE_ROOT]
    assert all(r.path == "DICOMDIR" for r in rejected)


HOSTILE = ["../../x", "x\x00y", "A" * 300, "/etc/passwd", "..\\..\\x"]


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns on writing the hostile values
@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_tag_values_never_reach_paths_or_meta(tmp_path, value):
    root = tmp_path / "source"
    out = tmp_path / "out"
    spec = SeriesSpec(patient=Patient(name=value, patient_id=value), series_description=value)
    paths = write_dicom_series(stored_volume(4), root, spec)
    retag(paths, SeriesInstanceUID=value, StudyInstanceUID=value, Modality="CT", StudyID=value[:16])
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    headers = [read_header(p, root, MAX_PIXELS) for p in paths]
    (group,), rejected = assemble_series(headers)
    assert rejected == []
    volume = load_series(group)
    save_nifti(volume, out / "case.nii.gz")
    after = sorted(str(p) for p in tmp_path.rglob("*"))
    assert sorted(set(after) - set(before)) == [str(out), str(out / "case.nii.gz")]
    assert value not in repr(volume.meta)
    assert not any(isinstance(v, str) and ("DOE" in v or "PID" in v) for v in volume.meta.values())
    assert os.listdir(out) == ["case.nii.gz"]
    np.testing.assert_array_equal(volume.data.transpose(2, 1, 0), stored_volume(4))


def test_meta_holds_no_identifying_values(root):
    paths = write_dicom_series(stored_volume(4), root, SeriesSpec())
    ds = pydicom.dcmread(paths[0])
    (group,), _ = assemble_series([read_header(p, root, MAX_PIXELS) for p in paths])
    text = repr(load_series(group).meta)
    for keyword in (
        "PatientName",
        "PatientID",
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "SOPInstanceUID",
        "AccessionNumber",
        "StudyDate",
        "InstitutionName",
        "FrameOfReferenceUID",
    ):
        assert str(ds.data_element(keyword).value) not in text, keyword
