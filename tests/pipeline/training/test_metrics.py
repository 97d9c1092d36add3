import math

import numpy as np
import pytest

from pipeline.training.metrics import mean_over_cases, segmentation_metrics

NAMES = {0: "background", 1: "organ", 2: "lesion"}


def _cube(shape=(40, 40, 12), at=(10, 10, 2), size=(10, 10, 8), value=1):
    a = np.zeros(shape, np.uint8)
    a[at[0] : at[0] + size[0], at[1] : at[1] + size[1], at[2] : at[2] + size[2]] = value
    return a


def test_identical_masks_score_one_and_zero_distance():
    truth = _cube() + _cube(at=(12, 12, 4), size=(3, 3, 3))
    m = segmentation_metrics(truth, truth, NAMES)
    assert m["dice/organ"] == 1.0 and m["dice/lesion"] == 1.0 and m["hd95/organ"] == 0.0


def test_exact_dice_of_overlapping_boxes():
    truth, pred = _cube(), _cube(at=(13, 10, 2))  # 7 of 10 rows overlap
    m = segmentation_metrics(pred, truth, NAMES)
    assert m["dice/organ"] == pytest.approx(2 * 7 / 20)


@pytest.mark.parametrize(("spacing", "hd"), [((1.0, 1.0, 1.0), 3.0), ((2.0, 1.0, 1.0), 6.0)])
def test_hd95_of_a_shifted_box_is_the_shift_in_mm(spacing, hd):
    m = segmentation_metrics(_cube(at=(13, 10, 2)), _cube(), NAMES, spacing=spacing)
    assert m["hd95/organ"] == pytest.approx(hd)


def test_missing_label_scores_zero_and_inf():
    truth = _cube() + _cube(at=(12, 12, 4), size=(3, 3, 3))
    m = segmentation_metrics(_cube(), truth, NAMES)
    assert m["dice/lesion"] == 0.0 and math.isinf(m["hd95/lesion"])
    assert m["dice_mean"] == pytest.approx((m["dice/organ"] + 0.0) / 2)


def test_label_absent_everywhere_is_perfect():
    m = segmentation_metrics(_cube(), _cube(), NAMES)
    assert m["dice/lesion"] == 1.0 and m["hd95/lesion"] == 0.0


def test_shapes_must_match_and_means_over_cases():
    with pytest.raises(ValueError, match="shape"):
        segmentation_metrics(np.zeros((4, 4)), np.zeros((4, 5)), NAMES)
    assert mean_over_cases([{"d": 1.0}, {"d": 0.5}]) == {"d": 0.75}


def test_evaluate_folders_writes_per_case_csv_and_means(tmp_path):
    import csv

    from pipeline.io.volume import Volume, save_nifti
    from pipeline.training.metrics import evaluate_folders

    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    for case, shift in (("a", 0), ("b", 3)):
        save_nifti(Volume(_cube(), affine), tmp_path / "truth" / f"{case}.nii.gz")
        save_nifti(Volume(_cube(at=(10 + shift, 10, 2)), affine), tmp_path / "pred" / f"{case}.nii.gz")
    path, means = evaluate_folders(tmp_path / "pred", tmp_path / "truth", label_names={1: "organ"})
    rows = list(csv.DictReader(path.open()))
    assert [r["case"] for r in rows] == ["a", "b"] and float(rows[0]["dice/organ"]) == 1.0
    assert means["dice/organ"] == pytest.approx((1.0 + 0.7) / 2)
    assert means["hd95/organ"] == pytest.approx(1.5)
