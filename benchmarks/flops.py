"""Model FLOPs of the SD2 networks, counted with ``torch.utils.flop_counter.FlopCounterMode``.

What is counted: what ``FlopCounterMode`` counts, i.e. 2 x the multiply-accumulates of matmuls, convolutions,
batched matmuls and attention (SDPA; this module adds the formula torch lacks for the CPU flash kernel);
norms, softmax and element-wise ops are left out (memory bound; published MFU figures leave them out too).
Counting runs on whatever device the modules live on; on the ``meta`` device it costs no memory and no
arithmetic, so the full-size model is counted in seconds on any machine (docs/DECISIONS.md R10 gives the
reference numbers; tests/test_flops.py checks them).

Per training sample of the inpainting model (MFU convention: model FLOPs, not hardware FLOPs):

    3 x UNet forward            (forward + backward ~= 3 x forward)
  + 2 x VAE encoder             (image and masked image; 1 x when the image latent is precomputed)
  + 1 x text encoder            (penultimate layer, 77 tokens)

Activation checkpointing recomputes most of the UNet forward in the backward pass (counted: 3.7 x forward
instead of 3.0 x); those are hardware FLOPs, not model FLOPs, and MFU leaves them out.

The VAE decoder is counted for sampling only (the training step never decodes, DECISIONS D8). Left out:
optimizer and EMA arithmetic (memory bound, a few FLOPs per parameter).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from ldm.util import instantiate_from_config

__all__ = [
    "ModelFlops",
    "unet_context_dim",
    "count_flops",
    "flops_from_config",
    "model_flops",
    "text_encoder_flops",
    "unet_forward_flops",
    "vae_decoder_flops",
    "vae_encoder_flops",
]


def _cpu_sdpa(query_shape, key_shape, value_shape, *_args: Any, **_kwargs: Any) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward(grad_out_shape, query_shape, key_shape, value_shape, *_args: Any,
                       **_kwargs: Any) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


#: torch's counter has formulas for the CUDA SDPA kernels and counts the math path on meta, but none for the
#: CPU flash kernel: without these, attention on CPU tensors would count as zero FLOPs.
_EXTRA_FORMULAS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward,
}


def count_flops(fn: Callable[[], Any]) -> tuple[int, dict[str, int]]:
    """Run ``fn()`` under ``FlopCounterMode``; return (total FLOPs, FLOPs per aten op name)."""
    with FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS) as counter:
        fn()
    counts = counter.get_flop_counts().get("Global", {})
    return int(counter.get_total_flops()), {str(op).removeprefix("aten."): int(n) for op, n in counts.items()}


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def unet_context_dim(unet: nn.Module) -> int:
    """Width of the cross-attention context: the input width of the first ``attn2.to_k``."""
    for name, module in unet.named_modules():
        if name.endswith("attn2.to_k") and isinstance(module, nn.Linear):
            return module.in_features
    raise ValueError("unet has no cross-attention (no '*.attn2.to_k' Linear); pass context_dim explicitly")


def unet_forward_flops(
    unet: nn.Module,
    latent_hw: tuple[int, int],
    context_tokens: int = 77,
    context_dim: int | None = None,
    batch: int = 1,
) -> int:
    """FLOPs of one UNet forward on ``batch`` latents of ``latent_hw`` (SD2 at 512 px: 64 x 64).

    Args:
        unet: an ``openaimodel.UNetModel`` (any device; ``meta`` is free).
        latent_hw: latent height and width.
        context_tokens: text tokens in the cross-attention context (77).
        context_dim: context width; None reads it from the first cross-attention layer.
        batch: batch size of the counted forward.
    """
    device = _device(unet)
    context_dim = unet_context_dim(unet) if context_dim is None else context_dim
    x = torch.zeros(batch, unet.in_channels, *latent_hw, device=device)  # B x C_in x h x w
    t = torch.zeros(batch, dtype=torch.long, device=device)
    context = torch.zeros(batch, context_tokens, context_dim, device=device)  # B x 77 x D
    with torch.no_grad():
        return count_flops(lambda: unet(x, t, context=context))[0]


def vae_encoder_flops(vae: nn.Module, image_size: int, batch: int = 1) -> tuple[int, tuple[int, int]]:
    """(FLOPs of ``vae.encode`` incl. ``quant_conv`` on ``batch`` RGB images, latent (h, w))."""
    x = torch.zeros(batch, 3, image_size, image_size, device=_device(vae))  # B x 3 x H x W
    out: list[torch.Tensor] = []
    with torch.no_grad():
        flops = count_flops(lambda: out.append(vae.encode(x).parameters))[0]
    return flops, tuple(out[0].shape[-2:])


def vae_decoder_flops(vae: nn.Module, latent_hw: tuple[int, int], batch: int = 1) -> int:
    """FLOPs of ``vae.decode`` incl. ``post_quant_conv`` on ``batch`` latents (sampling only)."""
    z = torch.zeros(batch, vae.post_quant_conv.in_channels, *latent_hw, device=_device(vae))  # B x 4 x h x w
    with torch.no_grad():
        return count_flops(lambda: vae.decode(z))[0]


def text_encoder_flops(text_encoder: nn.Module, batch: int = 1) -> tuple[int, tuple[int, int]]:
    """(FLOPs of ``text_encoder.encode`` on ``batch`` captions, context (tokens, width))."""
    out: list[torch.Tensor] = []
    with torch.no_grad():
        flops = count_flops(lambda: out.append(text_encoder.encode([""] * batch)))[0]
    return flops, tuple(out[0].shape[-2:])


@dataclass(frozen=True)
class ModelFlops:
    """Forward FLOPs per sample of the three networks of a latent diffusion model at one image size.

    Args:
        image_size: pixel side of the (square) training image.
        latent_hw: latent (height, width) the VAE produces at that size.
        unet_forward: one UNet forward, one sample.
        vae_encoder: one VAE encode (incl. ``quant_conv``), one image.
        text_encoder: one caption through the text encoder as the model uses it.
        vae_decoder: one VAE decode (incl. ``post_quant_conv``); sampling only.
    """

    image_size: int
    latent_hw: tuple[int, int]
    unet_forward: int
    vae_encoder: int
    text_encoder: int
    vae_decoder: int = 0

    def training_per_sample(self, precomputed_image_latent: bool = False) -> int:
        """Model FLOPs of one inpainting training sample (see the module docstring).

        Args:
            precomputed_image_latent: the image latent comes from disk; only the masked image is encoded.
        """
        encodes = 1 if precomputed_image_latent else 2
        return 3 * self.unet_forward + encodes * self.vae_encoder + self.text_encoder

    def sampling_per_image(self, steps: int, guidance: bool = True) -> int:
        """FLOPs of one inpainted image: ``steps`` UNet forwards (x2 with CFG), the masked-image encode, the
        decode, and one caption (two with CFG: the prompt and "")."""
        branches = 2 if guidance else 1
        unet = steps * branches * self.unet_forward
        return unet + self.vae_encoder + self.vae_decoder + branches * self.text_encoder

    def as_dict(self) -> dict[str, float]:
        """GFLOPs per component and per training sample, for reports."""
        g = 1e-9
        return {
            "unet_forward_gflops": self.unet_forward * g,
            "vae_encoder_gflops": self.vae_encoder * g,
            "text_encoder_gflops": self.text_encoder * g,
            "vae_decoder_gflops": self.vae_decoder * g,
            "train_sample_gflops": self.training_per_sample() * g,
            "train_sample_precomputed_gflops": self.training_per_sample(precomputed_image_latent=True) * g,
        }


def model_flops(model: nn.Module, image_size: int) -> ModelFlops:
    """Count the FLOPs of a ``LatentDiffusion`` (``model``, ``first_stage_model``, ``cond_stage_model``).

    The text encoder's output shape gives the UNet's context, the VAE's output shape its latent size, so the
    count follows the model as built. Build the model on the ``meta`` device (:func:`flops_from_config`)
    to count a full-size model without memory or arithmetic.
    """
    vae, latent_hw = vae_encoder_flops(model.first_stage_model, image_size)
    text, (tokens, width) = text_encoder_flops(model.cond_stage_model)
    unet = unet_forward_flops(model.model.diffusion_model, latent_hw, context_tokens=tokens,
                              context_dim=width)
    decoder = vae_decoder_flops(model.first_stage_model, latent_hw)
    return ModelFlops(image_size, latent_hw, unet, vae, text, decoder)


def flops_from_config(model_config: Mapping[str, Any], image_size: int) -> ModelFlops:
    """Build ``model_config`` (a ``target``/``params`` mapping) on the meta device and count its FLOPs.

    ``ckpt_path`` is dropped, the EMA copy is not built and the UNet's ``use_fp16``/``use_bf16`` input casts
    are switched off (they expect autocast, which the meta device has not): none changes the arithmetic.
    """
    params = dict(model_config.get("params", {}))
    unet = dict(params["unet_config"])
    unet["params"] = {**unet.get("params", {}), "use_fp16": False, "use_bf16": False}
    params.update(unet_config=unet, ckpt_path=None, use_ema=False)
    config = {**model_config, "params": params}
    with torch.device("meta"):
        model = instantiate_from_config(config)
    return model_flops(model, image_size)
