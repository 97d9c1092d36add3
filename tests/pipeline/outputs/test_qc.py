"""QC pictures: radiological orientation from the affine, square millimetre pixels, contours over a
light fill, windows by modality, and the written PNG."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipeline.outputs import qc

NAMES = {0: "background", 1: "organ", 2: "lesion"}


def _phantom(shape=(20, 24, 16)):
    """A RAS volume with one marker at the patient's right, anterior, superior corner."""
    image = np.zeros(shape, np.float32)
    mask = np.zeros(shape, np.uint8)
    x, y, z = shape
    mask[x - 5 :, y - 5 :, z - 4 :] = 1  # high x = patient's right in RAS
    image[mask > 0] = 100
    return image, mask


RAS = np.diag([1.0, 1.0, 1.0, 1.0])


def _lps_permuted(image, mask):
    """The same patient stored as DICOM often is: axes (j, i, k) flipped to LPS, with its affine."""
    img, lab = image[::-1, ::-1, :].transpose(1, 0, 2), mask[::-1, ::-1, :].transpose(1, 0, 2)
    nx, ny = image.shape[:2]
    # voxel (a, b, c) of the stored array is RAS voxel (nx-1-b, ny-1-a, c)
    affine = np.array([[0, -1, 0, nx - 1], [-1, 0, 0, ny - 1], [0, 0, 1, 0], [0, 0, 0, 1]], float)
    return np.ascontiguousarray(img), np.ascontiguousarray(lab), affine


@pytest.mark.parametrize("stored", ["ras", "lps_permuted"])
def test_planes_follow_the_radiological_convention_whatever_the_storage(stored):
    image, mask = _phantom()
    affine = RAS
    if stored == "lps_permuted":
        image, mask, affine = _lps_permuted(image, mask)
    canon = qc.Canonical.from_grid(image, mask, affine)
    cx, cy, cz = canon.centroid()
    _, axial, _, _ = canon.plane("axial", cz)
    _, coronal, _, _ = canon.plane("coronal", cy)
    _, sagittal, _, _ = canon.plane("sagittal", cx)
    # Axial: patient's right on the image's left, anterior up -> the marker is top-left.
    rows, cols = np.nonzero(axial)
    assert rows.max() < axial.shape[0] // 2 and cols.max() < axial.shape[1] // 2
    # Coronal: right on the left, superior up -> top-left.
    rows, cols = np.nonzero(coronal)
    assert rows.max() < coronal.shape[0] // 2 and cols.max() < coronal.shape[1] // 2
    # Sagittal: anterior on the left, superior up -> top-left.
    rows, cols = np.nonzero(sagittal)
    assert rows.max() < sagittal.shape[0] // 2 and cols.max() < sagittal.shape[1] // 2


def test_anisotropic_voxels_are_drawn_in_millimetres():
    image = np.zeros((40, 40, 8), np.float32)
    mask = np.zeros(image.shape, np.uint8)
    affine = np.diag([0.5, 0.5, 5.0, 1.0])  # 20 x 20 x 40 mm
    canon = qc.Canonical.from_grid(image, mask, affine)
    assert canon.spacing == (0.5, 0.5, 5.0)
    img, lab, row_mm, col_mm = canon.plane("coronal", 20)
    tile, _ = qc._resample(img, lab, row_mm=row_mm, col_mm=col_mm, longest=200)
    assert tile.shape == (200, 100)  # 40 mm tall, 20 mm wide


def test_labels_are_a_light_fill_with_a_solid_contour():
    image = np.full((30, 30), 50.0, np.float32)
    mask = np.zeros((30, 30), np.uint8)
    mask[5:25, 5:25] = 2
    rgb = qc.overlay(image, mask, (0.0, 100.0))
    tint = np.asarray(qc.colour(2), np.float32)
    np.testing.assert_allclose(rgb[5, 10], tint)  # the edge: the label's own colour
    inside = rgb[15, 15]
    expected = (1 - qc.FILL_ALPHA) * 0.5 + qc.FILL_ALPHA * tint
    np.testing.assert_allclose(inside, expected, rtol=1e-5)  # the anatomy shows through
    np.testing.assert_allclose(rgb[0, 0], [0.5, 0.5, 0.5])  # background untouched


def test_window_by_modality():
    rng = np.random.default_rng(0)
    ct = rng.normal(40, 30, (32, 32, 8)).astype(np.float32)
    ct[:4] = -1000  # air around the body
    assert qc.display_window(ct, "CT") == qc.CT_WINDOW
    mr = rng.gamma(2.0, 100.0, (32, 32, 8)).astype(np.float32)
    lo, hi = qc.display_window(mr, "MR")
    assert 0 < lo < np.percentile(mr, 5) and np.percentile(mr, 95) < hi <= mr.max()
    # "CT" values that are not Hounsfield units (already normalised) get percentiles too.
    assert qc.display_window(rng.normal(size=(16, 16, 4)).astype(np.float32), "CT") != qc.CT_WINDOW


def test_montage_slices_spread_over_the_labels():
    mask = np.zeros((20, 24, 30), np.uint8)
    mask[5:10, 5:10, 10:21] = 1
    assert qc.montage_slices(mask) == sorted(set(np.linspace(10, 20, 9).round().astype(int).tolist()))
    assert qc.montage_slices(np.zeros((4, 4, 3), np.uint8)) == [0, 1, 2]


