"""Builders of the odd things hospital source trees hold, for the ingest walker tests.

Each builder writes its situation under a source root (and, for links leaving the root, into an
`outside` folder beside it) and returns what ingest must make of it: {relative path: reason} for
every entry listed in quarantine.jsonl with a file of its own, and the number of cases it adds.
Everything is generated here: no outside data.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

AFFINE = np.array([[-0.9, 0, 0, 80.0], [0, 0.9, 0, -100.0], [0, 0, 2.0, -30.0], [0, 0, 0, 1]])


@dataclass
class Expected:
    reasons: dict[str, str] = field(default_factory=dict)  # rel -> reason, files listed in quarantine
    notes: dict[str, set[str]] = field(default_factory=dict)  # rel -> reasons of lines claiming no file
    cases: int = 0  # cases that must be staged

    def update(self, other: Expected) -> Expected:
        self.reasons.update(other.reasons)
        for rel, reasons in other.notes.items():
            self.notes.setdefault(rel, set()).update(reasons)
        self.cases += other.cases
        return self


def nifti(path: Path, data: np.ndarray, *, code: int = 1) -> Path:
    img = nib.Nifti1Image(data, AFFINE)
    img.set_qform(AFFINE, code=code)
    img.set_sform(AFFINE, code=code)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, path)
    return path


def volume(seed: int, shape=(20, 24, 6)) -> np.ndarray:
    return np.random.default_rng(seed).integers(-100, 400, shape).astype(np.int16)


def label(shape=(20, 24, 6)) -> np.ndarray:
    lab = np.zeros(shape, np.uint8)
    lab[5:12, 6:15, 1:4] = 1
    return lab


def dicom_series(folder: Path, seed: int, n: int = 5) -> list[Path]:
    from pipeline.synthetic.dicom import SeriesSpec, write_dicom_series

    vol = (np.arange(n * 16 * 18).reshape(n, 16, 18) % 300 + seed).astype(np.int16)
    return write_dicom_series(vol, folder, SeriesSpec(modality="CT", slice_spacing=2.0, seed=seed))


# ---------------------------------------------------------------------------------------------
# good inputs


def good_nifti(root: Path, rel: str = "nifti/ct_001.nii.gz") -> Expected:
    image = nifti(root / rel, volume(1))
    nifti(image.with_name(image.name.replace(".nii.gz", "_seg.nii.gz")), label())
    return Expected(cases=1)


def good_dicom(root: Path, rel: str = "dicom/series1", seed: int = 3) -> Expected:
    dicom_series(root / rel, seed)
    return Expected(cases=1)


def msd_dataset(root: Path, outside: Path, rel: str = "Task01_Test") -> Expected:
    """Two good training cases; list entries with '../' and absolute paths; an image link leaving
    the source (its case refused: the label is listed as without image)."""
    base = root / rel
    entries = []
    for i in range(2):
        nifti(base / f"imagesTr/case_{i}.nii.gz", volume(10 + i))
        nifti(base / f"labelsTr/case_{i}.nii.gz", label())
        entries.append({"image": f"./imagesTr/case_{i}.nii.gz", "label": f"./labelsTr/case_{i}.nii.gz"})
    nifti(outside / "stolen.nii.gz", volume(20))
    os.symlink(outside / "stolen.nii.gz", base / "imagesTr/case_2.nii.gz")
    nifti(base / "labelsTr/case_2.nii.gz", label())
    entries.append({"image": "./imagesTr/case_2.nii.gz", "label": "./labelsTr/case_2.nii.gz"})
    entries.append({"image": "../../secrets/x.nii.gz", "label": "./labelsTr/case_0.nii.gz"})
    entries.append({"image": "/etc/passwd", "label": "/etc/shadow"})
    meta = {
        "name": "Test",
        "modality": {"0": "CT"},
        "labels": {"0": "background", "1": "organ"},
        "numTraining": 2,
        "training": entries,
        "test": [],
    }
    # A Windows editor's dataset.json: UTF-8 with a byte-order mark.
    (base / "dataset.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(meta, indent=1).encode())
    json_rel = f"{rel}/dataset.json"
    return Expected(
        reasons={
            f"{rel}/imagesTr/case_2.nii.gz": "OUTSIDE_ROOT",
            f"{rel}/labelsTr/case_2.nii.gz": "MISSING_LABEL_SOURCE",
        },
        # the entries outside the dataset; the image of case_2 is "not found" (its link was refused)
        notes={json_rel: {"OUTSIDE_ROOT"}, f"{rel}/imagesTr/case_2.nii.gz": {"INVALID_DATASET"}},
        cases=2,
    )


# ---------------------------------------------------------------------------------------------
# entries that are not files


def special_files(root: Path, rel: str = "odd") -> Expected:
    """A FIFO (opening it would block for ever), a socket and, where permitted, a device."""
    (root / rel).mkdir(parents=True, exist_ok=True)
    os.mkfifo(root / rel / "pipe.dcm")
    expected = {f"{rel}/pipe.dcm": "NOT_REGULAR_FILE", f"{rel}/sock": "NOT_REGULAR_FILE"}
    sock, cwd = socket.socket(socket.AF_UNIX), os.getcwd()
    try:
        os.chdir(root / rel)  # a relative name: socket paths are limited to ~100 bytes
        sock.bind("sock")
    finally:
        os.chdir(cwd)
        sock.close()  # the socket file stays
    try:
        os.mknod(root / rel / "null", stat.S_IFCHR | 0o600, os.makedev(1, 3))
        expected[f"{rel}/null"] = "NOT_REGULAR_FILE"
    except (PermissionError, OSError):
        pass  # no CAP_MKNOD here: FIFO and socket stand for the class
    return Expected(reasons=expected)


def links(root: Path, outside: Path, rel: str = "links") -> Expected:
    base = root / rel
    base.mkdir(parents=True, exist_ok=True)
    os.symlink(base / "gone.nii.gz", base / "dangling.nii.gz")
    os.symlink(base / "loop_b", base / "loop_a")
    os.symlink(base / "loop_a", base / "loop_b")
    nifti(outside / "other.nii.gz", volume(30))
    os.symlink(outside / "other.nii.gz", base / "outside.nii.gz")
    series = dicom_series(outside / "series", seed=40)
    os.symlink(series[0], base / "outside.dcm")
    os.symlink(outside / "series", base / "outside_folder")
    nifti(root / "nifti_extra/inside.nii.gz", volume(31))  # a good case, reached by a folder link too
    os.symlink(root / "nifti_extra", base / "inside_folder")
    return Expected(
        reasons={
            f"{rel}/dangling.nii.gz": "BROKEN_LINK",
            f"{rel}/loop_a": "BROKEN_LINK",
            f"{rel}/loop_b": "BROKEN_LINK",
            f"{rel}/outside.nii.gz": "OUTSIDE_ROOT",
            f"{rel}/outside.dcm": "OUTSIDE_ROOT",
            f"{rel}/outside_folder": "OUTSIDE_ROOT",
            f"{rel}/inside_folder": "FOLDER_LINK",
        },
        cases=1,
    )


NON_UTF8_GOOD = b"caf\xe9/scan\xff.nii.gz"
NON_UTF8_BAD = b"caf\xe9/notes\xfe.nii.gz"


def non_utf8_names(root: Path) -> Expected:
    """A good NIfTI and a broken one whose names are Latin-1 bytes (not valid UTF-8)."""
    good = Path(os.fsdecode(os.fsencode(root) + b"/" + NON_UTF8_GOOD))
    nifti(good, volume(50))
    bad = Path(os.fsdecode(os.fsencode(root) + b"/" + NON_UTF8_BAD))
    bad.write_bytes(b"this is a text file with a NIfTI name\n" * 20)
    return Expected(reasons={"caf\\xe9/notes\\xfe.nii.gz": "UNREADABLE"}, cases=1)


# ---------------------------------------------------------------------------------------------
# formats


def no_orientation(root: Path, rel: str = "noorient/scan.nii.gz") -> Expected:
    nifti(root / rel, volume(60), code=0)
    return Expected(reasons={rel: "NO_ORIENTATION"})


def analyze_pair(root: Path, rel: str = "analyze/brain") -> Expected:
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.AnalyzeImage(volume(70), AFFINE), root / f"{rel}.hdr")
    return Expected(reasons={f"{rel}.hdr": "ANALYZE_FORMAT", f"{rel}.img": "ANALYZE_FORMAT"})


def raw_dumps(root: Path, rel: str = "raw") -> Expected:
    """Raw little-endian voxel dumps whose first values read like DICOM tags of group 0008/0002."""
    (root / rel).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(80)
    expected = {}
    for name, first in (
        ("a.raw", [8, 0x16]),
        ("b.raw", [8, 0]),
        ("c.raw", [2, 0x10]),
        ("d.bin", [0x0800, 5]),
    ):
        data = rng.integers(0, 4000, 4096).astype(np.uint16)
        data[:2] = first
        (root / rel / name).write_bytes(data.tobytes())
        expected[f"{rel}/{name}"] = "NOT_DICOM"
    return Expected(reasons=expected)


def dicomdir_with_missing_files(root: Path, work: Path, rel: str = "cd") -> Expected:
    """A DICOMDIR over two series, one of whose files were not copied; the copy of the other
    series has lower-case names (copied off a CD), which is not a missing file."""
    from pydicom.fileset import FileSet

    fs = FileSet()
    for p in dicom_series(work / "cd_a", seed=90) + dicom_series(work / "cd_b", seed=91):
        fs.add(p)
    fs.write(root / rel)
    studies = sorted((root / rel / "PT000000").iterdir())
    shutil.rmtree(studies[1])
    studies[0].rename(studies[0].with_name(studies[0].name.lower()))
    return Expected(
        reasons={f"{rel}/DICOMDIR": "DICOMDIR"},
        notes={f"{rel}/DICOMDIR": {"MISSING_REFERENCED_FILE"}},
        cases=1,
    )


def everything(root: Path, outside: Path, work: Path) -> Expected:
    """Every situation above in one source tree."""
    expected = Expected()
    for build in (
        lambda: good_nifti(root),
        lambda: good_dicom(root),
        lambda: msd_dataset(root, outside),
        lambda: special_files(root),
        lambda: links(root, outside),
        lambda: non_utf8_names(root),
        lambda: no_orientation(root),
        lambda: analyze_pair(root),
        lambda: raw_dumps(root),
        lambda: dicomdir_with_missing_files(root, work),
    ):
        expected.update(build())
    return expected
