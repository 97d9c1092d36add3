"""Segmentation metrics on whole volumes: Dice and the 95% Hausdorff distance per label.

Thin wrappers over monai.metrics (DiceMetric, HausdorffDistanceMetric with percentile 95) that take
integer label maps, one-hot them and return plain floats per label, in millimetres for HD95.
A label absent from both the prediction and the truth scores Dice 1 and HD95 0 (nothing to find,
nothing found); absent from only one: Dice 0 and HD95 inf.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.metrics import DiceMetric, HausdorffDistanceMetric
from monai.networks.utils import one_hot


def _onehot(labels: np.ndarray | torch.Tensor, num_classes: int) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(labels)).long()
    return one_hot(t[None, None], num_classes=num_classes, dim=1)  # (1, C, *spatial)


def segmentation_metrics(
    pred: np.ndarray | torch.Tensor,
    truth: np.ndarray | torch.Tensor,
    label_names: Mapping[int, str],
    spacing: Sequence[float] | None = None,
    hd95: bool = True,
) -> dict[str, float]:
    """{"dice/<name>", "hd95/<name>"} per foreground label plus "dice_mean" and "hd95_mean".

    `pred` and `truth` are integer label maps of the same shape (2D or 3D); `spacing` in mm per
    axis (voxels when None). Means are over all foreground labels.
    """
    pred = np.asarray(pred)
    truth = np.asarray(truth)
    if pred.shape != truth.shape:
        raise ValueError(f"prediction shape {pred.shape} != truth shape {truth.shape}")
    labels = sorted(v for v in label_names if v != 0)
    num_classes = max(labels) + 1
    p, t = _onehot(pred, num_classes), _onehot(truth, num_classes)
    dice = DiceMetric(include_background=True, reduction="none", ignore_empty=False)(p, t)[0]
    hd = None
    if hd95:
        with warnings.catch_warnings():
            # MONAI warns about empty masks (handled below) and its own deprecated argument.
            warnings.filterwarnings("ignore", message=".*is all 0.*", category=UserWarning)
            warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)
            hd = HausdorffDistanceMetric(include_background=True, percentile=95, reduction="none")(
                p, t, spacing=list(spacing) if spacing is not None else None
            )[0]
    out: dict[str, float] = {}
    dices, hds = [], []
    for v in labels:
        name = label_names[v]
        in_p, in_t = bool(p[0, v].any()), bool(t[0, v].any())
        d = 1.0 if not (in_p or in_t) else float(dice[v])
        out[f"dice/{name}"] = d
        dices.append(d)
        if hd is not None:
            h = 0.0 if not (in_p or in_t) else (math.inf if in_p != in_t else float(hd[v]))
            out[f"hd95/{name}"] = h
            hds.append(h)
    out["dice_mean"] = float(np.mean(dices))
    if hds:
        out["hd95_mean"] = float(np.mean(hds))
    return out


def mean_over_cases(per_case: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Average each metric over cases (inf HD95 values make that label's mean inf, on purpose)."""
    if not per_case:
        return {}
    return {k: float(np.mean([m[k] for m in per_case])) for k in per_case[0]}


def evaluate_folders(
    pred_dir: str | Path, truth_dir: str | Path, out_csv: str | Path | None = None, label_names=None
) -> tuple[Path, dict[str, float]]:
    """Dice and HD95 of every `<case>.nii.gz` in `truth_dir` against `pred_dir`'s prediction.

    A prediction is `pred_dir/<case>.nii.gz` or, as `predict` writes them, `pred_dir/<case>/seg.nii.gz`.

    Writes one CSV row per case (to `out_csv`, default `pred_dir/metrics.csv`) and returns
    (csv path, means over cases). Label names default to the model's (from the
    `run_manifest.json` predict writes in `pred_dir`), so every label is scored in every case as
    validation during training scores it; else to `label_<value>` for the values found.
    """
    import csv

    import nibabel as nib

    from pipeline.io.atomic import atomic_open

    pred_dir, truth_dir = Path(pred_dir), Path(truth_dir)
    label_names = label_names or _model_label_names(pred_dir)
    truths = sorted(truth_dir.glob("*.nii.gz"))
    if not truths:
        raise FileNotFoundError(f"no .nii.gz label maps in {truth_dir}")
    rows = []
    for t_path in truths:
        p_path = pred_dir / t_path.name
        if not p_path.is_file():  # the layout `unet-pipeline predict` writes: <case>/seg.nii.gz
            p_path = pred_dir / t_path.name.removesuffix(".nii.gz") / "seg.nii.gz"
        if not p_path.is_file():
            raise FileNotFoundError(f"{p_path} missing: every reference in {truth_dir} needs a prediction")
        t_img, p_img = nib.load(t_path), nib.load(p_path)
        truth = np.asarray(t_img.dataobj).astype(np.int64)
        pred = np.asarray(p_img.dataobj).astype(np.int64)
        if not np.allclose(t_img.affine, p_img.affine, atol=1e-3):
            raise ValueError(f"{p_path} is not on the grid of {t_path} (affines differ)")
        found = np.union1d(np.union1d(np.unique(truth), np.unique(pred)), [1])
        names = label_names or {int(v): f"label_{int(v)}" for v in found if v != 0}
        spacing = np.linalg.norm(t_img.affine[:3, :3], axis=0)
        case = t_path.name.removesuffix(".nii.gz")
        rows.append({"case": case, **segmentation_metrics(pred, truth, {0: "background", **names}, spacing)})
    keys = sorted({k for r in rows for k in r if k != "case"})
    out_csv = Path(out_csv) if out_csv else pred_dir / "metrics.csv"
    with atomic_open(out_csv, "w") as fh:
        writer = csv.DictWriter(fh, fieldnames=["case", *keys])
        writer.writeheader()
        writer.writerows(rows)
    means = {k: float(np.mean([r[k] for r in rows if k in r])) for k in keys}
    return out_csv, means


def _model_label_names(pred_dir: Path) -> dict[int, str] | None:
    """The foreground label names of the model that wrote `pred_dir` (its run_manifest.json)."""
    import json

    try:
        manifest = json.loads((pred_dir / "run_manifest.json").read_text(encoding="utf-8"))
        names = manifest["model"]["label_names"]
        return {int(k): str(v) for k, v in names.items() if int(k) != 0} or None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
