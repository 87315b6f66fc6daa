"""State-dict key maps from the ldm (SD2) layout to diffusers / transformers, written from the two key lists.

Three pure converters, one per component, each taking the component's ldm tensors *without* their ldm prefix:

* :func:`unet_to_diffusers` -- ``model.diffusion_model.*`` -> ``UNet2DConditionModel``;
* :func:`vae_to_diffusers` -- ``first_stage_model.*`` -> diffusers ``AutoencoderKL``;
* :func:`text_to_transformers` -- ``cond_stage_model.model.*`` (open_clip text tower) -> ``CLIPTextModel``'s
  inner text transformer (keys relative to ``text_model.``).

The per-key name functions (:func:`unet_key`, :func:`vae_key`) are public so tests can map the full-size key
listings without tensors. Every ldm key must map; an unknown key raises :class:`KeyMapError` (a converter that
skips keys silently would produce a model that loads with random layers).

Left out: the reverse direction (diffusers -> ldm), SD1 conv ``proj_in`` layouts, and UNet options the SD2 family
never uses (class embeddings, ResBlock up/down-sampling, scale-shift norm); :mod:`ldm.interop.diffusers_export`
rejects configs that set them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

__all__ = [
    "KeyMapError",
    "UNetLayout",
    "text_to_transformers",
    "unet_key",
    "unet_to_diffusers",
    "vae_key",
    "vae_to_diffusers",
]


class KeyMapError(KeyError):
    """An ldm key that has no counterpart in the target layout (wrong architecture or an unsupported option)."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


# ldm ResBlock (openaimodel) -> diffusers ResnetBlock2D
_UNET_RESNET = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
# ldm VAE ResnetBlock -> diffusers ResnetBlock2D (only the shortcut is renamed)
_VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "conv_shortcut"}
# ldm VAE AttnBlock (1x1 convs) -> diffusers Attention (linear layers)
_VAE_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def _rename_head(rest: str, table: Mapping[str, str], where: str) -> str:
    """Replace the longest matching module-path head of ``rest`` ("in_layers.0.weight" -> "norm1.weight")."""
    for old in sorted(table, key=len, reverse=True):
        if rest.startswith(old + "."):
            return table[old] + rest[len(old):]
    raise KeyMapError(f"{where}: no mapping for '{rest}'")


def _split(key: str, n: int) -> tuple[list[str], str]:
    """First ``n`` dot-separated parts of ``key`` and the remainder."""
    parts = key.split(".", n)
    if len(parts) <= n:
        raise KeyMapError(f"key '{key}' is too short")
    return parts[:n], parts[n]


@dataclass(frozen=True)
class UNetLayout:
    """The two numbers that fix the position of every ldm UNet block in diffusers' nesting.

    Args:
        num_levels: resolution levels (``len(channel_mult)``; 4 for SD2).
        num_res_blocks: ResBlocks per level on the way down (2 for SD2); the way up has one more.
    """

    num_levels: int
    num_res_blocks: int


def _unet_input_block(n: int, k: int, rest: str, layout: UNetLayout) -> str:
    if n == 0:
        return f"conv_in.{rest}"
    level, j = divmod(n - 1, layout.num_res_blocks + 1)
    if j == layout.num_res_blocks:  # the Downsample closing a level: "op" is its strided conv
        if not rest.startswith("op."):
            raise KeyMapError(f"input_blocks.{n}.{k}.{rest}: expected a Downsample ('op')")
        return f"down_blocks.{level}.downsamplers.0.conv.{rest[len('op.'):]}"
    if k == 0:
        return f"down_blocks.{level}.resnets.{j}.{_rename_head(rest, _UNET_RESNET, 'UNet ResBlock')}"
    if k == 1:  # SpatialTransformer: identical inner names (norm, proj_in, transformer_blocks.*, proj_out)
        return f"down_blocks.{level}.attentions.{j}.{rest}"
    raise KeyMapError(f"input_blocks.{n}.{k}: unexpected sub-module index")


def _unet_output_block(n: int, k: int, rest: str, layout: UNetLayout) -> str:
    level, j = divmod(n, layout.num_res_blocks + 1)  # diffusers up_blocks run from the lowest resolution up
    if k == 0:
        return f"up_blocks.{level}.resnets.{j}.{_rename_head(rest, _UNET_RESNET, 'UNet ResBlock')}"
    if rest.startswith("conv."):  # Upsample (last sub-module of the level's last block)
        return f"up_blocks.{level}.upsamplers.0.{rest}"
    if k == 1:
        return f"up_blocks.{level}.attentions.{j}.{rest}"
    raise KeyMapError(f"output_blocks.{n}.{k}.{rest}: unexpected sub-module")


def unet_key(key: str, layout: UNetLayout) -> str:
    """diffusers ``UNet2DConditionModel`` name of an ldm UNet key (given without ``model.diffusion_model.``)."""
    head = key.split(".", 1)[0]
    if head == "time_embed":
        (_, idx), rest = _split(key, 2)
        return {"0": "time_embedding.linear_1", "2": "time_embedding.linear_2"}[idx] + "." + rest
    if head == "out":
        (_, idx), rest = _split(key, 2)
        return {"0": "conv_norm_out", "2": "conv_out"}[idx] + "." + rest
    if head == "input_blocks":
        (_, n, k), rest = _split(key, 3)
        return _unet_input_block(int(n), int(k), rest, layout)
    if head == "output_blocks":
        (_, n, k), rest = _split(key, 3)
        return _unet_output_block(int(n), int(k), rest, layout)
    if head == "middle_block":
        (_, k), rest = _split(key, 2)
        if k == "1":
            return f"mid_block.attentions.0.{rest}"
        return f"mid_block.resnets.{int(k) // 2}.{_rename_head(rest, _UNET_RESNET, 'UNet ResBlock')}"
    raise KeyMapError(f"UNet key '{key}' has no diffusers counterpart (label_emb / unsupported option?)")


