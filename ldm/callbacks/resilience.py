"""Keeping a long run safe: save-and-stop on preemption signals, stop on non-finite values, per-step seeding."""

from __future__ import annotations

import logging
import math
import os
import random
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch

from ldm.callbacks.steps import StepBoundary, save_once
from ldm.config_schema import NonNegativeInt, PositiveFloat

log = logging.getLogger(__name__)


class GracefulStop(pl.Callback):
    """Preemption: save a checkpoint at an optimizer-step boundary, then stop cleanly; the next launch resumes.

    * SIGTERM, SIGUSR1 (and ``signals``) set a flag; at every optimizer-step boundary the flag is reduced across
      ranks (one tiny all-reduce, so a signal that reached any rank stops all of them at the same step), and then
      the checkpoint is written and the run stops. Outside SLURM the file is ``last.ckpt``.
    * SIGTERM is taken over from Lightning, whose handler raises ``SIGTERMException`` at the end of the current
      *micro-batch*: with gradient accumulation a checkpoint written then holds a loop position inside an
      accumulation while its weights, optimizer and EMA are those of the previous step, and the resumed run is
      shifted by the micro-batches already seen. Lightning registers its handler right before training starts
      (after every ``setup`` hook), so :meth:`on_train_start` installs ours over it with ``signal.signal``; a
      SIGTERM that arrives in between is carried over. Lightning restores the previous handlers when fit ends.
    * Under SLURM (``SLURMEnvironment.detect()``), SIGUSR1 is the scheduler's "time is nearly up" signal
      (``#SBATCH --signal=SIGUSR1@120``): the checkpoint is ``<hpc_dir>/hpc_ckpt_<n+1>.ckpt``; rank 0 then removes
      the older ``hpc_ckpt_*`` (:func:`remove_older_hpc`) and runs ``scontrol requeue <job>``. Lightning's own
      SLURM handler would save from inside the signal handler, i.e. at any point of a step; installing ours first
      makes Lightning skip its handler.

    A second signal changes nothing (the save is already due at the end of the step); SIGKILL stops at once.

    Args:
        ckpt_path: where SIGTERM/SIGUSR1 saves go (``<ckptdir>/last.ckpt``).
        hpc_dir: where SLURM requeue checkpoints go (the run directory, where ``-r`` looks for them).
        signals: signals besides SIGTERM that request "save and stop" (default SIGUSR1).
    """

    def __init__(self, ckpt_path: str, hpc_dir: str | None = None, signals: tuple[str, ...] = ("SIGUSR1",)) -> None:
        super().__init__()
        self.ckpt_path, self.hpc_dir = ckpt_path, hpc_dir
        self.signals = tuple(dict.fromkeys(("SIGTERM", *signals)))
        self.requested = False
        self.stopped_at: int | None = None
        self.boundary = StepBoundary()
        self.previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        log.warning("received %s: will save a checkpoint and stop at the end of this optimizer step",
                    signal.Signals(signum).name)
        self.requested = True

    def _install(self, names: tuple[str, ...]) -> None:
        if threading.current_thread() is not threading.main_thread():
            log.warning("GracefulStop: not in the main thread; %s keep their handlers", ", ".join(names))
            return
        for name in names:
            signum = getattr(signal, name)
            self.previous.setdefault(signum, signal.getsignal(signum))
            signal.signal(signum, self._handler)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._install(self.signals)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.boundary.start(trainer)
        if trainer.received_sigterm:  # arrived while Lightning's handler was installed
            self.requested = True
        self._install(("SIGTERM",))

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if threading.current_thread() is threading.main_thread():
            for signum, handler in self.previous.items():
                signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self.previous.clear()

    @staticmethod
    def on_slurm() -> bool:
        from lightning_fabric.plugins.environments import SLURMEnvironment

        return SLURMEnvironment.detect()

    def hpc_path(self, trainer: pl.Trainer) -> Path:
        """``hpc_ckpt_<n+1>.ckpt`` after the highest existing ``n`` (Lightning's naming, so both pick it up)."""
        folder = Path(self.hpc_dir or trainer.default_root_dir)
        numbers = [int(p.stem.rsplit("_", 1)[1]) for p in folder.glob("hpc_ckpt_*.ckpt")
                   if p.stem.rsplit("_", 1)[1].isdigit()]
        return folder / f"hpc_ckpt_{max(numbers, default=0) + 1}.ckpt"

    def _save_and_stop(self, trainer: pl.Trainer, why: str, path: str | Path) -> None:
        save_once(trainer, path)
        self.stopped_at = trainer.global_step
        log.warning("%s: saved %s at step %d. Resume with: python main.py -r %s --train", why, path,
                    trainer.global_step, Path(self.ckpt_path).parent.parent)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self.boundary.crossed(trainer):  # save only at optimizer-step boundaries
            return
        if not trainer.strategy.reduce_boolean_decision(self.requested, all=False):
            return
        if self.on_slurm():
            path = trainer.strategy.broadcast(str(self.hpc_path(trainer)))  # every rank names the same file
            self._save_and_stop(trainer, "SLURM requeue signal", path)
            if trainer.is_global_zero:
                remove_older_hpc(Path(path))
                requeue()
        else:
            self._save_and_stop(trainer, "stop requested by signal", self.ckpt_path)
        trainer.should_stop = True

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        from pytorch_lightning.utilities.exceptions import SIGTERMException

        if isinstance(exception, SIGTERMException) and self.stopped_at is None:
            # Lightning's handler caught a SIGTERM before on_train_start replaced it, and stopped after the first
            # micro-batch: no optimizer step has completed since the checkpoint this attempt started from.
            log.warning("SIGTERM before the first optimizer step of this attempt (step %d): nothing new to save",
                        trainer.global_step)


