"""The demo dataset that tests, benchmarks and the demo share, generated from a seed.

`make_demo_dataset(out)` writes, under `out/`:

- `dicom/`: a hospital-like folder tree. Each case is a real DICOM series (CT or MR; axial,
  sagittal, coronal, one oblique and one feet-first; shuffled file names, InstanceNumbers that do
  not always follow position, some files in nested folders, some RLE / JPEG-LS / JPEG 2000
  lossless) with its label map as a DICOM SEG in `dicom/annotations/<case>.seg.dcm`. Patient 1
  has two studies; patient 2 has two series mixed in one folder. Stray non-DICOM files and, in
  `dicom/qa/<kind>/`, one series per rejection rule (and one valid series with hostile tag values).
- `msd/`: the same cases as a Medical Segmentation Decathlon dataset (dataset.json, imagesTr,
  labelsTr, imagesTs), voxels equal to the DICOM modality values, affine from the DICOM geometry.
- `broken_nifti/`: NIfTI files that the NIfTI checks must reject.
- `expected.json`: what ingest should make of all this (`DemoDatasetInfo`, paths relative to `out`).

Each case is one body drawn in patient coordinates (`phantom.Anatomy`) and sampled through its
series' own affine, so the orientations differ in how the same kind of body is seen, not in what
it is; the labels are sampled from the same shapes on the same grid.

Same seed, same bytes: UIDs, dates and noise all derive from the seed, never from the clock.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from pipeline.errors import Reason
from pipeline.io.atomic import atomic_path, write_bytes, write_text
from pipeline.io.volume import Volume, save_nifti
from pipeline.synthetic.dicom import (
    AXIAL,
    CORONAL,
    SAGITTAL,
    Patient,
    SeriesSpec,
    slice_normal,
    slice_positions,
    write_dicom_series,
)
from pipeline.synthetic.phantom import LABELS, Anatomy, make_anatomy, make_phantom, sample
from pipeline.synthetic.seg import write_seg

log = logging.getLogger(__name__)

LABEL_NAMES = {k: v for k, v in LABELS.items() if k != 0}  # {1: "organ", 2: "lesion"}
FEET_FIRST_AXIAL = (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0)  # FFS: rows run towards the patient's right
MIN_SIZE = 32  # JPEG 2000 needs images of at least 32 x 32

# One row per case (cycled past 12, without repeating the oblique and feet-first ones): the first
# six already cover every orientation, both modalities and every transfer syntax.
PLAN: tuple[tuple[str, str, str], ...] = (
    ("CT", "axial", ExplicitVRLittleEndian),
    ("MR", "sagittal", RLELossless),
    ("CT", "coronal", JPEGLSLossless),
    ("MR", "axial", JPEG2000Lossless),
    ("CT", "oblique", ExplicitVRLittleEndian),
    ("CT", "feet_first", RLELossless),
    ("MR", "coronal", ExplicitVRLittleEndian),
    ("CT", "sagittal", JPEG2000Lossless),
    ("MR", "axial", JPEGLSLossless),
    ("CT", "axial", ExplicitVRLittleEndian),
    ("MR", "axial", RLELossless),
    ("CT", "axial", JPEG2000Lossless),
)
_REPEATABLE = (0, 1, 2, 3, 6, 7, 8, 9, 10, 11)


@dataclass
class DemoCase:
    """One generated case: where its files are and what geometry they carry."""

    name: str  # demo_001 ...; also the MSD file stem
    modality: str  # CT or MR
    orientation: str  # axial, sagittal, coronal, oblique or feet_first (axial, FFS)
    transfer_syntax: str  # UID of the DICOM files
    shape: tuple[int, int, int]  # (slices, rows, columns) in slice order
    spacing: tuple[float, float, float]  # (slice, row, column) mm
    patient_name: str
    patient_id: str
    study_uid: str
    series_uid: str
    dicom_files: list[str]  # relative to the dicom root, in slice order
    seg: str  # the DICOM SEG, relative to the dicom root
    split: str  # "train" (imagesTr + labelsTr) or "test" (imagesTs only)
    msd_image: str  # relative to the msd root
    msd_label: str | None  # relative to the msd root; None for test cases
    label_voxels: dict[int, int]  # voxels per foreground label


@dataclass
class DemoDatasetInfo:
    """What was written and what ingest should make of it (also in `out/expected.json`)."""

    root: Path
    dicom_root: Path
    msd_root: Path
    broken_nifti_root: Path
    seed: int
    size: int
    labels: dict[int, str]
    cases: list[DemoCase]
    # relative to dicom_root: every quarantined or ignored file -> its reason code
    dicom_quarantine: dict[str, str] = field(default_factory=dict)
    # relative to broken_nifti_root: every file the NIfTI checks must reject -> its reason code
    nifti_quarantine: dict[str, str] = field(default_factory=dict)
    # relative to dicom_root: the valid series with hostile tag values; ingest must accept it
    hostile_files: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("root", "dicom_root", "msd_root", "broken_nifti_root"):
            data[key] = "." if key == "root" else Path(data[key]).relative_to(self.root).as_posix()
        return data


def _case_seed(seed: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def _uid(rng: np.random.Generator) -> str:
    return generate_uid(entropy_srcs=[str(rng.integers(0, 2**63))])


def _orientation(name: str) -> tuple[float, ...]:
    if name == "axial":
        return AXIAL
    if name == "feet_first":
        return FEET_FIRST_AXIAL
    if name == "sagittal":
        return SAGITTAL
    if name == "coronal":
        return CORONAL
    if name == "oblique":  # axial tipped 20 degrees about L-R, then turned 10 degrees about S-I
        a, b = np.deg2rad(20.0), np.deg2rad(10.0)
        rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
        rz = np.array([[np.cos(b), -np.sin(b), 0], [np.sin(b), np.cos(b), 0], [0, 0, 1]])
        r = rz @ rx
        return tuple(float(v) for v in (*r[:, 0], *r[:, 1]))
    raise ValueError(f"unknown orientation {name!r}")


def _origin(orientation, shape, pixel_spacing, slice_spacing, center) -> tuple[float, ...]:
    """ImagePositionPatient of slice 0 that puts the volume's centre at `center` (LPS mm)."""
    row, col = np.asarray(orientation[:3]), np.asarray(orientation[3:])
    normal = np.cross(row, col)
    n, rows, cols = shape
    origin = (
        np.asarray(center)
        - row * (cols - 1) / 2 * pixel_spacing[1]
        - col * (rows - 1) / 2 * pixel_spacing[0]
        - normal * (n - 1) / 2 * slice_spacing
    )
    return tuple(float(v) for v in np.round(origin, 4))


