import pytest
import torch
import torch.nn.functional as F

from unet_model import UNet, UNetConfig, count_parameters


def small(**kw) -> UNet:
    return UNet(UNetConfig(base_channels=kw.pop("base_channels", 4), **kw))


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("size", [(16, 16), (33, 37), (17, 200), (256, 256)])
def test_output_matches_input_size(batch, size):
    model = small(num_classes=3).eval()
    with torch.no_grad():
        out = model(torch.randn(batch, 1, *size))
    assert out.shape == (batch, 3, *size)


@pytest.mark.parametrize("depth,size", [(4, (15, 64)), (4, (64, 15)), (3, (7, 7)), (2, (3, 100))])
def test_too_small_input_names_minimum_and_size(depth, size):
    model = small(depth=depth)
    with pytest.raises(ValueError) as err:
        model(torch.randn(1, 1, *size))
    message = str(err.value)
    assert f">= {2**depth}" in message
    assert f"{size[0]}x{size[1]}" in message


def test_smallest_valid_size_for_depth():
    model = small(depth=3).eval()
    assert model(torch.randn(1, 1, 8, 8)).shape == (1, 2, 8, 8)


def test_wrong_channel_count_names_expected_and_found():
    model = small(in_channels=2)
    with pytest.raises(ValueError, match=r"expects 2 input channel.*found 1"):
        model(torch.randn(1, 1, 32, 32))


def test_non_4d_input_rejected():
    with pytest.raises(ValueError, match=r"4D tensor.*\(1, 32, 32\)"):
        small()(torch.randn(1, 32, 32))


def test_classic_configuration_parameter_count():
    # Classic U-Net: in 1, classes 2, base 64, depth 4, batch norm, bias-free 3x3 convs.
    # DoubleConv(a, b) = 9ab + 9bb (convs) + 4b (two BatchNorms' weight and bias).
    #   inc 1->64: 37,696          down 64->128: 221,696     down 128->256: 885,760
    #   down 256->512: 3,540,992   down 512->1024 (bottleneck): 14,159,872
    # Up(a, b) = ConvTranspose 4ab + b, then DoubleConv(2b, b):
    #   1024->512: 2,097,664 + 7,079,936    512->256: 524,544 + 1,770,496
    #   256->128: 131,200 + 442,880         128->64: 32,832 + 110,848
    # Head 1x1 64->2: 130.   Sum: 31,036,546 (the paper's network has about 31.0 M).
    model = UNet(UNetConfig())
    assert count_parameters(model) == 31_036_546
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())


def test_widths_derive_from_base():
    assert UNetConfig(base_channels=64).widths() == [64, 128, 256, 512, 1024]
    assert UNetConfig(base_channels=8, depth=2).widths() == [8, 16, 32]


@pytest.mark.parametrize("norm", ["batch", "instance", "none"])
def test_gradients_reach_every_parameter(norm):
    model = small(norm=norm, dropout=0.1)
    x = torch.randn(2, 1, 33, 37)
    model(x).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert missing == []


def test_eval_mode_is_deterministic():
    model = small(dropout=0.5).eval()
    x = torch.randn(2, 1, 48, 40)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


def test_channels_last_matches_contiguous():
    model = small().eval()
    x = torch.randn(2, 1, 40, 40)
    with torch.no_grad():
        ref = model(x)
        model_cl = model.to(memory_format=torch.channels_last)
        out = model_cl(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_bf16_autocast_on_cpu():
    model = small().eval()
    x = torch.randn(1, 1, 33, 37)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.shape == (1, 2, 33, 37)
    assert out.dtype == torch.bfloat16


def dice(pred: torch.Tensor, target: torch.Tensor) -> float:
    inter = (pred & target).sum().item()
    return 2 * inter / max(1, pred.sum().item() + target.sum().item())


@pytest.mark.slow
def test_overfits_one_image_to_high_dice():
    torch.manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(48), torch.arange(48), indexing="ij")
    mask = ((yy - 20) ** 2 / 120 + (xx - 26) ** 2 / 60) < 1  # an off-centre ellipse
    image = mask.float() * 1.0 + 0.3 * torch.randn(48, 48)
    x, y = image[None, None], mask.long()[None]
    model = small(base_channels=8)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    best = 0.0
    for step in range(150):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        if step % 10 == 9:
            model.eval()
            with torch.no_grad():
                best = max(best, dice(model(x).argmax(1)[0].bool(), mask))
            model.train()
            if best > 0.95:
                break
    assert best > 0.95, f"Dice {best:.3f} after {step + 1} steps"
