"""Lightning callbacks that ``main.py`` wires in (and that configs can target as ``main.<Name>``).

* :class:`SetupCallback` creates the run directory and saves the resolved configs (rank 0).
* :class:`ImageLogger` writes image grids from ``pl_module.log_images`` to ``<logdir>/images`` and the loggers.
* :class:`CUDACallback` logs peak GPU memory and epoch time.
* :class:`ThroughputMonitor` logs samples/s, per-device samples/s, MFU and peak memory.
* :class:`GracefulStop` turns SIGUSR1/SIGTERM into "save last.ckpt, then stop", in step on every rank.
* :class:`FiniteLossGuard` stops with a clear error at the first non-finite loss, naming the step.
"""

from __future__ import annotations

import logging
import random
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torchvision
from omegaconf import OmegaConf
from PIL import Image
from pytorch_lightning.utilities import rank_zero_only

from ldm import compat

log = logging.getLogger(__name__)


class SetupCallback(pl.Callback):
    """Create ``logdir``, ``ckptdir`` and ``cfgdir`` and save the resolved configs there (rank 0 only).

    Args:
        resume: whether this run resumes an earlier one (configs are then saved again with a new timestamp).
        now: run timestamp used in file names.
        logdir: run directory.
        ckptdir: checkpoint directory.
        cfgdir: config directory.
        config: the resolved project config (model, data).
        lightning_config: the resolved ``lightning`` section.
        debug: accepted for ldm compatibility; nothing changes.
    """

    def __init__(self, resume: bool, now: str, logdir: str, ckptdir: str, cfgdir: str, config: Any,
                 lightning_config: Any, debug: bool = False) -> None:
        super().__init__()
        self.resume, self.now, self.debug = resume, now, debug
        self.logdir, self.ckptdir, self.cfgdir = Path(logdir), Path(ckptdir), Path(cfgdir)
        self.config, self.lightning_config = config, lightning_config

    @rank_zero_only
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for d in (self.logdir, self.ckptdir, self.cfgdir):
            d.mkdir(parents=True, exist_ok=True)
        if "metrics_over_trainsteps_checkpoint" in (self.lightning_config.get("callbacks") or {}):
            (self.ckptdir / "trainstep_checkpoints").mkdir(parents=True, exist_ok=True)
        project = self.cfgdir / f"{self.now}-project.yaml"
        OmegaConf.save(self.config, project)
        lightning = OmegaConf.create({"lightning": self.lightning_config})
        OmegaConf.save(lightning, self.cfgdir / f"{self.now}-lightning.yaml")
        log.info("resolved configs saved to %s", self.cfgdir)


class ImageLogger(pl.Callback):
    """Log ``pl_module.log_images(batch, **log_images_kwargs)`` as PNG grids (ldm-compatible parameters).

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
    """

    def __init__(self, batch_frequency: int, max_images: int, clamp: bool = True, increase_log_steps: bool = True,
                 rescale: bool = True, disabled: bool = False, log_on_batch_idx: bool = False,
                 log_first_step: bool = False, log_images_kwargs: dict[str, Any] | None = None,
                 enable_autocast: bool | None = None, nrow: int = 4) -> None:
        super().__init__()
        if batch_frequency <= 0:
            raise ValueError(f"ImageLogger: batch_frequency must be > 0, got {batch_frequency}")
        compat.note_ignored("ImageLogger", {"enable_autocast": enable_autocast})
        self.batch_freq, self.max_images, self.clamp, self.rescale = batch_frequency, max_images, clamp, rescale
        self.disabled, self.log_on_batch_idx, self.log_first_step = disabled, log_on_batch_idx, log_first_step
        self.log_steps = [2**n for n in range(int(np.log2(batch_frequency)) + 1)] if increase_log_steps else []
        self.log_images_kwargs = dict(log_images_kwargs or {})
        self.nrow = nrow
        self.last_logged = -1

    def should_log(self, step: int) -> bool:
        if step == self.last_logged:  # gradient accumulation repeats a global step
            return False
        if step == 0:
            return self.log_first_step
        return step % self.batch_freq == 0 or step in self.log_steps

    def to_grid(self, images: torch.Tensor) -> np.ndarray:
        images = images[: self.max_images].detach().float().cpu()
        if self.clamp:
            images = images.clamp(-1.0, 1.0)
        if self.rescale:
            images = (images + 1.0) / 2.0
        grid = torchvision.utils.make_grid(images, nrow=self.nrow)  # 3 x H' x W'
        return (grid.permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8)

    @rank_zero_only
    def save(self, trainer: pl.Trainer, images: dict[str, torch.Tensor], split: str, batch_idx: int) -> None:
        root = Path(trainer.logger.save_dir if trainer.logger else trainer.default_root_dir)
        folder = Path(getattr(trainer, "_ldm_logdir", root)) / "images" / split
        folder.mkdir(parents=True, exist_ok=True)
        gs, ep = trainer.global_step, trainer.current_epoch
        for key, batch in images.items():
            grid = self.to_grid(batch)
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