def dicom_affine(spec: SeriesSpec, positions: np.ndarray) -> np.ndarray:
    """Voxel (column, row, slice) -> RAS mm for a series written from `spec` at `positions`."""
    row, col = np.asarray(spec.orientation[:3], float), np.asarray(spec.orientation[3:], float)
    lps = np.eye(4)
    lps[:3, 0] = row * spec.pixel_spacing[1]
    lps[:3, 1] = col * spec.pixel_spacing[0]
    lps[:3, 2] = (positions[-1] - positions[0]) / max(len(positions) - 1, 1)
    lps[:3, 3] = positions[0]
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def _slab(
    anatomy: Anatomy, orientation: tuple[float, ...], spacing: float, *, coverage: float, max_slices: int
) -> tuple[int, float, np.ndarray]:
    """(slices, slice spacing mm, centre LPS) of an acquisition of `anatomy` in `orientation`.

    Its centre is on the body's axis in-plane and on the organ along the slice normal; its
    slices cover `coverage` of the organ's extent along the normal (at most `max_slices`; at
    least 6, thinner than `spacing` for a small organ), so the organ crosses nearly every slice
    in any orientation and a lesion inside or at the edge of it is always in the slab.
    """
    normal = slice_normal(orientation)
    mid, half = anatomy.organ_extent(normal)
    spacing = min(spacing, round(2 * half * coverage / 6, 1))
    n = int(np.clip(round(2 * half * coverage / spacing), 6, max(6, max_slices)))
    center = anatomy.body_center + normal * (mid - normal @ anatomy.body_center)
    return n, spacing, np.round(center, 1)


def _file_names(rng: np.random.Generator, n: int, style: int, subfolders: int) -> list[str]:
    """Shuffled, scanner-like file names in slice order; `subfolders` > 1 spreads them out."""
    order = rng.permutation(n)
    if style == 0:
        names = [f"IM{k + 1:06d}" for k in order]
    elif style == 1:
        names = [f"{v:08X}" for v in rng.choice(2**32, size=n, replace=False)]
    elif style == 2:
        names = [f"{v}.dcm" for v in rng.choice(10**9, size=n, replace=False) + 10**9]
    else:
        names = [f"slice{k + 1:03d}.DCM" for k in order]
    if subfolders > 1:
        names = [f"DIR{int(rng.integers(subfolders)):03d}/{name}" for name in names]
    return names


