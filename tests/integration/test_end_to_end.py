"""ingest -> train -> register -> gate -> load by alias -> predict, on a tiny generated dataset.

Real parts throughout: generated DICOM series with SEG annotations, the SQLite MLflow store and
its registry, the CLI's own functions.
"""

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from pipeline import tracking
from pipeline.inference.batch import BatchSettings, predict
from pipeline.ingest import ingest
from pipeline.io.manifest import read_manifest
from pipeline.io.model_dir import load_model_dir
from pipeline.synthetic.dataset import make_demo_dataset
from pipeline.tracking.release import gate, register_model, train_and_log
from tests.pipeline.ingest.staging_fixture import tiny_config

TINY = tiny_config()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    demo = make_demo_dataset(root / "demo", n_cases=6, seed=5, size=32)
    staging = root / "staging"
    report = ingest(demo.dicom_root, staging, secret_file=root / "secret", workers=1)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    return root, demo, staging, report, uri


def test_ingest_then_train_register_and_gate(world, monkeypatch):
    root, demo, staging, report, uri = world
    monkeypatch.chdir(root)  # nothing may land in the working folder (./mlruns)
    assert report.cases >= 6 and report.balanced
    labelled = [r for r in read_manifest(staging) if r["label"]]
    assert len(labelled) == len(demo.cases)

    trained = train_and_log(staging, root / "run1", TINY, tracking_uri=uri)
    assert trained.tracking_error is None and trained.model_uri
    version = register_model(trained.model_uri, "e2e-seg", tracking_uri=uri)
    assert version == 1
    assert gate("e2e-seg", version, trained, staging, TINY, tracking_uri=uri) is True  # first: champion
    assert not (root / "mlruns").exists()

    # The registered model, loaded back by alias, predicts what the in-memory model predicted.
    registered = tracking.load_registered("models:/e2e-seg@champion", tracking_uri=uri, dst=root / "dl")
    local = load_model_dir(trained.model_dir)
    assert registered.sha256 == local.sha256
    x = torch.randn(2, 1, 33, 37)
    with torch.no_grad():
        torch.testing.assert_close(registered.model(x), local.model(x))

    # A second, identical-config run is gated against the champion on the same validation cases.
    trained2 = train_and_log(staging, root / "run2", TINY.replace(train={"seed": 7}), tracking_uri=uri)
    version2 = register_model(trained2.model_uri, "e2e-seg", tracking_uri=uri)
    promoted = gate("e2e-seg", version2, trained2, staging, TINY, tracking_uri=uri)
    import mlflow

    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    tags = client.get_model_version("e2e-seg", str(version2)).tags
    assert float(tags["val_mean_dice"]) == pytest.approx(trained2.result.best_dice_mean, abs=1e-6)
    alias = "champion" if promoted else "challenger"
    assert str(client.get_model_version_by_alias("e2e-seg", alias).version) == str(version2)
    assert client.get_run(trained.run_id).info.status == "FINISHED"


def test_predict_with_the_champion_writes_masks_on_the_source_grid(world, monkeypatch):
    root, _, staging, _, uri = world
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    summary = predict(
        staging, "models:/e2e-seg@champion", root / "pred", BatchSettings(device="cpu", write_qc=False)
    )
    assert summary.exit_code == 0
    rows = {r["case_id"]: r for r in read_manifest(staging)}
    for result in summary.results:
        mask = nib.load(root / "pred" / result.case_id / "seg.nii.gz")
        image = nib.load(staging / rows[result.case_id]["image"])
        assert mask.shape == image.shape
        np.testing.assert_allclose(mask.affine, image.affine, atol=1e-4)
    manifest = json.loads((root / "pred" / "run_manifest.json").read_text())
    assert "e2e-seg" in json.dumps(manifest)
