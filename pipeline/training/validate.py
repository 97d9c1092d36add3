"""Validation on whole cases, predicted through inference's own predictor.

The prediction is predict's (`predict_prepared` with the infer section's options: slice
prediction, restoring to the source grid, post-processing) and the score is `evaluate`'s
(`metrics.segmentation_metrics`), so the best validation Dice, which the champion gate compares,
is the score of what predict writes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from torch import nn

from pipeline.inference.cases import load_staged_volume
from pipeline.inference.predictor import PredictOptions, predict_prepared
from pipeline.planning.plan import Plan
from pipeline.planning.transforms import PreprocessInfo, preprocess_volume
from pipeline.training.metrics import mean_over_cases, segmentation_metrics


@dataclass
class ValCase:
    """One validation case, preprocessed once for every validation of the run."""

    case_id: str
    slices: torch.Tensor  # (S, 1, H, W), as `preprocess_volume` returns them
    info: PreprocessInfo
    truth: np.ndarray  # the label volume on its original grid
    spacing: tuple[float, ...]  # of the label volume, mm


def load_val_cases(rows: list[dict[str, Any]], plan: Plan) -> list[ValCase]:
    """Validation cases (manifest rows) read and preprocessed exactly as predict reads a staging folder."""
    cases = []
    for row in rows:
        volume = load_staged_volume(Path(row["image"]), str(row["image"]), row.get("modality"))
        slices, info = preprocess_volume(volume, plan)
        del volume
        label_img = nib.load(row["label"])
        truth = np.asarray(label_img.dataobj).astype(np.uint8)
        spacing = tuple(float(s) for s in np.linalg.norm(label_img.affine[:3, :3], axis=0))
        cases.append(ValCase(row["case_id"], slices, info, truth, spacing))
    return cases


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
