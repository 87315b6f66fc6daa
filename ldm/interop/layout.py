"""Recognising a state dict that is not the one a model expects, so a mismatch error can say what the file is.

A strict load that fails reports counts and first keys (:func:`ldm.checkpoint.load_into`). That is exact but leaves
the user to work out *why* 546 tensors are missing. The usual causes are few and recognisable from the keys and
shapes alone; :func:`explain_mismatch` names the first that fits, with what to do:

* a diffusers component file (``unet/diffusion_pytorch_model.safetensors``: ``conv_in.weight``, ``down_blocks.*``)
  where the single ldm-layout file is expected;
* a file whose UNet exists only as LitEma shadow tensors (``model_ema.*``);
* keys with an extra leading prefix (``module.`` of a DDP wrapper, a doubled ``model.``) or without one
  (a bare UNet state dict: ``time_embed.0.weight``), found as the one prefix that maps most keys onto the model's;
* a text encoder of the other SD generation: ``cond_stage_model.transformer.*`` (SD 1.x: CLIP ViT-L/14 in the
  transformers layout) against ``cond_stage_model.model.*`` (SD2: OpenCLIP ViT-H/14), or the reverse;
* a cross-attention context width that differs (768 is SD 1.x, 1024 SD2: ``unet_config.params.context_dim``);
* a UNet input width that differs (9 channels is an inpainting model, 4 a text-to-image one).

Pure functions of key names and shapes; nothing is renamed or loaded here (a guess must never change weights).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Mapping, Sequence

UNET = "model.diffusion_model."
EMA = "model_ema."
#: leading names of diffusers' UNet, VAE and transformers' CLIP text model state dicts
DIFFUSERS_MARKERS = ("conv_in.", "down_blocks.", "time_embedding.", "mid_block.", "encoder.down_blocks.",
                     "decoder.up_blocks.", "text_model.", "quant_conv.")
SD1_TEXT = "cond_stage_model.transformer."
SD2_TEXT = "cond_stage_model.model."
INPUT_CONV = UNET + "input_blocks.0.0.weight"


def explain_mismatch(ckpt: Mapping[str, Sequence[int]], model: Mapping[str, Sequence[int]]) -> str:
    """One or two sentences naming what the checkpoint is and what to do; "" when no known cause fits.

    Args:
        ckpt: checkpoint key -> shape.
        model: model key -> shape.
    """
    for check in (_diffusers, _prefix, _ema_only, _text_encoder, _context_width, _input_width):
        found = check(ckpt, model)
        if found:
            return found
    return ""


def _diffusers(ckpt: Mapping, model: Mapping) -> str:
    foreign = [k for k in ckpt if k.startswith(DIFFUSERS_MARKERS)]
    if not foreign or any(k.startswith(UNET) for k in ckpt) or any(k.startswith(DIFFUSERS_MARKERS) for k in model):
        return ""
    return (f"It is in the diffusers layout (keys like '{foreign[0]}'): one component of a diffusers pipeline "
            "folder, not an ldm checkpoint. Pass the single ldm-layout .ckpt/.safetensors file (a released SD2 file "
            "such as 512-base-ema.ckpt, or scripts/export.py --out), or convert the diffusers folder with diffusers' "
            "scripts/convert_diffusers_to_original_stable_diffusion.py.")


def _ema_only(ckpt: Mapping, model: Mapping) -> str:
    if any(k.startswith(UNET) for k in ckpt) or not any(k.startswith(UNET) for k in model):
        return ""
    shadows = [k for k in ckpt if k.startswith(EMA) and k not in (EMA + "decay", EMA + "num_updates")]
    if not shadows:
        return ""
    return (f"It holds the UNet only as {len(shadows)} EMA shadow tensors (model_ema.*) and no "
            "model.diffusion_model.* weights; the official layout keeps the UNet under model.diffusion_model.*. "
            "Pass the training checkpoint it was cut from, or an export of that checkpoint (scripts/export.py "
            "--out writes the EMA under model.diffusion_model.*).")


def _best_prefix(keys: Collection[str], targets: Collection[str]) -> tuple[str, int]:
    """The prefix ``p`` such that ``k = p + t`` for the most pairs (k in keys, t in targets), and that count."""
    counts: Counter[str] = Counter()
    for k in keys:
        start = 0
        while (dot := k.find(".", start)) != -1:  # split only at dots: 'model.x' -> 'model.' + 'x'
            if k[dot + 1:] in targets:
                counts[k[:dot + 1]] += 1
                break
            start = dot + 1
    return counts.most_common(1)[0] if counts else ("", 0)


def _prefix(ckpt: Mapping, model: Mapping) -> str:
    unexpected = [k for k in ckpt if k not in model]
    missing = {k for k in model if k not in ckpt}
    if not unexpected or not missing:
        return ""
    extra, n_extra = _best_prefix(unexpected, missing)  # checkpoint key = extra + model key
    lacking, n_lacking = _best_prefix(missing, set(unexpected))  # model key = lacking + checkpoint key
    # a real layout fault moves whole sub-models (hundreds of keys); a handful of accidental name overlaps do not
    least = max(2, len(unexpected) // 2)
    if n_extra >= least and n_extra >= n_lacking:
        return (f"{n_extra} of its {len(ckpt)} keys carry an extra leading '{extra}' (e.g. '{extra}"
                f"{next(k for k in missing if extra + k in ckpt)}'): it was saved from a wrapped model (DDP "
                f"'module.', a doubled 'model.'). Save it again with that prefix removed from "
                + (f"every key: {{k.removeprefix('{extra}'): v for k, v in sd.items()}}." if n_extra == len(ckpt)
                   else f"those {n_extra} keys."))
    if n_lacking >= least:
        example = next(k for k in unexpected if lacking + k in missing)
        return (f"{n_lacking} of its {len(ckpt)} keys lack the leading '{lacking}' (e.g. '{example}' for "
                f"'{lacking}{example}'): it is a sub-model's state dict, not the whole model's. Save it again with "
                + (f"the full names: {{'{lacking}' + k: v for k, v in sd.items()}}." if n_lacking == len(ckpt)
                   else f"'{lacking}' in front of those {n_lacking} keys."))
    return ""


def _text_encoder(ckpt: Mapping, model: Mapping) -> str:
    def family(keys: Collection[str]) -> str | None:
        if any(k.startswith(SD1_TEXT) for k in keys):
            return "SD 1.x (CLIP ViT-L/14, cond_stage_model.transformer.*)"
        if any(k.startswith(SD2_TEXT) for k in keys):
            return "SD2 (OpenCLIP ViT-H/14, cond_stage_model.model.*)"
        return None

    mine, theirs = family(model), family(ckpt)
    if mine is None or theirs is None or mine == theirs:
        return ""
    return (f"Its text encoder is {theirs.split(' (')[0]}'s {theirs[theirs.index('('):]}, this config's is "
            f"{mine}: the checkpoint is for the other Stable Diffusion generation. Use a checkpoint of this "
            "config's generation (for SD2: 512-base-ema.ckpt), or the config the checkpoint was made for.")


def _context_width(ckpt: Mapping, model: Mapping) -> str:
    widths = {(tuple(ckpt[k])[1], tuple(model[k])[1]) for k in ckpt
              if k.endswith("attn2.to_k.weight") and k in model and tuple(ckpt[k]) != tuple(model[k])}
    if len(widths) != 1:
        return ""
    theirs, mine = widths.pop()
    generation = {768: " (768: an SD 1.x checkpoint)", 1024: " (1024: an SD2 checkpoint)"}.get(theirs, "")
    return (f"Its cross-attention context width is {theirs}{generation}, this config's is {mine} "
            "(unet_config.params.context_dim, the text encoder's width): they were trained with different text "
            "encoders. Use a checkpoint made for this config's text encoder.")


def _input_width(ckpt: Mapping, model: Mapping) -> str:
    if INPUT_CONV not in ckpt or INPUT_CONV not in model:
        return ""
    theirs, mine = tuple(ckpt[INPUT_CONV])[1:2], tuple(model[INPUT_CONV])[1:2]
    if theirs == mine or not theirs or not mine:
        return ""
    kind = {4: "a text-to-image model", 9: "an inpainting model"}
    return (f"Its UNet takes {theirs[0]} input channels ({kind.get(theirs[0], 'another model')}), this config's "
            f"{mine[0]} (unet_config.params.in_channels). Use the config the checkpoint was trained with.")
