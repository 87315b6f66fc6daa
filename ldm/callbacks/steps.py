"""Optimizer-step boundaries, and writing a checkpoint at most once per step.

With gradient accumulation, ``on_train_batch_end`` runs after every micro-batch, but only the last micro-batch of
an optimizer step moves ``global_step``. A checkpoint written anywhere else holds a loop position in the middle of
an accumulation while its weights, optimizer and EMA are those of the last completed step: the resumed run then
replays a shifted sequence of micro-batches. Every save of this project (periodic, weights-only, ``last.ckpt``,
SIGTERM/SIGUSR1, SLURM requeue) therefore happens at a boundary that :class:`StepBoundary` detects.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytorch_lightning as pl


class StepBoundary:
    """Tells, at a training batch end, whether an optimizer step has just completed (``global_step`` moved).

    Every rank sees the same steps, so decisions taken at a boundary (collectives included) line up across ranks.
    Owners call :meth:`start` from ``on_train_start`` (the resumed step is a boundary that was already saved).
    """

    def __init__(self) -> None:
        self.last = 0

    def start(self, trainer: pl.Trainer) -> None:
        self.last = trainer.global_step  # also right after a resume

    def crossed(self, trainer: pl.Trainer) -> bool:
        moved, self.last = trainer.global_step != self.last, trainer.global_step
        return moved


def holds_step(trainer: pl.Trainer, path: str | Path) -> bool:
    """Whether this run already wrote ``path`` at the current global step (every rank gets rank 0's answer).

    The writing rank's ``CheckpointIO`` (``ldm.checkpoint.atomic_checkpoint_io``) records each file's step.
    """
    saved = getattr(trainer.strategy.checkpoint_io, "saved", None)
    held = saved is not None and saved.get(os.path.abspath(path)) == trainer.global_step
    return bool(trainer.strategy.broadcast(held, src=0))


def save_once(trainer: pl.Trainer, path: str | Path) -> bool:
    """Write a full-state checkpoint to ``path`` unless it already holds this step; True if written. Every rank
    calls this together (the save is collective)."""
    if holds_step(trainer, path):
        return False
    trainer.save_checkpoint(str(path), weights_only=False)  # the full state, said (Lightning logs a default)
    return True
