"""MONAI dictionary transforms from a staged NIfTI volume to normalized 2D slices.

One deterministic chain (`geometry_transforms`) is shared by training, validation and inference:

    LoadImaged -> EnsureChannelFirstd -> Orientationd(RAS) -> PlanSpacingd (in-plane only)
    -> PlanCropForegroundd (body box) -> PlanNormalized

Training then samples random 2D slices of the cached result and augments them
(`pipeline.training.augment`). Validation and inference call `preprocess_volume`, which runs the
same chain on a whole volume and returns every slice plus what `restore` needs to map
predictions back onto the original grid.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    CropForegroundd,
    EnsureChannelFirstd,
    LoadImaged,
    MapTransform,
    Orientationd,
    Spacing,
    SpatialResample,
)

from pipeline.io.volume import Volume
from pipeline.planning.plan import Plan

IMAGE, LABEL = "image", "label"
SLICE_AXIS_KEY = "slice_axis"  # per-case RAS axis the slices are taken across (set by PlanSpacingd)
FOREGROUND_MARGIN = 4  # voxels kept around the body box
# Share of a non-negative image's 99.5th percentile below which a voxel counts as background for
# the "body" z-score mask: MR's noise floor is a few percent of its tissues' signal (SNR >= 20).
BACKGROUND_FLOOR = 0.1
NEGATIVE_SLACK = 0.01  # negative values down to this share of the 99.5th percentile: still "no signal"
# CT: air (-1000) below, soft tissue, fat and bone above; lung (-700 to -900) and gas fall below,
# but inside the body wall, whose box holds them.
AIR_HU = -500.0
# A crop box plane must hold at least this share of the fullest plane's mask voxels: stray noise
# voxels in the air (a few per plane) do not stretch the box, anatomy (hundreds) does.
CROP_PLANE_SHARE = 0.01


def _otsu_threshold(values: np.ndarray) -> float | None:
    """Otsu's threshold of `values` (256 bins), or None when they are all equal."""
    flat = values.reshape(-1).astype(np.float64)
    lo, hi = float(flat.min()), float(flat.max())
    if hi <= lo:
        return None
    hist, edges = np.histogram(flat, bins=256, range=(lo, hi))
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centers) / np.maximum(w0, 1)
    m1 = (np.sum(hist * centers) - np.cumsum(hist * centers)) / np.maximum(w1, 1)
    return float(centers[int(np.argmax(w0 * w1 * (m0 - m1) ** 2))])


def _as_input_type(mask: np.ndarray, image: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
    return torch.as_tensor(mask) if isinstance(image, torch.Tensor) else mask


def _numpy(image: torch.Tensor | np.ndarray) -> np.ndarray:
    return image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)


