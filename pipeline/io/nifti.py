"""NIfTI images and label maps (.nii, .nii.gz): bounded reading, geometry checks, pairing.

Reading is defensive because NIfTI files come from anywhere: the header is parsed first and the
declared size checked against the limits before any voxel buffer exists; a .nii.gz is inflated in
chunks and never past the size its header declares (plus a small margin), so a gzip bomb costs
a few kilobytes of reading, not gigabytes of memory.

Which affine: the sform when its code is > 0, else the qform when its code is > 0, else the
pixdim-only base affine (orientation unknown; recorded as ``meta["affine_source"] == "none"``).
This is nibabel's ``get_best_affine`` and what nnU-Net v2's NibabelIO uses. When both codes are
> 0 the two must agree (QFORM_SFORM_MISMATCH otherwise), because tools that read the other one
(ITK and therefore SimpleITK-based tools prefer the qform in some versions) would place the image
elsewhere.

Pairing rule for a plain folder of NIfTI files (``pair_nifti_files``):

1. Suffix rule: ``DIR/NAME_seg.nii.gz``, ``DIR/NAME_label.nii.gz``, ``DIR/NAME_labels.nii.gz``
   and ``DIR/NAME_mask.nii.gz`` (suffix case-insensitive; .nii or .nii.gz) are the label of the
   image ``DIR/NAME.nii.gz`` or ``DIR/NAME.nii`` in the same folder.
2. Folder rule: a file anywhere under a folder named ``labels``, ``masks`` or ``segmentations``
   is the label of the file at the same relative path under the sibling folder ``images``
   (``A/labels/x/NAME.nii.gz`` -> ``A/images/x/NAME.nii.gz``; the extension may differ).
3. Every other NIfTI file is an image; images without a label are unlabelled cases.

A label whose image is absent is rejected with MISSING_LABEL_SOURCE. An image matched by more
than one label, or two images differing only by extension (``NAME.nii`` and ``NAME.nii.gz``), are
ambiguous: every file involved is rejected with INVALID_DATASET, never resolved by guessing.
macOS resource forks (``._NAME.nii.gz``) are NOT_DICOM (ignored). A case's ``key`` is its image
path relative to the root (POSIX separators), which is stable across runs and machines.
"""

from __future__ import annotations

import gzip
import io
import itertools
import logging
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import BinaryIO

import nibabel as nib
import numpy as np
from nibabel.spatialimages import HeaderDataError

from pipeline.errors import InputRejected, Reason
from pipeline.io.volume import Volume

log = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii.gz", ".nii")
LABEL_SUFFIXES = ("_seg", "_label", "_labels", "_mask")
LABEL_DIRS = ("labels", "masks", "segmentations")
IMAGE_DIR = "images"

# Bytes tolerated after the declared voxel data (some writers pad); anything longer is refused.
TRAILING_MARGIN = 64 * 1024
CHUNK = 1 << 20  # inflate 1 MiB at a time
DEFAULT_TOL_MM = 1e-3  # geometry agreement (qform/sform, image/label), as the 1e-3 mm
ORTHONORMAL_TOL = 1e-4  # |R^T R - I|; DICOM-derived cosines written with 6 decimals stay well under
MAX_LABEL = 65535  # labels are stored as uint16 at most


def is_nifti(path: str | Path) -> bool:
    """True for names ending in .nii or .nii.gz (any case)."""
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def nifti_stem(name: str) -> str:
    """``NAME`` of ``NAME.nii.gz`` / ``NAME.nii`` (any case)."""
    lower = name.lower()
    for suffix in NIFTI_SUFFIXES:
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return name


# --------------------------------------------------------------------------------------------
# Reading


@dataclass
class _Raw:
    """Voxels as stored (scaled when the header says so, native byte order) plus geometry."""

    data: np.ndarray  # 3D
    affine: np.ndarray
    meta: dict


def _reject(reason: Reason, rel: str, message: str, **details) -> InputRejected:
    return InputRejected(reason, rel, message, details)


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


def _fill(stream: BinaryIO, buf: bytearray, upto: int) -> bytearray:
    """Append from ``stream`` to ``buf`` until it holds ``upto`` bytes or the stream ends."""
    while len(buf) < upto:
        chunk = stream.read(min(CHUNK, upto - len(buf)))
        if not chunk:
            break
        buf += chunk
    return buf


