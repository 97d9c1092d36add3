import pytest
import torch

from unet_model import UNet, UNetConfig
from unet_model.deep_supervision import (
    DeepSupervision,
    DeepSupervisionLoss,
    downsample_target,
    level_weights,
)


@pytest.mark.parametrize(
    ("depth", "weights"),
    [(4, [4 / 7, 2 / 7, 1 / 7]), (3, [2 / 3, 1 / 3]), (2, [1.0]), (1, [1.0])],
)
def test_level_weights_halve_per_level_lowest_off_and_sum_to_one(depth, weights):
    assert level_weights(depth) == pytest.approx(weights)


@pytest.mark.parametrize(("height", "width"), [(64, 64), (33, 37), (16, 48)])
@pytest.mark.parametrize("depth", [3, 4])
def test_heads_give_logits_at_each_supervised_level(height, width, depth):
    net = DeepSupervision(UNet(UNetConfig(base_channels=4, num_classes=3, depth=depth)))
    x = torch.randn(2, 1, height, width)
    outputs = net(x)
    assert len(outputs) == len(level_weights(depth)) == depth - 1
    for level, out in enumerate(outputs):
        assert out.shape == (2, 3, -(-height // 2**level), -(-width // 2**level))
    target = torch.randint(0, 3, (2, 1, height, width))
    for level, out in enumerate(outputs):
        assert downsample_target(target, level).shape[-2:] == out.shape[-2:]
    net.eval()
    assert torch.equal(net(x)[0], net.unet(x))  # level 0 is the classic network's own output


def test_the_exported_network_is_the_plain_unet_without_hooks_or_heads():
    config = UNetConfig(base_channels=4, num_classes=2)
    net = DeepSupervision(UNet(config))
    net(torch.randn(1, 1, 32, 32)).pop().sum().backward()  # a training forward and backward
    assert all(not up._forward_hooks for up in net.unet.ups)  # the hooks left with the forward
    plain = UNet(config)
    plain.load_state_dict(net.unet.state_dict(), strict=True)
    assert not any(k.startswith("aux_heads") for k in net.unet.state_dict())
    assert {k for k in net.state_dict() if k.startswith("aux_heads")}  # the heads live in the wrapper
    x = torch.randn(1, 1, 32, 32)
    plain.eval(), net.eval()
    assert torch.equal(plain(x), net.unet(x))


def test_loss_is_the_weighted_sum_over_downsampled_targets():
    calls = []

    def loss(out, target):
        calls.append((out.shape[-1], target.shape[-1], out.dtype))
        return out.mean() * 0 + out.shape[-1]  # the level's width, so the weighted sum is known

    outputs = [torch.zeros(1, 2, 32, 32, dtype=torch.bfloat16), torch.zeros(1, 2, 16, 16)]
    total = DeepSupervisionLoss(loss, [2 / 3, 1 / 3])(outputs, torch.zeros(1, 1, 32, 32, dtype=torch.long))
    assert float(total) == pytest.approx(2 / 3 * 32 + 1 / 3 * 16)
    assert calls == [(32, 32, torch.float32), (16, 16, torch.float32)]
    plain = DeepSupervisionLoss(loss, [1.0])(torch.zeros(1, 2, 8, 8), torch.zeros(1, 1, 8, 8))
    assert float(plain) == 8.0
    with pytest.raises(ValueError, match="2 outputs for 1 level weights"):
        DeepSupervisionLoss(loss, [1.0])(outputs, torch.zeros(1, 1, 32, 32))
