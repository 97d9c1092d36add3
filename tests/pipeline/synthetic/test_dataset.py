import hashlib
import json

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.synthetic.dataset import make_demo_dataset
from pipeline.synthetic.dicom import SAGITTAL

N_CASES, SIZE = 6, 32  # six cases already cover every orientation, modality and transfer syntax


def _digest(root):
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _seg_label(demo, case):
    """(the case's DICOM SEG, its label map in the series' slice order)."""
    seg = hd.seg.segread(demo.dicom_root / case.seg)
    uids = [
        pydicom.dcmread(demo.dicom_root / f, stop_before_pixels=True).SOPInstanceUID for f in case.dicom_files
    ]
    return seg, seg.get_pixels_by_source_instance(uids, combine_segments=True)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_demo_dataset(tmp_path_factory.mktemp("demo") / "out", n_cases=N_CASES, seed=0, size=SIZE)


def test_same_seed_same_bytes_and_other_seeds_differ(demo, tmp_path):
    again = make_demo_dataset(tmp_path / "again", n_cases=N_CASES, seed=0, size=SIZE)
    other = make_demo_dataset(tmp_path / "other", n_cases=N_CASES, seed=1, size=SIZE)
    first = _digest(demo.root)
    assert first == _digest(again.root)
    other_digest = _digest(other.root)
    msd = [p for p in first if p.startswith("msd/") and p.endswith(".nii.gz")]
    assert msd and all(first[p] != other_digest[p] for p in msd)  # other voxels
    assert {p for p in first if p.startswith("dicom/PAT")} != {
        p for p in other_digest if p.startswith("dicom/PAT")
    }
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no build folder left


def test_cases_cover_orientations_modalities_and_syntaxes(demo):
    assert len(demo.cases) == N_CASES
    assert {c.orientation for c in demo.cases} == {"axial", "sagittal", "coronal", "oblique", "feet_first"}
    assert {c.modality for c in demo.cases} == {"CT", "MR"}
    assert len({c.transfer_syntax for c in demo.cases}) == 4
    assert len({c.patient_name for c in demo.cases}) == 4
    assert demo.cases[0].study_uid != demo.cases[1].study_uid  # patient 1: two studies
    assert demo.cases[2].study_uid == demo.cases[3].study_uid  # patient 2: two series, one folder
    assert demo.cases[2].series_uid != demo.cases[3].series_uid
    assert {f.rsplit("/", 1)[0] for f in demo.cases[2].dicom_files + demo.cases[3].dicom_files} == {
        "PAT02/EXAM"
    }


@pytest.mark.parametrize("index", range(N_CASES))
def test_dicom_series_has_the_tags_and_geometry_intended(demo, index):
    case = demo.cases[index]
    datasets = [pydicom.dcmread(demo.dicom_root / f) for f in case.dicom_files]
    first = datasets[0]
    assert first.PatientName == case.patient_name and first.PatientID == case.patient_id
    assert first.Modality == case.modality
    assert {d.SeriesInstanceUID for d in datasets} == {case.series_uid}
    assert {d.StudyInstanceUID for d in datasets} == {case.study_uid}
    assert first.file_meta.TransferSyntaxUID == case.transfer_syntax
    assert (len(datasets), first.Rows, first.Columns) == tuple(case.shape)
    assert [float(v) for v in first.PixelSpacing] == list(case.spacing[1:])
    assert first.PatientPosition == ("FFS" if case.orientation == "feet_first" else "HFS")
    iop = np.array(first.ImageOrientationPatient, float)
    normal = np.cross(iop[:3], iop[3:])
    if case.orientation == "sagittal":
        assert np.allclose(iop, SAGITTAL)
    if case.orientation == "oblique":
        assert np.abs(normal).max() < 0.99
    steps = np.diff([np.dot(np.array(d.ImagePositionPatient, float), normal) for d in datasets])
    assert np.allclose(steps, case.spacing[0], atol=1e-4)  # files listed in slice order, uniform
    # file names do not follow slice order, and every file carries stored values equal to the MSD copy
    assert [f.rsplit("/", 1)[-1] for f in case.dicom_files] != sorted(
        f.rsplit("/", 1)[-1] for f in case.dicom_files
    )
    msd = np.asarray(nib.load(demo.msd_root / case.msd_image).dataobj).transpose(2, 1, 0)
    values = np.stack([d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in datasets])
    assert np.array_equal(values, msd)


@pytest.mark.parametrize("index", range(N_CASES))
def test_seg_references_its_series_and_holds_the_label(demo, index):
    case = demo.cases[index]
    seg, array = _seg_label(demo, case)
    assert [d.SegmentLabel for d in seg.SegmentSequence] == ["organ", "lesion"]
    assert {int(k): int((array == k).sum()) for k in (1, 2)} == case.label_voxels
    if case.msd_label is not None:
        label = np.asarray(nib.load(demo.msd_root / case.msd_label).dataobj).transpose(2, 1, 0)
        assert np.array_equal(array, label)


