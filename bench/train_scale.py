"""Training with the defaults on a brain-sized task: how long it takes on this machine.

    .venv/bin/python -m bench.train_scale                   # 10 volumes of 176 x 256 x 256 at 1 mm, 4 epochs
    .venv/bin/python -m bench.train_scale --full            # the whole default run (at most 120 epochs)
    .venv/bin/python -m bench.train_scale --cases 10 --shape 160 224 224 --epochs 6

Generates `--cases` MR volumes of `--shape` (slices, rows, columns) at 1 mm isotropic (the
world-space phantom, T1-like contrast; the organ and lesion play grey and white matter), stages
them, and trains with the default configuration. Without `--full` the run stops after `--epochs`
epochs and the default run's wall time is projected from what was measured in it: set-up (plan,
caching) + the default epochs x the mean training epoch + the default number of validations x the
mean validation + the closing steps (the final scoring of the best weights, QC pictures, model
folder). Prints the measured parts, the projection (an upper bound: early stopping can only end
the run sooner) and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.config import PipelineConfig
from pipeline.io.volume import Volume, save_nifti
from pipeline.runtime import configure_threads
from pipeline.synthetic.phantom import LABELS, make_phantom
from pipeline.training.loop import TrainCallback, train

SPACING_MM = 1.0


def brain_sized_staging(root: Path, cases: int, shape: tuple[int, int, int]) -> Path:
    """A staging folder of `cases` labelled MR volumes of `shape` (slices, rows, columns) at 1 mm."""
    rows = []
    affine = np.diag([SPACING_MM, SPACING_MM, SPACING_MM, 1.0])
    for i in range(cases):
        case_id = f"brain_{i:03d}"
        image, label = make_phantom(shape, spacing=(SPACING_MM,) * 3, seed=100 + i, modality="MR")
        # (slices, rows, columns) -> NIfTI's (x, y, z) voxel order
        image, label = image.transpose(2, 1, 0), label.transpose(2, 1, 0)
        save_nifti(Volume(image.astype(np.float32), affine, "MR"), root / f"images/{case_id}.nii.gz")
        save_nifti(Volume(label.astype(np.uint8), affine, "MR"), root / f"labels/{case_id}.nii.gz")
        rows.append(
            {
                "case_id": case_id,
                "image": f"images/{case_id}.nii.gz",
                "label": f"labels/{case_id}.nii.gz",
                "modality": "MR",
                "shape": list(image.shape),
                "spacing": [SPACING_MM] * 3,
                "source": "bench-train-scale",
                "sha256": {},
            }
        )
    (root / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    labels = {name: value for value, name in LABELS.items()}
    (root / "dataset.json").write_text(json.dumps({"labels": labels}, indent=2))
    return root


class Clock(TrainCallback):
    """Wall times of the run's phases: start, each epoch's end (training + validation when due)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.train_start = math.nan
        self.epoch_ends: list[float] = []
        self.metrics: list[dict] = []

    def on_train_start(self, **_: object) -> None:
        self.train_start = time.perf_counter()

    def on_epoch_end(self, epoch: int, metrics: dict) -> None:
        self.epoch_ends.append(time.perf_counter())
        self.metrics.append(dict(metrics))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", type=int, default=10)
    p.add_argument("--shape", type=int, nargs=3, default=(176, 256, 256), help="slices rows columns")
    p.add_argument("--epochs", type=int, default=4, help="epochs measured (without --full)")
    p.add_argument("--full", action="store_true", help="run the default training to its end")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    configure_threads()
    defaults = PipelineConfig().replace(train={"device": args.device})
    config = defaults if args.full else defaults.replace(train={"epochs": args.epochs})
    with tempfile.TemporaryDirectory(prefix="bench-train-scale-") as tmp:
        t0 = time.perf_counter()
        staging = brain_sized_staging(Path(tmp) / "staging", args.cases, tuple(args.shape))
        generated = time.perf_counter() - t0
        clock = Clock()
        result = train(staging, Path(tmp) / "run", config, callbacks=[clock], resume=False)
        end = time.perf_counter()
    intervals = np.diff([clock.train_start, *clock.epoch_ends])
    train_s = np.array([m["epoch_time_s"] for m in clock.metrics])
    validated = np.array(["val_dice_mean" in m for m in clock.metrics])
    val_s = (intervals - train_s)[validated]
    setup = clock.train_start - clock.start  # plan, split, the first epoch's caching is in epoch 0
    first_extra = float(intervals[0] - train_s[0] - (val_s.mean() if validated[0] else 0.0))
    closing = end - clock.epoch_ends[-1]
    tc = defaults.train
    n_val = math.ceil(tc.epochs / tc.val_every)
    projected = (
        (setup + first_extra + tc.epochs * float(train_s[1:].mean() if len(train_s) > 1 else train_s[0]))
        + n_val * float(val_s.mean())
        + closing
    )
    row = {
        "cases": args.cases,
        "shape": list(args.shape),
        "threads": torch.get_num_threads(),
        "epochs_run": result.epochs_run,
        "stopped": result.stopped_reason,
        "best_val_dice": result.best_dice_mean,
        "generate_s": round(generated, 1),
        "setup_s": round(setup, 1),
        "first_epoch_caching_s": round(first_extra, 1),
        "train_epoch_s": round(float(train_s[1:].mean() if len(train_s) > 1 else train_s[0]), 2),
        "validation_s": round(float(val_s.mean()), 2),
        "closing_s": round(closing, 1),
        "measured_s": round(end - clock.start, 1),
        "projected_default_s": None if args.full else round(projected, 1),
    }
    print(
        f"{args.cases} volumes {tuple(args.shape)} at 1 mm on {config.train.device} "
        f"({row['threads']} threads): set-up {row['setup_s']} s, first-epoch caching "
        f"{row['first_epoch_caching_s']} s, training epoch {row['train_epoch_s']} s, validation "
        f"{row['validation_s']} s, closing {row['closing_s']} s"
    )
    if args.full:
        print(
            f"default training ran {result.epochs_run} epochs ({result.stopped_reason}) "
            f"in {row['measured_s']} s"
        )
    else:
        print(
            f"default training ({tc.epochs} epochs, {n_val} validations) projected at most "
            f"{projected / 60:.1f} min; {result.epochs_run} epochs measured in {row['measured_s']} s"
        )
    print(json.dumps(row, default=float))
    return row


if __name__ == "__main__":
    main()
