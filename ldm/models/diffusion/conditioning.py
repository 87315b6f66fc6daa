"""Caption dropout for classifier-free-guidance training (ldm's ``ucg_training``), as a pure function.

Its sampling-side twin, the null conditioning that guidance pairs with the real one, is
``LatentDiffusion.null_conditioning`` (text only) and ``LatentInpaintDiffusion.null_conditioning`` (keeps
``c_concat``); both encode the same null caption ("") this dropout writes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np


def drop_captions(batch: Mapping[str, Any], ucg_training: Mapping[str, Mapping[str, Any]],
                  rng: np.random.Generator) -> dict[str, Any]:
    """A copy of ``batch`` in which each entry of every key in ``ucg_training`` (``{key: {p, val}}``) is replaced
    by ``val`` (None means "") with probability ``p``, independently per sample, drawn from ``rng``.

    The replacement is the *string* (encoded later), so the unconditional embedding is the text encoder's output
    for "", exactly what sampling uses.
    """
    batch = dict(batch)
    for key, spec in ucg_training.items():
        p, val = float(spec.get("p", 0.0)), spec.get("val", "")
        val = "" if val is None else val
        values = list(batch[key])
        drop = rng.random(len(values)) < p  # [B]
        batch[key] = [val if d else v for v, d in zip(values, drop)]
    return batch
