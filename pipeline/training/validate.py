"""Validation on whole cases, predicted through inference's own predictor.

The prediction is predict's (`predict_prepared` with the infer section's options: slice
prediction, restoring to the source grid, post-processing) and the score is `evaluate`'s
(`metrics.segmentation_metrics`), so the best validation Dice, which the champion gate compares,
is the score of what predict writes.

`write_validation_qc` draws predict's QC picture (`pipeline.outputs.qc`) for the first few
validation cases with their ground truth over it, the case's Dice in the title; training writes
them with the best weights at the end of a run, and the release logs them to MLflow.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from torch import nn

from pipeline.inference.cases import load_staged_volume
from pipeline.inference.predictor import PredictOptions, predict_prepared
from pipeline.io.volume import Volume
from pipeline.outputs import qc
from pipeline.planning.plan import Plan
from pipeline.planning.transforms import PreprocessInfo, preprocess_volume
from pipeline.training.metrics import mean_over_cases, segmentation_metrics

log = logging.getLogger(__name__)


@dataclass
class ValCase:
    """One validation case, preprocessed once for every validation of the run."""

    case_id: str
    slices: torch.Tensor  # (S, 1, H, W), as `preprocess_volume` returns them
    info: PreprocessInfo
    truth: np.ndarray  # the label volume on its original grid
    spacing: tuple[float, ...]  # of the label volume, mm


def _load_val_case(row: Mapping[str, Any], plan: Plan) -> tuple[ValCase, Volume]:
    """One validation case (a manifest row) and its image as predict reads it from a staging folder."""
    volume = load_staged_volume(Path(row["image"]), str(row["image"]), row.get("modality"))
    slices, info = preprocess_volume(volume, plan)
    label_img = nib.load(row["label"])
    truth = np.asarray(label_img.dataobj).astype(np.uint8)
    spacing = tuple(float(s) for s in np.linalg.norm(label_img.affine[:3, :3], axis=0))
    return ValCase(row["case_id"], slices, info, truth, spacing), volume


def load_val_cases(rows: list[dict[str, Any]], plan: Plan) -> list[ValCase]:
    """Validation cases (manifest rows) read and preprocessed exactly as predict reads a staging folder."""
    return [_load_val_case(row, plan)[0] for row in rows]


def validate(
    model: nn.Module,
    cases: Sequence[ValCase],
    plan: Plan,
    *,
    device: torch.device,
    options: PredictOptions,
) -> dict[str, float]:
    """Mean over whole validation volumes of Dice and HD95 per label, on the original grids:
    {"val_dice/<label>", "val_hd95/<label>", "val_dice_mean", "val_hd95_mean"}."""
    per_case = []
    was_training = model.training
    model.eval()
    try:
        for case in cases:
            volume = predict_prepared(model, case.slices, case.info, options, device=device)
            per_case.append(segmentation_metrics(volume, case.truth, plan.label_names, spacing=case.spacing))
    finally:
        model.train(was_training)
    return {f"val_{k}": v for k, v in mean_over_cases(per_case).items()}


def write_validation_qc(
    model: nn.Module,
    rows: Sequence[Mapping[str, Any]],
    plan: Plan,
    folder: Path,
    *,
    device: torch.device,
    options: PredictOptions,
) -> list[Path]:
    """`folder/<case_id>.png` for each validation case of `rows` (manifest rows): predict's QC
    picture of the model's prediction with the ground truth as dashed contours, titled with the
    case ID (pseudonymous, as staged) and its Dice. Replaces the PNGs a previous run left there."""
    for old in folder.glob("*.png"):
        old.unlink()
    if not rows:
        return []
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    was_training = model.training
    model.eval()
    try:
        for row in rows:
            try:
                written.append(_draw_case(model, row, plan, folder, device=device, options=options))
            except Exception as exc:  # noqa: BLE001 - a picture is a review aid: it never costs the run
                log.warning(
                    "no validation QC picture for %s: %s: %s", row["case_id"], type(exc).__name__, exc
                )
    finally:
        model.train(was_training)
    log.info("validation QC pictures of %d case(s) in %s", len(written), folder)
    return written


def _draw_case(
    model: nn.Module,
    row: Mapping[str, Any],
    plan: Plan,
    folder: Path,
    *,
    device: torch.device,
    options: PredictOptions,
) -> Path:
    case, volume = _load_val_case(row, plan)
    pred = predict_prepared(model, case.slices, case.info, options, device=device)
    names = dict(plan.label_names)
    dice = segmentation_metrics(pred, case.truth, names, spacing=case.spacing, hd95=False)
    per_label = ", ".join(f"{n} {dice[f'dice/{n}']:.3f}" for v, n in sorted(names.items()) if v != 0)
    return qc.write_qc_png(
        folder / f"{case.case_id}.png",
        volume.data,
        pred,
        names,
        affine=volume.affine,
        modality=volume.modality,
        title=f"{case.case_id}: Dice {dice['dice_mean']:.3f} ({per_label})",
        truth=case.truth,
    )
