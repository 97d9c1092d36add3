"""K-fold cross-validation: one model per fold, the folds' ensemble as the model.

`cross_validate(staging, out_dir, config)` plans the dataset once, then trains fold k of
`config.data.folds` (k = 0 .. K-1) with `loop.train` into `out_dir/fold_<k>`: the cases are
dealt into K folds by `data.split_seed` (`data.split_cases`), fold k validates on its own
held-out fold and trains on the others, as a run of its own (checkpoints, best weights, curves,
QC pictures, its model folder, its result.json). The folds run one after the other.

The cross-validation Dice is each case's out-of-fold Dice (scored by the one fold that did not
train on it, through predict's path) averaged over all the cases: the folds' best validation
Dice weighted by their number of cases, so it is comparable with a mean over the same cases of
another model (the champion gate). The model (`out_dir/model`) holds the K folds' best weights
as one `UNetEnsemble` with the one plan, and predicts with the mean of their softmax.
`out_dir/result.json` records the out-of-fold scores, each fold's, and as its split every
labelled case under both "train" (the ensemble trained on all of them) and "val" (the cases
the score comes from).

A rerun into the same `out_dir` keeps the configuration and plan it started with, takes the
folds that finished (their result.json and verified model folder) as they are, and resumes the
interrupted fold from its checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pipeline.config import PipelineConfig
from pipeline.io.atomic import write_text
from pipeline.io.manifest import read_manifest
from pipeline.io.model_dir import ModelIntegrityError, load_model_dir
from pipeline.planning.plan import Plan, load_plan, plan_dataset, save_plan
from pipeline.training.distributed import process_group
from pipeline.training.loop import CONFIG_FILE, PLAN_FILE, TrainCallback, hook, train
from pipeline.training.result import (
    MODEL_DIR,
    RESULT_FILE,
    TrainResult,
    read_result,
    write_model_dir,
    write_result,
)
from unet_model.ensemble import UNetEnsemble

log = logging.getLogger(__name__)

FOLD_DIR = "fold_{}"  # out_dir/fold_<k>: fold k's own training run


@dataclass(frozen=True)
class Fold:
    """One fold of a cross-validation: where it trains, its config, and its result if done."""

    index: int
    folds: int
    out_dir: Path
    config: PipelineConfig  # the cross-validation's, with data.fold = index
    finished: TrainResult | None  # the result of an earlier run that finished this fold


# run_fold(fold, train_fold) -> the fold's result; train_fold(callbacks) trains it (or returns
# `fold.finished`). A tracker wraps each fold in a run of its own this way.
FoldRunner = Callable[[Fold, Callable[[Sequence[TrainCallback]], TrainResult]], TrainResult]


def check_folds(staging: str | Path, folds: int) -> list[str]:
    """The labelled case IDs of `staging`; ValueError when they cannot make `folds` folds."""
    if folds < 2:
        raise ValueError(f"cross-validation needs at least 2 folds; got folds={folds}")
    ids = sorted(r["case_id"] for r in read_manifest(staging) if r.get("label"))
    if folds > len(ids):
        raise ValueError(
            f"folds={folds} exceeds the {len(ids)} labelled case(s) of {Path(staging)}/manifest.jsonl: "
            f"every fold needs a validation case; use --folds {max(2, len(ids))} or fewer, or stage "
            "more labelled cases"
        )
    return ids


def fold_dir(out_dir: str | Path, index: int) -> Path:
    """The folder of fold `index`'s training run."""
    return Path(out_dir) / FOLD_DIR.format(index)


def finished_fold(out_dir: Path) -> TrainResult | None:
    """The result of a fold run that finished (result.json and a verified model folder), else None."""
    if not (out_dir / RESULT_FILE).is_file():
        return None
    try:
        # The folder as it is now (a run folder may have been moved since it was written).
        result = replace(
            TrainResult.from_json(read_result(out_dir)), out_dir=out_dir, model_dir=out_dir / MODEL_DIR
        )
        load_model_dir(result.model_dir)  # verified now: an ensemble is never made of a damaged fold
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("fold run %s is trained again: its result cannot be used (%s)", out_dir, exc)
        return None
    return result


