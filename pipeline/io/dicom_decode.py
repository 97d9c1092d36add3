"""Stored pixel values of one DICOM file: the decoder check, a direct read, pydicom otherwise.

Every failure is the file's `InputRejected` (MISSING_DECODER, TRUNCATED, UNREADABLE), never an
exception that stops a batch: hospital archives hold files that no decoder accepts.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NoReturn

import numpy as np
import pydicom
from pydicom.uid import UID

from pipeline.errors import InputRejected, Reason
from pipeline.io.dicom_header import DicomHeader, show
from pipeline.io.dicom_syntax import NATIVE, detect_transfer_syntax

# Which package decodes each compressed transfer syntax (for MISSING_DECODER messages).
DECODER_PACKAGES = {
    "1.2.840.10008.1.2.4.50": "pylibjpeg-libjpeg (or pillow)",
    "1.2.840.10008.1.2.4.51": "pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.57": "pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.70": "pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.80": "pyjpegls (or pylibjpeg-libjpeg)",
    "1.2.840.10008.1.2.4.81": "pyjpegls (or pylibjpeg-libjpeg)",
    "1.2.840.10008.1.2.4.90": "pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.91": "pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.201": "pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.202": "pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.203": "pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.5": "pylibjpeg-rle",
}


def require_decoder(transfer_syntax: str, rel: str) -> None:
    """Raise MISSING_DECODER, naming the syntax and the package, before any pixel is read."""
    uid = UID(transfer_syntax)
    package = DECODER_PACKAGES.get(transfer_syntax)
    try:
        decoder = pydicom.pixels.get_decoder(uid)
    except NotImplementedError:
        decoder = None
    if decoder is not None and decoder.is_available:
        return
    if package:
        advice = f"install {package} (pinned in requirements.lock) and run ingest again"
    else:
        advice = (
            "pydicom has no decoder for it: convert the series to a lossless syntax (e.g. gdcmconv --raw)"
        )
    raise InputRejected(
        Reason.MISSING_DECODER,
        rel,
        f"pixel data are encoded as {show(uid.name, 100)} ({show(str(uid), 70)}); "
        f"no decoder is installed: {advice}.",
        {"transfer_syntax": show(uid.name, 100), "package": package},
    )


@contextlib.contextmanager
def _decode_errors(rel: str) -> Iterator[None]:
    """Map whatever reading or decoding one file raises to that file's InputRejected."""
    try:
        yield
    except InputRejected:
        raise
    except (EOFError, ValueError) as exc:
        # pydicom reports short native pixel data and cut encapsulated fragments this way.
        text = str(exc)
        truncated = isinstance(exc, EOFError) or any(w in text for w in ("length", "end of", "expected"))
        raise InputRejected(
            Reason.TRUNCATED if truncated else Reason.UNREADABLE,
            rel,
            f"pixel data cannot be decoded: {show(text, 200)}",
        ) from None
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - a decoder failing in any way on one file is its reason
        raise InputRejected(
            Reason.UNREADABLE,
            rel,
            f"pixel data cannot be decoded: {type(exc).__name__}: {show(str(exc), 200)}",
        ) from None


