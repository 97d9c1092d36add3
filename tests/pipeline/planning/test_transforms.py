import numpy as np
import pytest
import torch

from pipeline.io.manifest import read_manifest
from pipeline.io.volume import Volume
from pipeline.planning.plan import Plan, plan_dataset
from pipeline.planning.transforms import (
    FOREGROUND_MARGIN,
    body_mask,
    crop_mask,
    preprocess_volume,
    restore_labels,
    zscore_mask,
)
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


def _mr_body(with_air: bool, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A magnitude MR-like volume: body tissue (250) with fat (700) along two sides and an organ
    (450), Rician noise; with air (the noise floor) round the body, or the same anatomy cut to
    the body (a field of view inside it). Returns (image, tissue: 0 air, 1 body, 2 organ, 3 fat)."""
    rng = np.random.default_rng(seed)
    tissue = np.zeros((64, 64, 12), np.uint8)
    tissue[12:52, 12:52] = 1
    tissue[12:52, 12:16] = tissue[12:52, 48:52] = 3
    tissue[26:38, 26:38] = 2
    level = np.array([0.0, 250.0, 450.0, 700.0], np.float32)[tissue]
    noise = rng.standard_normal((2, *tissue.shape)).astype(np.float32) * 15
    image = np.hypot(level + noise[0], noise[1])
    return (image, tissue) if with_air else (image[12:52, 12:52], tissue[12:52, 12:52])


@pytest.mark.parametrize("with_air", [True, False])
def test_the_body_z_score_mask_is_every_tissue_with_or_without_air(with_air):
    image, tissue = _mr_body(with_air)
    mask = np.asarray(zscore_mask(image, "body"))
    assert mask[tissue > 0].mean() > 0.999
    assert not with_air or mask[tissue == 0].mean() < 0.01
    assert isinstance(zscore_mask(torch.as_tensor(image), "body"), torch.Tensor)


def test_the_z_scored_body_does_not_depend_on_the_air_in_the_field_of_view():
    """The same anatomy with and without air round it must reach the network at the same values:
    Otsu's mask without air is the fat alone, and its z-score puts the body far off."""
    levels = {}
    for rule in ("body", "otsu"):
        for with_air in (True, False):
            image, tissue = _mr_body(with_air, seed=1)
            plan = Plan(
                slice_axis=2,
                target_spacing=1.0,
                patch_size=64,
                normalization={},
                labels=LABELS,
                class_weights=[1.0, 1.0, 1.0],
                crop_foreground=False,
                zscore_mask=rule,
            )
            slices, _ = preprocess_volume(Volume(image, np.eye(4), "MR"), plan)
            z = slices[:, 0].numpy().transpose(1, 2, 0)  # (S, H, W) -> the volume's (X, Y, Z)
            levels[rule, with_air] = [float(z[tissue == t].mean()) for t in (1, 2, 3)]
    assert np.allclose(levels["body", True], levels["body", False], atol=0.25)
    assert abs(levels["otsu", True][0] - levels["otsu", False][0]) > 1.0  # what the rule fixes


def test_an_image_with_negative_values_keeps_otsu_for_the_body_mask():
    image = np.full((20, 20, 4), -1000.0, np.float32)
    image[5:15, 5:15] = 40.0
    assert np.array_equal(zscore_mask(image, "body"), body_mask(image))
    with pytest.raises(ValueError, match="unknown z-score mask rule"):
        zscore_mask(image, "nonzero")


def _plan(rule: str) -> Plan:
    return Plan(
        slice_axis=2,
        target_spacing=1.0,
        patch_size=64,
        normalization={"CT": {"scheme": "ct", "clip": [-200.0, 200.0], "mean": 0.0, "std": 100.0}},
        labels=LABELS,
        class_weights=[1.0, 1.0, 1.0],
        crop_foreground=True,
        zscore_mask=rule,
        crop_mask=rule,
    )


def test_the_body_crop_keeps_a_ct_field_of_view_without_air_whole():
    """A CT reconstructed inside the body (no air): fat (-100) over a third of it, soft tissue
    (40) elsewhere. Nothing in it is background, so nothing may be cropped; Otsu's box was the
    soft tissue's, and the fat side (and whatever lay in it) was cut away and predicted empty."""
    rng = np.random.default_rng(0)
    image = np.full((60, 50, 8), 40.0, np.float32)
    image[:20] = -100.0
    image += rng.standard_normal(image.shape).astype(np.float32) * 10
    shapes = {}
    for rule in ("body", "otsu"):
        _, info = preprocess_volume(Volume(image, np.eye(4), "CT"), _plan(rule))
        shapes[rule] = info.spatial_shape
    assert shapes["body"] == image.shape
    assert shapes["otsu"][0] < image.shape[0]  # what the rule fixes: part of the fat side was cut


def test_stray_noise_in_the_air_does_not_stretch_the_body_crop():
    image, tissue = _mr_body(with_air=True, seed=2)
    image[1, 1, 2] = image[62, 60, 3] = image[3, 50, 7] = 600.0  # bright noise voxels far out in the air
    mask = np.asarray(crop_mask(image[None], "MR", "body"))[0]
    rows, cols, _ = np.nonzero(mask)
    body_rows, body_cols, _ = np.nonzero(tissue)
    assert (rows.min(), rows.max()) == (body_rows.min(), body_rows.max())
    assert (cols.min(), cols.max()) == (body_cols.min(), body_cols.max())
    _, info = preprocess_volume(Volume(image, np.eye(4), "MR"), _plan("body"))
    assert info.spatial_shape[:2] == (40 + 2 * FOREGROUND_MARGIN, 40 + 2 * FOREGROUND_MARGIN)
    with pytest.raises(ValueError, match="unknown crop mask rule"):
        crop_mask(image, "MR", "nonzero")


def test_a_few_slightly_negative_voxels_keep_the_body_rule():
    """Ringing, interpolation or -1 padding leave small negative values in magnitude images: the
    body rule must not fall back to Otsu's one-tissue mask for them."""
    image, tissue = _mr_body(with_air=False, seed=3)
    whole = np.asarray(zscore_mask(image, "body"))
    image[0, 0, 0] = -0.01
    image[5:9, 5:9, 0] = -1.0
    assert np.asarray(zscore_mask(image, "body"))[tissue > 0].mean() > 0.999
    assert whole[tissue > 0].mean() > 0.999


def test_the_crop_mask_is_never_empty_when_the_body_is_thin():
    """Planes dropped along different axes can together hold every voxel of thin structures."""
    image = np.zeros((1, 200, 400, 1), np.float32)
    image[0, 100, :200, 0] = 500.0  # a row
    image[0, :150, 300, 0] = 500.0  # a column
    mask = np.asarray(crop_mask(image, "MR", "body"))
    assert mask.any() and mask.shape == image.shape


def test_an_old_plan_crops_exactly_as_before():
    """Plans saved before `crop_mask` give MONAI's CropForegroundd on Otsu's mask, to the voxel."""
    from monai.data import MetaTensor
    from monai.transforms import CropForegroundd

    from pipeline.planning.transforms import PlanCropForegroundd

    rng = np.random.default_rng(4)
    image, tissue = _mr_body(with_air=True, seed=4)
    affine = np.diag([0.8, 0.8, 3.0, 1.0])
    affine[:3, 3] = rng.uniform(-20, 20, 3)
    data = {
        "image": MetaTensor(torch.as_tensor(image)[None], affine=affine),
        "label": MetaTensor(torch.as_tensor(tissue)[None], affine=affine),
        "modality": "MR",
    }
    before = CropForegroundd(
        ["image", "label"], source_key="image", select_fn=body_mask, margin=4, allow_smaller=True
    )(dict(data))
    after = PlanCropForegroundd(["image", "label"], _plan("otsu"))(dict(data))
    for key in ("image", "label"):
        assert torch.equal(after[key].as_tensor(), before[key].as_tensor())
        assert np.allclose(np.asarray(after[key].affine), np.asarray(before[key].affine))
