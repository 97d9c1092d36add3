"""Check (not a test): the default config reaches mean val Dice >= 0.90 on the demo data in 5 minutes.

    .venv/bin/python -m bench.demo_dice [WORK_DIR]

Generates the demo dataset, copies its labelled MSD cases into a staging folder (the ingest
stage's format), trains with the default configuration (to convergence) and prints one JSON
line: the best mean validation Dice, per-label Dice and HD95, epochs, wall time, and the seconds
from the start of training to the first validation at or above 0.90, which the gate reads.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import nibabel as nib

from pipeline.config import PipelineConfig
from pipeline.io.volume import Volume, save_nifti
from pipeline.synthetic.dataset import make_demo_dataset
from pipeline.training.loop import train

GATE_DICE, GATE_SECONDS = 0.90, 300.0


def msd_to_staging(msd_root: Path, staging: Path) -> Path:
    """Copy the labelled cases of an MSD folder into the staging layout (images/, labels/, manifest)."""
    dataset = json.loads((msd_root / "dataset.json").read_text())
    modality = dataset.get("case_modality", {})
    rows = []
    for entry in dataset["training"]:
        case_id = Path(entry["image"]).name.removesuffix(".nii.gz")
        img = nib.load(msd_root / entry["image"])
        lab = nib.load(msd_root / entry["label"])
        mod = modality.get(case_id, "unknown")
        save_nifti(
            Volume(img.get_fdata().astype("float32"), img.affine, mod), staging / f"images/{case_id}.nii.gz"
        )
        save_nifti(
            Volume(lab.get_fdata().astype("uint8"), lab.affine, mod), staging / f"labels/{case_id}.nii.gz"
        )
        rows.append(
            {
                "case_id": case_id,
                "image": f"images/{case_id}.nii.gz",
                "label": f"labels/{case_id}.nii.gz",
                "modality": mod,
                "shape": list(img.shape),
                "spacing": [float(s) for s in img.header.get_zooms()[:3]],
                "source": "demo-msd",
                "sha256": {},
            }
        )
    (staging / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    labels = {name: int(v) for v, name in dataset["labels"].items()}
    (staging / "dataset.json").write_text(json.dumps({"labels": labels}, indent=2))
    return staging


def main(work: Path, budget_minutes: float | None = None) -> dict:
    demo = make_demo_dataset(work / "demo")
    staging = msd_to_staging(demo.msd_root, work / "staging")
    config = PipelineConfig()
    if budget_minutes is not None:
        config = config.replace(train={"time_budget_minutes": budget_minutes})
    start = time.perf_counter()
    reached: list[float] = []  # seconds from the start to the first validation at the gate's Dice

    class GateClock:
        def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
            if not reached and metrics.get("val_dice_mean", 0.0) >= GATE_DICE:
                reached.append(time.perf_counter() - start)

    result = train(staging, work / "run", config, callbacks=[GateClock()], resume=False)
    seconds = time.perf_counter() - start
    speeds = sorted(h["slices_per_s"] for h in result.history if "slices_per_s" in h)
    return {
        "val_dice_mean": round(result.best_dice_mean, 4),
        "val_dice": {k: round(v, 4) for k, v in result.best_dice.items()},
        "val_hd95_mm": {k: round(v, 2) for k, v in result.best_hd95.items()},
        "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run,
        "stopped_reason": result.stopped_reason,
        "train_seconds": round(seconds, 1),
        "median_train_slices_per_s": round(speeds[len(speeds) // 2], 1) if speeds else None,
        "seconds_to_gate_dice": round(reached[0], 1) if reached else None,
        "gate_passed": bool(reached) and reached[0] <= GATE_SECONDS,
    }


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("pipeline").setLevel(logging.INFO)
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("work", nargs="?", type=Path, default=None, help="work folder (default: a temp one)")
    parser.add_argument("--budget-minutes", type=float, default=None, help="override the time budget")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="demo-dice-"))
    print(json.dumps(main(work, args.budget_minutes)))
