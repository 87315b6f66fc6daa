"""DPM-Solver++(2M): second-order multistep solver of the diffusion probability-flow ODE in data-prediction form
(Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models",
arXiv:2211.01095, Algorithm 2), with the ``DPMSolverSampler`` surface of the SD2 repository.

Time is continuous, t in [1/N, 1], over the trained discrete schedule (the DPM-Solver paper's
``NoiseScheduleVP('discrete')``): training step n sits at t_n = (n + 1) / N and log alpha_t = 0.5 log abar is
piecewise linear in t between those points. alpha_t = sqrt(abar), sigma_t = sqrt(1 - alpha_t^2) and the
half-log-SNR lambda_t = log(alpha_t / sigma_t). The model is queried at the fractional timestep
(t - 1/N) * 1000 (0 .. 999 for N = 1000). With h_i = lambda_i - lambda_{i-1} and x0_i the data prediction at t_i:

    first step:  x_i = (sigma_i / sigma_{i-1}) x_{i-1} - alpha_i (e^{-h_i} - 1) x0_{i-1}             (= DDIM)
    later steps: same with x0_{i-1} replaced by D = (1 + 1/(2 r)) x0_{i-1} - 1/(2 r) x0_{i-2},  r = h_{i-1} / h_i

The solve runs from t = 1 (abar_{N-1}) to t = 1/N (abar_0), the same end point as ldm's DDIM, with one model
evaluation per step. Left out: single-step and order-3 variants, thresholding, noise-prediction (non "++")
form, and ldm's img2img / inpainting-by-masking options (they raise). By name the solver is ``"dpm"`` in
:mod:`ldm.models.diffusion.sampling`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from tqdm import tqdm

from ldm import compat
from ldm.models.diffusion.guidance import ModelFn, guided_model_fn
from ldm.models.diffusion.parameterization import check_parameterization, split_prediction
from ldm.models.diffusion.sampling_utils import (
    SamplingTrace,
    StepCallback,
    check_conditioning_batch,
    check_eta,
    initial_noise,
    model_device,
)

log = logging.getLogger(__name__)

SkipType = Literal["time_uniform", "logSNR"]


def _interp(x: torch.Tensor, xp: torch.Tensor, yp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear y(x) through ascending knots ``xp``, extended linearly beyond both ends."""
    idx = torch.searchsorted(xp, x).clamp(1, xp.shape[0] - 1)  # right knot of the segment
    x0, x1, y0, y1 = xp[idx - 1], xp[idx], yp[idx - 1], yp[idx]
    return y0 + (x - x0) * (y1 - y0) / (x1 - x0)


class DiscreteVPSchedule:
    """Continuous-time view of a discrete abar table; all values float64 on the CPU.

    Args:
        alphas_cumprod: abar ``[N]`` of the trained schedule (N >= 2).
    """

    def __init__(self, alphas_cumprod: torch.Tensor) -> None:
        abar = torch.as_tensor(alphas_cumprod).detach().cpu().double()
        if abar.ndim != 1 or abar.shape[0] < 2:
            raise ValueError("alphas_cumprod must be 1-D with at least 2 entries")
        self.num_train_steps = abar.shape[0]
        self.t_knots = torch.arange(1, self.num_train_steps + 1, dtype=torch.float64) / self.num_train_steps
        self.log_alpha_knots = 0.5 * torch.log(abar)  # decreasing in t

    def log_alpha(self, t: torch.Tensor) -> torch.Tensor:
        return _interp(t, self.t_knots, self.log_alpha_knots)

    def lambda_(self, t: torch.Tensor) -> torch.Tensor:
        """Half-log-SNR log(alpha_t / sigma_t)."""
        log_alpha = self.log_alpha(t)
        return log_alpha - 0.5 * torch.log1p(-torch.exp(2 * log_alpha))

    def inverse_lambda(self, lam: torch.Tensor) -> torch.Tensor:
        """The t with lambda_t = ``lam`` (log alpha from lam, then t from the flipped, ascending knots)."""
        log_alpha = -0.5 * torch.logaddexp(torch.zeros_like(lam), -2 * lam)
        return _interp(log_alpha, self.log_alpha_knots.flip(0), self.t_knots.flip(0))

    def model_time(self, t: float) -> float:
        """Fractional training timestep the model sees at continuous time ``t``."""
        return (t - 1.0 / self.num_train_steps) * 1000.0

    def time_steps(self, steps: int, skip_type: SkipType = "time_uniform") -> torch.Tensor:
        """``steps + 1`` times from 1 down to 1/N, uniform in t or in lambda ("logSNR")."""
        t_T, t_0 = 1.0, 1.0 / self.num_train_steps
        if skip_type == "time_uniform":
            return torch.linspace(t_T, t_0, steps + 1, dtype=torch.float64)
        if skip_type == "logSNR":
            lam_T, lam_0 = self.lambda_(torch.tensor([t_T, t_0], dtype=torch.float64)).tolist()
            return self.inverse_lambda(torch.linspace(lam_T, lam_0, steps + 1, dtype=torch.float64))
        raise ValueError(f"skip_type={skip_type!r} is unknown; use 'time_uniform' or 'logSNR'")


