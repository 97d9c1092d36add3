"""The training loop: 2D slices of staged volumes -> a U-Net, validated on whole volumes.

`train(staging, out_dir, config)` plans the dataset (or reloads the plan of a run it resumes),
splits cases, trains with Dice + cross-entropy (over the decoder's levels under deep supervision,
whose auxiliary heads never leave the loop), validates every `val_every` epochs on whole
validation volumes through predict's own path (`validate.validate`) with the moving average of
the weights (`training.ema`, under train.ema_decay), keeps the best weights by mean validation
Dice, stops early or at the wall-clock budget, checkpoints every epoch and
resumes from the last checkpoint after a crash. It ends by writing the model folder
(`pipeline.io.model_dir.save_model_dir`) and the QC pictures of the first `val_qc_cases` validation
cases (`validation_qc/`), and returns a `TrainResult`.

What carries from epoch to epoch is a `LoopState` (`state`); what a run builds once (network, optimizer,
schedule, device) is a `_Run`; an epoch is `run_epoch`: `train_epoch`, then `validate_epoch` on
validation epochs, then the checkpoint. Per-epoch metrics go to `TrainCallback.on_epoch_end`, so
tracking (MLflow) stays out of here.

Multi-GPU (`distributed`): every rank gets a DistributedSampler shard and the model is wrapped in
DDP; only rank 0 writes checkpoints, the model folder and the progress bar. Every rank validates
(the sets are small) so all ranks take the same stopping decisions without extra communication.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from monai.losses import DiceCELoss
from torch import nn
from tqdm.auto import tqdm

from pipeline.config import PipelineConfig, TrainConfig
from pipeline.inference.predictor import PredictOptions
from pipeline.io.atomic import write_text
from pipeline.io.manifest import read_manifest
from pipeline.planning.network import plan_network, unet_config
from pipeline.planning.plan import Plan, load_plan, plan_dataset, save_plan
from pipeline.runtime import (
    autocast,
    configure_threads,
    prepare_model,
    resolve_device,
    resolve_precision,
    to_input,
    training_channels_last,
)
from pipeline.training.augment import train_transforms
from pipeline.training.checkpoint import (
    BEST,
    CHECKPOINT_DIR,
    LAST,
    Checkpoint,
    load_best,
    load_checkpoint,
    rng_state,
    save_best,
    save_checkpoint,
    set_rng_state,
)
from pipeline.training.data import (
    infinite_batches,
    loader_workers,
    make_loader,
    make_train_dataset,
    split_cases,
)
from pipeline.training.distributed import DistContext, process_group
from pipeline.training.ema import WeightAverage
from pipeline.training.result import (
    CURVES_FILE,
    MODEL_DIR,
    VAL_QC_DIR,
    TrainResult,
    plot_training_curves,
    write_model_dir,
    write_result,
)
from pipeline.training.schedule import Budget, lr_lambda, seed_everything
from pipeline.training.state import LoopState, patience_counts
from pipeline.training.validate import ValCase, load_val_cases, validate, write_validation_qc
from unet_model import UNet
from unet_model.deep_supervision import DeepSupervision, DeepSupervisionLoss

log = logging.getLogger(__name__)

PLAN_FILE = "plan.json"
CONFIG_FILE = "config.json"
SPLIT_FILE = "split.json"


class TrainCallback:
    """Hooks the loop calls on rank 0; subclass and override what you need (all no-ops here).

    Duck typing is enough: an object with only some of these methods (e.g. an
    `on_epoch_end(epoch, metrics)` of a tracker) gets just those called.
    """

    def on_train_start(self, *, config: PipelineConfig, plan: Plan, split: dict[str, list[str]]) -> None:
        """Before the first step (also after a resume)."""

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        """After each epoch; `metrics` holds loss, lr, slices_per_s, epoch_time_s and, on
        validation epochs, val_dice_mean, val_dice/<label>, val_hd95/<label>, val_hd95_mean."""

    def on_train_end(self, result: TrainResult) -> None:
        """After the model folder is written."""


# --------------------------------------------------------------------------------------------
# Helpers


def hook(callback: Any, name: str):
    """The callback's method `name`, or a no-op: any object with some of the hooks will do."""
    return getattr(callback, name, None) or (lambda *args, **kwargs: None)


