"""The classic 2D U-Net in pure PyTorch: the network alone, nothing of the pipeline."""

from unet_model.config import UNetConfig
from unet_model.model import UNet

__all__ = ["UNet", "UNetConfig", "count_parameters"]


def count_parameters(model: "UNet") -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
