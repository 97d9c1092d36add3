"""From a staging folder to a registered, gated model: train, log, register, champion gate.

The CLI's `train` command and the Prefect train flow both go through these steps, so a model
trained either way is logged, registered and gated the same way:

    trained = train_and_log(staging, out, config)              # local model first, then MLflow
    version = register_model(trained.model_uri, name)
    champion = gate(name, version, trained, staging, config)    # on the fixed validation cases

With `data.folds` K > 1, `train_and_log` cross-validates (`training.folds.cross_validate`): the
parent MLflow run holds the config, the plan, the out-of-fold scores (`cv_*`) and the ensemble
model; each fold is a run nested under it (`fold-<k>`) with its own epochs, curves and QC
pictures. The gate scores an ensemble out of fold on the cases its folds trained on.

The one module of `pipeline.tracking` above the training stage (it calls `train` and scores the
champion with training's validation); the package's `__init__` does not import it, so that
loading a registered model never imports the training loop.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from pipeline import tracking
from pipeline.config import PipelineConfig, Workdir
from pipeline.inference.predictor import PredictOptions
from pipeline.io.manifest import read_manifest
from pipeline.io.model_dir import LoadedModel
from pipeline.planning.plan import Plan, load_plan
from pipeline.runtime import prepare_model, resolve_device
from pipeline.tracking.store import MLFLOW_PARENT_RUN_ID, TAG_FOLD, TAG_FOLD_RESUMED, TAG_FOLDS
from pipeline.training.folds import Fold, check_folds, cross_validate
from pipeline.training.loop import PLAN_FILE, train
from pipeline.training.result import CURVES_FILE, VAL_QC_DIR, TrainResult, read_result
from pipeline.training.validate import load_val_cases, validate
from unet_model.ensemble import UNetEnsemble

log = logging.getLogger(__name__)


@dataclass
class TrainedModel:
    """A finished training run: the local model always, the MLflow run and model when tracking worked."""

    result: TrainResult
    model_dir: Path
    run_id: str | None
    model_uri: str | None  # None when tracking failed (the local model still stands)
    tracking_error: str | None
    run_url: str | None = None  # the run's page on an http(s) tracking server

    def summary(self) -> dict[str, Any]:
        """What the CLI prints and the flow returns; `val_dice` is out-of-fold for a cross-validation."""
        summary = {
            "run_id": self.run_id,
            "run_url": self.run_url,
            "model_uri": self.model_uri,
            "model_dir": str(self.model_dir),
            "val_dice": {**self.result.best_dice, "mean": self.result.best_dice_mean},
            "stopped_reason": self.result.stopped_reason,
            "tracking_error": self.tracking_error,
        }
        if self.result.folds:
            summary["folds"] = [
                {
                    "fold": f["fold"],
                    "val_dice_mean": f["best_dice_mean"],
                    "val_cases": len(f["val"]),
                    "stopped_reason": f["stopped_reason"],
                }
                for f in self.result.folds
            ]
        return summary


class _LogConfig:
    """Training callback: log the resolved config, the plan and the staged dataset with its split
    once training has made them."""

    def __init__(self, tracker: tracking.Tracker, staging: Path) -> None:
        self.tracker = tracker
        self.staging = staging

    def on_train_start(self, *, config, plan, split) -> None:
        self.tracker.log_config(config.to_dict(), plan.to_dict())
        self.tracker.log_dataset(self.staging, split)


def _log_outputs(tracker: tracking.Tracker, run_dir: Path) -> None:
    """The training curves and validation QC pictures a training run left in `run_dir`."""
    curves = run_dir / CURVES_FILE
    if curves.is_file():
        tracker.log_artifact(curves)
    # Written by that run (the folder is emptied first): the best weights' pictures.
    tracker.log_artifacts(sorted((run_dir / VAL_QC_DIR).glob("*.png")), artifact_path=VAL_QC_DIR)


class _FoldRuns:
    """Cross-validation's `run_fold`: each fold an MLflow run nested under the parent run."""

    def __init__(self, parent: tracking.Tracker, staging: Path, tags: dict[str, str] | None) -> None:
        self.parent = parent
        self.staging = staging
        self.tags = dict(tags or {})

    def __call__(self, fold: Fold, train_fold) -> TrainResult:
        if not self.parent.active:  # tracking failed: the folds still train
            return train_fold(())
        with tracking.Tracker(
            experiment=self.parent.experiment,
            run_name=f"fold-{fold.index}",
            tracking_uri=self.parent.tracking_uri,
            dataset_sha256=tracking.dataset_sha256(self.staging / "manifest.jsonl"),
            tags={**self.tags, MLFLOW_PARENT_RUN_ID: str(self.parent.run_id), TAG_FOLD: str(fold.index)},
        ) as child:
            log_config = _LogConfig(child, self.staging)
            if fold.finished is None:
                result = train_fold([log_config, child])
            else:  # trained by an earlier run: its record, not its training again
                result = fold.finished
                plan = load_plan(result.out_dir / PLAN_FILE)
                log_config.on_train_start(config=fold.config, plan=plan, split=result.split)
                for metrics in result.history:
                    child.on_epoch_end(int(metrics["epoch"]), metrics)
                child.set_tags({TAG_FOLD_RESUMED: "finished in an earlier run"})
            _log_outputs(child, result.out_dir)
        return result


