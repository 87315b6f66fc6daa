"""The forward process and the eps / x0 / v conversions: the only code that knows what the UNet predicts.

Every function takes the coefficients ``a = sqrt(abar_t)`` and ``s = sqrt(1 - abar_t)`` already shaped to
broadcast against ``x`` (``schedule.extract`` for per-sample timesteps, plain floats in samplers), so the same
code serves the discrete training schedule, DDIM sub-schedules and DPM-Solver's continuous time.

    x_t = a x0 + s eps                     (forward process, DDPM eq. 4)
    v   = a eps - s x0                     (Salimans & Ho 2022, progressive distillation, sec. 4)
    x0  = a x_t - s v,   eps = a v + s x_t (inverses; they use a^2 + s^2 = 1)

Two dispatchers branch on the mode: :func:`training_target` (the regression target of the loss) and
:func:`split_prediction` (model output -> (eps, x0) for samplers). Nothing else should.
Left out: score and "x0 with clipping" parameterizations (no SD config uses them).
"""

from __future__ import annotations

from typing import Literal, cast, get_args

import torch

Parameterization = Literal["eps", "x0", "v"]
PARAMETERIZATIONS: tuple[str, ...] = get_args(Parameterization)
Coef = torch.Tensor | float


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
