"""The plan's network width and batch size, chosen from the data and the device, with reasons.

nnU-Net plans its network and batch size with the preprocessing; so does `plan_network`, after
`make_plan` has fixed the patch size:

- base width: on a CUDA GPU the seed's 64 base channels when a batch of at least
  `MIN_GPU_BATCH` patches fits in `GPU_MEMORY_SHARE` of its memory (else 32, else 16); on CPU 16,
  a quarter of the seed's width and about a sixteenth of its convolution work per slice, which is
  what a CPU's minutes allow;
- batch size: on a GPU as many patches as fit in that share of memory, by the activation estimate
  below; on CPU 8 (small batches give more optimizer updates per CPU minute); either way at most
  `MAX_BATCH_SHARE` of the dataset's slices (nnU-Net's cap) and a multiple of
  `train.slices_per_volume`;
- a value set in the config (`model.base_channels`, `train.batch_size`) wins: explicit beats
  automatic, and the reason says so and what the plan would have chosen.

Every choice is written into `Plan.reasons`, which is saved in plan.json and logged beside the
weights.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING

import torch

from pipeline.planning.plan import Plan
from pipeline.runtime import describe_device, resolve_precision
from unet_model import UNetConfig

if TYPE_CHECKING:
    from pipeline.config import ModelConfig, PipelineConfig

log = logging.getLogger(__name__)

SEED_BASE_CHANNELS = 64  # the classic U-Net's width (Ronneberger et al.), the GPU's first choice
CPU_BASE_CHANNELS = 16
CPU_BATCH = 8
MIN_GPU_BATCH = 8  # a width is chosen on a GPU only when this many patches fit
MAX_GPU_BATCH = 64  # beyond this, more slices per step stop paying on 2D patches
GPU_MEMORY_SHARE = 0.5  # of the GPU's memory for activations: the rest for weights, cuDNN, the cache
MAX_BATCH_SHARE = 0.05  # a batch covers at most this share of the dataset's slices (nnU-Net)
# Feature maps a training step keeps per level and width, counted on the parts: the encoder's
# double conv keeps 6 (conv, norm, ReLU twice), the decoder's up-step 9 (transposed conv, the
# concatenation's two halves, its double conv's 6), and the backward pass holds about as much again
# in gradients: 2 x (6 + 9) = 30.
MAPS_PER_LEVEL = 30


def unet_config(plan: Plan, model: ModelConfig) -> UNetConfig:
    """The network a run trains: the plan's context slices as input channels, its classes and width,
    the config's depth, norm and dropout."""
    return UNetConfig(
        in_channels=plan.context_slices,
        num_classes=plan.num_classes,
        base_channels=plan.base_channels,
        depth=model.depth,
        norm=model.norm,
        dropout=model.dropout,
    )


def activation_bytes(base: int, depth: int, patch: int, bytes_per_value: int) -> int:
    """Estimated activation memory of one (patch x patch) slice in a training step."""
    total = 0.0
    for i in range(depth + 1):
        side = patch / 2**i
        maps = MAPS_PER_LEVEL if i < depth else MAPS_PER_LEVEL // 2  # the bottleneck has no decoder step
        total += maps * base * 2**i * side * side
    return int(total * bytes_per_value)


def _data_cap(plan: Plan, slices_per_volume: int) -> tuple[int, str]:
    """The largest batch the dataset warrants: MAX_BATCH_SHARE of its slices."""
    summary = plan.fingerprint_summary
    slices = int(summary.get("cases", 0)) * int(summary.get("median_slices", 0))
    if not slices:
        return MAX_GPU_BATCH, ""
    cap = max(slices_per_volume, int(MAX_BATCH_SHARE * slices))
    return cap, f"at most {MAX_BATCH_SHARE:.0%} of the dataset's ~{slices} slices ({cap})"


def _round_batch(batch: int, slices_per_volume: int) -> int:
    """Down to a multiple of `slices_per_volume`, at least one volume's slices."""
    return max(slices_per_volume, batch // slices_per_volume * slices_per_volume)


def _automatic(plan: Plan, config: PipelineConfig, device: torch.device) -> tuple[int, str, int, str]:
    """(base, why, batch, why) as the plan would choose them, before the config's overrides."""
    mc, tc = config.model, config.train
    cap, cap_why = _data_cap(plan, tc.slices_per_volume)
    if device.type != "cuda":
        batch = _round_batch(min(CPU_BATCH, cap), tc.slices_per_volume)
        return (
            CPU_BASE_CHANNELS,
            f"CPU: {CPU_BASE_CHANNELS}, a quarter of the seed's {SEED_BASE_CHANNELS} (about 1/16 of its "
            "convolution work per slice), what a CPU's training minutes allow",
            batch,
            f"CPU: {CPU_BATCH} slices (small batches give more updates per CPU minute)"
            + (f", {cap_why}" if cap < CPU_BATCH else ""),
        )
    info = describe_device(device)
    memory = (info.memory_gib or 0.0) * 2**30 * GPU_MEMORY_SHARE
    bytes_per_value = 4 if resolve_precision(tc.precision, device) is None else 2
    where = f"CUDA {info.name} with {info.memory_gib:.0f} GiB"
    base, per_slice, fits = CPU_BASE_CHANNELS, 0, 0
    for base in (SEED_BASE_CHANNELS, 32, CPU_BASE_CHANNELS):
        per_slice = activation_bytes(base, mc.depth, plan.patch_size, bytes_per_value)
        fits = int(memory // per_slice)
        if fits >= MIN_GPU_BATCH:
            break
    batch = _round_batch(min(fits, MAX_GPU_BATCH, cap), tc.slices_per_volume)
    memory_why = (
        f"~{per_slice / 2**20:.0f} MiB of activations per {plan.patch_size}x{plan.patch_size} slice, "
        f"{fits} fit in {GPU_MEMORY_SHARE:.0%} of the memory"
    )
    base_why = (
        f"{where}: the seed's {base} base channels fit a batch of {MIN_GPU_BATCH}+ ({memory_why})"
        if base == SEED_BASE_CHANNELS
        else f"{where}: {base}, the widest that fits a batch of {MIN_GPU_BATCH} ({memory_why})"
        if fits >= MIN_GPU_BATCH
        else f"{where}: {base}, the narrowest planned; not even it fits {MIN_GPU_BATCH} ({memory_why})"
    )
    limits = [memory_why, f"at most {MAX_GPU_BATCH}"] + ([cap_why] if cap_why else [])
    return base, base_why, batch, f"{where}: {batch} slices (" + "; ".join(limits) + ")"


def plan_network(plan: Plan, config: PipelineConfig, device: torch.device) -> Plan:
    """`plan` with its base width, batch size and their reasons decided for `device`.

    The config's `model.base_channels` and `train.batch_size` win when set.
    """
    base, base_why, batch, batch_why = _automatic(plan, config, device)
    mc, tc = config.model, config.train
    if mc.base_channels is not None:
        base, base_why = mc.base_channels, _explicit("model.base_channels", base, base_why)
    if tc.batch_size is not None:
        batch, batch_why = tc.batch_size, _explicit("train.batch_size", batch, batch_why)
    reasons = {**plan.reasons, "base_channels": base_why, "batch_size": batch_why}
    planned = dataclasses.replace(plan, base_channels=base, batch_size=batch, reasons=reasons)
    log.info("plan: base channels %d (%s); batch %d (%s)", base, base_why, batch, batch_why)
    return planned


def _explicit(field: str, automatic: int, why: str) -> str:
    return f"{field} set in the config (explicit beats automatic; the plan would choose {automatic}: {why})"
