"""UNetModel, SpatialTransformer/attention and NN helpers: values against independent formulas, structure
against the SD2 key manifests, and the optional ldm features (checkpointing, backends, resampling modes)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, read_reference_tsv
from omegaconf import OmegaConf
from torch import nn

import ldm.modules.attention as attention_mod
from ldm.modules.attention import (
    BasicTransformerBlock,
    CrossAttention,
    FeedForward,
    SpatialTransformer,
    attention_backend,
    get_attention_backend,
    set_attention_backend,
)
from ldm.modules.diffusionmodules.openaimodel import Downsample, ResBlock, UNetModel, Upsample
from ldm.modules.diffusionmodules.util import GroupNorm32, checkpoint, normalization, timestep_embedding
from ldm.util import instantiate_from_config


def sd2_unet_config(yaml_name: str) -> dict:
    """The ``unet_config`` block (target + params) of an official-schema SD2 config."""
    cfg = OmegaConf.load(REPO / "configs" / "stable-diffusion" / yaml_name)
    return OmegaConf.to_container(cfg.model.params.unet_config)


def tiny_unet_params(**overrides) -> dict:
    cfg = OmegaConf.load(REPO / "configs" / "tiny" / "inpaint.yaml")
    params = OmegaConf.to_container(cfg.model.params.unet_config.params)
    return {**params, **overrides}


def tiny_unet(**overrides) -> UNetModel:
    return UNetModel(**tiny_unet_params(**overrides))


def randomize_zero_init(model: nn.Module, seed: int = 1) -> nn.Module:
    """Give the zero-initialised tensors (output convs, proj_out) random values so every path matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def tiny_inputs(in_channels: int = 9, batch: int = 2, size: int = 8, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, in_channels, size, size, generator=g)
    t = torch.tensor([3, 911])[:batch]
    context = torch.randn(batch, 5, 32, generator=g)
    return x, t, context


# --------------------------------------------------------------------------------------------- helpers


def test_timestep_embedding_cos_first_and_values():
    t = torch.tensor([0, 1, 37, 999])
    emb = timestep_embedding(t, 320)
    assert emb.shape == (4, 320) and emb.dtype == torch.float32
    half = 160
    freqs = np.exp(-math.log(10000.0) * np.arange(half) / half)
    args = t.numpy().astype(np.float64)[:, None] * freqs[None]
    expected = np.concatenate([np.cos(args), np.sin(args)], axis=1)
    np.testing.assert_allclose(emb.numpy(), expected, atol=2e-4, rtol=0)
    # t = 0: all cosines 1 then all sines 0 (cos first); frequency index 0 is exactly 1 rad per step.
    assert torch.equal(emb[0], torch.cat([torch.ones(half), torch.zeros(half)]))
    assert emb[2, 0].item() == pytest.approx(math.cos(37.0), abs=1e-6)
    assert emb[2, half].item() == pytest.approx(math.sin(37.0), abs=1e-6)


def test_timestep_embedding_fractional_and_odd_dim():
    t = torch.tensor([2.5, 500.25])
    emb = timestep_embedding(t, 7)
    half = 3
    freqs = np.exp(-math.log(10000.0) * np.arange(half) / half)
    args = t.numpy().astype(np.float64)[:, None] * freqs[None]
    expected = np.concatenate([np.cos(args), np.sin(args), np.zeros((2, 1))], axis=1)
    np.testing.assert_allclose(emb.numpy(), expected, atol=1e-4, rtol=0)
    emb_p = timestep_embedding(t, 8, max_period=100.0)
    assert emb_p[0, 1].item() == pytest.approx(math.cos(2.5 * 100.0 ** (-1 / 4)), abs=1e-6)


def _manual_group_norm(x: torch.Tensor, groups: int, eps: float) -> torch.Tensor:
    b, c, h, w = x.shape
    xg = x.reshape(b, groups, -1).double()
    mean = xg.mean(-1, keepdim=True)
    var = xg.var(-1, unbiased=False, keepdim=True)
    return ((xg - mean) / torch.sqrt(var + eps)).reshape(b, c, h, w)


def test_normalization_is_fp32_groupnorm_eps_1e5():
    norm = normalization(64)
    assert isinstance(norm, GroupNorm32) and norm.num_groups == 32 and norm.eps == 1e-5
    # Small-variance input so the eps visibly matters (var ~ 1e-6 vs eps 1e-5).
    x = torch.randn(2, 64, 4, 4) * 1e-3
    torch.testing.assert_close(norm(x).double(), _manual_group_norm(x, 32, 1e-5), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(norm(x).double(), _manual_group_norm(x, 32, 1e-6), atol=1e-2)
    xb = torch.randn(2, 64, 4, 4).bfloat16()
    out = norm(xb)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, F.group_norm(xb.float(), 32, norm.weight, norm.bias, 1e-5).bfloat16())


