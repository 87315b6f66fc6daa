"""A synthetic, step-indexed inpainting data module for tests and smoke runs (no files, no network).

Batch ``k`` of rank ``r`` is a pure function of ``(seed, r, k)``: smooth random colour fields with captions
naming their dominant colour, plus masks from :mod:`ldm.data.masks`. Because the stream restarts at the
trainer's resumed ``global_step`` (times the accumulation factor), a resumed run sees exactly the batches an
uninterrupted run sees, which is what the exact-resume test relies on. The batch layout is the LAION
pipeline's (DECISIONS R7).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, IterableDataset

from ldm.config_schema import NonNegativeInt, PositiveInt, Probability
from ldm.data.masks import MaskMode, binarize_mask, full_mask, get_mask_generator, masked_image

COLOURS = {"red": (1.0, -0.6, -0.6), "green": (-0.6, 1.0, -0.6), "blue": (-0.6, -0.6, 1.0),
           "yellow": (1.0, 1.0, -0.6), "white": (1.0, 1.0, 1.0), "black": (-1.0, -1.0, -1.0)}


def synthetic_sample(rng: np.random.Generator, size: int, mask_mode: str, p_drop: float) -> dict[str, Any]:
    name = list(COLOURS)[rng.integers(len(COLOURS))]
    base = np.asarray(COLOURS[name], dtype=np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    freq = rng.uniform(1, 3, size=2)
    wave = 0.25 * np.sin(2 * np.pi * (freq[0] * xx + freq[1] * yy + rng.uniform()))[..., None]  # H x W x 1
    img = np.clip(base[None, None, :] + wave, -1, 1).astype(np.float32)  # H x W x 3 in [-1, 1]
    if rng.random() < p_drop:
        mask = full_mask(size, size)
    else:  # a named mode draws at its native size and is resized (nearest) to this one (DECISIONS D6)
        mask = get_mask_generator(mask_mode)(rng, size, size)
    mask = binarize_mask(mask)[..., None]  # H x W x 1, 1 = hole
    return {"jpg": img, "txt": f"a {name} wavy pattern", "mask": mask, "masked_image": masked_image(img, mask)}


class StepIndexedStream(IterableDataset):
    """Infinite stream of collated batches; batch ``k`` depends only on ``(seed, rank, start + k)``."""

    def __init__(self, seed: int, rank: int, start: int, batch_size: int, size: int, mask_mode: str,
                 p_drop: float) -> None:
        super().__init__()
        self.seed, self.rank, self.start = seed, rank, start
        self.batch_size, self.size, self.mask_mode, self.p_drop = batch_size, size, mask_mode, p_drop

    def __iter__(self) -> Iterator[dict[str, Any]]:
        k = self.start
        while True:
            rng = np.random.default_rng([self.seed, self.rank, k])
            samples = [synthetic_sample(rng, self.size, self.mask_mode, self.p_drop) for _ in range(self.batch_size)]
            batch = {key: torch.from_numpy(np.stack([s[key] for s in samples])) for key in ("jpg", "mask",
                                                                                              "masked_image")}
            batch["txt"] = [s["txt"] for s in samples]
            batch["__key__"] = [f"synthetic-{self.rank}-{k}-{i}" for i in range(self.batch_size)]
            yield batch
            k += 1


class SyntheticInpaintData(pl.LightningDataModule):
    """Step-indexed synthetic inpainting batches (see module docstring).

    Args:
        batch_size: samples per batch and rank.
        size: image side in pixels.
        mask_mode: a mode of :func:`ldm.data.masks.get_mask_generator` (e.g. "512train-large").
        p_drop: probability of a full mask (pure text-to-image sample).
        seed: stream seed.
        val_batches: number of validation batches (a fixed, finite set).
    """

    def __init__(self, batch_size: PositiveInt = 4, size: PositiveInt = 64, mask_mode: MaskMode = "512train-large",
                 p_drop: Probability = 0.25, seed: NonNegativeInt = 0, val_batches: NonNegativeInt = 2) -> None:
        super().__init__()
        get_mask_generator(mask_mode)  # fail at construction on an unknown mode
        self.batch_size, self.size, self.mask_mode, self.p_drop = batch_size, size, mask_mode, p_drop
        self.seed, self.val_batches = seed, val_batches

    def _position(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 0, 0
        # the stream restarts at the resumed step; one batch per micro-batch
        return trainer.global_rank, trainer.global_step * max(1, trainer.accumulate_grad_batches)

    def train_dataloader(self) -> DataLoader:
        rank, start = self._position()
        ds = StepIndexedStream(self.seed, rank, start, self.batch_size, self.size, self.mask_mode, self.p_drop)
        return DataLoader(ds, batch_size=None, num_workers=0)

    def val_dataloader(self) -> DataLoader:
        rank, _ = self._position()
        ds = StepIndexedStream(self.seed + 1, rank, 0, self.batch_size, self.size, self.mask_mode, self.p_drop)
        batches = [b for b, _ in zip(ds, range(self.val_batches))]
        return DataLoader(batches, batch_size=None, num_workers=0)
