"""Training samples: random 2D slices of the cached, planned volumes, augmented.

After the plan's deterministic chain (`pipeline.planning.transforms.geometry_transforms`, cached),
training moves each case's slice axis last and samples 2D slices with foreground oversampling
(RandCropByPosNegLabeld with a (patch, patch, 1) box, from cached centre indices) and, for the
plan's 2.5-D context, the same box of each slice's neighbours as input channels (the label is the
centre slice's); it stacks each volume's slices so one augmentation draw serves them together
(every spatial one alike on a slice and its neighbours), augments them (flips,
rotation/scaling, noise, contrast, intensity shift) and pads them to the patch size (a multiple
of 16). Validation and inference never run these: they take whole volumes through
`preprocess_volume`.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import (
    CastToTyped,
    Compose,
    MapTransform,
    RandAdjustContrastd,
    RandAffined,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandGaussianNoised,
    Randomizable,
    RandShiftIntensityd,
    SelectItemsd,
    SpatialCrop,
    SpatialPadd,
)

from pipeline.planning.plan import Plan, context_indices
from pipeline.planning.transforms import IMAGE, LABEL, SLICE_AXIS_KEY, geometry_transforms


class SliceAxisLastd(MapTransform):
    """Move each case's slice axis to the last spatial position (plain tensors: training only)."""

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        axis = int(d[SLICE_AXIS_KEY])
        for key in self.key_iterator(d):
            x = d[key].as_tensor() if isinstance(d[key], MetaTensor) else torch.as_tensor(d[key])
            d[key] = x.movedim(1 + axis, -1).contiguous()  # (C, a, b, slices)
        return d


FG_INDICES, BG_INDICES = "label_fg_indices", "label_bg_indices"


class SampleIndicesd(MapTransform):
    """Cache where slice centres may be drawn: flat foreground and background voxel indices.

    RandCropByPosNegLabeld otherwise scans the whole label volume on every call. Each list holds
    at most `max_indices` entries, a uniform random subset drawn with a seed from the volume's
    shape and label count (the cached value is the same on every run), so a 512 x 512 x 600 case
    caches 2 x 1.6 MB rather than 1.3 GB of int64 indices. With `balance_classes`, the foreground
    list holds the same number of entries of every label present (a label's voxels repeated when
    it has fewer), so a uniform draw from it picks each label equally often, whatever its size;
    without, a uniform subset samples centres with the distribution of the full list.
    """

    def __init__(
        self, label_key: str = LABEL, max_indices: int = 200_000, balance_classes: bool = False
    ) -> None:
        super().__init__([label_key])
        self.label_key, self.max_indices, self.balance_classes = label_key, max_indices, balance_classes

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        label = d[self.label_key]
        flat = (label.as_tensor() if isinstance(label, MetaTensor) else torch.as_tensor(label)).reshape(-1)
        fg = flat > 0
        seed = int(flat.numel()) * 1_000_003 + int(fg.sum())
        rng = np.random.default_rng(seed % 2**63)
        d[FG_INDICES] = (
            self._balanced(flat, rng) if self.balance_classes else self._subset(torch.nonzero(fg), rng)
        )
        d[BG_INDICES] = self._subset(torch.nonzero(~fg), rng)
        return d

    def _subset(self, found: torch.Tensor, rng: np.random.Generator) -> np.ndarray:
        """The flat indices of `found` (nonzero's output), at most max_indices of them, sorted."""
        idx = found.reshape(-1).numpy()
        if idx.size > self.max_indices:
            idx = np.sort(rng.choice(idx, self.max_indices, replace=False))
        return idx

    def _balanced(self, flat: torch.Tensor, rng: np.random.Generator) -> np.ndarray:
        """Equal shares of every foreground label's indices (with repeats for the smaller ones)."""
        values = [int(v) for v in torch.unique(flat) if int(v) > 0]
        if not values:
            return np.zeros(0, dtype=np.int64)
        per_label = [torch.nonzero(flat == v).reshape(-1).numpy() for v in values]
        share = min(self.max_indices // len(values), max(idx.size for idx in per_label))
        parts = [
            rng.choice(idx, share, replace=False)
            if idx.size >= share
            else np.concatenate([idx, rng.choice(idx, share - idx.size)])  # every voxel, then repeats
            for idx in per_label
        ]
        return np.sort(np.concatenate(parts))


class RandSlicesd(Randomizable, MapTransform):
    """Sample `num_samples` 2D slices of one cached volume with their 2.5-D context, stacked as
    channels: image (num_samples * context, h, w), label (num_samples, h, w).

    MONAI's RandCropByPosNegLabeld draws the slice centres (foreground oversampling from the
    cached indices of SampleIndicesd) and crops the label there; the image is cut at the same
    in-plane box (MONAI's SpatialCrop of the same centre) from the centre slice and its neighbours
    (`plan.context_indices`: the predictor's rule, edge slices repeated), so sample i's image is
    channels i*context .. (i+1)*context - 1 with the centre slice in the middle. Stacking lets each
    augmentation below run once per volume visit instead of once per slice, with one random draw
    shared by the volume's slices and their neighbours (every visit draws anew). Per-slice MONAI
    calls cost more CPU than the training step can spare on a small CPU; SplitSamplesd makes
    single samples again at the end.
    """

    def __init__(
        self, keys: Sequence[str], patch: int, pos_ratio: float, num_samples: int, context: int = 1
    ) -> None:
        super().__init__(keys)
        self.size, self.context = (patch, patch, 1), context
        self.crop = RandCropByPosNegLabeld(
            [LABEL],
            label_key=LABEL,
            spatial_size=self.size,
            pos=pos_ratio,
            neg=1.0 - pos_ratio,
            num_samples=num_samples,
            fg_indices_key=FG_INDICES,
            bg_indices_key=BG_INDICES,
            allow_smaller=True,
        )

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None):
        self.crop.set_random_state(seed, state)
        return self

    def randomize(self, data: Any = None) -> None:  # the crop draws its own centres
        pass

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        image = torch.as_tensor(data[IMAGE])  # (1, a, b, slices): SliceAxisLastd's plain tensor
        # Without the image: the crop deep-copies every key it does not crop, once per sample.
        samples = self.crop({k: v for k, v in data.items() if k != IMAGE})
        d = {k: v for k, v in samples[0].items() if k not in (FG_INDICES, BG_INDICES)}
        label = torch.cat([torch.as_tensor(s[LABEL])[..., 0] for s in samples])  # (n, h, w)
        d[LABEL] = label.as_tensor() if isinstance(label, MetaTensor) else label
        parts = []
        for centre in self.crop.cropper.centers:
            box = SpatialCrop(roi_center=centre, roi_size=self.size).slices[:2]  # the label's box
            z = context_indices([int(centre[2])], image.shape[-1], self.context)[0]
            parts.append(image[(slice(None), *box)][..., torch.from_numpy(z)].movedim(-1, 1).flatten(0, 1))
        d[IMAGE] = torch.cat(parts)  # (n * context, h, w)
        return d


