"""Checkpoints that are not what the config expects: each is refused with the cause named, or loaded and said.

Real files on disk (torch ``.ckpt``, safetensors with and without metadata, a real diffusers UNet state dict) go
through the real ``model.params.ckpt_path`` route of a tiny inpainting run, and through ``load_model`` (sampling,
evaluation, export). A strict load already refused them; these tests are about the message telling the user what
the file is and what to do, and about the surgery and the recorded objective / latent scale at init.
"""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import save_file

from ldm.checkpoint import CheckpointError
from ldm.inference import load_model
from tests.helpers import build_tiny, tiny_config

INPUT_CONV = "model.diffusion_model.input_blocks.0.0.weight"
EMA_INPUT_CONV = "model_ema.diffusion_modelinput_blocks00weight"


@pytest.fixture(scope="module")
def base_sd():
    torch.manual_seed(0)
    return {k: v.clone() for k, v in build_tiny("base").state_dict().items()}


def _save(path, sd, **top):
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=top or None)
    else:
        torch.save({"state_dict": sd, **top}, path)
    return str(path)


def _sd1(sd):
    """The SD 1.x layout: a transformers CLIP text encoder and a wider cross-attention context."""
    out = {k: v for k, v in sd.items() if not k.startswith("cond_stage_model.")}
    for k in out:
        if k.endswith(("attn2.to_k.weight", "attn2.to_v.weight")):
            out[k] = torch.zeros(out[k].shape[0], 48)
    out["cond_stage_model.transformer.text_model.final_layer_norm.weight"] = torch.ones(48)
    return out


def _diffusers_unet_sd():
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
                                cross_attention_dim=32, attention_head_dim=2, norm_num_groups=32)
    return unet.state_dict()


LAYOUT_FAULTS = {
    "ddp_module_prefix": (lambda sd: {"module." + k: v for k, v in sd.items()}, "extra leading 'module.'"),
    "doubled_model_prefix": (lambda sd: {"model." + k: v for k, v in sd.items()}, "extra leading 'model.'"),
    "unet_prefix_missing": (lambda sd: {k.replace("model.diffusion_model.", "diffusion_model."): v
                                        for k, v in sd.items()}, "lack the leading 'model.'"),
    "bare_unet": (lambda sd: {k.removeprefix("model.diffusion_model."): v for k, v in sd.items()
                              if k.startswith("model.diffusion_model.")}, "lack the leading 'model.diffusion_model.'"),
    "ema_only": (lambda sd: {k: v for k, v in sd.items() if k.startswith("model_ema.")}, "only as 324 EMA shadow"),
    "sd1": (_sd1, "text encoder is SD 1.x"),
    "diffusers_unet": (lambda sd: _diffusers_unet_sd(), "diffusers layout"),
}


@pytest.mark.parametrize("fault", sorted(LAYOUT_FAULTS))
def test_a_foreign_layout_as_init_names_what_it_is(tmp_path, base_sd, fault):
    make, phrase = LAYOUT_FAULTS[fault]
    path = _save(tmp_path / "foreign.safetensors", make(base_sd))
    with pytest.raises(CheckpointError) as e:
        build_tiny("inpaint", ckpt_path=path)
    assert phrase in str(e.value) and path in str(e.value)
    assert "\n" not in str(e.value)


def test_context_width_is_named_without_text_encoder_keys(tmp_path, base_sd):
    sd = {k: v for k, v in _sd1(base_sd).items() if not k.startswith("cond_stage_model.")}
    with pytest.raises(CheckpointError, match=r"context width is 48, this config's is 32"):
        build_tiny("inpaint", ckpt_path=_save(tmp_path / "ctx.ckpt", sd), load_only_unet=True)


def test_load_model_names_the_cause_too(tmp_path, base_sd):
    path = _save(tmp_path / "wrapped.ckpt", {"module." + k: v for k, v in base_sd.items()})
    with pytest.raises(CheckpointError, match=r"extra leading 'module\.'"):
        load_model(tiny_config("base"), path, device="cpu")
    nine = {k: v for k, v in build_tiny("inpaint").state_dict().items() if not k.startswith("model_ema.")}
    with pytest.raises(CheckpointError, match=r"takes 9 input channels \(an inpainting model\), this config's 4"):
        load_model(tiny_config("base"), _save(tmp_path / "nine.ckpt", nine), device="cpu")


def test_an_inpainting_checkpoint_as_base_is_loaded_once_and_said(tmp_path, caplog):
    nine = build_tiny("inpaint").state_dict()
    with torch.no_grad():
        nine[INPUT_CONV].normal_()
        nine[EMA_INPUT_CONV].copy_(nine[INPUT_CONV] * 2)
    path = _save(tmp_path / "inpaint.ckpt", nine)
    with caplog.at_level(logging.INFO):
        model = build_tiny("inpaint", ckpt_path=path)
    assert torch.equal(model.state_dict()[INPUT_CONV], nine[INPUT_CONV])  # not widened or zeroed again
    assert torch.equal(model.state_dict()[EMA_INPUT_CONV], nine[EMA_INPUT_CONV])
    assert "already has 9 input channels" in caplog.text and "widened" not in caplog.text

    half = dict(nine)
    half[EMA_INPUT_CONV] = nine[EMA_INPUT_CONV][:, :4].clone()  # raw conv 9 wide, its EMA twin 4: hand-edited
    with pytest.raises(CheckpointError, match="raw and EMA input convs differ in width"):
        build_tiny("inpaint", ckpt_path=_save(tmp_path / "half.ckpt", half))


def test_a_recorded_parameterization_change_at_init_is_said(tmp_path, base_sd, caplog):
    with caplog.at_level(logging.INFO):
        build_tiny("inpaint", ckpt_path=_save(tmp_path / "eps.safetensors", base_sd, parameterization="eps"))
    assert "trained with parameterization 'eps'; this run trains 'v'" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO):
        build_tiny("inpaint", ckpt_path=_save(tmp_path / "plain.safetensors", base_sd))  # no metadata
    assert "records no parameterization; this run trains it as 'v'" in caplog.text


def test_a_recorded_scale_factor_must_match_at_init(tmp_path, base_sd):
    meta = '{"parameterization": "eps", "scale_factor": 0.25}'
    exported = _save(tmp_path / "export.safetensors", base_sd, parameterization="eps", provenance=meta)
    with pytest.raises(CheckpointError, match=r"scale_factor 0.25 but the config says 0.18215.*scale_factor: 0.25"):
        build_tiny("inpaint", ckpt_path=exported)
    learned = _save(tmp_path / "std.ckpt", {**base_sd, "scale_factor": torch.tensor(0.25)})  # a scale_by_std run
    with pytest.raises(CheckpointError, match=r"scale_factor 0.25 but the config says 0.18215"):
        build_tiny("inpaint", ckpt_path=learned)
    same = _save(tmp_path / "same.ckpt", {**base_sd, "scale_factor": torch.tensor(0.18215)})
    assert float(build_tiny("inpaint", ckpt_path=same).scale_factor) == pytest.approx(0.18215)
    # sampling/export: the float32 tensor of 0.18215 is the config's 0.18215, not a contradiction
    assert float(load_model(tiny_config("base"), same, device="cpu").model.scale_factor) == pytest.approx(0.18215)
    assert float(build_tiny("inpaint", ckpt_path=exported, scale_factor=0.25).scale_factor) == 0.25
