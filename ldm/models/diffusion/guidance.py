"""Classifier-free guidance (Ho & Salimans 2022): batch cond + uncond, run once, mix the two outputs.

Guidance is applied to the *raw* model output, whatever the model predicts (eps for the SD2 512/inpainting
checkpoints, v for 768-v and for our v-objective fine-tune), exactly as ldm's samplers do. Because the
conversions in ``parameterization`` are affine in the output with the same ``x_t`` for both halves, mixing v
and then converting equals converting and then mixing eps.

Conditioning may be a tensor, a list of tensors, or a dict whose values are tensors or lists of tensors
(the hybrid ``{"c_concat": [...], "c_crossattn": [...]}`` of the inpainting model). The unconditional
conditioning must have the same structure; every leaf is concatenated ``[uncond, cond]`` along the batch.
Left out: classifier guidance and guidance rescaling/thresholding.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

ApplyModel = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]
ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _cat_pair(uncond: Any, cond: Any, where: str) -> Any:
    """Concatenate matching leaves of ``uncond`` and ``cond`` along dim 0, keeping the structure."""
    if isinstance(cond, torch.Tensor):
        if not isinstance(uncond, torch.Tensor):
            raise ValueError(f"unconditional_conditioning{where} must be a tensor like conditioning{where}")
        return torch.cat([uncond, cond])  # [2B, ...]: uncond first, as ldm
    if isinstance(cond, Mapping):
        if not isinstance(uncond, Mapping) or set(uncond) != set(cond):
            raise ValueError(
                f"unconditional_conditioning{where} must be a dict with the keys {sorted(cond)} of conditioning"
            )
        return {k: _cat_pair(uncond[k], cond[k], f"{where}[{k!r}]") for k in cond}
    if isinstance(cond, Sequence) and not isinstance(cond, str):
        if not isinstance(uncond, Sequence) or isinstance(uncond, str) or len(uncond) != len(cond):
            raise ValueError(
                f"unconditional_conditioning{where} must be a list of {len(cond)} entries like conditioning"
            )
        return [_cat_pair(u, c, f"{where}[{i}]") for i, (u, c) in enumerate(zip(uncond, cond))]
    raise ValueError(f"conditioning{where} has unsupported type {type(cond).__name__}; use tensors, lists, dicts")


def cfg_batch(x: torch.Tensor, t: torch.Tensor, cond: Any, uncond: Any) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """Doubled inputs ``(x_in [2B, ...], t_in [2B], c_in)``, unconditional half first."""
    return torch.cat([x, x]), torch.cat([t, t]), _cat_pair(uncond, cond, "")


def cfg_combine(out: torch.Tensor, scale: float) -> torch.Tensor:
    """Split ``out`` ``[2B, ...]`` into (uncond, cond) halves and return uncond + scale (cond - uncond)."""
    out_uncond, out_cond = out.chunk(2)  # [B, ...] each
    return out_uncond + scale * (out_cond - out_uncond)


def guided_model_fn(apply_model: ApplyModel, cond: Any, uncond: Any, scale: float) -> ModelFn:
    """``(x, t) -> guided output`` for ``apply_model(x, t, cond)``.

    With ``uncond is None`` or ``scale == 1`` the guided output is the conditional one, so the model runs once
    on the plain batch (ldm does the same).
    """
    if uncond is None or scale == 1.0:
        return lambda x, t: apply_model(x, t, cond)

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return cfg_combine(apply_model(*cfg_batch(x, t, cond, uncond)), scale)

    return model_fn
