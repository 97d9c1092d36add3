"""MLflow tracking and registry against a real SQLite store (no mocks)."""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import sys
import time
from pathlib import Path

import matplotlib
import mlflow
import numpy as np
import pytest
import torch

from pipeline import tracking
from pipeline.config import Workdir
from pipeline.io.model_dir import WEIGHTS_FILE, ModelIntegrityError, load_model_dir, save_model_dir
from pipeline.planning.plan import Plan
from pipeline.tracking import Tracker, load_registered, promote, register
from pipeline.tracking import pyfunc as tracking_pyfunc
from tests.pipeline.ingest.staging_fixture import make_staging, tiny_config
from unet_model import UNet, UNetConfig

matplotlib.use("Agg")

LABELS = {0: "background", 1: "organ"}
PLAN = {"slice_axis": 2, "spacing": [0.8, 0.8], "patch_size": [64, 64], "val_cases": ["case-0003"]}
# The plan saved with the model: a real one, since the logged pyfunc runs it on its input example.
MODEL_PLAN = Plan(
    slice_axis=2,
    target_spacing=1.0,
    patch_size=32,
    normalization={"MR": {"scheme": "zscore"}},
    labels={"background": 0, "organ": 1},
    class_weights=[1.0, 1.0],
).to_dict()
CONFIG = {"model": {"base_channels": 4}, "train": {"epochs": 50, "lr": 0.001}}
EPOCHS = 50


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A SQLite store with its artifact root beside it; the test runs from another folder."""
    root = tmp_path_factory.mktemp("mlflow")
    cwd = tmp_path_factory.mktemp("cwd")
    previous = Path.cwd()
    os.chdir(cwd)  # MLflow's fallback artifact root is ./mlruns: show that nothing lands here
    try:
        yield {"uri": f"sqlite:///{root}/mlflow.db", "root": root, "cwd": cwd}
    finally:
        os.chdir(previous)


@pytest.fixture(scope="module")
def trained(store, tmp_path_factory):
    """A run as training makes it: config, per-epoch metrics, curves, QC, the model."""
    work = tmp_path_factory.mktemp("train")
    torch.manual_seed(1)
    model = UNet(UNetConfig(num_classes=2, base_channels=4)).eval()
    model_dir = save_model_dir(model, work / "model", plan=MODEL_PLAN, config=CONFIG, label_names=LABELS)
    curve, qc = work / "curves.png", work / "case-0003_qc.png"
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot(range(EPOCHS), np.linspace(1, 0.1, EPOCHS))
    fig.savefig(curve)
    fig.savefig(qc)
    plt.close(fig)

    with Tracker(
        tracking_uri=store["uri"],
        run_name="train-test",
        dataset_sha256="ab" * 32,
        flush_every_s=3600,
        tags={tracking.TAG_PREFECT_FLOW_RUN_ID: "0f1e2d3c"},
    ) as tracker:
        tracker.log_config(CONFIG, PLAN)
        for epoch in range(EPOCHS):
            tracker.on_epoch_end(
                epoch, {"loss": 1.0 / (epoch + 1), "val_dice_organ": 0.5, "val_mean_dice": 0.5}
            )
        tracker.log_artifact(curve)
        tracker.log_artifacts([qc], artifact_path="qc")
        model_uri = tracker.log_model(model_dir, val_dice={"organ": 0.8125, "mean": 0.8125})
    return {
        "tracker": tracker,
        "model": model,
        "model_dir": model_dir,
        "model_uri": model_uri,
        "client": mlflow.MlflowClient(store["uri"]),
    }


def test_run_records_config_plan_tags_metrics_and_artifacts(trained, store):
    tracker, client = trained["tracker"], trained["client"]
    assert tracker.tracking_error is None
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.epochs"] == "50"
    assert run.data.params["plan.patch_size"] == "[64, 64]"
    assert run.data.params["plan.val_cases"] == '["case-0003"]'
    assert run.data.tags[tracking.TAG_DATASET_SHA] == "ab" * 32
    assert run.data.tags[tracking.TAG_CODE_VERSION].startswith("0.")
    assert run.data.tags[tracking.TAG_WEIGHTS_SHA] == load_model_dir(trained["model_dir"]).sha256
    history = client.get_metric_history(tracker.run_id, "loss")
    assert [m.step for m in history] == list(range(EPOCHS))
    assert history[-1].value == pytest.approx(1.0 / EPOCHS)
    artifacts = {a.path for a in client.list_artifacts(tracker.run_id)}
    assert {"config.yaml", "plan.json", "curves.png", "qc"} <= artifacts
    assert [a.path for a in client.list_artifacts(tracker.run_id, "qc")] == ["qc/case-0003_qc.png"]


def test_artifacts_live_beside_the_store_not_in_the_working_directory(trained, store):
    experiment = trained["client"].get_experiment(trained["tracker"].experiment_id)
    assert experiment.artifact_location == (store["root"] / "mlartifacts").as_uri()
    assert (store["root"] / "mlartifacts" / "models").is_dir()
    assert not (store["cwd"] / "mlruns").exists()


def test_metrics_of_50_epochs_take_one_batch_request(trained):
    # 50 epochs x 3 metrics = 150 values, buffered and sent by one log_batch when the run ends.
    assert trained["tracker"].metric_requests == 1


def test_metrics_are_split_at_mlflows_batch_limit(store):
    with Tracker(tracking_uri=store["uri"], flush_every_s=3600) as tracker:
        for epoch in range(300):
            tracker.on_epoch_end(epoch, {"a": 1.0, "b": 2.0, "c": 3.0, "d": float(epoch)})
    assert tracker.metric_requests == 2  # 1,200 values, 1,000 per request
    history = mlflow.MlflowClient(store["uri"]).get_metric_history(tracker.run_id, "d")
    assert len(history) == 300


def test_run_has_mlflows_context_tags_and_ours(trained):
    tags = trained["client"].get_run(trained["tracker"].run_id).data.tags
    # Set by MLflow's context providers, which MlflowClient.create_run alone skips.
    assert tags["mlflow.user"]
    assert tags["mlflow.source.type"] == "LOCAL"
    assert tags["mlflow.source.name"]
    assert tags[tracking.TAG_PREFECT_FLOW_RUN_ID] == "0f1e2d3c"


def test_logged_model_segments_volumes_carries_its_code_and_no_pickle(trained, store):
    model_uri = trained["model_uri"]
    assert model_uri.startswith("models:/")
    info = mlflow.models.get_model_info(model_uri)
    assert info.signature.inputs.input_names() == ["path", "image", "affine", "modality", "out"]
    assert [p.name for p in info.signature.params.params] == ["level"]
    assert info.signature.outputs.input_names() == ["mask", "mask_path", "logits"]
    local = Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=str(store["root"] / "dl")))
    files = [p.name for p in local.rglob("*") if p.is_file()]
    assert WEIGHTS_FILE in files
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".pt", ".pth", ".pyc"))], files
    # The project's code travels with the model (no checkout needed where it is served) ...
    assert (local / "code" / "pipeline" / "inference" / "predictor.py").is_file()
    assert (local / "code" / "unet_model" / "model.py").is_file()
    assert not (local / "code" / "flows").exists()
    # ... and every requirement is pinned to a release an index holds (no local build tags).
    reqs = (local / "requirements.txt").read_text().split()
    assert reqs == tracking_pyfunc.pip_requirements()
    assert all("==" in r and "+" not in r for r in reqs), reqs
    assert not [r for r in reqs if r.startswith(("unet-pipeline", "prefect"))], reqs
    # The input example is a synthetic volume with its affine, not a batch of slices.
    example = mlflow.models.Model.load(str(local)).load_input_example(str(local))
    assert np.asarray(example["image"][0]).ndim == 3
    assert np.asarray(example["affine"][0]).shape == (4, 4)


def test_serving_requirements_are_the_projects_dependencies_minus_orchestration():
    import tomllib

    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    declared = {
        re.split(r"[<>=!~;\[ ]", dep, maxsplit=1)[0].lower() for dep in pyproject["project"]["dependencies"]
    }
    served = {name.lower() for name in tracking_pyfunc.SERVING_DISTRIBUTIONS}
    assert served - declared == {"mlflow"} - declared
    assert declared - served == set(tracking_pyfunc.NOT_SERVED)


def test_logged_model_and_version_carry_labels_plan_and_dice(trained, store):
    name = "unet-described"
    version = register(trained["model_uri"], name, tracking_uri=store["uri"])
    mv = trained["client"].get_model_version(name, str(version))
    assert mv.tags[tracking.TAG_LABELS] == "1=organ"
    assert mv.tags[tracking.TAG_SPACING] == "1"
    assert mv.tags[tracking.TAG_MODALITIES] == "MR"
    assert mv.tags[tracking.TAG_VAL_DICE_MEAN] == "0.8125"
    assert mv.tags[tracking.TAG_CODE_VERSION].startswith("0.")
    lines = mv.description.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("Segments organ in MR volumes") and "1 mm in-plane" in lines[0]
    assert "mean validation Dice 0.812" in lines[1] and "1=organ" in lines[1]
    assert "@champion" in trained["client"].get_registered_model(name).description


@pytest.mark.parametrize("uri_kind", ["alias", "version", "run"])
def test_registered_model_loads_back_with_the_same_outputs(trained, store, uri_kind):
    name = f"unet-load-{uri_kind}"
    version = register(trained["model_uri"], name, tracking_uri=store["uri"])
    assert promote(name, version, 0.9, margin=0.01, tracking_uri=store["uri"])
    uri = {
        "alias": f"models:/{name}@champion",
        "version": f"models:/{name}/{version}",
        "run": f"runs:/{trained['tracker'].run_id}/{tracking.MODEL_NAME_IN_RUN}",
    }[uri_kind]
    loaded = load_registered(uri, tracking_uri=store["uri"])
    assert loaded.sha256 == load_model_dir(trained["model_dir"]).sha256
    assert loaded.label_names == LABELS and loaded.plan == MODEL_PLAN
    x = torch.randn(2, 1, 33, 37)
    with torch.inference_mode():
        assert torch.equal(loaded.model(x), trained["model"](x))


def test_registering_prints_no_mlflow_notices_and_keeps_other_output(trained, store, capfd, caplog):
    name = "unet-quiet"
    with caplog.at_level(logging.DEBUG, logger="pipeline.tracking"):
        first = register(trained["model_uri"], name, tracking_uri=store["uri"])  # a new name
        second = register(trained["model_uri"], name, tracking_uri=store["uri"])  # it exists now
    assert (first, second) == (1, 2)
    captured = capfd.readouterr()
    for text in (captured.out, captured.err):
        assert "Successfully registered model" not in text
        assert "Created version" not in text
        assert "already exists" not in text
    # Kept at DEBUG in our own log.
    assert any("Created version '2'" in r.getMessage() for r in caplog.records)
    # Anything else written to stderr meanwhile (a warning, another thread) still comes through.
    with tracking._registry_notices_to_debug():
        print("Created version '9' of model 'x'.", file=sys.stderr)
        print("WARNING mlflow: a real problem", file=sys.stderr)
        sys.stderr.write("partial line")
    assert capfd.readouterr().err == "WARNING mlflow: a real problem\npartial line"


def test_slice_level_pyfunc_predicts_what_the_in_memory_model_predicted(trained, store):
    name = "unet-pyfunc"
    version = register(trained["model_uri"], name, tracking_uri=store["uri"])
    assert (
        trained["client"].get_model_version(name, str(version)).tags[tracking.TAG_WEIGHTS_SHA]
        == load_model_dir(trained["model_dir"]).sha256
    )
    promote(name, version, 0.9, margin=0.0, tracking_uri=store["uri"])
    pyfunc = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    x = torch.randn(1, 1, 45, 29)
    with torch.inference_mode():
        expected = trained["model"](x).numpy()
    got = pyfunc.predict({"image": [x.numpy()]}, params={"level": "slices"})["logits"][0]
    assert got.shape == (1, 2, 45, 29)
    # The pyfunc runs the network as predict does (channels_last), the reference in NCHW.
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_a_tampered_download_is_refused(trained, store, tmp_path):
    dst = tmp_path / "download"
    load_registered(trained["model_uri"], tracking_uri=store["uri"], dst=dst)
    weights = next(dst.rglob(WEIGHTS_FILE))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelIntegrityError, match=WEIGHTS_FILE) as info:
        load_registered(dst)
    assert str(weights.parent) in str(info.value)


def test_gate_champion_challenger_and_margin(trained, store):
    name, uri, client = "unet-gate", store["uri"], trained["client"]

    first = register(trained["model_uri"], name, tracking_uri=uri)
    assert promote(name, first, 0.80, margin=0.02, val_cases_sha256="cases-a", tracking_uri=uri)
    assert str(client.get_model_version_by_alias(name, "champion").version) == str(first)

    worse = register(trained["model_uri"], name, tracking_uri=uri)
    assert not promote(name, worse, 0.70, margin=0.02, val_cases_sha256="cases-a", tracking_uri=uri)
    assert str(client.get_model_version_by_alias(name, "champion").version) == str(first)
    assert str(client.get_model_version_by_alias(name, "challenger").version) == str(worse)
    tags = client.get_model_version(name, str(worse)).tags
    assert tags["val_mean_dice"] == "0.700000"
    assert tags["gate.champion_score"] == "0.800000"
    assert tags["gate.champion_version"] == str(first)
    assert tags["gate.decision"] == "challenger"

    within = register(trained["model_uri"], name, tracking_uri=uri)
    assert promote(name, within, 0.79, margin=0.02, val_cases_sha256="cases-a", tracking_uri=uri)
    assert str(client.get_model_version_by_alias(name, "champion").version) == str(within)
    assert client.get_model_version(name, str(within)).tags["gate.decision"] == "champion"


def test_gate_rescores_the_champion_on_the_same_cases(trained, store):
    name, uri, client = "unet-gate-rescore", store["uri"], trained["client"]
    first = register(trained["model_uri"], name, tracking_uri=uri)
    promote(name, first, 0.95, margin=0.01, val_cases_sha256="old-cases", tracking_uri=uri)

    scored = []

    def evaluate(loaded):
        scored.append(loaded.sha256)
        return 0.75  # the champion on the new validation cases

    second = register(trained["model_uri"], name, tracking_uri=uri)
    assert promote(
        name, second, 0.80, margin=0.01, val_cases_sha256="new-cases", evaluate_fn=evaluate, tracking_uri=uri
    )
    assert scored == [load_model_dir(trained["model_dir"]).sha256]
    tags = client.get_model_version(name, str(second)).tags
    assert tags["gate.champion_score"] == "0.750000"
    assert tags["gate.champion_rescored"] == "true"
    assert tags["val_cases_sha256"] == "new-cases"


@pytest.mark.parametrize("error", [RuntimeError("loss is NaN"), KeyboardInterrupt()])
def test_a_run_is_never_left_running(store, error):
    with pytest.raises(type(error)), Tracker(tracking_uri=store["uri"]) as tracker:
        tracker.on_epoch_end(0, {"loss": 1.0})
        raise error
    run = mlflow.MlflowClient(store["uri"]).get_run(tracker.run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags[tracking.TAG_END_REASON].startswith(type(error).__name__)
    assert [m.step for m in mlflow.MlflowClient(store["uri"]).get_metric_history(tracker.run_id, "loss")] == [
        0
    ]


def test_an_unreachable_tracking_server_does_not_stop_training(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    with socket.socket() as sock:  # a port that nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    model = UNet(UNetConfig(num_classes=2, base_channels=4))
    started = time.monotonic()
    with Tracker(tracking_uri=f"http://127.0.0.1:{port}", flush_every_s=0) as tracker:
        tracker.log_config(CONFIG, PLAN)
        for epoch in range(3):
            tracker.on_epoch_end(epoch, {"loss": 1.0})
        model_dir = save_model_dir(model, tmp_path / "model", plan=PLAN, config=CONFIG, label_names=LABELS)
        assert tracker.log_model(model_dir) is None
    assert time.monotonic() - started < 20
    assert tracker.tracking_error is not None and f"127.0.0.1:{port}" in tracker.tracking_error
    assert not tracker.active
    assert load_model_dir(model_dir).sha256  # the model is kept


def test_patient_identifiers_are_refused(store):
    with Tracker(tracking_uri=store["uri"]) as tracker, pytest.raises(ValueError, match="patient identifier"):
        tracker.log_params({"data": {"PatientName": "DOE^JANE"}})


def test_mlflow_ui_command(tmp_path, monkeypatch):
    workdir = Workdir.resolve(tmp_path)
    command = tracking.mlflow_ui_command(workdir)
    assert command.startswith(f"mlflow ui --backend-store-uri sqlite:///{tmp_path}/mlflow.db ")
    assert command.endswith(f"--default-artifact-root {(tmp_path / 'mlartifacts').as_uri()}")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    assert tracking.mlflow_ui_command(workdir) == "http://mlflow.internal:5000"


def test_run_records_the_staged_dataset_as_its_input(store, tmp_path):
    staging = make_staging(tmp_path, n_cases=3)
    sha = tracking.dataset_sha256(staging / "manifest.jsonl")
    with Tracker(tracking_uri=store["uri"]) as tracker:
        tracker.log_dataset(staging, {"train": ["case_000", "case_001"], "val": ["case_002"]})
    assert tracker.tracking_error is None
    inputs = mlflow.MlflowClient(store["uri"]).get_run(tracker.run_id).inputs.dataset_inputs
    assert len(inputs) == 1
    dataset = inputs[0].dataset
    assert dataset.digest == sha[:32]
    assert dataset.name == "staging"
    assert json.loads(dataset.source)["uri"] == (staging / "manifest.jsonl").as_uri()
    profile = json.loads(dataset.profile)
    assert profile == {
        "cases": 3,
        "labelled_cases": 3,
        "modalities": {"CT": 2, "MR": 1},
        "manifest_sha256": sha,
        "split": {"train": 2, "val": 1},
    }
    assert {t.key: t.value for t in inputs[0].tags} == {"mlflow.data.context": "training"}


def test_system_metrics_are_sampled_while_the_run_is_open(store, monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    with Tracker(tracking_uri=store["uri"], system_metrics=True) as tracker:
        deadline = time.monotonic() + 120  # a bound on waiting, not a timing assertion
        while tracker.system_metrics_samples < 1 and time.monotonic() < deadline:
            time.sleep(0.1)
    assert tracker.system_metrics_samples >= 1
    metrics = mlflow.MlflowClient(store["uri"]).get_run(tracker.run_id).data.metrics
    assert metrics["system/cpu_utilization_percentage"] >= 0
    assert metrics["system/system_memory_usage_megabytes"] > 0


def test_system_metrics_are_off_unless_asked(store):
    with Tracker(tracking_uri=store["uri"]) as tracker:
        pass
    metrics = mlflow.MlflowClient(store["uri"]).get_run(tracker.run_id).data.metrics
    assert not [k for k in metrics if k.startswith("system/")]


def test_release_summary_links_run_and_version_on_a_server_and_says_how_to_open_a_local_store():
    from pipeline.tracking.release import summary_markdown

    summary = {
        "val_dice": {"organ": 0.81, "mean": 0.81},
        "run_id": "abc123",
        "run_url": "http://mlflow.internal:5000/#/experiments/1/runs/abc123",
        "stopped_reason": "early_stopping",
    }
    served = summary_markdown(summary, "unet seg", 3, True, "http://mlflow.internal:5000")
    assert "Mean validation Dice **0.810** (organ 0.810)" in served
    assert "[MLflow run `abc123`](http://mlflow.internal:5000/#/experiments/1/runs/abc123)" in served
    assert "(http://mlflow.internal:5000/#/models/unet%20seg/versions/3): champion." in served
    assert served.endswith("Stopped: early_stopping.")
    local = summary_markdown({**summary, "run_url": None}, "seg", 4, False, "sqlite:////tmp/mlflow.db")
    assert "MLflow run `abc123`; model **seg** version **4** (`models:/seg/4`; open with " in local
    assert ": challenger." in local


def test_training_run_keeps_validation_qc_pictures_as_artifacts(store, tmp_path):
    """train_and_log: the validation cases' QC pictures (prediction and ground truth) land in the
    run under validation_qc/<case_id>.png, as written locally, capped by train.val_qc_cases."""
    from PIL import Image

    from pipeline.tracking.release import train_and_log

    staging = make_staging(tmp_path / "staging", n_cases=6, size=32)
    config = tiny_config(val_qc_cases=2).replace(
        data={"val_fraction": 0.5}, tracking={"experiment_name": "validation-qc"}
    )
    trained = train_and_log(staging, tmp_path / "run", config, tracking_uri=store["uri"])
    assert trained.tracking_error is None
    val_ids = trained.result.split["val"]
    assert len(val_ids) == 3  # more than the cap
    expected = [f"validation_qc/{c}.png" for c in sorted(val_ids[:2])]
    client = mlflow.MlflowClient(store["uri"])
    assert [a.path for a in client.list_artifacts(trained.run_id, "validation_qc")] == expected
    local = tmp_path / "run" / "validation_qc"
    for artifact in expected:
        got = Path(client.download_artifacts(trained.run_id, artifact, str(tmp_path / "dl")))
        with Image.open(got) as picture:
            assert picture.format == "PNG"
            with Image.open(local / got.name) as written:
                assert picture.size == written.size  # the picture as drawn
            assert picture.size[0] >= 3 * 220 * 0.5 and picture.size[1] > 220
