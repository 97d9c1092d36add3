"""NIfTI reading: every rejection with its measured values, gzip bombs, affine choice, pairing."""

from __future__ import annotations

import gzip
import itertools
import tracemalloc
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pipeline.errors import Reason
from pipeline.io.nifti import NiftiCase, corner_distance_mm, load_label, load_nifti, pair_nifti_files
from pipeline.io.volume import Volume

LIMITS = {"max_voxels": 10**7, "max_bytes": 10**8}
AFFINE = np.array(
    [[-0.8, 0.0, 0.0, 90.0], [0.0, 0.75, 0.0, -120.0], [0.0, 0.0, 2.5, -40.0], [0.0, 0.0, 0.0, 1.0]]
)


def write(path: Path, data, affine=AFFINE, *, qform=None, sform=None, qcode=1, scode=1, slope=None) -> Path:
    img = nib.Nifti1Image(np.asarray(data), None)
    img.set_qform(affine if qform is None else qform, code=qcode)
    img.set_sform(affine if sform is None else sform, code=scode)
    if slope is not None:
        img.header.set_slope_inter(*slope)
    nib.save(img, path)
    return path


def nifti_bytes(data: np.ndarray, affine=AFFINE) -> bytes:
    """A whole .nii file in memory (header, extension flag, voxels)."""
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    return img.to_bytes()


def rejected(exc_info, reason: Reason, rel: str):
    err = exc_info.value
    assert err.reason == reason, err
    assert err.path == rel
    return err.details


def rotation(axis: int, degrees: float) -> np.ndarray:
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    a, b = [x for x in range(3) if x != axis]
    r = np.eye(4)
    r[a, a], r[a, b], r[b, a], r[b, b] = c, -s, s, c
    return r


# ---------------------------------------------------------------------------------------------
# accepted images


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
@pytest.mark.parametrize(
    ("stored", "expected"),
    [
        (np.int16, np.int16),
        (np.uint8, np.uint8),
        (np.int32, np.int32),
        (np.float32, np.float32),
        (np.float64, np.float32),
    ],
)
def test_load_keeps_voxels_dtype_and_affine(tmp_path, suffix, stored, expected):
    rng = np.random.default_rng(0)
    data = rng.integers(0, 120, size=(33, 37, 5)).astype(stored)
    write(tmp_path / f"a{suffix}", data)
    vol = load_nifti(tmp_path / f"a{suffix}", f"a{suffix}", **LIMITS)
    assert vol.data.dtype == expected
    assert vol.shape == (33, 37, 5)
    np.testing.assert_array_equal(vol.data, data.astype(expected))
    np.testing.assert_allclose(vol.affine, AFFINE, atol=1e-5)
    assert vol.meta["affine_source"] == "sform"
    assert vol.meta["gzip"] is (suffix == ".nii.gz")


def test_trailing_singleton_fourth_dimension_is_dropped(tmp_path):
    data = np.arange(33 * 37 * 5, dtype=np.int16).reshape(33, 37, 5, 1)
    vol = load_nifti(write(tmp_path / "a.nii.gz", data), "a.nii.gz", **LIMITS)
    np.testing.assert_array_equal(vol.data, data[..., 0])


def test_scaled_integers_become_float32(tmp_path):
    data = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    vol = load_nifti(write(tmp_path / "a.nii", data, slope=(0.5, -10.0)), "a.nii", **LIMITS)
    assert vol.data.dtype == np.float32
    np.testing.assert_array_equal(vol.data, data * 0.5 - 10.0)


def test_big_endian_file_reads_native(tmp_path):
    data = np.arange(24, dtype=">i2").reshape(2, 3, 4)
    img = nib.Nifti1Image(data, AFFINE, dtype=np.dtype("<i2"))
    img.set_qform(AFFINE, code=1)
    hdr = img.header.copy()
    hdr.set_data_offset(352)
    hdr = hdr.as_byteswapped(">")  # a big-endian writer (old SPM, some scanners) made this file
    (tmp_path / "be.nii").write_bytes(hdr.binaryblock + bytes(4) + data.tobytes(order="F"))
    vol = load_nifti(tmp_path / "be.nii", "be.nii", **LIMITS)
    assert vol.data.dtype == np.dtype("int16") and vol.data.dtype.isnative
    np.testing.assert_array_equal(vol.data, data)


