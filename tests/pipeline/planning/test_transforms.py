import numpy as np
import pytest
import torch

from pipeline.io.manifest import read_manifest
from pipeline.io.volume import Volume
from pipeline.planning.plan import Plan, plan_dataset
from pipeline.planning.transforms import body_mask, preprocess_volume, restore_labels
from tests.pipeline.ingest.staging_fixture import make_staging

LABELS = {"background": 0, "organ": 1, "lesion": 2}


@pytest.fixture(scope="module")
def staged(tmp_path_factory):
    root = make_staging(tmp_path_factory.mktemp("t"), n_cases=4, size=33)
    return root, plan_dataset(root), read_manifest(root, resolve=True)


def test_normalization_gives_unit_scale_images(staged):
    _root, plan, rows = staged
    for row in rows:
        slices, _ = preprocess_volume(row["image"], plan, row["modality"])
        assert slices.dim() == 4 and slices.shape[1] == 1
        assert torch.isfinite(slices).all()
        assert -10 < float(slices.mean()) < 10 and 0.1 < float(slices.std()) < 10


@pytest.mark.parametrize(("orientation_case", "axis"), [(0, 2), (1, 0), (3, 2)])
def test_slices_follow_each_case_acquisition(staged, orientation_case, axis):
    _root, plan, rows = staged
    row = rows[orientation_case]  # 0 axial, 1 sagittal (thick along R), 3 oblique axial
    slices, info = preprocess_volume(row["image"], plan, row["modality"])
    assert info.slice_axis == axis
    assert slices.shape[0] == row["shape"][2]  # one slice per acquired slice, never resampled


@pytest.mark.parametrize("shape", [(33, 37, 9), (40, 32, 12)])
def test_preprocess_then_restore_returns_the_original_grid(shape):
    """Labels pushed through the inference path and restored land on their original voxels."""
    rng = np.random.default_rng(0)
    label = np.zeros(shape, np.uint8)
    label[5:20, 6:25, 2:-2] = 1
    label[8:14, 10:18, 3:-3] = 2
    affine = np.diag([0.9, 0.9, 3.0, 1.0])
    affine[:3, 3] = rng.uniform(-10, 10, 3)
    plan = Plan(
        slice_axis=2,
        target_spacing=0.9,
        patch_size=48,
        normalization={"CT": {"scheme": "ct", "clip": [0.0, 200.0], "mean": 0.0, "std": 100.0}},
        labels=LABELS,
        class_weights=[1.0, 1.0, 1.0],
        crop_foreground=False,
    )
    slices, info = preprocess_volume(Volume(label.astype(np.float32) * 100, affine, "CT"), plan)
    pred = slices[:, 0].round().long()  # normalized value == label
    assert info.original_shape == shape
    assert np.array_equal(restore_labels(pred, info), label)


def test_body_mask_separates_body_from_air():
    img = np.full((20, 20, 4), -1000.0, np.float32)
    img[5:15, 5:15] = 40.0
    mask = body_mask(img)
    assert mask.sum() == 100 * 4 and mask[10, 10, 0] and not mask[0, 0, 0]
