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


def available_memory_bytes() -> int:
    """Memory this process may still use: MemAvailable, capped by its cgroup's limit (containers)."""
    available = _meminfo_kib("MemAvailable")
    limit = _cgroup_headroom()
    values = [v for v in (available, limit) if v is not None]
    if not values:
        return 4 * 2**30  # neither /proc nor a cgroup: assume a small worker rather than guess big
    return min(values)


def _meminfo_kib(field: str) -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


def _cgroup_headroom() -> int | None:
    """cgroup v2 memory.max minus memory.current, when a limit is set."""
    try:
        with open("/sys/fs/cgroup/memory.max", encoding="ascii") as fh:
            limit = fh.read().strip()
        if limit == "max":
            return None
        with open("/sys/fs/cgroup/memory.current", encoding="ascii") as fh:
            current = int(fh.read().strip())
        return max(0, int(limit) - current)
    except (OSError, ValueError):
        return None
