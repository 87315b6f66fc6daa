"""Image grids from ``pl_module.log_images`` written to ``<logdir>/images/<split>`` and to the loggers."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torchvision
from PIL import Image
from pytorch_lightning.utilities import rank_zero_only

from ldm import compat
from ldm.config_schema import ConfigError, PositiveInt

log = logging.getLogger(__name__)


class ImageLogger(pl.Callback):
    """Log ``pl_module.log_images(batch, **log_images_kwargs)`` as PNG grids (ldm-compatible parameters): one
    grid per key, and an ``overview`` grid with a labelled column per key (input, mask, samples with seed and scale).

    Args:
        batch_frequency: log every this many steps (global step, or batch index with ``log_on_batch_idx``).
        max_images: at most this many images per key.
        clamp: clamp images to [-1, 1] before saving.
        increase_log_steps: also log at powers of two below ``batch_frequency`` (early feedback).
        rescale: map [-1, 1] to [0, 1] before saving.
        disabled: turn the callback off.
        log_on_batch_idx: count ``batch_idx`` instead of ``global_step``.
        log_first_step: also log at step 0.
        log_images_kwargs: passed to ``log_images`` (sampler steps, guidance scale, ...).
        enable_autocast: accepted and ignored (see :data:`ldm.compat.IGNORED_PARAMS`).
        nrow: images per grid row.
        logdir: run directory; grids go to ``<logdir>/images/<split>`` (main.py passes it; default: the trainer's
            ``default_root_dir``).
    """

    #: where main.py's configs put this callback's params (for messages)
    CONFIG_PATH = "lightning.callbacks.image_logger.params"

    def __init__(self, batch_frequency: PositiveInt, max_images: PositiveInt, clamp: bool = True,
                 increase_log_steps: bool = True, rescale: bool = True, disabled: bool = False,
                 log_on_batch_idx: bool = False, log_first_step: bool = False,
                 log_images_kwargs: dict[str, Any] | None = None, enable_autocast: bool | None = None,
                 nrow: PositiveInt = 4, logdir: str | None = None) -> None:
        super().__init__()
        if batch_frequency <= 0:
            raise ValueError(f"ImageLogger: batch_frequency must be > 0, got {batch_frequency}")
        compat.note_ignored("ImageLogger", {"enable_autocast": enable_autocast})
        self.batch_freq, self.max_images, self.clamp, self.rescale = batch_frequency, max_images, clamp, rescale
        self.disabled, self.log_on_batch_idx, self.log_first_step = disabled, log_on_batch_idx, log_first_step
        self.log_steps = [2**n for n in range(int(np.log2(batch_frequency)) + 1)] if increase_log_steps else []
        self.log_images_kwargs = dict(log_images_kwargs or {})
        self.nrow = nrow
        self.logdir = logdir
        self.last_logged = -1

    def check_model(self, pl_module: pl.LightningModule) -> None:
        """Check ``log_images_kwargs`` against what ``pl_module.log_images`` accepts (its
        ``check_log_images_kwargs``), so a typo stops the run at start-up rather than at the first image log.

        main.py calls it once the model is built, before training; :meth:`setup` calls it for other callers.
        """
        check = getattr(pl_module, "check_log_images_kwargs", None)
        if self.disabled or check is None:
            return
        try:
            check(self.log_images_kwargs)
        except ConfigError as e:
            raise ConfigError(f"{self.CONFIG_PATH}.{e}") from None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.check_model(pl_module)

    def should_log(self, step: int) -> bool:
        if step == self.last_logged:  # gradient accumulation repeats a global step
            return False
        if step == 0:
            return self.log_first_step
        return step % self.batch_freq == 0 or step in self.log_steps

    #: colour of pixels with a NaN or inf in any channel: a cast to uint8 would draw them black, which reads as
    #: a plausible dark image; magenta cannot be mistaken for one (``save`` also logs their count as an error)
    NON_FINITE_RGB = (255, 0, 255)

    def to_grid(self, images: torch.Tensor) -> np.ndarray:
        images = images[: self.max_images].detach().float().cpu()
        bad = (~torch.isfinite(images)).any(dim=1, keepdim=True).float()  # B x 1 x H x W
        images = images.nan_to_num(0.0, 0.0, 0.0)
        if self.clamp:
            images = images.clamp(-1.0, 1.0)
        if self.rescale:
            images = (images + 1.0) / 2.0
        grid = torchvision.utils.make_grid(images, nrow=self.nrow)  # 3 x H' x W'
        out = (grid.permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8)
        if bad.any():
            out[torchvision.utils.make_grid(bad, nrow=self.nrow)[0].numpy() > 0] = self.NON_FINITE_RGB
        return out

    @staticmethod
    def non_finite(images: dict[str, torch.Tensor]) -> dict[str, int]:
        """Per key, how many values are NaN or inf (keys without any are left out)."""
        counts = {k: int((~torch.isfinite(v)).sum()) for k, v in images.items() if v.is_floating_point()}
        return {k: n for k, n in counts.items() if n}

    def overview(self, images: dict[str, torch.Tensor]) -> np.ndarray:
        """All keys side by side with column headers (sampled columns name their seed and guidance scale)."""
        from ldm.grids import labelled_grid

        seed = self.log_images_kwargs.get("seed", 0)
        names = {"inputs": "input", "masked_image": "masked input", "samples": f"s=1 seed {seed}"}
        headers = [names.get(k, f"s={float(k.rsplit('_', 1)[1]):g} seed {seed}"
                             if k.startswith("samples_cfg_scale_") else k) for k in images]
        n = min(self.max_images, *(len(b) for b in images.values()))
        return labelled_grid([[self.to_grid(b[i : i + 1]) for b in images.values()] for i in range(n)], headers)

    @rank_zero_only
    def save(self, trainer: pl.Trainer, images: dict[str, torch.Tensor], split: str, batch_idx: int) -> None:
        folder = Path(self.logdir or trainer.default_root_dir) / "images" / split
        folder.mkdir(parents=True, exist_ok=True)
        gs, ep = trainer.global_step, trainer.current_epoch
        bad = self.non_finite({k: v[: self.max_images] for k, v in images.items()})
        if bad:  # the run goes on (its loss checks judge the weights); the grid shows the pixels in magenta
            log.error("image log (%s, step %d): NaN/inf values in %s; drawn magenta in the grids", split, gs,
                      ", ".join(f"{k} ({n} values)" for k, n in bad.items()))
        grids = {key: self.to_grid(batch) for key, batch in images.items()}
        grids["overview"] = self.overview(images)
        for key, grid in grids.items():
            Image.fromarray(grid).save(folder / f"{key}_gs-{gs:06}_e-{ep:06}_b-{batch_idx:06}.png")
            for logger in trainer.loggers:
                name = type(logger).__name__
                if name == "TensorBoardLogger":
                    logger.experiment.add_image(f"{split}/{key}", grid, gs, dataformats="HWC")
                elif name == "WandbLogger":
                    logger.log_image(key=f"{split}/{key}", images=[grid], step=gs)

    def log_img(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int,
                split: str) -> None:
        step = batch_idx if self.log_on_batch_idx else trainer.global_step
        if self.disabled or not self.should_log(step) or not hasattr(pl_module, "log_images"):
            return
        self.last_logged = step
        if trainer.global_rank != 0:  # only rank 0 samples and writes; no collectives happen inside log_images
            return
        was_training = pl_module.training
        pl_module.eval()
        with torch.no_grad():
            images = pl_module.log_images(batch, **self.log_images_kwargs)
        if was_training:
            pl_module.train()
        self.save(trainer, images, split, batch_idx)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.log_img(trainer, pl_module, batch, batch_idx, split="train")

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                                batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if batch_idx == 0 and not trainer.sanity_checking:
            saved, self.last_logged = self.last_logged, -1
            self.log_img(trainer, pl_module, batch, trainer.global_step, split="val")
            self.last_logged = saved
