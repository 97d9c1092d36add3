"""Helpers shared by the DICOM tests: small real series on disk and a folder scan."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom

from pipeline.errors import InputRejected
from pipeline.io.dicom import assemble_series, read_header

MAX_PIXELS = 10_000_000


def stored_volume(n: int = 6, rows: int = 32, cols: int = 40, seed: int = 0, lo: int = -1000, hi: int = 2000):
    """(slices, rows, columns) stored values; odd shapes so row/column mix-ups cannot pass."""
    return np.random.default_rng(seed).integers(lo, hi, (n, rows, cols), endpoint=True)


def scan(root: Path, max_pixels: int = MAX_PIXELS):
    """What the orchestrator does: read every file's header, then assemble. Returns groups, rejections."""
    headers, rejected = [], []
    for path in sorted(p for p in Path(root).rglob("*") if p.is_file()):
        try:
            headers.append(read_header(path, root, max_pixels))
        except InputRejected as exc:
            rejected.append(exc)
    groups, group_rejections = assemble_series(headers)
    return groups, rejected + group_rejections


def retag(paths, **tags) -> None:
    """Rewrite tags in place (None deletes the tag): for cases the writer has no option for."""
    for path in paths:
        ds = pydicom.dcmread(path)
        for keyword, value in tags.items():
            if value is None:
                if keyword in ds:
                    delattr(ds, keyword)
            else:
                setattr(ds, keyword, value)
        ds.save_as(path)
