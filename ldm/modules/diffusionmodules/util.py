"""Small neural-network helpers shared by the UNet and its attention blocks.

In here: the sinusoidal timestep embedding, ``GroupNorm32`` / ``normalization``, the ``conv_nd`` /
``linear`` / ``avg_pool_nd`` constructors, ``zero_module`` and ``checkpoint`` (activation checkpointing).
The names and call signatures are ldm's, so code written against
``ldm.modules.diffusionmodules.util`` keeps working.

The noise-schedule and DDIM helpers that ldm also keeps in this file live with the diffusion math in
``ldm.models.diffusion.schedule``; ``make_beta_schedule`` and ``make_ddim_timesteps`` are re-exported at the end
for old imports. ldm's custom ``CheckpointFunction`` is replaced by ``torch.utils.checkpoint``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import torch
import torch.utils.checkpoint
from torch import nn

ModuleT = TypeVar("ModuleT", bound=nn.Module)


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, ``[cos(t f_i), sin(t f_i)]``.

    ``f_i = max_period ** (-i / half)`` for ``i = 0 .. half - 1`` with ``half = dim // 2``.
    COMPAT: ldm puts the cosines first (the original Transformer and diffusers' default put sine first);
    pretrained ``time_embed`` weights depend on this order. An odd ``dim`` gets one trailing zero column.

    Args:
        timesteps: ``(N,)`` timesteps, integer or float (DPM-Solver passes fractional values).
        dim: Embedding width.
        max_period: Longest period of the sinusoids.

    Returns:
        ``(N, dim)`` float32 tensor.
    """
    half = dim // 2
    exponent = torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    freqs = torch.exp(-math.log(max_period) * exponent)  # (half,)
    args = timesteps[:, None].float() * freqs[None]  # (N, half)
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (N, 2 * half)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)  # (N, dim)
    return embedding


def zero_module(module: ModuleT) -> ModuleT:
    """Zero every parameter of ``module`` in place and return it (residual branches start as identity)."""
    for p in module.parameters():
        p.detach().zero_()
    return module


class GroupNorm32(nn.GroupNorm):
    """GroupNorm evaluated in float32 and cast back, so fp16/bf16 activations get fp32 statistics."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type(x.dtype)


def normalization(channels: int) -> GroupNorm32:
    """The UNet's norm layer: 32 groups, torch's default eps 1e-5, affine."""
    return GroupNorm32(32, channels)


def conv_nd(dims: int, *args: Any, **kwargs: Any) -> nn.Module:
    """``nn.Conv1d`` / ``Conv2d`` / ``Conv3d`` for ``dims`` = 1 / 2 / 3."""
    convs = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
    if dims not in convs:
        raise ValueError(f"dims must be 1, 2 or 3, got {dims}")
    return convs[dims](*args, **kwargs)


def linear(*args: Any, **kwargs: Any) -> nn.Linear:
    """``nn.Linear`` (kept as a function for ldm import compatibility)."""
    return nn.Linear(*args, **kwargs)


def avg_pool_nd(dims: int, *args: Any, **kwargs: Any) -> nn.Module:
    """``nn.AvgPool1d`` / ``AvgPool2d`` / ``AvgPool3d`` for ``dims`` = 1 / 2 / 3."""
    pools = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}
    if dims not in pools:
        raise ValueError(f"dims must be 1, 2 or 3, got {dims}")
    return pools[dims](*args, **kwargs)


def checkpoint(func: Callable[..., Any], inputs: Sequence[Any], params: Iterable[nn.Parameter], flag: bool) -> Any:
    """Call ``func(*inputs)``, recomputing its activations in the backward pass when ``flag`` is set.

    Checkpointing only happens while autograd records (``torch.is_grad_enabled()``); under ``no_grad``
    there is nothing to save, so ``func`` is called directly. Uses the non-reentrant
    ``torch.utils.checkpoint`` implementation, which restores the RNG state for the recomputation (dropout
    masks match) and finds the parameters by itself.

    Args:
        func: The function to run.
        inputs: Positional arguments for ``func``.
        params: COMPAT: ldm's custom checkpoint needed the parameters listed explicitly; accepted so the ldm
            call signature still works, and not needed by ``torch.utils.checkpoint``.
        flag: Whether to checkpoint at all.
    """
    del params  # see the docstring: torch.utils.checkpoint tracks parameters itself
    if flag and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(func, *inputs, use_reentrant=False)
    return func(*inputs)


# ---- COMPAT: old import paths of the schedule helpers (the implementations live in the pure schedule module)
from ldm.models.diffusion.schedule import ddim_timesteps as _ddim_timesteps  # noqa: E402
from ldm.models.diffusion.schedule import make_beta_schedule  # noqa: E402, F401


def make_ddim_timesteps(ddim_discr_method: str, num_ddim_timesteps: int, num_ddpm_timesteps: int,
                        verbose: bool = False):  # noqa: ARG001 - ldm printed the steps when verbose
    """ldm's signature for :func:`ldm.models.diffusion.schedule.ddim_timesteps` (same values, +1 offset)."""
    return _ddim_timesteps(num_ddim_timesteps, num_ddpm_timesteps, ddim_discr_method)