class SplitSamplesd(MapTransform):
    """(n * c, h, w) stacks -> n samples of (c, h, w) per key (c: the context for the image, 1 for
    the label). MONAI's SplitDimd splits into single channels only."""

    def __init__(self, keys: Sequence[str], num_samples: int) -> None:
        super().__init__(keys)
        self.num_samples = num_samples

    def __call__(self, data: Mapping[Hashable, Any]) -> list[dict[Hashable, Any]]:
        d = dict(data)
        parts = {key: d[key].chunk(self.num_samples) for key in self.key_iterator(d)}
        return [{**d, **{key: chunks[i] for key, chunks in parts.items()}} for i in range(self.num_samples)]


def train_transforms(plan: Plan, preprocess: Any, slices_per_volume: int) -> Compose:
    """Cached geometry chain, then random 2D slice sampling and augmentation (see module docstring)."""
    p = plan.patch_size
    steps = [
        *geometry_transforms(plan),
        SliceAxisLastd([IMAGE, LABEL]),
        SampleIndicesd(LABEL, balance_classes=preprocess.balance_classes),  # the last cached step
        # (slices_per_volume * context, h, w) images, (slices_per_volume, h, w) labels
        RandSlicesd(
            [IMAGE, LABEL], p, float(preprocess.foreground_ratio), slices_per_volume, plan.context_slices
        ),
    ]
    if preprocess.augment:
        rad = float(np.deg2rad(preprocess.rotate_degrees))
        scale = float(preprocess.scale_range)
        steps += [
            RandFlipd([IMAGE, LABEL], prob=preprocess.flip_prob, spatial_axis=0),
            RandFlipd([IMAGE, LABEL], prob=preprocess.flip_prob, spatial_axis=1),
            RandAffined(
                [IMAGE, LABEL],
                prob=0.5,
                rotate_range=(rad,),
                scale_range=(scale, scale),
                mode=("bilinear", "nearest"),
                padding_mode="border",
            ),
            RandGaussianNoised([IMAGE], prob=0.15, std=preprocess.noise_std),
            RandAdjustContrastd([IMAGE], prob=0.15, gamma=tuple(preprocess.contrast_gamma)),
            RandShiftIntensityd([IMAGE], prob=0.15, offsets=preprocess.intensity_shift),
        ]
    steps += [
        # Pad to the patch (a multiple of 16): edge values for the image, background for labels.
        SpatialPadd([IMAGE], spatial_size=(p, p), mode="replicate"),
        SpatialPadd([LABEL], spatial_size=(p, p), mode="constant"),
        CastToTyped([IMAGE, LABEL], dtype=(torch.float32, torch.int64)),
        SelectItemsd([IMAGE, LABEL]),  # a batch is two tensors: each more costs the workers a copy
        SplitSamplesd([IMAGE, LABEL], slices_per_volume),  # samples of (context, h, w) and (1, h, w)
    ]
    return Compose(steps)
