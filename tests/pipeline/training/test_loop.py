import json
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from pipeline.inference.predictor import PredictOptions
from pipeline.io.manifest import read_manifest
from pipeline.planning.network import unet_config
from pipeline.planning.plan import load_plan
from pipeline.training.loop import TrainCallback, train
from pipeline.training.result import plot_training_curves
from pipeline.training.state import LoopState, patience_counts
from pipeline.training.validate import load_val_cases, validate
from tests.pipeline.ingest.staging_fixture import tiny_config
from unet_model import UNet

REPO = Path(__file__).resolve().parents[2]


class Recorder(TrainCallback):
    def __init__(self):
        self.started, self.epochs, self.result = False, [], None

    def on_train_start(self, *, config, plan, split):
        self.started = True

    def on_epoch_end(self, epoch, metrics):
        self.epochs.append((epoch, dict(metrics)))

    def on_train_end(self, result):
        self.result = result


def test_two_epochs_train_validate_checkpoint_and_save(staging, tmp_path):
    rec = Recorder()
    # mirrored in the loop too: the best epoch's loop metrics are then the model's final scores
    result = train(staging, tmp_path / "run", tiny_config(val_mirroring=True), callbacks=[rec])
    assert result.epochs_run == 2 and result.stopped_reason == "completed"
    assert [e for e, _ in rec.epochs] == [0, 1] and rec.started and rec.result is result
    for _, metrics in rec.epochs:  # validated every epoch on whole volumes
        assert {"loss", "lr", "slices_per_s", "val_dice_mean", "val_dice/organ", "val_hd95/lesion"} <= set(
            metrics
        )
        per_label = (metrics["val_dice/organ"], metrics["val_dice/lesion"])
        assert metrics["val_dice_mean"] == pytest.approx(sum(per_label) / 2) and math.isfinite(
            metrics["loss"]
        )
    # the best epoch is the one with the highest validation Dice, and its per-label scores are kept
    scores = {epoch: metrics["val_dice_mean"] for epoch, metrics in rec.epochs}
    assert scores[result.best_epoch] == max(scores.values())
    best_metrics = dict(rec.epochs)[result.best_epoch]
    assert result.best_dice == pytest.approx({k: best_metrics[f"val_dice/{k}"] for k in ("organ", "lesion")})
    assert not set(result.split["train"]) & set(result.split["val"])
    run = tmp_path / "run"
    assert (run / "checkpoints" / "last.pt").is_file() and (run / "checkpoints" / "best.pt").is_file()
    plan = load_plan(run / "plan.json")
    assert plan.num_classes == 3 and (plan.base_channels, plan.batch_size) == (4, 4)  # tiny_config's
    assert set(plan.reasons) == {"patch_size", "context_slices", "base_channels", "batch_size"}
    assert "explicit beats automatic" in plan.reasons["base_channels"]
    assert load_plan(result.model_dir / "plan.json") == plan  # beside the weights
    # deep supervision (on by default): its heads are trained and resumed, never exported
    assert any(k.startswith("aux_heads.") for k in torch.load(run / "checkpoints" / "last.pt")["model"])
    best = torch.load(run / "checkpoints" / "best.pt", weights_only=True)["model"]
    assert not any(k.startswith(("aux_heads.", "unet.")) for k in best)  # the classic U-Net's keys
    assert (run / "training_curves.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((run / "result.json").read_text())["epochs_run"] == 2
    assert result.model_dir is not None and (result.model_dir / "weights.safetensors").is_file()
    # QC pictures of the validation cases (up to train.val_qc_cases), with the best weights.
    assert sorted(p.name for p in (run / "validation_qc").iterdir()) == sorted(
        f"{c}.png" for c in result.split["val"][:4]
    )


def _unet_weights(last: dict) -> dict:
    """The classic U-Net's weights in a last.pt trained under deep supervision."""
    return {k.removeprefix("unet."): v for k, v in last["model"].items() if k.startswith("unet.")}


def test_validation_and_the_model_use_the_weights_average(staging, tmp_path):
    run = tmp_path / "run"
    result = train(staging, run, tiny_config(epochs=1, steps_per_epoch=3, lr=0.05))
    last = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    best = torch.load(run / "checkpoints" / "best.pt", weights_only=True)["model"]
    assert result.best_epoch == 0 and last["average"]["updates"] == 3  # one update per step
    average = last["average"]["model"]
    assert best.keys() == average.keys()
    assert all(torch.equal(best[k], average[k]) for k in best)  # best.pt keeps the average
    trained = _unet_weights(last)
    assert any(not torch.equal(best[k], trained[k]) for k in best if best[k].is_floating_point())
    from safetensors.torch import load_file

    exported = load_file(result.model_dir / "weights.safetensors")
    assert exported.keys() == best.keys() and all(torch.equal(exported[k], best[k]) for k in exported)
    # the recorded validation is the average's, not the last step's weights'
    plan = load_plan(run / "plan.json")
    options = PredictOptions.from_config(tiny_config().infer)
    rows = [r for r in read_manifest(staging, resolve=True) if r["case_id"] in result.split["val"]]
    cases = load_val_cases(rows, plan)
    config = tiny_config()
    net = UNet(unet_config(plan, config.model))
    for weights, expected in ((average, True), (trained, False)):
        net.load_state_dict(weights)
        score = validate(net, cases, plan, device=torch.device("cpu"), options=options)["val_dice_mean"]
        assert (score == pytest.approx(result.best_dice_mean, abs=1e-6)) is expected

    plain = train(staging, tmp_path / "plain", tiny_config(epochs=1, steps_per_epoch=3, ema_decay=None))
    plain_last = torch.load(tmp_path / "plain" / "checkpoints" / "last.pt", weights_only=True)
    assert "average" not in plain_last and plain.best_epoch == 0
    plain_best = torch.load(tmp_path / "plain" / "checkpoints" / "best.pt", weights_only=True)["model"]
    plain_trained = {
        k.removeprefix("unet."): v for k, v in plain_last["model"].items() if k.startswith("unet.")
    }
    assert all(torch.equal(plain_best[k], plain_trained[k]) for k in plain_best)  # the weights themselves


def test_a_run_begun_before_the_average_resumes_without_it(staging, tmp_path):
    out = tmp_path / "run"
    train(staging, out, tiny_config(epochs=1))
    last_path = out / "checkpoints" / "last.pt"
    old = torch.load(last_path, weights_only=True)
    del old["average"]  # as a checkpoint written before train.ema_decay existed
    config = json.loads(old["config"])
    del config["train"]["ema_decay"]
    old["config"] = json.dumps(config)
    torch.save(old, last_path)
    result = train(staging, out, tiny_config(epochs=1))
    assert result.epochs_run == 1
    assert "average" not in torch.load(last_path, weights_only=True)
    assert json.loads((out / "config.json").read_text())["train"]["ema_decay"] is None


def test_training_resumes_after_being_killed(staging, tmp_path):
    out = tmp_path / "run"
    cfg = tiny_config(epochs=4)
    script = tmp_path / "train_slowly.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import time, json
            from pipeline.config import PipelineConfig
            from pipeline.training.loop import TrainCallback, train

            class Slow(TrainCallback):
                def on_epoch_end(self, epoch, metrics):
                    time.sleep(30)  # the test kills us here, after the epoch's checkpoint

            cfg = PipelineConfig.from_dict(json.loads({json.dumps(json.dumps(cfg.to_dict()))}))
            train({str(staging)!r}, {str(out)!r}, cfg, callbacks=[Slow()])
            """
        )
    )
    proc = subprocess.Popen(
        [sys.executable, str(script)], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    last = out / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 120
    try:
        while not last.is_file():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.05)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL

    result = train(staging, out, tiny_config(epochs=99))  # the checkpoint's config wins
    assert result.resumed_from_epoch == 1  # epoch 0 was checkpointed before the kill
    assert result.epochs_run == 4 and result.stopped_reason == "completed"
    assert [h["epoch"] for h in result.history] == [0, 1, 2, 3]
    # the weights' average resumed with the run: one update per step of all four epochs
    assert torch.load(last, weights_only=True)["average"]["updates"] == 4 * cfg.train.steps_per_epoch
    again = train(staging, out, tiny_config())  # a finished run resumes to its result
    assert again.epochs_run == 4 and again.best_dice_mean == result.best_dice_mean


def test_wall_clock_budget_stops_cleanly_keeping_the_best(staging, tmp_path):
    result = train(staging, tmp_path / "run", tiny_config(epochs=50, time_budget_minutes=0.0001))
    assert result.stopped_reason == "time_budget" and result.epochs_run == 1
    assert result.best_epoch == 0 and "val_dice_mean" in result.history[-1]
    assert (tmp_path / "run" / "checkpoints" / "best.pt").is_file()


def test_early_stopping_after_patience_validations(staging, tmp_path):
    cfg = tiny_config(epochs=20, lr=1e-12, warmup_epochs=0, early_stopping_patience=1)
    result = train(staging, tmp_path / "run", cfg)
    # patience counts from the middle of the schedule (train.early_stopping_start 0.5)
    assert result.stopped_reason == "early_stopping" and 10 <= result.epochs_run < 20


def test_no_early_stop_before_the_schedule_has_run_its_start_share(staging, tmp_path):
    cfg = tiny_config(
        epochs=4, lr=1e-12, warmup_epochs=0, early_stopping_patience=1, early_stopping_start=1.0
    )
    result = train(staging, tmp_path / "run", cfg)
    assert result.stopped_reason == "completed" and result.epochs_run == 4


def test_validations_before_the_start_may_reset_patience_but_never_add_to_it():
    state = LoopState()
    for epoch, (mean, counts) in enumerate([(0.5, False), (0.4, False), (0.3, False), (0.45, True)]):
        state.record_validation(epoch, {"val_dice_mean": mean}, patience=2, min_delta=0.0, counts=counts)
    assert (state.stale, state.stopped_reason, state.best_epoch) == (1, "completed", 0)
    state.record_validation(4, {"val_dice_mean": 0.6}, patience=2, counts=False)
    assert (state.stale, state.reference_mean) == (0, 0.6)


@pytest.mark.parametrize(
    ("means", "stale", "best_epoch", "stopped"),
    [
        ([0.50, 0.52, 0.53], 0, 2, "completed"),  # each gain beats min_delta 0.005
        ([0.50, 0.502, 0.504], 2, 2, "early_stopping"),  # creeping gains: kept, but converged
        ([0.50, 0.49, 0.506], 0, 2, "completed"),  # 0.006 over the reference resets patience
    ],
)
def test_patience_counts_gains_below_min_delta_as_stale(means, stale, best_epoch, stopped):
    state = LoopState()
    for epoch, mean in enumerate(means):
        state.record_validation(epoch, {"val_dice_mean": mean}, patience=2, min_delta=0.005)
    assert (state.stale, state.best_epoch, state.stopped_reason) == (stale, best_epoch, stopped)
    assert state.best_mean == max(means)  # the better weights are kept whatever patience says
    assert LoopState.from_checkpoint(state.to_checkpoint()) == state


def test_sgd_poly_kfold_disk_cache_without_deep_supervision(staging, tmp_path):
    cfg = tiny_config(optimizer="sgd", epochs=1, deep_supervision=False).replace(
        data={"folds": 2, "fold": 1, "cache": "disk"}
    )
    result = train(staging, tmp_path / "run", cfg)
    assert result.epochs_run == 1 and len(result.split["val"]) == 2
    assert any((tmp_path / "run" / "cache").iterdir())  # PersistentDataset wrote its cache


def test_single_process_ddp_with_gloo(staging, tmp_path):
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        result = train(staging, tmp_path / "run", tiny_config(epochs=1))
        assert dist.is_initialized()  # the caller's group is left to the caller
    finally:
        dist.destroy_process_group()
    assert result.epochs_run == 1 and (tmp_path / "run" / "checkpoints" / "last.pt").is_file()
    state = torch.load(tmp_path / "run" / "checkpoints" / "best.pt", weights_only=True)["model"]
    assert not any(k.startswith("module.") for k in state)  # saved unwrapped


def test_plot_training_curves(tmp_path):
    history = [{"epoch": 0, "loss": 1.0}, {"epoch": 1, "loss": 0.5, "val_dice_mean": 0.7}]
    path = plot_training_curves(history, tmp_path / "c.png")
    assert path.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("postprocess", [False, True], ids=["raw", "postprocessed"])
def test_validation_dice_equals_evaluate_on_predicts_output(staging, tmp_path, postprocess):
    """The champion gate's score (the best validation Dice) is `evaluate` on what predict writes
    for the validation cases with the saved model: one prediction path. The loop validates without
    test-time mirroring (train.val_mirroring off) and scores the best weights with it at the end."""
    from typer.testing import CliRunner

    from pipeline.cli import app
    from pipeline.inference.batch import BatchSettings, predict
    from pipeline.training.metrics import evaluate_folders

    cfg = tiny_config(epochs=3).replace(infer={"largest_component": postprocess, "fill_holes": postprocess})
    result = train(staging, tmp_path / "run", cfg)
    assert result.best_epoch >= 0 and result.split["val"]
    out = tmp_path / "pred"
    summary = predict(
        staging,
        result.model_dir,
        out,
        BatchSettings(device="cpu", write_qc=False, secret_file=tmp_path / "secret"),
    )
    assert summary.exit_code == 0
    truth = tmp_path / "truth"
    truth.mkdir()
    for case_id in result.split["val"]:
        shutil.copy(staging / "labels" / f"{case_id}.nii.gz", truth / f"{case_id}.nii.gz")
    _, means = evaluate_folders(out, truth)
    assert means["dice_mean"] == pytest.approx(result.best_dice_mean, abs=1e-9)
    for name, dice in result.best_dice.items():
        assert means[f"dice/{name}"] == pytest.approx(dice, abs=1e-9)
    cli = CliRunner().invoke(app, ["evaluate", "--pred", str(out), "--truth", str(truth)])
    assert cli.exit_code == 0, cli.output
    assert f"dice_mean        {result.best_dice_mean:.4f}" in cli.output


@pytest.mark.parametrize(
    ("epoch", "start", "expected"),
    [(0, 0.0, True), (3, 0.5, False), (4, 0.5, True), (8, 0.5, True), (9, 0.5, False), (9, 0.0, False)],
)
def test_patience_counts_from_its_start_share_until_before_the_last_epoch(epoch, start, expected):
    assert patience_counts(epoch, 10, start) is expected
