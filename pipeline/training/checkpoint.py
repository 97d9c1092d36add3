"""The training checkpoints, written and read in this one module.

`checkpoints/last.pt` is what a resume needs: the state dicts of the network, the optimizer and the
schedule, the random number generators' states, the run's fixed inputs (config, plan, split) and
the loop's state (`LoopState.to_checkpoint()`, stored flat beside the rest) and, under
train.ema_decay, the weights' moving average. `checkpoints/best.pt` holds the best weights of the
classic U-Net (no deep supervision heads; the average's under train.ema_decay) and their epoch.
Both load with `torch.load(weights_only=True)`: tensors and plain types only, so the config, plan
and split are stored as JSON text.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.io.atomic import atomic_path

CHECKPOINT_DIR = "checkpoints"
LAST, BEST = "last.pt", "best.pt"


@dataclass
class Checkpoint:
    """What last.pt holds. The field names (but `loop`) and the loop state's keys are its keys."""

    model: dict[
        str, Any
    ]  # the trained network's (never DDP's or torch.compile's); deep supervision's heads too
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rng: dict[str, Any]  # `rng_state()`
    config: dict[str, Any]  # PipelineConfig.to_dict(): a resume trains with this config
    plan: dict[str, Any]  # Plan.to_dict()
    split: dict[str, list[str]]  # {"train": [...], "val": [...]}
    loop: dict[str, Any]  # `LoopState.to_checkpoint()`
    # `WeightAverage.state_dict()` under train.ema_decay; absent in runs without it (and before it)
    average: dict[str, Any] | None = None

    @property
    def epoch(self) -> int:
        """The last completed epoch."""
        return int(self.loop["epoch"])


_OPTIONAL_KEYS = ("average",)
_KEYS = tuple(f.name for f in fields(Checkpoint) if f.name not in ("loop", *_OPTIONAL_KEYS))
_JSON_KEYS = ("config", "plan", "split")


def save_checkpoint(path: Path, checkpoint: Checkpoint) -> None:
    """Write last.pt atomically (a crash mid-write leaves the previous one)."""
    clash = set(checkpoint.loop) & {*_KEYS, *_OPTIONAL_KEYS}
    if clash:
        raise ValueError(f"loop state keys {sorted(clash)} collide with the checkpoint's own keys")
    state = dict(checkpoint.loop)
    for key in _KEYS:
        value = getattr(checkpoint, key)
        state[key] = json.dumps(value) if key in _JSON_KEYS else value
    for key in _OPTIONAL_KEYS:
        if getattr(checkpoint, key) is not None:
            state[key] = getattr(checkpoint, key)
    _save(path, state)


def load_checkpoint(path: Path) -> Checkpoint:
    """Read last.pt; what is not one of the checkpoint's own keys is the loop state."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    missing = [key for key in _KEYS if key not in state]
    if missing:
        raise ValueError(
            f"{path} is not a training checkpoint of this version: it lacks {', '.join(missing)}. "
            "Delete it to train that run from the start."
        )
    values = {key: state.pop(key) for key in _KEYS}
    values |= {key: state.pop(key, None) for key in _OPTIONAL_KEYS}
    for key in _JSON_KEYS:
        values[key] = json.loads(values[key])
    return Checkpoint(**values, loop=state)


def save_best(path: Path, model_state: dict[str, Any], epoch: int) -> None:
    """Write best.pt: the best weights so far and their epoch."""
    _save(path, {"model": model_state, "epoch": epoch})


def load_best(path: Path) -> dict[str, Any]:
    """The weights in best.pt."""
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def _save(path: Path, state: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def rng_state() -> dict[str, Any]:
    """The states of Python's, NumPy's and torch's generators (NumPy's key as a tensor)."""
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` returned."""
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy(), *n[2:]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
