"""Our model configs also build in the official Stability-AI/stablediffusion code, and theirs build in ours.

The official constructors' parameter names are written here as facts, read from
https://github.com/Stability-AI/stablediffusion/tree/cf1d67a6fd5ea1aa600c4df58e5b47da45f6bdbf
(``DDPM``, ``LatentDiffusion``, ``LatentFinetuneDiffusion`` and ``LatentInpaintDiffusion`` in
ldm/models/diffusion/ddpm.py, ``UNetModel`` in ldm/modules/diffusionmodules/openaimodel.py, ``AutoencoderKL`` in
ldm/models/autoencoder.py, ``FrozenOpenCLIPEmbedder`` in ldm/modules/encoders/modules.py). None of those
constructors takes unknown keyword arguments, so a key outside these sets makes the official code raise.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import yaml

from ldm.util import get_obj_from_str

ROOT = Path(__file__).resolve().parents[1]

OFFICIAL_DDPM = {
    "unet_config", "timesteps", "beta_schedule", "loss_type", "ckpt_path", "ignore_keys", "load_only_unet",
    "monitor", "use_ema", "first_stage_key", "image_size", "channels", "log_every_t", "clip_denoised",
    "linear_start", "linear_end", "cosine_s", "given_betas", "original_elbo_weight", "v_posterior",
    "l_simple_weight", "conditioning_key", "parameterization", "scheduler_config", "use_positional_encodings",
    "learn_logvar", "logvar_init", "make_it_fit", "ucg_training", "reset_ema", "reset_num_ema_updates",
}
OFFICIAL_LATENT_DIFFUSION = OFFICIAL_DDPM | {
    "first_stage_config", "cond_stage_config", "num_timesteps_cond", "cond_stage_key", "cond_stage_trainable",
    "concat_mode", "cond_stage_forward", "conditioning_key", "scale_factor", "scale_by_std",
    "force_null_conditioning",
}
OFFICIAL_LATENT_INPAINT_DIFFUSION = OFFICIAL_LATENT_DIFFUSION | {
    "concat_keys", "finetune_keys", "keep_finetune_dims", "c_concat_log_start", "c_concat_log_end",
    "masked_image_key",
}
OFFICIAL_UNET = {
    "image_size", "in_channels", "model_channels", "out_channels", "num_res_blocks", "attention_resolutions",
    "dropout", "channel_mult", "conv_resample", "dims", "num_classes", "use_checkpoint", "use_fp16", "use_bf16",
    "num_heads", "num_head_channels", "num_heads_upsample", "use_scale_shift_norm", "resblock_updown",
    "use_new_attention_order", "use_spatial_transformer", "transformer_depth", "context_dim", "n_embed", "legacy",
    "disable_self_attentions", "num_attention_blocks", "disable_middle_self_attn", "use_linear_in_transformer",
    "adm_in_channels",
}
#: positional parameters without a default: a config must give them
OFFICIAL_UNET_REQUIRED = {"image_size", "in_channels", "model_channels", "out_channels", "num_res_blocks",
                          "attention_resolutions"}
OFFICIAL_AUTOENCODER = {"ddconfig", "lossconfig", "embed_dim", "ckpt_path", "ignore_keys", "image_key",
                        "colorize_nlabels", "monitor", "ema_decay", "learn_logvar"}
OFFICIAL_OPEN_CLIP = {"arch", "version", "device", "max_length", "freeze", "layer"}

OFFICIAL = {
    "LatentDiffusion": OFFICIAL_LATENT_DIFFUSION,
    "LatentInpaintDiffusion": OFFICIAL_LATENT_INPAINT_DIFFUSION,
    "UNetModel": OFFICIAL_UNET,
    "AutoencoderKL": OFFICIAL_AUTOENCODER,
    "FrozenOpenCLIPEmbedder": OFFICIAL_OPEN_CLIP,
}
MODEL_CONFIGS = sorted(p.relative_to(ROOT).as_posix() for p in ROOT.joinpath("configs").rglob("*.yaml")
                       if "model" in (yaml.safe_load(p.read_text()) or {}))


def sections(model: dict) -> list[tuple[str, str, dict]]:
    """``(where, class name, params)`` for the model and each sub-model config with an official class."""
    out = [("model", model["target"].rsplit(".", 1)[-1], model.get("params") or {})]
    params = model.get("params") or {}
    for key in ("unet_config", "first_stage_config", "cond_stage_config"):
        if key in params:
            sub = params[key]
            out.append((f"model.params.{key}", sub["target"].rsplit(".", 1)[-1], sub.get("params") or {}))
    return out


def test_the_shipped_model_configs_are_checked():
    assert {"configs/inpaint.yaml", "configs/tiny/inpaint.yaml", "configs/demo/inpaint.yaml"} <= set(MODEL_CONFIGS)


@pytest.mark.parametrize("path", MODEL_CONFIGS)
def test_model_config_keys_are_official(path):
    model = yaml.safe_load((ROOT / path).read_text())["model"]
    for where, cls, params in sections(model):
        if cls not in OFFICIAL:
            continue  # e.g. a loss class of our own inside lossconfig, not a constructor parameter
        extra = sorted(set(params) - OFFICIAL[cls])
        assert not extra, f"{path}: {where} keys {extra} do not exist in the official {cls}"
        if cls == "UNetModel":
            missing = sorted(OFFICIAL_UNET_REQUIRED - set(params))
            assert not missing, f"{path}: {where} lacks {missing}, required by the official UNetModel"


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_our_classes_accept_every_official_parameter(name):
    path = {"LatentDiffusion": "ldm.models.diffusion.ddpm.LatentDiffusion",
            "LatentInpaintDiffusion": "ldm.models.diffusion.ddpm.LatentInpaintDiffusion",
            "UNetModel": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
            "AutoencoderKL": "ldm.models.autoencoder.AutoencoderKL",
            "FrozenOpenCLIPEmbedder": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder"}[name]
    cls = get_obj_from_str(path)
    accepted = set()
    for klass in cls.__mro__:
        if "__init__" in vars(klass) and klass.__module__.startswith("ldm."):
            accepted |= {p for p in inspect.signature(klass.__init__).parameters if p != "self"}
    missing = sorted(OFFICIAL[name] - accepted)
    assert not missing, f"{name} rejects official parameters {missing}"
