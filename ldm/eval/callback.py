"""In-training evaluation on a fixed held-out set: the same images, masks, prompts and seeds at every evaluation.

Every ``every_n_steps`` optimizer steps, rank 0 inpaints the set (:mod:`ldm.eval.fixed_set`) with the EMA weights
and with the raw weights (same seeds), then

* logs the pixel metrics of each (``heldout/ema/psnr_hole``, ``heldout/raw/ssim_known``, ...), the seconds the
  evaluation took (``heldout/seconds``) to every logger at the global step, and appends them with the set's
  fingerprint to ``<logdir>/heldout/metrics.jsonl``;
* writes one labelled grid ``<logdir>/heldout/step_XXXXXXXXX.png`` (rows: images; columns: input | mask | masked
  input | EMA | raw) and sends it to the TensorBoard and wandb loggers.

So runs and steps are compared on identical inputs, unlike the ImageLogger, which shows whatever batch comes by.
Other ranks do not wait on a collective here: they block at the next gradient all-reduce until rank 0 is done,
which is the cost docs/EVALUATION.md gives per evaluation.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch

from ldm.config_schema import NonNegativeFloat, NonNegativeInt, PositiveInt
from ldm.data.masks import is_hole
from ldm.defaults import GUIDANCE_SCALE
from ldm.eval.fixed_set import FixedSet, build_fixed_set, load_fixed_set
from ldm.eval.metrics import region_metrics
from ldm.grids import labelled_grid
from ldm.image_io import save_png
from ldm.inference import NonFiniteSamples, SamplingOptions, inpaint
from ldm.util import REPO_ROOT, ConfigError

log = logging.getLogger(__name__)


def resolve_set_dir(set_dir: str | Path) -> Path:
    """Where a held-out set lives: an absolute ``set_dir`` as given, a relative one under the repository root.

    The set is created on first use, so it cannot be found by looking for it; anchoring relative paths at the
    working directory would build a second "fixed" set for every directory a run is launched from. A folder of
    that name in the working directory is not used, and a warning says so.
    """
    path = Path(set_dir).expanduser()
    if path.is_absolute():
        return path
    anchored = REPO_ROOT / path
    if path.resolve() != anchored.resolve() and (path / "set.json").exists():
        log.warning("held-out set: using %s; %s in the working directory is not used (a relative set_dir is "
                    "anchored at the repository root)", anchored, path.resolve())
    return anchored


class HeldOutEvaluation(pl.Callback):
    """Inpaint a fixed held-out set with EMA and raw weights every N steps and log grid and hole metrics.

    Args:
        set_dir: folder of the set (``set.json``, ``images/``, ``masks/``). A relative path is anchored at the
            repository root (the folder holding ``main.py``), never at the working directory, so runs launched
            from anywhere build and read the same set (:func:`resolve_set_dir`).
        every_n_steps: evaluate when the global step is a multiple of this.
        shards: validation shards to build the set from when ``set_dir`` holds none yet (None: it must exist).
        num_images: images of the set (used to build it; an existing set built otherwise is an error).
        size: image side of the set (the model's training resolution; checked like ``num_images``).
        seed: seeds the set's masks and sampling (checked like ``num_images``).
        steps: sampler steps.
        scale: classifier-free guidance scale (default ``ldm.defaults.GUIDANCE_SCALE``, the one of
            ``scripts/evaluate.py`` and ``scripts/inpaint.py``, so the numbers compare; docs/DECISIONS.md D11).
        sampler: "ddim" or "dpm".
        precision: "fp32", "bf16" or "fp16" (autocast) for sampling.
        log_first_step: also evaluate the weights training starts (or resumes) from.
        logdir: run directory for the PNG grids and ``metrics.jsonl`` (default: the trainer's log directory).
    """

    def __init__(self, set_dir: str, every_n_steps: PositiveInt = 5000, shards: str | None = None,
                 num_images: PositiveInt = 8, size: PositiveInt = 512, seed: NonNegativeInt = 0,
                 steps: PositiveInt = 50, scale: NonNegativeFloat = GUIDANCE_SCALE, sampler: str = "ddim",
                 precision: str = "fp32", log_first_step: bool = False, logdir: str | None = None) -> None:
        super().__init__()
        if every_n_steps < 1:
            raise ConfigError(f"HeldOutEvaluation: every_n_steps must be >= 1, got {every_n_steps}")
        self.set_dir, self.every, self.shards = resolve_set_dir(set_dir), every_n_steps, shards
        self.build_args = {"num_images": num_images, "size": size, "seed": seed}
        try:
            self.options = SamplingOptions(sampler, steps, scale, 0.0, precision)
        except ValueError as e:
            raise ConfigError(f"HeldOutEvaluation: {e}") from None
        self.log_first_step, self.logdir = log_first_step, logdir
        self.fixed: FixedSet | None = None
        self.last_step = self.start_step = -1

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:  # noqa: ARG002
        if stage != "fit" or not trainer.is_global_zero:
            return
        if not (self.set_dir / "set.json").exists() and self.shards is not None:
            build_fixed_set(self.shards, self.set_dir, **self.build_args)
        self.fixed = load_fixed_set(self.set_dir)  # fails before the first step, not at the first evaluation
        if self.fixed.built_with != self.build_args:
            raise ConfigError(f"held-out set {self.set_dir} was built with {self.fixed.built_with}, the callback "
                             f"config asks for {self.build_args}: a set never changes; point set_dir at a new "
                             "folder to build another, or set the config to the set's values")
        log.info("held-out evaluation every %d steps on %s (%d images, fingerprint %s)", self.every, self.set_dir,
                 len(self.fixed.items), self.fixed.fingerprint)

    # The weights after N optimizer steps are read at the start of the next batch (or at the end of training):
    # Lightning runs callbacks' on_train_batch_end before the module's, where the EMA of step N is taken.
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:  # noqa: ARG002
        self.start_step = trainer.global_step  # a resumed run does not repeat the evaluation it resumed from

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,  # noqa: ARG002
                             batch_idx: int) -> None:  # noqa: ARG002 (Lightning's hook signature)
        self.maybe_evaluate(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.maybe_evaluate(trainer, pl_module)

    def maybe_evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = trainer.global_step
        if step == self.last_step or step % self.every or (step == self.start_step and not self.log_first_step):
            return  # gradient accumulation repeats a global step: once per optimizer step
        self.last_step = step
        if trainer.is_global_zero:
            self.evaluate(trainer, pl_module)

    @torch.no_grad()
    def inpaint_set(self, pl_module: pl.LightningModule) -> list[np.ndarray]:
        return [inpaint(pl_module, it.image, it.mask, it.caption, it.seed, 1, self.options)[0]
                for it in self.fixed.items]

    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        """Run the evaluation now; returns the logged metrics."""
        start = time.perf_counter()
        was_training = pl_module.training
        pl_module.eval()
        outputs: dict[str, list[np.ndarray]] = {}
        metrics: dict[str, float] = {}
        try:
            for weights in ("ema", "raw") if getattr(pl_module, "use_ema", False) else ("raw",):
                scope = pl_module.ema_scope("held-out evaluation") if weights == "ema" else contextlib.nullcontext()
                try:
                    with scope:
                        outputs[weights] = self.inpaint_set(pl_module)
                except NonFiniteSamples as e:
                    # Only rank 0 evaluates, so raising here would leave the other ranks waiting at their next
                    # collective; the run goes on (its loss and gradient checks judge the weights) and the
                    # failure is logged as an error and as a metric, never as black images.
                    log.error("held-out evaluation at step %d, %s weights: %s; no metrics or grid column for them",
                              trainer.global_step, weights, e)
                    metrics[f"heldout/{weights}/nonfinite"] = 1.0
        finally:
            pl_module.train(was_training)
        for weights, outs in outputs.items():
            scores = [region_metrics(out, it.image, it.mask) for out, it in zip(outs, self.fixed.items)]
            metrics.update({f"heldout/{weights}/{k}": float(np.nanmean([s[k] for s in scores])) for k in scores[0]})
        metrics["heldout/seconds"] = time.perf_counter() - start
        self.publish(trainer, metrics, self.grid(outputs) if outputs else None)
        return metrics

    def grid(self, outputs: dict[str, list[np.ndarray]]) -> np.ndarray:
        rows = [[it.image, it.mask, np.where(is_hole(it.mask)[..., None], 127, it.image).astype(np.uint8),
                 *(outs[i] for outs in outputs.values())] for i, it in enumerate(self.fixed.items)]
        opts = self.options
        headers = ["input", "mask", "masked input",
                   *(f"{w.upper() if w == 'ema' else w} {opts.sampler} {opts.steps} s={opts.scale:g}"
                     for w in outputs)]
        row_labels = [f"{it.key} (seed {it.seed})" for it in self.fixed.items]
        return labelled_grid(rows, headers=headers, row_labels=row_labels)

    def publish(self, trainer: pl.Trainer, metrics: dict[str, float], grid: np.ndarray | None) -> None:
        step = trainer.global_step
        folder = Path(self.logdir or trainer.default_root_dir) / "heldout"
        folder.mkdir(parents=True, exist_ok=True)
        if grid is not None:
            save_png(grid, folder / f"step_{step:09d}.png")
        with open(folder / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": step, "set": str(self.set_dir), "fingerprint": self.fixed.fingerprint,
                                **metrics}) + "\n")
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
            name = type(logger).__name__
            if grid is None:
                continue
            if name == "TensorBoardLogger":
                logger.experiment.add_image("heldout/grid", grid, step, dataformats="HWC")
            elif name == "WandbLogger":
                logger.log_image(key="heldout/grid", images=[grid], step=step)
        psnr = {w: f"{metrics[f'heldout/{w}/psnr_hole']:.2f}" if f"heldout/{w}/psnr_hole" in metrics else "-"
                for w in ("ema", "raw")}
        log.info("held-out evaluation at step %d: EMA psnr_hole %s, raw psnr_hole %s (%.1f s)", step, psnr["ema"],
                 psnr["raw"], metrics["heldout/seconds"])