# --------------------------------------------------------------------------------------------
# What a run builds once


@dataclass
class _Run:
    """What one training run builds once and every epoch uses."""

    config: PipelineConfig
    plan: Plan
    split: dict[str, list[str]]
    dist: DistContext
    device: torch.device
    amp_dtype: torch.dtype | None
    channels_last: bool
    net: nn.Module  # the network trained, with its auxiliary heads under deep supervision: what last.pt holds
    model: nn.Module  # `net` compiled and/or wrapped in DDP: what the training steps call
    loss_fn: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    budget: Budget
    ckpt_dir: Path
    average: WeightAverage | None  # of `unet`'s weights, under train.ema_decay

    @property
    def unet(self) -> nn.Module:
        """The classic network inside `net`: what the model folder holds (the best weights, at the end)."""
        return self.net.unet if isinstance(self.net, DeepSupervision) else self.net

    @property
    def scored(self) -> nn.Module:
        """What validation scores and best.pt keeps: the weights' moving average, else `unet` itself."""
        return self.average.model if self.average is not None else self.unet

    def checkpoint(self, state: LoopState) -> Checkpoint:
        return Checkpoint(
            model=self.net.state_dict(),
            optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(),
            rng=rng_state(),
            config=self.config.to_dict(),
            plan=self.plan.to_dict(),
            split=self.split,
            loop=state.to_checkpoint(),
            average=self.average.state_dict() if self.average is not None else None,
        )


def _plan_and_split(
    staging: Path,
    out_dir: Path,
    config: PipelineConfig,
    device: torch.device,
    checkpoint: Checkpoint | None,
    resume: bool,
    given_plan: Plan | None = None,
) -> tuple[Plan, dict[str, list[str]], dict[str, dict[str, Any]]]:
    """The run's plan (its network decisions for `device`) and split, computed once and reused as
    is on resume, and its labelled manifest rows by case ID. `given_plan` (one plan for all the
    folds of a cross-validation) replaces planning, never a checkpoint's plan."""
    rows = [r for r in read_manifest(staging, resolve=True) if r.get("label")]
    by_id = {r["case_id"]: r for r in rows}
    if checkpoint is not None:
        plan = Plan.from_dict(checkpoint.plan)
        split = checkpoint.split
    else:
        plan_path = out_dir / PLAN_FILE
        if given_plan is not None:
            plan = given_plan
        elif resume and plan_path.is_file():
            plan = load_plan(plan_path)
        else:
            plan = plan_dataset(staging, config.preprocess)
        dc = config.data
        train_ids, val_ids = split_cases(
            list(by_id), val_fraction=dc.val_fraction, folds=dc.folds, fold=dc.fold, seed=dc.split_seed
        )
        split = {"train": train_ids, "val": val_ids}
    if plan.base_channels is None or plan.batch_size is None:  # a plan from before they were planned
        plan = plan_network(plan, config, device)
    missing = sorted(set(split["train"] + split["val"]) - set(by_id))
    if missing:
        raise ValueError(f"{staging}/manifest.jsonl no longer lists labelled case(s) {', '.join(missing)}")
    return plan, split, by_id


def training_loss(
    tc: TrainConfig, plan: Plan, level_weights: Sequence[float], device: torch.device
) -> DeepSupervisionLoss:
    """Dice + cross-entropy on the softmax, over the decoder levels' `level_weights` (one level
    without deep supervision). The Dice term per `train.batch_dice` (over the batch's slices
    together, nnU-Net's choice for 2D, or per slice) and `train.dice_background`; the CE term
    weighted by the plan's class weights with `train.class_weighted_ce`."""
    weight = (
        torch.tensor(plan.class_weights, dtype=torch.float32, device=device) if tc.class_weighted_ce else None
    )
    dice_ce = DiceCELoss(
        to_onehot_y=True,
        softmax=True,
        weight=weight,
        batch=tc.batch_dice,
        include_background=tc.dice_background,
    )
    return DeepSupervisionLoss(dice_ce, level_weights)


