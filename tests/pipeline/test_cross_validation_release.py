"""Cross-validation through MLflow: nested fold runs, the registered ensemble, and the champion
gate scoring champion and challenger on the same cases (a real SQLite store, no mocks)."""

from __future__ import annotations

import mlflow
import numpy as np
import pytest
import torch

from pipeline import tracking
from pipeline.io.model_dir import load_model_dir
from pipeline.tracking import release
from pipeline.tracking.release import (
    evaluate_on_cases,
    gate_run,
    out_of_fold_groups,
    register_model,
    train_and_log,
    validation_sha256,
)
from tests.pipeline.ingest.staging_fixture import make_staging, tiny_config
from unet_model import UNet

pytestmark = pytest.mark.slow  # three tiny trainings and two logged models: about 2 minutes on 2 cores

CASES = [f"case_{i:03d}" for i in range(4)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One 2-fold cross-validation and one single model, trained and logged on the same staging."""
    root = tmp_path_factory.mktemp("cv-release")
    staging = make_staging(root, n_cases=4, size=32)
    uri = f"sqlite:///{root}/mlflow.db"
    base = tiny_config(val_qc_cases=1).replace(tracking={"experiment_name": "cv"})
    cv = train_and_log(staging, root / "cv", base.replace(data={"folds": 2}), tracking_uri=uri)
    single = train_and_log(
        staging, root / "single", base.replace(data={"val_fraction": 0.5}), tracking_uri=uri
    )
    return {"staging": staging, "uri": uri, "cv": cv, "single": single, "config": base}


def test_folds_are_runs_nested_under_the_run_that_holds_the_ensemble(runs):
    cv, client = runs["cv"], mlflow.MlflowClient(runs["uri"])
    assert cv.tracking_error is None
    parent = client.get_run(cv.run_id)
    assert parent.data.tags["cv.folds"] == "2"
    assert parent.data.metrics["cv_dice_mean"] == pytest.approx(cv.result.best_dice_mean)
    assert parent.data.metrics["cv_dice/organ"] == pytest.approx(cv.result.best_dice["organ"])
    per_fold = sorted(client.get_metric_history(cv.run_id, "fold_val_dice_mean"), key=lambda m: m.step)
    assert [m.step for m in per_fold] == [0, 1]
    assert [m.value for m in per_fold] == pytest.approx([f["best_dice_mean"] for f in cv.result.folds])
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{cv.run_id}'"
    )
    assert sorted(r.info.run_name for r in children) == ["fold-0", "fold-1"]
    for child in children:
        k = int(child.data.tags["cv.fold"])
        assert child.info.status == "FINISHED"
        assert child.data.params["data.fold"] == str(k)
        history = client.get_metric_history(child.info.run_id, "val_dice_mean")
        assert max(m.value for m in history) == pytest.approx(cv.result.folds[k]["best_dice_mean"])
        (qc,) = client.list_artifacts(child.info.run_id, "validation_qc")
        assert qc.path == f"validation_qc/{cv.result.folds[k]['val'][0]}.png"
    summary = cv.summary()
    assert [f["fold"] for f in summary["folds"]] == [0, 1] and summary["val_dice"]["mean"] == pytest.approx(
        cv.result.best_dice_mean
    )


def test_the_registered_ensemble_loads_and_serves_the_mean_of_its_folds(runs):
    cv, uri = runs["cv"], runs["uri"]
    version = register_model(cv.model_uri, "cv-served", tracking_uri=uri)
    loaded = tracking.load_registered(f"models:/cv-served/{version}", tracking_uri=uri)
    assert loaded.folds == 2 and loaded.sha256 == load_model_dir(cv.model_dir).sha256
    mv = mlflow.MlflowClient(uri).get_model_version("cv-served", str(version))
    assert float(mv.tags["val_dice.mean"]) == pytest.approx(cv.result.best_dice_mean, abs=1e-4)
    pyfunc = mlflow.pyfunc.load_model(f"models:/cv-served/{version}")
    channels = loaded.model.members[0].config.in_channels  # 2.5-D context slices where planned
    x = torch.randn(2, channels, 33, 37)
    got = pyfunc.predict({"image": [x.numpy()]}, params={"level": "slices"})["logits"][0]
    with torch.inference_mode():
        mean = torch.stack([m(x).softmax(1) for m in loaded.model.members]).mean(0)
    np.testing.assert_allclose(torch.from_numpy(got).softmax(1).numpy(), mean.numpy(), atol=1e-5)


def test_an_ensemble_is_scored_out_of_fold_on_the_cases_its_folds_trained_on(runs):
    cv = runs["cv"]
    loaded = load_model_dir(cv.model_dir)
    groups = out_of_fold_groups(loaded, CASES)
    assert [ids for _, ids in groups] == [f["val"] for f in cv.result.folds]
    assert [net for net, _ in groups] == list(loaded.model.members)
    # The gate's scoring of the whole ensemble on all its cases is its cross-validation Dice
    # (the same predictions; only the memory layout of the kernels differs).
    score = evaluate_on_cases(loaded, runs["staging"], CASES, runs["config"])
    assert score == pytest.approx(cv.result.best_dice_mean, abs=1e-3)
    # A case no fold held out is scored by the whole ensemble.
    ((net, ids),) = out_of_fold_groups(loaded, ["elsewhere"])
    assert net is loaded.model and ids == ["elsewhere"]


@pytest.fixture
def scored(monkeypatch):
    """(network, case IDs) of every scoring the gate runs (the real validation runs)."""
    calls = []
    real = release.validate

    def spy(model, cases, plan, **kwargs):
        calls.append((model, [c.case_id for c in cases]))
        return real(model, cases, plan, **kwargs)

    monkeypatch.setattr(release, "validate", spy)
    return calls


def _gate_tags(runs, name, first, second):
    """Register `first` then `second` (TrainedModels) under `name`, gating each; the second's tags."""
    uri, staging, config = runs["uri"], runs["staging"], runs["config"]
    for trained in (first, second):
        version = register_model(trained.model_uri, name, tracking_uri=uri)
        gate_run(name, version, trained.result.out_dir, staging, config, tracking_uri=uri)
    return mlflow.MlflowClient(uri).get_model_version(name, str(version)).tags


def test_gate_scores_a_single_champion_on_the_cross_validations_cases(runs, scored):
    single, cv = runs["single"], runs["cv"]
    tags = _gate_tags(runs, "gate-single-then-cv", single, cv)
    # The challenger's score is its out-of-fold Dice over all four cases; the champion (one
    # U-Net) is scored again on exactly those cases, and nothing else is scored.
    assert tags["val_cases_sha256"] == validation_sha256(runs["staging"], CASES)
    assert float(tags["val_mean_dice"]) == pytest.approx(cv.result.best_dice_mean, abs=1e-6)
    assert tags["gate.champion_rescored"] == "true"
    ((net, ids),) = scored
    assert type(net) is UNet and ids == CASES
    champion = load_model_dir(single.model_dir)
    expected = evaluate_on_cases(champion, runs["staging"], CASES, runs["config"])
    assert float(tags["gate.champion_score"]) == pytest.approx(expected, abs=1e-6)


def test_gate_scores_an_ensemble_champion_out_of_fold_on_the_challengers_cases(runs, scored):
    single, cv = runs["single"], runs["cv"]
    tags = _gate_tags(runs, "gate-cv-then-single", cv, single)
    val_ids = single.result.split["val"]
    assert tags["val_cases_sha256"] == validation_sha256(runs["staging"], val_ids)
    assert tags["gate.champion_rescored"] == "true"
    # The ensemble trained on every staged case: each of the challenger's cases is scored by
    # the one fold network that held it out, through predict's path.
    assert sorted(c for _, ids in scored for c in ids) == sorted(val_ids)
    fold_of = {c: f["fold"] for f in cv.result.folds for c in f["val"]}
    for net, ids in scored:
        assert type(net) is UNet  # a fold's network, never the whole ensemble
        assert len({fold_of[c] for c in ids}) == 1
    champion = load_model_dir(cv.model_dir)
    expected = evaluate_on_cases(champion, runs["staging"], val_ids, runs["config"])
    assert float(tags["gate.champion_score"]) == pytest.approx(expected, abs=1e-6)


def test_two_cross_validations_of_the_same_cases_compare_their_out_of_fold_scores(runs, scored):
    cv = runs["cv"]
    tags = _gate_tags(runs, "gate-cv-then-cv", cv, cv)  # a retrain of the same folds
    assert "gate.champion_rescored" not in tags and not scored  # same cases: nothing scored again
    assert float(tags["gate.champion_score"]) == pytest.approx(cv.result.best_dice_mean, abs=1e-6)