@pytest.mark.parametrize(
    ("qcode", "scode", "source"), [(1, 1, "sform"), (0, 2, "sform"), (1, 0, "qform"), (0, 0, "none")]
)
def test_affine_choice_is_sform_then_qform(tmp_path, qcode, scode, source):
    qform = AFFINE.copy()
    sform = AFFINE.copy()
    if not (qcode and scode):  # when only one is coded, make them differ to see which was taken
        sform[:3, 3] += 5.0
    path = write(
        tmp_path / "a.nii", np.zeros((3, 4, 5), np.int16), qform=qform, sform=sform, qcode=qcode, scode=scode
    )
    vol = load_nifti(path, "a.nii", **LIMITS, allow_no_orientation=source == "none")
    assert vol.meta["affine_source"] == source
    expected = {"sform": sform, "qform": qform}.get(source, nib.load(path).header.get_base_affine())
    np.testing.assert_allclose(vol.affine, expected, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# size limits, gzip bombs, truncation, garbage


def test_too_many_voxels_refused_from_the_header(tmp_path):
    # A 2000^3 float32 header over 10 voxels of data: refused on the header, nothing allocated.
    raw = bytearray(nifti_bytes(np.zeros((2, 1, 5), np.float32)))
    hdr = nib.Nifti1Header.from_fileobj(__import__("io").BytesIO(bytes(raw)))
    hdr.set_data_shape((2000, 2000, 2000))
    raw[:348] = hdr.binaryblock
    (tmp_path / "big.nii").write_bytes(bytes(raw))
    with pytest.raises(Exception) as info:
        load_nifti(tmp_path / "big.nii", "big.nii", max_voxels=10**9, max_bytes=10**12)
    details = rejected(info, Reason.TOO_LARGE, "big.nii")
    assert details == {"voxels": 8 * 10**9, "max_voxels": 10**9, "shape": [2000, 2000, 2000]}


def test_too_many_bytes_refused_from_the_header(tmp_path):
    path = write(tmp_path / "a.nii.gz", np.zeros((10, 10, 10), np.float64))
    with pytest.raises(Exception) as info:
        load_nifti(path, "a.nii.gz", max_voxels=1000, max_bytes=8000)
    details = rejected(info, Reason.TOO_LARGE, "a.nii.gz")
    assert details == {"bytes": 352 + 8000, "max_bytes": 8000, "shape": [10, 10, 10]}


@pytest.fixture(scope="module")
def gzip_bomb(tmp_path_factory) -> Path:
    """Header of a 10x10x10 uint8 image, then 200 MB of zeros: 200 kB on disk, written streaming."""
    path = tmp_path_factory.mktemp("bomb") / "bomb.nii.gz"
    head = nifti_bytes(np.zeros((10, 10, 10), np.uint8))[:352]
    zeros = bytes(1 << 20)
    with gzip.open(path, "wb", compresslevel=1) as gz:
        gz.write(head)
        for _ in range(200):
            gz.write(zeros)
    return path


def test_gzip_bomb_refused_with_bounded_memory(gzip_bomb):
    assert gzip_bomb.stat().st_size < 2_000_000
    tracemalloc.start()
    try:
        with pytest.raises(Exception) as info:
            load_nifti(gzip_bomb, "bomb.nii.gz", **LIMITS)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    details = rejected(info, Reason.TOO_LARGE, "bomb.nii.gz")
    declared = 352 + 1000
    assert details["declared_bytes"] == declared
    assert details["read_bytes_at_least"] == declared + 64 * 1024 + 1  # stopped one byte past the margin
    assert peak < 8 * 2**20, f"peak {peak} bytes while refusing a gzip bomb"


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_short_voxel_data_is_truncated(tmp_path, suffix):
    whole = nifti_bytes(np.ones((10, 10, 10), np.int16))
    cut = whole[:-500]
    path = tmp_path / f"cut{suffix}"
    path.write_bytes(gzip.compress(cut) if suffix == ".nii.gz" else cut)
    with pytest.raises(Exception) as info:
        load_nifti(path, path.name, **LIMITS)
    details = rejected(info, Reason.TRUNCATED, path.name)
    assert details == {"expected_bytes": 352 + 2000, "found_bytes": 352 + 1500}


@pytest.mark.parametrize(("suffix", "padding"), [(".nii", 10**6), (".nii.gz", 1000)])
def test_trailing_padding_is_tolerated(tmp_path, suffix, padding):
    # Uncompressed: bytes past the data are never read. Compressed: up to 64 kB of padding.
    data = np.arange(1000, dtype=np.int16).reshape(10, 10, 10)
    whole = nifti_bytes(data) + bytes(padding)
    path = tmp_path / f"pad{suffix}"
    path.write_bytes(gzip.compress(whole) if suffix == ".nii.gz" else whole)
    np.testing.assert_array_equal(load_nifti(path, path.name, **LIMITS).data, data)


def test_cut_gzip_stream_is_truncated(tmp_path):
    rng = np.random.default_rng(1)  # incompressible, so the cut lands inside the voxels
    compressed = gzip.compress(nifti_bytes(rng.integers(0, 2**15, (20, 20, 20)).astype(np.int16)))
    (tmp_path / "cut.nii.gz").write_bytes(compressed[: len(compressed) // 2])
    with pytest.raises(Exception) as info:
        load_nifti(tmp_path / "cut.nii.gz", "cut.nii.gz", **LIMITS)
    rejected(info, Reason.TRUNCATED, "cut.nii.gz")


def test_header_cut_short_is_truncated(tmp_path):
    (tmp_path / "h.nii").write_bytes(nifti_bytes(np.zeros((2, 2, 2), np.uint8))[:200])
    with pytest.raises(Exception) as info:
        load_nifti(tmp_path / "h.nii", "h.nii", **LIMITS)
    assert rejected(info, Reason.TRUNCATED, "h.nii") == {"found_bytes": 200, "expected_bytes": 348}


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        ("report.nii", b"Patient report: nothing to see here\n" * 20, Reason.UNREADABLE),
        ("report.nii.gz", gzip.compress(b"<html>not an image</html>" * 40), Reason.UNREADABLE),
        ("empty.nii.gz", b"", Reason.TRUNCATED),
        ("bad.nii.gz", b"\x1f\x8b" + b"\x00" * 50, Reason.UNREADABLE),
    ],
)
def test_garbage_with_a_nifti_name(tmp_path, name, content, reason):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(Exception) as info:
        load_nifti(tmp_path / name, name, **LIMITS)
    rejected(info, reason, name)


def test_header_image_pair_named_nii_is_analyze_format(tmp_path):
    img = nib.Nifti1Pair(np.zeros((2, 2, 2), np.uint8), AFFINE)
    nib.save(img, tmp_path / "pair.img")
    (tmp_path / "pair.nii").write_bytes((tmp_path / "pair.hdr").read_bytes())
    with pytest.raises(Exception) as info:
        load_nifti(tmp_path / "pair.nii", "pair.nii", **LIMITS)
    assert rejected(info, Reason.ANALYZE_FORMAT, "pair.nii") == {"magic": "ni1"}


def test_nifti2_is_read(tmp_path):
    data = np.arange(60, dtype=np.float32).reshape(3, 4, 5)
    img = nib.Nifti2Image(data, AFFINE)
    img.set_qform(AFFINE, code=1)
    nib.save(img, tmp_path / "n2.nii.gz")
    vol = load_nifti(tmp_path / "n2.nii.gz", "n2.nii.gz", **LIMITS)
    assert vol.meta["nifti_version"] == 2
    np.testing.assert_array_equal(vol.data, data)


# ---------------------------------------------------------------------------------------------
# content and geometry rejections


@pytest.mark.parametrize("shape", [(4, 5, 6, 2), (4, 5, 6, 1, 3), (33, 37)])
def test_unsupported_dimensions(tmp_path, shape):
    path = write(tmp_path / "d.nii.gz", np.zeros(shape, np.int16))
    with pytest.raises(Exception) as info:
        load_nifti(path, "d.nii.gz", **LIMITS)
    assert rejected(info, Reason.UNSUPPORTED_DIMENSIONS, "d.nii.gz") == {"shape": list(shape)}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_non_finite_voxels_are_counted(tmp_path, dtype):
    data = np.zeros((33, 37, 5), dtype)
    data[0, 0, 0] = data[5, 6, 1] = np.nan
    data[1, 2, 3] = -np.inf
    path = write(tmp_path / "nan.nii", data)
    with pytest.raises(Exception) as info:
        load_nifti(path, "nan.nii", **LIMITS)
    details = rejected(info, Reason.NON_FINITE_VOXELS, "nan.nii")
    assert details == {"nan_voxels": 2, "inf_voxels": 1, "voxels": 33 * 37 * 5}


@pytest.mark.parametrize(
    ("change", "expected_mm"),
    [
        (lambda a: np.array([[1, 0, 0, 2.0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]) @ a, 2.0),
        (lambda a: rotation(2, 3.0) @ a, None),  # expected from the corners below
        (lambda a: np.array([[1, 0, 0, 0], [0, 1, 0, 0.3], [0, 0, 1, 0.4], [0, 0, 0, 1]]) @ a, 0.5),
    ],
)
def test_qform_sform_mismatch_reports_the_corner_distance(tmp_path, change, expected_mm):
    shape = (33, 37, 5)
    sform = change(AFFINE)
    path = write(tmp_path / "qs.nii.gz", np.zeros(shape, np.int16), qform=AFFINE, sform=sform)
    if expected_mm is None:
        corners = np.array(list(itertools.product(*[(0, n - 1) for n in shape])), float)
        pts = np.c_[corners, np.ones(len(corners))].T
        expected_mm = float(np.linalg.norm((AFFINE @ pts - sform @ pts)[:3], axis=0).max())
    with pytest.raises(Exception) as info:
        load_nifti(path, "qs.nii.gz", **LIMITS)
    details = rejected(info, Reason.QFORM_SFORM_MISMATCH, "qs.nii.gz")
    assert details["max_corner_difference_mm"] == pytest.approx(expected_mm, abs=1e-4)
    assert (details["qform_code"], details["sform_code"], details["tolerance_mm"]) == (1, 1, 1e-3)


def test_qform_sform_within_tolerance_is_accepted(tmp_path):
    sform = AFFINE.copy()
    sform[:3, 3] += 2e-4
    path = write(tmp_path / "ok.nii", np.zeros((3, 4, 5), np.int16), qform=AFFINE, sform=sform)
    np.testing.assert_allclose(load_nifti(path, "ok.nii", **LIMITS).affine, sform, atol=1e-5)


def test_oblique_orthonormal_affine_is_accepted(tmp_path):
    oblique = rotation(0, 17.0) @ rotation(2, -23.0) @ AFFINE
    path = write(tmp_path / "obl.nii.gz", np.zeros((3, 4, 5), np.int16), oblique)
    np.testing.assert_allclose(load_nifti(path, "obl.nii.gz", **LIMITS).affine, oblique, atol=1e-4)


def test_sheared_affine_is_non_orthonormal(tmp_path):
    sheared = np.diag([0.8, 0.75, 2.5, 1.0])
    sheared[:3, 1] = 0.75 * np.array([np.cos(np.radians(80)), np.sin(np.radians(80)), 0.0])  # j at 80° to i
    path = write(tmp_path / "shear.nii", np.zeros((3, 4, 5), np.int16), sform=sheared, qcode=0)
    with pytest.raises(Exception) as info:
        load_nifti(path, "shear.nii", **LIMITS)
    details = rejected(info, Reason.NON_ORTHONORMAL_AFFINE, "shear.nii")
    assert details["angle_ij_deg"] == pytest.approx(80.0, abs=1e-3)
    assert details["angle_ik_deg"] == pytest.approx(90.0, abs=1e-3)
    assert details["max_deviation"] == pytest.approx(np.cos(np.radians(80)), abs=1e-5)
    assert details["affine_source"] == "sform"


def test_degenerate_affine_is_non_orthonormal(tmp_path):
    flat = np.diag([1.0, 1.0, 0.0, 1.0])
    path = write(tmp_path / "flat.nii", np.zeros((3, 4, 5), np.int16), sform=flat, qcode=0)
    with pytest.raises(Exception) as info:
        load_nifti(path, "flat.nii", **LIMITS)
    rejected(info, Reason.NON_ORTHONORMAL_AFFINE, "flat.nii")


# ---------------------------------------------------------------------------------------------
# labels


@pytest.fixture
def image(tmp_path) -> Volume:
    return load_nifti(write(tmp_path / "img.nii.gz", np.zeros((33, 37, 5), np.int16)), "img.nii.gz", **LIMITS)


def label_at(tmp_path, data, affine=AFFINE, name="lab.nii.gz") -> Path:
    return write(tmp_path / name, data, affine)


@pytest.mark.parametrize(
    ("stored", "top", "out"),
    [
        (np.uint8, 2, np.uint8),
        (np.float32, 2, np.uint8),
        (np.int16, 300, np.uint16),
        (np.float64, 255, np.uint8),
    ],
)
def test_label_values_and_dtype(tmp_path, image, stored, top, out):
    data = np.zeros(image.shape, stored)
    data[3:9, 4:11, 1:3] = 1
    data[20, 30, 4] = top
    vol = load_label(label_at(tmp_path, data), "lab.nii.gz", image, allowed_labels=None, **LIMITS)
    assert vol.data.dtype == out
    np.testing.assert_array_equal(vol.data, data.astype(out))
    np.testing.assert_array_equal(vol.affine, image.affine)
    assert vol.meta["label_values"] == [0, 1, top]


def test_non_integer_labels(tmp_path, image):
    data = np.zeros(image.shape, np.float32)
    data[0, 0, 0], data[1, 1, 1], data[2, 2, 2] = 0.5, 1.25, 2.0
    with pytest.raises(Exception) as info:
        load_label(label_at(tmp_path, data), "lab.nii.gz", image, allowed_labels={0, 1, 2}, **LIMITS)
    assert rejected(info, Reason.NON_INTEGER_LABELS, "lab.nii.gz") == {
        "non_integer_voxels": 2,
        "examples": [0.5, 1.25],
    }


def test_unexpected_labels_are_listed_with_counts(tmp_path, image):
    data = np.zeros(image.shape, np.int16)
    data[0, :, 0] = 1
    data[1, :3, 0] = 2
    data[2, :5, 0] = 5
    with pytest.raises(Exception) as info:
        load_label(label_at(tmp_path, data), "lab.nii.gz", image, allowed_labels={0, 1}, **LIMITS)
    assert rejected(info, Reason.UNEXPECTED_LABELS, "lab.nii.gz") == {
        "unexpected": [2, 5],
        "voxel_counts": {"2": 3, "5": 5},
        "allowed": [0, 1],
    }


def test_negative_labels_are_unexpected_even_without_a_declaration(tmp_path, image):
    data = np.zeros(image.shape, np.int16)
    data[0, 0, 0] = -1
    with pytest.raises(Exception) as info:
        load_label(label_at(tmp_path, data), "lab.nii.gz", image, allowed_labels=None, **LIMITS)
    details = rejected(info, Reason.UNEXPECTED_LABELS, "lab.nii.gz")
    assert (details["unexpected"], details["allowed"]) == ([-1], None)


def test_label_shape_mismatch(tmp_path, image):
    with pytest.raises(Exception) as info:
        load_label(
            label_at(tmp_path, np.zeros((33, 37, 6), np.uint8)),
            "lab.nii.gz",
            image,
            allowed_labels=None,
            **LIMITS,
        )
    assert rejected(info, Reason.LABEL_GEOMETRY_MISMATCH, "lab.nii.gz") == {
        "label_shape": [33, 37, 6],
        "image_shape": [33, 37, 5],
    }


def test_label_affine_mismatch(tmp_path, image):
    moved = AFFINE.copy()
    moved[2, 3] += 1.5
    with pytest.raises(Exception) as info:
        load_label(
            label_at(tmp_path, np.zeros(image.shape, np.uint8), moved),
            "lab.nii.gz",
            image,
            allowed_labels=None,
            **LIMITS,
        )
    details = rejected(info, Reason.LABEL_GEOMETRY_MISMATCH, "lab.nii.gz")
    assert details["max_corner_difference_mm"] == pytest.approx(1.5, abs=1e-4)
    np.testing.assert_allclose(details["label_affine"], moved, atol=1e-5)
    np.testing.assert_allclose(details["image_affine"], image.affine, atol=1e-5)


def test_corner_distance_of_a_rotation():
    shape = (11, 1, 1)  # a line of 11 voxels 0.8 mm apart, turned 90 degrees about its first voxel
    a = np.diag([0.8, 1, 1, 1.0])
    b = rotation(2, 90) @ a
    assert corner_distance_mm(a, b, shape) == pytest.approx(np.hypot(8.0, 8.0))


# ---------------------------------------------------------------------------------------------
# pairing


def make_files(root: Path, names: list[str]) -> list[Path]:
    paths = []
    for name in names:
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"")
        paths.append(p)
    return paths


def test_pairing_rule(tmp_path):
    files = make_files(
        tmp_path,
        [
            "a.nii.gz",
            "a_seg.nii.gz",
            "b.nii",
            "b_label.nii.gz",
            "sub/c.nii.gz",
            "sub/c_MASK.nii.gz",
            "d.nii.gz",
            "d_labels.nii",
            "e.nii.gz",  # unlabelled
            "set/images/x/f.nii.gz",
            "set/labels/x/f.nii.gz",
            "set/images/g.nii",
            "set/masks/g.nii.gz",
            "notes.txt",  # not NIfTI: skipped, the caller routes it
        ],
    )
    cases, rejections = pair_nifti_files(files, tmp_path)
    assert rejections == []
    assert cases == [
        NiftiCase("a.nii.gz", "a.nii.gz", "a_seg.nii.gz"),
        NiftiCase("b.nii", "b.nii", "b_label.nii.gz"),
        NiftiCase("d.nii.gz", "d.nii.gz", "d_labels.nii"),
        NiftiCase("e.nii.gz", "e.nii.gz", None),
        NiftiCase("set/images/g.nii", "set/images/g.nii", "set/masks/g.nii.gz"),
        NiftiCase("set/images/x/f.nii.gz", "set/images/x/f.nii.gz", "set/labels/x/f.nii.gz"),
        NiftiCase("sub/c.nii.gz", "sub/c.nii.gz", "sub/c_MASK.nii.gz"),
    ]
    assert cases[0].channels == ("a.nii.gz",)
    # relative input paths give the same result
    again, _ = pair_nifti_files([f.relative_to(tmp_path) for f in files], tmp_path)
    assert again == cases


def test_pairing_rejections(tmp_path):
    files = make_files(
        tmp_path,
        [
            "lonely_seg.nii.gz",  # label without image
            "labels/ghost.nii.gz",  # folder-rule label without images/ghost
            "two.nii.gz",
            "two_seg.nii.gz",
            "two_mask.nii.gz",  # two labels for one image
            "dup.nii",
            "dup.nii.gz",  # same image twice
            "._a.nii.gz",
            "a.nii.gz",  # macOS resource fork
        ],
    )
    cases, rejections = pair_nifti_files(files, tmp_path)
    assert cases == [NiftiCase("a.nii.gz", "a.nii.gz", None)]
    got = {(r.path, r.reason) for r in rejections}
    assert got == {
        ("lonely_seg.nii.gz", Reason.MISSING_LABEL_SOURCE),
        ("labels/ghost.nii.gz", Reason.MISSING_LABEL_SOURCE),
        ("two.nii.gz", Reason.INVALID_DATASET),
        ("two_seg.nii.gz", Reason.INVALID_DATASET),
        ("two_mask.nii.gz", Reason.INVALID_DATASET),
        ("dup.nii", Reason.INVALID_DATASET),
        ("dup.nii.gz", Reason.INVALID_DATASET),
        ("._a.nii.gz", Reason.NOT_DICOM),
    }
    ghost = next(r for r in rejections if r.path == "labels/ghost.nii.gz")
    assert ghost.details == {"expected_image": "images/ghost.nii.gz (or .nii)"}
    assert len(rejections) == len(got)  # every file once


# ---------------------------------------------------------------------------------------------
# orientation, Analyze pairs, streaming


def test_no_orientation_is_refused_unless_opted_in(tmp_path):
    data = np.arange(60, dtype=np.int16).reshape(3, 4, 5)
    path = write(tmp_path / "a.nii.gz", data, qcode=0, scode=0)
    with pytest.raises(Exception) as info:
        load_nifti(path, "a.nii.gz", **LIMITS)
    assert rejected(info, Reason.NO_ORIENTATION, "a.nii.gz") == {"qform_code": 0, "sform_code": 0}
    vol = load_nifti(path, "a.nii.gz", **LIMITS, allow_no_orientation=True)
    assert vol.meta["affine_source"] == "none"
    np.testing.assert_array_equal(vol.data, data)


def test_label_without_orientation_is_refused_too(tmp_path, image):
    data = np.zeros(image.shape, np.uint8)
    path = write(tmp_path / "lab.nii.gz", data, qcode=0, scode=0)
    with pytest.raises(Exception) as info:
        load_label(path, "lab.nii.gz", image, allowed_labels=None, **LIMITS)
    rejected(info, Reason.NO_ORIENTATION, "lab.nii.gz")


def test_staged_volume_without_orientation_keeps_codes_zero(tmp_path):
    from pipeline.io.volume import save_nifti

    path = write(tmp_path / "a.nii.gz", np.ones((3, 4, 5), np.int16), qcode=0, scode=0)
    vol = load_nifti(path, "a.nii.gz", **LIMITS, allow_no_orientation=True)
    save_nifti(vol, tmp_path / "out.nii.gz")
    hdr = nib.load(tmp_path / "out.nii.gz").header
    assert (int(hdr["qform_code"]), int(hdr["sform_code"])) == (0, 0)  # never a guess written as known


@pytest.mark.parametrize("kind", ["analyze", "nifti_pair"])
def test_hdr_img_pairs_are_analyze_format(tmp_path, kind):
    from pipeline.io.nifti import analyze_files

    data = np.zeros((4, 5, 6), np.int16)
    klass = nib.AnalyzeImage if kind == "analyze" else nib.Nifti1Pair
    nib.save(klass(data, AFFINE), tmp_path / "scan.hdr")
    (tmp_path / "lone.hdr").write_bytes(b"not a header at all, a text file\n" * 20)
    (tmp_path / "other.img").write_bytes(b"\0" * 100)  # no header beside it: left to the others
    files = sorted(tmp_path.iterdir())
    taken, rejections = analyze_files(files, tmp_path)
    assert taken == {tmp_path / "scan.hdr", tmp_path / "scan.img"}
    assert {(r.path, r.reason) for r in rejections} == {
        ("scan.hdr", Reason.ANALYZE_FORMAT),
        ("scan.img", Reason.ANALYZE_FORMAT),
    }
    assert ("NIfTI-1" if kind == "nifti_pair" else "Analyze 7.5") in rejections[0].message


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
@pytest.mark.parametrize(
    ("stored", "slope", "byteorder"),
    [
        (np.int16, None, "<"),
        (np.int16, (0.5, -1000.0), ">"),
        (np.uint8, (2.0, 1.0), "<"),
        (np.float64, (3.0, 0.25), "<"),
        (np.float64, None, ">"),
        (np.int32, (1.5, 0.0), "<"),
    ],
)
def test_streamed_read_equals_the_formula_across_chunks(
    tmp_path, monkeypatch, suffix, stored, slope, byteorder
):
    """Chunks of 96 bytes (not a multiple of a row), a header extension before the voxels, either
    byte order: values as ``stored * slope + inter`` in float32 (float64 for float64 voxels)."""
    from pipeline.io import nifti_stream

    monkeypatch.setattr(nifti_stream, "CHUNK_BYTES", 96)
    rng = np.random.default_rng(5)
    data = rng.integers(0, 200, size=(33, 37, 5)).astype(stored)
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(data.shape)
    hdr.set_data_dtype(stored)
    hdr.set_qform(AFFINE, code=1)
    if slope is not None:
        hdr["scl_slope"], hdr["scl_inter"] = slope
    hdr.set_data_offset(352 + 48)
    order = ">" if byteorder == ">" else "<"
    if order == ">":
        hdr = hdr.as_byteswapped(">")
    extension = np.array([48, 6], dtype=f"{order}i4").tobytes() + b"a comment before the voxels".ljust(40)
    voxels = data.astype(data.dtype.newbyteorder(order)).tobytes(order="F")
    whole = hdr.binaryblock + b"\x01\0\0\0" + extension + voxels
    (tmp_path / f"s{suffix}").write_bytes(gzip.compress(whole) if suffix == ".nii.gz" else whole)
    if slope is not None:
        work = np.float64 if stored == np.float64 else np.float32
        expected = data.astype(work) * work(slope[0]) + work(slope[1])
    else:
        expected = data
    vol = load_nifti(tmp_path / f"s{suffix}", f"s{suffix}", **LIMITS)
    out = np.float32 if slope is not None or stored == np.float64 else stored
    assert vol.data.dtype == out and vol.data.dtype.isnative
    np.testing.assert_array_equal(vol.data, expected.astype(out))
    assert vol.data.flags.f_contiguous


def test_reading_holds_the_output_and_one_chunk(tmp_path):
    """A scaled int16 image becomes float32: the peak is that array plus a chunk, not 2-3 copies."""
    from pipeline.io.nifti_stream import CHUNK_BYTES

    data = np.broadcast_to((np.arange(256, dtype=np.int16) % 97)[:, None, None], (256, 256, 64)).copy()
    img = nib.Nifti1Image(data, AFFINE)
    img.set_qform(AFFINE, code=1)
    img.header.set_slope_inter(0.5, -10.0)
    nib.save(img, tmp_path / "big.nii.gz")
    out_bytes = data.size * 4
    del data, img
    tracemalloc.start()
    try:
        vol = load_nifti(tmp_path / "big.nii.gz", "big.nii.gz", **LIMITS)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert vol.data.nbytes == out_bytes
    assert peak <= out_bytes + 3 * CHUNK_BYTES, (
        f"peak {peak / 2**20:.1f} MiB for a {out_bytes / 2**20:.0f} MiB volume"
    )


@pytest.mark.parametrize("stored", [np.uint8, np.int16, np.float32])
def test_label_reading_holds_the_output_and_one_chunk(tmp_path, stored):
    from pipeline.io.nifti_stream import CHUNK_BYTES

    shape = (256, 256, 48)
    data = np.zeros(shape, stored)
    data[40:90, 50:120, 3:40] = 2
    label = write(tmp_path / "lab.nii.gz", data)
    grid = Volume(np.broadcast_to(np.float32(0), shape), AFFINE)  # the image's grid, no voxels
    del data
    tracemalloc.start()
    try:
        vol = load_label(label, "lab.nii.gz", grid, allowed_labels={0, 1, 2}, **LIMITS)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert vol.data.dtype == np.uint8 and vol.meta["label_values"] == [0, 2]
    # int16 and float32 chunks are widened to int64 while counted: a few chunks, never a volume
    assert peak <= vol.data.nbytes + 6 * CHUNK_BYTES, f"peak {peak / 2**20:.1f} MiB"


def test_value_counts_is_exact_on_any_layout():
    from pipeline.io.nifti import value_counts

    rng = np.random.default_rng(2)
    data = rng.integers(0, 4, size=(40, 30, 20)).astype(np.uint16)
    expected = {int(v): int(c) for v, c in zip(*np.unique(data, return_counts=True), strict=True)}
    assert value_counts(data) == expected
    assert value_counts(np.asfortranarray(data)) == expected
    assert value_counts(data[:, ::2, :]) == {
        int(v): int(c) for v, c in zip(*np.unique(data[:, ::2, :], return_counts=True), strict=True)
    }
