"""What paces a training run: seeding, the optional wall-clock budget and the learning-rate schedule."""

from __future__ import annotations

import math
import os
import random
import time
from dataclasses import dataclass

import numpy as np
import torch


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch; optionally ask for deterministic kernels (slower)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


@dataclass(frozen=True)
class Budget:
    """The wall-clock budget, counted from the run's start in this process (a resumed run gets a
    new one)."""

    start: float  # time.monotonic()
    seconds: float | None  # None: no budget

    def spent(self) -> bool:
        return self.seconds is not None and time.monotonic() - self.start > self.seconds


def lr_lambda(optimizer_name: str, warmup: int, total: int, budget: Budget):
    """Linear warm-up over `warmup` steps, then cosine (adamw) or poly 0.9 (sgd) decay to ~0.

    With a wall-clock budget the decay runs on whichever ends first, the steps or the budget
    (progress = max(step share, time share)), so a budget-bounded run still anneals fully.
    """

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        t = min(1.0, (step - warmup) / max(1, total - warmup))
        if budget.seconds:
            t = max(t, min(1.0, (time.monotonic() - budget.start) / budget.seconds))
        if optimizer_name == "sgd":
            return max(1e-3, (1.0 - t) ** 0.9)
        return max(1e-3, 0.5 * (1.0 + math.cos(math.pi * t)))

    return factor
