"""An exponential moving average of the classic U-Net's weights, for validation and export.

Late in a run the learning rate is small, yet validation Dice still moves by a few hundredths from
one validation to the next: each optimizer step nudges the weights, and batch norm's running
statistics follow the last few batches (momentum 0.1: about ten batches of eight slices). The
average of the weights and of those statistics over the last stretch of the run is a steadier
model than the weights of any one step (Polyak averaging; timm and YOLO train with it).

The n-th update (n = 1, 2, ...) uses the decay min(`decay`, (1 + n) / (10 + n)): early in a run
the average follows the weights closely (the first steps' weights are no use to average), and it
reaches `decay` only after about 9 / (1 - decay) steps, so in a run shorter than that it averages
roughly the last ninth of the run whatever its length (the default 0.999 is reached after 9,000
steps: the default 120 epochs of 25 steps end at about 0.997). Integer buffers (batch norm's batch
count) are copied.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


class WeightAverage:
    """The moving average of `model`'s floating-point state (parameters and buffers)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"the average's decay must lie in (0, 1); got {decay}")
        self.decay = decay
        self.updates = 0
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    def current_decay(self) -> float:
        """The decay the next update uses."""
        n = self.updates + 1
        return min(self.decay, (1.0 + n) / (10.0 + n))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average towards `model`'s present state (a model of the same architecture)."""
        weight = 1.0 - self.current_decay()
        averaged, current = [], []
        for (name, mine), (their_name, theirs) in zip(
            self.model.state_dict().items(), model.state_dict().items(), strict=True
        ):
            if name != their_name or mine.shape != theirs.shape:
                raise ValueError(
                    f"the averaged model's {name} {tuple(mine.shape)} does not match the model's "
                    f"{their_name} {tuple(theirs.shape)}"
                )
            if mine.is_floating_point():
                averaged.append(mine)
                current.append(theirs.detach().to(mine.dtype))
            else:
                mine.copy_(theirs)
        if averaged:
            torch._foreach_lerp_(averaged, current, weight)
        self.updates += 1

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps of the average (the weights and the number of updates)."""
        return {"model": self.model.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""
        self.model.load_state_dict(state["model"])
        self.updates = int(state["updates"])
