"""Convolutional encoder and decoder of the SD2 KL autoencoder (the "VAE"), with ldm's module and key names.

What is here: ``Encoder`` (image -> stacked latent mean/log-variance) and ``Decoder`` (latent -> image), built from
``ResnetBlock``, single-head ``AttnBlock``, ``Downsample`` and ``Upsample``. Module attribute names (``down.{i}.block``,
``mid.attn_1``, ``up.{i}.upsample`` ...) reproduce ldm's state-dict keys exactly, so released checkpoints load
unchanged (checked against ``first_stage_model.*`` in ``tests/fixtures/sd2-inpainting-keys.tsv``).

Deliberately left out of ldm's file: the pixel-space DDPM ``Model`` and the timestep-embedding branch of
``ResnetBlock`` (the VAE never uses a timestep), linear attention (``use_linear_attn`` / ``attn_type="linear"``
raise), the ``conv_shortcut`` 3x3 variant, and the VQ/upsampler helper networks.

Shapes, with ``f = 2 ** (len(ch_mult) - 1)`` (8 for SD2): ``Encoder`` maps ``B x in_channels x H x W`` to
``B x 2*z_channels x H/f x W/f`` (``z_channels`` when ``double_z`` is False); ``Decoder`` maps
``B x z_channels x h x w`` to ``B x out_ch x h*f x w*f``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

AttnType = Literal["vanilla", "vanilla-xformers"]

# COMPAT: ldm passes the whole ``ddconfig`` to both halves, so each half must accept the keys only the other
# half uses. Those keys (and only those) are accepted and ignored; anything else is a config error.
_ENCODER_ONLY_KEYS = frozenset({"in_channels", "double_z"})
_DECODER_ONLY_KEYS = frozenset({"out_ch", "give_pre_end", "tanh_out"})


def Normalize(in_channels: int, num_groups: int = 32) -> nn.GroupNorm:
    """GroupNorm with ldm's VAE settings (32 groups, eps 1e-6, affine)."""
    return nn.GroupNorm(num_groups=num_groups, num_channels=in_channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """``x + conv(silu(norm(conv(silu(norm(x))))))``, with a 1x1 ``nin_shortcut`` when channels change."""

    def __init__(self, in_channels: int, out_channels: int | None = None, dropout: float = 0.0) -> None:
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.norm2 = Normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all spatial positions, with 1x1-conv q/k/v/proj_out (ldm key names).

    The attention itself runs through ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels where
    available); its default scale ``1/sqrt(C)`` is the one ldm uses. This one block serves both ``"vanilla"`` and
    ``"vanilla-xformers"``: the two differ in ldm only in the kernel, not in the math or the weights.
    """

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.norm = Normalize(in_channels)
        self.q = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.k = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.v = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.proj_out = nn.Conv2d(in_channels, in_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        b, c, height, width = h.shape

        def tokens(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(b, 1, c, height * width).transpose(-1, -2)  # B x 1 head x HW x C

        out = F.scaled_dot_product_attention(tokens(self.q(h)), tokens(self.k(h)), tokens(self.v(h)))
        out = out.transpose(-1, -2).reshape(b, c, height, width)  # back to B x C x H x W
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Halve H and W: zero-pad right/bottom by one then a stride-2 3x3 conv, or 2x2 average pooling."""

    def __init__(self, in_channels: int, with_conv: bool) -> None:
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.with_conv:
            return F.avg_pool2d(x, kernel_size=2, stride=2)
        # COMPAT: ldm pads asymmetrically (0 left/top, 1 right/bottom) instead of padding=1 on all sides; the
        # released weights were trained with this alignment, so it must stay.
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    """Double H and W with nearest-neighbour interpolation, optionally followed by a 3x3 conv."""

    def __init__(self, in_channels: int, with_conv: bool) -> None:
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if self.with_conv else x


