"""The training loop: 2D slices of staged volumes -> a U-Net, validated on whole volumes.

`train(staging, out_dir, config)` plans the dataset (or reloads the plan of a run it resumes),
splits cases, trains with Dice + cross-entropy, validates every `val_every` epochs on whole
validation volumes through predict's own path (`inference.predict_prepared`), keeps the best
weights by mean validation Dice, stops early or at the wall-clock budget, checkpoints every
epoch and resumes from the last checkpoint after a crash. It ends by writing the model folder
(`pipeline.model_store.save_model_dir`) and returns a `TrainResult`.

Per-epoch metrics go to `TrainCallback.on_epoch_end`, so tracking (MLflow) stays out of here.

Multi-GPU: launch with `torchrun --nproc_per_node N -m pipeline.cli train ...`; `train` then
initialises torch.distributed from the environment (NCCL on CUDA, gloo on CPU), gives each rank
a DistributedSampler shard, wraps the model in DDP, and only rank 0 writes checkpoints, the
model folder and the progress bar. Every rank validates (the sets are small) so all ranks take
the same stopping decisions without extra communication. A process group initialised by the
caller before `train` is used as is.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
import torch.distributed as dist
from monai.losses import DiceCELoss
from torch import nn
from tqdm.auto import tqdm

from pipeline.config import PipelineConfig
from pipeline.data import infinite_batches, loader_workers, make_loader, make_train_dataset, split_cases
from pipeline.inference import PredictOptions
from pipeline.io.atomic import atomic_path, write_text
from pipeline.io.manifest import read_manifest
from pipeline.metrics import mean_over_cases, segmentation_metrics
from pipeline.planning.plan import Plan, load_plan, plan_dataset, save_plan
from pipeline.planning.transforms import preprocess_volume, train_transforms
from pipeline.runtime import (
    autocast,
    configure_threads,
    prepare_model,
    resolve_device,
    resolve_precision,
    to_input,
    training_channels_last,
)
from unet_model import UNet, UNetConfig

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
LAST, BEST = "last.pt", "best.pt"
PLAN_FILE = "plan.json"
CONFIG_FILE = "config.json"
SPLIT_FILE = "split.json"
MODEL_DIR = "model"
CURVES_FILE = "training_curves.png"


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


@dataclass
class TrainResult:
    """What a training run achieved and where it left the model."""

    best_dice: dict[str, float]  # label name -> mean val Dice at the best epoch
    best_dice_mean: float  # mean over labels; nan when no validation ran
    best_hd95: dict[str, float]  # label name -> mean val HD95 (mm) at the best epoch
    best_epoch: int  # 0-based; -1 when no validation ran
    epochs_run: int  # epochs completed, including those before a resume
    stopped_reason: str  # completed | early_stopping | time_budget
    out_dir: Path
    model_dir: Path | None  # the saved model folder (rank 0), None elsewhere
    history: list[dict[str, float]] = field(default_factory=list)  # per-epoch metrics
    resumed_from_epoch: int | None = None  # epochs already done in the checkpoint resumed from
    split: dict[str, list[str]] = field(default_factory=dict)  # {"train": [...], "val": [...]}

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["out_dir"] = str(self.out_dir)
        data["model_dir"] = str(self.model_dir) if self.model_dir else None
        return data


# --------------------------------------------------------------------------------------------
# Helpers


@dataclass(frozen=True)
class _Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # we initialised it, so we destroy it

    @property
    def enabled(self) -> bool:
        return self.world_size > 1 or dist.is_initialized()

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed(device_request: str) -> _Dist:
    """Use the caller's process group, or start one from torchrun's environment variables."""
    if dist.is_available() and dist.is_initialized():
        return _Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_request != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return _Dist(dist.get_rank(), dist.get_world_size(), local_rank, owns_group=True)


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch; optionally ask for deterministic kernels (slower)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy(), *n[2:]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _unwrap(model: nn.Module) -> nn.Module:
    model = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    return getattr(model, "_orig_mod", model)  # torch.compile wrapper


def _lr_lambda(optimizer_name: str, warmup: int, total: int, budget_s: float | None, t0: float):
    """Linear warm-up over `warmup` steps, then cosine (adamw) or poly 0.9 (sgd) decay to ~0.

    With a wall-clock budget the decay runs on whichever ends first, the steps or the budget
    (progress = max(step share, time share)), so a budget-bounded run still anneals fully.
    """

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        t = min(1.0, (step - warmup) / max(1, total - warmup))
        if budget_s:
            t = max(t, min(1.0, (time.monotonic() - t0) / budget_s))
        if optimizer_name == "sgd":
            return max(1e-3, (1.0 - t) ** 0.9)
        return max(1e-3, 0.5 * (1.0 + math.cos(math.pi * t)))

    return factor


def _hook(callback: Any, name: str):
    """The callback's method `name`, or a no-op: any object with some of the hooks will do."""
    return getattr(callback, name, None) or (lambda *args, **kwargs: None)


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


