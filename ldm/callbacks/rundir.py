"""The run directory: created and filled with the resolved configs when training starts (rank 0)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from omegaconf import OmegaConf
from pytorch_lightning.utilities import rank_zero_only

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
