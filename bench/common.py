"""Helpers shared by the benchmarks: timing and the same-process matmul peak."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

import torch
from torch import nn


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_time(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 2) -> float:
    """Fastest of `repeats` timed calls, after `warmup` untimed ones (the least disturbed run)."""
    for _ in range(warmup):
        fn()
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def matmul_peak(device: torch.device, dtype: torch.dtype, repeats: int = 5) -> float:
    """Achieved FLOP/s of large square matrix products: the machine's practical peak for `dtype`.

    On CPU two GEMM libraries live in one torch process: `torch.mm` goes to MKL, convolutions to
    oneDNN. On AMD CPUs with AVX-512 MKL's fp32 GEMM reaches about half of what oneDNN's does (220
    against 495 GFLOP/s on the project's 2-core EPYC), so the peak is the better of the two: a
    plain `torch.mm` and the same product as a 1x1 channels_last convolution (a GEMM in oneDNN).
    A ratio to the slower one would flatter the model.
    """
    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    inner = 20 if device.type == "cuda" else 2

    def run_mm() -> None:
        for _ in range(inner):
            torch.mm(a, b)

    best = 2 * n**3 * inner / best_time(run_mm, device, repeats)
    if device.type == "cpu":
        # (n, n) @ (n, n) as a 1x1 convolution: n input channels, n output channels, n pixels.
        side = int(n**0.5)
        x = torch.randn(1, n, side, n // side, dtype=dtype).contiguous(memory_format=torch.channels_last)
        w = torch.randn(n, n, 1, 1, dtype=dtype).contiguous(memory_format=torch.channels_last)

        def run_onednn() -> None:
            for _ in range(inner):
                torch.nn.functional.conv2d(x, w)

        best = max(best, 2 * n**3 * inner / best_time(run_onednn, device, repeats))
    return best


@contextlib.contextmanager
def network_in_loop(factory: Callable[..., nn.Module]) -> Iterator[None]:
    """Train another network with the same loop (a peer: MONAI's BasicUNet, ...), without writing
    a model folder (that holds the classic U-Net only). `factory(unet_config)` builds it. The loop
    takes no network argument on purpose: what it trains is what is exported and registered."""
    from pipeline.training import loop  # lazy: the timing helpers above need no pipeline

    original_net, original_save = loop.UNet, loop.write_model_dir
    loop.UNet = factory
    loop.write_model_dir = lambda *a, **k: None
    try:
        yield
    finally:
        loop.UNet, loop.write_model_dir = original_net, original_save
