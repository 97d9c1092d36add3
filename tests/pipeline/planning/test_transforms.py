import numpy as np
import pytest
import torch

from pipeline.config import PreprocessConfig
from pipeline.io.manifest import read_manifest
from pipeline.io.volume import Volume
from pipeline.planning.plan import Plan, plan_dataset
from pipeline.planning.transforms import body_mask, preprocess_volume, restore_labels, train_transforms
from tests.pipeline.staging_fixture import make_staging

LABELS = {"background": 0, "organ": 1, "lesion": 2}


@pytest.fixture(scope="module")
def staged(tmp_path_factory):
    root = make_staging(tmp_path_factory.mktemp("t"), n_cases=4, size=33)
    return root, plan_dataset(root), read_manifest(root, resolve=True)


@pytest.mark.parametrize("augment", [True, False])
def test_training_slices_are_patch_sized_and_labels_stay_integer(staged, augment):
    _root, plan, rows = staged
    transform = train_transforms(plan, PreprocessConfig(augment=augment), slices_per_volume=3)
    transform.set_random_state(0)
    for row in rows:  # axial, sagittal and oblique acquisitions
        samples = transform({"image": row["image"], "label": row["label"], "modality": row["modality"]})
        assert len(samples) == 3
        for s in samples:
            assert s["image"].shape == (1, plan.patch_size, plan.patch_size)
            assert plan.patch_size % 16 == 0
            assert s["image"].dtype == torch.float32 and s["label"].dtype == torch.int64
            assert set(torch.unique(s["label"]).tolist()) <= {0, 1, 2}


def test_foreground_oversampling_hits_labels(staged):
    _root, plan, rows = staged
    transform = train_transforms(plan, PreprocessConfig(augment=False, foreground_ratio=1.0), 4)
    transform.set_random_state(1)
    row = rows[0]
    samples = transform({"image": row["image"], "label": row["label"], "modality": row["modality"]})
    assert all(int((s["label"] > 0).sum()) > 0 for s in samples)


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


@pytest.mark.parametrize("tracked", [True, False])
def test_sampling_and_augmentation_never_write_into_the_cache(staged, tracked):
    """make_train_dataset caches without copy (copy_cache=False): every random step must leave
    the cached volumes and indices as they were, with MONAI metadata tracked (loader thread) or
    not (loader workers)."""
    from monai.data import set_track_meta

    from pipeline.data import make_train_dataset

    _root, plan, rows = staged
    pre = PreprocessConfig(flip_prob=1.0, noise_std=0.5, intensity_shift=1.0)
    transform = train_transforms(plan, pre, slices_per_volume=3)
    transform.set_random_state(0)
    items = [{"image": r["image"], "label": r["label"], "modality": r["modality"]} for r in rows]
    dataset = make_train_dataset(items, transform)
    before = [
        {k: (v.clone() if torch.is_tensor(v) else np.copy(v)) for k, v in c.items() if k != "modality"}
        for c in dataset._cache
    ]
    set_track_meta(tracked)
    try:
        for _ in range(10):
            for i in range(len(dataset)):
                dataset[i]
    finally:
        set_track_meta(True)
    for old, new in zip(before, dataset._cache, strict=True):
        for key, value in old.items():
            assert np.array_equal(np.asarray(value), np.asarray(new[key])), key
