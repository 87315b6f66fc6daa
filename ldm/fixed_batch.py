"""A learning curve without sampling noise: the training loss on fixed batches, every N optimizer steps.

The logged training loss of a diffusion model jumps from batch to batch because every step draws new timesteps,
noise and masks; on a small run that noise hides the trend. :class:`FixedBatchLoss` evaluates the model's own
loss on batches whose images, masks, captions, timesteps, noise and VAE posterior samples never change, so the
curve moves only when the weights do. The first evaluation is made during the first training step, after its
forward pass and before any weight changes (step 0 of a fresh run): it is the level the rest of the curve is read
against.

Each batch is a folder in the layout ``scripts/inpaint.py --input-dir`` reads: ``NAME.png`` with ``NAME_mask.png``
(white = hole) and, optionally, ``NAME.txt`` (caption; empty when missing). Images must be the training size.
Logged as ``fixed_batch/<name>`` (and ``fixed_batch/<name>_ema`` with ``ema: true``) through the trainer's loggers,
at the optimizer step they were measured on.

Supported models: diffusion models with ``p_losses`` (the loss at given timesteps and noise; text dropout is not
applied) and autoencoders with ``image_key`` (mean absolute reconstruction error of the posterior mode, i.e. the
"l1" reconstruction term without the KL).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch

from ldm.config_schema import NonNegativeInt, PositiveInt
from ldm.data.masks import binarize_mask, masked_image
from ldm.image_io import find_pairs, load_mask, load_rgb

__all__ = ["FixedBatchLoss", "folder_batch"]

log = logging.getLogger(__name__)


def folder_batch(folder: str | Path, repeats: int = 1) -> dict[str, Any]:
    """A batch in the training layout from a folder of ``NAME.png``/``NAME_mask.png``/``NAME.txt``.

    ``jpg`` and ``masked_image`` are ``B x H x W x 3`` float in [-1, 1] (hole pixels 0), ``mask`` ``B x H x W x 1``
    in {0, 1}, ``txt`` a list of captions; every image appears ``repeats`` times in a row.
    """
    images, masks, captions = [], [], []
    for image_path, mask_path in find_pairs(folder):
        caption_path = image_path.with_suffix(".txt")
        image, mask = load_rgb(image_path), load_mask(mask_path)
        if image.shape[:2] != mask.shape[:2]:
            raise ValueError(f"{mask_path}: mask size {mask.shape[:2]} differs from its image's {image.shape[:2]}")
        images += [image] * repeats
        masks += [mask] * repeats
        captions += [caption_path.read_text(encoding="utf-8").strip() if caption_path.is_file() else ""] * repeats
    if len({im.shape for im in images}) != 1:
        raise ValueError(f"{folder}: images of different sizes {sorted({im.shape[:2] for im in images})}")
    jpg = torch.from_numpy(np.stack(images)).float() / 127.5 - 1.0
    mask = torch.from_numpy(binarize_mask(np.stack(masks)))[..., None]
    return {"jpg": jpg, "mask": mask, "masked_image": masked_image(jpg, mask), "txt": captions}


def _stratified_timesteps(n: int, num_timesteps: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` timesteps, one from each of ``n`` equal slices of [0, T), in a seeded random order."""
    edges = torch.arange(n, dtype=torch.float64) * num_timesteps / n
    t = (edges + torch.rand(n, generator=generator, dtype=torch.float64) * num_timesteps / n).long()
    return t.clamp(max=num_timesteps - 1)[torch.randperm(n, generator=generator)]


class FixedBatchLoss(pl.Callback):
    """Log the loss on fixed batches at the start of training and every ``every_n_train_steps`` optimizer steps.

    Args:
        folders: ``{name: folder}``; one fixed batch per folder (layout in the module docstring).
        every_n_train_steps: evaluation period in optimizer steps (the last step is always evaluated too).
        repeats: copies of each image in the batch, each with its own timestep and noise (diffusion only).
        seed: seed of the timesteps, the noise and the VAE posterior samples.
        ema: also evaluate the EMA weights (models with ``use_ema``), logged as ``<name>_ema``.
    """

    def __init__(self, folders: Mapping[str, str], every_n_train_steps: PositiveInt = 10, repeats: PositiveInt = 4,
                 seed: NonNegativeInt = 0, ema: bool = False) -> None:
        super().__init__()
        if not folders:
            raise ValueError("FixedBatchLoss: 'folders' must name at least one folder")
        if every_n_train_steps < 1 or repeats < 1:
            raise ValueError("FixedBatchLoss: 'every_n_train_steps' and 'repeats' must be >= 1")
        self.folders = {str(k): str(v) for k, v in folders.items()}
        self.every, self.repeats, self.seed, self.ema = every_n_train_steps, repeats, seed, ema
        self._batches: dict[str, dict[str, Any]] = {}
        self._last_step: int | None = None
        self.history: list[tuple[int, str, float]] = []

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:  # noqa: ARG002
        if not (hasattr(pl_module, "p_losses") or hasattr(pl_module, "image_key")):
            raise TypeError(f"FixedBatchLoss: {type(pl_module).__name__} has neither p_losses (diffusion) nor "
                            "image_key (autoencoder)")
        self._batches = {name: folder_batch(folder, self.repeats if hasattr(pl_module, "p_losses") else 1)
                         for name, folder in self.folders.items()}

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *_: Any) -> None:
        # The first evaluation waits for the first forward pass (weights still untouched): what the model sets
        # up there, such as scale_by_std's latent scale, is part of the step-0 model.
        if self._last_step is None:
            self._evaluate(trainer, pl_module)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *_: Any) -> None:
        if trainer.global_step % self.every == 0:
            self._evaluate(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._evaluate(trainer, pl_module)

    def _evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = trainer.global_step
        if step == self._last_step:  # several micro-batches per optimizer step, or the end on a period boundary
            return
        self._last_step = step
        weights = [("", False)] + ([("_ema", True)] if self.ema and getattr(pl_module, "use_ema", False) else [])
        metrics = {}
        for name, batch in self._batches.items():
            for suffix, use_ema in weights:
                metrics[f"fixed_batch/{name}{suffix}"] = self.loss(pl_module, batch, use_ema)
        self.history += [(step, key, value) for key, value in metrics.items()]
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    @torch.no_grad()
    def loss(self, model: pl.LightningModule, batch: Mapping[str, Any], use_ema: bool = False) -> float:
        """The model's loss on ``batch`` with this callback's fixed randomness (the global RNG is untouched)."""
        was_training = model.training
        device = model.device
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        devices = [device] if device.type == "cuda" else []
        model.eval()
        try:
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(self.seed)  # get_input draws VAE posterior samples from the global RNG
                if hasattr(model, "p_losses"):
                    with model.ema_scope() if use_ema else nullcontext():
                        return self._diffusion_loss(model, batch)
                x = model.get_input(batch, model.image_key)
                reconstruction, _ = model(x, sample_posterior=False)
                return float((x - reconstruction).abs().mean())
        finally:
            model.train(was_training)

    def _diffusion_loss(self, model: Any, batch: Mapping[str, Any]) -> float:
        z, cond = model.get_input(batch, model.first_stage_key)
        gen = torch.Generator().manual_seed(self.seed)
        t = _stratified_timesteps(z.shape[0], model.num_timesteps, gen).to(z.device)
        noise = torch.randn(z.shape, generator=gen).to(z.device)
        loss, _ = model.p_losses(z, cond, t, noise=noise)
        return float(loss)