def test_msd_dataset_json_matches_the_files(demo):
    dataset = json.loads((demo.msd_root / "dataset.json").read_text())
    assert dataset["labels"] == {"0": "background", "1": "organ", "2": "lesion"}
    assert dataset["numTraining"] == len(dataset["training"]) == 5
    assert dataset["numTest"] == len(dataset["test"]) == 1
    listed = {e["image"] for e in dataset["training"]} | {e["label"] for e in dataset["training"]}
    listed |= set(dataset["test"])
    on_disk = {f"./{p.relative_to(demo.msd_root).as_posix()}" for p in demo.msd_root.rglob("*.nii.gz")}
    assert listed == on_disk
    for entry in dataset["training"]:
        image, label = nib.load(demo.msd_root / entry["image"]), nib.load(demo.msd_root / entry["label"])
        assert image.shape == label.shape
        assert np.allclose(image.affine, label.affine)
        assert np.allclose(image.get_qform(), image.get_sform(), atol=1e-5)  # qform is float32
        assert set(np.unique(np.asarray(label.dataobj))) == {0, 1, 2}


def test_expected_json_lists_broken_and_stray_inputs(demo):
    expected = json.loads((demo.root / "expected.json").read_text())
    assert expected == json.loads(json.dumps(demo.to_json()))
    reasons = set(demo.dicom_quarantine.values())
    assert reasons == {
        "NOT_DICOM", "NON_UNIFORM_SPACING", "GANTRY_TILT", "DUPLICATE_POSITION", "LOCALIZER", "TRUNCATED"
    }  # fmt: skip
    for rel, reason in demo.dicom_quarantine.items():
        path = demo.dicom_root / rel
        assert path.is_file()
        if reason == "NOT_DICOM":
            with pytest.raises(pydicom.errors.InvalidDicomError):
                pydicom.dcmread(path)
        elif reason == "TRUNCATED":
            data = path.read_bytes()  # explicit VR little endian: (7FE0,0010) OW, 2 reserved, 4-byte length
            start = data.rfind(b"\xe0\x7f\x10\x00OW")
            declared = int.from_bytes(data[start + 8 : start + 12], "little")
            assert 0 < len(data) - (start + 12) < declared
        elif reason == "LOCALIZER":
            assert "LOCALIZER" in pydicom.dcmread(path, stop_before_pixels=True).ImageType
    missing = [r for r, why in demo.dicom_quarantine.items() if why == "NON_UNIFORM_SPACING"]
    assert len(missing) == 9
    assert set(demo.nifti_quarantine.values()) == {
        "NON_FINITE_VOXELS", "UNSUPPORTED_DIMENSIONS", "QFORM_SFORM_MISMATCH", "UNEXPECTED_LABELS"
    }  # fmt: skip
    assert nib.load(demo.broken_nifti_root / "four_d.nii.gz").ndim == 4
    bad = nib.load(demo.broken_nifti_root / "unexpected_labels/labelsTr/bad_001.nii.gz")
    assert 7 in np.asarray(bad.dataobj)


@pytest.mark.filterwarnings("ignore:The (PN component|value) length:UserWarning")
def test_hostile_series_is_valid_dicom_with_hostile_values(demo):
    assert len(demo.hostile_files) == 8
    ds = pydicom.dcmread(demo.dicom_root / demo.hostile_files[0])
    assert str(ds.PatientName).startswith("../../x")
    assert "\x00" in ds.SeriesDescription and len(ds.SeriesDescription) > 300
    assert ds.pixel_array.shape == (ds.Rows, ds.Columns)


def test_refuses_to_replace_a_folder_it_did_not_write(tmp_path):
    (tmp_path / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="is not a demo dataset"):
        make_demo_dataset(tmp_path, n_cases=1, size=SIZE)
    assert (tmp_path / "keep.txt").read_text() == "precious"


def test_cli_demo_data_prints_a_summary(tmp_path):
    result = CliRunner().invoke(
        app, ["demo-data", str(tmp_path / "d"), "--cases", "2", "--seed", "3", "--size", "32"]
    )
    assert result.exit_code == 0, result.output
    assert "2 cases" in result.output and "annotations" in result.output
    assert (tmp_path / "d" / "expected.json").is_file()
    rerun = CliRunner().invoke(app, ["demo-data", str(tmp_path / "d"), "--cases", "1", "--size", "32"])
    assert rerun.exit_code == 0, rerun.output  # its own earlier output is replaced
    assert len(json.loads((tmp_path / "d" / "expected.json").read_text())["cases"]) == 1


@pytest.mark.parametrize("index", range(N_CASES))
def test_every_orientation_shows_the_organ_on_most_slices_and_the_lesion(demo, index):
    # The anatomy is drawn in patient coordinates and each series is placed on it: whatever the
    # orientation, the organ crosses nearly every slice and the lesion is in the slab.
    case = demo.cases[index]
    _, label = _seg_label(demo, case)
    assert (label > 0).any(axis=(1, 2)).mean() >= 0.8, case.orientation
    assert (label == 2).any(axis=(1, 2)).mean() >= 0.3, case.orientation
