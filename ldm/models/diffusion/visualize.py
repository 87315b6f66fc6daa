"""Images for the training logs: inputs, mask, masked image, reconstructions and samples with/without CFG.

Called through ``LatentDiffusion.log_images`` (which ``main.ImageLogger`` invokes). Everything returned is a
B x 3 x H x W tensor in [-1, 1] (masks are mapped to {-1, 1}) so the logger can grid them uniformly.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from typing import Any

import torch

from ldm import compat
from ldm.config_schema import ConfigError, suggest
from ldm.models.diffusion.sampling import get_sampler, sample_latents

log = logging.getLogger(__name__)


def _slice_batch(batch: Mapping[str, Any], n: int) -> dict[str, Any]:
    return {k: (v[:n] if hasattr(v, "__getitem__") and not isinstance(v, (str, bytes)) else v)
            for k, v in batch.items()}


@torch.no_grad()
def log_images(
    model: Any,
    batch: Mapping[str, Any],
    N: int = 8,
    n_row: int = 4,  # noqa: ARG001 - grid width is the ImageLogger's choice; kept for ldm signature compat
    sample: bool = True,
    ddim_steps: int = 50,
    ddim_eta: float = 0.0,
    unconditional_guidance_scale: float = 1.0,
    unconditional_guidance_label: Sequence[str] | None = None,
    use_ema_scope: bool = True,
    sampler: str = "ddim",
    seed: int = 0,
    **ignored: Any,
) -> dict[str, torch.Tensor]:
    """Return a dict of image batches for logging.

    Keys: ``inputs``, ``reconstruction``, and for inpainting models ``mask`` and ``masked_image``; with
    ``sample``: ``samples`` (no guidance) and, when ``unconditional_guidance_scale > 1``,
    ``samples_cfg_scale_{s:.2f}``. The unconditional branch is ``model.null_conditioning``: the concat
    conditioning (mask and masked image) is kept and only the text becomes ``unconditional_guidance_label``
    (default ``[""]``), as SD2 does. Samples start from a fixed seed so successive logs are comparable.
    ``sampler`` is a name in ``ldm.models.diffusion.sampling.SAMPLERS``; ``ddim_eta`` follows its eta rule.
    Keywords in :data:`ldm.compat.IGNORED_LOG_IMAGES_KWARGS` are accepted and ignored; others raise.
    """
    unknown = sorted(set(ignored) - set(compat.IGNORED_LOG_IMAGES_KWARGS))
    if unknown:
        known = [n for n in inspect.signature(log_images).parameters if n not in ("model", "batch", "ignored")]
        raise ConfigError(f"lightning.callbacks.image_logger.params.log_images_kwargs.{unknown[0]}: unknown option"
                          f"{suggest(unknown[0], known)}; valid options: {', '.join(known)}")
    compat.note_ignored("ImageLogger.log_images_kwargs", ignored)
    get_sampler(sampler).check(ddim_eta)  # fail before encoding anything
    batch = _slice_batch(batch, N)
    out: dict[str, torch.Tensor] = {}
    z, cond = model.get_input(batch, model.first_stage_key)
    n = z.shape[0]
    out["inputs"] = model.image_from_batch(batch, model.first_stage_key)
    out["reconstruction"] = model.decode_first_stage(z)
    if getattr(model, "concat_keys", ()):
        out["mask"] = (model.image_from_batch(batch, model.mask_key) * 2 - 1).repeat(1, 3, 1, 1)
    if getattr(model, "masked_image_key", None) in batch:
        out["masked_image"] = model.image_from_batch(batch, model.masked_image_key)
    start, end = getattr(model, "c_concat_log_start", None), getattr(model, "c_concat_log_end", None)
    if start is not None and end is not None and isinstance(cond, dict):  # e.g. 1, 5: the masked-image latent
        out["c_concat_decoded"] = model.decode_first_stage(cond["c_concat"][0][:, start:end])
    if not sample:
        return {k: v.detach().float().cpu() for k, v in out.items()}

    uncond = None
    if unconditional_guidance_scale > 1.0:
        uncond = model.null_conditioning(cond, unconditional_guidance_label)

    scope = model.ema_scope("log_images") if use_ema_scope else nullcontext()
    with scope:
        shape = tuple(z.shape[1:])
        gen = torch.Generator(device="cpu").manual_seed(seed)
        x_T = torch.randn((n, *shape), generator=gen).to(z.device)
        runs = [("samples", 1.0, None)]
        if uncond is not None:
            runs.append((f"samples_cfg_scale_{unconditional_guidance_scale:.2f}", unconditional_guidance_scale, uncond))
        for key, scale, uc in runs:  # with eta > 0 both runs draw the same per-step noise
            noise = torch.Generator(device="cpu").manual_seed(seed + 1)
            samples = sample_latents(model, cond, x_T, sampler=sampler, steps=ddim_steps, scale=scale, uncond=uc,
                                     eta=ddim_eta, generator=noise)
            out[key] = model.decode_first_stage(samples)
    return {k: v.detach().float().cpu() for k, v in out.items()}

