"""Series assembly rules on generated DICOM corpora: every rejection with its measured values."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from pipeline.errors import Reason
from pipeline.io.dicom import assemble_series, load_series, read_header
from pipeline.synthetic.dicom import AXIAL, SAGITTAL, SeriesSpec, write_dicom_series
from tests.pipeline.io.dicom_helpers import MAX_PIXELS, retag, scan, stored_volume


def rels(root, paths):
    return [p.relative_to(root).as_posix() for p in paths]


def only_rejection(root):
    groups, rejected = scan(root)
    assert groups == [], [g.files for g in groups]
    assert len(rejected) == 1, [str(r) for r in rejected]
    return rejected[0]


def test_accepted_series_voxels_and_affine(root):
    vol = stored_volume(7)
    paths = write_dicom_series(vol, root / "s", SeriesSpec(origin=(-100.0, -120.0, -50.0), slice_spacing=2.5))
    (group,), rejected = scan(root)
    assert rejected == []
    assert group.files == rels(root, paths)  # spatial order
    volume = load_series(group)
    assert volume.shape == (40, 32, 7)  # (columns, rows, slices)
    np.testing.assert_array_equal(volume.data, vol.transpose(2, 1, 0))
    # LPS (-100, -120, -50) is RAS (100, 120, -50); i runs towards L (RAS -x), j towards P (RAS -y).
    np.testing.assert_allclose(volume.affine[:3, 3], [100.0, 120.0, -50.0])
    np.testing.assert_allclose(np.diag(volume.affine)[:3], [-1.0, -1.0, 2.5])
    assert volume.modality == "CT"
    assert volume.meta["slice_spacing_mm"] == pytest.approx(2.5)


@pytest.mark.parametrize("instance_numbers", ["reversed", "shuffled"])
def test_order_comes_from_positions_not_instance_number_or_file_order(root, instance_numbers):
    vol = stored_volume(9, seed=3)
    numbers = list(range(1, 10))
    if instance_numbers == "reversed":
        numbers.reverse()
    else:
        random.Random(1).shuffle(numbers)
    names = [f"f{i}" for i in random.Random(2).sample(range(100), 9)]  # file order unrelated to space
    paths = write_dicom_series(vol, root, SeriesSpec(instance_numbers=numbers, file_names=names))
    headers = [read_header(p, root, MAX_PIXELS) for p in paths]
    random.Random(4).shuffle(headers)
    (group,), rejected = assemble_series(headers)
    assert rejected == []
    assert group.files == rels(root, paths)
    np.testing.assert_array_equal(load_series(group).data, vol.transpose(2, 1, 0))
    # The same files in another order give the same key and grouping.
    (again,), _ = assemble_series(list(reversed(headers)))
    assert again.key == group.key and again.files == group.files


def test_missing_slice_is_non_uniform_spacing_with_the_files_either_side(root):
    positions = np.array([[0.0, 0.0, 2.5 * k] for k in (0, 1, 2, 4, 5, 6)])
    paths = write_dicom_series(stored_volume(6), root, SeriesSpec(positions=positions))
    r = only_rejection(root)
    assert r.reason is Reason.NON_UNIFORM_SPACING
    assert r.details["expected_spacing_mm"] == pytest.approx(2.5)
    assert r.details["gaps"] == [{"found_spacing_mm": 5.0, "between": rels(root, paths[2:4])}]
    assert "1 missing slice" in r.message and rels(root, paths[2:3])[0] in r.message
    assert sorted(r.details["files"]) == sorted(rels(root, paths))


def test_uneven_gap_is_non_uniform_spacing(root):
    along = np.cumsum([0.0, 2.5, 2.5, 3.1, 2.5, 2.5])
    paths = write_dicom_series(stored_volume(6), root, SeriesSpec(positions=np.outer(along, [0, 0, 1])))
    r = only_rejection(root)
    assert r.reason is Reason.NON_UNIFORM_SPACING
    assert r.details["gaps"] == [{"found_spacing_mm": 3.1, "between": rels(root, paths[2:4])}]


@pytest.mark.parametrize("tilt_deg", [5.0, 15.0, -20.0])
def test_gantry_tilt_reports_the_angle(root, tilt_deg):
    t = math.radians(tilt_deg)
    # A tilted CT: image planes tilted about x, table (positions) moving straight along z.
    orientation = (1.0, 0.0, 0.0, 0.0, math.cos(t), math.sin(t))
    positions = np.array([[0.0, 0.0, 2.5 * k] for k in range(6)])
    write_dicom_series(stored_volume(6), root, SeriesSpec(orientation=orientation, positions=positions))
    r = only_rejection(root)
    assert r.reason is Reason.GANTRY_TILT
    assert abs(r.details["tilt_angle_deg"]) == pytest.approx(abs(tilt_deg), abs=1e-3)
    assert r.details["max_offset_mm"] == pytest.approx(12.5 * abs(math.sin(t)), abs=1e-3)


def test_duplicate_position(root):
    along = [0.0, 2.5, 5.0, 5.0, 7.5, 10.0]
    paths = write_dicom_series(stored_volume(6), root, SeriesSpec(positions=np.outer(along, [0, 0, 1])))
    r = only_rejection(root)
    assert r.reason is Reason.DUPLICATE_POSITION
    (dup,) = r.details["duplicates"]
    assert dup["position_mm"] == 5.0
    assert sorted(dup["files"]) == sorted(rels(root, paths[2:4]))


def test_orientation_varying_by_a_degree(root):
    paths = write_dicom_series(stored_volume(6), root, SeriesSpec())
    a = math.radians(1.0)
    retag(paths[3:4], ImageOrientationPatient=[math.cos(a), math.sin(a), 0.0, -math.sin(a), math.cos(a), 0.0])
    r = only_rejection(root)
    assert r.reason is Reason.ORIENTATION_VARIES
    assert r.details["max_cosine_difference"] == pytest.approx(math.sin(a), abs=1e-6)
    assert rels(root, paths[3:4])[0] in r.message


@pytest.mark.parametrize("n", [1, 2])
def test_too_few_slices(root, n):
    paths = write_dicom_series(stored_volume(n), root, SeriesSpec())
    r = only_rejection(root)
    assert r.reason is Reason.TOO_FEW_SLICES
    assert r.details["n_slices"] == n and sorted(r.details["files"]) == sorted(rels(root, paths))


def test_localizer(root):
    spec = SeriesSpec(image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    paths = write_dicom_series(stored_volume(3), root, spec)
    r = only_rejection(root)
    assert r.reason is Reason.LOCALIZER
    assert sorted(r.details["files"]) == sorted(rels(root, paths))


@pytest.mark.parametrize("tag", ["ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"])
def test_missing_geometry(root, tag):
    paths = write_dicom_series(stored_volume(4), root, SeriesSpec())
    retag(paths, **{tag: None})
    r = only_rejection(root)
    assert r.reason is Reason.MISSING_GEOMETRY
    assert r.details["missing"] == {rel: [tag] for rel in rels(root, paths)}


def test_malformed_geometry_value_is_missing_geometry(root):
    paths = write_dicom_series(stored_volume(4), root, SeriesSpec())
    retag(paths, ImagePositionPatient=["1", "2"])  # two values where three are required
    r = only_rejection(root)
    assert r.reason is Reason.MISSING_GEOMETRY


@pytest.mark.parametrize("photometric", ["PALETTE COLOR", "RGB", "YBR_FULL"])
def test_unsupported_photometric(root, photometric):
    write_dicom_series(stored_volume(4), root, SeriesSpec(photometric=photometric))
    r = only_rejection(root)
    assert r.reason is Reason.UNSUPPORTED_PHOTOMETRIC
    assert photometric in r.message


def test_echoes_split_into_separate_volumes(root):
    spec = dict(modality="MR", series_uid="1.2.3.4", study_uid="1.2.3", frame_of_reference_uid="1.2.3.5")
    write_dicom_series(stored_volume(5, seed=1), root / "e1", SeriesSpec(echo_number=1, **spec))
    write_dicom_series(stored_volume(5, seed=2), root / "e2", SeriesSpec(echo_number=2, seed=1, **spec))
    groups, rejected = scan(root)
    assert rejected == []
    assert [g.key.split("|")[-1] for g in groups] == ["echo=1.0", "echo=2.0"]
    assert all(f.startswith("e1/") for f in groups[0].files)


def test_repeated_acquisitions_split_but_per_slice_acquisition_numbers_do_not(root):
    spec = dict(series_uid="1.2.3.4", study_uid="1.2.3", frame_of_reference_uid="1.2.3.5")
    write_dicom_series(stored_volume(5), root / "a1", SeriesSpec(acquisition_number=1, **spec))
    write_dicom_series(stored_volume(5), root / "a2", SeriesSpec(acquisition_number=2, seed=1, **spec))
    groups, rejected = scan(root)
    assert rejected == [] and len(groups) == 2
    assert [g.key.split("|")[-1] for g in groups] == ["acq=1", "acq=2"]

    # A helix whose every slice carries its own AcquisitionNumber is still one volume.
    other = root.parent / "helix"
    paths = write_dicom_series(stored_volume(5), other, SeriesSpec())
    for k, p in enumerate(paths):
        retag([p], AcquisitionNumber=k + 1)
    (group,), rejected = scan(other)
    assert rejected == [] and len(group.frames) == 5


def test_temporal_positions_split(root):
    spec = dict(series_uid="1.2.3.4", study_uid="1.2.3", frame_of_reference_uid="1.2.3.5")
    for t in (1, 2, 3):
        paths = write_dicom_series(stored_volume(4), root / f"t{t}", SeriesSpec(seed=t, **spec))
        retag(paths, TemporalPositionIdentifier=t)
    groups, rejected = scan(root)
    assert rejected == []
    assert [g.key.split("|")[-1] for g in groups] == ["t=1", "t=2", "t=3"]


def test_two_planes_in_one_series_split_by_orientation(root):
    spec = dict(series_uid="1.2.3.4", study_uid="1.2.3", frame_of_reference_uid="1.2.3.5")
    write_dicom_series(stored_volume(5), root / "ax", SeriesSpec(orientation=AXIAL, **spec))
    write_dicom_series(stored_volume(4), root / "sag", SeriesSpec(orientation=SAGITTAL, seed=1, **spec))
    groups, rejected = scan(root)
    assert rejected == []
    assert sorted(len(g.frames) for g in groups) == [4, 5]
    assert len({g.key for g in groups}) == 2


def test_matrix_size_splits(root):
    spec = dict(series_uid="1.2.3.4", study_uid="1.2.3", frame_of_reference_uid="1.2.3.5")
    write_dicom_series(stored_volume(4, rows=32, cols=40), root / "a", SeriesSpec(**spec))
    write_dicom_series(stored_volume(3, rows=33, cols=37), root / "b", SeriesSpec(seed=1, **spec))
    groups, rejected = scan(root)
    assert rejected == []
    assert sorted(g.shape for g in groups) == [(37, 33, 3), (40, 32, 4)]


def test_rejected_series_does_not_block_an_accepted_one(root):
    write_dicom_series(stored_volume(5), root / "ok", SeriesSpec(seed=1))
    write_dicom_series(stored_volume(2), root / "short", SeriesSpec(seed=2))
    groups, rejected = scan(root)
    assert len(groups) == 1 and [r.reason for r in rejected] == [Reason.TOO_FEW_SLICES]


@pytest.mark.parametrize(
    ("slope", "intercept", "peak", "dtype"),
    [
        (1.0, -1024.0, 1000, "int16"),  # every slice fits int16: never widened
        (1.0, -1024.0, 40000, "int32"),  # one slice leaves int16: widened once
        (3.0, 7.0, 12000, "int32"),
        (100000.0, 0.0, 60000, "float64"),  # beyond int32: integers held exactly as float64
        (0.5, -10.0, 40000, "float32"),
    ],
)
def test_values_exact_when_one_slice_widens_the_volume(root, slope, intercept, peak, dtype):
    """The volume is filled slice by slice in file order, not spatial order; a slice whose values
    need a wider dtype widens what came before without changing a value."""
    from pipeline.io.dicom import planned_series_bytes

    vol = stored_volume(7, seed=11, lo=0, hi=900)
    vol[4, 3, 5] = peak  # one slice, in the middle of the stack, needs the widest dtype
    names = [f"f{i}" for i in (5, 0, 6, 2, 1, 4, 3)]  # files read in an order unrelated to space
    spec = SeriesSpec(signed=False, rescale_slope=slope, rescale_intercept=intercept, file_names=names)
    write_dicom_series(vol, root, spec)
    (group,), _ = scan(root)
    volume = load_series(group)
    assert str(volume.data.dtype) == dtype
    np.testing.assert_array_equal(
        volume.data, (vol.astype(np.float64) * slope + intercept).transpose(2, 1, 0)
    )
    assert planned_series_bytes(group) >= volume.data.nbytes  # planning never under-counts


def test_a_series_over_the_voxel_limit_is_too_large_before_decoding(root):
    write_dicom_series(stored_volume(5), root, SeriesSpec())
    (group,), _ = scan(root)
    voxels = 5 * 32 * 40
    assert load_series(group, max_voxels=voxels).shape == (40, 32, 5)  # at the limit: accepted
    for path in root.iterdir():
        path.write_bytes(b"")  # nothing is read when the series is refused
    with pytest.raises(Exception) as info:
        load_series(group, max_voxels=voxels - 1)
    assert info.value.reason == Reason.TOO_LARGE
    assert info.value.details["voxels"] == voxels and len(info.value.details["files"]) == 5
