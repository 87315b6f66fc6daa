"""The keys of one data split (``data.params.train`` / ``validation`` / ``test`` of ``WebDataModuleFromConfig``).

A dataclass rather than a loose mapping so that the config check (``ldm.config_schema``, "nested keys") names an
unknown or mistyped split key with its full path and a "did you mean", like every other key, and so that
``configs/README.md`` lists the keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ldm.config_schema import NonNegativeInt


@dataclass(frozen=True)
class SplitConfig:
    """One split of ``ldm.data.laion.WebDataModuleFromConfig``.

    Args:
        shards: Brace pattern (``'/data/{00000..00099}.tar'``) or list of patterns, joined to ``tar_base``.
        shuffle: Shuffle buffer size in samples (0: read in order).
        image_key: Member extension holding the image.
        image_transforms: ``{target, params}`` list of torchvision transforms (``Resize``, ``RandomCrop``,
            ``CenterCrop``, ``RandomHorizontalFlip`` run as seeded PIL operations; ``ldm.data.transforms``).
        postprocess: ``{target, params}`` called on each finished sample (``ldm.data.laion.AddMask``).
        transforms: ldm's per-member transforms: member extension -> ``{target, params}`` (not the image).
        resampled: Infinite stream drawing shards with replacement; None = true for train, false otherwise.
        latent_moments: Precomputed image latents of ``scripts/precompute_latents.py``: None = use them when a
            ``latent_moments.json`` lies beside the shards, true = require them, false = encode online, or the
            path of the ``latent_moments.json`` (``ldm.data.latents``).
    """

    shards: str | list[str]
    shuffle: NonNegativeInt = 0
    image_key: str = "jpg"
    image_transforms: list[dict[str, Any]] | None = None
    postprocess: dict[str, Any] | None = None
    transforms: dict[str, Any] | None = None
    resampled: bool | None = None
    latent_moments: bool | str | None = None


__all__ = ["SplitConfig"]
