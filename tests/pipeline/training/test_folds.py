"""K-fold cross-validation: one model per fold, their ensemble as the model, resumable by fold."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from pipeline.io.model_dir import load_model_dir
from pipeline.training import folds
from pipeline.training.data import split_cases
from pipeline.training.folds import check_folds, cross_validate
from pipeline.training.result import read_result
from tests.pipeline.ingest.staging_fixture import tiny_config

pytestmark = pytest.mark.slow  # three tiny fold trainings: about a minute on 2 cores

CASES = [f"case_{i:03d}" for i in range(4)]  # the staging fixture's


def _config(**train):
    return tiny_config(val_qc_cases=1, **train).replace(data={"folds": 2})


@pytest.fixture(scope="module")
def cv(staging, tmp_path_factory):
    """Two folds of the four staged cases, trained once for the tests that only read them."""
    out = tmp_path_factory.mktemp("cv") / "run"
    starts, ends = [], []

    class Recorder:
        def on_train_start(self, *, config, plan, split):
            starts.append((config, plan, split))

        def on_train_end(self, result):
            ends.append(result)

    result = cross_validate(staging, out, _config(), callbacks=[Recorder()])
    return {"out": out, "result": result, "starts": starts, "ends": ends}


def test_each_fold_validates_on_its_own_held_out_fold(cv):
    result, out = cv["result"], cv["out"]
    assert [f["fold"] for f in result.folds] == [0, 1]
    seen = []
    for k, fold in enumerate(result.folds):
        train_ids, val_ids = split_cases(CASES, folds=2, fold=k, seed=0)
        recorded = read_result(out / f"fold_{k}")
        assert recorded["split"] == {"train": train_ids, "val": val_ids}
        assert fold["val"] == val_ids and fold["out_dir"] == str(out / f"fold_{k}")
        assert (out / f"fold_{k}" / "checkpoints" / "last.pt").is_file()
        assert sorted(p.name for p in (out / f"fold_{k}" / "validation_qc").iterdir()) == [
            f"{val_ids[0]}.png"
        ]
        seen += val_ids
    assert sorted(seen) == CASES  # every case validated by exactly one fold
    # The cross-validation's own record: every case trained some fold and scores out of fold.
    assert result.split == {"train": CASES, "val": CASES}
    assert read_result(out)["split"]["val"] == CASES


def test_the_score_is_the_mean_over_cases_of_their_out_of_fold_dice(cv):
    result, out = cv["result"], cv["out"]
    per_fold = [read_result(out / f"fold_{k}") for k in range(2)]
    weighted = sum(len(r["split"]["val"]) * r["best_dice_mean"] for r in per_fold) / len(CASES)
    assert result.best_dice_mean == pytest.approx(weighted)
    for label in ("organ", "lesion"):
        expected = sum(len(r["split"]["val"]) * r["best_dice"][label] for r in per_fold) / len(CASES)
        assert result.best_dice[label] == pytest.approx(expected)
    assert result.epochs_run == sum(r["epochs_run"] for r in per_fold)
    assert json.loads((out / "result.json").read_text())["best_dice_mean"] == pytest.approx(weighted)


def test_the_model_is_the_folds_best_weights_with_one_plan(cv):
    result, out = cv["result"], cv["out"]
    loaded = load_model_dir(result.model_dir)
    assert result.model_dir == out / "model" and loaded.folds == 2
    for k in range(2):
        fold_model = load_model_dir(out / f"fold_{k}" / "model")
        assert fold_model.plan == loaded.plan
        for key, tensor in fold_model.model.state_dict().items():
            assert torch.equal(loaded.model.members[k].state_dict()[key], tensor), (k, key)
    assert loaded.metadata["fold_val_cases"] == [f["val"] for f in result.folds]
    assert loaded.metadata["validation"]["val_dice_mean"] == pytest.approx(result.best_dice_mean)
    assert loaded.config["data"]["folds"] == 2


def test_callbacks_see_the_cross_validation_as_one_run(cv):
    ((config, plan, split),) = cv["starts"]
    assert config.data.folds == 2 and split == {"train": CASES, "val": CASES}
    assert plan.to_dict() == json.loads((cv["out"] / "plan.json").read_text())
    assert cv["ends"] == [cv["result"]]


def test_a_rerun_keeps_the_finished_folds_and_resumes_the_interrupted_one(cv, staging, tmp_path, monkeypatch):
    out = tmp_path / "run"
    shutil.copytree(cv["out"], out)
    # As if the run had died in fold 1 after its last checkpoint, before its model and record.
    (out / "fold_1" / "result.json").unlink()
    shutil.rmtree(out / "fold_1" / "model")
    shutil.rmtree(out / "model")
    (out / "result.json").unlink()
    trained = []
    real_train = folds.train

    def recording_train(staging, out_dir, *args, **kwargs):
        trained.append(out_dir)
        return real_train(staging, out_dir, *args, **kwargs)

    monkeypatch.setattr(folds, "train", recording_train)
    # A changed config does not mix into a cross-validation that started with another one.
    again = cross_validate(staging, out, _config(epochs=5))
    assert trained == [out / "fold_1"]  # fold 0 was not trained again
    fold1 = read_result(out / "fold_1")
    assert fold1["resumed_from_epoch"] == 2 and fold1["epochs_run"] == 2  # from its checkpoint
    assert json.loads((out / "config.json").read_text())["train"]["epochs"] == 2
    assert again.best_dice_mean == pytest.approx(cv["result"].best_dice_mean)
    assert load_model_dir(again.model_dir).folds == 2


def test_folds_must_leave_every_fold_a_validation_case(staging):
    assert check_folds(staging, 4) == CASES
    with pytest.raises(ValueError, match=r"folds=5 exceeds the 4 labelled case\(s\) of .*manifest.jsonl"):
        check_folds(staging, 5)
    with pytest.raises(ValueError, match="at least 2 folds"):
        check_folds(staging, 1)
