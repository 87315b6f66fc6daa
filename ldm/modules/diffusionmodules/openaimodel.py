"""The SD2 denoising UNet (``UNetModel``) and its building blocks.

In here: ``TimestepBlock`` / ``TimestepEmbedSequential`` (route the timestep embedding and the text context
to the layers that take them), ``ResBlock``, ``Downsample``, ``Upsample`` and ``UNetModel``. The module tree,
and so every state-dict key, is the one of ldm's ``openaimodel.py``: SD2 checkpoints load strictly. The
attention layers are ``ldm.modules.attention.SpatialTransformer``.

Left out on purpose: the non-transformer ``AttentionBlock`` / ``QKVAttention`` path
(``use_spatial_transformer=False``), codebook-id prediction (``n_embed``), 1-D/3-D UNets (``dims`` other than
2), ldm's ``EncoderUNetModel`` and the ``convert_to_fp16`` helpers. No SD2 config uses them; the constructor
raises a ``ValueError`` instead of building something that silently differs from ldm.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ldm.config_schema import PositiveInt, Range
from ldm.modules.attention import SpatialTransformer
from ldm.modules.diffusionmodules.util import (
    avg_pool_nd,
    checkpoint,
    conv_nd,
    linear,
    normalization,
    timestep_embedding,
    zero_module,
)


class TimestepBlock(nn.Module):
    """A layer whose ``forward`` takes the timestep embedding as a second argument."""

    @abstractmethod
    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """Apply the layer to ``x`` given the ``(B, emb_dim)`` timestep embedding ``emb``."""


class TimestepEmbedSequential(nn.Sequential):
    """``nn.Sequential`` that passes ``emb`` to ``TimestepBlock``s and ``context`` to ``SpatialTransformer``s."""

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None = None
    ) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, TimestepBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class Upsample(nn.Module):
    """2x nearest-neighbour upsampling, optionally followed by a 3x3 convolution (key ``conv``).

    Args:
        channels: Input channels.
        use_conv: Apply the 3x3 convolution after upsampling.
        out_channels: Output channels (default ``channels``; must equal it without the convolution).
        padding: Padding of the convolution.
    """

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None, padding: int = 1) -> None:
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        if not use_conv and self.out_channels != channels:
            raise ValueError("Upsample without a convolution cannot change the number of channels")
        self.use_conv = use_conv
        if use_conv:
            self.conv = conv_nd(2, channels, self.out_channels, 3, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """2x downsampling with a strided 3x3 convolution, or 2x2 average pooling (key ``op`` either way).

    Args:
        channels: Input channels.
        use_conv: Strided convolution (True) or average pooling (False).
        out_channels: Output channels (default ``channels``; must equal it for average pooling).
        padding: Padding of the convolution.
    """

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None, padding: int = 1) -> None:
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        if use_conv:
            self.op = conv_nd(2, channels, self.out_channels, 3, stride=2, padding=padding)
        elif self.out_channels != channels:
            raise ValueError("Downsample without a convolution cannot change the number of channels")
        else:
            self.op = avg_pool_nd(2, kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class ResBlock(TimestepBlock):
    """Residual block conditioned on the timestep embedding.

    ``h = conv(SiLU(norm(x)))``; ``h += emb_proj(emb)`` (or ``norm(h) * (1 + scale) + shift`` with
    scale-shift norm); ``h = conv(dropout(SiLU(norm(h))))`` with the last conv zero-initialised; output
    ``skip(x) + h``, where ``skip`` is a 1x1 conv when the channel count changes.

    Args:
        channels: Input channels.
        emb_channels: Width of the timestep embedding.
        dropout: Dropout probability before the last convolution.
        out_channels: Output channels (default ``channels``).
        use_scale_shift_norm: FiLM-style conditioning (``emb_layers`` outputs scale and shift).
        use_checkpoint: Recompute activations in the backward pass.
        up: Upsample 2x inside the block (``resblock_updown``).
        down: Downsample 2x inside the block (``resblock_updown``).
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: int | None = None,
        use_scale_shift_norm: bool = False,
        use_checkpoint: bool = False,
        up: bool = False,
        down: bool = False,
    ) -> None:
        super().__init__()
        if up and down:
            raise ValueError("ResBlock: up and down are mutually exclusive")
        out_channels = out_channels or channels
        self.channels = channels
        self.out_channels = out_channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.use_checkpoint = use_checkpoint

        self.in_layers = nn.Sequential(
            normalization(channels), nn.SiLU(), conv_nd(2, channels, out_channels, 3, padding=1)
        )
        # Resampling sits between the norm/activation and the conv of in_layers (and on the skip path).
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False), Upsample(channels, False)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False), Downsample(channels, False)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(
            nn.SiLU(), linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels)
        )
        self.out_layers = nn.Sequential(
            normalization(out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            zero_module(conv_nd(2, out_channels, out_channels, 3, padding=1)),
        )
        if out_channels == channels:
            self.skip_connection: nn.Module = nn.Identity()
        else:
            self.skip_connection = conv_nd(2, channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """``x``: ``(B, channels, H, W)``; ``emb``: ``(B, emb_channels)``."""
        return checkpoint(self._forward, (x, emb), self.parameters(), self.use_checkpoint)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        # Unpacked rather than sliced: slicing an nn.Sequential builds a new module on every call (~0.1 ms).
        in_norm, in_act, in_conv = self.in_layers
        h = self.h_upd(in_act(in_norm(x)))
        x = self.x_upd(x)
        h = in_conv(h)
        emb_out = self.emb_layers(emb).type(h.dtype)[..., None, None]  # (B, C or 2C, 1, 1)
        if self.use_scale_shift_norm:
            out_norm, *rest = self.out_layers
            scale, shift = emb_out.chunk(2, dim=1)
            h = out_norm(h) * (1 + scale) + shift
            for layer in rest:
                h = layer(h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


def _per_level(value: int | Sequence[int] | None, levels: int, name: str) -> list[int] | None:
    """Expand an int to one value per resolution level, or check a list has one entry per level."""
    if value is None:
        return None
    if isinstance(value, int):
        return [value] * levels
    value = list(value)
    if len(value) != levels:
        raise ValueError(f"{name} must be an int or have one entry per channel_mult level ({levels}), got {value}")
    return value


class UNetModel(nn.Module):
    """ldm's UNet with SpatialTransformer attention: the SD2 denoiser ``eps/v = f(x_t, t, text)``.

    Structure (SD2 values in brackets): ``time_embed`` MLP on a sinusoidal embedding of ``t``
    [320 -> 1280]; ``input_blocks``: a 3x3 conv, then per level ``num_res_blocks`` ResBlocks (each followed
    by a SpatialTransformer at the downsample factors in ``attention_resolutions``) and a Downsample
    between levels; ``middle_block``: ResBlock, SpatialTransformer, ResBlock; ``output_blocks``: the mirror
    image with ``num_res_blocks + 1`` ResBlocks per level, each fed the concatenation with a skip from the
    input stack (last in, first out), and an Upsample ending each level but the last; ``out``: GroupNorm,
    SiLU, zero-initialised 3x3 conv.

    Args:
        in_channels: Input channels [4 text-to-image, 9 inpainting: latent, mask, masked-image latent].
        model_channels: Base width [320].
        out_channels: Output channels [4].
        num_res_blocks: ResBlocks per level (int, or one per level) [2].
        attention_resolutions: Downsample factors (1, 2, 4, ...) that get a SpatialTransformer [4, 2, 1].
        dropout: Dropout in ResBlocks and transformer blocks.
        channel_mult: Width multiplier per level; also fixes the number of levels [1, 2, 4, 4].
        conv_resample: Learned 3x3 convs for down/upsampling (False: average pooling / plain nearest).
        dims: Spatial dimensions; only 2 is supported.
        num_classes: Class conditioning added to the timestep embedding (``label_emb``): an int (embedding
            table), ``"continuous"`` (Linear on a ``(B, 1)`` value) or ``"sequential"`` (MLP on a
            ``(B, adm_in_channels)`` vector, as SD2-unCLIP). None in SD2.
        use_checkpoint: Activation checkpointing (``torch.utils.checkpoint``) per ResBlock and transformer
            block while autograd records; saves memory for one extra forward in the backward pass.
        use_fp16: Cast the input to float16 before the blocks (and the result back to the input dtype before
            ``out``). COMPAT: as in ldm this does not convert the weights; it is meant for running under
            ``torch.autocast`` (as SD2's scripts do). Without autocast the weights must be float16 too.
        use_bf16: Same as ``use_fp16`` with bfloat16.
        num_heads: Attention heads per transformer (-1: derive from ``num_head_channels``).
        num_head_channels: Width per head (-1: use ``num_heads``) [64].
        num_heads_upsample: COMPAT: only affects ldm's non-transformer AttentionBlock; must be -1 or equal
            to ``num_heads`` here (decoder transformers use ``num_heads``/``num_head_channels``, as in ldm).
        use_scale_shift_norm: ResBlocks condition by scale and shift instead of addition.
        resblock_updown: Resample with ResBlocks (``up``/``down``) instead of Downsample/Upsample layers.
        use_new_attention_order: Only affects the AttentionBlock path; must be False.
        use_spatial_transformer: Must be True (the AttentionBlock path is not implemented).
        transformer_depth: Transformer blocks per SpatialTransformer [1].
        context_dim: Width of the cross-attention context [1024, OpenCLIP ViT-H].
        n_embed: Codebook-id prediction; not supported, must be None.
        legacy: ldm's head-width rule: with ``legacy`` the head width is ``channels // num_heads`` even when
            ``num_head_channels`` is given (the same unless ``num_head_channels`` does not divide the
            channels) [False].
        disable_self_attentions: Per level, make the transformers' attn1 attend to the context.
        num_attention_blocks: Per level, how many of the ResBlocks get a SpatialTransformer.
        disable_middle_self_attn: Make the middle transformer's attn1 attend to the context.
        use_linear_in_transformer: Linear (SD2) instead of 1x1-conv (SD1) transformer projections [True].
        adm_in_channels: Width of ``y`` for ``num_classes="sequential"``.
        image_size: COMPAT: accepted and ignored. ldm configs pass it ("unused" in SD2's own comments);
            the network is fully convolutional and takes any size divisible by ``2 ** (levels - 1)``.

    All parameters are keyword-only (ldm takes ``image_size`` first positionally; configs pass keywords).
    """

    def __init__(
        self,
        *,
        in_channels: PositiveInt,
        model_channels: PositiveInt,
        out_channels: PositiveInt,
        num_res_blocks: PositiveInt | Sequence[PositiveInt],
        attention_resolutions: Sequence[PositiveInt],
        dropout: Annotated[float, Range(0, 1, hi_open=True)] = 0.0,
        channel_mult: Sequence[PositiveInt] = (1, 2, 4, 8),
        conv_resample: bool = True,
        dims: int = 2,
        num_classes: int | str | None = None,
        use_checkpoint: bool = False,
        use_fp16: bool = False,
        use_bf16: bool = False,
        num_heads: Literal[-1] | PositiveInt = -1,
        num_head_channels: Literal[-1] | PositiveInt = -1,
        num_heads_upsample: Literal[-1] | PositiveInt = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
        use_spatial_transformer: bool = False,
        transformer_depth: PositiveInt = 1,
        context_dim: PositiveInt | None = None,
        n_embed: int | None = None,
        legacy: bool = True,
        disable_self_attentions: Sequence[bool] | None = None,
        num_attention_blocks: Sequence[int] | None = None,
        disable_middle_self_attn: bool = False,
        use_linear_in_transformer: bool = False,
        adm_in_channels: int | None = None,
        image_size: int | None = None,
    ) -> None:
        super().__init__()
        del image_size  # COMPAT: see the docstring
        levels = len(channel_mult)
        self._check_unsupported(
            dims, use_spatial_transformer, use_new_attention_order, n_embed, num_heads, num_heads_upsample
        )
        if num_heads == -1 and num_head_channels == -1:
            raise ValueError("set num_heads or num_head_channels (SD2 configs use num_head_channels: 64)")
        if context_dim is None:
            raise ValueError("context_dim is required with use_spatial_transformer (SD2: 1024)")
        if use_fp16 and use_bf16:
            raise ValueError("use_fp16 and use_bf16 are mutually exclusive")
        if (adm_in_channels is not None) != (num_classes == "sequential"):
            raise ValueError("adm_in_channels is used exactly when num_classes is 'sequential'")
        res_blocks = _per_level(num_res_blocks, levels, "num_res_blocks")
        attn_blocks = _per_level(num_attention_blocks, levels, "num_attention_blocks")
        if disable_self_attentions is not None and len(disable_self_attentions) != levels:
            raise ValueError(f"disable_self_attentions must have one entry per channel_mult level ({levels})")
        if attn_blocks is not None and any(a > r for a, r in zip(attn_blocks, res_blocks)):
            raise ValueError(f"num_attention_blocks {attn_blocks} exceeds num_res_blocks {res_blocks}")

        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = res_blocks
        self.attention_resolutions = attention_resolutions
        self.channel_mult = channel_mult
        self.num_classes = num_classes
        self.use_checkpoint = use_checkpoint
        self.dtype = torch.float16 if use_fp16 else torch.bfloat16 if use_bf16 else torch.float32

        def heads(ch: int) -> tuple[int, int]:
            """(number of heads, head width) for a transformer on ``ch`` channels, ldm's rule."""
            n = num_heads if num_head_channels == -1 else ch // num_head_channels
            d = ch // n if num_head_channels == -1 or legacy else num_head_channels
            return n, d

        def res_block(ch: int, out_ch: int, **kw: Any) -> ResBlock:
            return ResBlock(ch, time_embed_dim, dropout, out_ch, use_scale_shift_norm, use_checkpoint, **kw)

        def transformer(ch: int, disable_self_attn: bool) -> SpatialTransformer:
            n, d = heads(ch)
            return SpatialTransformer(
                ch,
                n,
                d,
                depth=transformer_depth,
                dropout=dropout,
                context_dim=context_dim,
                disable_self_attn=disable_self_attn,
                use_linear=use_linear_in_transformer,
                use_checkpoint=use_checkpoint,
            )

        def has_attention(ds: int, level: int, index: int) -> bool:
            return ds in attention_resolutions and (attn_blocks is None or index < attn_blocks[level])

        def no_self_attn(level: int) -> bool:
            return bool(disable_self_attentions[level]) if disable_self_attentions is not None else False

        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            linear(model_channels, time_embed_dim), nn.SiLU(), linear(time_embed_dim, time_embed_dim)
        )
        if num_classes is not None:
            self.label_emb = self._label_embedding(num_classes, time_embed_dim, adm_in_channels)

        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(conv_nd(2, in_channels, model_channels, 3, padding=1))]
        )
        skip_channels = [model_channels]
        ch, ds = model_channels, 1
        for level, mult in enumerate(channel_mult):
            for index in range(res_blocks[level]):
                layers: list[nn.Module] = [res_block(ch, mult * model_channels)]
                ch = mult * model_channels
                if has_attention(ds, level, index):
                    layers.append(transformer(ch, no_self_attn(level)))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != levels - 1:
                down = res_block(ch, ch, down=True) if resblock_updown else Downsample(ch, conv_resample)
                self.input_blocks.append(TimestepEmbedSequential(down))
                skip_channels.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(
            res_block(ch, ch), transformer(ch, disable_middle_self_attn), res_block(ch, ch)
        )

        self.output_blocks = nn.ModuleList([])
        for level, mult in reversed(list(enumerate(channel_mult))):
            for index in range(res_blocks[level] + 1):
                layers = [res_block(ch + skip_channels.pop(), model_channels * mult)]
                ch = model_channels * mult
                if has_attention(ds, level, index):
                    layers.append(transformer(ch, no_self_attn(level)))
                if level and index == res_blocks[level]:
                    layers.append(res_block(ch, ch, up=True) if resblock_updown else Upsample(ch, conv_resample))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            normalization(ch), nn.SiLU(), zero_module(conv_nd(2, model_channels, out_channels, 3, padding=1))
        )

    @staticmethod
    def _check_unsupported(
        dims: int,
        use_spatial_transformer: bool,
        use_new_attention_order: bool,
        n_embed: int | None,
        num_heads: int,
        num_heads_upsample: int,
    ) -> None:
        """Reject ldm options whose code paths no SD2 config needs and that are not implemented here."""
        if dims != 2:
            raise ValueError(f"dims={dims} is not supported: SpatialTransformer is 2-D; use dims: 2")
        if not use_spatial_transformer:
            raise ValueError(
                "use_spatial_transformer: false (ldm's AttentionBlock UNet) is not supported; set it to true"
            )
        if use_new_attention_order:
            raise ValueError("use_new_attention_order only affects ldm's AttentionBlock, which is not supported")
        if n_embed is not None:
            raise ValueError("n_embed (codebook-id prediction) is not supported; remove the key")
        if num_heads_upsample not in (-1, num_heads):
            raise ValueError(
                "num_heads_upsample only affects ldm's AttentionBlock; decoder SpatialTransformers use "
                "num_heads/num_head_channels. Remove the key or set it to -1."
            )

    @staticmethod
    def _label_embedding(num_classes: int | str, dim: int, adm_in_channels: int | None) -> nn.Module:
        if isinstance(num_classes, int):
            return nn.Embedding(num_classes, dim)
        if num_classes == "continuous":
            return nn.Linear(1, dim)
        if num_classes == "sequential":
            assert adm_in_channels is not None  # checked in __init__
            return nn.Sequential(nn.Sequential(linear(adm_in_channels, dim), nn.SiLU(), linear(dim, dim)))
        raise ValueError(f"num_classes must be an int, 'continuous' or 'sequential', got {num_classes!r}")

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Predict the model output (eps, x0 or v, depending on how it was trained) for ``x`` at ``timesteps``.

        Args:
            x: ``(B, in_channels, H, W)`` noisy input (for inpainting: latent, mask, masked-image latent).
            timesteps: ``(B,)`` or scalar timesteps, integer or fractional.
            context: ``(B, M, context_dim)`` cross-attention context (text token states).
            y: ``(B,)`` labels / ``(B, adm_in_channels)`` vectors, exactly when ``num_classes`` is set.
            **kwargs: COMPAT: ldm's signature has ``**kwargs``; any keyword given here is an error, so a
                misspelt ``context=`` is not silently dropped.

        Returns:
            ``(B, out_channels, H, W)``, in the dtype of ``x`` unless autocast is active.
        """
        if kwargs:
            raise TypeError(
                f"UNetModel.forward got unexpected keyword argument(s) {sorted(kwargs)}; "
                "it accepts x, timesteps, context and y"
            )
        if (y is not None) != (self.num_classes is not None):
            raise ValueError("pass y exactly when the UNet was built with num_classes")
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(x.shape[0])  # (B,)
        t_emb = timestep_embedding(timesteps, self.model_channels)  # (B, model_channels)
        emb = self.time_embed(t_emb.to(self.time_embed[0].weight.dtype))  # (B, 4 * model_channels)
        if y is not None:
            emb = emb + self.label_emb(y)

        skips = []
        h = x.type(self.dtype)
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            h = torch.cat([h, skips.pop()], dim=1)  # (B, C + C_skip, H, W)
            h = block(h, emb, context)
        return self.out(h.type(x.dtype))