def _cv_metrics(result: TrainResult) -> dict[str, float]:
    """The parent run's metrics: the out-of-fold scores (cv_*), finite ones only."""
    metrics = {"cv_dice_mean": result.best_dice_mean}
    metrics.update({f"cv_dice/{k}": v for k, v in result.best_dice.items()})
    metrics.update({f"cv_hd95/{k}": v for k, v in result.best_hd95.items()})
    return {k: float(v) for k, v in metrics.items() if math.isfinite(float(v))}


def train_and_log(
    staging: str | Path,
    out: str | Path,
    config: PipelineConfig,
    *,
    tracking_uri: str | None = None,
    run_tags: dict[str, str] | None = None,
) -> TrainedModel:
    """Train on `staging` into `out` while logging to MLflow; the model is written locally first.

    `run_tags` are added to the run (an orchestrator's run ID and link, for example). The run
    samples system metrics, records the staged dataset as its input and keeps the validation QC
    pictures under `validation_qc/<case_id>.png`. Tracking failures never
    lose the model: they are returned in `tracking_error`. With `config.data.folds` > 1 it
    cross-validates: one nested run per fold, the ensemble model on the parent run.
    """
    staging, out = Path(staging), Path(out)
    folds = config.data.folds
    if folds > 1:
        check_folds(staging, folds)  # before a run is opened: the error, not a FAILED run
    uri = tracking_uri or Workdir.resolve().mlflow_tracking_uri()
    with tracking.Tracker(
        experiment=config.tracking.experiment_name,
        tracking_uri=uri,
        dataset_sha256=tracking.dataset_sha256(staging / "manifest.jsonl"),
        tags={**(run_tags or {}), TAG_FOLDS: str(folds)} if folds > 1 else run_tags,
        system_metrics=True,
    ) as tracker:
        if folds > 1:
            result = cross_validate(
                staging,
                out,
                config,
                callbacks=[_LogConfig(tracker, staging)],
                run_fold=_FoldRuns(tracker, staging, run_tags),
            )
            tracker.log_metrics(_cv_metrics(result))
            for fold in result.folds:  # one chart over the folds
                tracker.log_metrics({"fold_val_dice_mean": fold["best_dice_mean"]}, step=fold["fold"])
        else:
            result = train(staging, out, config, callbacks=[_LogConfig(tracker, staging), tracker])
            _log_outputs(tracker, out)
        if result.model_dir is None:
            raise RuntimeError(f"training in {out} finished without a model folder")
        val_dice = {**result.best_dice, "mean": result.best_dice_mean}
        model_uri = tracker.log_model(result.model_dir, val_dice=val_dice)
    return TrainedModel(
        result, Path(result.model_dir), tracker.run_id, model_uri, tracker.tracking_error, tracker.run_url()
    )


def register_model(
    model_uri: str, name: str, *, tracking_uri: str | None = None, tags: dict[str, str] | None = None
) -> int:
    """Register a logged model as a new version of `name` (with `tags` besides the model's facts)."""
    uri = tracking_uri or Workdir.resolve().mlflow_tracking_uri()
    return tracking.register(model_uri, name, tracking_uri=uri, tags=tags)


def validation_rows(staging: str | Path, case_ids: list[str]) -> list[dict[str, Any]]:
    by_id = {row["case_id"]: row for row in read_manifest(staging, resolve=True)}
    missing = sorted(set(case_ids) - set(by_id))
    if missing:
        raise ValueError(f"validation cases {missing[:3]} are not in {staging}/manifest.jsonl")
    return [by_id[c] for c in case_ids]


def validation_sha256(staging: str | Path, case_ids: list[str]) -> str:
    """Identifies a validation set by its cases' label bytes (so scores are comparable)."""
    digest = hashlib.sha256()
    for row in sorted(validation_rows(staging, case_ids), key=lambda r: r["case_id"]):
        digest.update(row["case_id"].encode() + b"\0" + Path(row["label"]).read_bytes())
    return digest.hexdigest()


