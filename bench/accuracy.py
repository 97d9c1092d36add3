"""Accuracy at equal budgets (wall clock, or epochs): our recipe, each part of it off in turn, MONAI peers.

    .venv/bin/python -m bench.accuracy                       # demo data, 2 minutes per variant
    .venv/bin/python -m bench.accuracy --minutes 1 --staging STAGING --holdout 0.3
    .venv/bin/python -m bench.accuracy --epochs 24 --cases 24 --size 64   # equal steps instead

On a machine shared with other work a wall-clock budget gives a variant the steps the others'
load left it; `--epochs N` gives every variant the same N epochs of optimizer steps instead.

Holds out a share of the labelled cases (by case, seeded), trains every variant on the rest with
the same loop, config and budget (early stopping off, so each uses its whole budget), and scores
the best weights on the held-out cases through predict's path (`training.validate`): mean Dice and
HD95 over cases, with the seconds each run took. Variants: ours with the defaults; ours without
deep supervision; with SGD (Nesterov, momentum 0.99, poly, lr 0.01: nnU-Net's) instead of AdamW;
without augmentation; without test-time mirroring; without the 2.5-D context (one input slice,
`preprocess.context_slices: 1`; the same as ours where the plan chose 1); without the weights'
moving average (`train.ema_decay: null`: validation and export use the last step's weights); with
nnU-Net's batch Dice over the labels only; and MONAI's BasicUNet
and UNet trained by the same loop at our planned width and context (without deep supervision,
which needs our decoder). Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import network_in_loop
from bench.demo_dice import msd_to_staging
from pipeline.config import PipelineConfig
from pipeline.inference.predictor import PredictOptions
from pipeline.io.manifest import read_manifest
from pipeline.planning.network import unet_config
from pipeline.planning.plan import load_plan
from pipeline.runtime import configure_threads, prepare_model, resolve_device
from pipeline.synthetic.dataset import make_demo_dataset
from pipeline.training import loop
from pipeline.training.checkpoint import BEST, CHECKPOINT_DIR, load_best
from pipeline.training.data import split_holdout
from pipeline.training.validate import load_val_cases, validate
from unet_model import UNet, UNetConfig

# name -> config changes from the defaults ("ours" is the defaults themselves)
RECIPE_VARIANTS: dict[str, dict[str, dict]] = {
    "ours (defaults)": {},
    "- deep supervision": {"train": {"deep_supervision": False}},
    "sgd instead of adamw": {"train": {"optimizer": "sgd", "lr": 0.01}},
    "- augmentation": {"preprocess": {"augment": False}},
    "- test-time mirroring": {"infer": {"mirror_axes": []}},
    "- 2.5-D context": {"preprocess": {"context_slices": 1}},
    "- weights average": {"train": {"ema_decay": None}},
    "+ batch Dice without background (nnU-Net's)": {"train": {"batch_dice": True, "dice_background": False}},
}


def basic_unet(base: int) -> Callable[[UNetConfig], nn.Module]:
    from monai.networks.nets import BasicUNet

    def build(c: UNetConfig) -> nn.Module:
        features = [base * 2**i for i in range(5)] + [base]
        return BasicUNet(
            spatial_dims=2, in_channels=c.in_channels, out_channels=c.num_classes, features=features
        )

    return build


class _PaddedToMultiple(nn.Module):
    """Edge-pad H, W up to a multiple of `multiple` and crop the logits back (MONAI's UNet needs
    sizes it can halve `depth` times; validation predicts whole slices of any size)."""

    def __init__(self, net: nn.Module, multiple: int) -> None:
        super().__init__()
        self.net, self.multiple = net, multiple

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        pad_h, pad_w = -h % self.multiple, -w % self.multiple
        x = nn.functional.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
        return self.net(x)[..., :h, :w]


def monai_unet(base: int) -> Callable[[UNetConfig], nn.Module]:
    from monai.networks.nets import UNet as MonaiUNet

    def build(c: UNetConfig) -> nn.Module:
        channels = tuple(base * 2**i for i in range(c.depth + 1))
        net = MonaiUNet(
            spatial_dims=2,
            in_channels=c.in_channels,
            out_channels=c.num_classes,
            channels=channels,
            strides=(2,) * c.depth,
            num_res_units=2,
        )
        return _PaddedToMultiple(net, 2**c.depth)

    return build


def demo_staging(root: Path, cases: int, size: int = 112) -> Path:
    demo = make_demo_dataset(root / "demo", n_cases=cases, seed=0, size=size)
    return msd_to_staging(demo.msd_root, root / "staging")


def held_out_scores(
    run_dir: Path, test_view: Path, config: PipelineConfig, factory: Callable[[UNetConfig], nn.Module]
) -> dict[str, float]:
    """Mean Dice and HD95 over the held-out cases of the run's best weights, as predict scores them."""
    plan = load_plan(run_dir / loop.PLAN_FILE)
    mc = config.model
    net = factory(unet_config(plan, mc))
    net.load_state_dict(load_best(run_dir / CHECKPOINT_DIR / BEST))
    device = resolve_device(config.train.device)
    net = prepare_model(net, device).eval()
    rows = [r for r in read_manifest(test_view, resolve=True) if r.get("label")]
    scores = validate(
        net, load_val_cases(rows, plan), plan, device=device, options=PredictOptions.from_config(config.infer)
    )
    return {"dice": scores["val_dice_mean"], "hd95": scores.get("val_hd95_mean", math.nan)}


