"""Images for the training logs: inputs, mask, masked image, reconstructions and samples with/without CFG.

Called through ``LatentDiffusion.log_images`` (which ``main.ImageLogger`` invokes). Everything returned is a
B x 3 x H x W tensor in [-1, 1] (masks are mapped to {-1, 1}) so the logger can grid them uniformly.
"""

from __future__ import annotations

import inspect
import logging
import typing
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from typing import Any

import torch

from ldm import compat
from ldm.config_schema import (
    ConfigError,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveInt,
    Probability,
    check_value,
    suggest,
)
from ldm.defaults import GUIDANCE_SCALE
from ldm.models.diffusion.sampling import get_sampler, sample_latents
from ldm.models.diffusion.schedule import ddim_timesteps

log = logging.getLogger(__name__)


def _slice_batch(batch: Mapping[str, Any], n: int) -> dict[str, Any]:
    return {k: (v[:n] if hasattr(v, "__getitem__") and not isinstance(v, (str, bytes)) else v)
            for k, v in batch.items()}


def check_log_images_kwargs(kwargs: Mapping[str, Any], num_timesteps: int | None = None) -> None:
    """Check keyword arguments for :func:`log_images` before any image is logged (``ImageLogger.check_model``).

    Each option must be a parameter of :func:`log_images` or in :data:`ldm.compat.IGNORED_LOG_IMAGES_KWARGS`,
    of the annotated type and range; ``sampler`` must be registered, ``ddim_eta`` must pass its eta rule and
    ``ddim_steps`` must fit a ``num_timesteps``-step schedule.

    Raises:
        ConfigError: keyed ``log_images_kwargs.<option>``.
    """
    hints = typing.get_type_hints(log_images, include_extras=True)
    known = [n for n in inspect.signature(log_images).parameters if n not in ("model", "batch", "ignored")]
    for key, value in kwargs.items():
        where = f"log_images_kwargs.{key}"
        if key in compat.IGNORED_LOG_IMAGES_KWARGS:
            continue
        if key not in known:
            raise ConfigError(f"unknown option{suggest(key, known)}; valid options: {', '.join(known)}", key=where)
        expected = check_value(value, hints.get(key, Any))
        if expected is not None:
            raise ConfigError(f"expected {expected}, got {value!r}", key=where)
    key = "sampler"
    try:
        sampler = get_sampler(kwargs.get("sampler", "ddim"))
        key = "ddim_eta"
        sampler.check(kwargs.get("ddim_eta", 0.0))
        key = "ddim_steps"
        if num_timesteps is not None and sampler.name == "ddim":  # ldm's grid must fit the schedule
            ddim_timesteps(kwargs.get("ddim_steps", 50), num_timesteps)
    except ValueError as e:
        raise ConfigError(str(e), key=f"log_images_kwargs.{key}") from None


@torch.no_grad()
def log_images(
    model: Any,
    batch: Mapping[str, Any],
    N: PositiveInt = 8,
    n_row: int = 4,  # noqa: ARG001 - grid width is the ImageLogger's choice; kept for ldm signature compat
    sample: bool = True,
    ddim_steps: PositiveInt = 50,
    ddim_eta: Probability = 0.0,
    unconditional_guidance_scale: NonNegativeFloat = GUIDANCE_SCALE,
    unconditional_guidance_label: Sequence[str] | None = None,
    use_ema_scope: bool = True,
    sampler: str = "ddim",
    seed: NonNegativeInt = 0,
    **ignored: Any,
) -> dict[str, torch.Tensor]:
    """Return a dict of image batches for logging.

    Keys: ``inputs``, ``reconstruction``, and for inpainting models ``mask`` and ``masked_image``; with
    ``sample``: ``samples`` (no guidance) and, when ``unconditional_guidance_scale > 1``,
    ``samples_cfg_scale_{s:.2f}``. Without ``unconditional_guidance_scale`` the guided run uses
    ``ldm.defaults.GUIDANCE_SCALE``, the project's one default (docs/DECISIONS.md D11; ldm's was 1, no guided
    run: pass 1.0 for that). The unconditional branch is ``model.null_conditioning``: the concat
    conditioning (mask and masked image) is kept and only the text becomes ``unconditional_guidance_label``
    (default ``[""]``), as SD2 does. Samples start from a fixed seed so successive logs are comparable.
    ``sampler`` is a name in ``ldm.models.diffusion.sampling.SAMPLERS``; ``ddim_eta`` follows its eta rule.
    Keywords in :data:`ldm.compat.IGNORED_LOG_IMAGES_KWARGS` are accepted and ignored; others raise.

    Args:
        model: the LatentDiffusion module.
        batch: a training batch.
        N: images logged (the first N of the batch).
        n_row: accepted for ldm compatibility; the grid width is ``ImageLogger``'s ``nrow``.
        sample: also sample (without it only inputs, masks and reconstructions are logged).
        ddim_steps: sampler steps; with DDIM they must fit the training schedule (ldm's uniform grid).
        ddim_eta: sampler eta (0: deterministic).
        unconditional_guidance_scale: classifier-free guidance scale of the second sample run (> 1 to run it).
        unconditional_guidance_label: the null caption of guidance (default ``[""]``).
        use_ema_scope: sample with the EMA weights.
        sampler: a registered sampler name ("ddim", "dpm").
        seed: seed of the starting noise, fixed so successive logs are comparable.
    """
    check_log_images_kwargs({**ignored, "N": N, "ddim_steps": ddim_steps, "ddim_eta": ddim_eta, "sampler": sampler,
                             "unconditional_guidance_scale": unconditional_guidance_scale, "seed": seed},
                            getattr(model, "num_timesteps", None))  # fail before encoding anything
    compat.note_ignored("ImageLogger.log_images_kwargs", ignored)
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

