"""Caption dropout for classifier-free-guidance training (ldm's ``ucg_training``), as a pure function.

Its sampling-side twin, the null conditioning that guidance pairs with the real one, is
``LatentDiffusion.null_conditioning`` (text only) and ``LatentInpaintDiffusion.null_conditioning`` (keeps
``c_concat``); both encode the same null caption ("") this dropout writes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ldm.config_schema import ConfigError, Probability, check_params, suggest


@dataclass(frozen=True)
class CaptionDropout:
    """One entry of ``ucg_training`` (``{batch_key: {p, val}}``); a dataclass so that a mistyped key is an error
    at start-up (``ldm.config_schema``) instead of a dropout probability that silently stays 0.

    Args:
        p: probability of replacing each sample's entry (required: an entry without it would drop nothing).
        val: the replacement (None means "").
    """

    p: Probability
    val: str | None = ""


def check_caption_dropout(ucg_training: Mapping[str, CaptionDropout | Mapping[str, Any]] | None,
                          cond_stage_key: str) -> dict[str, dict[str, Any]]:
    """``ucg_training`` as ``{batch_key: {"p": p, "val": val}}``, after checking what a config check cannot see.

    Every entry's keys, types and range (``p`` in [0, 1]) are checked as :class:`CaptionDropout`, and its batch key
    must be ``cond_stage_key``: the dropout writes a caption string, which only the conditioning key holds, so any
    other key would fail at the first training step (an unknown key) or corrupt a tensor (an image key).

    Raises:
        ConfigError: naming ``ucg_training.<key>[.<field>]``.
    """
    out = {}
    for key, spec in (ucg_training or {}).items():
        if not isinstance(spec, (CaptionDropout, Mapping)):
            raise ConfigError(f"expected a mapping {{p: probability, val: replacement}}, got {spec!r}",
                              key=f"ucg_training.{key}")
        spec = dataclasses.asdict(spec) if isinstance(spec, CaptionDropout) else dict(spec)
        check_params(CaptionDropout, spec, f"ucg_training.{key}", complete=True)
        if key != cond_stage_key:
            raise ConfigError(f"caption dropout applies to the conditioning batch key, cond_stage_key="
                              f"'{cond_stage_key}'; '{key}' is not it{suggest(key, [cond_stage_key])}",
                              key=f"ucg_training.{key}")
        out[key] = {"p": float(spec["p"]), "val": spec.get("val", "")}
    return out


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
