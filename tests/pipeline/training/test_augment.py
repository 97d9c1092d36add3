import dataclasses

import numpy as np
import pytest
import torch
from monai.data import set_track_meta
from monai.transforms import Compose

from pipeline.config import PreprocessConfig
from pipeline.io.manifest import read_manifest
from pipeline.planning.plan import make_plan, plan_dataset
from pipeline.training.augment import FG_INDICES, SampleIndicesd, train_transforms
from pipeline.training.data import make_train_dataset
from tests.pipeline.ingest.staging_fixture import make_staging


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
            assert s["image"].shape == (plan.context_slices, plan.patch_size, plan.patch_size)
            assert s["label"].shape == (1, plan.patch_size, plan.patch_size)
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


@pytest.mark.parametrize(("balance", "max_indices"), [(True, 1000), (True, 37), (False, 1000)])
def test_foreground_centres_per_label_or_per_voxel(balance, max_indices):
    """A 2000-voxel organ around a 12-voxel lesion: balanced, half the foreground centres are the
    lesion's (its voxels repeated); per voxel, the lesion gets its 0.6 % share."""
    label = torch.zeros(1, 33, 37, 5, dtype=torch.int64)
    label[0, 2:27, 2:34, 1:4] = 1  # 25 * 32 * 3 = 2400 voxels, 12 of them lesion below
    label[0, 10:12, 10:12, 1:4] = 2
    fg = SampleIndicesd(max_indices=max_indices, balance_classes=balance)({"label": label})[FG_INDICES]
    values = label.reshape(-1)[torch.as_tensor(fg)]
    assert bool((values > 0).all())
    assert len(fg) <= max_indices
    lesion_share = float((values == 2).float().mean())
    if balance:
        assert lesion_share == 0.5 and set(fg[values.numpy() == 2]) == set(
            torch.nonzero(label.reshape(-1) == 2).reshape(-1).tolist()
        )
    else:
        assert lesion_share == pytest.approx(12 / 2400, abs=0.01)


def test_balanced_centres_of_a_label_map_without_foreground_are_empty():
    fg = SampleIndicesd(balance_classes=True)({"label": torch.zeros(1, 16, 16, 2, dtype=torch.int64)})[
        FG_INDICES
    ]
    assert fg.size == 0


@pytest.mark.parametrize("tracked", [True, False])
def test_sampling_and_augmentation_never_write_into_the_cache(staged, tracked):
    """make_train_dataset caches without copy (copy_cache=False): every random step must leave
    the cached volumes and indices as they were, with MONAI metadata tracked (loader thread) or
    not (loader workers)."""
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


# ---------------------------------------------------------------------------------------------
# 2.5-D context: the centre slice's label, the slice and its neighbours as the image's channels

A, B, S = 33, 37, 5  # odd in-plane sizes, five slices
Z_STEP = 10_000  # the image encodes each voxel's position: z * Z_STEP + x * 100 + y


def _random_part(k: int, pre: PreprocessConfig, samples: int) -> Compose:
    """train_transforms' steps from the cached volume on (after SliceAxisLastd), for a plan of `k`."""
    from tests.pipeline.planning.test_plan import _fp

    plan = make_plan(_fp([(1.0, 1.0, 2.0)] * 3, [(A, B, S)] * 3), PreprocessConfig(context_slices=k))
    plan = dataclasses.replace(plan, patch_size=16)
    steps = train_transforms(plan, pre, samples).transforms
    first = next(i for i, t in enumerate(steps) if isinstance(t, SampleIndicesd))
    tail = Compose(steps[first:])
    tail.set_random_state(0)
    return tail


def _volume(fg_slices: tuple[int, ...]) -> dict:
    """(1, A, B, S) image encoding positions; labels 1.. on `fg_slices` only, encoding x and y."""
    x, y, z = torch.meshgrid(torch.arange(A), torch.arange(B), torch.arange(S), indexing="ij")
    image = (z * Z_STEP + x * 100 + y).float()[None]
    label = torch.where(torch.isin(z, torch.tensor(fg_slices)), 1 + (x * 37 + y) % 250, 0)[None]
    return {"image": image, "label": label}


@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("fg_slices", [(0,), (S - 1,), (2,), (0, 2, S - 1)])
def test_a_sample_is_the_centre_slices_label_with_the_slice_and_its_neighbours_at_the_same_box(k, fg_slices):
    tail = _random_part(k, PreprocessConfig(augment=False, foreground_ratio=1.0), samples=4)
    for _ in range(3):
        for sample in tail(_volume(fg_slices)):
            image, label = sample["image"], sample["label"]
            assert image.shape == (k, 16, 16) and label.shape == (1, 16, 16)
            z = (image // Z_STEP).long()
            xy = image - z * Z_STEP  # the in-plane position, alike in every channel: one box
            assert all(torch.equal(xy[j], xy[k // 2]) for j in range(k))
            centre = int(z[k // 2, 0, 0])
            assert centre in fg_slices  # foreground oversampling picked the centre from the label
            for j in range(k):  # the neighbours, an edge slice repeated past the ends
                assert bool((z[j] == min(max(centre + j - k // 2, 0), S - 1)).all())
            x, y = (xy // 100).long(), (xy % 100).long()
            assert torch.equal(label[0], 1 + (x[0] * 37 + y[0]) % 250)  # the centre slice's label there


def test_spatial_augmentation_moves_a_slice_and_its_neighbours_alike():
    """Flips, rotation and scaling with one draw for all channels: channel differences of an image
    that changes by 7 per slice stay constant over the patch (noise and contrast off)."""
    pre = PreprocessConfig(flip_prob=1.0, noise_std=0.0, contrast_gamma=(1.0, 1.0), rotate_degrees=30)
    tail = _random_part(3, pre, samples=4)
    data = _volume((0, 2, S - 1))
    x, y = torch.meshgrid(torch.arange(A), torch.arange(B), indexing="ij")
    z = torch.arange(S)
    data["image"] = (z * 7.0 + (0.3 * x + 0.02 * y**2)[..., None])[None]
    for _ in range(5):
        for sample in tail(data):
            image = sample["image"]
            for j, allowed in ((0, (-7.0, 0.0)), (2, (0.0, 7.0))):
                diff = image[j] - image[1]
                assert float(diff.max() - diff.min()) < 1e-3
                assert min(abs(float(diff.mean()) - a) for a in allowed) < 1e-3