def _build_run(
    config: PipelineConfig,
    plan: Plan,
    split: dict[str, list[str]],
    dctx: DistContext,
    device: torch.device,
    ckpt_dir: Path,
    checkpoint: Checkpoint | None,
) -> _Run:
    """Network, loss, optimizer and schedule, restored from `checkpoint` when resuming."""
    tc, mc = config.train, config.model
    net = UNet(unet_config(plan, mc))
    if tc.deep_supervision:
        net = DeepSupervision(net)
    channels_last = training_channels_last(tc.channels_last, device)
    net = prepare_model(net, device, channels_last)
    loss_fn = training_loss(tc, plan, net.weights if isinstance(net, DeepSupervision) else [1.0], device)
    if tc.optimizer == "adamw":
        optimizer: torch.optim.Optimizer = torch.optim.AdamW(
            net.parameters(), lr=tc.lr, weight_decay=tc.weight_decay
        )
    else:
        optimizer = torch.optim.SGD(
            net.parameters(), lr=tc.lr, momentum=tc.momentum, nesterov=True, weight_decay=tc.weight_decay
        )
    total_steps = tc.epochs * tc.steps_per_epoch
    budget = Budget(time.monotonic(), tc.time_budget_minutes * 60 if tc.time_budget_minutes else None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lr_lambda(tc.optimizer, tc.warmup_epochs * tc.steps_per_epoch, total_steps, budget),
    )
    if checkpoint is not None:
        net.load_state_dict(checkpoint.model)
        optimizer.load_state_dict(checkpoint.optimizer)
        scheduler.load_state_dict(checkpoint.scheduler)
        set_rng_state(checkpoint.rng)

    model: nn.Module = net
    if tc.compile:
        model = torch.compile(model)  # type: ignore[assignment]
    if dctx.enabled:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    # After DDP's wrap, which gives every rank rank 0's weights: the ranks' averages start equal.
    unet = net.unet if isinstance(net, DeepSupervision) else net
    average = WeightAverage(unet, tc.ema_decay) if tc.ema_decay else None
    if average is not None and checkpoint is not None and checkpoint.average is not None:
        average.load_state_dict(checkpoint.average)
    return _Run(
        config=config,
        plan=plan,
        split=split,
        dist=dctx,
        device=device,
        amp_dtype=resolve_precision(tc.precision, device),
        channels_last=channels_last,
        net=net,
        model=model,
        loss_fn=loss_fn,
        optimizer=optimizer,
        scheduler=scheduler,
        budget=budget,
        ckpt_dir=ckpt_dir,
        average=average,
    )


def _train_batches(
    run: _Run, by_id: dict[str, dict[str, Any]], out_dir: Path, start_epoch: int
) -> Iterator[dict[str, Any]]:
    """The training cases as endless batches of augmented slices (cached volumes, loader workers)."""
    config, tc = run.config, run.config.train
    train_items = [
        {"image": by_id[c]["image"], "label": by_id[c]["label"], "modality": by_id[c]["modality"]}
        for c in run.split["train"]
    ]
    transform = train_transforms(run.plan, config.preprocess, tc.slices_per_volume)
    transform.set_random_state(seed=(tc.seed * 1009 + start_epoch * 7919 + run.dist.rank) % 2**32)
    cache_dir = config.data.cache_dir or (out_dir / "cache")
    dataset = make_train_dataset(train_items, transform, cache=config.data.cache, cache_dir=cache_dir)
    loader, sampler = make_loader(
        dataset,
        volumes_per_batch=run.plan.batch_size // tc.slices_per_volume,
        seed=tc.seed,
        buffer_size=config.data.loader_buffer,
        distributed=run.dist.enabled,
        workers=loader_workers(config.data.loader_workers, run.device.type),
    )
    return infinite_batches(loader, sampler, start=start_epoch)


