"""Collectives the training loop and its terms use across Ray Train workers; each is the value itself
when there is no process group or only one worker (a local run, a test)."""

from __future__ import annotations

from typing import Any

import torch


def _several_workers() -> bool:
    return torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """`value` summed over the workers, in place."""
    if _several_workers():
        torch.distributed.all_reduce(value)
    return value


def all_gather(value: Any) -> list[Any]:
    """`value` of every worker, in rank order."""
    if not _several_workers():
        return [value]
    values = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(values, value)
    return values


def from_rank_zero(value: Any) -> Any:
    """Rank 0's `value` on every worker (what only rank 0 computed or read: the others pass None)."""
    if not _several_workers():
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]
