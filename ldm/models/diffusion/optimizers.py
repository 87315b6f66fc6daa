"""The optimizer and LR schedule of a training run: AdamW (ZeRO-1 sharded on multi-process runs when asked)
and an optional per-step multiplier schedule (docs/DECISIONS.md D2).

Kept out of the Lightning module so the choice of kernel and sharding reads in one place;
``LatentDiffusion.configure_optimizers`` calls :func:`build` with its own hyper-parameters.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch

from ldm.util import instantiate_from_config

log = logging.getLogger(__name__)


def adamw_kernel(params: list[torch.nn.Parameter]) -> dict[str, bool]:
    """``{"fused": True}`` where torch has a fused AdamW for these parameters (CUDA; CPU since torch 2.4, there
    1.9x the per-tensor loop: docs/BENCHMARKS.md), else ``{}``, torch's default (foreach is slowest on CPUs)."""
    try:
        torch.optim.AdamW(params, fused=True)  # the constructor checks the devices and dtypes
    except (RuntimeError, ValueError):
        return {}
    return {"fused": True}


def build(params: list[torch.nn.Parameter], *, lr: float, betas: tuple[float, float], eps: float,
          weight_decay: float, shard_state: bool, scheduler_config: Mapping[str, Any] | None) -> Any:
    """AdamW over ``params`` and, with ``scheduler_config``, a ``LambdaLR`` stepped every optimizer step.

    Returns what Lightning's ``configure_optimizers`` may return: the optimizer alone, or
    ``([optimizer], [scheduler dict])``. ``shard_state`` shards the AdamW moments across the ranks of an
    initialised process group of more than one process (ZeRO-1) and is a no-op otherwise.
    """
    hyper = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **adamw_kernel(params))
    dist = torch.distributed
    if shard_state and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        from torch.distributed.optim import ZeroRedundancyOptimizer

        # ZeRO-1: each rank holds the AdamW moments of 1/world of the parameters (~7 GB of fp32 state for
        # the SD2 UNet, divided by the world size); Lightning consolidates it on rank 0 for checkpoints.
        opt = ZeroRedundancyOptimizer(params, optimizer_class=torch.optim.AdamW, **hyper)
    else:
        opt = torch.optim.AdamW(params, **hyper)
    if scheduler_config is None:
        return opt
    multiplier = instantiate_from_config(scheduler_config)
    log.info("LR schedule: %s (multiplier on lr %.3e, stepped every optimizer step)", scheduler_config["target"], lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda=multiplier.schedule)
    return [opt], [{"scheduler": sched, "interval": "step", "frequency": 1}]
