"""The U-Net's building blocks, one per operation of the paper's figure."""

from __future__ import annotations

import torch
from torch import nn


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    return nn.Identity()


class DoubleConv(nn.Sequential):
    """3x3 conv -> norm -> ReLU, twice; padding 1 keeps H x W."""

    def __init__(self, in_channels: int, out_channels: int, norm: str) -> None:
        # A bias before a normalization is cancelled by its mean subtraction, so only
        # the un-normalized variant carries one.
        bias = norm == "none"
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=bias),
            _norm(norm, out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=bias),
            _norm(norm, out_channels),
            nn.ReLU(inplace=True),
        )


class Down(nn.Sequential):
    """2x2 max-pool (stride 2) -> double conv; halves H x W."""

    def __init__(self, in_channels: int, out_channels: int, norm: str) -> None:
        super().__init__(nn.MaxPool2d(kernel_size=2, stride=2), DoubleConv(in_channels, out_channels, norm))


class Up(nn.Module):
    """2x2 stride-2 transposed conv -> concat with the skip -> double conv; doubles H x W."""

    def __init__(self, in_channels: int, out_channels: int, norm: str) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, out_channels, kernel_size=2, stride=2)
        self.conv = DoubleConv(2 * out_channels, out_channels, norm)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up(x)  # (N, C_out, 2h, 2w), the same H x W as `skip`
        x = torch.cat([skip, x], dim=1)  # (N, 2 * C_out, 2h, 2w): skip first, as in the paper
        return self.conv(x)


class Head(nn.Conv2d):
    """1x1 conv mapping features to per-class logits."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__(in_channels, num_classes, kernel_size=1)
