"""Splitting an evaluation across processes (``torchrun --nproc-per-node=K``) and gathering its results exactly.

Image ``i`` belongs to rank ``i % world``. Each rank samples and scores its own images; per-image results
(metrics and feature vectors) are gathered with ``all_gather_object`` and put back in image order, so every
mean and every FID is computed from the same numbers in the same order as in a single-process run.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Shard:
    """This process's place in the evaluation.

    Args:
        rank: global rank (0 in a single-process run).
        world: number of processes.
        device: the device this process samples and scores on.
    """

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def indices(self, n: int) -> range:
        """The image indices of this rank among ``n`` images."""
        return range(self.rank, n, self.world)

    def gather(self, items: list[tuple[int, Any]]) -> list[Any]:
        """All ranks' ``(index, value)`` pairs -> the values in index order (on every rank)."""
        parts: list[list[tuple[int, Any]]] = [items]
        if self.world > 1:
            parts = [[] for _ in range(self.world)]
            dist.all_gather_object(parts, items)
        return [value for _, value in sorted((pair for part in parts for pair in part), key=lambda p: p[0])]

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def init_shard(device: str = "auto") -> Shard:
    """Join the process group that ``torchrun`` describes (``WORLD_SIZE`` > 1), else a single-process shard.

    CUDA ranks use NCCL on ``cuda:LOCAL_RANK``; CPU ranks (``--device cpu`` or no GPU) use gloo.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if world == 1:
        return Shard(0, 1, torch.device(("cuda" if use_cuda else "cpu") if device == "auto" else device))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    shard = Shard(dist.get_rank(), dist.get_world_size(), torch.device(f"cuda:{local}" if use_cuda else "cpu"))
    if shard.is_main:
        log.info("evaluating on %d processes (%s)", shard.world, dist.get_backend())
    return shard


def close_shard(shard: Shard) -> None:
    if shard.world > 1 and dist.is_initialized():
        dist.destroy_process_group()
