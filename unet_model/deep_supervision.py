"""Deep supervision for training: auxiliary 1x1 heads on the U-Net's lower decoder levels.

nnU-Net trains its U-Net with a segmentation head on the decoder's levels and a loss summed over
targets downsampled to each level's size, weighted 1/2**level and normalised, the lowest level
left out; the extra heads are dropped afterwards. `DeepSupervision` wraps the classic `UNet`
without changing it: while the wrapper runs, forward hooks on the decoder steps hand their outputs
to the auxiliary heads, and they are removed again before it returns. `wrapper.unet` stays exactly
the classic network (its forward, its state_dict): that is what is exported and registered.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import torch
from torch import nn

from unet_model.model import UNet
from unet_model.parts import Head


def level_weights(depth: int) -> list[float]:
    """Loss weights of decoder levels 0 (full resolution), 1, ...: 1/2**level over the `depth`
    levels, the lowest one off, normalised to sum 1; trailing zero weights dropped (no head)."""
    weights = [1.0 / 2**level for level in range(depth)]
    if depth > 1:
        weights[-1] = 0.0
    total = sum(weights)
    return [w / total for w in weights if w > 0]


class DeepSupervision(nn.Module):
    """The classic U-Net plus a 1x1 head on each supervised decoder level below the top."""

    def __init__(self, unet: UNet) -> None:
        super().__init__()
        self.unet = unet
        c = unet.config
        self.weights = level_weights(c.depth)  # level 0 is the U-Net's own head
        widths = c.widths()
        self.aux_heads = nn.ModuleList(
            Head(widths[level], c.num_classes) for level in range(1, len(self.weights))
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(N, C_in, H, W) -> [the U-Net's logits (N, num_classes, H, W), then for level l = 1, 2, ...
        logits (N, num_classes, ceil(H / 2**l), ceil(W / 2**l))], as `downsample_target` sizes targets."""
        height, width = x.shape[-2:]
        depth = self.unet.config.depth
        features: dict[int, torch.Tensor] = {}

        def keep(level: int, _module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
            features[level] = output

        # Decoder step j brings the features up to level depth - 1 - j.
        handles = [
            up.register_forward_hook(partial(keep, depth - 1 - j))
            for j, up in enumerate(self.unet.ups)
            if 1 <= depth - 1 - j < len(self.weights)
        ]
        try:
            logits = self.unet(x)
        finally:
            for handle in handles:
                handle.remove()
        outputs = [logits]
        for level, head in enumerate(self.aux_heads, start=1):
            h, w = -(-height // 2**level), -(-width // 2**level)  # ceil: the padded U crops back to these
            outputs.append(head(features[level])[:, :, :h, :w])
        return outputs


def downsample_target(target: torch.Tensor, level: int) -> torch.Tensor:
    """A label map (N, 1, H, W) at level `level`: every 2**level-th pixel (nearest), ceil(H / 2**level)."""
    step = 2**level
    return target[..., ::step, ::step]


class DeepSupervisionLoss(nn.Module):
    """sum_l weights[l] * loss(outputs[l], target at level l); a single tensor is level 0 alone."""

    def __init__(self, loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], weights: Sequence[float]):
        super().__init__()
        self.loss = loss
        self.weights = list(weights)

    def forward(self, outputs: torch.Tensor | Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        if isinstance(outputs, torch.Tensor):
            outputs = [outputs]
        if len(outputs) != len(self.weights):
            raise ValueError(f"{len(outputs)} outputs for {len(self.weights)} level weights")
        # the loss in fp32 whatever the autocast dtype of the logits
        terms = [
            w * self.loss(out.float(), downsample_target(target, level))
            for level, (w, out) in enumerate(zip(self.weights, outputs, strict=True))
        ]
        return torch.stack(terms).sum()
