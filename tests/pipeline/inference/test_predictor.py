"""Test-time mirroring in the predictor: the mean softmax over the flipped passes, each flip undone."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch import nn

from pipeline.config import PipelineConfig
from pipeline.inference.predictor import MIRROR_DIMS, PredictOptions, segment_slices

CPU = torch.device("cpu")
NUM_CLASSES = 3


def _symmetric_model() -> nn.Module:
    """Flip-equivariant along H and W: a 3x3 convolution whose kernels are symmetric both ways."""
    torch.manual_seed(0)
    conv = nn.Conv2d(1, NUM_CLASSES, 3, padding=1)
    with torch.no_grad():
        w = conv.weight
        conv.weight.copy_((w + w.flip(2) + w.flip(3) + w.flip(2, 3)) / 4)
    return conv.eval()


class _Asymmetric(nn.Module):
    """Not equivariant under any flip: a random 3x3 convolution plus a ramp along H and W."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Conv2d(1, NUM_CLASSES, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        ramp = torch.linspace(-1, 1, h)[:, None] + 2 * torch.linspace(-1, 1, w)[None, :]
        return self.conv(x) + ramp * torch.arange(NUM_CLASSES, dtype=x.dtype)[:, None, None]


def _slices(n: int, h: int, w: int) -> torch.Tensor:
    return torch.randn(n, 1, h, w, generator=torch.Generator().manual_seed(2))


def _segment(model, slices, axes, batch_size, channels_last=False):
    return segment_slices(
        model, slices, device=CPU, batch_size=batch_size, channels_last=channels_last, mirror_axes=axes
    )


@pytest.mark.parametrize(("h", "w"), [(33, 37), (32, 32)])
@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_mirroring_a_flip_equivariant_model_changes_nothing(h, w, batch_size):
    model, slices = _symmetric_model(), _slices(5, h, w)
    plain = _segment(model, slices, (), batch_size)
    assert len(plain.unique()) == NUM_CLASSES  # every label present: equal masks are not empty ones
    for axes in [("H",), ("W",), ("H", "W")]:
        assert torch.equal(_segment(model, slices, axes, batch_size), plain)


@pytest.mark.parametrize("axes", [("H",), ("W",), ("H", "W"), ("W", "H")])
@pytest.mark.parametrize("batch_size", [1, 3, 16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_mirrored_labels_are_the_argmax_of_the_mean_unflipped_softmax(axes, batch_size, channels_last):
    model, slices = _Asymmetric().eval(), _slices(5, 33, 37)
    dims = [MIRROR_DIMS[a] for a in axes]
    flips = [[]] + [[d] for d in dims] + ([dims] if len(dims) == 2 else [])
    with torch.no_grad():
        mean = sum(model(slices.flip(f)).softmax(1).flip(f) for f in flips) / len(flips)
    expected = mean.argmax(1).to(torch.uint8)

    mirrored = _segment(model, slices, axes, batch_size, channels_last)
    assert mirrored.shape == (5, 33, 37) and mirrored.dtype == torch.uint8
    assert torch.equal(mirrored, expected)
    # The toy model is asymmetric enough for mirroring to matter: the test could fail.
    assert not torch.equal(mirrored, _segment(model, slices, (), batch_size))


def test_the_mask_key_names_the_mirroring():
    axes_choices = [(), ("H",), ("W",), ("H", "W")]
    keys = [json.dumps(PredictOptions(mirror_axes=axes).mask_key()) for axes in axes_choices]
    assert len(set(keys)) == 4
    assert PredictOptions().mask_key()["mirror_axes"] == ["H", "W"]  # nnU-Net's default: both in-plane axes


def test_the_options_follow_the_config_and_survive_the_batch_record():
    infer = PipelineConfig().replace(infer={"mirror_axes": ["W"]}).infer
    options = PredictOptions.from_config(infer, batch_size=4)
    assert options.mirror_axes == ("W",)
    assert PredictOptions.from_config(PipelineConfig().infer).mirror_axes == ("H", "W")
    # The batch record stores the options as JSON (tuples become lists); the worker rebuilds them.
    assert PredictOptions(**json.loads(json.dumps(dataclasses.asdict(options)))) == options


@pytest.mark.parametrize("axes", [("D",), ("H", "H")])
def test_unknown_or_repeated_axes_are_refused(axes):
    with pytest.raises(ValueError, match="mirror_axes"):
        PredictOptions(mirror_axes=axes)