@dataclass
class _ValCase:
    case_id: str
    slices: torch.Tensor
    info: Any
    truth: np.ndarray
    spacing: tuple[float, ...]


def _load_val_cases(rows: list[dict[str, Any]], plan: Plan) -> list[_ValCase]:
    """Validation cases read and preprocessed exactly as predict reads a staging folder."""
    from pipeline.inference import load_staged_volume

    cases = []
    for row in rows:
        volume = load_staged_volume(Path(row["image"]), str(row["image"]), row.get("modality"))
        slices, info = preprocess_volume(volume, plan)
        del volume
        label_img = nib.load(row["label"])
        truth = np.asarray(label_img.dataobj).astype(np.uint8)
        spacing = tuple(float(s) for s in np.linalg.norm(label_img.affine[:3, :3], axis=0))
        cases.append(_ValCase(row["case_id"], slices, info, truth, spacing))
    return cases


def validate(
    model: nn.Module,
    cases: Sequence[_ValCase],
    plan: Plan,
    *,
    device: torch.device,
    options: PredictOptions,
) -> dict[str, float]:
    """Mean over whole validation volumes of Dice and HD95 per label, on the original grids.

    The prediction is predict's own (`inference.predict_prepared` with the infer section's
    `options`: slice prediction, restoring to the source grid, post-processing), so the score is
    the score of what predict writes; `metrics.segmentation_metrics` is what `evaluate` uses.
    """
    from pipeline.inference import predict_prepared

    per_case = []
    was_training = model.training
    model.eval()
    try:
        for case in cases:
            volume = predict_prepared(model, case.slices, case.info, options, device=device)
            per_case.append(segmentation_metrics(volume, case.truth, plan.label_names, spacing=case.spacing))
    finally:
        model.train(was_training)
    return {f"val_{k}": v for k, v in mean_over_cases(per_case).items()}