def test_checkpoint_helper_matches_plain_call():
    lin = nn.Linear(4, 4)
    x = torch.randn(3, 4, requires_grad=True)
    out = checkpoint(lambda a: lin(a).tanh(), (x,), lin.parameters(), True)
    (g_ckpt,) = torch.autograd.grad(out.sum(), x)
    (g_plain,) = torch.autograd.grad(lin(x).tanh().sum(), x)
    torch.testing.assert_close(g_ckpt, g_plain)
    with torch.no_grad():  # no autograd: plain call
        assert torch.equal(checkpoint(lin, (x,), lin.parameters(), True), lin(x))


# ------------------------------------------------------------------------------------------- attention


def test_geglu_feedforward_equals_independent_computation():
    ff = FeedForward(8, mult=4)
    assert [k for k, _ in ff.named_parameters()] == ["net.0.proj.weight", "net.0.proj.bias"] + [
        "net.2.weight",
        "net.2.bias",
    ]
    x = torch.randn(2, 5, 8)
    w0, b0 = ff.net[0].proj.weight, ff.net[0].proj.bias
    w2, b2 = ff.net[2].weight, ff.net[2].bias
    h = x @ w0.T + b0
    a, gate = h[..., :32], h[..., 32:]
    gelu = 0.5 * gate * (1 + torch.erf(gate / math.sqrt(2.0)))
    expected = (a * gelu) @ w2.T + b2
    torch.testing.assert_close(ff(x), expected)


