"""torch.distributed for training: the caller's process group, or one started from torchrun's.

Launch with `torchrun --nproc_per_node N -m pipeline.cli train ...`: `process_group` then starts a
group from the environment (NCCL on CUDA, gloo on CPU) and destroys it when training ends, however
it ends. A group the caller initialised before `train` is used as is and left to the caller.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    """This process's place in the process group (rank 0 of 1 without one)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # we initialised it, so we destroy it

    @property
    def enabled(self) -> bool:
        return self.world_size > 1 or dist.is_initialized()

    @property
    def main(self) -> bool:
        return self.rank == 0

    def any_rank(self, flag: bool, device: torch.device) -> bool:
        """True when `flag` is true on any rank: all ranks must take the same stopping decision,
        or DDP's next all-reduce would hang."""
        if not self.enabled:
            return flag
        tensor = torch.tensor([float(flag)], device=device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return bool(tensor.item())


def init_distributed(device_request: str) -> DistContext:
    """Use the caller's process group, or start one from torchrun's environment variables."""
    if dist.is_available() and dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_request != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, owns_group=True)


@contextmanager
def process_group(device_request: str) -> Iterator[DistContext]:
    """`init_distributed` for the length of a `with` block; a group it started is destroyed at
    the end of the block, on success and on failure alike."""
    ctx = init_distributed(device_request)
    try:
        yield ctx
    finally:
        if ctx.owns_group and dist.is_initialized():
            dist.destroy_process_group()
