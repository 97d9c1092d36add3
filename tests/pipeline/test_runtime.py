import pytest
import torch

from pipeline.runtime import autocast, prepare_model, resolve_device, resolve_precision, to_input
from unet_model import UNet, UNetConfig


def test_auto_device_is_cpu_without_gpu():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected


def test_unknown_device_lists_options():
    with pytest.raises(ValueError, match=r"auto, cpu, cuda.*'tpu'"):
        resolve_device("tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="only meaningful without a GPU")
def test_cuda_request_without_gpu_says_what_to_do():
    with pytest.raises(RuntimeError, match="--device cpu"):
        resolve_device("cuda")


def test_precision_choices():
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) is None
    assert resolve_precision("bf16", cpu) is torch.bfloat16
    with pytest.raises(ValueError, match=r"fp16.*CUDA"):
        resolve_precision("fp16", cpu)
    with pytest.raises(ValueError, match="auto, fp32, bf16, fp16"):
        resolve_precision("int8", cpu)


def test_prepare_model_uses_channels_last():
    cpu = torch.device("cpu")
    model = prepare_model(UNet(UNetConfig(base_channels=4)), cpu)
    conv = model.inc[0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last)
    x = to_input(torch.randn(2, 1, 32, 32), cpu)
    with torch.no_grad(), autocast(cpu, None):
        assert model.eval()(x).shape == (2, 2, 32, 32)


@pytest.mark.parametrize(("capability", "cpu_layout"), [("AVX512", True), ("AVX2", False), ("NONE", False)])
def test_training_layout_auto_follows_cpu_and_is_channels_last_on_cuda(monkeypatch, capability, cpu_layout):
    from pipeline.runtime import training_channels_last

    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    assert training_channels_last("auto", torch.device("cpu")) is cpu_layout
    assert training_channels_last("auto", torch.device("cuda")) is True
    assert training_channels_last(True, torch.device("cpu")) is True
    assert training_channels_last(False, torch.device("cuda")) is False
