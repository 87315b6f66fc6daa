"""What a run reports while it trains: GPU memory, throughput and MFU, data statistics, and step progress."""

from __future__ import annotations

import logging
import time
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import LearningRateMonitor, TQDMProgressBar

from ldm.callbacks.steps import StepBoundary
from ldm.config_schema import PositiveFloat, PositiveInt

log = logging.getLogger(__name__)


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

    def __init__(self, flops_per_sample: PositiveFloat | None = None, log_every_n_steps: PositiveInt = 50,
                 peak_tflops: PositiveFloat | None = None) -> None:
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


class DataStatsLogger(pl.Callback):
    """Log the data module's sample counts (delivered, and skipped per reason) as ``data/<reason>``, summed
    over ranks, every ``every_n_steps`` optimizer steps. No-op for data modules without ``data_stats``.

    Args:
        every_n_steps: logging interval in optimizer steps.
    """

    def __init__(self, every_n_steps: PositiveInt = 500) -> None:
        super().__init__()
        self.every = max(1, every_n_steps)
        self.boundary = StepBoundary()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.boundary.start(trainer)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        dm = trainer.datamodule
        if not self.boundary.crossed(trainer) or trainer.global_step % self.every:
            return
        if dm is None or not hasattr(dm, "data_stats"):
            return
        stats = dm.data_stats("train")
        for key, value in sorted(stats.items()):
            pl_module.log(f"data/{key}", float(value), on_step=True, on_epoch=False, sync_dist=True,
                          reduce_fx="sum")
        if trainer.is_global_zero and any(stats.values()):
            dm.log_data_stats()


class StepProgressBar(TQDMProgressBar):
    """Training progress in optimizer steps against ``max_steps``, continuing from the resumed step.

    Lightning's default bar counts batches of the current epoch against an epoch length that an endless WebDataset
    stream does not have, and shows ``max_epochs - 1`` (``Epoch 0/-2 ... 30/9`` after a resume). This one shows
    ``train step 30/200000`` plus the usual metrics.
    """

    def _count_steps(self, trainer: pl.Trainer) -> None:
        bar = self.train_progress_bar
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        bar.reset(total=total)
        bar.initial = bar.n = trainer.global_step  # the rate counts only this launch's steps
        bar.set_description("train step")

    def on_train_start(self, trainer: pl.Trainer, *args: Any) -> None:
        super().on_train_start(trainer, *args)
        self._count_steps(trainer)  # a resume mid-epoch gets no on_train_epoch_start

    def on_train_epoch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        self._count_steps(trainer)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        bar, step = self.train_progress_bar, trainer.global_step
        if bar is None or bar.disable or step == bar.n:
            return
        if step % self.refresh_rate == 0 or step == bar.total:
            bar.n = step
            bar.set_postfix(self.get_metrics(trainer, pl_module))  # also redraws the bar


class StepLearningRateMonitor(LearningRateMonitor):
    """Lightning's ``LearningRateMonitor`` with one row per optimizer step.

    Lightning's logs at the start of every training batch whose step is due for logging; with gradient
    accumulation the step counter stands still for ``accumulate_grad_batches`` batches, so each step's learning
    rate was written that many times. The rate only changes at an optimizer step, so the first batch of a step
    logs it and the others are skipped.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._logged_step = -1

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        if trainer.global_step == self._logged_step:
            return
        self._logged_step = trainer.global_step
        super().on_train_batch_start(trainer, *args, **kwargs)
