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


# ---------------------------------------------------------------------------------------------
# 2.5-D context: each slice between its neighbours as the network's input channels


class _Recorder(nn.Module):
    """Keeps every input batch; logits of zeros (two classes)."""

    def __init__(self) -> None:
        super().__init__()
        self.inputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x.detach().clone())
        return torch.zeros(x.shape[0], 2, *x.shape[2:])


def _in_context(model, slices, k, axes, batch_size=4):
    return segment_slices(
        model, slices, device=CPU, batch_size=batch_size, channels_last=False, mirror_axes=axes, context=k
    )


def _expected_context(slices: torch.Tensor, k: int) -> torch.Tensor:
    """(S, k, H, W): slice i with slices i-(k-1)/2 .. i+(k-1)/2, an edge slice repeated past the ends."""
    n, r = slices.shape[0], k // 2
    return torch.stack(
        [torch.cat([slices[min(max(i + o, 0), n - 1)] for o in range(-r, r + 1)]) for i in range(n)]
    )


@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("n", [1, 2, 5])
@pytest.mark.parametrize("batch_size", [1, 4, 16])
def test_each_slice_goes_in_with_its_neighbours_and_the_edges_repeat(k, n, batch_size):
    slices, model = _slices(n, 33, 37), _Recorder()
    labels = _in_context(model, slices, k, (), batch_size)
    assert labels.shape == (n, 33, 37)
    fed = torch.cat(model.inputs)
    assert fed.shape == (n, k, 33, 37)
    assert torch.equal(fed, _expected_context(slices, k))


def test_a_context_network_that_reads_only_the_centre_slice_segments_as_the_one_slice_network():
    """k = 1 is today's path, and the centre channel of k = 3 is the slice itself: a 3-channel
    convolution whose neighbour weights are zero gives the 1-channel convolution's labels."""
    torch.manual_seed(3)
    one = nn.Conv2d(1, NUM_CLASSES, 3, padding=1).eval()
    three = nn.Conv2d(3, NUM_CLASSES, 3, padding=1).eval()
    with torch.no_grad():
        three.weight.zero_()
        three.weight[:, 1:2].copy_(one.weight)
        three.bias.copy_(one.bias)
    slices = _slices(6, 33, 37)
    plain = _segment(one, slices, ("H", "W"), 4)
    assert len(plain.unique()) == NUM_CLASSES
    assert torch.equal(_in_context(one, slices, 1, ("H", "W")), plain)
    assert torch.equal(_in_context(three, slices, 3, ("H", "W")), plain)
    with torch.no_grad():  # the neighbours matter once their weights do: the test could fail
        three.weight[:, 0].add_(torch.randn_like(three.weight[:, 0]))
    assert not torch.equal(_in_context(three, slices, 3, ("H", "W")), plain)


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_mirroring_flips_a_slice_and_its_neighbours_together(batch_size):
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(3, NUM_CLASSES, 3, padding=1)).eval()
    slices = _slices(5, 33, 37)
    stacked = _expected_context(slices, 3)
    flips = [[], [2], [3], [2, 3]]
    with torch.no_grad():
        mean = sum(model(stacked.flip(f)).softmax(1).flip(f) for f in flips) / len(flips)
    got = _in_context(model, slices, 3, ("H", "W"), batch_size)
    assert torch.equal(got, mean.argmax(1).to(torch.uint8))


def test_a_context_needs_single_channel_slices():
    with pytest.raises(ValueError, match="3-slice context stacks single-channel slices; got 2 channels"):
        segment_slices(_Recorder(), torch.zeros(4, 2, 16, 16), device=CPU, batch_size=4, context=3)
