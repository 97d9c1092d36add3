"""Stored pixel values of one DICOM file: the decoder check, a direct read, pydicom otherwise.

Every failure is the file's `InputRejected` (MISSING_DECODER, TRUNCATED, UNREADABLE), never an
exception that stops a batch: hospital archives hold files that no decoder accepts.
"""

from __future__ import annotations

import warnings
from pathlib import Path

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


def decode_stored(path: str | Path, rel: str, transfer_syntax: str | None = None) -> np.ndarray:
    """Stored values of every frame of one DICOM file: (frames, rows, columns[, samples]).

    No rescale, no photometric change: what the encoder was given. The decoder is checked first
    (MISSING_DECODER); a short or cut pixel stream is TRUNCATED, anything else UNREADABLE.
    `transfer_syntax`: the effective syntax found by the header pass; without it, a file whose
    meta does not name its syntax (or that has no meta) is decoded in the syntax its data show.
    """
    try:
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
        pixels = np.asarray(ds.pixel_array)
        n_frames = int(ds.get("NumberOfFrames") or 1)
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
    return pixels[np.newaxis] if n_frames == 1 else pixels


def _read_native(header: DicomHeader) -> np.ndarray | None:
    """Stored values read straight from the file for the common native case, else None.

    Native syntax, one sample, 8 or 16 bits allocated: the pixel values are a plain array at the
    offset the header pass found, so pydicom's full re-parse of the file is skipped (most of a
    conversion's time otherwise). Whenever the result could differ from pydicom's (bits stored
    below bits allocated with values above them, a file changed since the scan) this returns
    None and the caller decodes through pydicom.
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
    dtype = (
        endian
        + {(8, 0): "u1", (8, 1): "i1", (16, 0): "u2", (16, 1): "i2"}[
            (header.bits_allocated, header.pixel_representation)
        ]
    )
    count = header.number_of_frames * header.rows * header.columns
    try:
        pixels = np.fromfile(header.path, dtype=dtype, count=count, offset=header.pixel_offset)
    except (OSError, ValueError):
        return None
    if pixels.size != count:
        return None
    if header.bits_stored < header.bits_allocated and int(pixels.max()) >= 1 << header.bits_stored:
        return None  # bits above BitsStored are set (overlays): let pydicom apply its rules
    pixels = pixels.astype(pixels.dtype.newbyteorder("="), copy=False)  # big endian: to native order
    return pixels.reshape(header.number_of_frames, header.rows, header.columns)


def decode_header(header: DicomHeader) -> np.ndarray:
    """Stored values of one scanned file, checked against what its header declared at scan time."""
    pixels = _read_native(header)
    if pixels is None:
        pixels = decode_stored(header.path, header.rel, header.transfer_syntax)
    expected = (header.number_of_frames, header.rows, header.columns)
    if pixels.shape != expected:
        raise InputRejected(
            Reason.UNREADABLE,
            header.rel,
            f"decoded pixel array has shape {pixels.shape}; the header declared {expected} "
            "(frames, rows, columns) when scanned. Was the file replaced? Run ingest again.",
        )
    return pixels
