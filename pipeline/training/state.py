"""What the training loop carries from epoch to epoch besides the weights, the optimizer and the
schedule (`LoopState`: all a resume needs of it), and the early-stopping rule it applies."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any


def patience_counts(epoch: int, epochs: int, start: float) -> bool:
    """Whether the validation of `epoch` (0-based) may add to patience: from `start` (a share of
    `epochs`, `train.early_stopping_start`) on, and not at the last epoch (the run ends there
    anyway: no early stop to record)."""
    return math.ceil(start * epochs) <= epoch + 1 < epochs


@dataclass
class LoopState:
    """What the loop carries from epoch to epoch besides the weights, the optimizer and the
    schedule: all a resume needs of it."""

    epoch: int = -1  # the last completed epoch; -1 before the first
    best_mean: float = -math.inf  # the best mean validation Dice so far
    best_epoch: int = -1  # its epoch; -1 while none validated
    best_metrics: dict[str, float] = field(default_factory=dict)  # the validation metrics of best_epoch
    stale: int = 0  # validations since the last one that improved by min_delta (early stopping)
    reference_mean: float = -math.inf  # the mean Dice that last reset `stale`
    history: list[dict[str, float]] = field(default_factory=list)  # per-epoch metrics
    stopped_reason: str = "completed"  # completed | early_stopping | time_budget

    _JSON = ("best_metrics", "history")  # stored as JSON text, as the checkpoint always held them

    def to_checkpoint(self) -> dict[str, Any]:
        """The checkpoint's loop-state entries (`checkpoint.Checkpoint.loop`)."""
        entries = asdict(self)
        for key in self._JSON:
            entries[key] = json.dumps(entries[key])
        return entries

    @classmethod
    def from_checkpoint(cls, entries: Mapping[str, Any]) -> LoopState:
        """The state `to_checkpoint` wrote."""
        return cls(
            epoch=int(entries["epoch"]),
            best_mean=float(entries["best_mean"]),
            best_epoch=int(entries["best_epoch"]),
            best_metrics=json.loads(entries["best_metrics"]),
            stale=int(entries["stale"]),
            # checkpoints written before min_delta existed: their best reset patience last
            reference_mean=float(entries.get("reference_mean", entries["best_mean"])),
            history=json.loads(entries["history"]),
            stopped_reason=str(entries["stopped_reason"]),
        )

    def finished(self, epochs: int) -> bool:
        """Whether the run has stopped, or has done its `epochs`."""
        return self.stopped_reason != "completed" or self.epoch + 1 >= epochs

    def record_validation(
        self,
        epoch: int,
        val: dict[str, float],
        patience: int | None,
        min_delta: float = 0.0,
        *,
        counts: bool = True,
    ) -> bool:
        """Whether `val` is the best so far (its weights are kept). Patience counts validations
        that did not beat the last reference by more than `min_delta`; after `patience` of them
        the run has converged and stops early. A validation with `counts` False (before
        `train.early_stopping_start` of the schedule) may reset the count but never adds to it."""
        mean = val["val_dice_mean"]
        if mean > self.reference_mean + min_delta:
            self.reference_mean, self.stale = mean, 0
        elif counts:
            self.stale += 1
            if patience and self.stale >= patience:
                self.stopped_reason = "early_stopping"
        if mean > self.best_mean:
            self.best_mean, self.best_epoch, self.best_metrics = mean, epoch, val
            return True
        return False
