"""The two checkpoint streams of a run, saved at optimizer-step boundaries, with a retention the docs can promise.

* :class:`FullStateCheckpoint`: ``checkpoints/step=<n>.ckpt`` every ``every_n_train_steps`` plus ``last.ckpt``,
  with optimizer, LR schedule, EMA and loop state (what ``-r`` resumes from). ``last.ckpt`` also holds the final
  step when training ends (``max_steps`` that is not a multiple of ``every_n_train_steps``, or a stop), and is
  never written twice for one step.
* :class:`WeightSnapshots` (``metrics_over_trainsteps_checkpoint`` in ldm configs): weights-only
  ``trainstep_checkpoints/*.ckpt`` for evaluation and export.

Both are Lightning ``ModelCheckpoint``s (same parameters) that only save at optimizer-step boundaries
(:mod:`ldm.callbacks.steps`). Lightning's own would also save after the first micro-batch of a resumed run (its
"already saved at this step" memory is not part of the checkpoint, and ``global_step % every_n == 0`` still holds),
overwriting the file the run resumed from with a state half-way into an accumulation.

Retention: every file is kept unless ``keep_last_n`` is set, which keeps the newest ``n`` files *on disk* in the
callback's directory, ranked by the step each records (for the full state, SLURM's ``hpc_ckpt_*.ckpt`` in the run
directory count as well; ``last.ckpt`` is always kept). Files of earlier attempts and of a run directory that was
moved are therefore counted like the others; Lightning's in-memory list lost them. Files that do not record a step
(a foreign ``.ckpt`` copied there, a damaged file) are never deleted.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from ldm.callbacks.steps import StepBoundary, holds_step, save_once
from ldm.resume import recorded_step
from ldm.util import ConfigError

log = logging.getLogger(__name__)


class _StepAligned(ModelCheckpoint):
    """ModelCheckpoint that saves only at optimizer-step boundaries and keeps the newest ``keep_last_n`` on disk."""

    where = "lightning.modelcheckpoint.params"

    def __init__(self, keep_last_n: int | None = None, **params: Any) -> None:
        if params.get("save_on_exception"):
            raise ConfigError(f"{self.where}.save_on_exception: not supported; an exception can come in the middle "
                              "of a step, and a checkpoint written then does not resume exactly. SIGTERM and SIGUSR1 "
                              "save at the end of the current step (ldm.callbacks.GracefulStop).")
        if keep_last_n is not None:
            if isinstance(keep_last_n, bool) or not isinstance(keep_last_n, int) or keep_last_n < 1:
                raise ConfigError(f"{self.where}.keep_last_n={keep_last_n}: must be an integer >= 1 (remove it to "
                                  "keep every checkpoint)")
            clash = {k: params[k] for k in ("monitor", "save_top_k", "mode") if params.get(k) not in (None, -1)}
            if clash:
                raise ConfigError(f"{self.where}.keep_last_n cannot be combined with {clash}; use one or the other")
            params["save_top_k"] = -1  # Lightning keeps everything; prune() deletes by the files on disk
        super().__init__(**params)
        self.keep_last_n = keep_last_n
        self.boundary = StepBoundary()
        self.at_boundary = True
        self._steps: dict[tuple[str, int, int], tuple[int, float, bool] | None] = {}

    # ------------------------------------------------------------------------------------- saving at boundaries
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self.boundary.start(trainer)
        self.at_boundary = True

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.at_boundary = self.boundary.crossed(trainer)
        if not self.at_boundary:  # inside an accumulation: the state is not a step's
            return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self.prune(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.at_boundary:  # a val_check_interval that is not a multiple of the accumulation can land mid-step
            super().on_validation_end(trainer, pl_module)
            self.prune(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)  # an epoch always ends with an optimizer step
        self.prune(trainer)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore Lightning's bookkeeping; after the run directory moved, its paths are moved along."""
        old, new = state_dict.get("dirpath"), self.dirpath
        if old and new and os.path.abspath(old) != os.path.abspath(new):
            log.info("%s: the run directory moved (checkpoints were in %s); retention counts the files in %s",
                     type(self).__name__, old, new)
            state_dict = {k: _rebased(v, str(old), str(new)) for k, v in state_dict.items()}
        super().load_state_dict(state_dict)

    # ------------------------------------------------------------------------------------------------ retention
    def retention_pool(self) -> list[Path]:
        """The files ``keep_last_n`` ranks: ``*.ckpt`` in ``dirpath`` except ``last*.ckpt``."""
        folder = Path(self.dirpath or "")
        return [p for p in folder.glob(f"*{self.FILE_EXTENSION}")
                if p.is_file() and not p.name.startswith(self.CHECKPOINT_NAME_LAST)]

    def _recorded(self, path: Path) -> tuple[int, float, bool] | None:
        """``(step, save time, full state?)`` of a file (read once per file version)."""
        st = path.stat()
        key = (str(path), st.st_mtime_ns, st.st_size)
        if key not in self._steps:
            self._steps[key] = recorded_step(path)
        return self._steps[key]

    def prune(self, trainer: pl.Trainer) -> list[Path]:
        """Delete all but the newest ``keep_last_n`` files of :meth:`retention_pool` (global rank 0)."""
        if self.keep_last_n is None or not trainer.is_global_zero:
            return []
        ranked = []
        for path in self.retention_pool():
            record = self._recorded(path)
            if record is not None:
                ranked.append((record, path.name, path))
        ranked.sort(reverse=True)
        removed = []
        for (step, _, _), _, path in ranked[self.keep_last_n:]:
            path.unlink(missing_ok=True)
            removed.append(path)
            log.info("keep_last_n=%d: removed %s (step %d)", self.keep_last_n, path, step)
        return removed


