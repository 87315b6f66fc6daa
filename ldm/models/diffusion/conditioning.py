"""Caption dropout for classifier-free-guidance training (ldm's ``ucg_training``), as a pure function.

Its sampling-side twin, the null conditioning that guidance pairs with the real one, is
``LatentDiffusion.null_conditioning`` (text only) and ``LatentInpaintDiffusion.null_conditioning`` (keeps
``c_concat``); both encode the same null caption ("") this dropout writes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class CaptionDropout:
    """One entry of ``ucg_training`` (``{batch_key: {p, val}}``); a dataclass so that a mistyped key is an error
    at start-up (``ldm.config_schema``) instead of a dropout probability that silently stays 0.

    Args:
        p: probability of replacing each sample's entry.
        val: the replacement (None means "").
    """

    p: float = 0.0
    val: str | None = ""


def drop_captions(batch: Mapping[str, Any], ucg_training: Mapping[str, Mapping[str, Any]],
                  rng: np.random.Generator) -> dict[str, Any]:
    """A copy of ``batch`` in which each entry of every key in ``ucg_training`` (``{key: {p, val}}``) is replaced
    by ``val`` (None means "") with probability ``p``, independently per sample, drawn from ``rng``.

    The replacement is the *string* (encoded later), so the unconditional embedding is the text encoder's output
    for "", exactly what sampling uses.
    """
    batch = dict(batch)
    for key, spec in ucg_training.items():
        spec = CaptionDropout(**spec)  # an unknown key raises here too, not only in a checked config
        p, val = float(spec.p), "" if spec.val is None else spec.val
        values = list(batch[key])
        drop = rng.random(len(values)) < p  # [B]
        batch[key] = [val if d else v for v, d in zip(values, drop)]
    return batch
