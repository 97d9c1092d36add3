"""Where computation runs: device choice, CPU threading and the fastest safe defaults.

Every code path that runs the network (training, validation, inference, benchmarks) goes
through `prepare_model` and `autocast`, so the best settings are the defaults everywhere.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.system import available_cores

log = logging.getLogger(__name__)

DEVICE_CHOICES = ("auto", "cpu", "cuda")
PRECISION_CHOICES = ("auto", "fp32", "bf16", "fp16")


@dataclass(frozen=True)
class DeviceInfo:
    """What `doctor` reports about the compute device."""

    kind: str  # "cuda" or "cpu"
    name: str  # GPU name, or the CPU description
    memory_gib: float | None  # GPU memory; None on CPU
    threads: int  # torch intra-op threads (CPU) or 0


def resolve_device(requested: str = "auto") -> torch.device:
    """'auto' picks CUDA when present, else CPU; 'cuda' without a GPU is an error."""
    if requested not in DEVICE_CHOICES:
        raise ValueError(f"device must be one of {', '.join(DEVICE_CHOICES)}; got {requested!r}")
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError(
                "device 'cuda' was requested but torch sees no CUDA GPU; install the CUDA build of "
                "torch (see README) or use --device cpu"
            )
        return torch.device("cuda")
    return torch.device("cpu")


def describe_device(device: torch.device) -> DeviceInfo:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return DeviceInfo("cuda", props.name, props.total_memory / 2**30, 0)
    return DeviceInfo("cpu", _cpu_name(), None, torch.get_num_threads())


def _cpu_name() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as fh:
        for line in fh:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "CPU"


def configure_threads() -> int:
    """Use every core the process may run on (affinity-aware), unless the user set OMP_NUM_THREADS."""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(available_cores())
    return torch.get_num_threads()


def resolve_precision(requested: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32.

    'auto' is bf16 on CUDA GPUs that support it and fp32 on CPU: on CPUs without native bf16
    units (AVX512-BF16/AMX) bf16 autocast is slower than fp32, so it is opt-in there.
    """
    if requested not in PRECISION_CHOICES:
        raise ValueError(f"precision must be one of {', '.join(PRECISION_CHOICES)}; got {requested!r}")
    if requested == "fp32":
        return None
    if requested == "bf16":
        return torch.bfloat16
    if requested == "fp16":
        if device.type != "cuda":
            raise ValueError("precision 'fp16' needs a CUDA device; use 'bf16' or 'fp32' on CPU")
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return None


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    """Mixed precision when `dtype` is set, a no-op otherwise."""
    if dtype is None:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield


def training_channels_last(setting: str | bool, device: torch.device) -> bool:
    """Memory layout for training: 'auto' is channels_last on CUDA and on AVX-512 CPUs, else NCHW.

    oneDNN's channels_last convolution backward is fast with AVX-512 (a base-32 training step at
    0.57 of the GEMM peak against 0.42 in NCHW on the project's EPYC) but 3.5-8x slower than its
    forward on AVX2-only CPUs, where NCHW trains faster (bench/model.py --layout measured both).
    Inference always uses channels_last.
    """
    if setting == "auto":
        return device.type == "cuda" or torch.backends.cpu.get_cpu_capability().startswith("AVX512")
    return bool(setting)


def prepare_model(model: nn.Module, device: torch.device, channels_last: bool = True) -> nn.Module:
    """Move to `device` in channels_last layout (oneDNN on CPU and cuDNN on GPU run it fastest)."""
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def to_input(batch: torch.Tensor, device: torch.device, channels_last: bool = True) -> torch.Tensor:
    """Move an (N, C, H, W) batch to `device` in the layout `prepare_model` chose."""
    batch = batch.to(device, non_blocking=True)
    if channels_last:
        batch = batch.contiguous(memory_format=torch.channels_last)
    return batch
