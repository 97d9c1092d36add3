"""The bounds an ingest runs under: sizes refused before any voxel buffer is allocated, and the
memory that concurrent conversions may hold together."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.system import memory_bytes


@dataclass(frozen=True)
class IngestLimits:
    """Bounds checked from headers before any voxel buffer is allocated."""

    max_pixels_per_file: int = 2**28  # DICOM Rows x Columns x frames (256 Mi pixels)
    max_voxels: int = 2**30  # voxels of a NIfTI volume or of a DICOM series' volume
    max_bytes: int = 8 * 2**30  # NIfTI decompressed bytes (bounds gzip bombs)
    # A DICOM series some of whose files were refused one by one: False refuses it
    # (SERIES_INCOMPLETE); True stages the rest, marked partial in the manifest and the report.
    accept_partial_series: bool = False
    # Stage NIfTI files whose qform_code and sform_code are both 0 (orientation unknown): off,
    # they are NO_ORIENTATION; on, they are staged with codes 0 and "orientation": "unknown".
    allow_no_orientation: bool = False
    # Bytes that concurrent conversions may hold together (None: no bound beyond `workers`).
    memory_budget: int | None = None

    @classmethod
    def for_budget(cls, budget_bytes: int, **overrides: Any) -> IngestLimits:
        """Limits under which one case at the limit fits `budget_bytes` (see `planned_peak_bytes`).

        A NIfTI volume is held as float32 at most (4 bytes a voxel): max_voxels is what fits
        (budget - fixed overhead) / (PEAK_FACTOR x 4), never above the historical 2**30.
        """
        usable = max(0, budget_bytes - FIXED_OVERHEAD_BYTES)
        voxels = int(min(2**30, usable // int(PEAK_FACTOR * 4)))
        if voxels < 2**20:
            raise ValueError(
                f"a memory budget of {budget_bytes / 2**30:.2f} GiB leaves room for volumes of "
                f"{voxels} voxels; give ingest at least {(FIXED_OVERHEAD_BYTES + 6 * 2**20) / 2**30:.2f} GiB"
            )
        fields = {
            "max_voxels": voxels,
            "max_bytes": voxels * 8,  # float64 voxels, streamed into float32
            "max_pixels_per_file": min(2**28, voxels),
            "memory_budget": int(budget_bytes),
        }
        return cls(**(fields | overrides))

    @classmethod
    def from_config(cls, section: Any, **overrides: Any) -> IngestLimits:
        """Limits from the config's `ingest` section (pipeline.config.IngestConfig)."""
        budget_gb = section.memory_budget_gb
        budget = int(budget_gb * 2**30) if budget_gb else default_memory_budget()
        return cls.for_budget(budget, **({"allow_no_orientation": section.allow_no_orientation} | overrides))


def ingest_limits(config: str | Path | None = None, **overrides: Any) -> IngestLimits:
    """The limits an ingest runs under, as the CLI and the ingest flow read them: the config's
    `ingest` section (memory budget, allow_no_orientation) and `data.accept_partial_series`;
    `overrides` (IngestLimits fields) win. Raises pipeline.config.ConfigError for a bad file."""
    from pipeline.config import load_config  # lazy: pydantic and YAML only when a config is read

    cfg = load_config(config)
    partial = {"accept_partial_series": cfg.data.accept_partial_series}
    return IngestLimits.from_config(cfg.ingest, **(partial | overrides))


def default_memory_budget() -> int:
    """75 % of the memory this process may use (the machine's, or its container's limit)."""
    return int(0.75 * memory_bytes())


# Peak resident memory of one ingest process: at most PEAK_FACTOR x its largest volume's decoded
# size (the voxels as held: float32 for float or scaled NIfTI) plus FIXED_OVERHEAD_BYTES (the
# interpreter, numpy, nibabel, pydicom, gzip and chunk buffers). Checked by the memory test in
# tests/pipeline/ingest/test_memory.py. Measured with its label: 377 MiB for a 256 MiB float32 NIfTI
# at the limit (before streaming: 1008 MiB), 4.12 GiB for a 4 GiB one at 2**30 voxels (9.5 GB).
# DICOM (frames decoded into the one output array): 252 MiB for a 128 MiB int16 series at the
# limit, 641 MiB for a 512 MiB one (before: 369 and 1142 MiB, every decoded slice kept).
PEAK_FACTOR = 1.5
FIXED_OVERHEAD_BYTES = 256 * 2**20


def planned_peak_bytes(volume_bytes: int) -> int:
    """The memory one conversion of a case whose largest volume holds `volume_bytes` may need."""
    return int(PEAK_FACTOR * volume_bytes) + FIXED_OVERHEAD_BYTES
