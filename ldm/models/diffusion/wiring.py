"""Start-up checks that the parts of a ``LatentDiffusion`` config fit together (channels, widths), and the
in-place ``torch.compile`` of its parts.

Each part's own config can be valid while the parts disagree: a UNet whose ``in_channels`` is not the latent plus
the concatenated conditioning, a VAE with another latent width than ``channels``, a cross-attention width that is
not the text encoder's. PyTorch would report any of these as a ~150-line convolution or matmul shape error at the
first training step, after the model, the data workers and the run directory exist. These checks run in the
constructor instead (before the UNet is built, for the channel counts) and name the config key, the value and
the value that fits.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ldm.config_schema import ConfigError

#: conditioning keys that stack ``c_concat`` after the noisy latent / that feed text through cross-attention
CONCAT_KEYS = ("concat", "hybrid", "hybrid-adm")
CROSSATTN_KEYS = ("crossattn", "hybrid", "crossattn-adm", "hybrid-adm")


def _params(config: Any) -> Mapping[str, Any]:
    params = config.get("params") if isinstance(config, Mapping) else None
    return params if isinstance(params, Mapping) else {}


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def check_channels(unet_config: Any, first_stage_config: Any, channels: int, conditioning_key: str | None,
                   concat_parts: Sequence[tuple[str, int]] | None) -> None:
    """Check ``channels`` against the VAE's ``embed_dim`` and the UNet's ``in_channels``/``out_channels``.

    Args:
        unet_config: ``model.params.unet_config`` (its ``params.in_channels``/``out_channels`` are read when given).
        first_stage_config: ``model.params.first_stage_config`` (``params.embed_dim`` is read when given).
        channels: ``model.params.channels``, the latent channels.
        conditioning_key: the resolved conditioning key.
        concat_parts: ``(description, channels)`` of each tensor stacked after the latent with a concat-type
            ``conditioning_key``; None when the config does not say (ldm's generic concat conditioning).

    Raises:
        ConfigError: keyed ``channels`` or ``unet_config.params.<key>``.
    """
    embed_dim = _int(_params(first_stage_config).get("embed_dim"))
    if embed_dim is not None and embed_dim != channels:
        raise ConfigError(f"{channels}, but the VAE makes {embed_dim}-channel latents (first_stage_config.params."
                          f"embed_dim); set channels: {embed_dim}", key="channels")
    unet = _params(unet_config)
    out_channels = _int(unet.get("out_channels"))
    if out_channels is not None and out_channels != channels:
        raise ConfigError(f"{out_channels}, but the UNet predicts a {channels}-channel latent (model.params."
                          f"channels); set out_channels: {channels}", key="unet_config.params.out_channels")
    in_channels = _int(unet.get("in_channels"))
    parts = [("noisy latent", channels)]
    if conditioning_key in CONCAT_KEYS:
        if concat_parts is None:
            return
        parts += list(concat_parts)
    expected = sum(n for _, n in parts)
    if in_channels is not None and in_channels != expected:
        terms = " + ".join(f"{name} {n}" for name, n in parts)
        raise ConfigError(f"{in_channels}, but with conditioning_key {conditioning_key!r} the UNet input is {terms} = "
                          f"{expected} channels; set in_channels: {expected}", key="unet_config.params.in_channels")


def check_context_dim(unet_config: Any, cond_stage_model: torch.nn.Module | None,
                      conditioning_key: str | None) -> None:
    """Check the UNet's cross-attention ``context_dim`` against the text encoder's output width.

    The width is the encoder's ``output_dim`` attribute when it has one (``FrozenOpenCLIPEmbedder``); other
    encoders are not checked.

    Raises:
        ConfigError: keyed ``unet_config.params.context_dim``.
    """
    if conditioning_key not in CROSSATTN_KEYS:
        return
    context_dim = _int(_params(unet_config).get("context_dim"))
    width = _int(getattr(cond_stage_model, "output_dim", None))
    if context_dim is not None and width is not None and context_dim != width:
        raise ConfigError(f"{context_dim}, but the text encoder (cond_stage_config) returns {width}-wide token "
                          f"states; set context_dim: {width}", key="unet_config.params.context_dim")


__all__ = ["CONCAT_KEYS", "CROSSATTN_KEYS", "check_channels", "check_context_dim"]


def compile_in_place(module: torch.nn.Module | None, option: bool | Mapping[str, Any],
                     key: str = "model.params.compile_unet") -> None:
    """``torch.compile`` ``module`` in place when ``option`` is True (defaults) or a dict of compile keyword
    arguments. ``nn.Module.compile`` keeps the state-dict keys, so checkpoints do not change."""
    if not option:
        return
    if module is None:
        raise ConfigError(f"{key} is set but the model has no such part to compile; remove {key}")
    module.compile(**(dict(option) if isinstance(option, Mapping) else {}))
