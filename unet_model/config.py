"""The U-Net's configuration: one frozen dataclass, validated on construction."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

NORMS = ("batch", "instance", "none")


@dataclass(frozen=True)
class UNetConfig:
    """Hyper-parameters of the classic U-Net (Ronneberger et al., 2015), 2D."""

    in_channels: int = 1  # image channels (1 for CT/MR slices, more for multi-sequence input)
    num_classes: int = 2  # output logit channels, background included
    base_channels: int = 64  # width of the first level; level i has base * 2**i (64..1024 at depth 4)
    depth: int = 4  # number of 2x2 max-pool steps; inputs must be at least 2**depth on each side
    norm: str = "batch"  # normalization after each 3x3 convolution: batch | instance | none
    dropout: float = 0.0  # Dropout2d probability at the end of the contracting path (the paper's)

    def __post_init__(self) -> None:
        for name in ("in_channels", "num_classes", "base_channels", "depth"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"UNetConfig.{name} must be a positive integer, got {value!r}")
        if self.num_classes < 2:
            raise ValueError(
                f"UNetConfig.num_classes must be >= 2 (background plus at least one label), "
                f"got {self.num_classes!r}"
            )
        if self.norm not in NORMS:
            raise ValueError(f"UNetConfig.norm must be one of {', '.join(NORMS)}; got {self.norm!r}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"UNetConfig.dropout must be in [0, 1), got {self.dropout!r}")

    @property
    def min_size(self) -> int:
        """Smallest accepted height and width: one pixel left after `depth` halvings."""
        return 2**self.depth

    def widths(self) -> list[int]:
        """Channel width of each level, encoder top to bottleneck: base * 2**i."""
        return [self.base_channels * 2**i for i in range(self.depth + 1)]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UNetConfig:
        """Build from a mapping, rejecting unknown keys with the list of valid ones."""
        valid = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - valid)
        if unknown:
            raise ValueError(
                f"unknown UNetConfig key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(valid))}"
            )
        return cls(**data)