def _attention_per_head(attn: CrossAttention, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
    q, k, v = x @ attn.to_q.weight.T, ctx @ attn.to_k.weight.T, ctx @ attn.to_v.weight.T
    d = attn.dim_head
    heads = []
    for h in range(attn.heads):
        sl = slice(h * d, (h + 1) * d)  # head-major channel layout, as ldm's '(h d)'
        w = torch.softmax(q[..., sl] @ k[..., sl].transpose(-1, -2) / math.sqrt(d), dim=-1)
        heads.append(w @ v[..., sl])
    return torch.cat(heads, dim=-1) @ attn.to_out[0].weight.T + attn.to_out[0].bias


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_cross_attention_matches_per_head_loop(backend):
    attn = CrossAttention(16, context_dim=12, heads=4, dim_head=8, backend=backend)
    assert attn.to_q.bias is None and attn.to_k.bias is None and attn.to_v.bias is None
    assert attn.to_k.weight.shape == (32, 12)
    x, ctx = torch.randn(2, 6, 16), torch.randn(2, 3, 12)
    torch.testing.assert_close(attn(x, ctx), _attention_per_head(attn, x, ctx), atol=1e-5, rtol=1e-5)
    # No context: self-attention.
    self_attn = CrossAttention(16, heads=2, dim_head=8, backend=backend)
    torch.testing.assert_close(self_attn(x), _attention_per_head(self_attn, x, x), atol=1e-5, rtol=1e-5)


def test_attention_backend_switch_selects_the_path(monkeypatch):
    attn = CrossAttention(16, heads=2, dim_head=8)
    x = torch.randn(1, 4, 16)
    assert get_attention_backend() == "sdpa"

    def no_sdpa(*args, **kwargs):
        raise RuntimeError("sdpa called")

    monkeypatch.setattr(attention_mod.F, "scaled_dot_product_attention", no_sdpa)
    with pytest.raises(RuntimeError, match="sdpa called"):
        attn(x)
    with attention_backend("math"):
        assert get_attention_backend() == "math"
        attn(x)  # math path does not touch SDPA
    assert get_attention_backend() == "sdpa"
    attn.backend = "math"  # per-module override of the global default
    attn(x)
    with pytest.raises(ValueError, match="attention backend"):
        set_attention_backend("flash")
    with pytest.raises(ValueError, match="attention backend"):
        CrossAttention(16, backend="xformers")


def test_sdpa_and_math_agree_on_tiny_unet():
    model = randomize_zero_init(tiny_unet()).eval()
    x, t, ctx = tiny_inputs()
    with torch.no_grad(), attention_backend("sdpa"):
        out_sdpa = model(x, t, context=ctx)
    with torch.no_grad(), attention_backend("math"):
        out_math = model(x, t, context=ctx)
    assert out_sdpa.abs().mean() > 1e-3
    torch.testing.assert_close(out_sdpa, out_math, atol=1e-5, rtol=1e-4)


def test_spatial_transformer_structure_and_linear_conv_equivalence():
    st_lin = SpatialTransformer(32, 2, 16, context_dim=8, use_linear=True)
    st_conv = SpatialTransformer(32, 2, 16, context_dim=8, use_linear=False)
    assert st_lin.norm.eps == 1e-6 and st_lin.norm.num_groups == 32
    assert all(m.eps == 1e-5 for m in st_lin.modules() if isinstance(m, nn.LayerNorm))
    assert st_lin.proj_in.weight.shape == (32, 32) and st_conv.proj_in.weight.shape == (32, 32, 1, 1)
    x, ctx = torch.randn(2, 32, 3, 5), torch.randn(2, 4, 8)
    assert torch.equal(st_lin(x, ctx), x)  # zero-initialised proj_out: a fresh block is the identity
    randomize_zero_init(st_lin)
    # Same weights as 1x1 convs: tokens are pixels in row-major (h w) order, channels last.
    state = {k: v.reshape(st_conv.state_dict()[k].shape) for k, v in st_lin.state_dict().items()}
    st_conv.load_state_dict(state)
    out = st_lin(x, ctx)
    assert not torch.allclose(out, x)
    torch.testing.assert_close(out, st_conv(x, ctx), atol=1e-5, rtol=1e-5)


def test_basic_transformer_block_residual_order():
    block = BasicTransformerBlock(16, 2, 8, context_dim=6)
    x, ctx = torch.randn(2, 5, 16), torch.randn(2, 3, 6)
    h = x + block.attn1(block.norm1(x))
    h = h + block.attn2(block.norm2(h), ctx)
    expected = h + block.ff(block.norm3(h))
    torch.testing.assert_close(block(x, ctx), expected)
    # disable_self_attn: attn1 attends to the context (k/v take context_dim inputs).
    cross_only = BasicTransformerBlock(16, 2, 8, context_dim=6, disable_self_attn=True)
    assert cross_only.attn1.to_k.weight.shape == (16, 6)


# ------------------------------------------------------------------------------------------------ UNet


def test_unet_norm_eps():
    model = tiny_unet()
    gn32 = [m for m in model.modules() if isinstance(m, GroupNorm32)]
    st_norms = [m.norm for m in model.modules() if isinstance(m, SpatialTransformer)]
    lns = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    n_res = sum(isinstance(m, ResBlock) for m in model.modules())
    assert len(gn32) == 2 * n_res + 1  # in/out norm per ResBlock + the final `out` norm
    assert model.out[0] in gn32
    assert all(m.eps == 1e-5 and m.num_groups == 32 for m in gn32)
    assert len(st_norms) == 7 and all(type(m) is nn.GroupNorm and m.eps == 1e-6 for m in st_norms)
    assert len(lns) == 3 * len(st_norms) and all(m.eps == 1e-5 for m in lns)


@pytest.mark.parametrize("in_channels", [4, 9])
def test_tiny_unet_builds_and_runs(in_channels):
    # Speed ("well under a second") is measured by benchmarks/, not asserted here: timed tests are flaky.
    cfg = {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": tiny_unet_params()}
    cfg["params"]["in_channels"] = in_channels
    model = instantiate_from_config(cfg)
    x, t, ctx = tiny_inputs(in_channels)
    with torch.no_grad():
        out = model(x, t, context=ctx)
    assert out.shape == (2, 4, 8, 8) and out.dtype == torch.float32
    assert torch.equal(out, torch.zeros_like(out))  # zero-initialised `out` conv
    assert model.input_blocks[0][0].weight.shape == (32, in_channels, 3, 3)


def test_unet_output_depends_on_all_inputs():
    model = randomize_zero_init(tiny_unet()).eval()
    x, t, ctx = tiny_inputs()
    with torch.no_grad():
        out = model(x, t, context=ctx)
        assert torch.isfinite(out).all()
        assert not torch.allclose(out, model(x, t + 1, context=ctx))
        assert not torch.allclose(out, model(x, t, context=ctx + 1))
        x2 = x.clone()
        x2[:, 4:] += 1  # mask / masked-image channels
        assert not torch.allclose(out, model(x2, t, context=ctx))
        # Per-sample independence, float timesteps, scalar timesteps broadcast over the batch.
        torch.testing.assert_close(model(x[:1], t[:1], context=ctx[:1]), out[:1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model(x, t.float(), context=ctx), out)
        out_scalar = model(x, torch.tensor(7.5), context=ctx)
        torch.testing.assert_close(out_scalar, model(x, torch.tensor([7.5, 7.5]), context=ctx))


def test_unet_channels_last_matches_contiguous():
    model = randomize_zero_init(tiny_unet()).eval()
    x, t, ctx = tiny_inputs()
    with torch.no_grad():
        ref = model(x, t, context=ctx)
        model = model.to(memory_format=torch.channels_last)
        out = model(x.to(memory_format=torch.channels_last), t, context=ctx)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_unet_keeps_one_memory_format_through_every_layer(memory_format):
    """NCHW in, NCHW everywhere; channels_last in, channels_last everywhere. A layer that switches the layout
    makes every later convolution convert its weights and gradients (measured: 40% of an NCHW step on CPU
    before the SpatialTransformer residual kept the input's format)."""
    model = randomize_zero_init(tiny_unet(model_channels=32, num_head_channels=16)).train()
    model = model.to(memory_format=memory_format)
    x, t, ctx = tiny_inputs(size=16)  # 16 -> 8 -> 4 -> 2 latents: no level is 1 x 1, where both formats agree
    seen: list[tuple[str, bool]] = []

    def check(name):
        return lambda module, inputs, output: seen.extend(
            (f"{name} {role}", v.is_contiguous(memory_format=memory_format))
            for role, v in (("input", inputs[0]), ("output", output)) if v.ndim == 4
        )

    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d | SpatialTransformer | ResBlock):
            module.register_forward_hook(check(name))
    out = model(x.contiguous(memory_format=memory_format), t, context=ctx)
    out.square().sum().backward()
    assert len(seen) > 40
    assert [name for name, ok in seen if not ok] == []
    assert out.is_contiguous(memory_format=memory_format)
    # gradients come out in their parameter's layout (autograd then keeps them without a copy)
    bad = [n for n, p in model.named_parameters() if p.grad is not None and p.grad.stride() != p.stride()]
    assert bad == []


def _count_saved_tensors(fn) -> int:
    count = 0

    def pack(t):
        nonlocal count
        count += 1
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return count


def test_use_checkpoint_same_outputs_and_grads():
    plain = randomize_zero_init(tiny_unet(dropout=0.1)).train()
    ckpt = tiny_unet(dropout=0.1, use_checkpoint=True).train()
    ckpt.load_state_dict(plain.state_dict())
    x, t, ctx = tiny_inputs()
    weights = torch.randn(2, 4, 8, 8)
    results = []
    for model in (plain, ckpt):
        torch.manual_seed(123)  # same dropout masks; checkpointing must replay them in the backward
        out = model(x, t, context=ctx)
        (out * weights).sum().backward()
        results.append((out.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}))
    (out_a, grads_a), (out_b, grads_b) = results
    torch.testing.assert_close(out_b, out_a)
    assert grads_a.keys() == grads_b.keys()
    for k in grads_a:
        torch.testing.assert_close(grads_b[k], grads_a[k], atol=1e-5, rtol=1e-4, msg=k)
    assert grads_a["input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"].abs().sum() > 0
    # Checkpointing really drops activations: far fewer tensors saved for the backward pass.
    n_plain = _count_saved_tensors(lambda: plain(x, t, context=ctx))
    n_ckpt = _count_saved_tensors(lambda: ckpt(x, t, context=ctx))
    assert n_ckpt < n_plain / 2


def test_use_bf16_casts_the_input_only():
    model = randomize_zero_init(tiny_unet(use_bf16=True)).eval()
    seen = []
    model.input_blocks[0].register_forward_hook(lambda m, inp, out: seen.append(inp[0].dtype))
    model.out.register_forward_hook(lambda m, inp, out: seen.append(inp[0].dtype))
    x, t, ctx = tiny_inputs()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, context=ctx)
    # bf16 into the blocks, back to the input dtype before `out`; the weights stay float32.
    assert seen == [torch.bfloat16, torch.float32]
    assert model.out[2].weight.dtype == torch.float32 and torch.isfinite(out).all()
    assert model.dtype == torch.bfloat16 and tiny_unet(use_fp16=True).dtype == torch.float16


