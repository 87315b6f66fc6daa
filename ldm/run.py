"""Run directories, resume resolution and Trainer construction for ``main.py`` (ldm's layout, DECISIONS R8).

Layout of a run: ``<logdir>/<YYYY-mm-ddTHH-MM-SS>_<name>/`` with ``configs/`` (resolved project and
lightning yaml), ``checkpoints/`` (``last.ckpt``, step checkpoints, ``trainstep_checkpoints/`` weights-only
snapshots), ``images/`` (ImageLogger grids) and the CSV/TensorBoard/wandb logs.
"""

from __future__ import annotations

import inspect
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf

from ldm.callbacks import weight_snapshot_checkpoint
from ldm.checkpoint import atomic_checkpoint_io
from ldm.util import ConfigError, instantiate_from_config

log = logging.getLogger(__name__)

TOP_LEVEL_KEYS = ("model", "data", "lightning")
#: keys of the ``lightning`` section and what reads them
LIGHTNING_KEYS = {
    "trainer": "pytorch_lightning.Trainer arguments",
    "callbacks": "extra/overriding callback target configs by name (null removes a default one)",
    "modelcheckpoint": "params of the full-state ModelCheckpoint",
    "loggers": "extra/overriding logger target configs by name (csv, tensorboard, wandb; null removes)",
    "strategy": "a strategy name or target config (default: DDP with bucketing when world size > 1)",
    "find_unused_parameters": "DDP find_unused_parameters (default False)",
    "ddp_bucket_cap_mb": "DDP gradient bucket size in MB (default 25)",
    "ddp_static_graph": "DDP static_graph (default False)",
    "flops_per_sample": "model FLOPs per training sample, for MFU logging (docs/DECISIONS.md R10)",
}


@dataclass
class RunDirs:
    logdir: Path
    ckptdir: Path
    cfgdir: Path
    nowname: str
    resume_ckpt: Path | None
    resume_configs: list[Path]


def resolve_run_dirs(now: str, logroot: str, name: str | None, postfix: str, base: list[str],
                     resume: str | None) -> RunDirs:
    """New run: ``<logroot>/<now>_<name or first config stem><postfix>``. Resume: a run dir or a checkpoint."""
    if resume:
        path = Path(resume)
        if not path.exists():
            raise ConfigError(f"--resume {resume}: no such run directory or checkpoint")
        if path.is_file():
            ckpt = path  # <logdir>/checkpoints/x.ckpt, <logdir>/checkpoints/trainstep_checkpoints/x.ckpt or
            logdir = next((p.parent for p in path.parents if p.name == "checkpoints"), path.parent)  # hpc_ckpt
        else:
            logdir = path
            # newest of last.ckpt and Lightning's SLURM-requeue checkpoints (hpc_ckpt_<n>.ckpt in the run dir)
            candidates = [p for p in [path / "checkpoints" / "last.ckpt", *path.glob("hpc_ckpt_*.ckpt")]
                          if p.is_file()]
            if not candidates:
                raise ConfigError(f"--resume {resume}: no checkpoints/last.ckpt or hpc_ckpt_*.ckpt in that "
                                  "directory; pass a checkpoint file instead")
            ckpt = max(candidates, key=lambda p: p.stat().st_mtime)
        configs = sorted((logdir / "configs").glob("*.yaml"))
        return RunDirs(logdir, logdir / "checkpoints", logdir / "configs", logdir.name, ckpt, configs)
    stem = name or (Path(base[0]).stem if base else "run")
    nowname = f"{now}_{stem}{postfix}"
    logdir = Path(logroot) / nowname
    return RunDirs(logdir, logdir / "checkpoints", logdir / "configs", nowname, None, [])


def check_sections(cfg: DictConfig) -> None:
    """Unknown top-level or ``lightning`` keys are errors, not silently ignored settings."""
    for key in cfg:
        if key not in TOP_LEVEL_KEYS:
            raise ConfigError(f"unknown top-level config key '{key}' (expected {', '.join(TOP_LEVEL_KEYS)})")
    for key in cfg.get("lightning", {}) or {}:
        if key not in LIGHTNING_KEYS:
            raise ConfigError(f"unknown key 'lightning.{key}'; valid keys: {', '.join(LIGHTNING_KEYS)}")


def check_overrides(cfg: DictConfig, overrides: list[str]) -> None:
    """Reject overrides whose key cannot be meant: unknown top-level section or unknown Trainer argument."""
    trainer_args = set(inspect.signature(pl.Trainer.__init__).parameters) - {"self"}
    for token in overrides:
        key = token.split("=", 1)[0].lstrip("+")
        parts = key.split(".")
        if parts[0] not in TOP_LEVEL_KEYS:
            raise ConfigError(f"override '{token}': unknown top-level key '{parts[0]}' (expected one of "
                              f"{', '.join(TOP_LEVEL_KEYS)})")
        if parts[:2] == ["lightning", "trainer"] and len(parts) == 3 and parts[2] not in trainer_args:
            raise ConfigError(f"override '{token}': '{parts[2]}' is not a pytorch_lightning.Trainer argument")
        if OmegaConf.select(cfg, ".".join(parts[:-1])) is None and len(parts) > 2 and "params" in parts:
            raise ConfigError(f"override '{token}': '{'.'.join(parts[:-1])}' does not exist in the config")