def _read_raw(path: Path, rel: str, *, max_voxels: int, max_bytes: int, tol_mm: float) -> _Raw:
    path = Path(path)
    with open(path, "rb") as fh:
        gz = fh.read(2) == b"\x1f\x8b"  # sniff, don't trust the name
    try:
        opener = gzip.open if gz else open
        with opener(path, "rb") as stream:
            content = _fill(stream, bytearray(), 540)
            head = bytes(content)
            klass = _header_class(head, rel)
            sizeof_hdr = klass.sizeof_hdr
            if len(head) < sizeof_hdr:
                raise _reject(
                    Reason.TRUNCATED,
                    rel,
                    f"file ends after {len(head)} bytes, inside its {sizeof_hdr}-byte NIfTI header",
                    found_bytes=len(head),
                    expected_bytes=sizeof_hdr,
                )
            hdr = _parse_header(klass, head[:sizeof_hdr], rel)
            shape, dtype, vox_offset = _check_header(hdr, rel, max_voxels=max_voxels, max_bytes=max_bytes)
            n_vox = int(np.prod(shape))
            expected = vox_offset + n_vox * dtype.itemsize
            if gz:
                # Inflate no further than the declared size plus a margin, plus one byte to tell
                # "longer": a bomb stops here. Padding within the margin is tolerated.
                limit = max(expected, min(expected + TRAILING_MARGIN, max_bytes))
                _fill(stream, content, limit + 1)
            else:
                # An uncompressed file costs nothing past its declared size: trailing bytes are
                # left unread, as nibabel does.
                limit = expected
                _fill(stream, content, expected)
    except EOFError as exc:  # gzip stream cut before its end marker
        raise _reject(
            Reason.TRUNCATED,
            rel,
            f"gzip stream ends early ({exc}); the file was cut during copy or download",
        ) from exc
    except (gzip.BadGzipFile, zlib.error) as exc:
        raise _reject(Reason.UNREADABLE, rel, f"corrupt gzip stream: {exc}") from exc
    if len(content) > limit:
        raise _reject(
            Reason.TOO_LARGE,
            rel,
            f"{'decompressed stream' if gz else 'file'} is longer than its header declares "
            f"({expected} bytes + {limit - expected} allowed padding); refused without reading further "
            "(possible gzip bomb)",
            declared_bytes=expected,
            read_bytes_at_least=len(content),
        )
    if len(content) < expected:
        raise _reject(
            Reason.TRUNCATED,
            rel,
            f"header declares {expected} bytes ({'x'.join(map(str, shape))} voxels of {dtype.name}) but the "
            f"{'decompressed stream' if gz else 'file'} holds {len(content)}",
            expected_bytes=expected,
            found_bytes=len(content),
        )

    data = np.frombuffer(content, dtype=dtype, count=n_vox, offset=vox_offset)
    data = data.reshape(shape, order="F").astype(dtype.newbyteorder("="), copy=True)
    data = data.reshape(shape[:3], order="F")  # drop trailing singleton dims (checked above)
    slope, inter = hdr.get_slope_inter()
    if slope is not None and (slope != 1 or (inter or 0) != 0):
        # Scaled integers become float32 (float64 stays float64 until load_nifti narrows it).
        work = np.float64 if data.dtype == np.float64 else np.float32
        data = data.astype(work) * work(slope) + work(inter or 0)
    if data.dtype.kind == "f":
        n_nan = int(np.isnan(data).sum())
        n_inf = int(np.isinf(data).sum())
        if n_nan or n_inf:
            raise _reject(
                Reason.NON_FINITE_VOXELS,
                rel,
                f"{n_nan} NaN and {n_inf} infinite voxels of {data.size}; fix or mask them at the source",
                nan_voxels=n_nan,
                inf_voxels=n_inf,
                voxels=int(data.size),
            )
    affine, source = _check_affine(hdr, shape[:3], rel, tol_mm=tol_mm)
    meta = {
        "affine_source": source,
        "nifti_version": 2 if klass is nib.Nifti2Header else 1,
        "stored_dtype": dtype.newbyteorder("=").name,
        "gzip": gz,
    }
    return _Raw(data, affine, meta)