def make_attn(in_channels: int, attn_type: str = "vanilla") -> AttnBlock:
    """Build the attention block named by ``attn_type`` (``"vanilla"`` and ``"vanilla-xformers"`` are the same)."""
    if attn_type not in ("vanilla", "vanilla-xformers"):
        raise ValueError(
            f"ddconfig.attn_type={attn_type!r} is not supported; use 'vanilla' (or 'vanilla-xformers', which "
            f"maps to the same SDPA-based block). Linear attention is not implemented."
        )
    return AttnBlock(in_channels)


def _check_other_half(extra: dict[str, Any], allowed: frozenset[str], who: str) -> None:
    unknown = sorted(set(extra) - allowed)
    if unknown:
        raise ValueError(f"{who}: unknown ddconfig key(s) {unknown}. Fix the spelling or remove the key.")


class _MidBlock(nn.Module):
    """ResnetBlock -> AttnBlock -> ResnetBlock at the lowest resolution (always present, even with no
    ``attn_resolutions``)."""

    def __init__(self, channels: int, dropout: float, attn_type: str) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout)
        self.attn_1 = make_attn(channels, attn_type)
        self.block_2 = ResnetBlock(channels, channels, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class _Level(nn.Module):
    """One resolution level: ResnetBlocks in ``block``, each followed by ``attn[i]`` when the level has
    attention. The owner attaches ``downsample`` or ``upsample`` (key names from ldm)."""

    def __init__(self, blocks: list[ResnetBlock], attns: list[AttnBlock]) -> None:
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attns)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            h = block(h)
            if len(self.attn) > 0:
                h = self.attn[i](h)
        return h


def _make_level(
    c_in: int, c_out: int, n_blocks: int, with_attn: bool, dropout: float, attn_type: str
) -> tuple[_Level, int]:
    blocks, attns = [], []
    for _ in range(n_blocks):
        blocks.append(ResnetBlock(c_in, c_out, dropout))
        c_in = c_out
        if with_attn:
            attns.append(make_attn(c_in, attn_type))
    return _Level(blocks, attns), c_in


