"""The single home of legacy ldm behaviour that a compatible reimplementation must keep.

Everything here exists because released configs or checkpoints depend on it, not because it is a good idea:

* :data:`IGNORED_PARAMS` lists constructor parameters that official configs set but that have no effect in this
  implementation, each with the reason. Constructors accept them, log them once at debug level, and do nothing.
* :data:`IGNORED_LOG_IMAGES_KWARGS`: the same for ``log_images`` keywords (they reach it through ImageLogger).
* :func:`ema_buffer_name` is LitEma's name mangling (every '.' deleted), which fixes the ``model_ema.*`` keys;
  ``LitEma`` and every other user of the names call it.
* :class:`LdmScheduleHelpers` keeps ldm's public helper methods of ``LatentDiffusion`` (``q_sample``, ``get_v``,
  ``predict_start_from_noise``, ...) for scripts written against ldm.
* :data:`INPAINT_FINETUNE_KEYS` are the two keys whose input channels are widened 4 -> 9 when an inpainting
  model is initialised from a text-to-image checkpoint (DECISIONS D4).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch

from ldm.models.diffusion import parameterization as P
from ldm.models.diffusion.schedule import extract

log = logging.getLogger(__name__)

#: parameter -> why it is accepted and ignored. Keyed by "<Class>.<param>".
IGNORED_PARAMS: dict[str, str] = {
    "LatentDiffusion.log_every_t": "only controlled how often ldm stored intermediate samples for its progressive "
    "plots; our samplers take log_every_t per call",
    "LatentDiffusion.clip_denoised": "ldm forces it to False for latent models; latents are never clipped",
    "LatentDiffusion.monitor": "ldm's main.py passed it to ModelCheckpoint(monitor=..., save_top_k=3); here the "
    "full-state checkpoint keeps the newest by step, because SD configs never validate and the metric would not "
    "exist. For best-k checkpoints set lightning.modelcheckpoint.params.monitor",
    "LatentDiffusion.image_size": "ldm used it as the latent size of the samples drawn for image logs; here "
    "sample shapes follow the batch or the conditioning latent. Only the diffusers export reads it from the "
    "config, as the UNet's sample_size (the default size diffusers pipelines generate); a training run warns when "
    "it disagrees with the training crop (ldm.data_checks)",
    "UNetModel.image_size": "the UNet is fully convolutional; the input latent decides the size",
    "AutoencoderKL.monitor": "see LatentDiffusion.monitor",
    "FrozenOpenCLIPEmbedder.device": "tokens follow the module's own device; moving the module moves it",
    "ImageLogger.enable_autocast": "named by the SD2 yaml but absent from public ldm; images are logged under "
    "the trainer's precision",
}

#: ``log_images`` keywords (ImageLogger's ``log_images_kwargs``) that ldm configs pass and that draw nothing here.
IGNORED_LOG_IMAGES_KWARGS: dict[str, str] = {
    "inpaint": "ldm accepts it and does nothing with it for the finetune path",
    "plot_progressive_rows": "progressive rows are not drawn",
    "plot_diffusion_rows": "diffusion rows are not drawn",
    "plot_denoise_rows": "denoising rows are not drawn",
    "quantize_denoised": "a VQ-model option; latents here are continuous",
    "return_keys": "every key is always returned",
    "plot_inpaint": "ldm's mask-blending inpaint rows are not drawn; the inpainting model conditions on the mask",
    "plot_swapped_concat": "swapped-concat rows are not drawn",
}
IGNORED_PARAMS.update({f"ImageLogger.log_images_kwargs.{k}": v for k, v in IGNORED_LOG_IMAGES_KWARGS.items()})


def ema_buffer_name(param_name: str) -> str:
    """COMPAT: LitEma names a shadow buffer by deleting every '.' from the parameter name."""
    return param_name.replace(".", "")


#: keys widened from 4 to 9 input channels by LatentInpaintDiffusion: the first UNet conv and its EMA twin.
INPAINT_FINETUNE_KEYS: tuple[str, ...] = (
    "model.diffusion_model.input_blocks.0.0.weight",
    "model_ema." + ema_buffer_name("diffusion_model.input_blocks.0.0.weight"),  # model_ema.diffusion_modelinput...
)


def reject_unsupported(owner: str, options: Mapping[str, tuple[Any, Any]], error: type[Exception] = ValueError) -> None:
    """Raise ``error`` for the first ldm option ``name: (value, default)`` set to anything but its default: options
    ldm has and this implementation does not (they would otherwise be silently ignored)."""
    for name, (value, default) in options.items():
        is_set = value is not None if default is None else value != default
        if is_set:
            raise error(f"{owner}: {name}={value!r} is not supported; leave it at {default!r}")


def note_ignored(owner: str, params: Mapping[str, Any]) -> None:
    """Log (debug) each explicitly ignored parameter that a config set to a non-default value."""
    for name, value in params.items():
        reason = IGNORED_PARAMS.get(f"{owner}.{name}")
        if reason is not None and value is not None:
            log.debug("%s.%s=%r is accepted and ignored: %s", owner, name, value, reason)


class LdmScheduleHelpers:
    """COMPAT: ldm's public ``LatentDiffusion`` helpers at integer timesteps ``t`` ``[B]``, for scripts and
    third-party code; each is a one-line delegation to :mod:`ldm.models.diffusion.parameterization`. The host
    registers the ``sqrt_alphas_cumprod`` and ``sqrt_one_minus_alphas_cumprod`` schedule buffers ``[T]``."""

    sqrt_alphas_cumprod: torch.Tensor
    sqrt_one_minus_alphas_cumprod: torch.Tensor

    def _ab(self, t: torch.Tensor, ndim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """sqrt(abar_t) and sqrt(1 - abar_t), shaped ``[B, 1, ..., 1]`` to broadcast against ``ndim``-dim x."""
        return extract(self.sqrt_alphas_cumprod, t, ndim), extract(self.sqrt_one_minus_alphas_cumprod, t, ndim)

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        noise = torch.randn_like(x_start) if noise is None else noise
        return P.q_sample(x_start, noise, *self._ab(t, x_start.ndim))

    def get_v(self, x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return P.v_from_x0_eps(x, noise, *self._ab(t, x.ndim))

    def predict_start_from_noise(self, x_t: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return P.x0_from_eps(x_t, noise, *self._ab(t, x_t.ndim))

    def predict_start_from_z_and_v(self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return P.x0_from_v(x_t, v, *self._ab(t, x_t.ndim))

    def predict_eps_from_z_and_v(self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return P.eps_from_v(x_t, v, *self._ab(t, x_t.ndim))
