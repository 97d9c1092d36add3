"""A small staging folder (the ingest stage's output format) built from phantoms, for tests.

STAGING/images/<id>.nii.gz, STAGING/labels/<id>.nii.gz, manifest.jsonl and dataset.json; CT and
MR alternate, spacing is anisotropic (thick slices), and the acquisition varies: axial, sagittal
(slices along R) and an oblique axial (rotated 12 degrees in-plane).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from pipeline.io.volume import Volume, save_nifti
from pipeline.synthetic.phantom import LABELS, make_phantom

ORIENTATIONS = ("axial", "sagittal", "axial", "oblique")


def _affine(orientation: str, ps: float, ss: float) -> np.ndarray:
    """Voxel (column, row, slice) -> RAS mm for one acquisition orientation."""
    a = np.eye(4)
    if orientation == "sagittal":  # columns run A, rows S, slices R
        a[:3, :3] = np.array([[0, 0, ss], [ps, 0, 0], [0, ps, 0]], float)
    else:
        a[:3, :3] = np.diag([ps, ps, ss])
        if orientation == "oblique":
            t = np.deg2rad(12)
            rot = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
            a[:3, :3] = rot @ a[:3, :3]
    a[:3, 3] = [-20.0, 10.0, 5.0]
    return a


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_staging_case(root: Path, case_id: str, image: Volume, label: Volume | None, source: str) -> dict:
    """Write one case into a staging folder and return its manifest row."""
    img_rel = f"images/{case_id}.nii.gz"
    save_nifti(image, root / img_rel)
    row = {
        "case_id": case_id,
        "image": img_rel,
        "label": None,
        "modality": image.modality,
        "shape": list(image.shape),
        "spacing": [round(s, 4) for s in image.spacing],
        "source": source,
        "sha256": {"image": _sha256(root / img_rel)},
    }
    if label is not None:
        lab_rel = f"labels/{case_id}.nii.gz"
        save_nifti(label, root / lab_rel)
        row["label"] = lab_rel
        row["sha256"]["label"] = _sha256(root / lab_rel)
    return row


def write_staging_meta(root: Path, rows: list[dict]) -> None:
    (root / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    dataset = {
        "labels": {name: value for value, name in LABELS.items()},
        "channel_names": {"0": "image"},
        "numTraining": sum(r["label"] is not None for r in rows),
        "file_ending": ".nii.gz",
    }
    (root / "dataset.json").write_text(json.dumps(dataset, indent=2), encoding="utf-8")


def make_staging(tmp: Path, n_cases: int = 4, size: int = 32, seed: int = 0) -> Path:
    """A staging folder of `n_cases` labelled phantoms with a `size` x `size`-ish in-plane matrix."""
    root = Path(tmp) / "staging"
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_cases):
        modality = "CT" if i % 2 == 0 else "MR"
        orientation = ORIENTATIONS[i % len(ORIENTATIONS)]
        ps = float(rng.choice([0.9, 1.0, 1.1]))
        ss = float(rng.choice([2.5, 3.0]))
        n = max(8, size // 3)
        rows_, cols = size + 2 * (i % 2), size
        image, label = make_phantom((n, rows_, cols), (ss, ps, ps), seed=seed * 100 + i, modality=modality)
        affine = _affine(orientation, ps, ss)
        # phantom arrays are (slice, row, column); NIfTI voxels are (column, row, slice)
        img = Volume(image.transpose(2, 1, 0).copy(), affine, modality)
        lab = Volume(label.transpose(2, 1, 0).copy(), affine, modality)
        rows.append(write_staging_case(root, f"case_{i:03d}", img, lab, source=f"phantom:{orientation}"))
    write_staging_meta(root, rows)
    return root


# The smallest training that still exercises every step (seconds on 2 CPU cores).
TINY = {
    "model": {"base_channels": 4, "depth": 3},
    "train": {
        "epochs": 2,
        "steps_per_epoch": 2,
        "batch_size": 4,
        "slices_per_volume": 2,
        "val_every": 1,
        "time_budget_minutes": None,
        "device": "cpu",
    },
}


def tiny_config(**train):
    """The default config with a tiny model and a two-epoch CPU run; `train` overrides fields."""
    from pipeline.config import PipelineConfig

    return PipelineConfig().replace(model=TINY["model"], train={**TINY["train"], **train})
