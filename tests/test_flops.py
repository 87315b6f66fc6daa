"""benchmarks/flops.py against the published counts (docs/DECISIONS.md R10) and against hand formulas.

The full-size models are built on the meta device (no memory, no arithmetic); the reference numbers were
measured independently with the reference code and are written here as constants.
"""

from __future__ import annotations

import pytest
import torch
from flops import ModelFlops, count_flops, flops_from_config, model_flops, unet_forward_flops
from omegaconf import OmegaConf

from ldm.util import instantiate_from_config
from tests.helpers import REPO, build_tiny

SD = REPO / "configs" / "stable-diffusion"
G = 1e9


def close(value: float, expected: float, rel: float = 0.005) -> bool:
    return abs(value - expected) <= rel * expected


@pytest.fixture(scope="module")
def inpaint_flops() -> ModelFlops:
    return flops_from_config(OmegaConf.load(SD / "v2-inpainting-inference.yaml").model, 512)


def _meta_unet(yaml: str, **overrides):
    cfg = OmegaConf.load(SD / yaml).model.params.unet_config
    for k, v in overrides.items():
        cfg.params[k] = v
    with torch.device("meta"):
        return instantiate_from_config(cfg)


def test_full_size_counts_match_spec_b8(inpaint_flops):
    f = inpaint_flops
    assert f.latent_hw == (64, 64)
    assert close(f.unet_forward / G, 804.38)  # 9-channel inpainting UNet, 4x64x64 latent + 77x1024 context
    assert close(f.vae_encoder / G, 1116.7)  # incl. quant_conv, 3x512x512
    assert close(f.vae_decoder / G, 2514.5)  # incl. post_quant_conv
    assert close(f.text_encoder / G, 45.13)  # OpenCLIP ViT-H text, penultimate layer (23 of 24 blocks)
    base = unet_forward_flops(_meta_unet("v2-inference.yaml", use_fp16=False), (64, 64))
    assert close(base / G, 804.26)  # 4-channel base UNet
    assert 0 < f.unet_forward - base < 0.2 * G  # only the first conv differs: 5 more input channels


def test_training_and_sampling_totals_match_performance_md(inpaint_flops):
    f = inpaint_flops
    assert close(f.training_per_sample() / 1e12, 4.69)  # 3 x UNet + 2 VAE encodes + text
    assert close(f.training_per_sample() / (3 * f.unet_forward), 1.94)
    assert close(f.training_per_sample(precomputed_image_latent=True) / (3 * f.unet_forward), 1.48)
    assert close(f.sampling_per_image(steps=50) / 1e12, 84.2)  # 100 UNet forwards + encode + decode + 2 texts
    assert f.sampling_per_image(steps=50, guidance=False) < f.sampling_per_image(steps=50) / 1.9


def test_counted_backward_is_twice_the_forward_without_checkpointing():
    unet = _meta_unet("v2-inpainting-inference.yaml", use_checkpoint=False)
    x = torch.zeros(1, 9, 64, 64, device="meta")
    t = torch.zeros(1, dtype=torch.long, device="meta")
    ctx = torch.zeros(1, 77, 1024, device="meta")
    fwd, _ = count_flops(lambda: unet(x, t, context=ctx))
    fwd_bwd, per_op = count_flops(lambda: unet(x, t, context=ctx).sum().backward())
    assert close(fwd_bwd / fwd, 3.0, rel=0.01)  # the "3 x forward" convention of MFU
    assert {"convolution", "convolution_backward", "bmm", "mm"} <= set(per_op)
    for block in unet.modules():  # activation checkpointing re-runs forwards inside the backward
        if hasattr(block, "use_checkpoint"):
            block.use_checkpoint = True
        if hasattr(block, "checkpoint") and isinstance(block.checkpoint, bool):
            block.checkpoint = True
    recomputed, _ = count_flops(lambda: unet(x, t, context=ctx).sum().backward())
    assert 3.5 < recomputed / fwd < 4.0


def test_count_convention_is_two_flops_per_multiply_accumulate():
    lin, conv = torch.nn.Linear(16, 32), torch.nn.Conv2d(3, 8, 3, padding=1)
    assert count_flops(lambda: lin(torch.zeros(4, 16)))[0] == 2 * 4 * 16 * 32
    assert count_flops(lambda: conv(torch.zeros(2, 3, 10, 10)))[0] == 2 * 2 * 8 * 10 * 10 * 3 * 3 * 3
    # SDPA on CPU tensors runs torch's CPU flash kernel, which FlopCounterMode alone counts as 0 FLOPs
    q = torch.zeros(1, 2, 5, 4, requires_grad=True)  # B x heads x N x d: QK^T and AV, 2 * N * N * d each
    sdpa = torch.nn.functional.scaled_dot_product_attention
    assert count_flops(lambda: sdpa(q, q, q))[0] == 2 * (2 * 5 * 5 * 4) * 2
    on_meta = q.detach().to("meta")
    assert count_flops(lambda: sdpa(on_meta, on_meta, on_meta))[0] == 2 * (2 * 5 * 5 * 4) * 2
    assert count_flops(lambda: sdpa(q, q, q).sum().backward())[0] > 3 * 2 * (2 * 5 * 5 * 4) * 2


def test_real_and_meta_counts_agree_and_scale_with_batch():
    model = build_tiny("inpaint").eval()
    real = model_flops(model, 64)
    meta = flops_from_config(OmegaConf.load(REPO / "configs" / "tiny" / "inpaint.yaml").model, 64)
    assert real == meta
    assert real.latent_hw == (8, 8) and real.unet_forward > 0 and real.vae_encoder > 0
    unet = model.model.diffusion_model
    assert unet_forward_flops(unet, (8, 8), batch=3) == 3 * real.unet_forward
    # a bigger latent costs more than proportionally (self-attention is quadratic in the token count)
    assert unet_forward_flops(unet, (16, 16)) > 4 * real.unet_forward
