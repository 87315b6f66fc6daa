"""AutoencoderKL: the SD2 first stage (image <-> 4-channel latent), as an ldm-compatible LightningModule.

In the SD2 stack this model is frozen: LatentDiffusion only calls :meth:`AutoencoderKL.encode` and
:meth:`AutoencoderKL.decode`. Constructor parameters, submodule names (``encoder``, ``decoder``, ``quant_conv``,
``post_quant_conv``) and therefore state-dict keys follow ldm, so ``first_stage_model.*`` of released checkpoints
loads unchanged. Training is supported for small demo autoencoders only, with
:class:`ldm.modules.losses.ReconstructionKLLoss` (no discriminator, no LPIPS: their weights are not available
offline). Left out of ldm's class: the discriminator optimizer, EMA of the autoencoder (``ema_decay`` raises) and
segmentation colourisation (``colorize_nlabels`` raises).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn

from ldm import compat
from ldm.checkpoint import drop_prefixes, load_into, load_state_dict_file
from ldm.config_schema import PositiveInt, Probability
from ldm.modules.diffusionmodules.model import Decoder, Encoder
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.modules.random_weights import mark_loaded, note_random, reports_random_weights
from ldm.util import instantiate_from_config

log = logging.getLogger(__name__)

# ldm's kl-f8 autoencoder configs use this base LR; main.py overrides it through ``learning_rate``.
DEFAULT_BASE_LEARNING_RATE = 4.5e-6
FIRST_STAGE_PREFIX = "first_stage_model."


class AutoencoderKL(pl.LightningModule):
    """KL-regularised autoencoder with a diagonal-Gaussian posterior over ``embed_dim`` latent channels.

    Args:
        ddconfig: Encoder/Decoder settings (``ch``, ``out_ch``, ``ch_mult``, ``num_res_blocks``,
            ``attn_resolutions``, ``dropout``, ``in_channels``, ``resolution``, ``z_channels``, ``double_z``, ...;
            see :class:`ldm.modules.diffusionmodules.model.Encoder`). ``double_z`` must be true.
        lossconfig: ``target``/``params`` of the training loss. ``torch.nn.Identity`` is ldm's inference
            placeholder (builds, cannot train); use ``ldm.modules.losses.ReconstructionKLLoss`` to train.
        embed_dim: latent channels after ``quant_conv`` (4 for SD2).
        ckpt_path: optional ``.ckpt``/``.safetensors`` to load strictly; a full LDM checkpoint works too (only its
            ``first_stage_model.*`` tensors are used).
        ignore_keys: key prefixes dropped from ``ckpt_path`` before loading.
        allow_missing_prefixes: model key prefixes that ``ckpt_path`` may lack (a deliberate partial load; those
            tensors keep their initial values, logged with a count).
        image_key: batch key holding ``B x H x W x C`` images in [-1, 1].
        colorize_nlabels: segmentation-only ldm option; must be None.
        monitor: accepted for compatibility and ignored (see :data:`ldm.compat.IGNORED_PARAMS`).
        ema_decay: EMA of the autoencoder is not implemented; must be None.
        learn_logvar: also optimise the loss's scalar ``logvar`` (requires a loss with a ``logvar`` parameter).

    The learning rate is an attribute, as in ldm: main.py sets ``learning_rate``; without it,
    ``base_learning_rate`` (default 4.5e-6) is used.
    """

    @reports_random_weights
    def __init__(
        self,
        ddconfig: Mapping[str, Any],
        lossconfig: Mapping[str, Any],
        embed_dim: PositiveInt,
        ckpt_path: str | None = None,
        ignore_keys: Sequence[str] = (),
        allow_missing_prefixes: Sequence[str] = (),
        image_key: str = "image",
        colorize_nlabels: int | None = None,
        monitor: str | None = None,
        ema_decay: Probability | None = None,
        learn_logvar: bool = False,
    ) -> None:
        super().__init__()
        if colorize_nlabels is not None:
            raise ValueError("colorize_nlabels is a segmentation-only option and is not supported; remove it.")
        if ema_decay is not None:
            raise ValueError("ema_decay: EMA of the autoencoder is not implemented; remove the key.")
        if not ddconfig.get("double_z", True):
            raise ValueError("ddconfig.double_z must be true: AutoencoderKL needs mean and log-variance.")
        self.image_key = image_key
        self.embed_dim = embed_dim
        self.learn_logvar = learn_logvar
        compat.note_ignored("AutoencoderKL", {"monitor": monitor})
        self.base_learning_rate = DEFAULT_BASE_LEARNING_RATE
        self.learning_rate: float | None = None

        try:
            self.encoder = Encoder(**ddconfig)
            self.decoder = Decoder(**ddconfig)
        except TypeError as e:  # a missing required key; name the config section
            raise ValueError(f"ddconfig: {e}") from e
        self.loss = instantiate_from_config(lossconfig)
        z_channels = ddconfig["z_channels"]
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * embed_dim, kernel_size=1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, kernel_size=1)
        if learn_logvar and not isinstance(getattr(self.loss, "logvar", None), nn.Parameter):
            raise ValueError("learn_logvar=True needs a loss with a `logvar` parameter (ReconstructionKLLoss).")
        note_random(self, "no ckpt_path")
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys=ignore_keys, allow_missing_prefixes=allow_missing_prefixes)

    # ---------------------------------------------------------------- checkpoint

    def init_from_ckpt(self, path: str | Path, ignore_keys: Sequence[str] = (),
                       allow_missing_prefixes: Sequence[str] = ()) -> None:
        """Load weights from ``path`` strictly (a missing or unexpected tensor is a CheckpointError naming the
        first keys). A training loss's own tensors (``loss.*``) that this model's loss does not have are dropped:
        they are not part of the autoencoder."""
        sd = load_state_dict_file(path)
        if any(k.startswith(FIRST_STAGE_PREFIX) for k in sd):  # a full LDM checkpoint: keep the VAE part
            sd = {k[len(FIRST_STAGE_PREFIX):]: v for k, v in sd.items() if k.startswith(FIRST_STAGE_PREFIX)}
        own = self.state_dict()
        extra_loss = [k for k in sd if k.startswith("loss.") and k not in own]
        if extra_loss:
            log.info("AutoencoderKL: %d loss.* tensors of %s are not used by this model's loss", len(extra_loss), path)
        sd = {k: v for k, v in drop_prefixes(sd, ignore_keys).items() if k not in extra_loss}
        load_into(self, sd, source=f"AutoencoderKL ckpt_path={path}", allow_missing=allow_missing_prefixes,
                  hint="Allow missing model keys with allow_missing_prefixes, drop extra ones with ignore_keys.")
        mark_loaded(self, sd)

    # ---------------------------------------------------------------- model

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        """``B x 3 x H x W`` image in [-1, 1] -> posterior over ``B x embed_dim x H/f x W/f`` latents."""
        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """``B x embed_dim x h x w`` latent -> ``B x out_ch x h*f x w*f`` image."""
        return self.decoder(self.post_quant_conv(z))

    def forward(
        self, input: torch.Tensor, sample_posterior: bool = True
    ) -> tuple[torch.Tensor, DiagonalGaussianDistribution]:
        """Reconstruct ``input`` through a posterior sample (or its mode); returns ``(reconstruction, posterior)``."""
        posterior = self.encode(input)
        z = posterior.sample() if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    def get_input(self, batch: Mapping[str, Any], k: str) -> torch.Tensor:
        """``batch[k]`` as ``B x C x H x W`` float (datasets yield channels-last ``B x H x W x C``)."""
        x = batch[k]
        if x.ndim == 3:  # B x H x W grayscale
            x = x[..., None]
        return x.permute(0, 3, 1, 2).contiguous().float()  # B x H x W x C -> B x C x H x W

    # ---------------------------------------------------------------- training

    def _training_loss(self) -> nn.Module:
        if isinstance(self.loss, nn.Identity):
            raise ValueError(
                "AutoencoderKL cannot train with lossconfig.target=torch.nn.Identity (the inference placeholder). "
                "Set lossconfig.target to ldm.modules.losses.ReconstructionKLLoss."
            )
        return self.loss

    def _step(self, batch: Mapping[str, Any], split: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss_fn = self._training_loss()
        inputs = self.get_input(batch, self.image_key)
        reconstructions, posterior = self(inputs)
        return loss_fn(inputs, reconstructions, posterior, split=split)

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:  # noqa: ARG002
        loss, logs = self._step(batch, "train")
        self.log("aeloss", loss, prog_bar=True, on_step=True, on_epoch=True)
        self.log_dict(logs, on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:  # noqa: ARG002
        _, logs = self._step(batch, "val")
        self.log_dict(logs)
        return logs

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """Adam (betas 0.5/0.9, ldm's autoencoder setting) over encoder, decoder and both 1x1 convs (+ the
        loss's ``logvar`` when ``learn_logvar``)."""
        self._training_loss()
        lr = self.learning_rate if self.learning_rate is not None else self.base_learning_rate
        params = [
            *self.encoder.parameters(),
            *self.decoder.parameters(),
            *self.quant_conv.parameters(),
            *self.post_quant_conv.parameters(),
        ]
        if self.learn_logvar:
            params.append(self.loss.logvar)
        log.info("AutoencoderKL: Adam with lr %.3e", lr)
        return torch.optim.Adam(params, lr=lr, betas=(0.5, 0.9))

    @torch.no_grad()
    def log_images(
        self, batch: Mapping[str, Any], N: int = 8, only_inputs: bool = False, **ignored: Any
    ) -> dict[str, torch.Tensor]:
        """Images for ImageLogger: ``inputs``, ``reconstructions`` and ``samples`` (decoded N(0, I) latents).

        COMPAT: ImageLogger passes ``split=`` and its ``log_images_kwargs`` (meant for LatentDiffusion); they are
        accepted in ``ignored`` and have no effect here.
        """
        del ignored
        x = self.get_input(batch, self.image_key)[:N].to(self.device)
        images = {"inputs": x}
        if not only_inputs:
            reconstructions, posterior = self(x)
            images["reconstructions"] = reconstructions
            images["samples"] = self.decode(torch.randn_like(posterior.sample()))
        return images
