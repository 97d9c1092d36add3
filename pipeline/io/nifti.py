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
import itertools
import logging
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import nibabel as nib
import numpy as np
from nibabel.spatialimages import HeaderDataError

from pipeline.errors import InputRejected, Reason
from pipeline.io.nifti_stream import NiftiStream, read_header_only
from pipeline.io.volume import Volume

log = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii.gz", ".nii")
LABEL_SUFFIXES = ("_seg", "_label", "_labels", "_mask")
LABEL_DIRS = ("labels", "masks", "segmentations")
IMAGE_DIR = "images"

COUNT_CHUNK = 1 << 22  # voxels counted at a time (bounded temporaries)
COUNT_PIECE = 1 << 18  # voxels widened to int64 at a time by bincount (2 MiB)
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
# Reading (streamed: pipeline.io.nifti_stream)


def _reject(reason: Reason, rel: str, message: str, **details) -> InputRejected:
    return InputRejected(reason, rel, message, details)


def _scaling(hdr: nib.Nifti1Header) -> tuple[float, float] | None:
    """(scl_slope, scl_inter) when the header scales its values, else None."""
    slope, inter = hdr.get_slope_inter()
    if slope is not None and (slope != 1 or (inter or 0) != 0):
        return float(slope), float(inter or 0)
    return None


def _scale_into(chunk: np.ndarray, dst: np.ndarray, scale: tuple[float, float] | None) -> None:
    """Write ``chunk`` (stored voxels) into ``dst``, scaled when ``scale`` says so.

    Scaled integers are computed in float32 (float64 voxels in float64, then narrowed), as
    ``astype(float32) * slope + inter`` would, but one chunk at a time."""
    if scale is None:
        dst[...] = chunk
    elif chunk.dtype.kind == "f" and chunk.dtype.itemsize == 8:
        dst[...] = chunk * scale[0] + scale[1]
    else:
        np.multiply(chunk, np.float32(scale[0]), out=dst, dtype=np.float32, casting="unsafe")
        np.add(dst, np.float32(scale[1]), out=dst, dtype=np.float32, casting="unsafe")


def _non_finite(rel: str, n_nan: int, n_inf: int, size: int) -> InputRejected:
    return _reject(
        Reason.NON_FINITE_VOXELS,
        rel,
        f"{n_nan} NaN and {n_inf} infinite voxels of {size}; fix or mask them at the source",
        nan_voxels=n_nan,
        inf_voxels=n_inf,
        voxels=size,
    )


def _meta(nifti: NiftiStream, source: str) -> dict:
    return {
        "affine_source": source,
        "nifti_version": 2 if nifti.klass is nib.Nifti2Header else 1,
        "stored_dtype": nifti.dtype.newbyteorder("=").name,
        "gzip": nifti.gz,
    }


def load_nifti(
    path: Path,
    rel: str,
    *,
    max_voxels: int,
    max_bytes: int,
    tol_mm: float = DEFAULT_TOL_MM,
    allow_no_orientation: bool = False,
) -> Volume:
    """Read a 3D NIfTI image (.nii or .nii.gz) after checking it; raise InputRejected otherwise.

    Float images come back float32, integer images keep their integer type (scaled integers,
    scl_slope != 1 or scl_inter != 0, become float32). ``max_voxels`` and ``max_bytes`` bound the
    header-declared size, checked before any voxel buffer is allocated; ``tol_mm`` is the largest
    qform/sform disagreement accepted; ``allow_no_orientation`` accepts qform_code = sform_code = 0
    (the pixdim-only affine, ``meta["affine_source"] == "none"``). Reasons: UNREADABLE, TRUNCATED,
    TOO_LARGE, UNSUPPORTED_DIMENSIONS, NON_FINITE_VOXELS, NON_ORTHONORMAL_AFFINE,
    QFORM_SFORM_MISMATCH, NO_ORIENTATION, ANALYZE_FORMAT.

    Memory: the returned array plus one chunk (the voxels are streamed into it).
    """
    nifti = NiftiStream(Path(path), rel, max_voxels=max_voxels, max_bytes=max_bytes)
    affine, source = _check_affine(
        nifti.header, nifti.shape, rel, tol_mm=tol_mm, allow_no_orientation=allow_no_orientation
    )
    scale = _scaling(nifti.header)
    out_dtype = np.dtype(np.float32) if scale or nifti.dtype.kind == "f" else nifti.dtype.newbyteorder("=")
    out = np.empty(nifti.n_voxels, dtype=out_dtype)
    n_nan = n_inf = 0
    for start, chunk in nifti.chunks():
        dst = out[start : start + chunk.size]
        _scale_into(chunk, dst, scale)
        if out_dtype.kind == "f":
            n_nan += int(np.count_nonzero(np.isnan(dst)))
            n_inf += int(np.count_nonzero(np.isinf(dst)))
    if n_nan or n_inf:
        raise _non_finite(rel, n_nan, n_inf, nifti.n_voxels)
    data = out.reshape(nifti.shape, order="F")  # a view: trailing dimensions of 1 dropped
    return Volume(data, affine, meta=_meta(nifti, source))


