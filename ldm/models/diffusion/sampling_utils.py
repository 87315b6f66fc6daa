"""Plumbing every sampler shares: device and noise, input checks, the eta rule and ldm's per-step trace.

Nothing here is an algorithm. The samplers themselves are pure functions in :mod:`~ldm.models.diffusion.ddim`
and :mod:`~ldm.models.diffusion.dpm_solver`, reached by name through :mod:`~ldm.models.diffusion.sampling`;
the ldm-compatible ``DDIMSampler`` / ``DPMSolverSampler`` adapters use the same pieces.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

StepCallback = Callable[[int, torch.Tensor, torch.Tensor], None]  # (step index, x after the step, x0 used)


def model_device(model: Any) -> torch.device:
    """The device of a duck-typed model: its ``device`` attribute, else its first parameter's."""
    device = getattr(model, "device", None)
    return torch.device(device) if device is not None else next(model.parameters()).device


def randn(shape: Sequence[int], device: torch.device, generator: torch.Generator | None,
          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal noise drawn on the generator's device (so a CPU generator works for a GPU model)."""
    src = generator.device if generator is not None else device
    return torch.randn(tuple(shape), generator=generator, device=src, dtype=dtype).to(device)


def initial_noise(size: tuple[int, ...], x_T: torch.Tensor | None, device: torch.device,
                  generator: torch.Generator | None) -> torch.Tensor:
    """``x_T`` as given (shape-checked) or fresh N(0, I) noise of ``size``."""
    if x_T is None:
        return randn(size, device, generator)
    if tuple(x_T.shape) != size:
        raise ValueError(f"x_T has shape {tuple(x_T.shape)}, expected (batch_size, *shape) = {size}")
    return x_T


def check_conditioning_batch(conditioning: Any, batch_size: int) -> None:
    """Raise if a conditioning tensor's batch differs from ``batch_size`` (ldm only printed a warning)."""
    leaves = [conditioning]
    while leaves:
        c = leaves.pop()
        if isinstance(c, torch.Tensor) and c.shape[0] != batch_size:
            raise ValueError(f"conditioning has batch {c.shape[0]} but batch_size is {batch_size}")
        if isinstance(c, Mapping):
            leaves.extend(c.values())
        elif isinstance(c, (list, tuple)):
            leaves.extend(c)


def check_eta(sampler: str, eta: float, stochastic: bool) -> None:
    """The eta rule, for every sampler: eta is in [0, 1] (0 = deterministic, 1 = DDPM-like noise), and a
    deterministic ODE solver (``stochastic=False``) only accepts 0 rather than silently ignoring it."""
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"{sampler}: eta={eta} is outside [0, 1] (0: deterministic, 1: DDPM-like)")
    if eta != 0.0 and not stochastic:
        raise ValueError(f"{sampler}: eta={eta} is not supported: the solver is deterministic, so eta must be 0 "
                         "(use the ddim sampler for eta > 0)")


class SamplingTrace:
    """ldm's per-step hooks: ``callback(i)``, ``img_callback(pred_x0, i)``, and the ``intermediates`` dict
    (``x_inter`` / ``pred_x0``: x_T first, then every ``log_every_t`` steps counted from the end, and step 0)."""

    def __init__(self, x_T: torch.Tensor, total_steps: int, log_every_t: int = 100,
                 callback: Callable[[int], None] | None = None,
                 img_callback: Callable[[torch.Tensor, int], None] | None = None) -> None:
        if log_every_t < 1:
            raise ValueError(f"log_every_t must be >= 1, got {log_every_t}")
        self.total_steps, self.log_every_t = total_steps, log_every_t
        self.callback, self.img_callback = callback, img_callback
        self.intermediates: dict[str, list[torch.Tensor]] = {"x_inter": [x_T], "pred_x0": [x_T]}

    def __call__(self, i: int, x: torch.Tensor, pred_x0: torch.Tensor) -> None:
        if self.callback is not None:
            self.callback(i)
        if self.img_callback is not None:
            self.img_callback(pred_x0, i)
        index = self.total_steps - i - 1  # ldm counts the logging index down to 0
        if index % self.log_every_t == 0 or index == self.total_steps - 1:
            self.intermediates["x_inter"].append(x)
            self.intermediates["pred_x0"].append(pred_x0)
