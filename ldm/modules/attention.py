"""Transformer blocks of the SD2 UNet: SpatialTransformer and its parts, with one attention backend switch.

In here: ``CrossAttention`` (multi-head attention, self or to a context), ``GEGLU`` / ``FeedForward``,
``BasicTransformerBlock`` (self-attention, cross-attention, feed-forward, pre-LayerNorm residuals) and
``SpatialTransformer`` (GroupNorm, project to tokens, blocks, project back, residual). Module and parameter
names are ldm's, so state-dict keys match the released checkpoints.

Attention backends (process-wide ``set_attention_backend`` / the ``attention_backend`` context manager, or
per module through ``CrossAttention.backend``):

- ``"sdpa"`` (default): ``torch.nn.functional.scaled_dot_product_attention``, which picks a flash or
  memory-efficient kernel when it can. Those kernels accumulate the softmax in float32 internally.
- ``"math"``: explicit ``softmax(Q K^T / sqrt(d)) V``. The logits and softmax are computed in float32 with
  autocast disabled, as ldm does by default (its ``ATTN_PRECISION=fp32``). Kept as the readable reference
  and for benchmarks; it materialises the full ``(B, heads, N, N)`` attention matrix.

Left out on purpose: ldm's xformers class (SDPA covers it), ``LinearAttention``, the single-head
``SpatialSelfAttention``, attention masks and per-depth context lists (no SD2 config uses them).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.diffusionmodules.util import checkpoint, zero_module

AttentionBackend = Literal["sdpa", "math"]
_BACKENDS: tuple[str, ...] = get_args(AttentionBackend)
_backend: AttentionBackend = "sdpa"


def _check_backend(name: str) -> AttentionBackend:
    if name not in _BACKENDS:
        raise ValueError(f"attention backend must be one of {_BACKENDS}, got {name!r}")
    return name  # type: ignore[return-value]


def get_attention_backend() -> AttentionBackend:
    """The process-wide default backend used by ``CrossAttention`` modules whose ``backend`` is None."""
    return _backend


def set_attention_backend(name: AttentionBackend) -> AttentionBackend:
    """Set the process-wide default attention backend; returns the previous one."""
    global _backend
    previous, _backend = _backend, _check_backend(name)
    return previous


@contextlib.contextmanager
def attention_backend(name: AttentionBackend) -> Iterator[None]:
    """Context manager that sets the default attention backend and restores the previous one on exit."""
    previous = set_attention_backend(name)
    try:
        yield
    finally:
        set_attention_backend(previous)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: AttentionBackend | None = None
) -> torch.Tensor:
    """``softmax(q k^T / sqrt(d)) v`` over ``(B, heads, N, d)`` tensors with the chosen backend.

    Args:
        q: Queries, ``(B, heads, Nq, d)``.
        k: Keys, ``(B, heads, Nk, d)``.
        v: Values, ``(B, heads, Nk, d)``.
        backend: ``"sdpa"`` or ``"math"``; None uses ``get_attention_backend()``.

    Returns:
        ``(B, heads, Nq, d)`` in the dtype of ``v``.
    """
    backend = _check_backend(backend) if backend is not None else _backend
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v)
    scale = q.shape[-1] ** -0.5
    # Upcast the logits: in fp16 the q.k products of the 4096-token self-attention overflow or lose the
    # softmax's small entries (ldm's ATTN_PRECISION=fp32 default, which also disables autocast here).
    with torch.autocast(device_type=q.device.type, enabled=False):
        logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale  # (B, heads, Nq, Nk)
        weights = logits.softmax(dim=-1)
    return torch.matmul(weights.to(v.dtype), v)  # (B, heads, Nq, d)


class CrossAttention(nn.Module):
    """Multi-head attention from ``x`` to ``context`` (to ``x`` itself when no context is given).

    Heads are laid out head-major in the projection outputs (channel ``h * dim_head + j`` is feature ``j`` of
    head ``h``), as in ldm, which pretrained ``to_q``/``to_k``/``to_v`` weights depend on.

    Args:
        query_dim: Width of ``x``.
        context_dim: Width of ``context``; None means self-attention (``query_dim``).
        heads: Number of heads.
        dim_head: Width of each head; the logits are scaled by ``dim_head ** -0.5``.
        dropout: Dropout after the output projection (no dropout on the attention weights, as in ldm).
        backend: ``"sdpa"``, ``"math"`` or None to follow ``set_attention_backend``. Also settable later
            through the ``backend`` attribute.
    """

    def __init__(
        self,
        query_dim: int,
        context_dim: int | None = None,
        heads: int = 8,
        dim_head: int = 64,
        dropout: float = 0.0,
        backend: AttentionBackend | None = None,
    ) -> None:
        super().__init__()
        inner_dim = heads * dim_head
        context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.dim_head = dim_head
        self.backend = None if backend is None else _check_backend(backend)
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(dropout))

    def _split_heads(self, t: torch.Tensor) -> torch.Tensor:
        return t.unflatten(-1, (self.heads, self.dim_head)).transpose(1, 2)  # (B, heads, N, dim_head)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """``x``: ``(B, N, query_dim)``; ``context``: ``(B, M, context_dim)`` or None. Returns ``x``'s shape."""
        context = x if context is None else context
        q = self._split_heads(self.to_q(x))
        k = self._split_heads(self.to_k(context))
        v = self._split_heads(self.to_v(context))
        out = attention(q, k, v, self.backend)  # (B, heads, N, dim_head)
        b, _, n, _ = out.shape
        out = out.transpose(1, 2).reshape(b, n, self.heads * self.dim_head)  # (B, N, heads * dim_head)
        return self.to_out(out)