def _counts_1d(data: np.ndarray) -> dict[int, int]:
    """{value: count} of a 1-D integer array; bincount over pieces (it widens to int64)."""
    lo, hi = int(data.min()), int(data.max())
    if hi - lo <= 1 << 20:
        counts = np.zeros(hi - lo + 1, np.int64)
        for start in range(0, data.size, COUNT_PIECE):
            counts += np.bincount(
                data[start : start + COUNT_PIECE].astype(np.int64) - lo, minlength=counts.size
            )
        return {lo + int(v): int(counts[v]) for v in np.flatnonzero(counts)}
    values, counts = np.unique(data, return_counts=True)
    return dict(zip((int(v) for v in values), (int(c) for c in counts), strict=True))


def value_counts(data: np.ndarray) -> dict[int, int]:
    """{value: voxel count} of an integer array, counted slab by slab (bounded temporaries)."""
    total: Counter[int] = Counter()
    if data.size == 0:
        return {}
    if data.ndim <= 1:
        flat = data.reshape(-1)
        for start in range(0, flat.size, COUNT_CHUNK):
            total.update(_counts_1d(flat[start : start + COUNT_CHUNK]))
        return dict(total)
    per_slab = max(1, data.size // data.shape[-1])
    step = max(1, COUNT_CHUNK // per_slab)
    for k in range(0, data.shape[-1], step):
        total.update(_counts_1d(np.ravel(data[..., k : k + step])))
    return dict(total)


@dataclass
class _LabelStats:
    """What one pass over a label map found: value counts, and what makes it unusable."""

    counts: Counter = field(default_factory=Counter)
    n_nan: int = 0
    n_inf: int = 0
    n_fractional: int = 0
    examples: list[float] = field(default_factory=list)  # the smallest fractional values

    def add(self, values: np.ndarray) -> None:
        if values.dtype.kind == "f":
            nan, inf = np.isnan(values), np.isinf(values)
            self.n_nan += int(np.count_nonzero(nan))
            self.n_inf += int(np.count_nonzero(inf))
            finite = values[~(nan | inf)] if self.n_nan or self.n_inf else values
            fractional = finite != np.round(finite)
            n_bad = int(np.count_nonzero(fractional))
            if n_bad:
                self.n_fractional += n_bad
                self.examples = sorted({*self.examples, *np.unique(finite[fractional])[:5].tolist()})[:5]
                finite = finite[~fractional]
            # clip: no overflow on absurd values (they are reported as unexpected)
            values = np.clip(finite, -(2**62), 2**62).astype(np.int64)
        if values.size:
            self.counts.update(_counts_1d(values))


def _label_values(chunk: np.ndarray, scale: tuple[float, float] | None) -> np.ndarray:
    if scale is None:
        return chunk
    work = np.empty(chunk.shape, np.float64 if chunk.dtype.itemsize == 8 else np.float32)
    _scale_into(chunk, work, scale)
    return work


def load_label(
    path: Path,
    rel: str,
    image: Volume,
    *,
    allowed_labels: set[int] | None,
    max_voxels: int,
    max_bytes: int,
    tol_mm: float = DEFAULT_TOL_MM,
    allow_no_orientation: bool = False,
) -> Volume:
    """Read the label map of ``image`` and check it against the image and the declared labels.

    Returns uint8 (uint16 when a label exceeds 255) on the image's grid: the image's affine is
    used (the label's own agrees within ``tol_mm`` at every corner). Only the image's shape,
    affine and modality are used (its voxels may already be released). ``allowed_labels`` comes
    from dataset.json (None: any value 0..65535). Reasons: everything ``load_nifti`` raises, plus
    LABEL_GEOMETRY_MISMATCH, NON_INTEGER_LABELS, UNEXPECTED_LABELS.

    Memory: the returned array plus one chunk. A label stored in one byte is read once; wider
    or scaled ones twice (checked and counted first, then copied into the narrowest type).
    """
    nifti = NiftiStream(Path(path), rel, max_voxels=max_voxels, max_bytes=max_bytes)
    if nifti.shape != image.shape:
        raise _reject(
            Reason.LABEL_GEOMETRY_MISMATCH,
            rel,
            f"label shape {list(nifti.shape)} differs from image shape {list(image.shape)}",
            label_shape=list(nifti.shape),
            image_shape=list(image.shape),
        )
    affine, source = _check_affine(
        nifti.header, nifti.shape, rel, tol_mm=tol_mm, allow_no_orientation=allow_no_orientation
    )
    diff = corner_distance_mm(affine, image.affine, image.shape)
    if diff > tol_mm:
        raise _reject(
            Reason.LABEL_GEOMETRY_MISMATCH,
            rel,
            f"label and image affines place the volume's corners up to {diff:.4g} mm apart "
            f"(tolerance {tol_mm} mm); the label was saved on another grid",
            max_corner_difference_mm=diff,
            tolerance_mm=tol_mm,
            label_affine=np.asarray(affine).round(6).tolist(),
            image_affine=image.affine.round(6).tolist(),
        )
    scale = _scaling(nifti.header)
    one_pass = scale is None and nifti.dtype.kind in "iub" and nifti.dtype.itemsize == 1
    out = np.empty(nifti.n_voxels, np.uint8) if one_pass else None
    stats = _LabelStats()
    for start, chunk in nifti.chunks():
        stats.add(_label_values(chunk, scale))
        if out is not None:
            out[start : start + chunk.size] = chunk.view(np.uint8)  # negatives are rejected below
    if stats.n_nan or stats.n_inf:
        raise _non_finite(rel, stats.n_nan, stats.n_inf, nifti.n_voxels)
    if stats.n_fractional:
        examples = [round(float(v), 6) for v in stats.examples]
        raise _reject(
            Reason.NON_INTEGER_LABELS,
            rel,
            f"{stats.n_fractional} voxels hold non-integer values (e.g. {examples}); a label map holds "
            "class numbers only (was it resampled with linear interpolation?)",
            non_integer_voxels=stats.n_fractional,
            examples=examples,
        )
    counts = stats.counts
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
    if out is None:
        out = np.empty(nifti.n_voxels, np.uint8 if max(counts) <= 255 else np.uint16)
        for start, chunk in nifti.chunks():
            out[start : start + chunk.size] = _label_values(chunk, scale)
    meta = {**_meta(nifti, source), "label_values": sorted(counts)}
    data = out.reshape(nifti.shape, order="F")
    return Volume(data, np.asarray(image.affine, float).copy(), modality=image.modality, meta=meta)


def planned_nifti_bytes(path: Path) -> int:
    """Bytes the decoded volume of a NIfTI file will hold (header only; 0 when unreadable).

    For memory planning: float32 when the file stores floats or scales its values."""
    try:
        hdr = read_header_only(Path(path), "")
        n = int(np.prod([int(d) for d in hdr["dim"][1 : int(hdr["dim"][0]) + 1]], dtype=np.int64))
        dtype = hdr.get_data_dtype()
    except (InputRejected, OSError, ValueError, KeyError, HeaderDataError):
        return 0
    scaled = _scaling(hdr) is not None
    return n * (4 if scaled or dtype.kind == "f" else dtype.itemsize)


# --------------------------------------------------------------------------------------------
# Analyze 7.5 and NIfTI pairs (.hdr + .img): not read, listed with their own reason

ANALYZE_HEADER = (".hdr", ".hdr.gz")
ANALYZE_IMAGE = (".img", ".img.gz")


def _pair_stem(name: str, suffixes: tuple[str, ...]) -> str | None:
    lower = name.lower()
    for suffix in suffixes:
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return None


def _pair_header(path: Path) -> bytes | None:
    """The 348 header bytes of a .hdr (plain or gzipped) when sizeof_hdr says 348, else None."""
    try:
        with open(path, "rb") as fh:
            gz = fh.read(2) == b"\x1f\x8b"
        with (gzip.open if gz else open)(path, "rb") as fh:
            head = fh.read(348)
    except (OSError, EOFError, zlib.error):
        return None
    sizes = {int.from_bytes(head[:4], "little"), int.from_bytes(head[:4], "big")}
    return head if len(head) == 348 and 348 in sizes else None


def analyze_files(files: list[Path], root: Path) -> tuple[set[Path], list[InputRejected]]:
    """The .hdr/.img pairs among ``files`` (Analyze 7.5 or NIfTI-1 pairs), each file rejected.

    A ``.hdr`` is one when its first 4 bytes hold sizeof_hdr 348 (either byte order); its
    ``.img`` partner (same stem, any case) is rejected with it. A ``.img`` without such a header
    is left to the other readers. Returns (the files taken, their rejections: ANALYZE_FORMAT).
    """
    root = Path(root)
    images: dict[tuple[Path, str], Path] = {}
    for p in files:
        stem = _pair_stem(p.name, ANALYZE_IMAGE)
        if stem is not None:
            images[(p.parent, stem.lower())] = p
    taken: set[Path] = set()
    rejected: list[InputRejected] = []
    for p in files:
        stem = _pair_stem(p.name, ANALYZE_HEADER)
        if stem is None:
            continue
        head = _pair_header(p)
        if head is None:
            continue  # not an Analyze header: the other readers report it
        nifti_pair = head[344:347] == b"ni1"
        what = "a NIfTI-1 .hdr/.img pair" if nifti_pair else "an Analyze 7.5 .hdr/.img pair"
        why = "" if nifti_pair else " (Analyze has no reliable orientation: left and right are a guess)"
        partner = images.get((p.parent, stem.lower()))
        pair = [p] + ([partner] if partner is not None else [])
        message = (
            f"{what}{why}; this pipeline reads single-file NIfTI: convert it to .nii.gz with its "
            "orientation checked (e.g. dcm2niix from the original DICOM, or nibabel)"
            + ("" if partner is not None else "; its .img voxel file is missing")
        )
        for f in pair:
            taken.add(f)
            rel = _rel(f, root).as_posix()
            names = [_rel(x, root).as_posix() for x in pair]
            rejected.append(_reject(Reason.ANALYZE_FORMAT, rel, message, pair=names))
    return taken, rejected


def _corners(shape: tuple[int, ...]) -> np.ndarray:
    """(4, 8) homogeneous voxel coordinates of the volume's corner voxel centres."""
    pts = np.array(list(itertools.product(*[(0, n - 1) for n in shape[:3]])), float)
    return np.vstack([pts.T, np.ones(len(pts))])


def corner_distance_mm(a: np.ndarray, b: np.ndarray, shape: tuple[int, ...]) -> float:
    """Largest distance in mm between where affines ``a`` and ``b`` put the volume's corners."""
    c = _corners(shape)
    return float(np.max(np.linalg.norm((a @ c - b @ c)[:3], axis=0)))


def _check_affine(
    hdr: nib.Nifti1Header, shape: tuple[int, ...], rel: str, *, tol_mm: float, allow_no_orientation: bool
):
    qform, qcode = hdr.get_qform(coded=True)
    sform, scode = hdr.get_sform(coded=True)
    if scode:
        affine, source = sform, "sform"
    elif qcode:
        affine, source = qform, "qform"
    elif not allow_no_orientation:
        raise _reject(
            Reason.NO_ORIENTATION,
            rel,
            "qform_code and sform_code are both 0: the file does not say how its axes lie in the "
            "patient, so left and right would be a guess. Re-export it with its orientation (qform or "
            "sform code > 0), or set ingest.allow_no_orientation to stage it marked 'orientation unknown'",
            qform_code=0,
            sform_code=0,
        )
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