def _read_dataset(path: str | Path, rel: str, transfer_syntax: str | None) -> pydicom.Dataset:
    """The file's data set, its meta naming the syntax its pixel data are written in.

    Call inside `_decode_errors`. Raises TRUNCATED for a cut encapsulated stream and
    MISSING_DECODER when no decoder for the syntax is installed.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # force: data sets without preamble or file meta are read like any other.
        ds = pydicom.dcmread(path, force=True)
    # pydicom reads a cut encapsulated stream with only a warning; for us it is a refusal.
    cut = [str(w.message) for w in caught if "End of file reached" in str(w.message)]
    if cut:
        raise InputRejected(
            Reason.TRUNCATED,
            rel,
            f"the file ends inside its pixel data ({show(cut[0], 120)}); re-export or re-copy it.",
        )
    declared = str(ds.file_meta.get("TransferSyntaxUID", "")).strip() or None
    if declared is None:
        if transfer_syntax is None:
            with open(path, "rb") as fh:
                transfer_syntax = detect_transfer_syntax(fh, None, rel)
        # pydicom decodes by the file meta's syntax: give it the one the data are written in.
        ds.file_meta.TransferSyntaxUID = UID(transfer_syntax)
    require_decoder(transfer_syntax or str(declared), rel)
    return ds


def decode_stored(path: str | Path, rel: str, transfer_syntax: str | None = None) -> np.ndarray:
    """Stored values of every frame of one DICOM file: (frames, rows, columns[, samples]).

    No rescale, no photometric change: what the encoder was given. The decoder is checked first
    (MISSING_DECODER); a short or cut pixel stream is TRUNCATED, anything else UNREADABLE.
    `transfer_syntax`: the effective syntax found by the header pass; without it, a file whose
    meta does not name its syntax (or that has no meta) is decoded in the syntax its data show.
    """
    with _decode_errors(rel):
        ds = _read_dataset(path, rel, transfer_syntax)
        pixels = np.asarray(ds.pixel_array)
        n_frames = int(ds.get("NumberOfFrames") or 1)
    return pixels[np.newaxis] if n_frames == 1 else pixels


def _native_dtype(header: DicomHeader) -> str | None:
    """The numpy dtype of a file's stored values when they can be read straight from the file.

    Native syntax, one sample, 8 or 16 bits allocated: the pixel values are a plain array at the
    offset the header pass found, so pydicom's full re-parse of the file is skipped (most of a
    conversion's time otherwise). None otherwise: the file is decoded through pydicom.
    """
    if (
        header.pixel_offset is None
        or header.transfer_syntax not in NATIVE
        or header.samples_per_pixel != 1
        or header.bits_allocated not in (8, 16)
        or (header.pixel_representation == 1 and header.bits_stored != header.bits_allocated)
    ):
        return None
    endian = "<" if NATIVE[header.transfer_syntax][1] else ">"
    return (
        endian
        + {(8, 0): "u1", (8, 1): "i1", (16, 0): "u2", (16, 1): "i2"}[
            (header.bits_allocated, header.pixel_representation)
        ]
    )


def _read_native_frame(header: DicomHeader, dtype: str, frame: int) -> np.ndarray | None:
    """One frame's stored values read straight from the file, or None where pydicom must decide.

    None when the result could differ from pydicom's: bits above BitsStored set (overlays), or a
    file changed since the scan (shorter than its header said).
    """
    count = header.rows * header.columns
    offset = header.pixel_offset + frame * count * np.dtype(dtype).itemsize  # type: ignore[operator]
    try:
        pixels = np.fromfile(header.path, dtype=dtype, count=count, offset=offset)
    except (OSError, ValueError):
        return None
    if pixels.size != count:
        return None
    if header.bits_stored < header.bits_allocated and int(pixels.max()) >= 1 << header.bits_stored:
        return None  # bits above BitsStored are set (overlays): let pydicom apply its rules
    pixels = pixels.astype(pixels.dtype.newbyteorder("="), copy=False)  # big endian: to native order
    return pixels.reshape(header.rows, header.columns)


def iter_frames(header: DicomHeader, frames: Iterable[int]) -> Iterator[tuple[int, np.ndarray]]:
    """(frame index, stored values (rows, columns)) for each of `frames` of one scanned file.

    One frame at a time, so a caller that copies each into its output holds one frame, never the
    whole file's pixels: native files are read frame by frame at the offset the header pass found,
    others decoded frame by frame by pydicom. Frames come in ascending order. Each frame's shape
    is checked against what the header declared at scan time (UNREADABLE if it changed); errors
    are the file's InputRejected (MISSING_DECODER, TRUNCATED, UNREADABLE).
    """
    wanted = sorted(set(frames))
    dtype = _native_dtype(header)
    if dtype is not None:
        while wanted:
            pixels = _read_native_frame(header, dtype, wanted[0])
            if pixels is None:
                break  # this frame and the rest: through pydicom
            yield wanted.pop(0), pixels
    if not wanted:
        return
    with _decode_errors(header.rel):
        ds = _read_dataset(header.path, header.rel, header.transfer_syntax)
        declared = int(ds.get("NumberOfFrames") or 1)
        frames_of = pydicom.pixels.iter_pixels(ds, indices=wanted)
    if declared != header.number_of_frames:
        _changed(header, f"{declared} frame(s)")
    for frame in wanted:
        with _decode_errors(header.rel):
            pixels = np.asarray(next(frames_of))
        if pixels.shape != (header.rows, header.columns):
            _changed(header, f"frames of shape {pixels.shape}")
        yield frame, pixels


def _changed(header: DicomHeader, found: str) -> NoReturn:
    raise InputRejected(
        Reason.UNREADABLE,
        header.rel,
        f"decoded pixel data hold {found}; the header declared {header.number_of_frames} frame(s) of "
        f"{header.rows} x {header.columns} when scanned. Was the file replaced? Run ingest again.",
    )
