"""The model folder: safetensors + JSON, round trips exactly, refuses anything changed or missing."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from pipeline.io.model_dir import (
    CONFIG_FILE,
    MODEL_FILE,
    PLAN_FILE,
    REQUIRED_FILES,
    WEIGHTS_FILE,
    ModelIntegrityError,
    load_model_dir,
    save_model_dir,
)
from pipeline.runtime import prepare_model
from unet_model import UNet, UNetConfig
from unet_model.ensemble import UNetEnsemble

LABELS = {0: "background", 1: "liver", 2: "tumour"}
PLAN = {"slice_axis": 2, "spacing": [0.8, 0.8], "patch_size": [64, 64], "normalization": "ct"}
CONFIG = {"model": {"base_channels": 4}, "train": {"epochs": 2, "lr": 0.001}}


def _trained_model() -> UNet:
    """A tiny U-Net in channels_last with non-default batch-norm statistics."""
    torch.manual_seed(0)
    model = prepare_model(
        UNet(UNetConfig(in_channels=1, num_classes=3, base_channels=4)), torch.device("cpu")
    )
    model.train()
    with torch.no_grad():
        model(torch.randn(2, 1, 32, 32).contiguous(memory_format=torch.channels_last) * 3 + 1)
    return model.eval()


@pytest.fixture(scope="module")
def model() -> UNet:
    return _trained_model()


@pytest.fixture
def saved(model, tmp_path):
    return save_model_dir(model, tmp_path / "model", plan=PLAN, config=CONFIG, label_names=LABELS)


def test_folder_holds_safetensors_and_json_metadata(saved, model):
    assert sorted(p.name for p in saved.iterdir()) == sorted(REQUIRED_FILES)
    meta = json.loads((saved / MODEL_FILE).read_text())
    assert meta["format"] == "unet-pipeline/1"
    assert meta["unet_config"] == model.config.to_dict()
    assert meta["label_names"] == {"0": "background", "1": "liver", "2": "tumour"}
    assert len(meta["weights_sha256"]) == 64
    assert meta["code_version"].startswith("0.")
    assert json.loads((saved / PLAN_FILE).read_text()) == PLAN
    assert json.loads((saved / CONFIG_FILE).read_text()) == CONFIG
    assert not list(saved.parent.glob(".model.*")), "temporary folders left behind"


@pytest.mark.parametrize(("height", "width"), [(33, 37), (64, 64)])
def test_round_trip_gives_the_same_outputs(saved, model, height, width):
    loaded = load_model_dir(saved)
    assert not loaded.model.training
    assert loaded.unet_config == model.config
    assert loaded.plan == PLAN and loaded.config == CONFIG and loaded.label_names == LABELS
    for key, tensor in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], tensor), key
    x = torch.randn(2, 1, height, width)
    with torch.inference_mode():
        expected = model(x.contiguous(memory_format=torch.channels_last))
        got = loaded.model(x)
    assert got.shape == (2, 3, height, width)
    # Same weights; only the memory layout (channels_last vs NCHW kernels) differs.
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_loading_never_unpickles(saved, monkeypatch):
    def refuse(*_args, **_kwargs):
        raise AssertionError("pickle was used")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    assert load_model_dir(saved).sha256


@pytest.mark.parametrize("name", [WEIGHTS_FILE, PLAN_FILE, CONFIG_FILE])
def test_a_flipped_byte_is_refused_naming_the_model_and_file(saved, name):
    target = saved / name
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    with pytest.raises(ModelIntegrityError, match=name) as info:
        load_model_dir(saved)
    assert str(saved) in str(info.value)
    assert info.value.path == saved


@pytest.mark.parametrize("name", REQUIRED_FILES)
def test_a_missing_file_is_refused(saved, name):
    (saved / name).unlink()
    with pytest.raises(ModelIntegrityError, match=f"missing file.*{name}") as info:
        load_model_dir(saved)
    assert str(saved) in str(info.value)


def test_truncated_weights_are_refused(saved):
    weights = saved / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ModelIntegrityError, match="sha256"):
        load_model_dir(saved)


def test_a_missing_folder_is_refused(tmp_path):
    with pytest.raises(ModelIntegrityError, match="no such model folder"):
        load_model_dir(tmp_path / "nothing")


def test_saving_again_replaces_the_model_atomically(saved, model):
    first = load_model_dir(saved).sha256
    other = UNet(UNetConfig(num_classes=3, base_channels=4))
    save_model_dir(other, saved, plan={"v": 2}, config=CONFIG, label_names=LABELS)
    reloaded = load_model_dir(saved)
    assert reloaded.sha256 != first
    assert reloaded.plan == {"v": 2}
    assert sorted(p.name for p in saved.parent.iterdir()) == ["model"]


def test_label_names_must_cover_every_class(model, tmp_path):
    with pytest.raises(ValueError, match="label_names has 2 entries"):
        save_model_dir(model, tmp_path / "m", plan=PLAN, config=CONFIG, label_names={0: "bg", 1: "liver"})
    assert not (tmp_path / "m").exists()


# ------------------------------------------------------------------------------------------
# Cross-validation models: the folds' networks in one folder, one plan


def _ensemble(k: int) -> UNetEnsemble:
    members = []
    for seed in range(k):
        torch.manual_seed(seed)
        members.append(UNet(UNetConfig(num_classes=3, base_channels=4)).eval())
    return UNetEnsemble(members).eval()


def test_a_single_model_folder_is_written_and_read_as_before(saved):
    """No key of the ensembles in a single model's model.json: folders of single models (and
    those written before ensembles existed) load as one U-Net."""
    meta = json.loads((saved / MODEL_FILE).read_text())
    assert set(meta) == {
        "format",
        "unet_config",
        "label_names",
        "weights_sha256",
        "files_sha256",
        "code_version",
        "created",
        "validation",
    }
    loaded = load_model_dir(saved)
    assert type(loaded.model) is UNet and loaded.folds == 1


def test_an_ensemble_round_trips_with_its_folds_in_one_weights_file(tmp_path):
    ensemble = _ensemble(3)
    val_cases = [["c3", "c0"], ["c1"], ["c2"]]
    path = save_model_dir(
        ensemble, tmp_path / "m", plan=PLAN, config=CONFIG, label_names=LABELS, fold_val_cases=val_cases
    )
    assert sorted(p.name for p in path.iterdir()) == sorted(REQUIRED_FILES)
    meta = json.loads((path / MODEL_FILE).read_text())
    assert meta["folds"] == 3 and meta["fold_val_cases"] == [["c0", "c3"], ["c1"], ["c2"]]
    loaded = load_model_dir(path)
    assert isinstance(loaded.model, UNetEnsemble) and loaded.folds == 3
    assert loaded.unet_config == ensemble.config and loaded.plan == PLAN
    for key, tensor in ensemble.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], tensor), key
    x = torch.randn(1, 1, 33, 37)
    with torch.inference_mode():
        torch.testing.assert_close(loaded.model(x), ensemble(x))


def test_an_ensemble_of_one_is_saved_as_its_single_model(tmp_path, model):
    path = save_model_dir(UNetEnsemble([model]), tmp_path / "m", plan=PLAN, config=CONFIG, label_names=LABELS)
    assert "folds" not in json.loads((path / MODEL_FILE).read_text())
    assert type(load_model_dir(path).model) is UNet


def test_a_fold_count_that_does_not_fit_the_weights_is_refused(tmp_path):
    path = save_model_dir(_ensemble(2), tmp_path / "m", plan=PLAN, config=CONFIG, label_names=LABELS)
    meta = json.loads((path / MODEL_FILE).read_text())
    for folds, problem in ((3, "3 fold"), (0, "folds 0")):
        (path / MODEL_FILE).write_text(json.dumps({**meta, "folds": folds}))
        with pytest.raises(ModelIntegrityError, match=problem):
            load_model_dir(path)
