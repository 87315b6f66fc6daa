"""DiffusionWrapper: routes conditioning into the UNet. A plain nn.Module with no diffusion math.

The attribute name ``diffusion_model`` fixes the checkpoint prefix ``model.diffusion_model.*``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ldm.util import ConfigError, instantiate_from_config

CONDITIONING_KEYS = (None, "concat", "crossattn", "hybrid", "adm", "hybrid-adm", "crossattn-adm")


class DiffusionWrapper(nn.Module):
    """Feed ``x_t`` and the conditioning to the UNet the way ``conditioning_key`` says.

    * ``concat``: ``c_concat`` tensors are stacked on channels after ``x_t``.
    * ``crossattn``: ``c_crossattn`` tensors are joined on the sequence axis and used as attention context.
    * ``hybrid``: both; the SD2 inpainting layout is ``[x_t (4), mask (1), masked-image latent (4)]``.
    * ``adm`` variants pass ``c_adm`` as the UNet's class/vector label ``y``.

    Args:
        diff_model_config: ``target``/``params`` config of the UNet.
        conditioning_key: one of :data:`CONDITIONING_KEYS`.
    """

    def __init__(self, diff_model_config: dict[str, Any], conditioning_key: str | None) -> None:
        super().__init__()
        if conditioning_key not in CONDITIONING_KEYS:
            raise ConfigError(f"conditioning_key={conditioning_key!r}: expected one of {CONDITIONING_KEYS}")
        self.diffusion_model = instantiate_from_config(diff_model_config)
        self.conditioning_key = conditioning_key

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        c_concat: list[torch.Tensor] | None = None,
        c_crossattn: list[torch.Tensor] | None = None,
        c_adm: torch.Tensor | None = None,
    ) -> torch.Tensor:
        key = self.conditioning_key
        context = torch.cat(c_crossattn, 1) if c_crossattn else None  # B x (sum of L) x D
        if key in ("concat", "hybrid", "hybrid-adm") and c_concat:
            x = torch.cat([x, *c_concat], dim=1)  # B x (C + sum of concat channels) x H x W
        if key == "concat":
            context = None
        y = c_adm if key in ("adm", "hybrid-adm", "crossattn-adm") else None
        if key is None or key == "adm":
            context = None
        return self.diffusion_model(x, t, context=context, y=y)