# --------------------------------------------------------------------------------------------
# Epochs


def train_step(run: _Run, batch: dict[str, Any]) -> tuple[float, int]:
    """One optimizer step on `batch`: (its loss, its number of slices)."""
    x = to_input(torch.as_tensor(batch["image"]).float(), run.device, run.channels_last)
    y = torch.as_tensor(batch["label"]).to(run.device, non_blocking=True)
    with autocast(run.device, run.amp_dtype):
        outputs = run.model(x)  # logits; under deep supervision a list, one per supervised level
    loss = run.loss_fn(outputs, y)
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if run.config.train.grad_clip:
        nn.utils.clip_grad_norm_(run.model.parameters(), run.config.train.grad_clip)
    run.optimizer.step()
    run.scheduler.step()
    if run.average is not None:
        run.average.update(run.unet)
    return float(loss.detach()), x.shape[0]


def train_epoch(run: _Run, batches: Iterator, epoch: int, bar: tqdm) -> tuple[dict[str, float], bool]:
    """`steps_per_epoch` steps, fewer when the budget runs out: (the epoch's metrics, whether the
    budget ran out on any rank)."""
    run.model.train()
    t_epoch = time.perf_counter()
    loss_sum, n_slices, steps = 0.0, 0, 0
    over_budget = False
    for _ in range(run.config.train.steps_per_epoch):
        loss, n = train_step(run, next(batches))
        loss_sum += loss
        n_slices += n
        steps += 1
        bar.set_postfix(loss=f"{loss_sum / steps:.3f}", refresh=False)
        over_budget = run.dist.any_rank(run.budget.spent(), run.device)
        if over_budget:
            break
    elapsed = time.perf_counter() - t_epoch
    metrics: dict[str, float] = {
        "epoch": epoch,
        "loss": loss_sum / max(steps, 1),
        "lr": run.optimizer.param_groups[0]["lr"],
        "slices_per_s": n_slices * run.dist.world_size / max(elapsed, 1e-9),
        "epoch_time_s": elapsed,
    }
    return metrics, over_budget


def validate_epoch(
    run: _Run, state: LoopState, epoch: int, cases: Sequence[ValCase], options: PredictOptions
) -> dict[str, float]:
    """Validate, record the result in `state` and keep the best weights (best.pt, rank 0)."""
    val = validate(run.scored, cases, run.plan, device=run.device, options=options)
    tc = run.config.train
    best = state.record_validation(
        epoch,
        val,
        tc.early_stopping_patience,
        tc.early_stopping_min_delta,
        counts=patience_counts(epoch, tc.epochs, tc.early_stopping_start),
    )
    if best and run.dist.main:
        save_best(run.ckpt_dir / BEST, run.scored.state_dict(), epoch)
    return val


def loop_val_options(config: PipelineConfig) -> PredictOptions:
    """How the loop's validations predict: as predict does, without mirroring unless val_mirroring."""
    options = PredictOptions.from_config(config.infer)  # what predict with this model does
    return options if config.train.val_mirroring else replace(options, mirror_axes=())


def final_validation(run: _Run, state: LoopState, cases: Sequence[ValCase], options: PredictOptions) -> None:
    """Score the best weights (loaded) with predict's `options`; that score becomes the best metrics."""
    val = validate(run.unet, cases, run.plan, device=run.device, options=options)
    log.info(
        "best weights (epoch %d) scored as predict runs them: mean val Dice %.4f (%.4f in the loop)",
        state.best_epoch,
        val["val_dice_mean"],
        state.best_metrics.get("val_dice_mean", math.nan),
    )
    state.best_metrics = val


