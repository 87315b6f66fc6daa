"""Checks of a run's data settings made from the config alone, before the model is built or the run directory
written: a wrong shard path or a size mismatch is said in one line (or a warning) instead of after minutes of
building and loading a full-size model.
"""

from __future__ import annotations

import logging
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ldm.util import ConfigError

log = logging.getLogger(__name__)


def check_data(cfg: DictConfig) -> None:
    """Every check of this module, on the merged config of a training run."""
    check_shard_paths(cfg)
    check_image_size(cfg)


def check_image_size(cfg: DictConfig) -> None:
    """Warn when the training crop and ``model.params.image_size`` disagree.

    Training ignores ``image_size`` (the batch decides the latent size), but an export to diffusers writes it as
    the UNet's ``sample_size``, the size a pipeline draws by default. A run that trains at 768 px with the SD2
    value 64 (512 px) would export a pipeline that defaults to the wrong size without a word.
    """
    from ldm.data.transforms import Crop, build_image_transforms

    transforms = OmegaConf.select(cfg, "data.params.train.image_transforms", default=None)
    image_size = OmegaConf.select(cfg, "model.params.image_size", default=None)
    ch_mult = OmegaConf.select(cfg, "model.params.first_stage_config.params.ddconfig.ch_mult", default=None)
    if transforms is None or image_size is None or ch_mult is None:
        return
    ops = build_image_transforms(OmegaConf.to_container(transforms, resolve=True), where="data.params.train")
    crop = next((op.size for op in reversed(ops) if isinstance(op, Crop)), None)
    if crop is None:
        return
    side = crop if isinstance(crop, int) else crop[0] if crop[0] == crop[1] else None
    factor = 2 ** (len(ch_mult) - 1)  # the VAE halves the size at every level but the last
    if side is not None and side != image_size * factor:
        log.warning("model.params.image_size is %d (%d px), but the training crop is %d px: training is unaffected, "
                    "but an export to diffusers writes image_size as the UNet's sample_size, the size its pipeline "
                    "draws by default. Set model.params.image_size=%d", image_size, image_size * factor, side,
                    side // factor)


def check_shard_paths(cfg: DictConfig) -> None:
    """Fail before the model is built and the run directory written when shards the run reads do not exist.

    The WebDataset module checks again when it builds each loader; this earlier check spares a user with a wrong
    shard path the minutes a full-size model takes to build and load, and an empty run directory. The
    validation split counts only when ``lightning.trainer.limit_val_batches`` is not 0 (Lightning's default is
    to validate). A held-out evaluation callback's ``shards`` count while its set is not built yet.
    """
    _check_heldout_source(cfg)
    if not str(OmegaConf.select(cfg, "data.target", default="")).endswith(".WebDataModuleFromConfig"):
        return
    splits = ["train"]
    if OmegaConf.select(cfg, "lightning.trainer.limit_val_batches", default=1.0) != 0:
        splits.append("validation")
    tar_base = OmegaConf.select(cfg, "data.params.tar_base", default=None)
    for split in splits:
        shards = OmegaConf.select(cfg, f"data.params.{split}.shards", default=None)
        if shards is None:
            continue  # no such split (or a required value left unset, reported where it is read)
        _check_pattern(shards, f"data.params.{split}.shards", tar_base)


def _check_pattern(shards: Any, key: str, tar_base: str | None = None) -> None:
    """ConfigError naming ``key`` when none of the local shard files of the pattern (or list) ``shards`` exist."""
    from ldm.data.shards import check_local_shards, expand_shards

    shards = OmegaConf.to_container(shards, resolve=True) if OmegaConf.is_config(shards) else shards
    check_local_shards(expand_shards(shards, tar_base, where=key), shards, key)


def _check_heldout_source(cfg: DictConfig) -> None:
    """A held-out evaluation callback whose set is not built yet needs its ``shards`` (built at the run's start)."""
    from ldm.eval.callback import resolve_set_dir

    for name, spec in (OmegaConf.select(cfg, "lightning.callbacks", default=None) or {}).items():
        if not isinstance(spec, DictConfig) or not str(spec.get("target", "")).endswith(".HeldOutEvaluation"):
            continue
        params = spec.get("params") or {}
        if params.get("shards") is None or "set_dir" not in params:
            continue  # nothing to build the set from (the callback reports a set that cannot be built)
        set_dir = resolve_set_dir(params.set_dir)
        if (set_dir / "set.json").exists():
            continue  # the set exists: its shards are no longer read
        try:
            _check_pattern(params.shards, f"lightning.callbacks.{name}.params.shards")
        except ConfigError as e:
            raise ConfigError(f"{e} (the held-out set {set_dir} is built from them at the "
                              f"start; point it at validation shards of yours, or drop it with ~lightning.callbacks."
                              f"{name})") from None
