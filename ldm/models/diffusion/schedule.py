"""Discrete noise schedules: betas, every derived buffer ldm registers, and the DDIM sub-schedule.

Pure functions and one frozen dataclass; no ``nn.Module`` and no Lightning. Everything is built in float64
(numpy) and handed out as float32 tensors, as ldm does.

Notation (code name <-> symbol in DDPM, Ho et al. 2020, and DDIM, Song et al. 2021):

code                           symbol                                meaning
------------------------------ ------------------------------------- ------------------------------------------
``betas[t]``                   beta_t                                per-step noise variance
``alphas_cumprod[t]``          abar_t = prod_{s<=t} (1 - beta_s)     signal power at step t (DDIM's alpha_t)
``alphas_cumprod_prev[t]``     abar_{t-1}, with abar_{-1} = 1
``sqrt_alphas_cumprod``        sqrt(abar_t)                          "a" in ``parameterization``
``sqrt_one_minus_...``         sqrt(1 - abar_t)                      "s" in ``parameterization``
``posterior_variance``         beta~_t (DDPM eq. 7)                  variance of q(x_{t-1} | x_t, x0)
``posterior_mean_coef1/2``     coefficients of x0 / x_t in mu~_t     (DDPM eq. 7)
``ddim sigmas``                sigma_t(eta) (DDIM eq. 16)            eta = 0: deterministic DDIM

Everything rests on two identities (``parameterization`` implements them):

    x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps
    v   = sqrt(abar_t) eps - sqrt(1 - abar_t) x0

Left out: continuous-time schedules (``dpm_solver`` interpolates this discrete one) and zero-terminal-SNR
rescaling (SD2 is not zero-terminal-SNR: abar_999 = 0.00466 for the SD schedule).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Literal, NamedTuple

import numpy as np
import torch

from ldm.models.diffusion.parameterization import lvlb_weights

BetaScheduleName = Literal["linear", "sqrt_linear", "sqrt", "cosine"]


def make_beta_schedule(schedule: BetaScheduleName, n_timestep: int, linear_start: float = 1e-4,
                       linear_end: float = 2e-2, cosine_s: float = 8e-3) -> np.ndarray:
    """Betas of a named ldm schedule, float64 array ``[n_timestep]``.

    COMPAT: the names are ldm's and two of them mislead:
    "linear" is linear in sqrt(beta), ``betas = linspace(sqrt(start), sqrt(end), n) ** 2`` (diffusers calls it
    "scaled_linear"; SD2 uses it with 0.00085 -> 0.012); "sqrt_linear" is linear in beta (diffusers' "linear");
    "sqrt" is ``sqrt(linspace(start, end, n))``; "cosine" is the improved-DDPM cosine schedule (Nichol &
    Dhariwal 2021, eq. 17) with offset ``cosine_s`` and betas clipped to [0, 0.999].
    """
    if n_timestep < 1:
        raise ValueError(f"timesteps must be >= 1, got {n_timestep}")
    if schedule == "linear":
        return np.linspace(math.sqrt(linear_start), math.sqrt(linear_end), n_timestep, dtype=np.float64) ** 2
    if schedule == "sqrt_linear":
        return np.linspace(linear_start, linear_end, n_timestep, dtype=np.float64)
    if schedule == "sqrt":
        return np.linspace(linear_start, linear_end, n_timestep, dtype=np.float64) ** 0.5
    if schedule == "cosine":
        f = np.arange(n_timestep + 1, dtype=np.float64) / n_timestep + cosine_s
        abar = np.cos(f / (1 + cosine_s) * math.pi / 2) ** 2  # [n+1], abar(t) up to normalisation
        return np.clip(1 - abar[1:] / abar[:-1], 0.0, 0.999)
    raise ValueError(f"beta_schedule={schedule!r} is unknown; use 'linear', 'sqrt_linear', 'sqrt' or 'cosine'")


@dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """ldm's per-timestep schedule buffers (same names and order), float64; build with :meth:`from_betas`."""

    betas: np.ndarray
    alphas_cumprod: np.ndarray
    alphas_cumprod_prev: np.ndarray
    sqrt_alphas_cumprod: np.ndarray
    sqrt_one_minus_alphas_cumprod: np.ndarray
    log_one_minus_alphas_cumprod: np.ndarray
    sqrt_recip_alphas_cumprod: np.ndarray
    sqrt_recipm1_alphas_cumprod: np.ndarray
    posterior_variance: np.ndarray
    posterior_log_variance_clipped: np.ndarray
    posterior_mean_coef1: np.ndarray
    posterior_mean_coef2: np.ndarray

    @classmethod
    def from_betas(cls, betas: np.ndarray | torch.Tensor, v_posterior: float = 0.0) -> NoiseSchedule:
        """Derive all buffers from ``betas`` ``[T]``; ``v_posterior`` mixes beta_t into the posterior variance."""
        b = torch.as_tensor(betas).detach().cpu().double().numpy()
        if b.ndim != 1 or b.size < 1 or not np.all((b > 0) & (b < 1)):
            raise ValueError("betas must be a non-empty 1-D array with values in (0, 1)")
        alphas = 1.0 - b
        abar = np.cumprod(alphas)
        abar_prev = np.append(1.0, abar[:-1])
        # DDPM eq. 7; v_posterior = 0 gives beta~_t, 1 gives beta_t (ldm's interpolation).
        post_var = (1 - v_posterior) * b * (1 - abar_prev) / (1 - abar) + v_posterior * b
        return cls(
            betas=b, alphas_cumprod=abar, alphas_cumprod_prev=abar_prev,
            sqrt_alphas_cumprod=np.sqrt(abar), sqrt_one_minus_alphas_cumprod=np.sqrt(1 - abar),
            log_one_minus_alphas_cumprod=np.log(1 - abar),
            sqrt_recip_alphas_cumprod=np.sqrt(1 / abar), sqrt_recipm1_alphas_cumprod=np.sqrt(1 / abar - 1),
            posterior_variance=post_var,
            # post_var[0] is 0 when v_posterior = 0; the clip keeps the log finite (ldm uses 1e-20 too).
            posterior_log_variance_clipped=np.log(np.maximum(post_var, 1e-20)),
            posterior_mean_coef1=b * np.sqrt(abar_prev) / (1 - abar),
            posterior_mean_coef2=(1 - abar_prev) * np.sqrt(alphas) / (1 - abar),
        )

    @property
    def num_timesteps(self) -> int:
        return int(self.betas.shape[0])

    def buffers(self) -> dict[str, torch.Tensor]:
        """``{buffer name: float32 tensor [T]}`` in ldm's order, ready for ``register_buffer``."""
        return {name: torch.tensor(getattr(self, name), dtype=torch.float32) for name in self.buffer_names()}

    def lvlb_weights(self, parameterization: str) -> torch.Tensor:
        """ldm's per-timestep ``loss_vlb`` weights for this schedule, float32 ``[T]``
        (:func:`ldm.models.diffusion.parameterization.lvlb_weights`, where the per-mode forms live)."""
        w = lvlb_weights(parameterization, self.betas, self.alphas_cumprod, self.posterior_variance)
        return torch.tensor(w, dtype=torch.float32)

    @classmethod
    def buffer_names(cls) -> tuple[str, ...]:
        """The 12 buffer names, in ldm's order (what ``LatentDiffusion`` registers and checkpoints carry)."""
        return tuple(f.name for f in fields(cls))


def extract(values: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """``values[t]`` for a table ``values`` ``[T]`` and timesteps ``t`` ``[B]``, shaped ``[B, 1, ..., 1]`` with
    ``ndim`` dims so that it broadcasts against ``x_t`` (ndim 4 for ``[B, C, H, W]`` latents)."""
    if values.ndim != 1:
        raise ValueError(f"extract: values must be 1-D [T], got shape {tuple(values.shape)}")
    if t.ndim != 1:
        raise ValueError(f"extract: t must be 1-D [B], got shape {tuple(t.shape)}")
    if ndim < 1:
        raise ValueError(f"extract: ndim must be >= 1, got {ndim}")
    out = values.to(t.device)[t]  # [B]
    return out.reshape(t.shape[0], *((1,) * (ndim - 1)))  # [B, 1, ..., 1]


def ddim_timesteps(num_steps: int, num_train_steps: int, method: str = "uniform") -> np.ndarray:
    """ldm's DDIM sub-sequence of training timesteps, ascending int64 array.

    "uniform": stride ``c = T // S``, steps ``0, c, 2c, ... < T``; "quad": ``int(linspace(0, sqrt(0.8 T), S)^2)``.
    COMPAT: ldm adds 1 to every step (50 of 1000 -> 1, 21, ..., 981; diffusers' ``steps_offset=1``), and a
    stride that does not divide T yields ``ceil(T / c)`` steps (45 -> 46). Choices whose +1 would index past
    the schedule (e.g. 3 of 1000: 999 + 1) crash in ldm; here they raise.
    """
    if not 1 <= num_steps <= num_train_steps:
        raise ValueError(f"ddim_num_steps={num_steps} must be between 1 and {num_train_steps}")
    if method == "uniform":
        steps = np.arange(0, num_train_steps, num_train_steps // num_steps, dtype=np.int64)
    elif method == "quad":
        steps = (np.linspace(0, math.sqrt(num_train_steps * 0.8), num_steps) ** 2).astype(np.int64)
    else:
        raise ValueError(f"ddim_discretize={method!r} is unknown; use 'uniform' or 'quad'")
    steps = steps + 1  # COMPAT: ldm's +1 offset (tested in tests/test_schedule.py)
    if steps[-1] >= num_train_steps:
        raise ValueError(f"ddim_num_steps={num_steps} ({method}) gives timestep {steps[-1]} after ldm's +1 "
                         f"offset, beyond the {num_train_steps}-step schedule; pick another step count")
    return steps


class DDIMCoefficients(NamedTuple):
    """Per-step DDIM scalars, float64 ``[S]``, aligned with ascending ``timesteps``."""

    alphas: torch.Tensor  # abar at each step
    alphas_prev: torch.Tensor  # abar the step lands on
    sigmas: torch.Tensor  # sigma_t(eta), DDIM eq. 16


def ddim_coefficients(alphas_cumprod: torch.Tensor, timesteps: np.ndarray, eta: float) -> DDIMCoefficients:
    """abar_t, abar_prev and sigma_t = eta sqrt((1 - abar_prev)/(1 - abar_t) (1 - abar_t/abar_prev)).

    COMPAT: ``alphas_prev = [abar[0]] + abar[timesteps[:-1]]``: the last step lands on abar_0 = 0.99915 (SD),
    not on 1 (diffusers' ``set_alpha_to_one=False``). Pinned by tests/test_schedule.py.
    """
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1] (0: deterministic DDIM, 1: DDPM-like), got {eta}")
    abar = torch.as_tensor(alphas_cumprod).detach().cpu().double()
    idx = torch.as_tensor(np.ascontiguousarray(timesteps), dtype=torch.long)
    if idx.ndim != 1 or idx.numel() == 0 or bool((idx.diff() < 0).any()) or idx[0] < 0 or idx[-1] >= len(abar):
        raise ValueError(f"timesteps must be ascending indices into the {len(abar)}-step schedule")
    alphas = abar[idx]
    alphas_prev = torch.cat([abar[:1], abar[idx[:-1]]])  # [S]
    sigmas = eta * torch.sqrt((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev))
    return DDIMCoefficients(alphas, alphas_prev, sigmas)
