"""The single home of legacy ldm behaviour that a compatible reimplementation must keep.

Everything here exists because released configs or checkpoints depend on it, not because it is a good idea:

* :data:`IGNORED_PARAMS` lists constructor parameters that official configs set but that have no effect in this
  implementation, each with the reason. Constructors accept them, log them once at debug level, and do nothing.
* :func:`ema_buffer_name` is LitEma's name mangling (every '.' deleted), which fixes the ``model_ema.*`` keys.
* :data:`INPAINT_FINETUNE_KEYS` are the two keys whose input channels are widened 4 -> 9 when an inpainting
  model is initialised from a text-to-image checkpoint (DECISIONS D4).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

log = logging.getLogger(__name__)

#: parameter -> why it is accepted and ignored. Keyed by "<Class>.<param>".
IGNORED_PARAMS: dict[str, str] = {
    "LatentDiffusion.log_every_t": "only controlled how often ldm stored intermediate samples for its progressive "
    "plots; our samplers take log_every_t per call",
    "LatentDiffusion.clip_denoised": "ldm forces it to False for latent models; latents are never clipped",
    "LatentDiffusion.use_positional_encodings": "unused by every SD config (must be False)",
    "LatentDiffusion.monitor": "read by main.py for ModelCheckpoint(monitor=...), not by the model",
    "UNetModel.image_size": "the UNet is fully convolutional; the input latent decides the size",
    "AutoencoderKL.monitor": "read by main.py for ModelCheckpoint(monitor=...), not by the model",
    "FrozenOpenCLIPEmbedder.device": "tokens follow the module's own device; moving the module moves it",
    "ImageLogger.log_images_kwargs.inpaint": "ldm accepts it and does nothing with it for the finetune path",
    "ImageLogger.log_images_kwargs.plot_progressive_rows": "progressive rows are not drawn",
    "ImageLogger.log_images_kwargs.plot_diffusion_rows": "diffusion rows are not drawn",
    "ImageLogger.enable_autocast": "named by the SD2 yaml but absent from public ldm; images are logged under "
    "the trainer's precision",
}

#: keys widened from 4 to 9 input channels by LatentInpaintDiffusion (model and EMA twin). COMPAT: the EMA key is
#: the LitEma-mangled name of ``diffusion_model.input_blocks.0.0.weight``.
INPAINT_FINETUNE_KEYS: tuple[str, ...] = (
    "model.diffusion_model.input_blocks.0.0.weight",
    "model_ema.diffusion_modelinput_blocks00weight",
)


def ema_buffer_name(param_name: str) -> str:
    """COMPAT: LitEma names a shadow buffer by deleting every '.' from the parameter name."""
    return param_name.replace(".", "")


def note_ignored(owner: str, params: Mapping[str, Any]) -> None:
    """Log (debug) each explicitly ignored parameter that a config set to a non-default value."""
    for name, value in params.items():
        reason = IGNORED_PARAMS.get(f"{owner}.{name}")
        if reason is not None and value is not None:
            log.debug("%s.%s=%r is accepted and ignored: %s", owner, name, value, reason)