@pytest.mark.parametrize("with_labels", [True, False])
def test_qc_png_written_atomically_with_planes_and_legend(tmp_path, with_labels):
    image = np.random.default_rng(1).normal(size=(33, 37, 12)).astype(np.float32)
    mask = np.zeros(image.shape, np.uint8)
    if with_labels:
        mask[5:15, 8:20, 3:9] = 1
        mask[9:12, 12:15, 5:7] = 2
    affine = np.diag([0.8, 0.8, 3.0, 1.0])
    path = qc.write_qc_png(
        tmp_path / "qc.png", image, mask, NAMES, affine=affine, modality="MR", title="case_x"
    )
    assert [p.name for p in tmp_path.iterdir()] == ["qc.png"]
    picture = np.asarray(Image.open(path).convert("RGB"))
    assert picture.shape[0] > qc.PLANE_PX and picture.shape[1] >= 3 * qc.PLANE_PX * 0.5
    organ = (np.asarray(qc.colour(1)) * 255).round().astype(int)
    hits = np.all(np.abs(picture.astype(int) - organ) <= 2, axis=2).sum()
    assert (hits > 50) if with_labels else (hits < 200)  # contours in the organ's colour (and the legend)


def test_qc_png_text_and_legend_are_drawn_where_the_layout_puts_them(tmp_path):
    image = np.full((33, 37, 12), 50.0, np.float32)
    mask = np.zeros(image.shape, np.uint8)
    mask[5:15, 8:20, 3:9] = 1
    plain = qc.write_qc_png(tmp_path / "plain.png", image, mask, {0: "background", 1: "organ"}, modality="MR")
    titled = qc.write_qc_png(
        tmp_path / "titled.png", image, mask, {0: "background", 1: "organ"}, modality="MR", title="case_x"
    )
    a = np.asarray(Image.open(plain).convert("RGB")).astype(int)
    b = np.asarray(Image.open(titled).convert("RGB")).astype(int)
    dark = lambda p: (p.sum(axis=2) < 200).sum()  # noqa: E731 - black text on the white page
    assert dark(a[:5]) == 0 and dark(b[:20]) > 10  # the title, above the planes
    assert b.shape[0] == a.shape[0] + 18
    yellow = np.all(np.abs(a - [255, 255, 0]) <= 40, axis=2)
    assert yellow[:40].sum() > 10  # the side letters at the planes' top corners
    legend = a[-20:-8, 10:22]  # the organ's swatch, bottom left, edged in black
    organ = (np.asarray(qc.colour(1)) * 255).round().astype(int)
    assert np.all(np.abs(legend[4:8, 4:8] - organ) <= 2) and dark(legend[:1]) >= 10
    assert dark(a[-24:-4, 30:120]) > 10  # the label's name beside it


def test_ground_truth_is_a_dashed_contour_distinct_from_the_prediction():
    image = np.full((40, 40), 50.0, np.float32)
    pred = np.zeros((40, 40), np.uint8)
    truth = np.zeros((40, 40), np.uint8)
    pred[5:20, 5:20] = 1  # predicted only
    truth[22:37, 22:37] = 1  # true only (missed)
    rgb = qc.overlay(image, pred, (0.0, 100.0), truth=truth)
    tint, dash = np.asarray(qc.colour(1), np.float32), np.asarray(qc.TRUTH_DASH, np.float32)

    def on(edge_rows, edge_cols, rgb_value):
        return np.all(np.isclose(rgb[edge_rows, edge_cols], rgb_value), axis=-1).sum()

    # The missed label's contour: dashes of the label's colour and of the ground-truth colour.
    truth_edge = (np.r_[22:37], np.full(15, 22))
    assert on(*truth_edge, dash) >= 4 and on(*truth_edge, tint) >= 4
    # The prediction's own contour: solid, in the label's colour only.
    pred_edge = (np.r_[5:20], np.full(15, 5))
    assert on(*pred_edge, tint) == 15 and on(*pred_edge, dash) == 0
    np.testing.assert_allclose(rgb[30, 30], [0.5, 0.5, 0.5])  # no fill inside the truth alone
    # Without a ground truth nothing is dashed.
    assert not np.all(np.isclose(qc.overlay(image, pred, (0.0, 100.0)), dash), axis=-1).any()


def test_qc_png_with_ground_truth_draws_both_styles(tmp_path):
    image = np.full((33, 37, 12), 50.0, np.float32)
    image[0] = 0.0  # a darker rim so the percentile window is not flat
    pred = np.zeros(image.shape, np.uint8)
    truth = np.zeros(image.shape, np.uint8)
    pred[5:15, 8:20, 3:9] = 1
    truth[8:18, 10:24, 4:10] = 1  # overlaps the prediction, off by a few voxels
    pictures = {}
    for name, gt in (("pred", None), ("both", truth)):
        path = qc.write_qc_png(
            tmp_path / f"{name}.png", image, pred, NAMES, modality="MR", title="case-0001: Dice 0.5", truth=gt
        )
        pictures[name] = np.asarray(Image.open(path).convert("RGB")).astype(int)
    organ = (np.asarray(qc.colour(1)) * 255).round().astype(int)
    white = (np.asarray(qc.TRUTH_DASH) * 255).round().astype(int)

    def count(picture, rgb):
        return np.all(np.abs(picture - rgb) <= 2, axis=2).sum()

    assert count(pictures["both"], organ) > 50 and count(pictures["pred"], organ) > 50
    # Inside the first (axial) plane, where the page's white does not reach: the truth's dashes.
    inside = (slice(50, 200), slice(20, 180))
    assert count(pictures["both"][inside], white) > 20 and count(pictures["pred"][inside], white) == 0
    assert count(pictures["both"][inside], organ) > 20
    assert pictures["both"].shape[0] > pictures["pred"].shape[0]  # the key line under the title
