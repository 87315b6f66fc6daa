"""COMPAT: the module path that ldm configs and third-party code name (``ldm.models.diffusion.ddpm.*``).

The classes live in files named for what they hold: :class:`LatentDiffusion` in
:mod:`ldm.models.diffusion.latent_diffusion`, :class:`LatentInpaintDiffusion` in
:mod:`ldm.models.diffusion.inpainting` and :class:`DiffusionWrapper` in :mod:`ldm.models.diffusion.wrapper`.
This file only re-exports them, so official yamls (``target: ldm.models.diffusion.ddpm.LatentInpaintDiffusion``)
load unchanged.
"""

from ldm.models.diffusion.inpainting import LatentInpaintDiffusion
from ldm.models.diffusion.latent_diffusion import LatentDiffusion, disabled_train
from ldm.models.diffusion.wrapper import DiffusionWrapper

__all__ = ["DiffusionWrapper", "LatentDiffusion", "LatentInpaintDiffusion", "disabled_train"]