def cross_validate(
    staging: str | Path,
    out_dir: str | Path,
    config: PipelineConfig,
    *,
    callbacks: Sequence[TrainCallback] = (),
    run_fold: FoldRunner | None = None,
    resume: bool = True,
) -> TrainResult:
    """Train the `config.data.folds` folds on `staging` into `out_dir` and combine them (module doc).

    `callbacks` see the cross-validation as one run (on_train_start with the plan and every
    labelled case as both train and val, on_train_end with the combined result); each fold's
    own training calls `run_fold(fold, train_fold)` (default: `train_fold(())`).
    """
    staging, out_dir = Path(staging), Path(out_dir)
    config = _run_config(out_dir, config, resume)
    case_ids = check_folds(staging, config.data.folds)
    # One process group for all the folds (each fold's `train` uses it as the caller's).
    with process_group(config.train.device) as dctx:
        plan_path = out_dir / PLAN_FILE
        if resume and plan_path.is_file():
            plan = load_plan(plan_path)
        else:
            plan = plan_dataset(staging, config.preprocess)
        if dctx.main:
            out_dir.mkdir(parents=True, exist_ok=True)
            save_plan(plan, plan_path)
            write_text(out_dir / CONFIG_FILE, json.dumps(config.to_dict(), indent=2) + "\n")
            split = {"train": case_ids, "val": case_ids}
            for cb in callbacks:
                hook(cb, "on_train_start")(config=config, plan=plan, split=split)
        results = [
            _run_fold(staging, out_dir, config, plan, index, run_fold, resume)
            for index in range(config.data.folds)
        ]
        result = combine_folds(out_dir, config, plan, results, write_model=dctx.main)
        if dctx.main:
            write_result(result)
            for cb in callbacks:
                hook(cb, "on_train_end")(result)
    log.info(
        "cross-validation of %d folds: out-of-fold mean Dice %.4f (folds: %s)",
        config.data.folds,
        result.best_dice_mean,
        ", ".join(f"{f['best_dice_mean']:.4f}" for f in result.folds),
    )
    return result


def _run_fold(
    staging: Path,
    out_dir: Path,
    config: PipelineConfig,
    plan: Plan,
    index: int,
    run_fold: FoldRunner | None,
    resume: bool,
) -> TrainResult:
    """Fold `index` trained (or resumed, or taken as an earlier run finished it) into its folder."""
    folds = config.data.folds
    where = fold_dir(out_dir, index)
    fold = Fold(
        index=index,
        folds=folds,
        out_dir=where,
        config=config.replace(data={"fold": index}),
        finished=finished_fold(where) if resume else None,
    )
    if fold.finished is not None:
        log.info("fold %d of %d finished in an earlier run (%s): not trained again", index, folds, where)
    else:
        log.info("fold %d of %d: training in %s", index, folds, where)

    def train_fold(fold_callbacks: Sequence[TrainCallback]) -> TrainResult:
        if fold.finished is not None:
            return fold.finished
        return train(staging, fold.out_dir, fold.config, callbacks=fold_callbacks, resume=resume, plan=plan)

    return run_fold(fold, train_fold) if run_fold is not None else train_fold(())