def unet_to_diffusers(sd: Mapping[str, torch.Tensor], layout: UNetLayout) -> dict[str, torch.Tensor]:
    """Rename every UNet tensor; values are shared, not copied (all SD2 UNet shapes carry over unchanged)."""
    return {unet_key(k, layout): v for k, v in sd.items()}


def _vae_side(side: str, rest: str, num_levels: int) -> str:
    top = rest.split(".", 1)[0]
    if top in ("conv_in", "conv_out"):
        return f"{side}.{rest}"
    if top == "norm_out":
        return f"{side}.conv_norm_out.{rest[len('norm_out.'):]}"
    if top == "mid":
        (_, blk), tail = _split(rest, 2)
        if blk == "attn_1":
            return f"{side}.mid_block.attentions.0.{_rename_head(tail, _VAE_ATTN, 'VAE attention')}"
        idx = {"block_1": 0, "block_2": 1}.get(blk)
        if idx is None:
            raise KeyMapError(f"VAE key '{side}.{rest}': unknown mid-block module '{blk}'")
        return f"{side}.mid_block.resnets.{idx}.{_rename_head(tail, _VAE_RESNET, 'VAE ResnetBlock')}"
    if (side, top) in (("encoder", "down"), ("decoder", "up")):
        (_, level, kind), tail = _split(rest, 3)
        # COMPAT: ldm's decoder.up is indexed by resolution (0 = full size); diffusers' up_blocks by order of use.
        block = f"down_blocks.{level}" if side == "encoder" else f"up_blocks.{num_levels - 1 - int(level)}"
        if kind == "block":
            j, tail2 = tail.split(".", 1)
            return f"{side}.{block}.resnets.{j}.{_rename_head(tail2, _VAE_RESNET, 'VAE ResnetBlock')}"
        if kind in ("downsample", "upsample"):
            return f"{side}.{block}.{kind}rs.0.{tail}"
        raise KeyMapError(f"VAE key '{side}.{rest}': attention inside a level (attn_resolutions) is not supported")
    raise KeyMapError(f"VAE key '{side}.{rest}' has no diffusers counterpart")


def vae_key(key: str, num_levels: int) -> str:
    """diffusers ``AutoencoderKL`` name of an ldm VAE key (given without ``first_stage_model.``)."""
    side, _, rest = key.partition(".")
    if side in ("quant_conv", "post_quant_conv"):
        return key
    if side not in ("encoder", "decoder"):
        raise KeyMapError(f"VAE key '{key}' has no diffusers counterpart")
    return _vae_side(side, rest, num_levels)


def vae_to_diffusers(sd: Mapping[str, torch.Tensor], num_levels: int) -> dict[str, torch.Tensor]:
    """Rename every VAE tensor; mid-block attention 1x1-conv weights become linear weights."""
    out = {}
    for k, v in sd.items():
        name = vae_key(k, num_levels)
        if ".attentions.0.to_" in name and name.endswith(".weight") and v.ndim == 4:
            v = v[:, :, 0, 0].clone()  # C x C x 1 x 1 conv -> C x C linear (own storage: safetensors wants it)
        out[name] = v
    return out


_TEXT_BLOCK = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}


def text_to_transformers(sd: Mapping[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """open_clip text tower -> ``CLIPTextTransformer`` tensors (keys without ``text_model.``).

    Only residual blocks ``0 .. num_layers - 1`` are kept: with SD2's penultimate layer the exported model has one
    block fewer than the tower and its ``final_layer_norm`` is open_clip's ``ln_final``, applied after block
    ``num_layers - 1`` exactly as ldm does. ``text_projection`` and ``logit_scale`` are unused by conditioning and
    dropped. open_clip's fused ``in_proj`` (3D x D, rows q | k | v) is split into three projections.
    """
    out: dict[str, torch.Tensor] = {}
    for key, v in sd.items():
        if key in ("text_projection", "logit_scale"):
            continue
        if key == "token_embedding.weight":
            out["embeddings.token_embedding.weight"] = v
        elif key == "positional_embedding":
            out["embeddings.position_embedding.weight"] = v
        elif key.startswith("ln_final."):
            out["final_layer_norm." + key[len("ln_final."):]] = v
        elif key.startswith("transformer.resblocks."):
            (_, _, i), rest = _split(key, 3)
            if int(i) >= num_layers:
                continue
            prefix = f"encoder.layers.{i}."
            if rest.startswith("attn.in_proj_"):
                kind = rest[len("attn.in_proj_"):]  # "weight" or "bias"
                for name, part in zip(("q_proj", "k_proj", "v_proj"), v.chunk(3, dim=0)):  # 3D(xD) -> 3 x D(xD)
                    out[f"{prefix}self_attn.{name}.{kind}"] = part.clone()  # own storage, as safetensors wants
            else:
                out[prefix + _rename_head(rest, _TEXT_BLOCK, "open_clip residual block")] = v
        else:
            raise KeyMapError(f"open_clip text key '{key}' has no CLIPTextModel counterpart")
    return out