def test_forward_rejects_bad_arguments():
    model = tiny_unet()
    x, t, ctx = tiny_inputs()
    with pytest.raises(TypeError, match="contxt"):
        model(x, t, contxt=ctx)
    with pytest.raises(ValueError, match="num_classes"):
        model(x, t, context=ctx, y=torch.tensor([0, 1]))


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"use_spatial_transformer": False}, "use_spatial_transformer"),
        ({"n_embed": 16}, "n_embed"),
        ({"dims": 3}, "dims"),
        ({"use_new_attention_order": True}, "use_new_attention_order"),
        ({"num_heads_upsample": 3}, "num_heads_upsample"),
        ({"context_dim": None}, "context_dim"),
        ({"num_head_channels": -1}, "num_head"),
        ({"use_fp16": True, "use_bf16": True}, "use_bf16"),
        ({"num_res_blocks": [1, 1]}, "num_res_blocks"),
        ({"num_attention_blocks": [2, 2, 2]}, "num_attention_blocks"),
        ({"disable_self_attentions": [True]}, "disable_self_attentions"),
        ({"adm_in_channels": 8}, "adm_in_channels"),
        ({"num_classes": "bogus"}, "num_classes"),
    ],
)
def test_unsupported_or_inconsistent_options_raise(overrides, match):
    with pytest.raises(ValueError, match=match):
        tiny_unet(**overrides)