def _stored(image: np.ndarray, modality: str, unsigned_ct: bool) -> tuple[np.ndarray, float, bool]:
    """Stored pixel values, RescaleIntercept and signedness for a float image."""
    if modality == "CT":
        hu = np.clip(np.round(image), -1024, 3071)
        if unsigned_ct:
            return (hu + 1024).astype(np.uint16), -1024.0, False
        return hu.astype(np.int16), 0.0, True
    return np.clip(np.round(image), 0, 4095).astype(np.uint16), 0.0, False


def _relative(paths, root: Path) -> list[str]:
    return [Path(p).relative_to(root).as_posix() for p in paths]


def make_demo_dataset(out: Path, *, n_cases: int = 12, seed: int = 0, size: int = 112) -> DemoDatasetInfo:
    """Generate the demo dataset under `out` (see the module docstring) and return what it holds.

    `size` is the nominal in-plane matrix (rows and columns vary by up to 8 around it, slices are
    about a quarter to two fifths of it); at least 32. An existing `out` is replaced only if it is
    empty or was written by this function (it holds expected.json); the new tree is built beside
    it and moved into place, so a crash never leaves half a dataset at `out`.
    """
    if n_cases < 1:
        raise ValueError(f"n_cases must be at least 1; got {n_cases}")
    if size < MIN_SIZE:
        raise ValueError(f"size must be at least {MIN_SIZE} (JPEG 2000 needs 32 x 32 images); got {size}")
    out = Path(out).absolute()
    if out.exists() and any(out.iterdir()) and not (out / "expected.json").is_file():
        raise FileExistsError(
            f"{out} exists and is not a demo dataset (no expected.json): choose an empty or new folder"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        info = _generate(tmp, n_cases=n_cases, seed=seed, size=size)
        write_text(tmp / "expected.json", json.dumps(info.to_json(), indent=1, sort_keys=True) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    info.root = out
    info.dicom_root = out / "dicom"
    info.msd_root = out / "msd"
    info.broken_nifti_root = out / "broken_nifti"
    return info


def _generate(root: Path, *, n_cases: int, seed: int, size: int) -> DemoDatasetInfo:
    dicom_root, msd_root, broken_root = root / "dicom", root / "msd", root / "broken_nifti"
    info = DemoDatasetInfo(
        root=root,
        dicom_root=dicom_root,
        msd_root=msd_root,
        broken_nifti_root=broken_root,
        seed=seed,
        size=size,
        labels=dict(LABELS),
        cases=[],
    )
    rng = np.random.default_rng(_case_seed(seed, 10_000))
    n_test = n_cases // 6
    study_uids: dict[int, str] = {}
    for i in range(n_cases):
        info.cases.append(
            _write_case(
                i,
                seed,
                size,
                split="test" if i >= n_cases - n_test else "train",
                info=info,
                shared=study_uids,
            )
        )
    _write_msd_json(msd_root, info.cases)
    _write_strays(dicom_root, rng, info)
    _write_broken_series(dicom_root, seed, size, info)
    _write_broken_nifti(broken_root, seed, info)
    return info


def _patient_number(i: int) -> int:
    # Patient 1: cases 0 and 1 (two studies); patient 2: cases 2 and 3 (one study, one folder).
    return 1 if i < 2 else 2 if i < 4 else i - 1


def _case_folder(i: int) -> tuple[str, int]:
    """(folder under the dicom root, number of subfolders the files are spread over)."""
    p = _patient_number(i)
    if i < 2:
        return f"PAT{p:02d}/STUDY{i + 1}/SERIES1", 1
    if i < 4:
        return f"PAT{p:02d}/EXAM", 1  # two series mixed in one folder
    return [(f"PAT{p:02d}/S{i:02d}", 1), (f"PAT{p:02d}/STUDY/SERIES", 2), (f"PAT{p:02d}", 1)][i % 3]


def _write_case(i: int, seed: int, size: int, *, split: str, info: DemoDatasetInfo, shared: dict) -> DemoCase:
    modality, orientation_name, syntax = PLAN[i] if i < len(PLAN) else PLAN[_REPEATABLE[(i - len(PLAN)) % 10]]
    rng = np.random.default_rng(_case_seed(seed, i))
    name = f"demo_{i + 1:03d}"
    rows = max(MIN_SIZE, size + 8 * (i % 3 - 1))
    cols = max(MIN_SIZE, size + 8 * (i % 2))
    ps = round(float(np.round(rng.uniform(1.0, 1.5) / 0.05) * 0.05), 2)
    ss = float(rng.choice([2.5, 3.0, 3.5, 4.0]))
    # One body in patient coordinates, seen through this series' geometry (see _slab).
    anatomy = make_anatomy(
        _case_seed(seed, 1000 + i),
        modality,
        fov=min(rows, cols) * ps,
        center=np.round(rng.uniform(-20, 20, 3), 1),
    )
    orientation = _orientation(orientation_name)
    coverage = rng.uniform(0.8, 1.0)
    n, ss, center = _slab(anatomy, orientation, ss, coverage=coverage, max_slices=round(0.45 * size))

    p = _patient_number(i)
    patient = Patient(
        name=f"DEMO^PATIENT{p:02d}",
        patient_id=f"DEMO{p:04d}",
        birth_date=f"19{40 + 3 * p % 50:02d}{1 + p % 12:02d}{1 + (7 * p) % 28:02d}",
        sex="F" if p % 2 else "M",
    )
    study_uid = shared[p] if i == 3 else _uid(rng)  # cases 2 and 3 share a study
    shared[p] = study_uid
    folder, subfolders = _case_folder(i)
    instance_numbers = list(range(1, n + 1))
    if i % 4 == 2:
        instance_numbers.reverse()  # numbering against position: ordering must use positions
    elif i % 4 == 3:
        instance_numbers = [int(v) + 1 for v in rng.permutation(n)]
    spec = SeriesSpec(
        modality=modality,
        orientation=orientation,
        origin=_origin(orientation, (n, rows, cols), (ps, ps), ss, center),
        pixel_spacing=(ps, ps),
        slice_spacing=ss,
        patient=patient,
        study_uid=study_uid,
        series_uid=_uid(rng),
        frame_of_reference_uid=_uid(rng),
        series_number=2 + i % 3 if i != 3 else 7,
        series_description=f"{modality} {orientation_name.replace('_', ' ')}",
        image_type=("ORIGINAL", "PRIMARY", "AXIAL" if modality == "CT" else "OTHER"),
        patient_position="FFS" if orientation_name == "feet_first" else "HFS",
        transfer_syntax=syntax,
        instance_numbers=instance_numbers,
        file_names=_file_names(rng, n, style=i % 4, subfolders=subfolders),
        seed=_case_seed(seed, 2000 + i),
    )
    # The voxels: the anatomy sampled through the very affine the DICOM and NIfTI headers carry.
    affine = dicom_affine(spec, slice_positions(spec, n))
    image, label = sample(anatomy, (n, rows, cols), affine, seed=_case_seed(seed, 4000 + i))
    stored, intercept, signed = _stored(image, modality, unsigned_ct=i % 4 != 1)
    spec.rescale_intercept, spec.signed = intercept, signed
    out_dir = info.dicom_root / folder
    for sub in {Path(f).parent for f in spec.file_names}:
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
    paths = write_dicom_series(stored, out_dir, spec)
    seg_rel = f"annotations/{name}.seg.dcm"
    write_seg(label, paths, info.dicom_root / seg_rel, LABEL_NAMES, seed=_case_seed(seed, 3000 + i))

    # MSD copy: voxels are the DICOM modality values, on the DICOM grid (column, row, slice).
    values = (stored.astype(np.int32) + int(intercept)).astype(np.int16)
    folder_img = "imagesTr" if split == "train" else "imagesTs"
    msd_image = f"{folder_img}/{name}.nii.gz"
    save_nifti(Volume(values.transpose(2, 1, 0).copy(), affine, modality), info.msd_root / msd_image)
    msd_label = None
    if split == "train":
        msd_label = f"labelsTr/{name}.nii.gz"
        save_nifti(Volume(label.transpose(2, 1, 0).copy(), affine, modality), info.msd_root / msd_label)
    return DemoCase(
        name=name,
        modality=modality,
        orientation=orientation_name,
        transfer_syntax=str(syntax),
        shape=(n, rows, cols),
        spacing=(ss, ps, ps),
        patient_name=patient.name,
        patient_id=patient.patient_id,
        study_uid=str(spec.study_uid),
        series_uid=str(spec.series_uid),
        dicom_files=_relative(paths, info.dicom_root),
        seg=seg_rel,
        split=split,
        msd_image=msd_image,
        msd_label=msd_label,
        label_voxels={k: int((label == k).sum()) for k in LABEL_NAMES},
    )


def _write_msd_json(msd_root: Path, cases: list[DemoCase]) -> None:
    train = [c for c in cases if c.split == "train"]
    test = [c for c in cases if c.split == "test"]
    dataset = {
        "name": "UnetPipelineDemo",
        "description": "Synthetic anatomy-like phantoms (organ and lesion), CT and MR mixed; generated",
        "reference": "unet-pipeline demo-data",
        "licence": "CC0-1.0",
        "release": "1.0",
        "tensorImageSize": "3D",
        # One channel holding CT for some cases and MR for others: a name that is not "CT" makes
        # planners normalize per case (z-score), which suits both. Per-case truth in "case_modality".
        "modality": {"0": "mixed"},
        "channel_names": {"0": "mixed"},
        "case_modality": {c.name: c.modality for c in cases},
        "labels": {str(k): v for k, v in LABELS.items()},
        "file_ending": ".nii.gz",
        "numTraining": len(train),
        "numTest": len(test),
        "training": [{"image": f"./{c.msd_image}", "label": f"./{c.msd_label}"} for c in train],
        "test": [f"./{c.msd_image}" for c in test],
    }
    write_text(msd_root / "dataset.json", json.dumps(dataset, indent=4) + "\n")


def _write_strays(dicom_root: Path, rng: np.random.Generator, info: DemoDatasetInfo) -> None:
    """Files a hospital export carries that are not images: ingest lists them as NOT_DICOM."""
    report = (
        "RADIOLOGY REPORT (synthetic)\n\nFindings: a well-defined lesion within the organ.\n"
        "This text file travels with the images, as exports from PACS often do.\n"
    )
    strays = {
        "README.txt": report.encode(),
        "PAT01/Thumbs.db": bytes(rng.integers(0, 256, 1024, dtype=np.uint8)),
        "PAT02/EXAM/empty": b"",
    }
    for rel, data in strays.items():
        write_bytes(dicom_root / rel, data)
        info.dicom_quarantine[rel] = Reason.NOT_DICOM.value


def _write_broken_series(dicom_root: Path, seed: int, size: int, info: DemoDatasetInfo) -> None:
    """One series per series-level rejection rule, plus a truncated file and hostile tag values."""
    rng = np.random.default_rng(_case_seed(seed, 20_000))
    side = max(MIN_SIZE, size // 2)
    patient = Patient(name="DEMO^QA", patient_id="DEMOQA01", birth_date="19800101", sex="O")
    study_uid = _uid(rng)
    image, _ = make_phantom((10, side, side), (3.0, 1.5, 1.5), seed=_case_seed(seed, 20_001), modality="CT")
    stored, intercept, _ = _stored(image, "CT", unsigned_ct=True)
    origin = _origin(AXIAL, stored.shape, (1.5, 1.5), 3.0, (0.0, 0.0, 0.0))
    steps = np.arange(10)[:, None] * np.array([0.0, 0.0, 3.0])

    def series(kind: str, volume: np.ndarray, reason: str | None, **overrides) -> list[Path]:
        spec = SeriesSpec(
            modality="CT",
            origin=origin,
            pixel_spacing=(1.5, 1.5),
            slice_spacing=3.0,
            rescale_intercept=intercept,
            signed=False,
            patient=patient,
            study_uid=study_uid,
            series_uid=_uid(rng),
            frame_of_reference_uid=_uid(rng),
            series_number=100 + len(info.dicom_quarantine),
            series_description=f"QA {kind}",
            seed=int(rng.integers(2**31)),
        )
        for key, value in overrides.items():
            setattr(spec, key, value)
        paths = write_dicom_series(volume, dicom_root / "qa" / kind, spec)
        if reason is not None:
            for rel in _relative(paths, dicom_root):
                info.dicom_quarantine[rel] = reason
        return paths

    # A missing slice: 9 of 10 positions, the 6th gone.
    keep = [k for k in range(10) if k != 5]
    series(
        "missing_slice",
        stored[keep],
        Reason.NON_UNIFORM_SPACING.value,
        positions=np.asarray(origin) + steps[keep],
    )
    # Gantry tilt: the image plane tipped 15 degrees while the table moves straight along z.
    t = np.deg2rad(15.0)
    series(
        "gantry_tilt",
        stored[:8],
        Reason.GANTRY_TILT.value,
        orientation=(1.0, 0.0, 0.0, 0.0, float(np.cos(t)), float(-np.sin(t))),
        positions=np.asarray(origin) + steps[:8],
    )
    # Duplicate positions: 8 slices, then a second image at the 4th slice's position.
    series(
        "duplicate_position",
        np.concatenate([stored[:8], stored[3:4]]),
        Reason.DUPLICATE_POSITION.value,
        positions=np.asarray(origin) + steps[[*range(8), 3]],
    )
    # A two-slice localizer (scout), coronal.
    series(
        "localizer",
        stored[4:6],
        Reason.LOCALIZER.value,
        orientation=CORONAL,
        image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
        slice_spacing=20.0,
    )
    # A truncated file: a valid one-file series cut halfway through its pixel data.
    (path,) = series("truncated", stored[:1], None)
    data = path.read_bytes()
    with atomic_path(path) as tmp:
        tmp.write_bytes(data[: len(data) - stored[0].nbytes // 2])
    info.dicom_quarantine[path.relative_to(dicom_root).as_posix()] = Reason.TRUNCATED.value
    # Hostile tag values in an otherwise valid series: ingest accepts it and writes only inside
    # its output root, never using these values in a path.
    hostile = Patient(
        name="../../x^\x00EVIL" + "N" * 300, patient_id="../../x", birth_date="19800101", sex="O"
    )
    config = pydicom.config.settings
    modes = config.reading_validation_mode, config.writing_validation_mode
    # These values break VR limits on purpose: no validation warnings for them.
    config.reading_validation_mode = config.writing_validation_mode = pydicom.config.IGNORE
    try:
        paths = series(
            "hostile",
            stored[:8],
            None,
            patient=hostile,
            series_description="../../x\x00" + "D" * 300,
            positions=np.asarray(origin) + steps[:8],
        )
    finally:
        config.reading_validation_mode, config.writing_validation_mode = modes
    info.hostile_files = _relative(paths, dicom_root)


def _write_broken_nifti(root: Path, seed: int, info: DemoDatasetInfo) -> None:
    """NIfTI files that the NIfTI checks must reject, each with one fault."""
    rng = np.random.default_rng(_case_seed(seed, 30_000))
    image, label = make_phantom((12, 32, 32), (3.0, 1.5, 1.5), seed=_case_seed(seed, 30_001), modality="MR")
    data = image.transpose(2, 1, 0).copy()
    affine = np.diag([-1.5, -1.5, 3.0, 1.0])

    def save(rel: str, img: nib.Nifti1Image, reason: str) -> None:
        with atomic_path(root / rel) as tmp:
            nib.save(img, tmp)
        info.nifti_quarantine[rel] = reason

    def nifti(array: np.ndarray, qform=affine, sform=affine) -> nib.Nifti1Image:
        img = nib.Nifti1Image(array, affine)
        img.set_qform(qform, code=1)
        img.set_sform(sform, code=1)
        return img

    nan = data.copy()
    nan[10:14, 10:14, 5] = np.nan
    save("nan_voxels.nii.gz", nifti(nan), Reason.NON_FINITE_VOXELS.value)
    save("four_d.nii.gz", nifti(np.stack([data, data * 1.1], axis=-1)), Reason.UNSUPPORTED_DIMENSIONS.value)
    shifted = affine.copy()
    shifted[:3, 3] += (4.0, 0.0, 3.0)  # 5 mm apart
    save("qform_sform_mismatch.nii.gz", nifti(data, sform=shifted), Reason.QFORM_SFORM_MISMATCH.value)

    # An MSD dataset whose label holds a value dataset.json does not declare.
    bad = label.transpose(2, 1, 0).copy()
    bad[rng.integers(0, 32), rng.integers(0, 32), 6] = 7
    save_nifti(
        Volume(data.astype(np.int16), affine, "MR"), root / "unexpected_labels/imagesTr/bad_001.nii.gz"
    )
    save("unexpected_labels/labelsTr/bad_001.nii.gz", nifti(bad), Reason.UNEXPECTED_LABELS.value)
    dataset = {
        "name": "UnexpectedLabels",
        "description": "A label map holding value 7, which dataset.json does not declare",
        "tensorImageSize": "3D",
        "modality": {"0": "MRI"},
        "labels": {str(k): v for k, v in LABELS.items()},
        "numTraining": 1,
        "numTest": 0,
        "training": [{"image": "./imagesTr/bad_001.nii.gz", "label": "./labelsTr/bad_001.nii.gz"}],
        "test": [],
    }
    write_text(root / "unexpected_labels/dataset.json", json.dumps(dataset, indent=4) + "\n")
