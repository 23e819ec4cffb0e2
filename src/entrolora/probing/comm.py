"""What the probe and its centroid head share under ``torch.distributed``: batches moved to the
model's device, this process's rank, sums over processes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


def to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` (a tensor, or mappings and sequences of them) on ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def rank_world() -> tuple[int, int]:
    """``(rank, world size)`` under ``torch.distributed``; ``(0, 1)`` without it."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_sum(t: torch.Tensor) -> None:
    """In-place SUM over processes; NCCL needs CUDA tensors, so host tensors take a round trip."""
    import torch.distributed as dist

    if t.device.type == "cpu" and dist.get_backend() == "nccl":
        tmp = t.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(tmp)
        t.copy_(tmp)
    else:
        dist.all_reduce(t)