def test_optional_ldm_features_build_and_run():
    x, t, ctx = tiny_inputs()
    # resblock_updown + scale-shift norm + per-level res/attention blocks + legacy head rule.
    m = tiny_unet(
        resblock_updown=True,
        use_scale_shift_norm=True,
        num_res_blocks=[1, 2, 1],
        num_attention_blocks=[1, 1, 0],
        disable_self_attentions=[False, True, False],
        disable_middle_self_attn=True,
        legacy=True,
        image_size=64,
    )
    assert isinstance(m.input_blocks[2][0], ResBlock) and isinstance(m.input_blocks[2][0].h_upd, Downsample)
    # Input: conv, L0 res, down, L1 res+attn, L1 res (num_attention_blocks 1), down, L2 res (0 attention).
    assert [len(b) for b in m.input_blocks] == [1, 2, 1, 2, 1, 1, 1]
    # Output: L2 res, res+up | L1 res+attn, res, res+up | L0 res+attn, res.
    assert [len(b) for b in m.output_blocks] == [1, 2, 2, 1, 2, 2, 1]
    for i in (1, 4):
        assert isinstance(m.output_blocks[i][-1], ResBlock) and isinstance(m.output_blocks[i][-1].h_upd, Upsample)
    assert m.input_blocks[1][0].emb_layers[1].out_features == 2 * 32
    assert m.input_blocks[3][1].transformer_blocks[0].disable_self_attn
    assert not m.input_blocks[1][1].transformer_blocks[0].disable_self_attn
    assert m.middle_block[1].transformer_blocks[0].disable_self_attn
    with torch.no_grad():
        assert randomize_zero_init(m)(x, t, context=ctx).shape == (2, 4, 8, 8)
    # conv_resample False: average pooling / plain nearest upsampling, no resampling weights.
    m = tiny_unet(conv_resample=False)
    assert isinstance(m.input_blocks[2][0].op, nn.AvgPool2d) and not m.output_blocks[1][-1].use_conv
    assert not any(".op." in k or ".conv." in k for k in m.state_dict())
    with torch.no_grad():
        assert m(x, t, context=ctx).shape == (2, 4, 8, 8)


@pytest.mark.parametrize(
    "num_classes, adm, y",
    [(10, None, torch.tensor([1, 7])), ("sequential", 6, torch.randn(2, 6)), ("continuous", None, torch.rand(2, 1))],
)
def test_class_conditioning(num_classes, adm, y):
    m = randomize_zero_init(tiny_unet(num_classes=num_classes, adm_in_channels=adm)).eval()
    x, t, ctx = tiny_inputs()
    with torch.no_grad():
        out = m(x, t, context=ctx, y=y)
        assert not torch.allclose(out, m(x, t, context=ctx, y=y.flip(0)))
    with pytest.raises(ValueError, match="num_classes"):
        m(x, t, context=ctx)


@pytest.mark.slow
@pytest.mark.parametrize(
    "yaml_name, manifest, n_params",
    [
        ("v2-inference.yaml", "sd2-512-base-keys.tsv", 865_910_724),
        ("v2-inpainting-inference.yaml", "sd2-inpainting-keys.tsv", 865_925_124),
    ],
)
def test_full_size_unet_matches_reference_keys(yaml_name, manifest, n_params):
    prefix = "model.diffusion_model."
    ref = {k[len(prefix) :]: s for k, s in read_reference_tsv(manifest).items() if k.startswith(prefix)}
    with torch.device("meta"):
        model = instantiate_from_config(sd2_unet_config(yaml_name))
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert len(ref) == 686
    assert sorted(ours.keys() - ref.keys()) == [] and sorted(ref.keys() - ours.keys()) == []
    assert {k for k in ours if ours[k] != ref[k]} == set()
    assert sum(p.numel() for p in model.parameters()) == n_params
