"""Config checks and Trainer construction for ``main.py`` (ldm's layout, DECISIONS R8); the run directory
itself (layout, ``-r`` resolution, resume records) is :mod:`ldm.run_dirs`, re-exported here.

A resumed run keeps all of its directory: same checkpoint directory, same CSV/TensorBoard version directory
(rows of the interrupted attempt after the resume step are dropped), same wandb run id.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ldm.callbacks import full_state_checkpoint, weight_snapshot_checkpoint
from ldm.checkpoint import atomic_checkpoint_io
from ldm.config_schema import PositiveFloat, PositiveInt, check_params, check_tree, check_value, suggest
from ldm.run_dirs import RunDirs, probe_write
from ldm.util import ConfigError, get_obj_from_str, instantiate_from_config

log = logging.getLogger(__name__)

TOP_LEVEL_KEYS = ("model", "data", "lightning")
#: ldm's default ``--seed`` (a resume without ``--seed`` keeps the run's own, stored in the checkpoint)
DEFAULT_SEED = 23
#: keys of the ``lightning`` section and what reads them
LIGHTNING_KEYS = {
    "trainer": "pytorch_lightning.Trainer arguments",
    "callbacks": "extra/overriding callback target configs by name (null removes a default one)",
    "modelcheckpoint": "params of the full-state ModelCheckpoint (plus keep_last_n: keep only the newest n)",
    "loggers": "extra/overriding logger target configs by name (csv, tensorboard, wandb; null removes)",
    "strategy": "a strategy name or target config (default: DDP with bucketing when world size > 1)",
    "find_unused_parameters": "DDP find_unused_parameters (default False)",
    "ddp_bucket_cap_mb": "DDP gradient bucket size in MB (default 25)",
    "ddp_static_graph": "DDP static_graph (default False)",
    "flops_per_sample": "model FLOPs per training sample, for MFU logging (docs/DECISIONS.md R10)",
}


#: keys of the ``model`` section besides ``target``/``params``, with their types
MODEL_KEYS: dict[str, Any] = {"base_learning_rate": PositiveFloat}
#: the scalar keys of the ``lightning`` section, with their types
LIGHTNING_TYPES: dict[str, Any] = {"find_unused_parameters": bool, "ddp_bucket_cap_mb": PositiveInt,
                                   "ddp_static_graph": bool, "flops_per_sample": PositiveFloat | None}


def _section(tree: dict[str, Any], key: str, where: str, null_ok: bool = False) -> dict[str, Any]:
    """The mapping at ``tree[key]`` ({} when absent). A null section is an error unless ``null_ok`` (``params``):
    it would silently drop every shipped setting under it, which deleting the key says explicitly."""
    value = tree.get(key)
    if value is None and key in tree and not null_ok:
        raise ConfigError(f"{where}: expected a mapping, got null; to use the defaults delete the key (override "
                          f"~{where}), or give it values")
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping, got {value!r}")
    return value


def _check_checkpoint_params(model_checkpoint: Any, params: dict[str, Any], where: str) -> None:
    """ModelCheckpoint arguments plus ``keep_last_n`` (see :mod:`ldm.callbacks.checkpoints`)."""
    params = dict(params)
    keep = params.pop("keep_last_n", None)
    if keep is not None and (not isinstance(keep, int) or isinstance(keep, bool) or keep < 1):
        raise ConfigError(f"{where}.keep_last_n: expected an integer >= 1, got {keep!r}")
    check_params(model_checkpoint, params, where)


def _check_named_targets(specs: dict[str, Any], where: str) -> None:
    """``lightning.callbacks`` / ``lightning.loggers``: name -> null, a target node, or params for a default."""
    for name, spec in specs.items():
        if spec is None:
            continue
        if not isinstance(spec, dict):
            raise ConfigError(f"{where}.{name}: expected a mapping with target/params (or null), got {spec!r}")
        if "target" in spec:
            check_tree(spec, f"{where}.{name}")
            continue
        unknown = set(spec) - {"params"}
        if unknown:
            key = sorted(unknown)[0]
            raise ConfigError(f"{where}.{name}.{key}: unknown key{suggest(key, ['target', 'params'])}")


def check_sections(cfg: DictConfig) -> None:
    """Check the whole config before anything is built: one :class:`ConfigError` line naming the key.

    Unknown keys (top level, ``model``, ``data``, ``lightning`` and every target's ``params``, with a "did you
    mean"), values of the wrong type or outside a constructor's choices, missing mandatory values (``???``).
    Callback and logger params that merge into a default are checked after merging (:func:`build_trainer`).
    """
    for key in cfg:
        if key not in TOP_LEVEL_KEYS:
            raise ConfigError(f"unknown top-level config key '{key}'{suggest(key, TOP_LEVEL_KEYS)} "
                              f"(expected {', '.join(TOP_LEVEL_KEYS)})")
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"{missing[0]}: this value is required (??? in the config); set it on the command "
                          f"line: {missing[0]}=...")
    try:
        tree = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as e:
        raise ConfigError(f"config: {str(e).splitlines()[0]}") from e
    for section in ("model", "data"):
        node = tree.get(section)
        if node is None:
            continue
        if not isinstance(node, dict) or "target" not in node:
            raise ConfigError(f"{section}: expected a mapping with 'target' and 'params', got {node!r}")
        check_tree(node, section, extra_keys=MODEL_KEYS if section == "model" else None)
    lightning = _section(tree, "lightning", "lightning")
    for key, value in lightning.items():
        if key not in LIGHTNING_KEYS:
            raise ConfigError(f"lightning.{key}: unknown key{suggest(key, LIGHTNING_KEYS)}; valid keys: "
                              f"{', '.join(LIGHTNING_KEYS)}")
        if key in LIGHTNING_TYPES and (expected := check_value(value, LIGHTNING_TYPES[key])) is not None:
            raise ConfigError(f"lightning.{key}: expected {expected}, got {value!r}")
    check_params(pl.Trainer, _section(lightning, "trainer", "lightning.trainer"), "lightning.trainer")
    from pytorch_lightning.callbacks import ModelCheckpoint

    modelcheckpoint = _section(lightning, "modelcheckpoint", "lightning.modelcheckpoint")
    for key in modelcheckpoint:
        if key not in ("target", "params"):
            raise ConfigError(f"lightning.modelcheckpoint.{key}: unknown key{suggest(key, ['params'])}")
    _check_checkpoint_params(ModelCheckpoint, _section(modelcheckpoint, "params", "lightning.modelcheckpoint.params",
                                                       null_ok=True), "lightning.modelcheckpoint.params")
    callbacks = _section(lightning, "callbacks", "lightning.callbacks")
    snapshot = callbacks.get("metrics_over_trainsteps_checkpoint")
    if isinstance(snapshot, dict):  # its params go to a weights-only ModelCheckpoint
        _check_checkpoint_params(ModelCheckpoint, _section(snapshot, "params", "lightning.callbacks."
                                                           "metrics_over_trainsteps_checkpoint.params", null_ok=True),
                                 "lightning.callbacks.metrics_over_trainsteps_checkpoint.params")
    _check_named_targets({k: v for k, v in callbacks.items() if k != "metrics_over_trainsteps_checkpoint"},
                         "lightning.callbacks")
    _check_named_targets(_section(lightning, "loggers", "lightning.loggers"), "lightning.loggers")
    strategy = lightning.get("strategy")
    if isinstance(strategy, dict):
        check_tree(strategy, "lightning.strategy")


def check_overrides(cfg: DictConfig, overrides: list[str]) -> None:
    """Reject overrides whose key cannot be meant: unknown top-level section or unknown Trainer argument."""
    trainer_args = set(inspect.signature(pl.Trainer.__init__).parameters) - {"self"}
    for token in overrides:
        key = token.split("=", 1)[0].lstrip("+~")
        parts = key.split(".")
        if parts[0] not in TOP_LEVEL_KEYS:
            raise ConfigError(f"override '{token}': unknown top-level key '{parts[0]}'"
                              f"{suggest(parts[0], TOP_LEVEL_KEYS)} (expected one of {', '.join(TOP_LEVEL_KEYS)})")
        if token.startswith("~"):
            continue
        if parts[:2] == ["lightning", "trainer"] and len(parts) == 3 and parts[2] not in trainer_args:
            raise ConfigError(f"override '{token}': '{parts[2]}' is not a pytorch_lightning.Trainer argument"
                              f"{suggest(parts[2], trainer_args)}")
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


def count_devices(devices: Any, accelerator: Any = "auto") -> int:
    """Devices per node from a Trainer ``devices`` value (int, "0,1,2", list, "auto", -1) and its ``accelerator``
    ("auto" or "cpu" with devices "auto" is what Lightning does: one CPU process; every GPU otherwise)."""
    if devices in (None, "auto", -1, "-1"):
        return 1 if accelerator == "cpu" else max(torch.cuda.device_count(), 1)
    if isinstance(devices, str):
        return len([d for d in devices.split(",") if d.strip()]) if "," in devices else int(devices)
    if isinstance(devices, (list, tuple)):
        return len(devices)
    return int(devices)


#: a string value with one of these endings names a weights file, which must exist before anything is built
WEIGHT_SUFFIXES = (".ckpt", ".safetensors", ".bin", ".pt", ".pth")


def _strings(node: Any, key: str) -> Iterator[tuple[str, str]]:
    """``(key path, value)`` of every string in a plain config tree."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _strings(v, f"{key}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _strings(v, f"{key}[{i}]")
    elif isinstance(node, str):
        yield key, node


def preflight(cfg: DictConfig) -> None:
    """Fail fast, before building a 1.3B-parameter model, on a missing weights file or missing GPUs."""
    ckpt = OmegaConf.select(cfg, "model.params.ckpt_path")
    if ckpt and not Path(ckpt).is_file():
        raise ConfigError(
            f"model.params.ckpt_path={ckpt} does not exist. For configs/inpaint.yaml download the SD2 base "
            "checkpoint '512-base-ema.ckpt' (Hugging Face: stabilityai/stable-diffusion-2-base) and put it at "
            f"{ckpt}, or point to it with model.params.ckpt_path=/path/to/512-base-ema.ckpt "
            "(model.params.ckpt_path=null trains from scratch)."
        )
    for key, value in _strings(OmegaConf.to_container(cfg.get("model") or {}, resolve=True), "model"):
        if value.endswith(WEIGHT_SUFFIXES) and not Path(value).is_file():  # a text encoder's or VAE's weights
            raise ConfigError(f"{key}={value}: weights file not found; fix the path or set {key}=null")
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


def default_callbacks(dirs: RunDirs, now: str, cfg: DictConfig, lightning_cfg: DictConfig, seed: int | None,
                      resume: bool, flops_per_sample: float | None,
                      resume_record: dict[str, Any] | None = None) -> dict[str, Any]:
    """ldm's default callbacks plus ours, as target configs keyed by name (``lightning.callbacks`` merges in).

    ``seed`` None: :data:`DEFAULT_SEED` for a new run, the checkpoint's seed on resume. ``resume_record``: a
    resume's command line and config changes, saved beside its config (see :func:`resume_configs`).
    """
    project = OmegaConf.masked_copy(cfg, ["model", "data"])
    setup = {"resume": resume, "now": now, "logdir": str(dirs.logdir), "ckptdir": str(dirs.ckptdir),
             "cfgdir": str(dirs.cfgdir), "config": project, "lightning_config": lightning_cfg}
    if resume_record is not None:
        setup["resume_record"] = resume_record
    return {
        "setup_callback": {"target": "ldm.callbacks.SetupCallback", "params": setup},
        "image_logger": {"target": "ldm.callbacks.ImageLogger", "params": {
            "batch_frequency": 750, "max_images": 4, "clamp": True, "logdir": str(dirs.logdir)}},
        "learning_rate_logger": {"target": "ldm.callbacks.StepLearningRateMonitor",
                                 "params": {"logging_interval": "step"}},
        "cuda_callback": {"target": "ldm.callbacks.CUDACallback"},
        "throughput": {"target": "ldm.callbacks.ThroughputMonitor",
                       "params": {"flops_per_sample": flops_per_sample, "log_every_n_steps": 50}},
        "graceful_stop": {"target": "ldm.callbacks.GracefulStop",
                          "params": {"ckpt_path": str(dirs.ckptdir / "last.ckpt"), "hpc_dir": str(dirs.logdir)}},
        "finite_loss": {"target": "ldm.callbacks.FiniteLossGuard"},
        "grad_norm_guard": {"target": "ldm.callbacks.GradNormGuard"},
        "data_stats": {"target": "ldm.callbacks.DataStatsLogger", "params": {"every_n_steps": 500}},
        "step_seed": {"target": "ldm.callbacks.StepSeed", "params": {
            "seed": DEFAULT_SEED if seed is None else seed, "keep_checkpoint_seed": seed is None}},
    }


def checkpoint_callbacks(dirs: RunDirs, lightning_cfg: DictConfig) -> list[Any]:
    """Full-state checkpoints (resume) plus optional weights-only step snapshots (evaluation).

    Both save at optimizer-step boundaries only and keep every file by default
    (``lightning.modelcheckpoint.params.keep_last_n`` / the snapshot callback's ``params.keep_last_n`` keep only the
    newest n on disk, :mod:`ldm.callbacks.checkpoints`); ``last.ckpt`` is always kept, overwritten in place, and
    holds the final step when training ends.
    """
    params = {"dirpath": str(dirs.ckptdir), "filename": "{step:09}", "save_last": True, "save_top_k": -1,
              "enable_version_counter": False,  # last.ckpt is overwritten in place, also after a resume
              "verbose": True}
    user = OmegaConf.create(lightning_cfg.get("modelcheckpoint") or {})  # absent section: defaults only
    params.update(OmegaConf.to_container(user.get("params") or OmegaConf.create(), resolve=True))
    callbacks = [full_state_checkpoint(hpc_dir=str(dirs.logdir), **params)]
    extra = (lightning_cfg.get("callbacks") or {}).get("metrics_over_trainsteps_checkpoint")
    if extra is not None:
        snap = {"dirpath": str(dirs.ckptdir / "trainstep_checkpoints"), "filename": "{epoch:06}-{step:09}",
                "save_top_k": -1, "every_n_train_steps": 10000, "save_weights_only": True, "verbose": True}
        snap.update(OmegaConf.to_container(extra.get("params", {}) or {}, resolve=True))
        callbacks.append(weight_snapshot_checkpoint(**snap))
    return callbacks


def log_version(dirs: RunDirs, name: str) -> int:
    """The logger version directory: 0 for a new run, the newest existing one for a resume."""
    versions = [int(p.name.split("_", 1)[1]) for p in (dirs.logdir / name).glob("version_*")
                if p.name.split("_", 1)[1].isdigit()]
    return max(versions) if dirs.resume_ckpt is not None and versions else 0


def build_loggers(dirs: RunDirs, lightning_cfg: DictConfig) -> list[Any]:
    """CSV and TensorBoard by default; ``lightning.loggers.<name>`` adds (a target config), tunes a default one
    (``params`` only, merged into its defaults) or removes one (null).

    A resume continues the same CSV and TensorBoard version directory; rows and events at or after the resume
    step (written by the interrupted attempt, and about to be recomputed) are dropped (``purge_step``).
    """
    resumed = {"resume_step": dirs.resume_step} if dirs.resume_step is not None else {}
    specs: dict[str, Any] = {
        "csv": {"target": "ldm.loggers.ResumableCSVLogger", "params": {
            "save_dir": str(dirs.logdir), "name": "csv", "version": log_version(dirs, "csv"), **resumed}},
        "tensorboard": {"target": "pytorch_lightning.loggers.TensorBoardLogger", "params": {
            "save_dir": str(dirs.logdir), "name": "tensorboard", "version": log_version(dirs, "tensorboard"),
            **({"purge_step": dirs.resume_step} if dirs.resume_step is not None else {})}},
    }
    for name, spec in (lightning_cfg.get("loggers") or {}).items():
        if spec is None:
            specs.pop(name, None)
            continue
        if name in specs and "target" not in spec:  # params for a default logger: merged into its defaults
            spec = OmegaConf.merge(specs[name], spec)
        spec = OmegaConf.to_container(spec, resolve=True)
        if name == "wandb":
            spec.setdefault("target", "pytorch_lightning.loggers.WandbLogger")
            spec.setdefault("params", {}).setdefault("save_dir", str(dirs.logdir))
            spec["params"].setdefault("name", dirs.nowname)
            spec["params"].setdefault("id", dirs.nowname)  # same id on resume: the wandb run continues
            spec["params"].setdefault("resume", "allow")
            check_wandb_dir(Path(spec["params"]["save_dir"]))
        specs[name] = spec
    loggers = []
    for name, spec in specs.items():
        if "target" not in spec:
            raise ConfigError(f"lightning.loggers.{name}: no 'target' (every logger but wandb needs one)"
                              f"{suggest(name, ['csv', 'tensorboard', 'wandb'])}")
        check_tree(spec, f"lightning.loggers.{name}")
        loggers.append(instantiate_from_config(spec, where=f"lightning.loggers.{name}"))
    return loggers


def check_wandb_dir(save_dir: Path) -> None:
    """wandb falls back to the node-local /tmp when its folder cannot take files (with a warning among its banner);
    an offline run's data then disappears with the node's /tmp. One line instead, before anything is built."""
    folder = next((p for p in (save_dir, *save_dir.parents) if p.exists()), save_dir)
    try:
        probe_write(folder)
    except OSError as e:
        raise ConfigError(f"lightning.loggers.wandb.params.save_dir={save_dir}: cannot write to {folder} "
                          f"({e.strerror}); wandb would put the run in /tmp instead. Point save_dir at a writable "
                          "folder (default: the run directory)") from None


def _with_logdir(spec: dict[str, Any], logdir: Path) -> dict[str, Any]:
    """Pass the run directory explicitly to a callback that takes ``logdir`` and was not given one."""
    if not isinstance(spec, dict) or not spec.get("target"):
        return spec
    try:
        accepts = "logdir" in inspect.signature(get_obj_from_str(spec["target"])).parameters
    except (ConfigError, TypeError, ValueError):  # a bad target is reported when it is instantiated
        return spec
    if accepts and (spec.get("params") or {}).get("logdir") is None:
        spec = {**spec, "params": {**(spec.get("params") or {}), "logdir": str(logdir)}}
    return spec


def _plain(spec: Any) -> Any:
    return OmegaConf.to_container(spec, resolve=True) if isinstance(spec, DictConfig) else spec


def build_trainer(dirs: RunDirs, now: str, cfg: DictConfig, lightning_cfg: DictConfig, seed: int | None,
                  resume: bool, resume_record: dict[str, Any] | None = None) -> pl.Trainer:
    trainer_kwargs = OmegaConf.to_container(lightning_cfg.get("trainer", {}) or {}, resolve=True)
    devices = count_devices(trainer_kwargs.get("devices", "auto"), trainer_kwargs.get("accelerator", "auto"))
    world = devices * int(trainer_kwargs.get("num_nodes", 1))
    callbacks_cfg = default_callbacks(dirs, now, cfg, lightning_cfg, seed, resume,
                                      lightning_cfg.get("flops_per_sample"), resume_record)
    for name, spec in (lightning_cfg.get("callbacks") or {}).items():
        if name == "metrics_over_trainsteps_checkpoint":
            continue
        if spec is None:
            callbacks_cfg.pop(name, None)
        elif name in callbacks_cfg:
            merged = OmegaConf.merge(callbacks_cfg[name], spec)
            callbacks_cfg[name] = merged
        elif "target" not in spec:  # params for a callback that is not a default: a misspelt name
            raise ConfigError(f"lightning.callbacks.{name}: no default callback has this name"
                              f"{suggest(name, callbacks_cfg)} and it has no 'target'")
        else:
            callbacks_cfg[name] = spec
    callbacks = []
    for name, spec in callbacks_cfg.items():
        spec = _with_logdir(_plain(spec), dirs.logdir)
        if name in (lightning_cfg.get("callbacks") or {}):  # what the user wrote, merged into a default
            check_tree(spec, f"lightning.callbacks.{name}")
        callbacks.append(instantiate_from_config(spec, where=f"lightning.callbacks.{name}"))
    callbacks += checkpoint_callbacks(dirs, lightning_cfg)
    if trainer_kwargs.get("enable_progress_bar", True):
        from ldm.callbacks import StepProgressBar

        callbacks.append(StepProgressBar())
    trainer_kwargs.setdefault("default_root_dir", str(dirs.logdir))
    trainer_kwargs.setdefault("strategy", build_strategy(lightning_cfg, world))
    trainer_kwargs["plugins"] = checkpoint_plugins(trainer_kwargs.get("plugins"))
    return pl.Trainer(callbacks=callbacks, logger=build_loggers(dirs, lightning_cfg), **trainer_kwargs)


def checkpoint_plugins(plugins: Any) -> list[Any]:
    """The user's Trainer plugins plus the atomic, safe-loading CheckpointIO (which may not be replaced)."""
    from pytorch_lightning.plugins.io import CheckpointIO

    plugins = list(plugins or []) if isinstance(plugins, (list, tuple)) or plugins is None else [plugins]
    if any(isinstance(p, CheckpointIO) or "checkpointio" in str(p).lower() for p in plugins):
        raise ConfigError("lightning.trainer.plugins: a CheckpointIO plugin cannot be set; every run saves "
                          "atomically and loads checkpoints without unpickling code (ldm.checkpoint)")
    return [*plugins, atomic_checkpoint_io()]