def combine_folds(
    out_dir: Path,
    config: PipelineConfig,
    plan: Plan,
    results: Sequence[TrainResult],
    *,
    write_model: bool = True,
) -> TrainResult:
    """The cross-validation's result: out-of-fold scores and, with `write_model`, the ensemble of
    the folds' best weights as `out_dir/model` (the folds' plans must be one plan)."""
    labels = [n for v, n in sorted(plan.label_names.items()) if v != 0]
    sizes = [len(r.split.get("val", [])) for r in results]
    dice = {n: _case_weighted([r.best_dice.get(n, math.nan) for r in results], sizes) for n in labels}
    hd95 = {n: _case_weighted([r.best_hd95.get(n, math.nan) for r in results], sizes) for n in labels}
    dice_mean = _case_weighted([r.best_dice_mean for r in results], sizes)
    validation = {
        **{f"val_dice/{n}": v for n, v in dice.items()},
        **{f"val_hd95/{n}": v for n, v in hd95.items()},
        "val_dice_mean": dice_mean,
        "val_hd95_mean": _mean(list(hd95.values())),
    }
    model_dir = _write_ensemble(out_dir, config, results, validation) if write_model else None
    reasons = sorted({r.stopped_reason for r in results})
    all_ids = sorted({c for r in results for c in r.split.get("val", [])})
    return TrainResult(
        best_dice=dice,
        best_dice_mean=dice_mean,
        best_hd95=hd95,
        best_epoch=-1,  # each fold has its own (folds[k]["best_epoch"])
        epochs_run=sum(r.epochs_run for r in results),
        stopped_reason=reasons[0] if len(reasons) == 1 else "mixed: " + ", ".join(reasons),
        out_dir=out_dir,
        model_dir=model_dir,
        split={"train": all_ids, "val": all_ids},
        folds=[_fold_summary(k, r) for k, r in enumerate(results)],
    )


def _write_ensemble(
    out_dir: Path, config: PipelineConfig, results: Sequence[TrainResult], validation: dict[str, float]
) -> Path:
    """`out_dir/model`: the folds' verified model folders as one UNetEnsemble with their one plan."""
    loaded = []
    for k, result in enumerate(results):
        if result.model_dir is None:
            raise RuntimeError(f"fold {k} in {result.out_dir} finished without a model folder")
        loaded.append(load_model_dir(result.model_dir))
    for k, item in enumerate(loaded[1:], start=1):
        # As Plans, not raw JSON: a fold saved before a plan field existed reads with its default.
        if Plan.from_dict(item.plan) != Plan.from_dict(loaded[0].plan):
            raise ModelIntegrityError(
                item.path,
                f"fold {k} was trained with another plan than fold 0 ({loaded[0].path / PLAN_FILE}); "
                "the folds of one model must share one plan. Delete the fold folders to train them again",
            )
    ensemble = UNetEnsemble([item.model for item in loaded])
    val_cases = [list(r.split.get("val", [])) for r in results]
    plan = Plan.from_dict(loaded[0].plan)
    return write_model_dir(ensemble, out_dir / MODEL_DIR, plan, config, validation, fold_val_cases=val_cases)


def _fold_summary(index: int, result: TrainResult) -> dict[str, Any]:
    return {
        "fold": index,
        "val": list(result.split.get("val", [])),
        "best_dice_mean": result.best_dice_mean,
        "best_epoch": result.best_epoch,
        "stopped_reason": result.stopped_reason,
        "epochs_run": result.epochs_run,
        "out_dir": str(result.out_dir),
    }


def _case_weighted(values: Sequence[float], sizes: Sequence[int]) -> float:
    """The mean over all cases of per-fold means over their cases (NaN when any is NaN)."""
    total = sum(sizes)
    if not total:
        return math.nan
    return float(sum(v * n for v, n in zip(values, sizes, strict=True)) / total)


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else math.nan


def _run_config(out_dir: Path, config: PipelineConfig, resume: bool) -> PipelineConfig:
    """The cross-validation's config: the one it started with when resuming (as a checkpoint's wins)."""
    path = out_dir / CONFIG_FILE
    if not (resume and path.is_file()):
        return config
    started = PipelineConfig.from_dict(json.loads(path.read_text(encoding="utf-8")), source=f"config {path}")
    if started.data.folds < 2:  # the folder of a single-model run: its config is not this one's
        return config
    if started != config:
        log.info("resuming the cross-validation in %s with the configuration it started with", out_dir)
    return started
