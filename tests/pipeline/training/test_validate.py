"""Validation QC pictures: predict's picture with the ground truth, one per case, cheap to turn off."""

from __future__ import annotations

import logging

import numpy as np
import torch
from PIL import Image

from pipeline.config import PreprocessConfig
from pipeline.inference.predictor import PredictOptions
from pipeline.io.manifest import read_manifest
from pipeline.outputs import qc
from pipeline.planning.plan import plan_dataset
from pipeline.training.validate import write_validation_qc
from unet_model import UNet, UNetConfig


def test_one_picture_per_case_with_the_truth_and_stale_ones_cleared(staging, tmp_path, caplog):
    plan = plan_dataset(staging, PreprocessConfig())
    rows = [r for r in read_manifest(staging, resolve=True) if r.get("label")][:2]
    torch.manual_seed(0)
    model = UNet(
        UNetConfig(in_channels=plan.context_slices, num_classes=plan.num_classes, base_channels=4, depth=3)
    ).train()
    folder = tmp_path / "validation_qc"
    folder.mkdir()
    (folder / "case-stale.png").write_bytes(b"old")
    kwargs = {"device": torch.device("cpu"), "options": PredictOptions()}
    broken = {**rows[0], "case_id": "case-broken", "image": str(tmp_path / "missing.nii.gz")}
    with caplog.at_level(logging.WARNING):
        written = write_validation_qc(model, [*rows, broken], plan, folder, **kwargs)
    assert model.training  # left as it was found
    assert sorted(p.name for p in folder.iterdir()) == sorted(f"{r['case_id']}.png" for r in rows)
    assert written == [folder / f"{r['case_id']}.png" for r in rows]
    assert "no validation QC picture for case-broken" in caplog.text  # a failed picture costs no run
    for path in written:
        picture = np.asarray(Image.open(path).convert("RGB"))
        assert picture.shape[0] > qc.PLANE_PX and picture.shape[2] == 3

    assert write_validation_qc(model, [], plan, folder, **kwargs) == []  # 0 cases: off, and cleared
    assert not list(folder.glob("*.png"))