def dpm_solver_pp_2m(
    model_fn: ModelFn,
    x_T: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    steps: int,
    parameterization: str = "eps",
    *,
    skip_type: SkipType = "time_uniform",
    lower_order_final: bool = True,
    callback: StepCallback | None = None,
    verbose: bool = False,
) -> torch.Tensor:
    """Solve the probability-flow ODE from ``x_T`` at t = 1 to t = 1/N in ``steps`` model evaluations.

    Args:
        model_fn: ``(x [B, ...], t [B] float) -> model output`` (already guided); t is the fractional timestep.
        x_T: starting noise ``[B, ...]``.
        alphas_cumprod: abar table ``[N]`` of the trained schedule.
        steps: number of solver steps (= model evaluations), >= 1.
        parameterization: what ``model_fn`` predicts, "eps", "x0" or "v".
        skip_type: step spacing, uniform in time (SD2's choice) or in log-SNR. Time-uniform steps leave one long
            final step in log-SNR (t = 1/S -> 1/N); on low-dimensional toy data logSNR spacing is far more accurate.
        lower_order_final: COMPAT with DPM-Solver: take the last step first-order, only when steps < 15.
        callback: called after each step as ``callback(i, x, x0 prediction used)``.
        verbose: show a tqdm progress bar.
    """
    mode = check_parameterization(parameterization)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    sched = DiscreteVPSchedule(alphas_cumprod)
    ts = sched.time_steps(steps, skip_type)  # [steps + 1], float64
    log_alpha = sched.log_alpha(ts)
    alphas = log_alpha.exp().tolist()
    sigmas = (-torch.expm1(2 * log_alpha)).sqrt().tolist()  # sqrt(1 - alpha^2)
    lambdas = sched.lambda_(ts).tolist()

    def data_prediction(x: torch.Tensor, i: int) -> torch.Tensor:
        t_in = torch.full((x.shape[0],), sched.model_time(float(ts[i])), device=x.device)  # [B] float32
        return split_prediction(mode, model_fn(x, t_in), x, alphas[i], sigmas[i])[1]

    x, x0_prev = x_T, None
    x0_cur = data_prediction(x, 0)
    for i in tqdm(range(1, steps + 1), desc="DPM-Solver++(2M)", disable=not verbose):
        h = lambdas[i] - lambdas[i - 1]
        first_order = x0_prev is None or (lower_order_final and steps < 15 and i == steps)
        if first_order:
            d = x0_cur
        else:
            r = (lambdas[i - 1] - lambdas[i - 2]) / h
            d = (1 + 1 / (2 * r)) * x0_cur - 1 / (2 * r) * x0_prev
        x = (sigmas[i] / sigmas[i - 1]) * x - alphas[i] * math.expm1(-h) * d
        if callback is not None:
            callback(i - 1, x, x0_cur)
        if i < steps:  # the final state needs no model evaluation
            x0_prev, x0_cur = x0_cur, data_prediction(x, i)
    return x


class DPMSolverSampler:
    """The SD2 repository's ``DPMSolverSampler`` (multistep DPM-Solver++, order 2) over :func:`dpm_solver_pp_2m`.

    The model is duck-typed as for ``DDIMSampler``: ``apply_model``, ``alphas_cumprod``, ``parameterization``
    ("eps", "x0" or "v") and a ``device`` attribute or parameters.

    Args:
        model: the diffusion model (e.g. ``LatentDiffusion``).
        device: where the starting noise is placed; defaults to the model's device.
    """

    def __init__(self, model: Any, device: torch.device | str | None = None) -> None:
        self.model = model
        self.device = torch.device(device) if device is not None else model_device(model)

    @torch.no_grad()
    def sample(
        self,
        S: int,
        batch_size: int,
        shape: Sequence[int],
        conditioning: Any = None,
        callback: Callable[[int], None] | None = None,
        img_callback: Callable[[torch.Tensor, int], None] | None = None,
        quantize_x0: bool = False,
        eta: float = 0.0,
        mask: torch.Tensor | None = None,
        x0: torch.Tensor | None = None,
        temperature: float = 1.0,
        noise_dropout: float = 0.0,
        score_corrector: Any = None,
        corrector_kwargs: dict[str, Any] | None = None,
        verbose: bool = True,
        x_T: torch.Tensor | None = None,
        log_every_t: int = 100,
        unconditional_guidance_scale: float = 1.0,
        unconditional_conditioning: Any = None,
        dynamic_threshold: float | None = None,
        ucg_schedule: Sequence[float] | None = None,
        generator: torch.Generator | None = None,
        skip_type: SkipType = "time_uniform",
        lower_order_final: bool = True,
    ) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:
        """Sample ``batch_size`` latents of ``shape`` (C, H, W) with ``S`` solver steps.

        Same signature as ``DDIMSampler.sample``; options an ODE solver cannot honour (eta, masking, noise
        tweaks, correctors, thresholds, per-step guidance) raise when set. Returns ``(samples, intermediates)``
        like DDIM (the SD2 version returned ``None`` for the intermediates).
        """
        check_eta("DPMSolverSampler", eta, stochastic=False)
        compat.reject_unsupported("DPMSolverSampler.sample", {
            "quantize_x0": (quantize_x0, False), "mask": (mask, None), "x0": (x0, None),
            "temperature": (temperature, 1.0), "noise_dropout": (noise_dropout, 0.0),
            "score_corrector": (score_corrector, None), "corrector_kwargs": (corrector_kwargs, None),
            "dynamic_threshold": (dynamic_threshold, None), "ucg_schedule": (ucg_schedule, None),
        })
        check_conditioning_batch(conditioning, batch_size)
        x_T = initial_noise((batch_size, *shape), x_T, self.device, generator)
        if verbose:
            log.info("DPM-Solver++(2M): %d steps (%s), shape %s", S, skip_type, tuple(x_T.shape))
        model_fn = guided_model_fn(self.model.apply_model, conditioning, unconditional_conditioning,
                                   unconditional_guidance_scale)
        trace = SamplingTrace(x_T, S, log_every_t, callback, img_callback)
        samples = dpm_solver_pp_2m(
            model_fn, x_T, self.model.alphas_cumprod, S, self.model.parameterization,
            skip_type=skip_type, lower_order_final=lower_order_final, callback=trace, verbose=verbose,
        )
        return samples, trace.intermediates
