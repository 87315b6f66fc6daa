"""The forward process and the eps / x0 / v conversions: the only code that knows what the UNet predicts.

Every function takes the coefficients ``a = sqrt(abar_t)`` and ``s = sqrt(1 - abar_t)`` already shaped to
broadcast against ``x`` (``schedule.extract`` for per-sample timesteps, plain floats in samplers), so the same
code serves the discrete training schedule, DDIM sub-schedules and DPM-Solver's continuous time.

    x_t = a x0 + s eps                     (forward process, DDPM eq. 4)
    v   = a eps - s x0                     (Salimans & Ho 2022, progressive distillation, sec. 4)
    x0  = a x_t - s v,   eps = a v + s x_t (inverses; they use a^2 + s^2 = 1)

Only this module branches on the mode: :func:`training_target` (the regression target of the loss),
:func:`split_prediction` (model output -> (eps, x0) for samplers) and the per-timestep loss weights that depend
on what the model predicts, :func:`lvlb_weights` (ldm's ELBO term) and :func:`min_snr_weights` (Min-SNR-gamma).
Left out: score and "x0 with clipping" parameterizations (no SD config uses them).
"""

from __future__ import annotations

from typing import Literal, TypeVar, cast, get_args

import numpy as np
import torch

Parameterization = Literal["eps", "x0", "v"]
PARAMETERIZATIONS: tuple[str, ...] = get_args(Parameterization)
Coef = torch.Tensor | float
Table = TypeVar("Table", np.ndarray, torch.Tensor)


def check_parameterization(mode: str) -> Parameterization:
    """Return ``mode`` if it is "eps", "x0" or "v"; raise ``ValueError`` otherwise."""
    if mode not in PARAMETERIZATIONS:
        raise ValueError(f"parameterization={mode!r} is unknown; use one of {', '.join(PARAMETERIZATIONS)}")
    return cast(Parameterization, mode)


def q_sample(x0: torch.Tensor, noise: torch.Tensor, a: Coef, s: Coef) -> torch.Tensor:
    """x_t = a x0 + s eps."""
    return a * x0 + s * noise


def x0_from_eps(x_t: torch.Tensor, eps: torch.Tensor, a: Coef, s: Coef) -> torch.Tensor:
    """x0 = (x_t - s eps) / a (ldm: ``predict_start_from_noise``)."""
    return (x_t - s * eps) / a


def eps_from_x0(x_t: torch.Tensor, x0: torch.Tensor, a: Coef, s: Coef) -> torch.Tensor:
    """eps = (x_t - a x0) / s (ldm: ``_predict_eps_from_xstart``)."""
    return (x_t - a * x0) / s


def x0_from_v(x_t: torch.Tensor, v: torch.Tensor, a: Coef, s: Coef) -> torch.Tensor:
    """x0 = a x_t - s v (ldm: ``predict_start_from_z_and_v``)."""
    return a * x_t - s * v


def eps_from_v(x_t: torch.Tensor, v: torch.Tensor, a: Coef, s: Coef) -> torch.Tensor:
    """eps = a v + s x_t (ldm: ``predict_eps_from_z_and_v``)."""
    return a * v + s * x_t


def v_from_x0_eps(x0: torch.Tensor, eps: torch.Tensor, a: Coef, s: Coef) -> torch.Tensor:
    """v = a eps - s x0 (ldm: ``get_v``)."""
    return a * eps - s * x0


def training_target(
    mode: Parameterization, x0: torch.Tensor, noise: torch.Tensor, a: Coef, s: Coef
) -> torch.Tensor:
    """What the model regresses on: eps -> noise, x0 -> x0, v -> a noise - s x0."""
    mode = check_parameterization(mode)
    if mode == "eps":
        return noise
    if mode == "x0":
        return x0
    return v_from_x0_eps(x0, noise, a, s)


def split_prediction(
    mode: Parameterization, model_out: torch.Tensor, x_t: torch.Tensor, a: Coef, s: Coef
) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn a model output at ``x_t`` into the pair (eps, x0) that samplers work with."""
    mode = check_parameterization(mode)
    if mode == "eps":
        return model_out, x0_from_eps(x_t, model_out, a, s)
    if mode == "x0":
        return eps_from_x0(x_t, model_out, a, s), model_out
    return eps_from_v(x_t, model_out, a, s), x0_from_v(x_t, model_out, a, s)


# ------------------------------------------------------------------------------- per-timestep loss weights
def lvlb_weights(mode: Parameterization, betas: np.ndarray, alphas_cumprod: np.ndarray,
                 posterior_variance: np.ndarray) -> np.ndarray:
    """Per-timestep weights of ldm's ``loss_vlb`` term, float64 ``[T]`` (the schedule's arrays in; DECISIONS R1).

    eps: beta_t^2 / (2 var~_t alpha_t (1 - abar_t)); v: ones; x0: ``0.5 sqrt(abar) / (2 - abar)``.
    COMPAT: the x0 value is what ldm computes (its ``2. * 1 - abar`` reads as 2 - abar, not the intended
    2 (1 - abar)). Element 0 is overwritten by element 1 (ldm: var~_0 = 0 makes the eps weight infinite).
    ldm computes them in float32 (differences ~1e-7 relative). They only matter with
    ``original_elbo_weight > 0``, which no SD config sets.
    """
    mode, abar = check_parameterization(mode), alphas_cumprod
    with np.errstate(divide="ignore", invalid="ignore"):  # eps: var~_0 = 0 gives inf at t = 0
        if mode == "eps":
            w = betas**2 / (2 * posterior_variance * (1 - betas) * (1 - abar))
        elif mode == "x0":
            w = 0.5 * np.sqrt(abar) / (2.0 - abar)
        else:
            w = np.ones_like(abar)
    if w.size > 1:
        w[0] = w[1]
    if not np.all(np.isfinite(w)):
        raise ValueError("lvlb_weights are not finite; check betas and v_posterior")
    return w


def min_snr_weights(mode: Parameterization, alphas_cumprod: Table, gamma: float) -> Table:
    """Min-SNR-gamma weights (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy",
    arXiv:2303.09556) for abar values (numpy or torch, any shape: a per-timestep table or per-sample values).

    The paper weights the x0 error by min(SNR, gamma), SNR = abar / (1 - abar). Expressed on the error the model
    is actually trained on: eps error is the x0 error times SNR, v error the x0 error times (SNR + 1), so the
    weights become min(SNR, gamma) / SNR (eps), min(SNR, gamma) / (SNR + 1) (v), min(SNR, gamma) (x0).
    """
    if gamma <= 0:
        raise ValueError(f"min_snr_gamma must be > 0, got {gamma}")
    mode = check_parameterization(mode)
    snr = alphas_cumprod / (1 - alphas_cumprod)
    clipped = snr.clip(max=gamma)
    if mode == "eps":
        return clipped / snr
    if mode == "v":
        return clipped / (snr + 1)
    return clipped