class GEGLU(nn.Module):
    """Gated GELU unit: ``a * gelu(gate)`` where ``[a, gate] = proj(x)`` (Shazeer 2020)."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, gate = self.proj(x).chunk(2, dim=-1)  # 2 x (..., dim_out)
        return a * F.gelu(gate)


class FeedForward(nn.Module):
    """Transformer MLP with a GEGLU input layer: ``Linear(GEGLU(x))`` (keys ``net.0.proj``, ``net.2``).

    Args:
        dim: Input and output width.
        mult: Hidden width multiplier.
        dropout: Dropout between the GEGLU and the output projection.
    """

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        inner_dim = dim * mult
        self.net = nn.Sequential(GEGLU(dim, inner_dim), nn.Dropout(dropout), nn.Linear(inner_dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm transformer block: self-attention, cross-attention to the context, GEGLU feed-forward.

    ``x += attn1(norm1(x)); x += attn2(norm2(x), context); x += ff(norm3(x))``.

    Args:
        dim: Token width.
        n_heads: Attention heads.
        d_head: Width per head.
        dropout: Dropout in the attention output projections and the feed-forward.
        context_dim: Width of the cross-attention context (None: attn2 attends to ``x``).
        disable_self_attn: Make attn1 attend to the context too (ldm's ``disable_self_attentions``).
        checkpoint: Recompute this block's activations in the backward pass.
    """

    def __init__(
        self,
        dim: int,
        n_heads: int,
        d_head: int,
        dropout: float = 0.0,
        context_dim: int | None = None,
        disable_self_attn: bool = False,
        checkpoint: bool = False,
    ) -> None:
        super().__init__()
        self.disable_self_attn = disable_self_attn
        self.checkpoint = checkpoint
        self.attn1 = CrossAttention(
            dim, context_dim if disable_self_attn else None, heads=n_heads, dim_head=d_head, dropout=dropout
        )
        self.ff = FeedForward(dim, dropout=dropout)
        self.attn2 = CrossAttention(dim, context_dim, heads=n_heads, dim_head=d_head, dropout=dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """``x``: ``(B, N, dim)``; ``context``: ``(B, M, context_dim)`` or None."""
        return checkpoint(self._forward, (x, context), self.parameters(), self.checkpoint)

    def _forward(self, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x), context=context if self.disable_self_attn else None)
        x = x + self.attn2(self.norm2(x), context=context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map, added back as a residual.

    GroupNorm, ``proj_in``, flatten to ``(B, H*W, C)`` tokens (row-major over H, W), ``depth`` transformer
    blocks, ``proj_out`` (zero-initialised, so a fresh block is the identity), reshape, add the input. With
    ``use_linear`` the projections are ``Linear`` layers on the tokens (SD2); otherwise 1x1 convolutions on
    the map (SD1). Flattening with ``flatten``/``transpose`` keeps channels_last inputs copy-free.

    Args:
        in_channels: Channels of the feature map.
        n_heads: Attention heads.
        d_head: Width per head; the transformer width is ``n_heads * d_head``.
        depth: Number of ``BasicTransformerBlock``s.
        dropout: Dropout inside the blocks.
        context_dim: Width of the cross-attention context (None: attn2 attends to the tokens).
        disable_self_attn: attn1 attends to the context instead of the tokens.
        use_linear: Linear projections (SD2, 2-D weights) instead of 1x1 convolutions (SD1, 4-D weights).
        use_checkpoint: Activation checkpointing per transformer block. COMPAT: ldm defaults this to True;
            here the default is False and the UNet passes its own ``use_checkpoint``.
    """

    def __init__(
        self,
        in_channels: int,
        n_heads: int,
        d_head: int,
        depth: int = 1,
        dropout: float = 0.0,
        context_dim: int | None = None,
        disable_self_attn: bool = False,
        use_linear: bool = False,
        use_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        inner_dim = n_heads * d_head
        self.use_linear = use_linear
        # COMPAT: eps 1e-6 here, unlike the UNet's GroupNorm32 (1e-5); computed in the input dtype.
        self.norm = nn.GroupNorm(num_groups=32, num_channels=in_channels, eps=1e-6, affine=True)
        if use_linear:
            self.proj_in = nn.Linear(in_channels, inner_dim)
            self.proj_out = zero_module(nn.Linear(inner_dim, in_channels))
        else:
            self.proj_in = nn.Conv2d(in_channels, inner_dim, kernel_size=1)
            self.proj_out = zero_module(nn.Conv2d(inner_dim, in_channels, kernel_size=1))
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(
                inner_dim,
                n_heads,
                d_head,
                dropout=dropout,
                context_dim=context_dim,
                disable_self_attn=disable_self_attn,
                checkpoint=use_checkpoint,
            )
            for _ in range(depth)
        )

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """``x``: ``(B, C, H, W)``; ``context``: ``(B, M, context_dim)`` or None. Returns ``(B, C, H, W)``."""
        b, _, h, w = x.shape
        x_in = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)
        x = x.flatten(2).transpose(1, 2)  # (B, H*W, C')
        if self.use_linear:
            x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x, context=context)
        if self.use_linear:
            x = self.proj_out(x)
        x = x.transpose(1, 2).reshape(b, -1, h, w)  # (B, C', H, W), a channels_last view
        if not self.use_linear:
            x = self.proj_out(x)
        # x_in first: the sum takes the memory format of its first operand, so the output keeps the input's
        # layout (NCHW in, NCHW out). With x first, an NCHW model turned channels_last after the first
        # transformer and every later convolution converted its weights and gradients back (a third of the
        # step's time on CPU in benchmarks/reference_step.py).
        return x_in + x
