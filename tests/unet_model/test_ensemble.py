"""The fold ensemble: one network whose softmax is the mean of its members' softmax."""

from __future__ import annotations

import pytest
import torch

from unet_model import UNet, UNetConfig
from unet_model.ensemble import UNetEnsemble


def _members(k: int, config: UNetConfig) -> list[UNet]:
    nets = []
    for seed in range(k):
        torch.manual_seed(seed)
        nets.append(UNet(config).eval())
    return nets


@pytest.mark.parametrize(("k", "height", "width"), [(1, 16, 16), (3, 33, 37), (5, 32, 20)])
def test_softmax_of_the_ensemble_is_the_mean_of_its_members_softmax(k, height, width):
    members = _members(k, UNetConfig(num_classes=3, base_channels=4, depth=3))
    ensemble = UNetEnsemble(members).eval()
    x = torch.randn(2, 1, height, width)
    with torch.inference_mode():
        mean = torch.stack([m(x).softmax(dim=1) for m in members]).mean(dim=0)
        out = ensemble(x)
    assert out.shape == (2, 3, height, width) and out.dtype == torch.float32
    torch.testing.assert_close(out.softmax(dim=1), mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.exp(), mean, rtol=1e-5, atol=1e-6)  # already normalised
    assert torch.equal(out.argmax(dim=1), mean.argmax(dim=1))


def test_members_that_disagree_are_averaged_not_voted():
    """Two members: one sure of class 1, one mildly for class 2; the mean picks class 1."""

    class Fixed(UNet):
        def __init__(self, logits):
            super().__init__(UNetConfig(num_classes=3, base_channels=2, depth=1))
            self.fixed = torch.tensor(logits)

        def forward(self, x):
            return self.fixed.view(1, 3, 1, 1).expand(x.shape[0], 3, *x.shape[2:])

    ensemble = UNetEnsemble([Fixed([0.0, 6.0, 0.0]), Fixed([0.0, 0.0, 1.0])])
    probs = ensemble(torch.zeros(1, 1, 2, 2)).softmax(dim=1)[0, :, 0, 0]
    assert probs.argmax() == 1
    assert probs.sum() == pytest.approx(1.0)


def test_config_is_the_members_and_they_must_share_it():
    config = UNetConfig(num_classes=2, base_channels=4, depth=2)
    assert UNetEnsemble(_members(2, config)).config == config
    other = UNet(UNetConfig(num_classes=2, base_channels=8, depth=2))
    with pytest.raises(ValueError, match=r"member 1 has .*base_channels=8"):
        UNetEnsemble([UNet(config), other])
    with pytest.raises(ValueError, match="at least one member"):
        UNetEnsemble([])


def test_state_dict_names_each_member():
    ensemble = UNetEnsemble(_members(2, UNetConfig(num_classes=2, base_channels=2, depth=1)))
    keys = ensemble.state_dict().keys()
    assert {k.split(".")[1] for k in keys} == {"0", "1"} and all(k.startswith("members.") for k in keys)