def out_of_fold_groups(loaded: LoadedModel, case_ids: list[str]) -> list[tuple[nn.Module, list[str]]]:
    """(network, cases) pairs that score `case_ids` without a network scoring a case it trained on.

    A fold ensemble that records its folds' validation cases scores each of those cases with
    the one fold that held it out (its out-of-fold prediction, as its cross-validation Dice was
    computed) and every other case with the whole ensemble; any other model scores all cases.
    """
    fold_val = loaded.metadata.get("fold_val_cases")
    model = loaded.model
    if not isinstance(model, UNetEnsemble) or not fold_val:
        return [(model, list(case_ids))]
    held_out_by = {c: k for k, cases in enumerate(fold_val) for c in cases}
    groups: dict[int, list[str]] = {}
    for case_id in case_ids:
        groups.setdefault(held_out_by.get(case_id, -1), []).append(case_id)
    return [(model if k < 0 else model.members[k], ids) for k, ids in sorted(groups.items())]


def evaluate_on_cases(
    loaded: LoadedModel, staging: str | Path, case_ids: list[str], config: PipelineConfig
) -> float:
    """Mean validation Dice of a loaded model on whole cases, with its own plan (the gate's metric).

    Predicted through predict's path; a fold ensemble scores the cases its folds trained on
    out of fold (`out_of_fold_groups`), so no network is scored on its own training cases.
    """
    plan = Plan.from_dict(loaded.plan)
    device = resolve_device(config.train.device)
    options = PredictOptions.from_config(config.infer)
    total, count = 0.0, 0
    for net, ids in out_of_fold_groups(loaded, case_ids):
        cases = load_val_cases(validation_rows(staging, ids), plan)
        metrics = validate(
            prepare_model(net, device, channels_last=True),  # as predict loads it
            cases,
            plan,
            device=device,
            options=options,
        )
        total += float(metrics["val_dice_mean"]) * len(ids)  # a mean over cases: weighted by cases
        count += len(ids)
    return total / count


def gate(
    name: str,
    version: int,
    trained: TrainedModel,
    staging: str | Path,
    config: PipelineConfig,
    *,
    tracking_uri: str | None = None,
) -> bool:
    """Champion/challenger gate on the run's fixed validation cases; True when it became champion."""
    return gate_run(name, version, trained.result.out_dir, staging, config, tracking_uri=tracking_uri)


def gate_run(
    name: str,
    version: int,
    run_dir: str | Path,
    staging: str | Path,
    config: PipelineConfig,
    *,
    tracking_uri: str | None = None,
) -> bool:
    """The gate for a finished training folder (its result.json holds the split and the score).

    The new version's score is its best validation Dice (for a cross-validation, the out-of-fold
    Dice over every case of its folds); the champion is re-scored on the same validation cases,
    through predict's path (an ensemble out of fold where it trained on them), when its own score
    came from other cases.
    """
    uri = tracking_uri or Workdir.resolve().mlflow_tracking_uri()
    result = read_result(run_dir)
    val_ids = list(result.get("split", {}).get("val", []))
    if not val_ids:
        raise ValueError(f"the training run in {run_dir} has no validation cases: nothing to gate on")
    return tracking.promote(
        name,
        version,
        float(result["best_dice_mean"]),
        margin=config.tracking.champion_margin,
        val_cases_sha256=validation_sha256(staging, val_ids),
        evaluate_fn=lambda champion: evaluate_on_cases(champion, staging, val_ids, config),
        tracking_uri=uri,
    )


def summary_markdown(
    summary: dict[str, Any], name: str, version: int | None, champion: bool, tracking_uri: str
) -> str:
    """Markdown of a release (`TrainedModel.summary()`, the version, the gate's decision): the
    validation Dice, the MLflow run and model version, champion or challenger, why training stopped."""
    dice = summary["val_dice"]
    per_label = ", ".join(f"{k} {v:.3f}" for k, v in dice.items() if k != "mean")
    folds = summary.get("folds")
    what = f"{len(folds)}-fold cross-validation: out-of-fold mean Dice" if folds else "Mean validation Dice"
    return (
        f"# Training\n\n{what} **{dice['mean']:.3f}** ({per_label}).\n\n"
        f"{_mlflow_links(summary, name, version, tracking_uri)}: "
        f"{'champion' if champion else 'challenger'}.\n\nStopped: {summary['stopped_reason']}."
    )


def _mlflow_links(summary: dict[str, Any], name: str, version: int | None, tracking_uri: str) -> str:
    """Markdown naming the MLflow run and model version, as links when the store has a web UI."""
    run_id = summary["run_id"]
    run = (
        f"[MLflow run `{run_id}`]({summary['run_url']})"
        if summary.get("run_url")
        else f"MLflow run `{run_id}`"
    )
    page = tracking.model_version_page_url(tracking_uri, name, version)
    model = f"model **{name}** version **{version}**"
    if page:
        return f"{run}; [{model}]({page})"
    # A local store has no pages until `mlflow ui` serves it: say how to open it.
    return f"{run}; {model} (`models:/{name}/{version}`; open with `{tracking.mlflow_ui_command()}`)"
