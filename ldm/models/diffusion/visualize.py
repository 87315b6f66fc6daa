"""Images for the training logs: inputs, mask, masked image, reconstructions and samples with/without CFG.

Called through ``LatentDiffusion.log_images`` (which ``main.ImageLogger`` invokes). Everything returned is a
B x 3 x H x W tensor in [-1, 1] (masks are mapped to {-1, 1}) so the logger can grid them uniformly.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from typing import Any

import torch

log = logging.getLogger(__name__)

#: log_images kwargs that official configs pass but that draw nothing here (see ldm.compat.IGNORED_PARAMS)
IGNORED_KWARGS = ("inpaint", "plot_progressive_rows", "plot_diffusion_rows", "plot_denoise_rows",
                  "quantize_denoised", "return_keys", "plot_inpaint", "plot_swapped_concat")


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
    ``samples_cfg_scale_{s:.2f}``. The unconditional branch shares the concat conditioning (mask and masked
    image) and only replaces the text by ``unconditional_guidance_label`` (default ``[""]``), as SD2 does.
    Samples start from a fixed seed so successive logs are comparable.
    """
    unknown = set(ignored) - set(IGNORED_KWARGS)
    if unknown:
        raise ValueError(f"log_images_kwargs: unknown option(s) {sorted(unknown)}")
    batch = _slice_batch(batch, N)
    out: dict[str, torch.Tensor] = {}
    z, cond = model.get_input(batch, model.first_stage_key)
    n = z.shape[0]
    out["inputs"] = model.image_from_batch(batch, model.first_stage_key)
    out["reconstruction"] = model.decode_first_stage(z)
    concat_keys = getattr(model, "concat_keys", ())
    if "mask" in concat_keys:
        out["mask"] = (model.image_from_batch(batch, "mask") * 2 - 1).repeat(1, 3, 1, 1)
    if getattr(model, "masked_image_key", None) in batch:
        out["masked_image"] = model.image_from_batch(batch, model.masked_image_key)
    start, end = getattr(model, "c_concat_log_start", None), getattr(model, "c_concat_log_end", None)
    if start is not None and end is not None and isinstance(cond, dict):  # e.g. 1, 5: the masked-image latent
        out["c_concat_decoded"] = model.decode_first_stage(cond["c_concat"][0][:, start:end])
    if not sample:
        return {k: v.detach().float().cpu() for k, v in out.items()}

    uncond = None
    if unconditional_guidance_scale > 1.0:
        label = list(unconditional_guidance_label) if unconditional_guidance_label is not None else [""]
        uc_text = model.get_unconditional_conditioning(n, label)
        uncond = {**cond, "c_crossattn": [uc_text]} if isinstance(cond, dict) else uc_text

    scope = model.ema_scope("log_images") if use_ema_scope else nullcontext()
    with scope:
        shape = tuple(z.shape[1:])
        gen = torch.Generator(device="cpu").manual_seed(seed)
        x_T = torch.randn((n, *shape), generator=gen).to(z.device)
        runs = [("samples", 1.0, None)]
        if uncond is not None:
            runs.append((f"samples_cfg_scale_{unconditional_guidance_scale:.2f}", unconditional_guidance_scale, uncond))
        for key, scale, uc in runs:
            samples = sample_latents(model, cond, x_T, steps=ddim_steps, eta=ddim_eta, scale=scale, uncond=uc,
                                     sampler=sampler)
            out[key] = model.decode_first_stage(samples)
    return {k: v.detach().float().cpu() for k, v in out.items()}


def sample_latents(
    model: Any,
    cond: Any,
    x_T: torch.Tensor,
    steps: int,
    eta: float = 0.0,
    scale: float = 1.0,
    uncond: Any = None,
    sampler: str = "ddim",
) -> torch.Tensor:
    """Run a sampler from ``x_T`` and return latents (shared by logging and the sampling scripts)."""
    from ldm.models.diffusion.ddim import DDIMSampler
    from ldm.models.diffusion.dpm_solver import DPMSolverSampler

    if sampler == "ddim":
        s = DDIMSampler(model)
        kw = {"eta": eta}
    elif sampler in ("dpm", "dpmpp", "dpm_solver"):
        s = DPMSolverSampler(model)
        kw = {}
    else:
        raise ValueError(f"sampler={sampler!r}: expected 'ddim' or 'dpm'")
    samples, _ = s.sample(
        S=steps, batch_size=x_T.shape[0], shape=tuple(x_T.shape[1:]), conditioning=cond, x_T=x_T,
        unconditional_guidance_scale=scale, unconditional_conditioning=uncond, verbose=False, **kw,
    )
    return samples