def run_epoch(
    run: _Run,
    state: LoopState,
    epoch: int,
    batches: Iterator,
    val_cases: Sequence[ValCase],
    val_options: PredictOptions,
    callbacks: Sequence[TrainCallback],
    bar: tqdm,
) -> bool:
    """Train, validate when due, checkpoint and report one epoch; True when the run is done."""
    tc = run.config.train
    metrics, over_budget = train_epoch(run, batches, epoch, bar)
    if over_budget:
        state.stopped_reason = "time_budget"
    last_epoch = epoch + 1 >= tc.epochs
    if (epoch + 1) % tc.val_every == 0 or last_epoch or over_budget:
        metrics.update(validate_epoch(run, state, epoch, val_cases, val_options))
    state.epoch = epoch
    state.history.append(metrics)
    log.info(
        "epoch %d: loss %.4f, %.0f slices/s%s",
        epoch,
        metrics["loss"],
        metrics["slices_per_s"],
        f", val Dice {metrics['val_dice_mean']:.4f}" if "val_dice_mean" in metrics else "",
    )
    if run.dist.main:
        save_checkpoint(run.ckpt_dir / LAST, run.checkpoint(state))
        for cb in callbacks:
            hook(cb, "on_epoch_end")(epoch, metrics)
    postfix = {"loss": f"{metrics['loss']:.3f}", "slices/s": f"{metrics['slices_per_s']:.0f}"}
    if state.best_epoch >= 0:
        postfix["val_dice"] = f"{state.best_metrics['val_dice_mean']:.3f}"
    bar.set_postfix(postfix, refresh=False)
    bar.update(1)
    return state.stopped_reason != "completed" or last_epoch


# --------------------------------------------------------------------------------------------
# The run


def train(
    staging: str | Path,
    out_dir: str | Path,
    config: PipelineConfig | None = None,
    *,
    callbacks: Sequence[TrainCallback] = (),
    resume: bool = True,
    plan: Plan | None = None,
) -> TrainResult:
    """Train on the labelled cases of `staging`; checkpoints, plan and model go to `out_dir`.

    With `resume` and a checkpoint in `out_dir/checkpoints/last.pt`, the run continues from it with
    the plan, split and config it started with (the checkpoint's config wins over `config`).
    `plan`: the dataset plan to train with instead of planning (cross-validation plans once for
    all its folds); with config.data.folds > 1 this trains fold config.data.fold only
    (`training.folds.cross_validate` trains them all).
    """
    config = config or PipelineConfig()
    staging, out_dir = Path(staging), Path(out_dir)
    last_path = out_dir / CHECKPOINT_DIR / LAST
    checkpoint = None
    if resume and last_path.is_file():
        checkpoint = load_checkpoint(last_path)
        config = PipelineConfig.from_dict(checkpoint.config, source=f"checkpoint {last_path}")
        if "ema_decay" not in checkpoint.config.get("train", {}):
            # begun before the weights' average existed: it ends as it began, with the last weights
            config = config.replace(train={"ema_decay": None})
        log.info("resuming from %s after epoch %d", last_path, checkpoint.epoch)
    with process_group(config.train.device) as dctx:
        return _train(staging, out_dir, config, checkpoint, dctx, callbacks, resume, plan)


