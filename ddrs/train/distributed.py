"""Distributed data parallel training under torchrun (NCCL on GPUs, Gloo on CPU)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    comm_device: str = "cpu"  # where collective tensors must live (cuda for NCCL)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> DistInfo:
    """Join the process group that torchrun describes in the environment (no-op otherwise)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    comm_device = f"cuda:{local_rank}" if backend == "nccl" else "cpu"
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, comm_device)


def shutdown(info: DistInfo, finished: bool = False) -> None:
    """Leave the process group. After a finished run, all ranks leave together: rank 0
    evaluates and saves after the last collective, and a rank that tore its connections down
    meanwhile could abort at exit. After an error, no barrier (the others may never come)."""
    if info.enabled and dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()


def merge_sigma_buffer(buffer: torch.Tensor, updated: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Make every rank hold the same per-sample sigmas after an epoch.

    Each rank updated the indices it saw (`updated` mask). An index seen by several ranks
    (DistributedSampler pads the last batch with repeats) takes the value of the lowest rank
    that updated it, so each index has exactly one writer per epoch.
    """
    if not info.enabled:
        return buffer
    owner = torch.where(updated, info.rank, info.world_size).to(info.comm_device, torch.int64)
    dist.all_reduce(owner, op=dist.ReduceOp.MIN)
    owner = owner.cpu()
    contribution = torch.where(owner == info.rank, buffer, torch.zeros_like(buffer))
    contribution = contribution.to(info.comm_device, torch.float64)
    dist.all_reduce(contribution, op=dist.ReduceOp.SUM)
    return torch.where(owner < info.world_size, contribution.cpu().to(buffer.dtype), buffer)


def all_reduce_sum(values: list[float], info: DistInfo) -> list[float]:
    if not info.enabled:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=info.comm_device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.cpu().tolist()
