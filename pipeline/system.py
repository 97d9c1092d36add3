"""Facts about the machine this process runs on (no heavy imports: every layer may use them)."""

from __future__ import annotations

import os


def memory_bytes() -> int:
    """Memory this process may use: the machine's RAM, or its container's limit (cgroup) if lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(limit_file, encoding="ascii") as fh:
                text = fh.read().strip()
        except OSError:
            continue
        if text.isdigit():  # "max" (cgroup v2) means no limit
            total = min(total, int(text))
    return total


def available_cores() -> int:
    """CPUs this process may run on: its affinity mask where the OS has one (containers, taskset)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)
