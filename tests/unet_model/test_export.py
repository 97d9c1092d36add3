"""The registry must load a model that accepts any valid size: export with dynamic H and W."""

import numpy as np
import pytest
import torch

from unet_model import UNet, UNetConfig
from unet_model.export import export_onnx, export_program


@pytest.fixture(scope="module")
def model() -> UNet:
    torch.manual_seed(1)
    return UNet(UNetConfig(base_channels=4, num_classes=3)).eval()


@pytest.mark.slow
def test_torch_export_accepts_other_sizes(model):
    program = export_program(model)
    for size in [(16, 16), (33, 37), (17, 200), (96, 64)]:
        x = torch.randn(3, 1, *size)
        with torch.no_grad():
            expected = model(x)
        torch.testing.assert_close(program.module()(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_onnx_export_runs_in_onnxruntime_at_other_sizes(model, tmp_path):
    import onnxruntime as ort  # (here: slow to import, and only this test needs it)

    path = export_onnx(model, tmp_path / "unet.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for size in [(33, 37), (16, 48)]:
        x = torch.randn(2, 1, *size)
        with torch.no_grad():
            expected = model(x).numpy()
        (got,) = session.run(["logits"], {"image": x.numpy()})
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_torch_compile_matches_eager(model):
    compiled = torch.compile(model, dynamic=True)
    for size in [(32, 32), (33, 37)]:
        x = torch.randn(2, 1, *size)
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), model(x), atol=1e-4, rtol=1e-4)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_autocast_channels_last(dtype):
    model = UNet(UNetConfig(base_channels=8)).cuda().eval().to(memory_format=torch.channels_last)
    x = torch.randn(2, 1, 33, 37, device="cuda").contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cuda", dtype=dtype):
            out = model(x)
    assert out.dtype == dtype and out.shape == (2, 2, 33, 37)
    torch.testing.assert_close(out.float(), ref, atol=5e-2, rtol=5e-2)
