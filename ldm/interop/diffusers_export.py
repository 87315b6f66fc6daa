"""Write an ldm inpainting (or text-to-image) checkpoint as a diffusers pipeline folder, fully offline.

The folder holds everything ``StableDiffusionInpaintPipeline.from_pretrained(folder)`` needs, generated here from
the ldm model config (no hub download, no diffusers converter):

    model_index.json
    unet/config.json            unet/diffusion_pytorch_model.safetensors
    vae/config.json             vae/diffusion_pytorch_model.safetensors
    text_encoder/config.json    text_encoder/model.safetensors
    tokenizer/vocab.json  merges.txt  tokenizer_config.json  special_tokens_map.json
    scheduler/scheduler_config.json

Weights are renamed by :mod:`ldm.interop.keymaps`. The scheduler is DDIM with ldm's exact timestep rule
(``steps_offset 1``, ``set_alpha_to_one False``, "leading" spacing) and, importantly, the model's
``prediction_type``: ``v_prediction`` for our v-objective runs, ``epsilon`` for eps (DECISIONS D12:
diffusers would otherwise assume eps for a 9-channel SD2 model and sample garbage from a v model).

Neither diffusers nor transformers is imported here: the folder is plain JSON + safetensors, so exporting works
without the client libraries installed. Left out: safety checker / feature extractor (set to null, as
``requires_safety_checker: false``), and diffusers -> ldm.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from ldm.interop.keymaps import UNetLayout, text_to_transformers, unet_to_diffusers, vae_to_diffusers

log = logging.getLogger(__name__)

__all__ = [
    "PREDICTION_TYPES",
    "convert_to_diffusers",
    "diffusers_configs",
    "export_diffusers",
    "write_tokenizer",
]

#: ldm parameterization -> diffusers scheduler ``prediction_type``
PREDICTION_TYPES = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
#: ldm beta schedule name -> diffusers name (ldm "linear" is linear in sqrt(beta) = diffusers "scaled_linear")
BETA_SCHEDULES = {"linear": "scaled_linear", "sqrt_linear": "linear"}
PREFIXES = {"unet": "model.diffusion_model.", "vae": "first_stage_model.", "text": "cond_stage_model.model."}
# open_clip text-tower switches (truthy = non-standard block) that transformers' CLIPTextModel cannot express
_EXOTIC_TEXT_OPTIONS = ("no_causal_mask", "embed_cls", "hf_model_name", "qk_norm", "scaled_cosine_attn",
                        "scale_heads", "scale_attn_inner", "scale_attn", "scale_fc", "act_kwargs", "norm_kwargs")
# COMPAT: open_clip 3 calls its special tokens <start_of_text>/<end_of_text>; CLIP's BPE files and HF use these.
SPECIAL_TOKENS = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}


def _plain(cfg: Any) -> dict[str, Any]:
    """An OmegaConf node or mapping as a plain dict (resolving interpolations)."""
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(cfg):
            return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    except ImportError:  # pragma: no cover - omegaconf is a core dependency
        pass
    return dict(cfg)


def _unsupported(where: str, params: Mapping[str, Any], allowed: Mapping[str, Any]) -> None:
    """Raise if a param the exporter cannot represent is set to anything but its harmless default."""
    bad = {k: params[k] for k, ok in allowed.items() if k in params and params[k] not in ok}
    if bad:
        raise ValueError(f"{where}: {bad} cannot be expressed in the diffusers layout; export is not possible")


def unet_config(unet_params: Mapping[str, Any], sample_size: int) -> dict[str, Any]:
    """diffusers ``UNet2DConditionModel`` config equivalent to an ldm ``UNetModel`` params block."""
    p = dict(unet_params)
    _unsupported("unet_config.params", p, {
        "num_classes": (None,), "resblock_updown": (False,), "use_scale_shift_norm": (False,),
        "conv_resample": (True,), "num_attention_blocks": (None,), "disable_self_attentions": (None,),
        "use_spatial_transformer": (True,), "dims": (2,),
    })
    mult, ch, res = list(p["channel_mult"]), int(p["model_channels"]), p["num_res_blocks"]
    if not isinstance(res, int):
        raise ValueError("unet_config.params.num_res_blocks: only one count for all levels can be exported")
    widths = [ch * m for m in mult]
    head_ch, n_heads = int(p.get("num_head_channels", -1)), int(p.get("num_heads", -1))
    if head_ch != -1 and any(w % head_ch for w in widths):
        raise ValueError(f"unet_config.params.num_head_channels={head_ch} does not divide the widths {widths}")
    heads = [w // head_ch if head_ch != -1 else n_heads for w in widths]
    attn = [2**i in set(p["attention_resolutions"]) for i in range(len(mult))]
    return {
        "_class_name": "UNet2DConditionModel",
        "sample_size": int(sample_size),
        "in_channels": int(p["in_channels"]),
        "out_channels": int(p["out_channels"]),
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        "block_out_channels": widths,
        "layers_per_block": res,
        # COMPAT: diffusers' SD2 configs put the number of *heads* in attention_head_dim (a historical misnomer).
        "attention_head_dim": heads,
        "cross_attention_dim": int(p["context_dim"]),
        "transformer_layers_per_block": int(p.get("transformer_depth", 1)),
        "use_linear_projection": bool(p.get("use_linear_in_transformer", False)),
        "flip_sin_to_cos": True,  # ldm's timestep embedding is [cos, sin]
        "freq_shift": 0,
        "norm_num_groups": 32,
        "norm_eps": 1e-5,
        "act_fn": "silu",
        "downsample_padding": 1,
        "center_input_sample": False,
        "mid_block_scale_factor": 1,
        "upcast_attention": False,
        "only_cross_attention": False,
        "dual_cross_attention": False,
    }


def vae_config(first_stage_params: Mapping[str, Any], scale_factor: float) -> dict[str, Any]:
    """diffusers ``AutoencoderKL`` config equivalent to an ldm ``AutoencoderKL`` params block."""
    dd = dict(first_stage_params["ddconfig"])
    if list(dd.get("attn_resolutions", [])):
        raise ValueError("first_stage_config ddconfig.attn_resolutions must be empty to export to diffusers")
    if int(first_stage_params["embed_dim"]) != int(dd["z_channels"]) or not dd.get("double_z", True):
        raise ValueError("first_stage_config: diffusers needs embed_dim == z_channels and double_z")
    levels = len(dd["ch_mult"])
    return {
        "_class_name": "AutoencoderKL",
        "in_channels": int(dd["in_channels"]),
        "out_channels": int(dd["out_ch"]),
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": [int(dd["ch"]) * m for m in dd["ch_mult"]],
        "layers_per_block": int(dd["num_res_blocks"]),
        "latent_channels": int(dd["z_channels"]),
        "norm_num_groups": 32,
        "act_fn": "silu",
        "sample_size": int(dd["resolution"]),
        "scaling_factor": float(scale_factor),
    }


def text_config(cond_params: Mapping[str, Any]) -> dict[str, Any]:
    """transformers ``CLIPTextConfig`` equivalent to ldm's ``FrozenOpenCLIPEmbedder`` params.

    The exported model has ``layers - 1`` blocks for ``layer: penultimate`` (its ``final_layer_norm`` is
    open_clip's ``ln_final``, applied after that block, as ldm does).
    """
    import open_clip

    from ldm.modules.encoders.modules import load_text_config

    cfg = load_text_config(str(cond_params.get("arch", "ViT-H-14")))
    tc = open_clip.model.CLIPTextCfg(**cfg["text_cfg"])
    exotic = {name: getattr(tc, name) for name in _EXOTIC_TEXT_OPTIONS if getattr(tc, name)}
    if tc.ls_init_value is not None or tc.block_type not in (None, "default") or exotic:
        raise ValueError(f"cond_stage_config: open_clip text options {exotic or 'ls_init_value/block_type'} "
                         "have no CLIPTextModel equivalent; export is not possible")
    layer = cond_params.get("layer", "last")
    return {
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": int(tc.vocab_size),
        "hidden_size": int(tc.width),
        "intermediate_size": int(tc.width * tc.mlp_ratio),
        "num_hidden_layers": int(tc.layers) - (1 if layer == "penultimate" else 0),
        "num_attention_heads": int(tc.heads),
        "max_position_embeddings": int(tc.context_length),
        "hidden_act": "quick_gelu" if cfg.get("quick_gelu", False) else "gelu",
        "layer_norm_eps": 1e-5,
        "projection_dim": int(cfg["embed_dim"]),
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 0,  # open_clip pads with 0 (see write_tokenizer)
        "torch_dtype": "float32",
    }


def scheduler_config(model_params: Mapping[str, Any]) -> dict[str, Any]:
    """DDIM scheduler config reproducing ldm's DDIM timesteps, with the model's prediction type."""
    param = str(model_params.get("parameterization", "eps"))
    schedule = str(model_params.get("beta_schedule", "linear"))
    if param not in PREDICTION_TYPES:
        raise ValueError(f"model.params.parameterization={param!r}: expected one of {sorted(PREDICTION_TYPES)}")
    if schedule not in BETA_SCHEDULES and model_params.get("given_betas") is None:
        raise ValueError(f"model.params.beta_schedule={schedule!r} has no diffusers equivalent")
    given = model_params.get("given_betas")
    return {
        "_class_name": "DDIMScheduler",
        "num_train_timesteps": int(model_params.get("timesteps", 1000)),
        "beta_start": float(model_params.get("linear_start", 1e-4)),
        "beta_end": float(model_params.get("linear_end", 2e-2)),
        "beta_schedule": BETA_SCHEDULES.get(schedule, "linear"),
        "trained_betas": [float(b) for b in given] if given is not None else None,
        "prediction_type": PREDICTION_TYPES[param],
        # COMPAT: ldm's DDIM timesteps are 1, 21, ..., 981 for 50 steps and its last step lands on abar[0].
        "steps_offset": 1,
        "set_alpha_to_one": False,
        "timestep_spacing": "leading",
        "clip_sample": False,
        "thresholding": False,
        "rescale_betas_zero_snr": False,
    }


def _diffusers_version() -> str:
    try:
        return metadata.version("diffusers")
    except metadata.PackageNotFoundError:
        return "0.30.0"


def diffusers_configs(model_config: Mapping[str, Any], scale_factor: float | None = None) -> dict[str, dict[str, Any]]:
    """All JSON configs of the pipeline folder, keyed by their path inside it.

    ``scale_factor``: the latent scale the model uses (a ``scale_by_std`` run learns it); None takes the config's.
    """
    mc = _plain(model_config)
    params = mc["params"]
    if scale_factor is None:
        scale_factor = float(params.get("scale_factor", 1.0))
    unet_params = params["unet_config"]["params"]
    inpaint = int(unet_params["in_channels"]) == 9
    pipeline = "StableDiffusionInpaintPipeline" if inpaint else "StableDiffusionPipeline"
    return {
        "model_index.json": {
            "_class_name": pipeline,
            "_diffusers_version": _diffusers_version(),
            "feature_extractor": [None, None],
            "image_encoder": [None, None],
            "requires_safety_checker": False,
            "safety_checker": [None, None],
            "scheduler": ["diffusers", "DDIMScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        },
        "unet/config.json": unet_config(unet_params, int(params.get("image_size", 64))),
        "vae/config.json": vae_config(params["first_stage_config"]["params"], scale_factor),
        "text_encoder/config.json": text_config(params["cond_stage_config"].get("params", {})),
        "scheduler/scheduler_config.json": scheduler_config(params),
    }


def _component(sd: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    out = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if not out:
        raise ValueError(f"the state dict has no '{prefix}*' tensors; is it an SD checkpoint in the ldm layout?")
    return out


def convert_to_diffusers(
    sd: Mapping[str, torch.Tensor], configs: Mapping[str, Mapping[str, Any]]
) -> dict[str, dict[str, torch.Tensor]]:
    """Rename an official-layout ldm state dict into the three diffusers/transformers state dicts.

    Returns:
        ``{"unet": ..., "vae": ..., "text_encoder": ...}``; text keys are prefixed ``text_model.``, the
        layout every transformers version loads (COMPAT: 5.x models drop the prefix in memory but accept it).
    """
    unet_cfg, vae_cfg = configs["unet/config.json"], configs["vae/config.json"]
    layout = UNetLayout(len(unet_cfg["block_out_channels"]), int(unet_cfg["layers_per_block"]))
    n_text = int(configs["text_encoder/config.json"]["num_hidden_layers"])
    text = text_to_transformers(_component(sd, PREFIXES["text"]), n_text)
    return {
        "unet": unet_to_diffusers(_component(sd, PREFIXES["unet"]), layout),
        "vae": vae_to_diffusers(_component(sd, PREFIXES["vae"]), len(vae_cfg["block_out_channels"])),
        "text_encoder": {f"text_model.{k}": v for k, v in text.items()},
    }


def write_tokenizer(out_dir: str | Path, pad_token: str = "!", max_length: int = 77) -> Path:
    """Write a ``CLIPTokenizer`` (vocab.json, merges.txt) built from open_clip's own BPE tables.

    ``pad_token``: "!" (id 0, the default and the choice of the official SD2 diffusers repos) makes the padded
    77-id sequence equal open_clip's, which pads with 0; the UNet attends to every position, so this matters for
    the output. Its cost: a literal "!" in a prompt becomes the special pad token (HF splits it out), so prompts
    with "!" tokenize differently from open_clip. "<|endoftext|>" tokenizes "!" correctly but pads with 49407,
    which changes every padded position's embedding.
    """
    import open_clip

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bpe = open_clip.tokenizer.SimpleTokenizer()
    vocab = {SPECIAL_TOKENS.get(tok, tok): i for tok, i in bpe.encoder.items()}
    merges = sorted(bpe.bpe_ranks, key=bpe.bpe_ranks.__getitem__)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": pad_token}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    tok_cfg = {"tokenizer_class": "CLIPTokenizer", "model_max_length": max_length, "do_lower_case": True,
               "clean_up_tokenization_spaces": True, **special}
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))
    return out


def export_diffusers(
    sd: Mapping[str, torch.Tensor],
    model_config: Mapping[str, Any],
    out_dir: str | Path,
    dtype: torch.dtype | None = None,
    pad_token: str = "!",
    scale_factor: float | None = None,
    provenance: Mapping[str, Any] | None = None,
) -> Path:
    """Write the pipeline folder for an official-layout state dict (EMA already swapped in).

    Args:
        sd: LatentDiffusion state dict in the official layout (see ``ldm_format.select_weights``).
        model_config: the ``model`` section of the ldm config (``target``/``params``).
        out_dir: folder to create. It is written as a sibling temp folder and renamed into place when complete; an
            existing export there is replaced whole (any other non-empty folder is refused; whether replacing is
            allowed at all is the caller's choice: ``ldm.paths.export_folder``). A full disk or an
            unwritable location is one line naming the folder (:mod:`ldm.atomic`).
        dtype: optional floating-point cast of the network weights (the scheduler is JSON, computed by diffusers).
        pad_token: tokenizer pad token (see :func:`write_tokenizer`).
        scale_factor: the VAE ``scaling_factor``; None takes ``sd["scale_factor"]`` (the learned buffer of a
            ``scale_by_std`` run) when present, else the config's.
        provenance: record stored in every weight file's metadata (:mod:`ldm.provenance`).
    """
    from ldm.atomic import atomic_directory
    from ldm.interop.ldm_format import EXPORT_HINT

    final = Path(os.path.abspath(out_dir))  # "." has no name to put a sibling temp folder beside
    if final.is_dir() and any(final.iterdir()) and not (final / "model_index.json").is_file():
        raise ValueError(f"--diffusers {out_dir}: that folder exists and is not a diffusers pipeline (no "
                         "model_index.json); an export replaces its folder whole, so choose a new or empty folder")
    with atomic_directory(final, hint=EXPORT_HINT) as tmp:  # a failure never leaves a half-written pipeline
        prediction_type = _write_pipeline(sd, model_config, tmp, dtype, pad_token, scale_factor, provenance)
    log.info("wrote diffusers folder %s (prediction_type %s)", final, prediction_type)
    return final


def _write_pipeline(
    sd: Mapping[str, torch.Tensor], model_config: Mapping[str, Any], out: Path, dtype: torch.dtype | None,
    pad_token: str, scale_factor: float | None, provenance: Mapping[str, Any] | None,
) -> str:
    """Write the pipeline's files into ``out``; returns the scheduler's prediction type."""
    from safetensors.torch import save_file

    from ldm import provenance as prov

    if scale_factor is None and "scale_factor" in sd:
        scale_factor = float(sd["scale_factor"])
    configs = diffusers_configs(model_config, scale_factor)
    record = dict(provenance or {})
    record["parameterization"] = str(_plain(model_config)["params"].get("parameterization", "eps"))
    record["scale_factor"] = configs["vae/config.json"]["scaling_factor"]
    meta = {"format": "pt", **prov.to_metadata(record)}
    weights = convert_to_diffusers(sd, configs)
    files = {"unet": "unet/diffusion_pytorch_model.safetensors", "vae": "vae/diffusion_pytorch_model.safetensors",
             "text_encoder": "text_encoder/model.safetensors"}
    for rel, cfg in configs.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_text(json.dumps(cfg, indent=2) + "\n")
    for name, rel in files.items():
        tensors = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
                   for k, v in weights[name].items()}
        save_file(tensors, str(out / rel), metadata=meta)
    write_tokenizer(out / "tokenizer", pad_token=pad_token,
                    max_length=int(configs["text_encoder/config.json"]["max_position_embeddings"]))
    return configs["scheduler/scheduler_config.json"]["prediction_type"]
