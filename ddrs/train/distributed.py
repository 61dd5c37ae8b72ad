"""Distributed data parallel training under torchrun: what the ranks exchange (the per-sample
sigmas, the epoch's sums). Joining and leaving the process group is `ddrs.launch`'s."""

from __future__ import annotations

import torch
import torch.distributed as dist

from ddrs.launch import Rank


def merge_sigma_buffer(buffer: torch.Tensor, updated: torch.Tensor, info: Rank) -> torch.Tensor:
    """Make every rank hold the same per-sample sigmas after an epoch.

    Each rank updated the indices it saw (`updated` mask). An index seen by several ranks
    (DistributedSampler pads the last batch with repeats) takes the value of the lowest rank
    that updated it, so each index has exactly one writer per epoch.
    """
    if not info.enabled:
        return buffer
    owner = torch.where(updated, info.rank, info.world).to(info.comm_device, torch.int64)
    dist.all_reduce(owner, op=dist.ReduceOp.MIN)
    owner = owner.cpu()
    contribution = torch.where(owner == info.rank, buffer, torch.zeros_like(buffer))
    contribution = contribution.to(info.comm_device, torch.float64)
    dist.all_reduce(contribution, op=dist.ReduceOp.SUM)
    return torch.where(owner < info.world, contribution.cpu().to(buffer.dtype), buffer)


def all_reduce_sum(values: list[float], info: Rank) -> list[float]:
    if not info.enabled:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=info.comm_device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.cpu().tolist()
