"""Helpers shared by the benchmarks: timing and the same-process matmul peak."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


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
    """Achieved FLOP/s of a large square matmul: the machine's practical peak for `dtype`."""
    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    inner = 20 if device.type == "cuda" else 2

    def run() -> None:
        for _ in range(inner):
            torch.mm(a, b)

    seconds = best_time(run, device, repeats)
    return 2 * n**3 * inner / seconds
