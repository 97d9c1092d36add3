"""Training benchmarks, as ratios measured in this one process.

    python bench/train.py                 # all three on the generated demo data
    python bench/train.py --only loader   # loader | logging | peer

1. loader:  step time with the real loader (MONAI transforms, CacheDataset, ThreadDataLoader)
            over the same step on batches already in memory (target <= 1.10).
2. logging: epoch time with MLflow tracking (batched metrics) over without (target <= 1.01).
3. peer:    our U-Net against MONAI's BasicUNet trained by the same loop on the same data and
            the same wall-clock budget: mean validation Dice difference (target >= -0.01).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import network_in_loop
from bench.demo_dice import msd_to_staging
from pipeline.config import PipelineConfig
from pipeline.io.manifest import read_manifest
from pipeline.planning.network import plan_network, unet_config
from pipeline.planning.plan import plan_dataset
from pipeline.runtime import configure_threads, prepare_model, resolve_device, to_input
from pipeline.synthetic.dataset import make_demo_dataset
from pipeline.training import loop
from pipeline.training.augment import train_transforms
from pipeline.training.data import (
    infinite_batches,
    loader_workers,
    make_loader,
    make_train_dataset,
    split_cases,
)
from unet_model import UNet, UNetConfig


def staging_from_demo(root: Path) -> Path:
    demo = make_demo_dataset(root / "demo", n_cases=12, seed=0)
    return msd_to_staging(demo.msd_root, root / "staging")


def loader_ratio(staging: Path, config: PipelineConfig, block: int = 15, blocks: int = 4) -> dict[str, float]:
    """Real loader vs in-memory batches for the same training steps."""
    tc = config.train
    device = resolve_device("cpu")
    plan = plan_network(plan_dataset(staging, config.preprocess), config, device)
    rows = [r for r in read_manifest(staging, resolve=True) if r.get("label")]
    train_ids, _ = split_cases([r["case_id"] for r in rows], val_fraction=0.2, folds=1, fold=0, seed=0)
    items = [
        {"image": r["image"], "label": r["label"], "modality": r["modality"]}
        for r in rows
        if r["case_id"] in train_ids
    ]
    dataset = make_train_dataset(items, train_transforms(plan, config.preprocess, tc.slices_per_volume))
    loader, sampler = make_loader(
        dataset,
        volumes_per_batch=plan.batch_size // tc.slices_per_volume,
        seed=0,
        buffer_size=config.data.loader_buffer,
        workers=loader_workers(config.data.loader_workers, "cpu"),
    )
    model = prepare_model(UNet(unet_config(plan, config.model)), device)  # the loop's network
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step(batch) -> None:
        x = to_input(torch.as_tensor(batch["image"]).float(), device)
        y = torch.as_tensor(batch["label"]).long()[:, 0]
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()

    batches = infinite_batches(loader, sampler)
    for _ in range(3):
        step(next(batches))  # warm-up (and the loader's first fill)
    in_memory = [next(batches) for _ in range(block)]
    # Alternate blocks of real-loader and in-memory steps so drifts of a shared machine's load
    # fall on both sides alike; the totals over all blocks give the ratio.
    real = memory = 0.0
    for _ in range(blocks):
        t0 = time.perf_counter()
        for _ in range(block):
            step(next(batches))
        real += time.perf_counter() - t0
        t0 = time.perf_counter()
        for batch in in_memory:
            step(batch)
        memory += time.perf_counter() - t0
    steps = blocks * block
    return {"loader_s_per_step": real / steps, "memory_s_per_step": memory / steps, "ratio": real / memory}


class _Timed:
    """Forwards training callbacks to the tracker, adding up the seconds spent inside it."""

    def __init__(self, tracker) -> None:
        self.tracker, self.seconds = tracker, 0.0

    def __getattr__(self, name):
        hook = getattr(self.tracker, name)

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return hook(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0

        return timed


def logging_ratio(staging: Path, config: PipelineConfig, root: Path) -> dict[str, float]:
    """Epoch time with MLflow tracking over without: the tracker's own seconds, measured inside
    the same training run (two separate runs would differ by more than 1 % from noise alone)."""
    from pipeline import tracking

    cfg = config.replace(train={"epochs": 8, "val_every": 100, "time_budget_minutes": None})
    with tracking.Tracker(tracking_uri=f"sqlite:///{root / 'mlflow.db'}") as tracker:
        timed = _Timed(tracker)
        result = loop.train(staging, root / "tracked", cfg, callbacks=[timed])
        t0 = time.perf_counter()
        tracker.flush()  # the batched metrics still buffered go out now: count them too
        timed.seconds += time.perf_counter() - t0
    epochs = sum(h["epoch_time_s"] for h in result.history)
    return {
        "epochs_s": epochs,
        "tracking_s": timed.seconds,
        "ratio": (epochs + timed.seconds) / epochs,
        "tracking_error": tracker.tracking_error,
    }


def peer_comparison(staging: Path, config: PipelineConfig, root: Path, minutes: float) -> dict[str, float]:
    from monai.networks.nets import BasicUNet

    cfg = config.replace(train={"time_budget_minutes": minutes})
    ours = loop.train(staging, root / "ours", cfg)
    base = json.loads((root / "ours" / "plan.json").read_text())["base_channels"]  # the width ours trained

    def basic_unet(unet_config: UNetConfig):
        f = [base * 2**i for i in range(5)] + [base]
        return BasicUNet(
            spatial_dims=2,
            in_channels=unet_config.in_channels,
            out_channels=unet_config.num_classes,
            features=f,
        )

    with network_in_loop(basic_unet):  # BasicUNet has no decoder steps for deep supervision's heads
        peer = loop.train(staging, root / "peer", cfg.replace(train={"deep_supervision": False}))
    return {
        "ours_dice": ours.best_dice_mean,
        "basicunet_dice": peer.best_dice_mean,
        "difference": ours.best_dice_mean - peer.best_dice_mean,
        "ours_epochs": ours.epochs_run,
        "basicunet_epochs": peer.epochs_run,
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=["loader", "logging", "peer"], default=None)
    p.add_argument("--peer-minutes", type=float, default=2.0, help="training budget of each peer run")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    configure_threads()
    config = PipelineConfig().replace(train={"device": "cpu"})
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        staging = staging_from_demo(root)
        if args.only in (None, "loader"):
            out["loader"] = r = loader_ratio(staging, config)
            real, mem = r["loader_s_per_step"], r["memory_s_per_step"]
            print(f"loader   {real:.3f} s/step real vs {mem:.3f} in memory: ratio {r['ratio']:.3f} (<= 1.10)")
        if args.only in (None, "logging"):
            out["logging"] = r = logging_ratio(staging, config, root)
            print(
                f"logging  {r['tracking_s']:.3f} s in the tracker over {r['epochs_s']:.2f} s of epochs: "
                f"ratio {r['ratio']:.4f} (<= 1.01)"
                + (f"; TRACKING FAILED: {r['tracking_error']}" if r["tracking_error"] else "")
            )
        if args.only in (None, "peer"):
            out["peer"] = r = peer_comparison(staging, config, root, args.peer_minutes)
            print(
                f"peer     mean val Dice ours {r['ours_dice']:.3f} vs BasicUNet {r['basicunet_dice']:.3f} "
                f"({args.peer_minutes:g} min each): difference {r['difference']:+.3f} (target >= -0.01)"
            )
    print(json.dumps(out, default=str))
    return out


if __name__ == "__main__":
    main()
