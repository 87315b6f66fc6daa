"""The run directory: one name for all ranks; created and filled with the resolved configs when training starts.

Every process of a launch names the run directory from its own clock before any process group exists. Processes
started separately (torchrun on each node, ``srun``) can disagree by a second or more, and a rank whose clock is
skewed names another directory. Rank 0's name is the run's: once the process group is up, :class:`SetupCallback`
broadcasts it, and on a rank that named it differently every callback path under its own name is moved under rank
0's (only rank 0 writes, but no rank may hold a path of a directory that does not exist).

A new run saves ``configs/<time>-project.yaml`` and ``configs/<time>-lightning.yaml``: the run's config. A resume
leaves them untouched and records its own resolved config, command line and changes under ``configs/resumes/``
(:func:`ldm.run_dirs.resume_configs` says how later resumes use them).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from omegaconf import OmegaConf
from pytorch_lightning.utilities import rank_zero_only

log = logging.getLogger(__name__)

#: sub-folder of ``configs/`` where each resume records its resolved config, command line and changes
RESUMES = "resumes"


def _save_yaml(config: Any, path: Path) -> None:
    """``OmegaConf.save`` through a temp file and a rename: a resume never finds a truncated config."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    OmegaConf.save(config, tmp)
    os.replace(tmp, path)


class SetupCallback(pl.Callback):
    """Create ``logdir``, ``ckptdir`` and ``cfgdir`` and save the resolved configs there (rank 0 only).

    Args:
        resume: whether this run resumes an earlier one (its configs then go to ``configs/resumes/``).
        now: run timestamp used in file names.
        logdir: run directory.
        ckptdir: checkpoint directory.
        cfgdir: config directory.
        config: the resolved project config (model, data).
        lightning_config: the resolved ``lightning`` section.
        debug: accepted for ldm compatibility; nothing changes.
        resume_record: a resume's ``{"command_line": {"base": [...], "overrides": [...]}, "changes": [...]}``,
            saved as ``configs/resumes/<now>-overrides.yaml``.
    """

    def __init__(self, resume: bool, now: str, logdir: str, ckptdir: str, cfgdir: str, config: Any,
                 lightning_config: Any, debug: bool = False, resume_record: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.resume, self.now, self.debug = resume, now, debug
        self.logdir, self.ckptdir, self.cfgdir = Path(logdir), Path(ckptdir), Path(cfgdir)
        self.config, self.lightning_config = config, lightning_config
        self.resume_record = resume_record

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        now, logdir = trainer.strategy.broadcast((self.now, str(self.logdir)), src=0)
        if logdir == str(self.logdir):
            return
        log.info("rank %d: the run directory is %s (rank 0's name; this process had named it %s)",
                 trainer.global_rank, logdir, self.logdir)
        old = str(self.logdir)
        for callback in trainer.callbacks:
            for key, value in vars(callback).items():
                moved = _moved(value, old, logdir)
                if moved is not value:
                    setattr(callback, key, moved)
        self.now = now

    @rank_zero_only
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for d in (self.logdir, self.ckptdir, self.cfgdir):
            d.mkdir(parents=True, exist_ok=True)
        if "metrics_over_trainsteps_checkpoint" in (self.lightning_config.get("callbacks") or {}):
            (self.ckptdir / "trainstep_checkpoints").mkdir(parents=True, exist_ok=True)
        # the run's own config is written once; a run whose configs/ was emptied gets this attempt's as its own
        folder = self.cfgdir / RESUMES if self.resume and any(self.cfgdir.glob("*.yaml")) else self.cfgdir
        folder.mkdir(exist_ok=True)
        _save_yaml(self.config, folder / f"{self.now}-project.yaml")
        _save_yaml(OmegaConf.create({"lightning": self.lightning_config}), folder / f"{self.now}-lightning.yaml")
        if self.resume_record is not None and folder != self.cfgdir:
            _save_yaml(OmegaConf.create(self.resume_record), folder / f"{self.now}-overrides.yaml")
        log.info("resolved configs saved to %s", folder)


def _moved(value: Any, old: str, new: str) -> Any:
    """A path (str or Path) under ``old`` moved under ``new``; anything else unchanged (the same object)."""
    if not isinstance(value, (str, Path)):
        return value
    text = str(value)
    if text != old and not text.startswith(old.rstrip(os.sep) + os.sep):
        return value
    moved = new + text[len(old):]
    return Path(moved) if isinstance(value, Path) else moved
