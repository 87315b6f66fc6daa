"""DECISIONS D3/D4: an inpainting model initialised from a 4-channel base equals the base, whatever the mask says.

The base is a tiny random text-to-image model saved to disk; the inpainting model loads it through the real
``ckpt_path`` route (4 -> 9 channel widening). For the same noisy latent, timestep and text, the inpainting
UNet's output must equal the base UNet's for arbitrary mask and masked-image channels, for the raw weights and
for the EMA weights.
"""

from __future__ import annotations

import pytest
import torch

from ldm.checkpoint import CheckpointError
from ldm.compat import ema_buffer_name
from tests.helpers import build_tiny


def _save_base(tmp_path, perturb_ema: bool, with_ema: bool = True, suffix: str = ".ckpt"):
    base = build_tiny("base")
    with torch.no_grad():  # random, non-zero weights everywhere (the out conv is zero-initialised)
        for p in base.model.parameters():
            p.normal_(0, 0.05)
    if perturb_ema:
        with torch.no_grad():  # make EMA weights differ from the raw ones so we can tell which got loaded
            for buf in base.model_ema.buffers():
                if buf.dtype.is_floating_point and buf.ndim > 0:
                    buf.add_(torch.randn_like(buf) * 0.05)
    sd = base.state_dict()
    if not with_ema:
        sd = {k: v for k, v in sd.items() if not k.startswith("model_ema.")}
    path = tmp_path / f"base{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        torch.save({"state_dict": sd, "global_step": 7}, path)
    return base, path


def _outputs(base, inp, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([10, 900])
    ctx = base.get_learned_conditioning(["a cat", "a dog"])
    with torch.no_grad():
        ref = base.model.diffusion_model(x, t, context=ctx)
        outs = []
        for fill in ("zeros", "random", "ones"):
            extra = {"zeros": torch.zeros(2, 5, 8, 8), "ones": torch.ones(2, 5, 8, 8),
                     "random": torch.randn(2, 5, 8, 8, generator=g) * 3}[fill]
            outs.append(inp.model.diffusion_model(torch.cat([x, extra], 1), t, context=ctx))
    return ref, outs


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_inpaint_equals_base_model_and_ema(tmp_path, suffix):
    base, path = _save_base(tmp_path, perturb_ema=True, suffix=suffix)
    inp = build_tiny("inpaint", ckpt_path=str(path))
    w = inp.model.diffusion_model.input_blocks[0][0].weight
    assert w.shape[1] == 9 and torch.count_nonzero(w[:, 4:]) == 0
    torch.testing.assert_close(w[:, :4], base.model.diffusion_model.input_blocks[0][0].weight)
    torch.testing.assert_close(inp.model.diffusion_model.input_blocks[0][0].bias,
                               base.model.diffusion_model.input_blocks[0][0].bias)
    ref, outs = _outputs(base, inp)
    assert ref.abs().max() > 1e-3  # the comparison is not trivially 0 == 0
    for o in outs:
        torch.testing.assert_close(o, ref, atol=1e-5, rtol=1e-5)
    with base.ema_scope(), inp.ema_scope():
        ref_ema, outs_ema = _outputs(base, inp)
    assert not torch.allclose(ref_ema, ref, atol=1e-4)  # EMA weights really differ from the raw ones
    for o in outs_ema:
        torch.testing.assert_close(o, ref_ema, atol=1e-5, rtol=1e-5)


def test_checkpoint_without_ema_initialises_ema_from_loaded_weights(tmp_path):
    base, path = _save_base(tmp_path, perturb_ema=False, with_ema=False)
    inp = build_tiny("inpaint", ckpt_path=str(path))
    for name, p in inp.model.named_parameters():
        shadow = getattr(inp.model_ema, ema_buffer_name(name))
        torch.testing.assert_close(shadow, p.detach())
    with inp.ema_scope():  # the inpainting EMA equals the base's *raw* weights it was initialised from
        ref, outs = _outputs(base, inp)
    for o in outs:
        torch.testing.assert_close(o, ref, atol=1e-5, rtol=1e-5)


def test_unwidenable_shape_is_a_clear_error(tmp_path):
    base, path = _save_base(tmp_path, perturb_ema=False)
    sd = torch.load(path, weights_only=True)["state_dict"]
    key = "model.diffusion_model.input_blocks.0.0.weight"
    sd[key] = torch.zeros(sd[key].shape[0], 3, 3, 3)  # 3 channels cannot be widened with keep dims 4
    bad = tmp_path / "bad.ckpt"
    torch.save({"state_dict": sd}, bad)
    with pytest.raises(CheckpointError, match="cannot widen"):
        build_tiny("inpaint", ckpt_path=str(bad))


def test_official_layout_loads_strictly_into_inpaint_model(tmp_path):
    """A state dict in the official layout (as written by our model) loads with no missing/unexpected keys."""
    src = build_tiny("inpaint", use_ema=True)
    sd = src.state_dict()
    path = tmp_path / "inpaint.ckpt"
    torch.save({"state_dict": sd}, path)
    dst = build_tiny("inpaint", use_ema=True, finetune_keys=None)
    missing, unexpected = dst.init_from_ckpt(str(path))
    assert missing == [] and unexpected == []
    dst.load_state_dict(sd, strict=True)


def test_not_a_checkpoint_is_a_clear_error(tmp_path):
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.ckpt"):
        build_tiny("inpaint", ckpt_path=str(junk))
