"""Atomic file writes: a temporary file in the same folder, fsynced, then renamed into place.

A crash leaves either the old file or the new one at the final path, never a partial file.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO


@contextlib.contextmanager
def atomic_path(final: str | Path, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `final`; on success it is renamed to `final`.

    Use for writers that take a path (nibabel, pydicom). `suffix` defaults to the final name's
    own suffixes so writers that infer the format from the name (``.nii.gz``) still do.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    suffix = suffix if suffix is not None else "".join(final.suffixes)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=f".tmp{suffix}", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_open(final: str | Path, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """Open a temporary file beside `final` for writing; renamed into place on success."""
    if "b" in mode:
        encoding = None
    with atomic_path(final) as tmp, open(tmp, mode, encoding=encoding) as fh:
        yield fh


def write_text(final: str | Path, text: str) -> None:
    with atomic_open(final) as fh:
        fh.write(text)


def write_bytes(final: str | Path, data: bytes) -> None:
    with atomic_open(final, "wb") as fh:
        fh.write(data)
