"""DDIM sampling (Song et al. 2021, "Denoising Diffusion Implicit Models") behind ldm's ``DDIMSampler``.

:func:`ddim_sample` is the whole algorithm over a plain ``model_fn(x, t)``; :class:`DDIMSampler` is the
ldm-compatible facade (``make_schedule`` / ``sample(S, batch_size, shape, conditioning, ...)``) that builds the
guided ``model_fn`` and the ldm hooks around it. One step, with abar_t, abar_prev and sigma_t from
``schedule.ddim_coefficients`` (DDIM eq. 12):

    (eps, x0) = split_prediction(parameterization, model output, x_t)
    x_prev    = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma_t^2) eps + sigma_t z,   z ~ N(0, I)

By name, DDIM is reached through :mod:`ldm.models.diffusion.sampling` (``"ddim"``); the plumbing it shares with
the other samplers lives in :mod:`ldm.models.diffusion.sampling_utils`.
Left out: ldm's ``encode`` / ``stochastic_encode`` / ``decode`` (img2img), ``quantize_x0`` (VQ models),
``score_corrector`` and ``dynamic_threshold``: passing them raises instead of being silently ignored.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ldm import compat
from ldm.models.diffusion.guidance import ModelFn, guided_model_fn
from ldm.models.diffusion.parameterization import check_parameterization, q_sample, split_prediction
from ldm.models.diffusion.sampling_utils import (
    SamplingTrace,
    StepCallback,
    check_conditioning_batch,
    check_eta,
    initial_noise,
    model_device,
    randn,
)
from ldm.models.diffusion.schedule import ddim_coefficients, ddim_timesteps

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------- algorithm
def _noise_dropout(noise: torch.Tensor, p: float, generator: torch.Generator | None) -> torch.Tensor:
    """Inverted dropout on the DDIM noise (ldm's ``noise_dropout``), drawn from ``generator``."""
    if p == 0.0:
        return noise
    src = generator.device if generator is not None else noise.device
    keep = torch.rand(noise.shape, generator=generator, device=src).to(noise.device) >= p
    return noise * keep / (1.0 - p)


def ddim_sample(
    model_fn: ModelFn,
    x_T: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    timesteps: np.ndarray,
    eta: float = 0.0,
    parameterization: str = "eps",
    generator: torch.Generator | None = None,
    *,
    temperature: float = 1.0,
    noise_dropout: float = 0.0,
    mask: torch.Tensor | None = None,
    x0: torch.Tensor | None = None,
    callback: StepCallback | None = None,
    verbose: bool = False,
) -> torch.Tensor:
    """Run DDIM from ``x_T`` (at ``timesteps[-1]``) down to abar_0 and return the final sample.

    Args:
        model_fn: ``(x [B, ...], t [B] long) -> model output`` (already guided).
        x_T: starting noise ``[B, ...]``.
        alphas_cumprod: abar table ``[T]`` of the trained schedule.
        timesteps: ascending training timesteps to visit (``schedule.ddim_timesteps``).
        eta: DDIM stochasticity in [0, 1]; 0 is the deterministic ODE sampler.
        parameterization: what ``model_fn`` predicts, "eps", "x0" or "v".
        generator: source of all noise drawn here (eta > 0, ``mask`` re-noising).
        temperature: multiplier of the eta noise.
        noise_dropout: dropout probability on the eta noise.
        mask: 1 where ``x0`` is known and kept (ldm's legacy, non-concat inpainting), broadcastable to x.
        x0: the known clean latent for ``mask``; it is re-noised to each step with ``q_sample``.
        callback: called after each step as ``callback(i, x, pred_x0)``.
        verbose: show a tqdm progress bar.
    """
    mode = check_parameterization(parameterization)
    if not 0.0 <= noise_dropout < 1.0:
        raise ValueError(f"noise_dropout must be in [0, 1), got {noise_dropout}")
    if (mask is None) != (x0 is None):
        raise ValueError("mask and x0 must be given together (x0 is the known latent that mask keeps)")
    ts = np.asarray(timesteps)
    abar_t, abar_prev, sigmas = ddim_coefficients(alphas_cumprod, ts, eta)
    x = x_T
    for i in tqdm(range(len(ts)), desc="DDIM Sampler", disable=not verbose):
        k = len(ts) - 1 - i  # walk the ascending schedule from its end
        a_t, a_prev, sigma = float(abar_t[k]), float(abar_prev[k]), float(sigmas[k])
        a, s = math.sqrt(a_t), math.sqrt(1.0 - a_t)
        t = torch.full((x.shape[0],), int(ts[k]), device=x.device, dtype=torch.long)  # [B]
        if mask is not None:
            known = q_sample(x0, randn(x.shape, x.device, generator, x.dtype), a, s)  # known latent at step t
            x = mask * known + (1.0 - mask) * x
        eps, pred_x0 = split_prediction(mode, model_fn(x, t), x, a, s)
        # max(): rounding can push 1 - abar_prev - sigma^2 a hair below 0 at eta = 1
        x = math.sqrt(a_prev) * pred_x0 + math.sqrt(max(1.0 - a_prev - sigma**2, 0.0)) * eps
        if sigma > 0.0:
            noise = randn(x.shape, x.device, generator, x.dtype) * temperature
            x = x + sigma * _noise_dropout(noise, noise_dropout, generator)
        if callback is not None:
            callback(i, x, pred_x0)
    return x


# ------------------------------------------------------------------------------------------- ldm facade
class DDIMSampler:
    """ldm's ``DDIMSampler`` surface over :func:`ddim_sample`.

    The model is duck-typed: ``apply_model(x, t, cond)``, ``alphas_cumprod`` ``[T]``, ``num_timesteps``,
    ``parameterization`` and a ``device`` attribute or parameters.

    Args:
        model: the diffusion model (e.g. ``LatentDiffusion``).
        schedule: COMPAT: accepted because ldm callers pass it; ldm never reads it, so only "linear" is allowed.
        device: where the DDIM tables live; defaults to the model's device.
    """

    def __init__(self, model: Any, schedule: str = "linear", device: torch.device | str | None = None) -> None:
        if schedule != "linear":
            raise ValueError(f"DDIMSampler schedule={schedule!r}: only 'linear' (ldm ignores this argument)")
        self.model, self.schedule = model, schedule
        self.ddpm_num_timesteps = int(model.num_timesteps)
        self.device = torch.device(device) if device is not None else model_device(model)

    def make_schedule(self, ddim_num_steps: int, ddim_discretize: str = "uniform", ddim_eta: float = 0.0,
                      verbose: bool = True) -> None:
        """Set ldm's ``ddim_timesteps``, ``ddim_alphas``, ``ddim_alphas_prev``, ``ddim_sigmas`` and
        ``ddim_sqrt_one_minus_alphas`` for ``ddim_num_steps`` steps."""
        alphas_cumprod = self.model.alphas_cumprod
        if alphas_cumprod.shape[0] != self.ddpm_num_timesteps:
            raise ValueError("model.alphas_cumprod must have one entry per training timestep")
        self.ddim_timesteps = ddim_timesteps(ddim_num_steps, self.ddpm_num_timesteps, ddim_discretize)
        coefs = ddim_coefficients(alphas_cumprod, self.ddim_timesteps, ddim_eta)
        self.ddim_alphas, self.ddim_alphas_prev, self.ddim_sigmas = (c.float().to(self.device) for c in coefs)
        self.ddim_sqrt_one_minus_alphas = torch.sqrt(1.0 - self.ddim_alphas)
        if verbose:
            log.info("DDIM: %d steps (%s), eta %.3g, timesteps %s", len(self.ddim_timesteps), ddim_discretize,
                     ddim_eta, self.ddim_timesteps.tolist())

    def _model_fn(self, cond: Any, uncond: Any, scale: float, ucg_schedule: Sequence[float] | None) -> ModelFn:
        apply = self.model.apply_model
        if ucg_schedule is None:
            return guided_model_fn(apply, cond, uncond, scale)
        steps = [int(t) for t in self.ddim_timesteps[::-1]]  # visiting order
        if len(ucg_schedule) != len(steps) or len(set(steps)) != len(steps):
            raise ValueError(f"ucg_schedule needs one scale per DDIM step ({len(steps)}), with distinct steps")
        per_step = {t: guided_model_fn(apply, cond, uncond, float(g)) for t, g in zip(steps, ucg_schedule)}
        return lambda x, t: per_step[int(t[0])](x, t)

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
    ) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:
        """Sample ``batch_size`` latents of ``shape`` (C, H, W) in ``S`` DDIM steps.

        Parameters keep ldm's names and meaning (see :func:`ddim_sample` for the algorithmic ones);
        ``generator`` is new and seeds every random draw. Returns ``(samples, intermediates)`` with
        ``intermediates = {"x_inter": [...], "pred_x0": [...]}`` as ldm.
        """
        compat.reject_unsupported("DDIMSampler.sample", {
            "quantize_x0": (quantize_x0, False), "score_corrector": (score_corrector, None),
            "corrector_kwargs": (corrector_kwargs, None), "dynamic_threshold": (dynamic_threshold, None),
        })
        check_eta("DDIMSampler", eta, stochastic=True)
        check_conditioning_batch(conditioning, batch_size)
        self.make_schedule(S, ddim_eta=eta, verbose=verbose)
        x_T = initial_noise((batch_size, *shape), x_T, self.device, generator)
        model_fn = self._model_fn(conditioning, unconditional_conditioning, unconditional_guidance_scale,
                                  ucg_schedule)
        trace = SamplingTrace(x_T, len(self.ddim_timesteps), log_every_t, callback, img_callback)
        samples = ddim_sample(
            model_fn, x_T, self.model.alphas_cumprod, self.ddim_timesteps, eta, self.model.parameterization,
            generator, temperature=temperature, noise_dropout=noise_dropout, mask=mask, x0=x0,
            callback=trace, verbose=verbose,
        )
        return samples, trace.intermediates