def run_variant(
    name: str,
    config: PipelineConfig,
    train_view: Path,
    test_view: Path,
    out: Path,
    factory: Callable[[UNetConfig], nn.Module] | None = None,
) -> dict[str, float | str]:
    run_dir = out / name.replace(" ", "_").replace("(", "").replace(")", "")
    start = time.perf_counter()
    if factory is None:
        result = loop.train(train_view, run_dir, config, resume=False)
        factory = UNet
    else:
        with network_in_loop(factory):
            result = loop.train(train_view, run_dir, config, resume=False)
    seconds = time.perf_counter() - start
    scores = held_out_scores(run_dir, test_view, config, factory)
    row = {
        "variant": name,
        "test_dice": scores["dice"],
        "test_hd95_mm": scores["hd95"],
        "val_dice": result.best_dice_mean,
        "epochs": result.epochs_run,
        "seconds": seconds,
    }
    print(
        f"{name:<24} {row['test_dice']:>9.3f} {row['test_hd95_mm']:>9.2f} {row['val_dice']:>8.3f} "
        f"{row['epochs']:>6d} {row['seconds']:>7.0f}",
        flush=True,
    )
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=2.0, help="training budget of every variant")
    p.add_argument("--staging", type=Path, default=None, help="staging folder (default: the demo data)")
    p.add_argument(
        "--epochs", type=int, default=None, help="equal steps: this many epochs each (no time budget)"
    )
    p.add_argument("--cases", type=int, default=12, help="demo cases to generate (without --staging)")
    p.add_argument("--size", type=int, default=112, help="demo in-plane matrix (without --staging)")
    p.add_argument("--seed", type=int, default=0, help="training seed of every variant")
    p.add_argument("--val-every", type=int, default=2, help="validate every N epochs (best weights)")
    p.add_argument("--holdout", type=float, default=0.25, help="share of labelled cases held out")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--only", nargs="*", default=None, help="variant names to run (default: all)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    configure_threads()
    defaults = PipelineConfig().replace(
        # equal budgets: the clock (or the epoch count) ends every run, never convergence
        train={
            "device": args.device,
            "time_budget_minutes": None if args.epochs else args.minutes,
            "epochs": args.epochs or 100_000,
            "early_stopping_patience": None,
            "seed": args.seed,
            "val_every": args.val_every,
        }
    )
    budget = f"{args.epochs} epochs" if args.epochs else f"{args.minutes:g} min"
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench-accuracy-") as tmp:
        root = Path(tmp)
        staging = args.staging or demo_staging(root, args.cases, args.size)
        train_view, test_view = split_holdout(staging, args.holdout, seed=0, out=root / "views")
        n_test = sum(1 for r in read_manifest(test_view) if r.get("label"))
        print(
            f"{n_test} held-out cases, {budget} per variant on {resolve_device(args.device)} "
            f"({torch.get_num_threads()} threads)"
        )
        print(f"{'variant':<24} {'test Dice':>9} {'HD95 mm':>9} {'val Dice':>8} {'epochs':>6} {'seconds':>7}")
        wanted = set(args.only) if args.only else None
        for name, changes in RECIPE_VARIANTS.items():
            if wanted is None or name in wanted:
                rows.append(run_variant(name, defaults.replace(**changes), train_view, test_view, root))
        base = load_plan(next(root.glob("*/plan.json"))).base_channels if rows else 16
        peers = {"MONAI BasicUNet": basic_unet(base), "MONAI UNet": monai_unet(base)}
        peer_config = defaults.replace(train={"deep_supervision": False})
        for name, factory in peers.items():
            if wanted is None or name in wanted:
                rows.append(run_variant(name, peer_config, train_view, test_view, root, factory))
    print(json.dumps(rows, default=float))
    return rows


if __name__ == "__main__":
    main()