def body_mask(image: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
    """Voxels above the Otsu threshold of the image: the body, without the air or MR background.

    Used for the foreground crop (and, in plans from before `zscore_mask`, for the per-case
    z-score). Otsu's threshold sits between the image's two largest intensity classes: air and
    tissue when the image has air round the body, so its bounding box is the body's, and noise
    in the air stays below it. Our own lines because MONAI has no Otsu transform and
    scikit-image is not a dependency.
    """
    values = _numpy(image)
    threshold = _otsu_threshold(values)
    mask = np.ones_like(values, dtype=bool) if threshold is None else values > threshold
    return _as_input_type(mask, image)


def zscore_mask(image: torch.Tensor | np.ndarray, rule: str = "body") -> torch.Tensor | np.ndarray:
    """The voxels a per-case z-score takes its mean and std from, by the plan's `zscore_mask` rule.

    "otsu": `body_mask`. Where the image has little or no air (a field of view inside the body,
    a thin coronal slab, a crop), its two largest classes are tissues, and Otsu's mask is the
    brighter tissue alone: its std is that of one tissue's noise, so the z-scored body lies 5
    standard deviations below zero in one case and 1.5 in the next, and a model sees a case unlike
    any it was trained on (a demo MR slab came out black but for its fat and was segmented empty).
    "body": for images whose zero means no signal (MR magnitude, PET, ...: the 0.5th percentile
    not below -1 % of the 99.5th, so ringing, interpolation or -1 padding do not count), every
    voxel above the lower of Otsu's threshold and a tenth of the 99.5th percentile: the background
    (air, the noise floor) lies below both, every tissue above the latter, so the mask is the
    whole body whether or not the image has air. Other images keep Otsu's mask (no known floor).
    """
    if rule == "otsu":
        return body_mask(image)
    if rule != "body":
        raise ValueError(f"unknown z-score mask rule {rule!r}")
    values = _numpy(image)
    threshold = _otsu_threshold(values)
    if threshold is None:
        return _as_input_type(np.ones_like(values, dtype=bool), image)
    low, high = (float(v) for v in np.percentile(values, [0.5, 99.5]))
    if high > 0.0 and low >= -NEGATIVE_SLACK * high:
        threshold = min(threshold, BACKGROUND_FLOOR * high)
    return _as_input_type(values > threshold, image)


def crop_mask(
    image: torch.Tensor | np.ndarray, modality: str | None = None, rule: str = "body"
) -> torch.Tensor | np.ndarray:
    """The mask whose bounding box the foreground crop keeps, by the plan's `crop_mask` rule.

    "otsu": `body_mask`. Its box loses anatomy where Otsu's mask is one tissue (a field of view
    with little air): whatever lies outside that tissue's box is cropped away and predicted
    background, with no error. "body": CT voxels above -500 HU (`AIR_HU`: air, and lung or gas
    inside the body wall, whose box holds them, lie below), other modalities `zscore_mask`'s
    body; then only the planes (along each axis) holding at least
    `CROP_PLANE_SHARE` of the fullest plane's voxels, so stray noise in the air does not stretch
    the box. `image` may carry a leading channel axis (as MONAI's crop passes it).
    """
    if rule == "otsu":
        return body_mask(image)
    if rule != "body":
        raise ValueError(f"unknown crop mask rule {rule!r}")
    values = _numpy(image)
    mask = values > AIR_HU if str(modality or "").upper() == "CT" else np.asarray(zscore_mask(values, "body"))
    spatial = mask.any(axis=0) if mask.ndim == 4 else mask
    if not spatial.any():
        return _as_input_type(np.ones_like(values, dtype=bool), image)
    keep = np.ones_like(spatial)
    for axis in range(spatial.ndim):
        others = tuple(a for a in range(spatial.ndim) if a != axis)
        counts = spatial.sum(axis=others)
        planes = counts >= max(1.0, CROP_PLANE_SHARE * float(counts.max()))
        keep &= np.expand_dims(planes, others)
    kept = mask & (keep[None] if mask.ndim == 4 else keep)
    # Planes dropped along different axes can together hold every voxel (thin structures): then
    # the unfiltered mask, never an empty box.
    return _as_input_type(kept if kept.any() else mask, image)


class PlanCropForegroundd(MapTransform):
    """MONAI's CropForegroundd with the plan's crop mask for the case's modality (key `modality`).

    CropForegroundd's `select_fn` sees the image alone, and the mask depends on the modality
    (CT's air is a known value), so the transform is made per call. Not invertible through MONAI
    (nor is PlanSpacingd): predictions go back to the source grid by the affines (`restore`).
    """

    def __init__(self, keys: Sequence[str], plan: Plan) -> None:
        super().__init__(keys)
        self.plan = plan

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        modality = str(data.get("modality", "unknown"))
        rule = self.plan.crop_mask
        crop = CropForegroundd(
            self.keys,
            source_key=IMAGE,
            select_fn=lambda image: crop_mask(image, modality, rule),
            margin=FOREGROUND_MARGIN,
            allow_smaller=True,
        )
        return dict(crop(data))


def _spacing_of(img: MetaTensor) -> np.ndarray:
    affine = np.asarray(img.affine, dtype=np.float64)
    return np.linalg.norm(affine[:3, :3], axis=0)


class PlanSpacingd(MapTransform):
    """Resample in-plane to the plan's spacing; the slice axis keeps its own spacing.

    MONAI's Spacingd takes one fixed pixdim; here the slice axis (and so which entry stays
    unchanged) is decided per case from its spacing (`Plan.case_slice_axis`), so the pixdim is
    built per call. Images are bilinear, labels nearest. Stores the axis under `slice_axis`.
    """

    def __init__(self, keys: Sequence[str], plan: Plan, allow_missing_keys: bool = True) -> None:
        super().__init__(keys, allow_missing_keys)
        self.plan = plan

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        spacing = _spacing_of(d[IMAGE])
        axis = self.plan.case_slice_axis(spacing)
        pixdim = [self.plan.target_spacing] * 3
        pixdim[axis] = float(spacing[axis])
        for key in self.key_iterator(d):
            mode = "nearest" if key == LABEL else "bilinear"
            d[key] = Spacing(pixdim=pixdim, mode=mode, padding_mode="border")(d[key])
        d[SLICE_AXIS_KEY] = axis
        return d


class PlanNormalized(MapTransform):
    """The plan's intensity normalization for the case's modality (key `modality`).

    MONAI's ScaleIntensityRangePercentilesd computes percentiles per image, and
    NormalizeIntensityd has no clip step, so neither gives nnU-Net's CT scheme (clip to the
    dataset's foreground percentiles, z-score with the dataset's foreground statistics).
    Other modalities: z-score with the mean and std of the case's body (`zscore_mask`, the plan's rule).
    """

    def __init__(self, keys: Sequence[str], plan: Plan) -> None:
        super().__init__(keys)
        self.plan = plan

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        norm = self.plan.normalization_for(str(d.get("modality", "unknown")))
        for key in self.key_iterator(d):
            img = d[key].float()
            if norm["scheme"] == "ct":
                lo, hi = norm["clip"]
                img = (img.clamp(lo, hi) - norm["mean"]) / norm["std"]
            else:
                mask = zscore_mask(img, self.plan.zscore_mask)
                # Two voxels at least: one has no std (NaN), and the clamp below keeps NaN.
                fg = img[mask] if int(mask.sum()) >= 2 else img.reshape(-1)
                img = (img - fg.mean()) / fg.std().clamp_min(1e-6)
            d[key] = img
        return d


def geometry_transforms(plan: Plan, keys: Sequence[str] = (IMAGE, LABEL), load: bool = True) -> list:
    """The deterministic chain shared by training, validation and inference."""
    keys = list(keys)
    steps: list = []
    if load:
        steps += [LoadImaged(keys, image_only=True), EnsureChannelFirstd(keys)]
    steps += [Orientationd(keys, axcodes="RAS", labels=None), PlanSpacingd(keys, plan)]
    if plan.crop_foreground:
        steps.append(PlanCropForegroundd(keys, plan))
    steps.append(PlanNormalized([IMAGE], plan))
    return steps


# --------------------------------------------------------------------------------------------
# Whole volumes: validation and inference


@dataclass(frozen=True)
class PreprocessInfo:
    """What `restore` needs to map slice predictions back to the original voxel grid."""

    slice_axis: int  # RAS axis of the preprocessed volume the slices were taken across
    affine: np.ndarray  # (4, 4) voxel -> RAS mm of the preprocessed volume
    spatial_shape: tuple[int, int, int]  # preprocessed volume (RAS order)
    original_affine: np.ndarray  # (4, 4) of the input volume
    original_shape: tuple[int, int, int]
    context_slices: int = 1  # the plan's: the network's input is each slice with its neighbours


def preprocess_volume(
    volume: Volume | str | Path, plan: Plan, modality: str | None = None
) -> tuple[torch.Tensor, PreprocessInfo]:
    """Run the shared chain on a whole volume: (slices (S, 1, H, W) float32, restore info).

    `volume` is a `Volume` or a NIfTI path; `modality` defaults to the Volume's (CT, MR, ...) and
    must be given for paths. Slices are not padded: the U-Net pads any H, W >= 16 internally.
    The info carries the plan's `context_slices`: the predictor stacks each slice's neighbours
    from it (one channel per slice here, so the volume is held once).
    """
    if isinstance(volume, Volume):
        modality = modality or volume.modality
        img = MetaTensor(
            torch.as_tensor(np.asarray(volume.data, dtype=np.float32))[None], affine=volume.affine
        )
        data = {IMAGE: img, "modality": modality}
        chain = Compose(geometry_transforms(plan, keys=[IMAGE], load=False))
    else:
        if modality is None:
            raise ValueError(f"preprocess_volume({volume}): pass the modality for a path input")
        data = {IMAGE: str(volume), "modality": modality}
        chain = Compose(geometry_transforms(plan, keys=[IMAGE], load=True))
    out = chain(data)
    image: MetaTensor = out[IMAGE]
    original_affine = np.asarray(
        volume.affine if isinstance(volume, Volume) else image.meta["original_affine"], dtype=np.float64
    )
    original_shape = (
        volume.shape if isinstance(volume, Volume) else tuple(int(s) for s in image.meta["spatial_shape"])
    )
    axis = int(out[SLICE_AXIS_KEY])
    slices = image.as_tensor().movedim(1 + axis, 0).float().contiguous()  # (S, 1, H, W)
    info = PreprocessInfo(
        slice_axis=axis,
        affine=np.asarray(image.affine, dtype=np.float64),
        spatial_shape=tuple(int(s) for s in image.shape[1:]),  # type: ignore[arg-type]
        original_affine=original_affine,
        original_shape=tuple(int(s) for s in original_shape),  # type: ignore[arg-type]
        context_slices=plan.context_slices,
    )
    return slices, info


def restore(slices_out: torch.Tensor, info: PreprocessInfo, mode: str = "nearest") -> torch.Tensor:
    """Per-slice outputs (S, C, H, W) -> (C, I, J, K) on the original grid (resampled by affines).

    Use mode "nearest" for label maps and "bilinear" for probabilities; voxels outside the
    foreground crop come back as 0 (background).
    """
    vol = slices_out.movedim(0, 1 + info.slice_axis).float()  # (C, X, Y, Z) preprocessed grid
    src = MetaTensor(vol, affine=torch.as_tensor(info.affine))
    out = SpatialResample(mode=mode, padding_mode="zeros")(
        src, dst_affine=torch.as_tensor(info.original_affine), spatial_size=info.original_shape
    )
    return out.as_tensor() if isinstance(out, MetaTensor) else out


def restore_labels(labels: torch.Tensor | np.ndarray, info: PreprocessInfo) -> np.ndarray:
    """Slice label maps (S, H, W) -> uint8 label volume on the original grid (nearest neighbour;
    outside the preprocessed extent: 0)."""
    labels = torch.as_tensor(labels)
    fast = _restore_axis_aligned(labels, info)
    if fast is not None:
        return fast
    out = restore(labels[:, None].float(), info, mode="nearest")[0]
    return out.round().to(torch.uint8).numpy()


def _restore_axis_aligned(labels: torch.Tensor, info: PreprocessInfo) -> np.ndarray | None:
    """`restore_labels` by index lookup when each original axis maps onto one preprocessed axis
    (the preprocessing only reorients, rescales and crops: the usual case), else None.

    Why not SpatialResample here: it builds a float32 sampling grid of 3 coordinates per output
    voxel (12 bytes, plus the float copy of the labels), about 16x the uint8 mask's memory on a
    large volume; the lookup below allocates the uint8 output and three index vectors. Same
    convention: voxel centres map through inv(preprocessed affine) @ original affine to the
    nearest preprocessed voxel. Exact ties (x.5, common with spacings like 0.7 -> 0.8 mm) go to
    the higher index: coordinates are snapped to 1e-6 voxel first so float error cannot decide
    them (SpatialResample's float32 grid decides them either way, by rounding error).
    """
    m = np.linalg.inv(info.affine) @ info.original_affine  # original voxel -> preprocessed voxel
    lin = m[:3, :3]
    big = np.abs(lin) > 1e-6 * max(float(np.abs(lin).max()), 1e-12)
    if not ((big.sum(axis=0) == 1).all() and (big.sum(axis=1) == 1).all()):
        return None  # a rotation between the grids: sample with MONAI
    vol = labels.to(torch.uint8).movedim(0, info.slice_axis).numpy()  # (X, Y, Z) preprocessed grid
    src_axis = [int(np.flatnonzero(big[:, i])[0]) for i in range(3)]  # original axis i <- this one
    vol = vol.transpose(src_axis)
    index, inside = [], []
    for i, n in enumerate(info.original_shape):
        j = src_axis[i]
        exact = np.round(lin[j, i] * np.arange(n, dtype=np.float64) + m[j, 3], 6)
        coord = np.floor(exact + 0.5).astype(np.int64)
        ok = (coord >= 0) & (coord < vol.shape[i])
        index.append(np.where(ok, coord, 0))
        inside.append(ok)
    out = vol[np.ix_(*index)]
    for i, ok in enumerate(inside):
        if not ok.all():
            out[(slice(None),) * i + (~ok,)] = 0
    return np.ascontiguousarray(out, dtype=np.uint8)