def _train(
    staging: Path,
    out_dir: Path,
    config: PipelineConfig,
    checkpoint: Checkpoint | None,
    dctx: DistContext,
    callbacks: Sequence[TrainCallback],
    resume: bool,
    given_plan: Plan | None = None,
) -> TrainResult:
    """`train` inside its process group."""
    tc = config.train
    configure_threads()
    device = resolve_device(tc.device)
    if dctx.enabled and device.type == "cuda":
        device = torch.device("cuda", dctx.local_rank)  # one GPU per rank
    seed_everything(tc.seed + dctx.rank, tc.deterministic)

    plan, split, by_id = _plan_and_split(staging, out_dir, config, device, checkpoint, resume, given_plan)
    if dctx.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_plan(plan, out_dir / PLAN_FILE)
        write_text(out_dir / CONFIG_FILE, json.dumps(config.to_dict(), indent=2) + "\n")
        write_text(out_dir / SPLIT_FILE, json.dumps(split, indent=2) + "\n")

    run = _build_run(config, plan, split, dctx, device, out_dir / CHECKPOINT_DIR, checkpoint)
    state = LoopState.from_checkpoint(checkpoint.loop) if checkpoint is not None else LoopState()
    start_epoch = state.epoch + 1
    if dctx.main:
        for cb in callbacks:
            hook(cb, "on_train_start")(config=config, plan=plan, split=split)

    epochs_left = not state.finished(tc.epochs)
    val_cases: Sequence[ValCase] = ()
    val_options = loop_val_options(config)
    predict_options = PredictOptions.from_config(config.infer)  # what predict with this model does
    if epochs_left:
        batches = _train_batches(run, by_id, out_dir, start_epoch)
        val_cases = load_val_cases([by_id[c] for c in split["val"]], plan)
    quiet = not dctx.main or not sys.stderr.isatty()
    with tqdm(total=tc.epochs, initial=start_epoch, desc="train", unit="epoch", disable=quiet) as bar:
        for epoch in range(start_epoch, tc.epochs if epochs_left else start_epoch):
            if run_epoch(run, state, epoch, batches, val_cases, val_options, callbacks, bar):
                break

    # The best weights (by mean val Dice) become the model; the last ones (their average under
    # train.ema_decay) if none validated.
    if state.best_epoch >= 0 and (run.ckpt_dir / BEST).is_file():
        run.unet.load_state_dict(load_best(run.ckpt_dir / BEST))
        if val_options != predict_options:  # also when resuming a finished run
            cases = val_cases or load_val_cases([by_id[c] for c in split["val"]], plan)
            final_validation(run, state, cases, predict_options)
    elif run.average is not None:
        run.unet.load_state_dict(run.average.model.state_dict())
    model_dir = None
    if dctx.main:
        if state.history:
            plot_training_curves(state.history, out_dir / CURVES_FILE)
        model_dir = write_model_dir(run.unet, out_dir / MODEL_DIR, plan, config, state.best_metrics)
        qc_rows = [by_id[c] for c in split["val"][: tc.val_qc_cases]]  # none: clears an earlier run's
        write_validation_qc(
            run.unet, qc_rows, plan, out_dir / VAL_QC_DIR, device=device, options=predict_options
        )
    result = _result(state, plan, out_dir, model_dir, split, start_epoch if checkpoint is not None else None)
    if dctx.main:
        write_result(result)
        for cb in callbacks:
            hook(cb, "on_train_end")(result)
    log.info(
        "training %s after %d epochs (%.0f s): best mean val Dice %.4f at epoch %d",
        state.stopped_reason,
        len(state.history),
        time.monotonic() - run.budget.start,
        result.best_dice_mean,
        state.best_epoch,
    )
    return result


def _result(
    state: LoopState,
    plan: Plan,
    out_dir: Path,
    model_dir: Path | None,
    split: dict[str, list[str]],
    resumed_from: int | None,
) -> TrainResult:
    best = state.best_metrics
    label_names = [n for v, n in sorted(plan.label_names.items()) if v != 0]
    return TrainResult(
        best_dice={n: best.get(f"val_dice/{n}", math.nan) for n in label_names},
        best_dice_mean=float(best.get("val_dice_mean", math.nan)),
        best_hd95={n: best.get(f"val_hd95/{n}", math.nan) for n in label_names},
        best_epoch=state.best_epoch,
        epochs_run=len(state.history),
        stopped_reason=state.stopped_reason,
        out_dir=out_dir,
        model_dir=model_dir,
        history=state.history,
        resumed_from_epoch=resumed_from,
        split=split,
    )
