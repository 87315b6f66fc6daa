"""The VAE posterior: a diagonal Gaussian over latents, parameterised by a (mean, log-variance) tensor.

``DiagonalGaussianDistribution`` is what :meth:`ldm.models.autoencoder.AutoencoderKL.encode` returns. It keeps
ldm's name, constructor and methods (``sample``, ``mode``, ``kl``, ``nll``) because LatentDiffusion and third-party
code call them. Left out: ldm's unused ``AbstractDistribution`` / ``DiracDistribution`` classes and the free
``normal_kl`` helper (nothing in the SD2 stack calls them).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

# COMPAT: ldm clamps the encoder's log-variance to this range before exponentiating, so a badly trained (or
# random) encoder cannot produce inf/0 standard deviations. The bounds are part of the released model's behaviour.
LOGVAR_MIN = -30.0
LOGVAR_MAX = 20.0


class DiagonalGaussianDistribution:
    """N(mean, diag(var)) per latent element, built from the encoder's stacked output.

    Args:
        parameters: ``B x 2C x H x W`` tensor; channels ``[:C]`` are the mean, ``[C:]`` the log-variance.
        deterministic: if True the distribution collapses to its mean (``std = var = 0``), so ``sample()``
            returns the mean and ``kl()`` is zero.
    """

    def __init__(self, parameters: torch.Tensor, deterministic: bool = False) -> None:
        if parameters.ndim < 2 or parameters.shape[1] % 2 != 0:
            raise ValueError(
                f"parameters must have an even channel count on dim 1 (mean and logvar stacked), "
                f"got shape {tuple(parameters.shape)}"
            )
        self.parameters = parameters
        self.deterministic = deterministic
        self.mean, logvar = torch.chunk(parameters, 2, dim=1)  # each B x C x H x W
        self.logvar = torch.clamp(logvar, LOGVAR_MIN, LOGVAR_MAX)
        if deterministic:
            self.std = torch.zeros_like(self.mean)
            self.var = torch.zeros_like(self.mean)
        else:
            self.std = torch.exp(0.5 * self.logvar)
            self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Reparameterised draw ``mean + std * eps``, eps ~ N(0, I); pass ``generator`` for reproducibility."""
        noise = torch.randn(
            self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype
        )
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        """The most likely latent, i.e. the mean."""
        return self.mean

    def kl(self, other: DiagonalGaussianDistribution | None = None) -> torch.Tensor:
        """KL(self || other) per sample, summed over C, H, W; ``other=None`` means the standard normal.

        Closed form for diagonal Gaussians:
        ``0.5 * sum((mu1 - mu2)^2 / var2 + var1 / var2 - 1 - log var1 + log var2)``.
        Returns a ``B`` tensor (zeros when ``deterministic``).
        """
        if self.deterministic:
            return torch.zeros(self.mean.shape[0], device=self.mean.device, dtype=self.mean.dtype)
        dims = [1, 2, 3]
        if other is None:
            return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=dims)
        return 0.5 * torch.sum(
            (self.mean - other.mean).pow(2) / other.var + self.var / other.var - 1.0 - self.logvar + other.logvar,
            dim=dims,
        )

    def nll(self, sample: torch.Tensor, dims: Sequence[int] = (1, 2, 3)) -> torch.Tensor:
        """Negative log-likelihood of ``sample``, summed over ``dims``:
        ``0.5 * sum(log(2 pi) + logvar + (x - mean)^2 / var)``. Zero when ``deterministic``."""
        if self.deterministic:
            return torch.zeros(self.mean.shape[0], device=self.mean.device, dtype=self.mean.dtype)
        return 0.5 * torch.sum(
            math.log(2.0 * math.pi) + self.logvar + (sample - self.mean).pow(2) / self.var, dim=list(dims)
        )