def _rebased(value: Any, old: str, new: str) -> Any:
    """``value`` with paths under ``old`` moved under ``new`` (strings, and the keys of ``best_k_models``)."""
    if isinstance(value, str) and (value == old or value.startswith(old.rstrip(os.sep) + os.sep)):
        return new + value[len(old):]
    if isinstance(value, dict):
        return {_rebased(k, old, new): v for k, v in value.items()}
    return value


class FullStateCheckpoint(_StepAligned):
    """The full-state ModelCheckpoint (``lightning.modelcheckpoint.params``).

    Args:
        keep_last_n: keep only the newest n periodic full-state files, SLURM's ``hpc_ckpt_*`` included (None: keep
            all).
        hpc_dir: the directory of SLURM's ``hpc_ckpt_*.ckpt`` (the run directory).
        **params: ModelCheckpoint arguments (``save_on_exception`` is refused).
    """

    def __init__(self, keep_last_n: int | None = None, hpc_dir: str | None = None, **params: Any) -> None:
        super().__init__(keep_last_n, **params)
        self.hpc_dir = hpc_dir

    def last_path(self, trainer: pl.Trainer) -> str:
        metrics = {"step": torch.tensor(trainer.global_step), "epoch": torch.tensor(trainer.current_epoch)}
        return self.format_checkpoint_name(metrics, self.CHECKPOINT_NAME_LAST)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.save_last and holds_step(trainer, self.last_path(trainer)):
            return  # a signal already saved this step there; Lightning would write the same state again
        super().on_train_epoch_end(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """``last.ckpt`` holds the final step, also when it is not a multiple of ``every_n_train_steps``."""
        if not self.save_last:
            return
        path = self.last_path(trainer)
        if save_once(trainer, path):
            self.last_model_path = path
            log.info("saved %s at the final step %d", path, trainer.global_step)
        self.prune(trainer)

    def retention_pool(self) -> list[Path]:
        pool = [p for p in super().retention_pool() if (self._recorded(p) or (0, 0, False))[2]]
        if self.hpc_dir:
            pool += [p for p in Path(self.hpc_dir).glob("hpc_ckpt_*.ckpt") if p.is_file()]
        return pool


class WeightSnapshots(_StepAligned):
    """Weights-only snapshots (``metrics_over_trainsteps_checkpoint``). Its own class name gives it its own
    Lightning state key, so it can share ``every_n_train_steps`` with the full-state checkpoint.

    Args:
        keep_last_n: keep only the newest n snapshots (None: keep all).
        **params: ModelCheckpoint arguments (``save_on_exception`` is refused).
    """

    where = "lightning.callbacks.metrics_over_trainsteps_checkpoint.params"


def full_state_checkpoint(keep_last_n: int | None = None, hpc_dir: str | None = None,
                          **params: Any) -> FullStateCheckpoint:
    """The full-state checkpoint callback (see :class:`FullStateCheckpoint`)."""
    return FullStateCheckpoint(keep_last_n, hpc_dir, **params)


def weight_snapshot_checkpoint(keep_last_n: int | None = None, **params: Any) -> WeightSnapshots:
    """``metrics_over_trainsteps_checkpoint``: weights-only snapshots (see :class:`WeightSnapshots`)."""
    return WeightSnapshots(keep_last_n, **params)