def _parse_header(klass: type[nib.Nifti1Header], block: bytes, rel: str) -> nib.Nifti1Header:
    try:
        hdr = klass.from_fileobj(io.BytesIO(block), check=False)
    except (ValueError, HeaderDataError) as exc:
        raise _reject(Reason.UNREADABLE, rel, f"NIfTI header cannot be parsed: {exc}") from exc
    magic = bytes(hdr["magic"])
    if magic.startswith((b"ni1", b"ni2")):
        raise _reject(
            Reason.UNREADABLE,
            rel,
            "this is the header of a .hdr/.img pair; convert it to a single .nii/.nii.gz file",
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


def _corners(shape: tuple[int, ...]) -> np.ndarray:
    """(4, 8) homogeneous voxel coordinates of the volume's corner voxel centres."""
    pts = np.array(list(itertools.product(*[(0, n - 1) for n in shape[:3]])), float)
    return np.vstack([pts.T, np.ones(len(pts))])


def corner_distance_mm(a: np.ndarray, b: np.ndarray, shape: tuple[int, ...]) -> float:
    """Largest distance in mm between where affines ``a`` and ``b`` put the volume's corners."""
    c = _corners(shape)
    return float(np.max(np.linalg.norm((a @ c - b @ c)[:3], axis=0)))


def _check_affine(hdr: nib.Nifti1Header, shape: tuple[int, ...], rel: str, *, tol_mm: float):
    qform, qcode = hdr.get_qform(coded=True)
    sform, scode = hdr.get_sform(coded=True)
    if scode:
        affine, source = sform, "sform"
    elif qcode:
        affine, source = qform, "qform"
    else:
        affine, source = hdr.get_base_affine(), "none"
        log.warning("%s: qform_code and sform_code are both 0; orientation is unknown (pixdim only)", rel)
    m = np.asarray(affine, float)[:3, :3]
    norms = np.linalg.norm(m, axis=0)
    if not np.all(np.isfinite(affine)) or np.any(norms <= 0):
        raise _reject(
            Reason.NON_ORTHONORMAL_AFFINE,
            rel,
            f"{source} affine is degenerate (zero or non-finite voxel axes): {np.round(affine, 6).tolist()}",
            affine=np.asarray(affine, float).round(6).tolist(),
            affine_source=source,
        )
    r = m / norms
    deviation = float(np.max(np.abs(r.T @ r - np.eye(3))))
    if deviation > ORTHONORMAL_TOL:
        angles = {
            f"angle_{a}{b}_deg": round(float(np.degrees(np.arccos(np.clip(r[:, x] @ r[:, y], -1, 1)))), 4)
            for (x, a), (y, b) in itertools.combinations(enumerate("ijk"), 2)
        }
        raise _reject(
            Reason.NON_ORTHONORMAL_AFFINE,
            rel,
            f"{source} voxel axes are not orthogonal (sheared): max |R^T R - I| = {deviation:.3g} "
            f"(tolerance {ORTHONORMAL_TOL}), axis angles {angles}; resample onto an orthogonal grid",
            max_deviation=deviation,
            affine_source=source,
            **angles,
        )
    if qcode and scode:
        diff = corner_distance_mm(qform, sform, shape)
        if diff > tol_mm:
            raise _reject(
                Reason.QFORM_SFORM_MISMATCH,
                rel,
                f"qform (code {int(qcode)}) and sform (code {int(scode)}) place the volume's corners up to "
                f"{diff:.4g} mm apart (tolerance {tol_mm} mm); tools disagree on where this image is. "
                "Rewrite the file with one affine in both (e.g. nibabel set_qform(img.get_sform()))",
                max_corner_difference_mm=diff,
                tolerance_mm=tol_mm,
                qform_code=int(qcode),
                sform_code=int(scode),
            )
    return np.asarray(affine, float), source


def load_nifti(
    path: Path, rel: str, *, max_voxels: int, max_bytes: int, tol_mm: float = DEFAULT_TOL_MM
) -> Volume:
    """Read a 3D NIfTI image (.nii or .nii.gz) after checking it; raise InputRejected otherwise.

    Float images come back float32, integer images keep their integer type (scaled integers,
    scl_slope != 1 or scl_inter != 0, become float32). ``max_voxels`` and ``max_bytes`` bound the
    header-declared size, checked before any voxel buffer is allocated; ``tol_mm`` is the largest
    qform/sform disagreement accepted. Reasons: UNREADABLE, TRUNCATED, TOO_LARGE,
    UNSUPPORTED_DIMENSIONS, NON_FINITE_VOXELS, NON_ORTHONORMAL_AFFINE, QFORM_SFORM_MISMATCH.
    """
    raw = _read_raw(Path(path), rel, max_voxels=max_voxels, max_bytes=max_bytes, tol_mm=tol_mm)
    data = raw.data
    if data.dtype.kind == "f" and data.dtype != np.float32:
        data = data.astype(np.float32)
    return Volume(data, raw.affine, meta=raw.meta)


def _value_counts(data: np.ndarray) -> dict[int, int]:
    """{value: voxel count} of an integer array; bincount when the range is small (fast)."""
    lo, hi = int(data.min()), int(data.max())
    if hi - lo <= 1 << 20:
        counts = np.bincount(data.ravel().astype(np.int64) - lo)
        return {lo + int(v): int(counts[v]) for v in np.flatnonzero(counts)}
    values, counts = np.unique(data, return_counts=True)
    return dict(zip((int(v) for v in values), (int(c) for c in counts), strict=True))


def load_label(
    path: Path,
    rel: str,
    image: Volume,
    *,
    allowed_labels: set[int] | None,
    max_voxels: int,
    max_bytes: int,
    tol_mm: float = DEFAULT_TOL_MM,
) -> Volume:
    """Read the label map of ``image`` and check it against the image and the declared labels.

    Returns uint8 (uint16 when a label exceeds 255) on the image's grid: the image's affine is
    used (the label's own agrees within ``tol_mm`` at every corner). ``allowed_labels`` comes
    from dataset.json (None: any value 0..65535). Reasons: everything ``load_nifti`` raises, plus
    LABEL_GEOMETRY_MISMATCH, NON_INTEGER_LABELS, UNEXPECTED_LABELS.
    """
    raw = _read_raw(Path(path), rel, max_voxels=max_voxels, max_bytes=max_bytes, tol_mm=tol_mm)
    if raw.data.shape != image.shape:
        raise _reject(
            Reason.LABEL_GEOMETRY_MISMATCH,
            rel,
            f"label shape {list(raw.data.shape)} differs from image shape {list(image.shape)}",
            label_shape=list(raw.data.shape),
            image_shape=list(image.shape),
        )
    diff = corner_distance_mm(raw.affine, image.affine, image.shape)
    if diff > tol_mm:
        raise _reject(
            Reason.LABEL_GEOMETRY_MISMATCH,
            rel,
            f"label and image affines place the volume's corners up to {diff:.4g} mm apart "
            f"(tolerance {tol_mm} mm); the label was saved on another grid",
            max_corner_difference_mm=diff,
            tolerance_mm=tol_mm,
            label_affine=raw.affine.round(6).tolist(),
            image_affine=image.affine.round(6).tolist(),
        )
    data = raw.data
    if data.dtype.kind == "f":
        fractional = data != np.round(data)
        n_bad = int(fractional.sum())
        if n_bad:
            examples = sorted({round(float(v), 6) for v in np.unique(data[fractional])[:5]})
            raise _reject(
                Reason.NON_INTEGER_LABELS,
                rel,
                f"{n_bad} voxels hold non-integer values (e.g. {examples}); a label map holds class "
                "numbers only (was it resampled with linear interpolation?)",
                non_integer_voxels=n_bad,
                examples=examples,
            )
        data = np.clip(data, -(2**62), 2**62).astype(np.int64)  # clip: no overflow on absurd values
    counts = _value_counts(data)
    allowed = None if allowed_labels is None else {int(v) for v in allowed_labels}
    unexpected = sorted(
        v for v in counts if not 0 <= v <= MAX_LABEL or (allowed is not None and v not in allowed)
    )
    if unexpected:
        expected = f"0..{MAX_LABEL}" if allowed is None else sorted(allowed)
        raise _reject(
            Reason.UNEXPECTED_LABELS,
            rel,
            f"label values {unexpected[:20]} are not declared (expected {expected}); "
            "declare them in dataset.json 'labels' or fix the label map",
            unexpected=unexpected[:100],
            voxel_counts={str(v): counts[v] for v in unexpected[:100]},
            allowed=None if allowed is None else sorted(allowed),
        )
    out_dtype = np.uint8 if max(counts) <= 255 else np.uint16
    meta = {**raw.meta, "label_values": sorted(counts)}
    return Volume(data.astype(out_dtype), image.affine.copy(), modality=image.modality, meta=meta)


# --------------------------------------------------------------------------------------------
# Pairing


@dataclass(frozen=True)
class NiftiCase:
    """One NIfTI case: its channel files in order, an optional label, and a stable key.

    Paths are POSIX strings relative to the root the caller gave. ``key`` is the relative path of
    the (first-channel) image and feeds the HMAC case id.
    """

    key: str
    image: str  # the image, or its first channel (_0000)
    label: str | None = None
    channels: tuple[str, ...] = field(default=())  # every channel file in order; (image,) if one
    split: str | None = None  # "training" / "test" for dataset layouts, None for plain folders

    def __post_init__(self) -> None:
        if not self.channels:
            object.__setattr__(self, "channels", (self.image,))


def _rel(path: Path, root: Path) -> PurePosixPath:
    path = Path(path)
    return PurePosixPath((path.relative_to(root) if path.is_absolute() else path).as_posix())


def _label_target(rel: PurePosixPath) -> tuple[PurePosixPath, str] | None:
    """(image folder, image stem) a label file points at, or None if ``rel`` is not a label."""
    parts = rel.parts
    for i, part in enumerate(parts[:-1]):
        if part.lower() in LABEL_DIRS:
            folder = PurePosixPath(*parts[:i], IMAGE_DIR, *parts[i + 1 : -1])
            return folder, nifti_stem(rel.name)
    stem = nifti_stem(rel.name)
    for suffix in LABEL_SUFFIXES:
        if stem.lower().endswith(suffix) and len(stem) > len(suffix):
            return rel.parent, stem[: -len(suffix)]
    return None


def pair_nifti_files(files: list[Path], root: Path) -> tuple[list[NiftiCase], list[InputRejected]]:
    """Pair the NIfTI files of a plain folder into cases by the rule in the module docstring.

    ``files`` may be absolute (under ``root``) or relative to it; names that are not .nii/.nii.gz
    are skipped (the caller routes them). Cases come back sorted by key. Every NIfTI file given
    ends up in exactly one case or one rejection.
    """
    root = Path(root)
    rejected: list[InputRejected] = []
    images: dict[tuple[PurePosixPath, str], list[PurePosixPath]] = {}
    labels: dict[tuple[PurePosixPath, str], list[PurePosixPath]] = {}
    for f in sorted({_rel(f, root) for f in files}):
        if not is_nifti(f.name):
            continue
        if f.name.startswith("._"):
            rejected.append(_reject(Reason.NOT_DICOM, str(f), "macOS resource fork (._ file), not an image"))
            continue
        target = _label_target(f)
        if target is None:
            images.setdefault((f.parent, nifti_stem(f.name)), []).append(f)
        else:
            labels.setdefault(target, []).append(f)

    cases = []
    for (folder, stem), imgs in images.items():
        labs = labels.pop((folder, stem), [])
        if len(imgs) > 1 or len(labs) > 1:
            what = (
                f"{len(imgs)} images named {stem} ({', '.join(map(str, imgs))})"
                if len(imgs) > 1
                else f"{len(labs)} labels for image {imgs[0]} ({', '.join(map(str, labs))})"
            )
            for f in imgs + labs:
                rejected.append(
                    _reject(
                        Reason.INVALID_DATASET,
                        str(f),
                        f"ambiguous pairing: {what}; keep one of them",
                        images=[str(i) for i in imgs],
                        labels=[str(x) for x in labs],
                    )
                )
            continue
        image = str(imgs[0])
        cases.append(NiftiCase(key=image, image=image, label=str(labs[0]) if labs else None))
    for (folder, stem), labs in labels.items():
        for f in labs:
            expected = f"{(folder / stem).as_posix()}.nii.gz (or .nii)"
            rejected.append(
                _reject(
                    Reason.MISSING_LABEL_SOURCE,
                    str(f),
                    f"label without an image: expected {expected} next to it by the pairing rule "
                    "(NAME_seg/_label/_labels/_mask beside NAME, or labels/ beside images/)",
                    expected_image=expected,
                )
            )
    cases.sort(key=lambda c: c.key)
    return cases, rejected
