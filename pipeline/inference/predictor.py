"""One volume through the network: preprocessed slices in batches, argmax'd, mapped back, cleaned up.

Each case is preprocessed with the model's own plan, its slices run through the network in
batches (with test-time mirroring, nnU-Net's default: the softmax of each slice and of its flips
averaged), argmax'd (uint8 labels, never a whole volume of float probabilities), mapped back to
the native grid and optionally post-processed per label (`predict_prepared`: the same path
validation during training scores).

A cross-validation model is one network here (`unet_model.ensemble.UNetEnsemble`): its output
is the log of its folds' mean softmax, so the softmax averaged over the mirrored views is the
mean over every fold and view before the argmax, with no code of its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import Any

import numpy as np
import torch

from pipeline.inference.model import ModelHandle, plan_of
from pipeline.inference.postprocess import postprocess
from pipeline.io.model_dir import LoadedModel
from pipeline.io.volume import Volume
from pipeline.planning.plan import context_indices
from pipeline.runtime import autocast, resolve_precision, to_input

# The in-plane axes of an (N, C, H, W) slice batch that test-time mirroring may flip.
MIRROR_DIMS = {"H": 2, "W": 3}


@dataclass(frozen=True)
class PredictOptions:
    """How to run the network and post-process its output."""

    batch_size: int = 16  # slices per forward pass
    largest_component: bool = False  # keep the largest connected component of each label
    fill_holes: bool = False  # fill enclosed background holes of each label
    precision: str = "auto"  # runtime.resolve_precision: bf16 autocast on CUDA, fp32 on CPU
    channels_last: bool = True
    mirror_axes: tuple[str, ...] = ("H", "W")  # in-plane axes flipped at test time (MIRROR_DIMS); (): none

    def __post_init__(self) -> None:
        # A tuple however it came (the batch record stores the options as JSON, lists included).
        object.__setattr__(self, "mirror_axes", tuple(self.mirror_axes))
        unknown = [a for a in self.mirror_axes if a not in MIRROR_DIMS]
        if unknown or len(set(self.mirror_axes)) != len(self.mirror_axes):
            raise ValueError(
                f"mirror_axes must be distinct axes among {sorted(MIRROR_DIMS)}; got {list(self.mirror_axes)}"
            )

    @classmethod
    def from_config(
        cls, infer: Any, *, batch_size: int | None = None, postprocess: bool | None = None
    ) -> PredictOptions:
        """The options of a config's infer section (`postprocess` overrides both clean-ups).

        Predict and validation during training both build their options here, so the champion
        gate scores what predict writes.
        """
        return cls(
            batch_size=batch_size or infer.batch_size,
            largest_component=infer.largest_component if postprocess is None else postprocess,
            fill_holes=infer.fill_holes if postprocess is None else postprocess,
            mirror_axes=tuple(infer.mirror_axes),
        )

    def mask_key(self) -> dict[str, Any]:
        """What changes the mask (part of the case key); the batch size and layout do not."""
        return {
            "largest_component": self.largest_component,
            "fill_holes": self.fill_holes,
            "precision": self.precision,
            "mirror_axes": list(self.mirror_axes),
        }


def segment_slices(
    model: torch.nn.Module,
    slices: torch.Tensor,
    *,
    device: torch.device,
    batch_size: int,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = True,
    mirror_axes: Sequence[str] = (),
    context: int = 1,
) -> torch.Tensor:
    """(S, C, H, W) normalized slices -> (S, H, W) uint8 argmax labels on the CPU.

    With `context` k > 1 (the plan's `context_slices`) the slices are one channel each and the
    network's input for slice i is slices i - (k-1)/2 .. i + (k-1)/2 as k channels, clamped at the
    volume's ends (`plan.context_indices`, the rule training samples by); they are stacked one
    chunk at a time, so the volume is never held k times.

    With `mirror_axes` (names of MIRROR_DIMS) the labels are the argmax of the mean softmax over
    the slices and their flips along every subset of those axes, each flip undone (nnU-Net's
    test-time mirroring: 2**len(mirror_axes) passes). The flipped copies of a slice share its
    forward pass, so a forward pass holds at most `batch_size` images whatever the mirroring.
    The model must be in eval mode. Only one batch of logits exists at a time: memory is
    bounded by the batch, not the volume.
    """
    dims = [MIRROR_DIMS[a] for a in mirror_axes]
    flips = [list(c) for r in range(len(dims) + 1) for c in combinations(dims, r)]  # [] first: as is
    n, channels, h, w = slices.shape
    if context > 1 and channels != 1:
        raise ValueError(f"a {context}-slice context stacks single-channel slices; got {channels} channels")
    step = max(1, batch_size // len(flips))  # slices per chunk
    per_pass = max(1, batch_size // step)  # flipped views of a chunk per forward pass
    out = torch.empty((n, h, w), dtype=torch.uint8)
    with torch.inference_mode():
        for start in range(0, n, step):
            x = to_input(_with_context(slices, start, start + step, context), device, channels_last)
            if len(flips) == 1:
                with autocast(device, amp_dtype):
                    labels = model(x).argmax(dim=1)
            else:
                probs = None  # (step, num_classes, H, W) float32: the sum of the un-flipped softmaxes
                for first in range(0, len(flips), per_pass):
                    group = flips[first : first + per_pass]
                    views = to_input(torch.cat([x.flip(f) if f else x for f in group]), device, channels_last)
                    with autocast(device, amp_dtype):
                        logits = model(views)
                    for f, part in zip(group, logits.float().softmax(dim=1).split(x.shape[0]), strict=True):
                        part = part.flip(f) if f else part
                        probs = part if probs is None else probs + part
                labels = probs.argmax(dim=1)
            out[start : start + x.shape[0]] = labels.to(torch.uint8).cpu()
    return out


def _with_context(slices: torch.Tensor, start: int, stop: int, context: int) -> torch.Tensor:
    """Slices start..stop-1 of (S, 1, H, W), each with its `context` neighbours as channels."""
    if context == 1:
        return slices[start:stop]
    n = slices.shape[0]
    index = torch.from_numpy(context_indices(range(start, min(stop, n)), n, context))  # (m, k)
    return slices[index.reshape(-1), 0].reshape(index.shape[0], context, *slices.shape[2:])


def predict_prepared(
    model: torch.nn.Module,
    slices: torch.Tensor,
    info: Any,
    options: PredictOptions,
    *,
    device: torch.device,
) -> np.ndarray:
    """Preprocessed slices (`planning.transforms.preprocess_volume`) -> post-processed uint8 labels on the
    original grid: the one prediction path of predict and of validation during training.

    `model` must be in eval mode on `device`.
    """
    from pipeline.planning.transforms import restore_labels  # MONAI: imported with the first volume

    labels = segment_slices(
        model,
        slices,
        device=device,
        batch_size=options.batch_size,
        amp_dtype=resolve_precision(options.precision, device),
        channels_last=options.channels_last,
        mirror_axes=options.mirror_axes,
        context=info.context_slices,
    )
    mask = restore_labels(labels, info)
    del labels
    if mask.shape != tuple(info.original_shape):  # restore_labels' contract; outputs rely on it
        raise RuntimeError(f"restored mask shape {mask.shape} != image shape {tuple(info.original_shape)}")
    return postprocess(mask, largest_component=options.largest_component, fill_holes=options.fill_holes)


def predict_volume(
    model: ModelHandle | LoadedModel,
    volume: Volume,
    options: PredictOptions | None = None,
    *,
    device: torch.device | None = None,
    prepared: tuple[torch.Tensor, Any] | None = None,
) -> np.ndarray:
    """A uint8 label map on `volume`'s own grid (same shape; its affine applies).

    `model` is a loaded model (`model_dir.load_model_dir`, or `load_model`'s handle) with its
    plan; its network is put in eval mode. `options` default to PredictOptions(); `device` to
    the network's. `prepared` is `preprocess_volume(volume, plan)` when already computed.
    """
    from pipeline.planning.transforms import preprocess_volume  # MONAI: imported with the first volume

    loaded = model.loaded if isinstance(model, ModelHandle) else model
    options = options or PredictOptions()
    net = loaded.model.eval()
    device = device or next(net.parameters()).device
    slices, info = prepared or preprocess_volume(volume, plan_of(loaded))
    if tuple(info.original_shape) != tuple(volume.shape):
        raise RuntimeError(f"preprocessed for shape {info.original_shape}, not the volume's {volume.shape}")
    return predict_prepared(net, slices, info, options, device=device)