def plot_training_curves(history: Sequence[dict[str, float]], path: str | Path) -> Path:
    """PNG of training loss and mean validation Dice per epoch (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    epochs = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(epochs, [h.get("loss", float("nan")) for h in history], color="tab:blue", label="train loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("Dice + CE loss", color="tab:blue")
    ax2 = ax.twinx()
    val = [(h["epoch"], h["val_dice_mean"]) for h in history if "val_dice_mean" in h]
    if val:
        ax2.plot(*zip(*val, strict=True), "o-", color="tab:orange", label="val mean Dice")
    ax2.set_ylabel("validation mean Dice", color="tab:orange")
    ax2.set_ylim(0, 1)
    ax.set_title("training curves")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def _write_model_dir(
    model: nn.Module, out_dir: Path, plan: Plan, config: PipelineConfig, validation: dict[str, float]
) -> Path:
    from pipeline.model_store import save_model_dir

    names = {v: plan.label_names.get(v, f"label_{v}") for v in range(plan.num_classes)}
    return save_model_dir(
        model,
        out_dir,
        plan=plan.to_dict(),
        config=config.to_dict(),
        label_names=names,
        validation={k: v for k, v in validation.items() if isinstance(v, int | float) and math.isfinite(v)},
    )


# --------------------------------------------------------------------------------------------
# The loop


def train(
    staging: str | Path,
    out_dir: str | Path,
    config: PipelineConfig | None = None,
    *,
    callbacks: Sequence[TrainCallback] = (),
    resume: bool = True,
) -> TrainResult:
    """Train on the labelled cases of `staging`; checkpoints, plan and model go to `out_dir`.

    With `resume` and a checkpoint in `out_dir/checkpoints/last.pt`, the run continues from it with
    the plan, split and config it started with (the checkpoint's config wins over `config`).
    """
    config = config or PipelineConfig()
    staging, out_dir = Path(staging), Path(out_dir)
    ckpt_dir = out_dir / CHECKPOINT_DIR
    last_path = ckpt_dir / LAST
    checkpoint = None
    if resume and last_path.is_file():
        checkpoint = torch.load(last_path, map_location="cpu", weights_only=True)
        config = PipelineConfig.from_dict(json.loads(checkpoint["config"]), source=f"checkpoint {last_path}")
        log.info("resuming from %s after epoch %d", last_path, checkpoint["epoch"])
    tc = config.train

    dctx = _init_distributed(tc.device)
    configure_threads()
    device = resolve_device(tc.device)
    if dctx.enabled and device.type == "cuda":
        device = torch.device("cuda", dctx.local_rank)  # one GPU per rank
    amp_dtype = resolve_precision(tc.precision, device)
    seed_everything(tc.seed + dctx.rank, tc.deterministic)

    # Plan and split: computed once per run, saved, and reused as is on resume.
    rows = [r for r in read_manifest(staging, resolve=True) if r.get("label")]
    by_id = {r["case_id"]: r for r in rows}
    if checkpoint is not None:
        plan = Plan.from_dict(json.loads(checkpoint["plan"]))
        split = json.loads(checkpoint["split"])
    else:
        plan_path = out_dir / PLAN_FILE
        plan = (
            load_plan(plan_path)
            if (resume and plan_path.is_file())
            else plan_dataset(staging, config.preprocess)
        )
        dc = config.data
        train_ids, val_ids = split_cases(
            list(by_id), val_fraction=dc.val_fraction, folds=dc.folds, fold=dc.fold, seed=dc.split_seed
        )
        split = {"train": train_ids, "val": val_ids}
    missing = sorted(set(split["train"] + split["val"]) - set(by_id))
    if missing:
        raise ValueError(f"{staging}/manifest.jsonl no longer lists labelled case(s) {', '.join(missing)}")
    if dctx.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_plan(plan, out_dir / PLAN_FILE)
        write_text(out_dir / CONFIG_FILE, json.dumps(config.to_dict(), indent=2) + "\n")
        write_text(out_dir / SPLIT_FILE, json.dumps(split, indent=2) + "\n")

    # Model, loss, optimizer, schedule.
    mc = config.model
    net = UNet(
        UNetConfig(
            in_channels=1,
            num_classes=plan.num_classes,
            base_channels=mc.base_channels,
            depth=mc.depth,
            norm=mc.norm,
            dropout=mc.dropout,
        )
    )
    channels_last = training_channels_last(tc.channels_last, device)
    net = prepare_model(net, device, channels_last)
    weight = (
        torch.tensor(plan.class_weights, dtype=torch.float32, device=device) if tc.class_weighted_ce else None
    )
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, weight=weight)
    if tc.optimizer == "adamw":
        optimizer: torch.optim.Optimizer = torch.optim.AdamW(
            net.parameters(), lr=tc.lr, weight_decay=tc.weight_decay
        )
    else:
        optimizer = torch.optim.SGD(
            net.parameters(), lr=tc.lr, momentum=tc.momentum, nesterov=True, weight_decay=tc.weight_decay
        )
    total_steps = tc.epochs * tc.steps_per_epoch
    budget_s = tc.time_budget_minutes * 60 if tc.time_budget_minutes else None
    t_start = time.monotonic()  # the budget counts from here, per process (a resumed run gets a new one)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        _lr_lambda(tc.optimizer, tc.warmup_epochs * tc.steps_per_epoch, total_steps, budget_s, t_start),
    )

    start_epoch, best_mean, best_epoch, best_metrics, stale = 0, -math.inf, -1, {}, 0
    history: list[dict[str, float]] = []
    stopped_reason = "completed"
    if checkpoint is not None:
        net.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        start_epoch = int(checkpoint["epoch"]) + 1
        best_mean, best_epoch = float(checkpoint["best_mean"]), int(checkpoint["best_epoch"])
        best_metrics = json.loads(checkpoint["best_metrics"])
        stale = int(checkpoint["stale"])
        history = json.loads(checkpoint["history"])
        stopped_reason = checkpoint["stopped_reason"]
        _set_rng_state(checkpoint["rng"])
    resumed_from = start_epoch if checkpoint is not None else None

    model: nn.Module = net
    if tc.compile:
        model = torch.compile(model)  # type: ignore[assignment]
    if dctx.enabled:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )

    finished = checkpoint is not None and (stopped_reason != "completed" or start_epoch >= tc.epochs)
    if dctx.main:
        for cb in callbacks:
            _hook(cb, "on_train_start")(config=config, plan=plan, split=split)

    if not finished:
        train_items = [
            {"image": by_id[c]["image"], "label": by_id[c]["label"], "modality": by_id[c]["modality"]}
            for c in split["train"]
        ]
        transform = train_transforms(plan, config.preprocess, tc.slices_per_volume)
        transform.set_random_state(seed=(tc.seed * 1009 + start_epoch * 7919 + dctx.rank) % 2**32)
        cache_dir = config.data.cache_dir or (out_dir / "cache")
        dataset = make_train_dataset(train_items, transform, cache=config.data.cache, cache_dir=cache_dir)
        loader, sampler = make_loader(
            dataset,
            volumes_per_batch=tc.batch_size // tc.slices_per_volume,
            seed=tc.seed,
            buffer_size=config.data.loader_buffer,
            distributed=dctx.enabled,
            workers=loader_workers(config.data.loader_workers, device.type),
        )
        batches = infinite_batches(loader, sampler, start=start_epoch)
        val_cases = _load_val_cases([by_id[c] for c in split["val"]], plan)
        val_options = PredictOptions.from_config(config.infer)  # what predict with this model does

    quiet = not dctx.main or not sys.stderr.isatty()
    bar = tqdm(total=tc.epochs, initial=start_epoch, desc="train", unit="epoch", disable=quiet, leave=True)

    epoch = start_epoch - 1
    while not finished and epoch + 1 < tc.epochs:
        epoch += 1
        model.train()
        t_epoch = time.perf_counter()
        loss_sum, n_slices, steps = 0.0, 0, 0
        over_budget = False
        for _ in range(tc.steps_per_epoch):
            batch = next(batches)
            x = to_input(torch.as_tensor(batch["image"]).float(), device, channels_last)
            y = torch.as_tensor(batch["label"]).to(device, non_blocking=True)
            with autocast(device, amp_dtype):
                logits = model(x)
            loss = loss_fn(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if tc.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            optimizer.step()
            scheduler.step()
            loss_sum += float(loss.detach())
            n_slices += x.shape[0]
            steps += 1
            bar.set_postfix(loss=f"{loss_sum / steps:.3f}", refresh=False)
            over_budget = budget_s is not None and time.monotonic() - t_start > budget_s
            if dctx.enabled:  # all ranks must agree, or DDP's next all-reduce would hang
                flag = torch.tensor([float(over_budget)], device=device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                over_budget = bool(flag.item())
            if over_budget:
                break
        elapsed = time.perf_counter() - t_epoch
        metrics: dict[str, float] = {
            "epoch": epoch,
            "loss": loss_sum / max(steps, 1),
            "lr": optimizer.param_groups[0]["lr"],
            "slices_per_s": n_slices * dctx.world_size / max(elapsed, 1e-9),
            "epoch_time_s": elapsed,
        }
        if over_budget:
            stopped_reason = "time_budget"
        last_epoch = epoch + 1 >= tc.epochs
        if (epoch + 1) % tc.val_every == 0 or last_epoch or over_budget:
            val = validate(_unwrap(model), val_cases, plan, device=device, options=val_options)
            metrics.update(val)
            if val["val_dice_mean"] > best_mean:
                best_mean, best_epoch, best_metrics, stale = val["val_dice_mean"], epoch, val, 0
                if dctx.main:
                    _save_checkpoint(ckpt_dir / BEST, {"model": _unwrap(model).state_dict(), "epoch": epoch})
            else:
                stale += 1
                if tc.early_stopping_patience and stale >= tc.early_stopping_patience:
                    stopped_reason = "early_stopping"
        history.append(metrics)
        log.info(
            "epoch %d: loss %.4f, %.0f slices/s%s",
            epoch,
            metrics["loss"],
            metrics["slices_per_s"],
            f", val Dice {metrics['val_dice_mean']:.4f}" if "val_dice_mean" in metrics else "",
        )
        done = stopped_reason != "completed" or last_epoch
        if dctx.main:
            _save_checkpoint(
                last_path,
                {
                    "model": _unwrap(model).state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "epoch": epoch,
                    "best_mean": best_mean,
                    "best_epoch": best_epoch,
                    "best_metrics": json.dumps(best_metrics),
                    "stale": stale,
                    "history": json.dumps(history),
                    "stopped_reason": stopped_reason,
                    "rng": _rng_state(),
                    "config": json.dumps(config.to_dict()),
                    "plan": json.dumps(plan.to_dict()),
                    "split": json.dumps(split),
                },
            )
            for cb in callbacks:
                _hook(cb, "on_epoch_end")(epoch, metrics)
        postfix = {"loss": f"{metrics['loss']:.3f}", "slices/s": f"{metrics['slices_per_s']:.0f}"}
        if best_epoch >= 0:
            postfix["val_dice"] = f"{best_metrics['val_dice_mean']:.3f}"
        bar.set_postfix(postfix, refresh=False)
        bar.update(1)
        if done:
            break
    bar.close()

    # The best weights (by mean val Dice) become the model; the last ones if none validated.
    if best_epoch >= 0 and (ckpt_dir / BEST).is_file():
        state = torch.load(ckpt_dir / BEST, map_location="cpu", weights_only=True)["model"]
        net.load_state_dict(state)
    model_dir = None
    if dctx.main:
        if history:
            plot_training_curves(history, out_dir / CURVES_FILE)
        model_dir = _write_model_dir(net, out_dir / MODEL_DIR, plan, config, best_metrics)
    label_names = [n for v, n in sorted(plan.label_names.items()) if v != 0]
    result = TrainResult(
        best_dice={n: best_metrics.get(f"val_dice/{n}", math.nan) for n in label_names},
        best_dice_mean=float(best_metrics.get("val_dice_mean", math.nan)),
        best_hd95={n: best_metrics.get(f"val_hd95/{n}", math.nan) for n in label_names},
        best_epoch=best_epoch,
        epochs_run=len(history),
        stopped_reason=stopped_reason,
        out_dir=out_dir,
        model_dir=model_dir,
        history=history,
        resumed_from_epoch=resumed_from,
        split=split,
    )
    if dctx.main:
        write_text(out_dir / "result.json", json.dumps(result.to_json(), indent=2, default=float) + "\n")
        for cb in callbacks:
            _hook(cb, "on_train_end")(result)
    if dctx.owns_group:
        dist.destroy_process_group()
    log.info(
        "training %s after %d epochs (%.0f s): best mean val Dice %.4f at epoch %d",
        stopped_reason,
        len(history),
        time.monotonic() - t_start,
        result.best_dice_mean,
        best_epoch,
    )
    return result
