"""The classic 2D U-Net, assembled from the parts in `unet_model.parts`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from unet_model.config import UNetConfig
from unet_model.parts import DoubleConv, Down, Head, Up


class UNet(nn.Module):
    """Encoder-decoder with skip connections; fully convolutional, no dense layer."""

    def __init__(self, config: UNetConfig | None = None) -> None:
        super().__init__()
        self.config = config or UNetConfig()
        c = self.config
        widths = c.widths()  # [base, 2 base, ..., 2**depth base]
        self.inc = DoubleConv(c.in_channels, widths[0], c.norm)
        self.downs = nn.ModuleList(Down(widths[i], widths[i + 1], c.norm) for i in range(c.depth))
        self.dropout = nn.Dropout2d(c.dropout) if c.dropout > 0 else nn.Identity()
        self.ups = nn.ModuleList(Up(widths[i + 1], widths[i], c.norm) for i in reversed(range(c.depth)))
        self.head = Head(widths[0], c.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C_in, H, W) image -> (N, num_classes, H, W) raw logits.

        H and W must each be at least 2**depth (16 at depth 4). Sizes that are not multiples
        of 2**depth are edge-padded (replicate) at the bottom and right up to the next multiple, and
        the logits are cropped back, so the output always matches the input's H x W.
        """
        c = self.config
        if x.dim() != 4:
            raise ValueError(f"UNet expects a 4D tensor (N, C, H, W), got shape {tuple(x.shape)}")
        _n, channels, height, width = x.shape
        if channels != c.in_channels:
            raise ValueError(f"UNet expects {c.in_channels} input channel(s), found {channels}")
        if height < c.min_size or width < c.min_size:
            raise ValueError(f"UNet of depth {c.depth} needs H and W >= {c.min_size}, got {height}x{width}")
        # Always pad (a zero-width pad is a cheap copy): branching on the size would stop
        # export with dynamic H and W.
        # Written as next-multiple minus size so symbolic shapes see H' = 2**depth * k.
        pad_h = c.min_size * ((height + c.min_size - 1) // c.min_size) - height
        pad_w = c.min_size * ((width + c.min_size - 1) // c.min_size) - width
        x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")  # (N, C_in, H', W'), multiples of 2**depth

        x = self.inc(x)  # level 0: (N, base, H', W')
        skips = [x]
        for down in self.downs:  # level i: (N, base * 2**i, H' / 2**i, W' / 2**i)
            x = down(x)
            skips.append(x)
        x = self.dropout(skips.pop())  # bottleneck: (N, base * 2**depth, H' / 2**depth, W' / 2**depth)
        for up in self.ups:  # back up one level per step, each taking its encoder's skip
            x = up(x, skips.pop())
        logits = self.head(x)  # (N, num_classes, H', W')
        return logits[:, :, :height, :width]  # crop the padding: (N, num_classes, H, W)
