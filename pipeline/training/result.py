"""What a training run leaves in its folder: result.json, the curves, the model folder."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from torch import nn

from pipeline.config import PipelineConfig
from pipeline.io.atomic import atomic_path, write_text
from pipeline.io.model_dir import save_model_dir
from pipeline.planning.plan import Plan

MODEL_DIR = "model"
CURVES_FILE = "training_curves.png"
RESULT_FILE = "result.json"
VAL_QC_DIR = "validation_qc"  # <case_id>.png per drawn validation case (validate.write_validation_qc)


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
    # Cross-validation only: per fold {"fold", "val", "best_dice_mean", "best_epoch",
    # "stopped_reason", "epochs_run", "out_dir"}; the scores above are then out-of-fold means.
    folds: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["out_dir"] = str(self.out_dir)
        data["model_dir"] = str(self.model_dir) if self.model_dir else None
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainResult:
        """The result `to_json` wrote (result.json)."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["out_dir"] = Path(data["out_dir"])
        values["model_dir"] = Path(data["model_dir"]) if data.get("model_dir") else None
        return cls(**values)


def write_result(result: TrainResult) -> Path:
    """`result.json` in the run's folder (the champion gate reads the split and score there)."""
    path = result.out_dir / RESULT_FILE
    write_text(path, json.dumps(result.to_json(), indent=2, default=float) + "\n")
    return path


def read_result(run_dir: str | Path) -> dict[str, Any]:
    """The `result.json` of a finished training folder, as `TrainResult.to_json` wrote it."""
    return json.loads((Path(run_dir) / RESULT_FILE).read_text(encoding="utf-8"))


def plot_training_curves(history: Sequence[dict[str, float]], path: str | Path) -> Path:
    """PNG of training loss and mean validation Dice per epoch (matplotlib, Agg backend)."""
    import matplotlib  # lazy: pyplot is slow to import, and only the end of a run draws

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


def write_model_dir(
    model: nn.Module,
    out_dir: Path,
    plan: Plan,
    config: PipelineConfig,
    validation: dict[str, float],
    fold_val_cases: list[list[str]] | None = None,
) -> Path:
    """The model folder: weights, plan, config, label names and the validation scores (and for a
    fold ensemble, each fold's validation cases)."""
    names = {v: plan.label_names.get(v, f"label_{v}") for v in range(plan.num_classes)}
    return save_model_dir(
        model,
        out_dir,
        plan=plan.to_dict(),
        config=config.to_dict(),
        label_names=names,
        validation={k: v for k, v in validation.items() if isinstance(v, int | float) and math.isfinite(v)},
        fold_val_cases=fold_val_cases,
    )
