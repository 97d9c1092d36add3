"""Facts about the machine this process runs on (no heavy imports: every layer may use them)."""

from __future__ import annotations

import os


def available_cores() -> int:
    """CPUs this process may run on: its affinity mask where the OS has one (containers, taskset)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)