class CUDACallback(pl.Callback):
    """Log epoch time and peak GPU memory (no-op on CPU)."""

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats(trainer.strategy.root_device)
        self.start_time = time.time()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not torch.cuda.is_available() or trainer.strategy.root_device.type != "cuda":
            return
        peak = torch.cuda.max_memory_allocated(trainer.strategy.root_device) / 2**30
        epoch_time = time.time() - self.start_time
        log.info("epoch %d: %.1f s, peak memory %.2f GiB", trainer.current_epoch, epoch_time, peak)


#: dense bf16 peak TFLOP/s by device-name fragment (vendor spec sheets), for MFU
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0, "V100": 125.0}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for frag, tflops in PEAK_TFLOPS.items():
        if frag in name:
            return tflops * 1e12
    return None


class ThroughputMonitor(pl.Callback):
    """Log ``perf/samples_per_sec`` (all ranks), ``perf/samples_per_sec_per_device``, ``perf/mfu`` and
    ``perf/peak_mem_gib`` every ``log_every_n_steps`` optimizer steps.

    Args:
        flops_per_sample: model FLOPs per training sample (DECISIONS R10: 4.69e12 for the 512 px inpainting
            step with online VAE and text encoders). None: MFU is not logged.
        log_every_n_steps: averaging window in optimizer steps.
        peak_tflops: device peak for MFU; None picks it from the device name (A100/H100/...).
    """

    def __init__(self, flops_per_sample: float | None = None, log_every_n_steps: int = 50,
                 peak_tflops: float | None = None) -> None:
        super().__init__()
        self.flops_per_sample, self.peak_tflops = flops_per_sample, peak_tflops
        self.every = max(1, log_every_n_steps)
        self._t0: float | None = None
        self._samples = 0
        self._last_step = -1

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._samples += _batch_size(batch)
        step = trainer.global_step
        if self._t0 is None:  # the first batch includes warm-up (workers, cudnn autotune): start the clock after it
            self._t0, self._samples, self._last_step = time.perf_counter(), 0, step
            return
        if step - self._last_step < self.every:
            return
        dt = time.perf_counter() - self._t0
        per_device = self._samples / dt
        metrics = {"perf/samples_per_sec": per_device * trainer.world_size,
                   "perf/samples_per_sec_per_device": per_device}
        device = trainer.strategy.root_device
        peak = self.peak_tflops * 1e12 if self.peak_tflops else peak_flops(device)
        if self.flops_per_sample and peak:
            metrics["perf/mfu"] = per_device * self.flops_per_sample / peak
        if device.type == "cuda":
            metrics["perf/peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, prog_bar=False, rank_zero_only=True)
        pl_module.log("samples_per_sec", metrics["perf/samples_per_sec"], prog_bar=True, on_step=True,
                      on_epoch=False, rank_zero_only=True)
        self._t0, self._samples, self._last_step = time.perf_counter(), 0, step


def _batch_size(batch: Any) -> int:
    if isinstance(batch, dict):
        for v in batch.values():
            if isinstance(v, (torch.Tensor, list)):
                return len(v)
    return 0


class GracefulStop(pl.Callback):
    """Preemption: save ``last.ckpt`` at a step boundary, then stop cleanly; the next launch resumes from it.

    * SIGTERM: Lightning's own handler (broadcast from rank 0, so every rank agrees) raises
      ``SIGTERMException`` at the end of the current batch; :meth:`on_exception` saves the checkpoint then.
    * SIGUSR1 (outside SLURM, whose requeue handler Lightning installs itself): a flag reduced across ranks
      every step (one tiny all-reduce), so all ranks save and stop at the same optimizer step.

    Args:
        ckpt_path: where the checkpoint is written (``<ckptdir>/last.ckpt``).
        signals: extra signals that request "save and stop" (default SIGUSR1).
    """

    def __init__(self, ckpt_path: str, signals: tuple[str, ...] = ("SIGUSR1",)) -> None:
        super().__init__()
        self.ckpt_path, self.signals = ckpt_path, tuple(signals)
        self.requested = False
        self.stopped_at: int | None = None

    def _handler(self, signum: int, frame: Any) -> None:
        log.warning("received %s: will save %s and stop after this step", signal.Signals(signum).name,
                    self.ckpt_path)
        self.requested = True

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for name in self.signals:
            signal.signal(getattr(signal, name), self._handler)

    def _save_and_stop(self, trainer: pl.Trainer, why: str) -> None:
        trainer.save_checkpoint(self.ckpt_path)
        self.stopped_at = trainer.global_step
        log.warning("%s: saved %s at step %d. Resume with: python main.py -r <logdir>", why, self.ckpt_path,
                    trainer.global_step)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.fit_loop._should_accumulate():  # save only at optimizer-step boundaries
            return
        if trainer.strategy.reduce_boolean_decision(self.requested, all=False):
            self._save_and_stop(trainer, "stop requested by signal")
            trainer.should_stop = True

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        from pytorch_lightning.utilities.exceptions import SIGTERMException

        if isinstance(exception, SIGTERMException) and self.stopped_at is None:
            self._save_and_stop(trainer, "SIGTERM")


class FiniteLossGuard(pl.Callback):
    """Raise :class:`FloatingPointError` before the backward pass of the first non-finite loss."""

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        if not torch.isfinite(loss).all():
            raise FloatingPointError(
                f"non-finite training loss ({loss.item()}) at global step {trainer.global_step}, epoch "
                f"{trainer.current_epoch}. Lower the learning rate, check the data, or resume from an earlier "
                "checkpoint."
            )


class StepSeed(pl.Callback):
    """Re-seed torch, numpy and python RNGs from (seed, rank, global step) before every training batch.

    The random draws of a step (timesteps, noise, posterior samples) then depend only on the step, not on
    history: a resumed run draws exactly what an uninterrupted run draws, on every rank, without storing
    per-rank RNG states (a checkpoint written by rank 0 could not hold the others').

    Args:
        seed: the run seed (``--seed``).
    """

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.seed = seed

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        # batch_idx modulo accumulation: a resumed epoch restarts batch_idx at 0 but always at a step boundary
        micro = batch_idx % max(1, trainer.accumulate_grad_batches)
        seq = np.random.SeedSequence([self.seed, trainer.global_rank, trainer.global_step, micro])
        s = int(seq.generate_state(1, dtype=np.uint32)[0])
        random.seed(s)
        np.random.seed(s)
        torch.manual_seed(s)  # seeds every CUDA device too


class DataStatsLogger(pl.Callback):
    """Log the data module's sample counts (delivered, and skipped per reason) as ``data/<reason>``, summed
    over ranks, every ``every_n_steps`` optimizer steps. No-op for data modules without ``data_stats``.

    Args:
        every_n_steps: logging interval in optimizer steps.
    """

    def __init__(self, every_n_steps: int = 500) -> None:
        super().__init__()
        self.every = max(1, every_n_steps)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "data_stats") or trainer.global_step % self.every:
            return
        if trainer.fit_loop._should_accumulate():
            return
        stats = dm.data_stats("train")
        for key, value in sorted(stats.items()):
            pl_module.log(f"data/{key}", float(value), on_step=True, on_epoch=False, sync_dist=True,
                          reduce_fx="sum")
        if trainer.is_global_zero and any(stats.values()):
            dm.log_data_stats()



def weight_snapshot_checkpoint(**params: Any) -> pl.Callback:
    """A weights-only ``ModelCheckpoint`` (``metrics_over_trainsteps_checkpoint``) with its own state key, so it
    can share every_n_train_steps with the full-state checkpoint without Lightning refusing the pair."""
    from pytorch_lightning.callbacks import ModelCheckpoint

    class WeightSnapshots(ModelCheckpoint):
        @property
        def state_key(self) -> str:
            return "WeightSnapshots" + super().state_key

    return WeightSnapshots(**params)
