"""Training loss for the KL autoencoder without a discriminator or LPIPS.

``ReconstructionKLLoss`` is the pixel-space part of ldm's ``LPIPSWithDiscriminator`` (reconstruction term under a
learned scalar log-variance, plus a weighted KL to the standard normal). The perceptual (LPIPS) and adversarial
terms are left out on purpose: their pretrained weights are not available offline, and this project only trains tiny
demo autoencoders (the SD2 VAE itself is frozen). Configs select it with
``lossconfig.target: ldm.modules.losses.ReconstructionKLLoss``.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from ldm.config_schema import NonNegativeFloat
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution


class ReconstructionKLLoss(nn.Module):
    """``nll + kl_weight * KL``, with ``nll = sum(rec / exp(logvar) + logvar) / B`` and ``KL = sum(KL_i) / B``.

    ``rec`` is the per-pixel L1 or squared error; both sums run over all pixels/latent elements of a sample and are
    averaged over the batch, as in ldm. ``logvar`` is a learnable scalar; it is trained only when the autoencoder
    is built with ``learn_logvar=True`` (ldm's convention), otherwise it stays at ``logvar_init``.

    Args:
        kl_weight: weight of the KL term (ldm's kl-f8 configs use 1e-6).
        rec_loss: ``"l1"`` (absolute error, ldm's choice) or ``"l2"`` (squared error).
        logvar_init: initial value of the scalar log-variance that scales the reconstruction term.
    """

    def __init__(self, kl_weight: NonNegativeFloat = 1e-6, rec_loss: Literal["l1", "l2"] = "l1",
                 logvar_init: float = 0.0):
        super().__init__()
        if rec_loss not in ("l1", "l2"):
            raise ValueError(f"lossconfig.params.rec_loss must be 'l1' or 'l2', got {rec_loss!r}")
        if kl_weight < 0:
            raise ValueError(f"lossconfig.params.kl_weight must be >= 0, got {kl_weight}")
        self.kl_weight = kl_weight
        self.rec_loss = rec_loss
        self.logvar = nn.Parameter(torch.full((), float(logvar_init)))

    def forward(
        self,
        inputs: torch.Tensor,
        reconstructions: torch.Tensor,
        posterior: DiagonalGaussianDistribution,
        split: str = "train",
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Return the scalar loss and detached logs named ``{split}/total_loss``, ``/nll_loss``, ``/rec_loss``
        (mean per-pixel error), ``/kl_loss`` and ``/logvar``.

        Args:
            inputs: ``B x C x H x W`` target images.
            reconstructions: ``B x C x H x W`` decoder output.
            posterior: the encoder's posterior for ``inputs``.
            split: prefix of the log keys (``"train"`` or ``"val"``).
        """
        diff = inputs.contiguous() - reconstructions.contiguous()
        rec = diff.abs() if self.rec_loss == "l1" else diff.pow(2)  # B x C x H x W
        batch = inputs.shape[0]
        nll = torch.sum(rec / torch.exp(self.logvar) + self.logvar) / batch
        kl = torch.sum(posterior.kl()) / batch
        loss = nll + self.kl_weight * kl
        logs = {
            f"{split}/total_loss": loss,
            f"{split}/nll_loss": nll,
            f"{split}/rec_loss": rec.mean(),
            f"{split}/kl_loss": kl,
            f"{split}/logvar": self.logvar,
        }
        return loss, {k: v.detach().clone() for k, v in logs.items()}
