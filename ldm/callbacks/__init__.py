"""Lightning callbacks that ``main.py`` wires in; configs target them as ``ldm.callbacks.<Name>`` (ldm's
``main.<Name>`` paths keep working: ``main.py`` re-exports them).

* :class:`SetupCallback` creates the run directory and saves the resolved configs (rank 0).
* :class:`ImageLogger` writes image grids from ``pl_module.log_images`` to ``<logdir>/images`` and the loggers.
* :class:`CUDACallback` logs peak GPU memory and epoch time.
* :class:`ThroughputMonitor` logs samples/s, per-device samples/s, MFU and peak memory.
* :class:`DataStatsLogger` logs the data module's delivered/skipped sample counts.
* :class:`StepProgressBar` shows progress in optimizer steps against ``max_steps``.
* :class:`GracefulStop` turns SIGTERM/SIGUSR1 (and SLURM's requeue signal) into "save at the step boundary, stop".
* :class:`FiniteLossGuard` / :class:`GradNormGuard` stop at the first non-finite loss / exploded gradient norm,
  before the step is applied.
* :class:`StepSeed` seeds every batch from (seed, rank, step), so a resumed run draws what a straight one draws.
* :class:`FullStateCheckpoint` / :class:`WeightSnapshots`: the checkpoint streams (saved at optimizer-step
  boundaries only, ``last.ckpt`` at the final step) and their retention.
"""

from ldm.callbacks.checkpoints import (
    FullStateCheckpoint,
    WeightSnapshots,
    full_state_checkpoint,
    weight_snapshot_checkpoint,
)
from ldm.callbacks.images import ImageLogger
from ldm.callbacks.monitoring import (
    PEAK_TFLOPS,
    CUDACallback,
    DataStatsLogger,
    StepLearningRateMonitor,
    StepProgressBar,
    ThroughputMonitor,
    peak_flops,
)
from ldm.callbacks.resilience import FiniteLossGuard, GracefulStop, GradNormGuard, StepSeed
from ldm.callbacks.rundir import SetupCallback
from ldm.callbacks.steps import StepBoundary

__all__ = [
    "PEAK_TFLOPS",
    "CUDACallback",
    "DataStatsLogger",
    "FiniteLossGuard",
    "FullStateCheckpoint",
    "GracefulStop",
    "GradNormGuard",
    "ImageLogger",
    "SetupCallback",
    "StepBoundary",
    "StepLearningRateMonitor",
    "StepProgressBar",
    "StepSeed",
    "ThroughputMonitor",
    "WeightSnapshots",
    "full_state_checkpoint",
    "peak_flops",
    "weight_snapshot_checkpoint",
]