def effective_lr(base_lr: float, batch_size: int, devices: int, num_nodes: int, accumulate: int,
                 scale_lr: bool) -> tuple[float, str]:
    """The learning rate and a human-readable formula for the log.

    Unlike ldm (which counted GPUs per node only, DECISIONS D2), scaling uses the full world size.
    """
    if not scale_lr:
        return base_lr, f"learning rate {base_lr:.2e} (base_learning_rate; --scale_lr off)"
    lr = accumulate * devices * num_nodes * batch_size * base_lr
    return lr, (f"learning rate {lr:.2e} = {accumulate} (accumulate_grad_batches) * {devices} (devices) * "
                f"{num_nodes} (nodes) * {batch_size} (batch size) * {base_lr:.2e} (base_learning_rate)")


def count_devices(devices: Any) -> int:
    """Devices per node from a Trainer ``devices`` value (int, "0,1,2", list, "auto", -1)."""
    if devices in (None, "auto", -1, "-1"):
        return max(torch.cuda.device_count(), 1)
    if isinstance(devices, str):
        return len([d for d in devices.split(",") if d.strip()]) if "," in devices else int(devices)
    if isinstance(devices, (list, tuple)):
        return len(devices)
    return int(devices)


def preflight(cfg: DictConfig) -> None:
    """Fail fast, before building a 1.3B-parameter model, on a missing init checkpoint or missing GPUs."""
    ckpt = OmegaConf.select(cfg, "model.params.ckpt_path")
    if ckpt and not Path(ckpt).is_file():
        raise ConfigError(
            f"model.params.ckpt_path={ckpt} does not exist. For configs/inpaint.yaml download the SD2 base "
            "checkpoint '512-base-ema.ckpt' (Hugging Face: stabilityai/stable-diffusion-2-base) and put it at "
            f"{ckpt}, or point to it with model.params.ckpt_path=/path/to/512-base-ema.ckpt "
            "(model.params.ckpt_path=null trains from scratch)."
        )
    accel = str(OmegaConf.select(cfg, "lightning.trainer.accelerator") or "auto")
    if accel in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"lightning.trainer.accelerator={accel} but no CUDA GPU is visible. Run on a GPU node, or for a CPU "
            "smoke run use configs/tiny/inpaint.yaml (or override lightning.trainer.accelerator=cpu "
            "lightning.trainer.devices=1 lightning.trainer.num_nodes=1)."
        )


def build_strategy(lightning_cfg: DictConfig, world: int) -> Any:
    """DDP with bucketing/overlap for multi-process runs; a target config or a name overrides it."""
    spec = lightning_cfg.get("strategy")
    if isinstance(spec, (DictConfig, dict)):
        return instantiate_from_config(spec)
    if spec is not None:
        return spec
    if world <= 1:
        return "auto"
    from pytorch_lightning.strategies import DDPStrategy

    return DDPStrategy(
        find_unused_parameters=bool(lightning_cfg.get("find_unused_parameters", False)),
        gradient_as_bucket_view=True,  # grads alias the all-reduce buckets: no extra copy, less memory
        bucket_cap_mb=int(lightning_cfg.get("ddp_bucket_cap_mb", 25)),
        static_graph=bool(lightning_cfg.get("ddp_static_graph", False)),
    )


def default_callbacks(dirs: RunDirs, now: str, cfg: DictConfig, lightning_cfg: DictConfig, seed: int,
                      resume: bool, flops_per_sample: float | None) -> dict[str, Any]:
    """ldm's default callbacks plus ours, as target configs keyed by name (``lightning.callbacks`` merges in)."""
    project = OmegaConf.masked_copy(cfg, ["model", "data"])
    return {
        "setup_callback": {"target": "main.SetupCallback", "params": {
            "resume": resume, "now": now, "logdir": str(dirs.logdir), "ckptdir": str(dirs.ckptdir),
            "cfgdir": str(dirs.cfgdir), "config": project, "lightning_config": lightning_cfg}},
        "image_logger": {"target": "main.ImageLogger", "params": {"batch_frequency": 750, "max_images": 4,
                                                                  "clamp": True}},
        "learning_rate_logger": {"target": "pytorch_lightning.callbacks.LearningRateMonitor",
                                 "params": {"logging_interval": "step"}},
        "cuda_callback": {"target": "main.CUDACallback"},
        "throughput": {"target": "ldm.callbacks.ThroughputMonitor",
                       "params": {"flops_per_sample": flops_per_sample, "log_every_n_steps": 50}},
        "graceful_stop": {"target": "ldm.callbacks.GracefulStop",
                          "params": {"ckpt_path": str(dirs.ckptdir / "last.ckpt"), "signals": _signals()}},
        "finite_loss": {"target": "ldm.callbacks.FiniteLossGuard"},
        "data_stats": {"target": "ldm.callbacks.DataStatsLogger", "params": {"every_n_steps": 500}},
        "step_seed": {"target": "ldm.callbacks.StepSeed", "params": {"seed": seed}},
    }


