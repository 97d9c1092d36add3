"""The mask writers on their own: the NIfTI mask and the DICOM SEG from sources with odd headers."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from pipeline.outputs import masks

NAMES = {0: "background", 1: "organ", 2: "lesion"}


@pytest.mark.parametrize("shape", [(33, 37, 5), (16, 16, 1)])
def test_mask_nifti_keeps_shape_affine_and_uint8(tmp_path, shape):
    affine = np.array([[0, 0, 2.5, -10], [-0.9, 0, 0, 20], [0, 1.1, 0, 5], [0, 0, 0, 1]], float)
    mask = np.random.default_rng(0).integers(0, 3, shape).astype(np.uint8)
    path = masks.write_mask_nifti(tmp_path / "seg.nii.gz", mask, affine)
    img = nib.load(path)
    assert img.get_data_dtype() == np.uint8 and img.shape == shape
    np.testing.assert_allclose(img.get_sform(), affine, atol=1e-5)
    np.testing.assert_allclose(img.get_qform(), affine, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(img.dataobj), mask)
    assert [p.name for p in tmp_path.iterdir()] == ["seg.nii.gz"]  # no temporary left behind


# ------------------------------------------------------------------------------------------
# DICOM SEG from sources without Type 2 patient and study attributes


def _series(tmp_path, modality: str = "CT", **patient):
    """A 5-slice 33 x 37 DICOM series written with pydicom: (root, file paths)."""
    from pipeline.synthetic.dicom import Patient, SeriesSpec, write_dicom_series

    root = tmp_path / "src"
    volume = np.random.default_rng(2).integers(-100, 100, (5, 33, 37)).astype(np.int16)
    spec = (
        SeriesSpec(modality=modality, patient=Patient(**patient))
        if patient
        else SeriesSpec(modality=modality)
    )
    paths = write_dicom_series(volume, root, spec)
    return root, paths


def _group(root, paths):
    from pipeline.io.dicom import assemble_series, read_header

    (group,), rejected = assemble_series([read_header(p, root, 2**28) for p in paths])
    assert not rejected
    return group


def _strip(paths, keywords):
    """Delete `keywords` from every file (the source as a de-identifier left it)."""
    import pydicom

    for path in paths:
        ds = pydicom.dcmread(path)
        for keyword in keywords:
            if keyword in ds:
                delattr(ds, keyword)
        ds.save_as(path, enforce_file_format=True)


def _digests(paths):
    import hashlib

    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}


def _seg_mask(group):
    mask = np.zeros(group.shape, np.uint8)
    mask[5:20, 4:12, 1:4] = 1
    mask[22:30, 20:30, 2] = 2
    return mask


def _write_seg(tmp_path, mask, group):
    return masks.write_dicom_seg(
        tmp_path / "seg.dcm",
        mask,
        group,
        NAMES,
        algorithm_name="m",
        algorithm_version="1",
        software_version="t",
    )


def _check_seg(path, group, mask, paths, empty):
    import highdicom as hd
    import pydicom

    seg = hd.seg.segread(path)
    for keyword in empty:
        assert keyword in seg and seg[keyword].value in (None, "", b""), keyword
    src = pydicom.dcmread(paths[0], stop_before_pixels=True)
    assert seg.StudyInstanceUID == src.StudyInstanceUID
    assert seg.FrameOfReferenceUID == src.FrameOfReferenceUID
    for k, (h, _) in enumerate(group.frames):
        uid = pydicom.dcmread(group.headers[h].path, stop_before_pixels=True).SOPInstanceUID
        pixels = seg.get_pixels_by_source_instance(
            [str(uid)], combine_segments=True, relabel=False, assert_missing_frames_are_empty=True
        )[0]
        np.testing.assert_array_equal(pixels, mask[:, :, k].T)


@pytest.mark.parametrize("keyword", list(masks.TYPE2_PATIENT_STUDY))
def test_seg_from_sources_lacking_one_type2_attribute(tmp_path, keyword):
    root, paths = _series(tmp_path)
    _strip(paths, [keyword])
    group = _group(root, paths)
    before = _digests(paths)
    mask = _seg_mask(group)
    out = _write_seg(tmp_path, mask, group)
    assert _digests(paths) == before  # the inputs are only read
    _check_seg(out, group, mask, paths, empty=[keyword])


def test_seg_from_sources_lacking_every_type2_attribute_and_with_unusable_values(tmp_path):
    import pydicom

    root, paths = _series(tmp_path, modality="MR", sex="U", birth_date="1970-01-01")
    stripped = ["PatientName", "PatientID", "AccessionNumber", "StudyID", "ReferringPhysicianName"]
    _strip(paths, stripped)
    for path in paths:  # non-conformant values some exports carry
        ds = pydicom.dcmread(path)
        ds.StudyTime = "25:61"
        ds.save_as(path, enforce_file_format=True)
    group = _group(root, paths)
    before = _digests(paths)
    mask = _seg_mask(group)
    out = _write_seg(tmp_path, mask, group)
    assert _digests(paths) == before
    _check_seg(out, group, mask, paths, empty=[*stripped, "PatientSex", "PatientBirthDate", "StudyTime"])
    assert pydicom.dcmread(out).PatientSex == ""


def test_seg_keeps_the_sources_patient_and_study_values(tmp_path):
    import highdicom as hd
    import pydicom

    root, paths = _series(tmp_path, sex="m")  # lower case: carried as "M"
    group = _group(root, paths)
    seg = hd.seg.segread(
        masks.write_dicom_seg(
            tmp_path / "seg.dcm",
            _seg_mask(group),
            group,
            NAMES,
            algorithm_name="m",
            algorithm_version="1",
            software_version="t",
        )
    )
    src = pydicom.dcmread(paths[0], stop_before_pixels=True)
    for keyword in masks.TYPE2_PATIENT_STUDY:
        if keyword != "PatientSex":
            assert str(seg[keyword].value) == str(src[keyword].value), keyword
    assert seg.PatientSex == "M"


@pytest.mark.parametrize("empty", [False, True], ids=["labels", "all-empty"])
def test_seg_has_frames_where_its_segments_are_and_reads_back_on_the_series_grid(tmp_path, empty):
    import pydicom

    from pipeline.io.dicom import load_series
    from pipeline.io.seg import read_seg_labels

    root, paths = _series(tmp_path)
    group = _group(root, paths)
    mask = np.zeros(group.shape, np.uint8) if empty else _seg_mask(group)
    out = _write_seg(tmp_path, mask, group)
    present = sum(bool((mask[:, :, k] == v).any()) for k in range(mask.shape[2]) for v in (1, 2))
    assert present == 4 or empty  # organ on three slices, lesion on one
    n_frames = int(pydicom.dcmread(out, stop_before_pixels=True).NumberOfFrames)
    assert n_frames == (2 * mask.shape[2] if empty else present)  # a SEG keeps at least one frame
    image = load_series(group, max_voxels=2**28)
    label, names = read_seg_labels(out, "seg.dcm", [group.headers[h] for h, _ in group.frames], image)
    assert names == {1: "organ", 2: "lesion"}
    np.testing.assert_array_equal(label.data, mask)
    np.testing.assert_allclose(label.affine, image.affine)


def test_type2_list_covers_the_patient_and_general_study_modules():
    """Our list against highdicom's copy of the standard's module tables."""
    from highdicom._standard_utils import get_module_attribute_map

    modules = get_module_attribute_map()
    type2 = {
        item["keyword"]
        for key in ("patient", "general-study")
        for item in modules[key]
        if not item["path"] and item["type"] == "2"
    }
    assert type2 == set(masks.TYPE2_PATIENT_STUDY)


def test_seg_takes_patient_and_study_from_its_first_source_only(tmp_path, caplog):
    """Only the first source (in spatial order) is made fit for the SEG's patient and study
    modules: the others' Type 2 values may be missing or unusable without a warning per file."""
    import logging

    import pydicom

    root, paths = _series(tmp_path, sex="F")
    group = _group(root, paths)
    first = group.headers[group.frames[0][0]].path
    others = [p for p in paths if p != first]
    _strip(others, ["PatientName", "StudyID"])
    for path in others:
        ds = pydicom.dcmread(path)
        ds.PatientSex = "U"
        ds.save_as(path, enforce_file_format=True)
    before = _digests(paths)
    mask = _seg_mask(group)
    with caplog.at_level(logging.WARNING, logger=masks.__name__):
        out = _write_seg(tmp_path, mask, group)
    assert _digests(paths) == before
    assert not caplog.records
    seg, src = pydicom.dcmread(out), pydicom.dcmread(first, stop_before_pixels=True)
    assert (seg.PatientSex, seg.PatientName, seg.StudyID) == ("F", src.PatientName, src.StudyID)
    _check_seg(out, group, mask, paths, empty=[])
