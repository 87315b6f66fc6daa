"""LatentInpaintDiffusion: LatentDiffusion plus the SD2 inpainting conditioning (mask + masked-image latent).

Importable as ``ldm.models.diffusion.ddpm.LatentInpaintDiffusion`` (the name configs use). Everything else,
including the 4 -> 9 channel widening at checkpoint load (driven by ``finetune_keys``), is inherited.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ldm import compat
from ldm.config_schema import ConfigError, NonNegativeInt
from ldm.models.diffusion.latent_diffusion import LatentDiffusion


class LatentInpaintDiffusion(LatentDiffusion):
    """SD2 inpainting: the UNet also sees the mask and the masked-image latent (``conditioning_key: hybrid``).

    Conditioning (DECISIONS D5): ``c_concat = [mask resized to the latent grid with nearest (1 ch),
    scale_factor * VAE posterior sample of the masked image (4 ch)]``, so UNet input channels are
    0-3 noisy latent, 4 mask, 5-8 masked-image latent. Text goes through cross-attention.

    Args:
        concat_keys: batch keys stacked into ``c_concat``, in order (a key named like ``masked_image_key`` is
            VAE-encoded; others are resized).
        masked_image_key: batch key of the masked image.
        finetune_keys: checkpoint keys widened 4 -> ``in_channels`` at init (model and EMA twin);
            ``null`` disables the surgery (loading an inpainting checkpoint).
        keep_finetune_dims: input channels copied from the checkpoint; the rest start at zero.
        c_concat_log_start, c_concat_log_end: channel range of ``c_concat`` to decode for logging
            (None = log the masked image from the batch instead).
        **kwargs: every :class:`LatentDiffusion` parameter.
    """

    def __init__(
        self,
        *args: Any,
        concat_keys: Sequence[str] = ("mask", "masked_image"),
        masked_image_key: str = "masked_image",
        finetune_keys: Sequence[str] | None = compat.INPAINT_FINETUNE_KEYS,
        keep_finetune_dims: NonNegativeInt = 4,
        c_concat_log_start: NonNegativeInt | None = None,
        c_concat_log_end: NonNegativeInt | None = None,
        **kwargs: Any,
    ) -> None:
        self.finetune_keys = tuple(finetune_keys or ())
        self.keep_finetune_dims = keep_finetune_dims
        self.concat_keys = tuple(concat_keys)  # before LatentDiffusion's channel check, which reads them
        self.masked_image_key = masked_image_key
        self.mask_key  # noqa: B018 - one mask key plus the masked image, checked at start-up
        super().__init__(*args, **kwargs)
        self.c_concat_log_start, self.c_concat_log_end = c_concat_log_start, c_concat_log_end

    required_conditioning_key = "hybrid"
    required_conditioning_why = "mask and masked-image latent concatenated to the input, text by cross-attention"

    def concat_channels(self, latent_channels: int) -> list[tuple[str, int]]:
        """The mask (1 channel) and the masked image's VAE latent (``latent_channels``), in ``concat_keys`` order."""
        return [(f"masked-image latent '{k}'", latent_channels) if k == self.masked_image_key else (f"mask '{k}'", 1)
                for k in self.concat_keys]

    @property
    def mask_key(self) -> str:
        """The concat key that holds the mask: the one key of ``concat_keys`` besides ``masked_image_key``."""
        others = [k for k in self.concat_keys if k != self.masked_image_key]
        if len(others) != 1:
            raise ConfigError(f"{list(self.concat_keys)} must be one mask key plus masked_image_key="
                              f"{self.masked_image_key!r} to condition on a mask and a masked image", key="concat_keys")
        return others[0]

    def inpaint_conditioning(self, mask: torch.Tensor, masked_image: torch.Tensor, text: torch.Tensor,
                             generator: torch.Generator | None = None) -> dict[str, list[torch.Tensor]]:
        """The hybrid conditioning for sampling from B,C,H,W ``mask`` and ``masked_image`` and encoded ``text``.

        ``c_concat`` is built exactly as in training (:meth:`build_c_concat`, keys from ``concat_keys``); the
        masked image's VAE posterior sample is drawn from ``generator``. Its unconditional twin is
        ``null_conditioning(cond)``.
        """
        c_cat = self.build_c_concat({self.mask_key: mask, self.masked_image_key: masked_image}, generator=generator)
        return {"c_concat": [c_cat], "c_crossattn": [text]}

    def null_conditioning(self, cond: Mapping[str, list[torch.Tensor]],
                          null_label: Sequence[str] | str | None = None) -> dict[str, list[torch.Tensor]]:
        """The unconditional counterpart of the hybrid ``cond``, the one rule every sampling path uses.

        ``c_concat`` (mask and masked-image latent, whatever ``concat_keys`` holds) is kept, as the same tensors;
        only the text in ``c_crossattn`` becomes the encoding of ``null_label`` ("" by default), as SD2's scripts
        do (DECISIONS D11).
        """
        if "c_crossattn" not in cond or "c_concat" not in cond:
            raise ValueError(f"null_conditioning: expected a hybrid dict with 'c_concat' and 'c_crossattn', "
                             f"got {sorted(cond) if isinstance(cond, Mapping) else type(cond).__name__}")
        return {**cond, "c_crossattn": [super().null_conditioning(cond["c_crossattn"][0], null_label)]}

    def concat_conditioning(self, batch: Mapping[str, Any], latent_hw: tuple[int, int], bs: int | None = None,
                            generator: torch.Generator | None = None) -> torch.Tensor:
        """Build ``c_concat`` (B x 5 x h x w for SD2) from the batch's mask and masked image (B,H,W,C layout)."""
        tensors = {key: self.image_from_batch(batch, key)[:bs].to(self.device) for key in self.concat_keys}
        return self.build_c_concat(tensors, latent_hw, generator=generator)

    def build_c_concat(self, tensors: Mapping[str, torch.Tensor], latent_hw: tuple[int, int] | None = None,
                       generator: torch.Generator | None = None) -> torch.Tensor:
        """``c_concat`` from B,C,H,W tensors keyed like ``concat_keys``; shared by training and sampling.

        The masked image is VAE-encoded (posterior *sample*, from ``generator`` when given); other keys (the
        mask) are resized to the latent grid with nearest, i.e. pixel (8i, 8j) as the reference (COMPAT).
        ``latent_hw`` defaults to the masked-image latent's size.
        """
        missing = [k for k in self.concat_keys if k not in tensors]
        if missing:
            raise ValueError(f"concat conditioning needs {missing} (concat_keys={list(self.concat_keys)})")
        encoded = {k: self.get_first_stage_encoding(self.encode_first_stage(tensors[k]), generator=generator)
                   for k in self.concat_keys if k == self.masked_image_key}
        if latent_hw is None:
            if not encoded:
                raise ValueError("latent_hw is required when no concat key is VAE-encoded")
            latent_hw = tuple(next(iter(encoded.values())).shape[-2:])
        parts = [encoded[k] if k in encoded else torch.nn.functional.interpolate(tensors[k], size=latent_hw)
                 for k in self.concat_keys]
        return torch.cat(parts, dim=1).detach()  # B x (1 + 4) x h x w

    def get_input(self, batch: Mapping[str, Any], k: str, bs: int | None = None, **legacy: Any):
        z, c = super().get_input(batch, k, bs=bs, **legacy)
        c_cat = self.concat_conditioning(batch, tuple(z.shape[-2:]), bs=bs)
        return z, {"c_concat": [c_cat], "c_crossattn": [c]}
