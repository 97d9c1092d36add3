"""The registered model as MLflow users load it: a volume in, predict's mask out (real SQLite store)."""

from __future__ import annotations

import mlflow
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException

from pipeline.inference.batch import BatchSettings, predict
from pipeline.inference.records import MASK_FILE
from pipeline.inference.results import EXIT_OK
from pipeline.tracking import Tracker, promote, register
from tests.pipeline.inference.predict_fixture import make_predict_setup, save_untrained_model

NAME = "unet-volume"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """An untrained model with a real plan, logged, registered and made champion; predict's masks."""
    root = tmp_path_factory.mktemp("pyfunc")
    setup = make_predict_setup(root, n_cases=3, size=32)
    # Seed 7's untrained network (three input slices: the plan's context for these volumes)
    # splits them between the labels, so equal masks below mean equal geometry, not equal emptiness.
    model_dir = save_untrained_model(setup.plan, root / "model-seed7", seed=7)
    uri = f"sqlite:///{root}/mlflow.db"
    with Tracker(tracking_uri=uri, run_name="pyfunc-test") as tracker:
        model_uri = tracker.log_model(model_dir, val_dice={"organ": 0.5, "lesion": 0.25, "mean": 0.375})
    assert tracker.tracking_error is None
    version = register(model_uri, NAME, tracking_uri=uri)
    promote(NAME, version, 0.375, margin=0.0, tracking_uri=uri)
    images = sorted((setup.demo.msd_root / "imagesTr").glob("*.nii.gz"))
    # What `unet-pipeline predict` writes for these files (the same function, in-process).
    out = root / "predicted"
    summary = predict(
        images[0].parent,
        model_dir,
        out,
        BatchSettings(secret_file=setup.secret, write_seg=False, write_qc=False),
    )
    assert summary.exit_code == EXIT_OK
    masks = {}
    for image in images:
        case_dir = _case_dir_for(out, image)
        masks[image.name] = np.asarray(nib.load(case_dir / MASK_FILE).dataobj)
    assert all(len(np.unique(m)) > 1 for m in masks.values())
    return {
        "setup": setup,
        "uri": uri,
        "images": images,
        "masks": masks,
        "pyfunc": mlflow.pyfunc.load_model(f"models:/{NAME}@champion"),
        "root": root,
        "model_dir": model_dir,
    }


def _case_dir_for(out, image):
    """The case folder predict wrote for `image` (results.csv links case IDs to sources)."""
    table = pd.read_csv(out / "results.csv", dtype=str)
    rows = table[table["source"].str.endswith(image.name)]
    assert len(rows) == 1, f"{image.name} not found once in {out / 'results.csv'}"
    return out / rows["case_id"].iloc[0]


def test_a_nifti_path_gives_predicts_mask_voxel_for_voxel(served, tmp_path):
    images = served["images"]
    target = tmp_path / "first.nii.gz"
    frame = pd.DataFrame(
        {"path": [str(p) for p in images], "out": [str(target)] + [None] * (len(images) - 1)}
    )
    result = served["pyfunc"].predict(frame)
    assert list(result.columns) == ["mask", "mask_path"]
    for image, mask in zip(images, result["mask"], strict=True):
        expected = served["masks"][image.name]
        assert mask.dtype == np.uint8 and mask.shape == expected.shape
        np.testing.assert_array_equal(mask, expected)
    # `out`: written as predict writes seg.nii.gz (uint8, the source's affine).
    assert result["mask_path"][0] == str(target)
    assert result["mask_path"][1:].isna().all()
    written = nib.load(target)
    np.testing.assert_array_equal(np.asarray(written.dataobj), served["masks"][images[0].name])
    np.testing.assert_allclose(written.affine, nib.load(images[0]).affine, atol=1e-5)


@pytest.mark.parametrize("layout", ["3d", "4d-one-channel", "json-lists"])
def test_an_array_with_its_affine_gives_the_same_mask(served, layout):
    image = served["images"][1]
    img = nib.load(image)
    data = np.asarray(img.dataobj)
    if layout == "4d-one-channel":
        data = data[..., None]
    if layout == "json-lists":  # what a REST client sends
        cell, affine = data.tolist(), img.affine.tolist()
    else:
        cell, affine = data, img.affine
    result = served["pyfunc"].predict({"image": [cell], "affine": [affine]})
    np.testing.assert_array_equal(result["mask"][0], served["masks"][image.name])


def test_the_source_file_is_only_read(served):
    image = served["images"][2]
    before = image.read_bytes()
    served["pyfunc"].predict(pd.DataFrame({"path": [str(image)]}))
    assert image.read_bytes() == before


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"path": "/nonexistent/ct.nii.gz"}, "is not a file"),
        ({"modality": "CT"}, "not neither"),
        ({"image": np.zeros((4, 4, 4)), "affine": np.eye(4), "path": "x.nii.gz"}, "not both"),
        ({"image": np.zeros((4, 4, 4))}, "needs its 'affine'"),
        ({"image": np.zeros((4, 4, 4, 2)), "affine": np.eye(4)}, r"3-D array .* got shape \(4, 4, 4, 2\)"),
        ({"image": np.zeros((4, 4, 4)), "affine": np.zeros((4, 4))}, "invertible 4 x 4"),
        ({"image": np.full((4, 4, 4), np.nan), "affine": np.eye(4)}, "NON_FINITE_VOXELS"),
        ({"image": np.zeros((4, 4, 4)), "affine": np.eye(4), "out": "/tmp/mask.png"}, "a .nii or .nii.gz"),
        (
            {"image": np.zeros((4, 4, 4)), "affine": np.eye(4), "out": "/nonexistent/m.nii.gz"},
            "does not exist",
        ),
    ],
)
def test_bad_rows_are_refused_with_the_row_and_the_reason(served, row, message):
    with pytest.raises(MlflowException, match=message) as info:
        served["pyfunc"].predict(pd.DataFrame([row]))
    assert "row 0" in str(info.value)
    assert info.value.get_http_status_code() == 400


def test_a_refused_nifti_names_its_reason_code(served, tmp_path):
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not a nifti file at all")
    with pytest.raises(MlflowException, match=r"broken.nii.gz refused \(UNREADABLE\)"):
        served["pyfunc"].predict(pd.DataFrame({"path": [str(broken)]}))


def test_the_slice_level_returns_the_networks_logits(served):
    import torch

    from pipeline.io.model_dir import load_model_dir

    loaded = load_model_dir(served["model_dir"])
    net, k = loaded.model.eval(), loaded.unet_config.in_channels  # k: the plan's context slices
    assert k == served["setup"].plan.context_slices
    x = np.random.default_rng(3).normal(size=(3, k, 33, 37)).astype(np.float32)
    with torch.inference_mode():
        expected = net(torch.from_numpy(x)).numpy()
    got = served["pyfunc"].predict({"image": [x]}, params={"level": "slices"})["logits"][0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(MlflowException, match=rf"\(N, {k}, H, W\)"):
        served["pyfunc"].predict({"image": [x[:, 0]]}, params={"level": "slices"})
    with pytest.raises(MlflowException, match="valid levels: volume, slices"):
        served["pyfunc"].predict({"image": [x]}, params={"level": "voxels"})


def test_out_never_replaces_an_existing_file(served, tmp_path):
    target = tmp_path / "taken.nii.gz"
    target.write_bytes(b"someone else's file")
    with pytest.raises(MlflowException, match="exists; the model never replaces a file"):
        served["pyfunc"].predict(pd.DataFrame({"path": [str(served["images"][0])], "out": [str(target)]}))
    assert target.read_bytes() == b"someone else's file"
