"""Streaming a NIfTI file: its header, then its voxels in bounded chunks, never the whole file.

`NiftiStream` parses and checks the header (the declared size against the limits, before any
voxel buffer exists) and then yields the stored voxels chunk by chunk, in file order (Fortran
order of the array). Readers copy each chunk into the one output array of the final dtype
(scaled, narrowed) as it comes, so reading costs the output array plus one chunk: no copy of
the file's bytes, no intermediate array of the stored dtype, no full-size temporaries.

A .nii.gz is inflated as it is read and never past the size its header declares plus a small
margin, so a gzip bomb costs a few kilobytes of reading, not gigabytes of memory.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import nibabel as nib
import numpy as np
from nibabel.spatialimages import HeaderDataError

from pipeline.errors import InputRejected, Reason

# Bytes tolerated after the declared voxel data (some writers pad); anything longer is refused.
TRAILING_MARGIN = 64 * 1024
CHUNK_BYTES = 4 << 20  # voxels are read 4 MiB at a time (a multiple of every itemsize)


def _reject(reason: Reason, rel: str, message: str, **details) -> InputRejected:
    return InputRejected(reason, rel, message, details)


def _read_exact(stream: BinaryIO, n: int) -> bytes:
    """Up to ``n`` bytes: fewer only when the stream ends."""
    parts, got = [], 0
    while got < n:
        part = stream.read(n - got)
        if not part:
            break
        parts.append(part)
        got += len(part)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _header_class(block: bytes, rel: str) -> type[nib.Nifti1Header]:
    """NIfTI-1 or NIfTI-2 header class from sizeof_hdr (either byte order)."""
    if len(block) < 4:
        raise _reject(
            Reason.TRUNCATED,
            rel,
            f"file holds {len(block)} bytes, shorter than a NIfTI header (348)",
            found_bytes=len(block),
            expected_bytes=348,
        )
    sizes = {int.from_bytes(block[:4], "little"), int.from_bytes(block[:4], "big")}
    if 348 in sizes:
        return nib.Nifti1Header
    if 540 in sizes:
        return nib.Nifti2Header
    raise _reject(
        Reason.UNREADABLE,
        rel,
        "not a NIfTI file: the first 4 bytes should hold sizeof_hdr 348 (NIfTI-1) or 540 (NIfTI-2); "
        "check the file was exported as NIfTI",
        sizeof_hdr=int.from_bytes(block[:4], "little"),
    )


def _parse_header(klass: type[nib.Nifti1Header], block: bytes, rel: str) -> nib.Nifti1Header:
    try:
        hdr = klass.from_fileobj(io.BytesIO(block), check=False)
    except (ValueError, HeaderDataError) as exc:
        raise _reject(Reason.UNREADABLE, rel, f"NIfTI header cannot be parsed: {exc}") from exc
    magic = bytes(hdr["magic"])
    if magic.startswith((b"ni1", b"ni2")):
        raise _reject(
            Reason.ANALYZE_FORMAT,
            rel,
            "this is the header of a NIfTI .hdr/.img pair; convert it to a single .nii/.nii.gz file",
            magic=magic.decode("latin-1").strip("\x00"),
        )
    if not magic.startswith((b"n+1", b"n+2")):
        raise _reject(
            Reason.UNREADABLE,
            rel,
            "NIfTI magic string missing: expected 'n+1' or 'n+2'",
            magic=magic.decode("latin-1", "replace").strip("\x00"),
        )
    return hdr


def _check_header(
    hdr: nib.Nifti1Header, rel: str, *, max_voxels: int, max_bytes: int
) -> tuple[tuple[int, ...], np.dtype, int]:
    """Shape, on-disk dtype and voxel offset, after the checks that need no voxels."""
    dim = [int(d) for d in hdr["dim"]]
    ndim = dim[0]
    if not 1 <= ndim <= 7 or any(d < 1 for d in dim[1 : ndim + 1]):
        raise _reject(Reason.UNREADABLE, rel, f"invalid dim field {dim[: ndim + 1] if ndim >= 0 else dim}")
    shape = tuple(dim[1 : ndim + 1])
    if ndim < 3 or any(d != 1 for d in shape[3:]):
        raise _reject(
            Reason.UNSUPPORTED_DIMENSIONS,
            rel,
            f"expected a 3D image (a trailing 4th dimension of 1 is allowed), found shape {list(shape)}; "
            "split 4D series into one 3D file per volume or channel (nnU-Net's _0000, _0001 naming)",
            shape=list(shape),
        )
    try:
        dtype = hdr.get_data_dtype()
    except (KeyError, HeaderDataError) as exc:
        raise _reject(Reason.UNREADABLE, rel, f"unknown NIfTI datatype code {int(hdr['datatype'])}") from exc
    if dtype.kind not in "iuf" or dtype.itemsize > 8:
        raise _reject(
            Reason.UNREADABLE,
            rel,
            f"datatype {dtype} is not a scalar integer or float image; convert to int16 or float32",
            datatype=str(dtype),
        )
    n_vox = int(np.prod(shape, dtype=np.int64))
    if n_vox > max_voxels:
        raise _reject(
            Reason.TOO_LARGE,
            rel,
            f"header declares {n_vox} voxels ({'x'.join(map(str, shape))}), over the limit of {max_voxels}",
            voxels=n_vox,
            max_voxels=max_voxels,
            shape=list(shape),
        )
    vox_offset = int(hdr["vox_offset"])
    if vox_offset < hdr.sizeof_hdr:
        raise _reject(
            Reason.UNREADABLE,
            rel,
            f"vox_offset {vox_offset} points inside the {hdr.sizeof_hdr}-byte header",
            vox_offset=vox_offset,
        )
    expected = vox_offset + n_vox * dtype.itemsize
    if expected > max_bytes:
        raise _reject(
            Reason.TOO_LARGE,
            rel,
            f"header declares {expected} bytes of image data, over the limit of {max_bytes}",
            bytes=expected,
            max_bytes=max_bytes,
            shape=list(shape),
        )
    return shape, dtype, vox_offset


class NiftiStream:
    """One open NIfTI file: its checked header, then its voxels chunk by chunk.

        with NiftiStream(path, rel, max_voxels=..., max_bytes=...) as nifti:
            nifti.header, nifti.shape, nifti.dtype   # checked before any voxel is read
            for start, chunk in nifti.chunks(): ...  # 1-D stored voxels, file (Fortran) order

    ``chunks`` may be iterated more than once (each pass re-reads the file). It raises
    InputRejected: TRUNCATED (fewer bytes than declared), TOO_LARGE (more than declared plus
    TRAILING_MARGIN in a .nii.gz), UNREADABLE (corrupt gzip). Opening raises what the header
    checks raise (UNREADABLE, TRUNCATED, TOO_LARGE, UNSUPPORTED_DIMENSIONS, ANALYZE_FORMAT).
    """

    def __init__(self, path: Path, rel: str, *, max_voxels: int, max_bytes: int) -> None:
        self.path, self.rel, self.max_bytes = Path(path), rel, max_bytes
        with open(self.path, "rb") as fh:
            self.gz = fh.read(2) == b"\x1f\x8b"  # sniff, don't trust the name
        with self._errors(), self._open() as stream:
            head = _read_exact(stream, 540)
        self.klass = _header_class(head, rel)
        size = self.klass.sizeof_hdr
        if len(head) < size:
            raise _reject(
                Reason.TRUNCATED,
                rel,
                f"file ends after {len(head)} bytes, inside its {size}-byte NIfTI header",
                found_bytes=len(head),
                expected_bytes=size,
            )
        self.header = _parse_header(self.klass, head[:size], rel)
        shape, self.dtype, self.vox_offset = _check_header(
            self.header, rel, max_voxels=max_voxels, max_bytes=max_bytes
        )
        self.full_shape = shape
        self.shape: tuple[int, int, int] = tuple(shape[:3])  # type: ignore[assignment]
        self.n_voxels = int(np.prod(shape, dtype=np.int64))
        self.expected = self.vox_offset + self.n_voxels * self.dtype.itemsize

    def __enter__(self) -> NiftiStream:
        return self

    def __exit__(self, *exc) -> None:
        return None

    def _open(self) -> BinaryIO:
        return gzip.open(self.path, "rb") if self.gz else open(self.path, "rb")  # type: ignore[return-value]

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        """Map the gzip module's errors to TRUNCATED and UNREADABLE rejections."""
        try:
            yield
        except EOFError as exc:  # gzip stream cut before its end marker
            raise _reject(
                Reason.TRUNCATED,
                self.rel,
                f"gzip stream ends early ({exc}); the file was cut during copy or download",
            ) from exc
        except (gzip.BadGzipFile, zlib.error) as exc:
            raise _reject(Reason.UNREADABLE, self.rel, f"corrupt gzip stream: {exc}") from exc

    def chunks(self) -> Iterator[tuple[int, np.ndarray]]:
        """(index of the first voxel, 1-D array of stored voxels) in file order, to the last voxel."""
        with self._errors():
            yield from self._chunks()

    def _chunks(self) -> Iterator[tuple[int, np.ndarray]]:
        remaining = self.n_voxels * self.dtype.itemsize
        with self._open() as stream:
            skipped = 0
            while skipped < self.vox_offset:  # header and extensions
                part = stream.read(min(CHUNK_BYTES, self.vox_offset - skipped))
                if not part:
                    break
                skipped += len(part)
            start = 0
            while remaining > 0:
                want = min(CHUNK_BYTES, remaining)
                piece = _read_exact(stream, want) if skipped == self.vox_offset else b""
                if len(piece) < want:
                    found = skipped + start * self.dtype.itemsize + len(piece)
                    voxels = "x".join(map(str, self.full_shape))
                    what = "decompressed stream" if self.gz else "file"
                    raise _reject(
                        Reason.TRUNCATED,
                        self.rel,
                        f"header declares {self.expected} bytes ({voxels} voxels of {self.dtype.name}) "
                        f"but the {what} holds {found}",
                        expected_bytes=self.expected,
                        found_bytes=found,
                    )
                remaining -= want
                chunk = np.frombuffer(piece, dtype=self.dtype)
                yield start, chunk
                start += chunk.size
            if self.gz:
                # Inflate no further than the declared size plus a margin, plus one byte to tell
                # "longer": a bomb stops here. Padding within the margin is tolerated. (An
                # uncompressed file costs nothing past its declared size: trailing bytes are left
                # unread, as nibabel does.)
                limit = max(self.expected, min(self.expected + TRAILING_MARGIN, self.max_bytes))
                extra = len(_read_exact(stream, limit - self.expected + 1))
                if self.expected + extra > limit:
                    raise _reject(
                        Reason.TOO_LARGE,
                        self.rel,
                        f"decompressed stream is longer than its header declares ({self.expected} bytes + "
                        f"{limit - self.expected} allowed padding); refused without reading further "
                        "(possible gzip bomb)",
                        declared_bytes=self.expected,
                        read_bytes_at_least=self.expected + extra,
                    )


def read_header_only(path: Path, rel: str) -> nib.Nifti1Header:
    """The parsed header of a NIfTI file (no limits checked, no voxel read)."""
    with open(path, "rb") as fh:
        gz = fh.read(2) == b"\x1f\x8b"
    opener = gzip.open if gz else open
    try:
        with opener(path, "rb") as stream:
            head = _read_exact(stream, 540)
    except (EOFError, OSError, zlib.error) as exc:
        raise _reject(Reason.UNREADABLE, rel, f"cannot read the NIfTI header: {exc}") from exc
    klass = _header_class(head, rel)
    if len(head) < klass.sizeof_hdr:
        raise _reject(Reason.TRUNCATED, rel, "file ends inside its NIfTI header")
    return _parse_header(klass, head[: klass.sizeof_hdr], rel)
