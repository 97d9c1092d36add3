"""Export the U-Net with dynamic height and width (torch.export and ONNX)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.fx.experimental._config as fx_config

from unet_model.model import UNet

# Symbolic shapes specialise sizes of 1 by default, which would exclude 16 x 16 inputs (a 1 x 1
# bottleneck) and guard on facts about the padding that the solver cannot prove. Size-oblivious
# reasoning keeps the whole valid range, checked by tests at 16 x 16 and odd sizes.
_SIZE_OBLIVIOUS = {"backed_size_oblivious": True}


def _dynamic_shapes(model: UNet) -> dict[str, dict[int, object]]:
    # Any H, W >= 2**depth is valid; batch is dynamic too. The upper bound only keeps the
    # symbolic range finite.
    lo = model.config.min_size
    batch = torch.export.Dim("batch", min=1, max=4096)
    height = torch.export.Dim("height", min=lo, max=16384)
    width = torch.export.Dim("width", min=lo, max=16384)
    return {"x": {0: batch, 2: height, 3: width}}


def example_input(model: UNet, size: int = 64, batch: int = 2) -> torch.Tensor:
    """A small input of the model's channel count, for tracing."""
    return torch.randn(batch, model.config.in_channels, size, size)


def export_program(model: UNet) -> torch.export.ExportedProgram:
    """torch.export the model in eval mode with dynamic batch, H and W."""
    model = model.eval()
    with fx_config.patch(**_SIZE_OBLIVIOUS):
        return torch.export.export(model, (example_input(model),), dynamic_shapes=_dynamic_shapes(model))


def export_onnx(model: UNet, path: str | Path, opset: int = 18) -> Path:
    """Write an ONNX file with dynamic batch, H and W; input 'image', output 'logits'."""
    path = Path(path)
    model = model.eval()
    with fx_config.patch(**_SIZE_OBLIVIOUS):
        onnx_program = torch.onnx.export(
            model,
            (example_input(model),),
            input_names=["image"],
            output_names=["logits"],
            dynamic_shapes=_dynamic_shapes(model),
            opset_version=opset,
            dynamo=True,
            verbose=False,
        )
    onnx_program.save(str(path))
    return path