def _signals() -> list[str]:
    # Under SLURM, Lightning's SLURMEnvironment owns SIGUSR1 (checkpoint + requeue). SIGTERM always goes
    # through Lightning's handler (GracefulStop.on_exception saves).
    return [] if "SLURM_JOB_ID" in os.environ else ["SIGUSR1"]


def checkpoint_callbacks(dirs: RunDirs, lightning_cfg: DictConfig) -> list[Any]:
    """Full-state checkpoints (resume) plus optional weights-only step snapshots (evaluation)."""
    from pytorch_lightning.callbacks import ModelCheckpoint

    params = {"dirpath": str(dirs.ckptdir), "filename": "{step:09}", "save_last": True, "save_top_k": 1,
              "enable_version_counter": False,  # last.ckpt is overwritten in place, also after a resume
              "verbose": True}
    user = OmegaConf.create(lightning_cfg.get("modelcheckpoint") or {})  # absent section: defaults only
    params.update(OmegaConf.to_container(user.get("params") or OmegaConf.create(), resolve=True))
    callbacks = [ModelCheckpoint(**params)]
    extra = (lightning_cfg.get("callbacks") or {}).get("metrics_over_trainsteps_checkpoint")
    if extra is not None:
        snap = {"dirpath": str(dirs.ckptdir / "trainstep_checkpoints"), "filename": "{epoch:06}-{step:09}",
                "save_top_k": -1, "every_n_train_steps": 10000, "save_weights_only": True, "verbose": True}
        snap.update(OmegaConf.to_container(extra.get("params", {}) or {}, resolve=True))
        callbacks.append(weight_snapshot_checkpoint(**snap))
    return callbacks


def build_loggers(dirs: RunDirs, lightning_cfg: DictConfig) -> list[Any]:
    """CSV and TensorBoard by default; ``lightning.loggers.<name>`` adds (a target config) or removes (null)."""
    specs: dict[str, Any] = {
        "csv": {"target": "pytorch_lightning.loggers.CSVLogger", "params": {"save_dir": str(dirs.logdir),
                                                                            "name": "csv"}},
        "tensorboard": {"target": "pytorch_lightning.loggers.TensorBoardLogger",
                        "params": {"save_dir": str(dirs.logdir), "name": "tensorboard"}},
    }
    for name, spec in (lightning_cfg.get("loggers") or {}).items():
        if spec is None:
            specs.pop(name, None)
            continue
        spec = OmegaConf.to_container(spec, resolve=True)
        if name == "wandb":
            spec.setdefault("target", "pytorch_lightning.loggers.WandbLogger")
            spec.setdefault("params", {}).setdefault("save_dir", str(dirs.logdir))
            spec["params"].setdefault("name", dirs.nowname)
            spec["params"].setdefault("id", dirs.nowname)  # same id on resume: the wandb run continues
            spec["params"].setdefault("resume", "allow")
        specs[name] = spec
    return [instantiate_from_config(s) for s in specs.values()]


def build_trainer(dirs: RunDirs, now: str, cfg: DictConfig, lightning_cfg: DictConfig, seed: int,
                  resume: bool) -> pl.Trainer:
    trainer_kwargs = OmegaConf.to_container(lightning_cfg.get("trainer", {}) or {}, resolve=True)
    devices = count_devices(trainer_kwargs.get("devices", "auto"))
    world = devices * int(trainer_kwargs.get("num_nodes", 1))
    callbacks_cfg = default_callbacks(dirs, now, cfg, lightning_cfg, seed, resume,
                                      lightning_cfg.get("flops_per_sample"))
    for name, spec in (lightning_cfg.get("callbacks") or {}).items():
        if name == "metrics_over_trainsteps_checkpoint":
            continue
        if spec is None:
            callbacks_cfg.pop(name, None)
        elif name in callbacks_cfg:
            merged = OmegaConf.merge(callbacks_cfg[name], spec)
            callbacks_cfg[name] = merged
        else:
            callbacks_cfg[name] = spec
    callbacks = [instantiate_from_config(c) for c in callbacks_cfg.values()]
    callbacks += checkpoint_callbacks(dirs, lightning_cfg)
    trainer_kwargs.setdefault("default_root_dir", str(dirs.logdir))
    trainer_kwargs.setdefault("strategy", build_strategy(lightning_cfg, world))
    trainer_kwargs.setdefault("plugins", [atomic_checkpoint_io()])
    trainer = pl.Trainer(callbacks=callbacks, logger=build_loggers(dirs, lightning_cfg), **trainer_kwargs)
    trainer._ldm_logdir = str(dirs.logdir)  # ImageLogger writes <logdir>/images/<split>
    return trainer