def remove_older_hpc(newest: Path) -> list[Path]:
    """Delete the ``hpc_ckpt_*.ckpt`` beside ``newest`` (just written, complete) that it supersedes.

    Every requeue writes a new file (Lightning's naming, which ``-r`` and Lightning's SLURM resume both read), so
    without this a job requeued every few hours accumulated one full training state per requeue. The newest one
    is all a resume needs; the periodic ``step=<n>.ckpt`` files are the history.
    """
    removed = []
    for old in newest.parent.glob("hpc_ckpt_*.ckpt"):
        if old != newest and old.is_file():
            old.unlink(missing_ok=True)
            removed.append(old)
            log.info("removed %s: superseded by %s", old, newest.name)
    return removed


def requeue() -> None:
    """``scontrol requeue`` this SLURM job (array tasks as ``<array job>_<task>``), logging the outcome."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array_job else os.environ.get("SLURM_JOB_ID")
    if not job:
        log.error("SLURM requeue: no SLURM_JOB_ID in the environment; resubmit with RESUME=<run dir>")
        return
    try:
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        log.error("SLURM requeue of job %s failed (%s); resubmit with RESUME=<run dir>", job, e)
        return
    if result.returncode == 0:
        log.warning("requeued SLURM job %s", job)
    else:
        log.error("scontrol requeue %s failed (rc %d: %s); resubmit with RESUME=<run dir>", job, result.returncode,
                  result.stderr.strip()[:200])


class FiniteLossGuard(pl.Callback):
    """Raise :class:`FloatingPointError` before the backward pass of the first non-finite loss."""

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        if not torch.isfinite(loss).all():
            raise FloatingPointError(
                f"non-finite training loss ({loss.item()}) at global step {trainer.global_step}, epoch "
                f"{trainer.current_epoch}. Lower the learning rate, check the data, or resume from an earlier "
                "checkpoint."
            )


class GradNormGuard(pl.Callback):
    """Stop *before* the optimizer step when the gradient norm is non-finite or has exploded, and log it.

    ``on_before_optimizer_step`` runs after backward (and after DDP's all-reduce and fp16 unscaling), before
    clipping and ``optimizer.step()``. The total L2 norm of the gradients the optimizer is about to use is logged
    as ``train/grad_norm``; a NaN/inf norm, or one above ``max_grad_norm``, raises :class:`FloatingPointError`
    (``main.py`` exits with code 4), so neither the weights nor the EMA nor any checkpoint ever sees that step.
    Every rank computes the same norm from the same all-reduced gradients, so all ranks stop together.

    The default threshold, 1e5, is about five orders of magnitude above the gradient norms of a healthy SD
    fine-tune (order 0.1 to 1 before clipping). AdamW's step size does not grow with the gradient, so a norm that
    large means corrupt data or weights, or an overflow, not a hard batch. With a fp16 ``GradScaler``, inf/NaN
    gradients are routine (the scaler skips that step and lowers its scale), so only the threshold applies there.

    Args:
        max_grad_norm: largest acceptable total gradient norm; None stops only on non-finite norms.
    """

    def __init__(self, max_grad_norm: PositiveFloat | None = 1e5) -> None:
        super().__init__()
        self.max_grad_norm = max_grad_norm

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            return
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)).float())
        pl_module.log("train/grad_norm", norm, on_step=True, on_epoch=False)
        value = float(norm)
        where = f"at global step {trainer.global_step} (before its optimizer step)"
        if not math.isfinite(value):
            if getattr(trainer.precision_plugin, "scaler", None) is not None:
                return  # fp16 loss scaling: the scaler skips this step itself
            raise FloatingPointError(
                f"non-finite gradient norm ({value}) {where}. The step was not applied; lower the learning rate, "
                "check the data, or resume from an earlier checkpoint."
            )
        if self.max_grad_norm is not None and value > self.max_grad_norm:
            raise FloatingPointError(
                f"gradient norm {value:.3g} exceeds max_grad_norm={self.max_grad_norm:g} {where}. The step was not "
                "applied; check the data and the learning rate, resume from an earlier checkpoint, or raise "
                "lightning.callbacks.grad_norm_guard.params.max_grad_norm."
            )


class StepSeed(pl.Callback):
    """Re-seed torch, numpy and python RNGs from (seed, rank, global step) before every training batch.

    The random draws of a step (timesteps, noise, posterior samples) then depend only on the step, not on
    history: a resumed run draws exactly what an uninterrupted run draws, on every rank, without storing
    per-rank RNG states (a checkpoint written by rank 0 could not hold the others').

    The seed is part of the checkpoint (callback state), so ``-r`` without ``--seed`` continues with the run's
    own seed; a different explicit ``--seed`` on resume is honoured with a warning (the draws then differ from an
    uninterrupted run).

    Args:
        seed: the run seed (``--seed``).
        keep_checkpoint_seed: on resume, take the seed stored in the checkpoint (main.py sets this when ``--seed``
            was not given).
    """

    def __init__(self, seed: NonNegativeInt, keep_checkpoint_seed: bool = False) -> None:
        super().__init__()
        self.seed, self.keep_checkpoint_seed = seed, keep_checkpoint_seed

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("seed")
        if saved is None or saved == self.seed:
            return
        if self.keep_checkpoint_seed:
            log.info("resume: using the run's seed %d (from the checkpoint)", saved)
            self.seed = int(saved)
        else:
            log.warning("resume: --seed %d differs from the run's seed %d; from here on the random draws differ "
                        "from an uninterrupted run", self.seed, saved)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        # batch_idx modulo accumulation: a resumed epoch restarts batch_idx at 0 but always at a step boundary
        micro = batch_idx % max(1, trainer.accumulate_grad_batches)
        seq = np.random.SeedSequence([self.seed, trainer.global_rank, trainer.global_step, micro])
        s = int(seq.generate_state(1, dtype=np.uint32)[0])
        random.seed(s)
        np.random.seed(s)
        torch.manual_seed(s)  # seeds every CUDA device too
