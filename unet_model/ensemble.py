"""An ensemble of U-Nets of one configuration (the folds of a cross-validation), as one network.

The members' class probabilities are averaged, as nnU-Net averages its folds' softmax. The
ensemble returns the log of that mean (the log-sum-exp of the members' log-softmax minus
log K), so anything that takes the softmax of a network's output, or its argmax, gets the mean
probabilities from the ensemble as it gets one network's from a single U-Net.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from unet_model.config import UNetConfig
from unet_model.model import UNet


class UNetEnsemble(nn.Module):
    """K U-Nets of the same UNetConfig; the output is the log of their mean softmax."""

    def __init__(self, members: Sequence[UNet]) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member network; got none")
        first = members[0].config
        for i, member in enumerate(members):
            if member.config != first:
                raise ValueError(
                    f"ensemble member {i} has {member.config}, member 0 has {first}: the members of "
                    "an ensemble must share one UNetConfig"
                )
        self.members = nn.ModuleList(members)

    @property
    def config(self) -> UNetConfig:
        """The members' shared configuration (in and out channels, widths, depth)."""
        return self.members[0].config

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C_in, H, W) image -> (N, num_classes, H, W) float32 log of the members' mean softmax.

        Its softmax is the mean of the members' softmax (up to rounding) and its argmax that
        of the mean probability. The shape contract is each member's (`UNet.forward`).
        """
        # (K, N, num_classes, H, W): each member's log-probabilities, in float32 under autocast too
        log_probs = torch.stack([member(x).float().log_softmax(dim=1) for member in self.members])
        return torch.logsumexp(log_probs, dim=0) - math.log(len(self.members))  # (N, num_classes, H, W)
