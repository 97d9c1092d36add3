"""2.5-D context through the whole path: a k = 3 run trains, validates, saves its plan with the
weights, and predict, predict_volume and the logged MLflow pyfunc agree on every mask (real
SQLite store, the real batch predict)."""

from __future__ import annotations

from pathlib import Path

import mlflow
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.inference.batch import BatchSettings, predict
from pipeline.inference.cases import load_staged_volume
from pipeline.inference.predictor import PredictOptions, predict_volume
from pipeline.inference.records import MASK_FILE
from pipeline.inference.results import EXIT_OK
from pipeline.io.manifest import read_manifest
from pipeline.io.model_dir import load_model_dir, save_model_dir
from pipeline.planning.plan import load_plan
from pipeline.tracking import Tracker
from pipeline.training.loop import train
from tests.pipeline.ingest.staging_fixture import make_staging, tiny_config


def _mixed_masks(model_dir, out_dir):
    """The trained weights with the head's bias moved so that labels show in the masks: a
    two-epoch run predicts nearly all background, and equal empty masks would prove nothing."""
    loaded = load_model_dir(model_dir)
    net = loaded.model
    with torch.no_grad():
        net.head.bias.copy_(torch.tensor([0.0, 0.3, 0.6]))
    return save_model_dir(
        net, out_dir, plan=loaded.plan, config=loaded.config, label_names=loaded.label_names
    )


@pytest.mark.slow  # about a minute on 2 cores: a training run, predict, and logging the pyfunc
def test_a_three_slice_run_predicts_the_same_masks_everywhere(tmp_path):
    staging = make_staging(tmp_path, n_cases=4, size=32)
    config = tiny_config().replace(preprocess={"context_slices": 3})
    result = train(staging, tmp_path / "run", config)
    assert result.epochs_run == 2 and np.isfinite(result.best_dice_mean)
    plan = load_plan(result.model_dir / "plan.json")
    assert plan.context_slices == 3 and "explicit beats automatic" in plan.reasons["context_slices"]
    assert load_model_dir(result.model_dir).unet_config.in_channels == 3

    model_dir = _mixed_masks(result.model_dir, tmp_path / "model")
    out = tmp_path / "predicted"
    summary = predict(
        staging, model_dir, out, BatchSettings(write_seg=False, write_qc=False, secret_file=tmp_path / "s")
    )
    assert summary.exit_code == EXIT_OK
    table = pd.read_csv(out / "results.csv", dtype=str)

    with Tracker(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", run_name="context") as tracker:
        model_uri = tracker.log_model(model_dir)
    assert tracker.tracking_error is None
    pyfunc = mlflow.pyfunc.load_model(model_uri)

    loaded = load_model_dir(model_dir)
    rows = [r for r in read_manifest(staging, resolve=True) if r.get("label")]
    seen = set()
    for row in rows:
        image = Path(row["image"])
        case_id = table[table["source"].str.endswith(image.name)]["case_id"].iloc[0]
        written = np.asarray(nib.load(out / case_id / MASK_FILE).dataobj)
        seen |= set(np.unique(written).tolist())
        served = pyfunc.predict(pd.DataFrame({"path": [str(image)], "modality": [row["modality"]]}))
        np.testing.assert_array_equal(served["mask"][0], written)
        volume = load_staged_volume(image, image.name, row["modality"])
        options = PredictOptions.from_config(config.infer)
        np.testing.assert_array_equal(predict_volume(loaded, volume, options), written)
    assert len(seen) > 1  # not all background