class Encoder(nn.Module):
    """Image -> latent moments. ldm's ``ddconfig`` keys; see the module docstring for shapes.

    Args:
        ch: base channel count (128 for SD2); level ``i`` has ``ch * ch_mult[i]`` channels.
        ch_mult: channel multipliers per resolution level; ``len(ch_mult) - 1`` downsamplings.
        num_res_blocks: ResnetBlocks per level (2 for SD2).
        attn_resolutions: feature-map sizes (relative to ``resolution``) that get an AttnBlock after every
            ResnetBlock. The mid-block attention is always present.
        in_channels: image channels (3).
        resolution: nominal input size; only used to decide where ``attn_resolutions`` applies.
        z_channels: latent channels (4 for SD2).
        dropout: dropout probability inside ResnetBlocks.
        resamp_with_conv: stride-2 conv downsampling (True) or average pooling (False).
        double_z: output ``2 * z_channels`` (mean and log-variance), as AutoencoderKL requires.
        use_linear_attn: must be False (linear attention is not implemented).
        attn_type: ``"vanilla"`` or ``"vanilla-xformers"`` (same SDPA block).
        **decoder_keys: COMPAT: ``out_ch``, ``give_pre_end``, ``tanh_out`` from a shared ddconfig, ignored here.
    """

    def __init__(
        self,
        *,
        ch: int,
        num_res_blocks: int,
        attn_resolutions: Sequence[int],
        in_channels: int,
        resolution: int,
        z_channels: int,
        ch_mult: Sequence[int] = (1, 2, 4, 8),
        dropout: float = 0.0,
        resamp_with_conv: bool = True,
        double_z: bool = True,
        use_linear_attn: bool = False,
        attn_type: AttnType = "vanilla",
        **decoder_keys: Any,
    ) -> None:
        super().__init__()
        _check_other_half(decoder_keys, _DECODER_ONLY_KEYS, "Encoder")
        if use_linear_attn:
            raise ValueError("ddconfig.use_linear_attn=True (linear attention) is not supported; set it to false.")
        self.ch, self.num_res_blocks, self.resolution = ch, num_res_blocks, resolution
        self.num_resolutions = len(ch_mult)
        self.in_channels = in_channels

        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, stride=1, padding=1)
        in_ch_mult = (1, *ch_mult)
        curr_res, block_in = resolution, ch
        self.down = nn.ModuleList()
        for i_level in range(self.num_resolutions):
            level, block_in = _make_level(
                ch * in_ch_mult[i_level], ch * ch_mult[i_level], num_res_blocks,
                curr_res in attn_resolutions, dropout, attn_type,
            )
            if i_level != self.num_resolutions - 1:
                level.downsample = Downsample(block_in, resamp_with_conv)
                curr_res //= 2
            self.down.append(level)

        self.mid = _MidBlock(block_in, dropout, attn_type)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(
            block_in, 2 * z_channels if double_z else z_channels, kernel_size=3, stride=1, padding=1
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent -> image. Mirrors :class:`Encoder` with ``num_res_blocks + 1`` blocks per level.

    Args:
        ch: base channel count (128 for SD2).
        out_ch: image channels produced (3).
        num_res_blocks: the decoder uses ``num_res_blocks + 1`` ResnetBlocks per level (3 for SD2).
        attn_resolutions: feature-map sizes that get an AttnBlock after every ResnetBlock (mid attention is
            always present).
        resolution: nominal output size; decides where ``attn_resolutions`` applies and sets ``z_shape``.
        z_channels: latent channels (4 for SD2).
        ch_mult: channel multipliers per level, given in encoder order.
        dropout: dropout probability inside ResnetBlocks.
        resamp_with_conv: follow each nearest-neighbour upsampling with a 3x3 conv.
        give_pre_end: return the features before ``norm_out``/``conv_out``.
        tanh_out: squash the output with tanh.
        use_linear_attn: must be False (linear attention is not implemented).
        attn_type: ``"vanilla"`` or ``"vanilla-xformers"`` (same SDPA block).
        **encoder_keys: COMPAT: ``in_channels``, ``double_z`` from a shared ddconfig, ignored here.
    """

    def __init__(
        self,
        *,
        ch: int,
        out_ch: int,
        num_res_blocks: int,
        attn_resolutions: Sequence[int],
        resolution: int,
        z_channels: int,
        ch_mult: Sequence[int] = (1, 2, 4, 8),
        dropout: float = 0.0,
        resamp_with_conv: bool = True,
        give_pre_end: bool = False,
        tanh_out: bool = False,
        use_linear_attn: bool = False,
        attn_type: AttnType = "vanilla",
        **encoder_keys: Any,
    ) -> None:
        super().__init__()
        _check_other_half(encoder_keys, _ENCODER_ONLY_KEYS, "Decoder")
        if use_linear_attn:
            raise ValueError("ddconfig.use_linear_attn=True (linear attention) is not supported; set it to false.")
        self.ch, self.num_res_blocks, self.resolution = ch, num_res_blocks, resolution
        self.num_resolutions = len(ch_mult)
        self.give_pre_end, self.tanh_out = give_pre_end, tanh_out

        block_in = ch * ch_mult[-1]
        curr_res = resolution // 2 ** (self.num_resolutions - 1)
        self.z_shape = (1, z_channels, curr_res, curr_res)
        log.debug("Decoder works with z of shape %s", self.z_shape)

        self.conv_in = nn.Conv2d(z_channels, block_in, kernel_size=3, stride=1, padding=1)
        self.mid = _MidBlock(block_in, dropout, attn_type)
        levels: list[_Level] = []
        for i_level in reversed(range(self.num_resolutions)):
            level, block_in = _make_level(
                block_in, ch * ch_mult[i_level], num_res_blocks + 1,
                curr_res in attn_resolutions, dropout, attn_type,
            )
            if i_level != 0:
                level.upsample = Upsample(block_in, resamp_with_conv)
                curr_res *= 2
            levels.insert(0, level)  # COMPAT: up.0 is the full-resolution level, as in ldm's keys
        self.up = nn.ModuleList(levels)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, out_ch, kernel_size=3, stride=1, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        if self.give_pre_end:
            return h
        h = self.conv_out(F.silu(self.norm_out(h)))
        return torch.tanh(h) if self.tanh_out else h
