"""A fold ensemble through the one predictor: the argmax of the mean softmax over folds and flips."""

from __future__ import annotations

import pytest
import torch

from pipeline.inference.predictor import MIRROR_DIMS, segment_slices
from unet_model import UNet, UNetConfig
from unet_model.ensemble import UNetEnsemble

CPU = torch.device("cpu")


def _members(k: int) -> list[UNet]:
    nets = []
    for seed in range(k):
        torch.manual_seed(10 + seed)
        nets.append(UNet(UNetConfig(num_classes=3, base_channels=4, depth=2)).eval())
    return nets


def _mean_probs(members, slices, axes) -> torch.Tensor:
    """The reference: each member's softmax of each flipped view, flipped back, all averaged."""
    dims = [MIRROR_DIMS[a] for a in axes]
    flips = [[]] + [[d] for d in dims] + ([dims] if len(dims) == 2 else [])
    with torch.no_grad():
        views = [m(slices.flip(f)).softmax(1).flip(f) for m in members for f in flips]
    return torch.stack(views).mean(0)


@pytest.mark.parametrize("axes", [(), ("W",), ("H", "W")])
@pytest.mark.parametrize("batch_size", [1, 4, 16])
def test_ensemble_labels_are_the_argmax_of_the_mean_over_folds_and_flips(axes, batch_size):
    members = _members(3)
    slices = torch.randn(5, 1, 33, 37, generator=torch.Generator().manual_seed(3))
    mean = _mean_probs(members, slices, axes)
    got = segment_slices(
        UNetEnsemble(members).eval(), slices, device=CPU, batch_size=batch_size, mirror_axes=axes
    )
    top2 = mean.topk(2, dim=1).values
    decided = (top2[:, 0] - top2[:, 1]) > 1e-5  # rounding may only differ on near ties
    assert decided.float().mean() > 0.95
    assert torch.equal(got[decided], mean.argmax(1).to(torch.uint8)[decided])
    # The folds disagree, so averaging them matters: the test could fail.
    for member in members:
        alone = segment_slices(member, slices, device=CPU, batch_size=batch_size, mirror_axes=axes)
        assert not torch.equal(alone, got)
