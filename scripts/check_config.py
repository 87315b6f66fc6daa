#!/usr/bin/env python
"""Build the model of any config on the ``meta`` device (no weights, no memory) and report on it.

Prints the parameter count of each component and checks that every other ``target`` in the config imports
and accepts its ``params``. With ``--keys-tsv OUT`` it writes ``key<TAB>shape`` for the whole state dict in the
format of the reference manifests (header ``key\tshape``; shape comma-separated, empty for scalars).

    python scripts/check_config.py configs/stable-diffusion/v2-inpainting-inference.yaml --keys-tsv keys.tsv
    python scripts/check_config.py configs/stable-diffusion/v2-inpainting-inference.yaml model.params.use_ema=true
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="+", help="yaml config(s), merged in order, then key=value overrides")
    p.add_argument("--keys-tsv", type=Path, help="write key<TAB>shape lines of the full state dict here")
    return p.parse_args(argv)


if __name__ == "__main__":
    parse_args()  # --help and usage errors answer here, before the slow imports below

import torch  # noqa: E402
from omegaconf import DictConfig, ListConfig, OmegaConf  # noqa: E402

from ldm.run import check_sections  # noqa: E402
from ldm.util import ConfigError, check_params, get_obj_from_str, instantiate_from_config, load_config  # noqa: E402

log = logging.getLogger("check_config")
COMPONENTS = (("unet", "model.diffusion_model"), ("vae", "first_stage_model"), ("text", "cond_stage_model"))


def iter_targets(node: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """Yield (dotted path, node) for every mapping with a ``target`` key."""
    if isinstance(node, DictConfig):
        if "target" in node:
            yield path, node
        for k in node:
            yield from iter_targets(node[k], f"{path}.{k}" if path else str(k))
    elif isinstance(node, ListConfig):
        for i, v in enumerate(node):
            yield from iter_targets(v, f"{path}[{i}]")


def check_other_targets(cfg: DictConfig) -> list[str]:
    """Import every non-model target and check its params' keys (without building it)."""
    checked = []
    for path, node in iter_targets(cfg):
        if path == "model" or path.startswith("model."):
            continue
        obj = get_obj_from_str(node.target)
        params = node.get("params", None)
        if params is not None:
            check_params(obj, OmegaConf.to_container(params, resolve=True), where=f"{path}.params")
        checked.append(f"{path}: {node.target}")
    return checked


def check_image_logger(cfg: DictConfig, model: torch.nn.Module) -> None:
    """The ImageLogger's ``log_images_kwargs`` against the model's ``log_images`` (as main.py does at start-up)."""
    where = "lightning.callbacks.image_logger.params"
    kwargs = OmegaConf.select(cfg, f"{where}.log_images_kwargs")
    if kwargs is None or not hasattr(model, "check_log_images_kwargs"):
        return
    try:
        model.check_log_images_kwargs(OmegaConf.to_container(kwargs, resolve=True))
    except ConfigError as e:
        raise ConfigError(f"{where}.{e}") from None


def build_on_meta(model_cfg: DictConfig) -> torch.nn.Module:
    model_cfg = model_cfg.copy()
    if (model_cfg.get("params") or {}).get("ckpt_path"):  # params may be absent or null
        log.info("ignoring model.params.ckpt_path=%s (meta build has no weights)", model_cfg.params.ckpt_path)
        model_cfg.params.ckpt_path = None
    with torch.device("meta"):
        return instantiate_from_config(model_cfg, where="model")


def shape_str(t: torch.Tensor) -> str:
    return ",".join(str(d) for d in t.shape)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    files = [c for c in args.config if "=" not in c]
    overrides = [c for c in args.config if "=" in c]
    try:
        cfg = load_config(files, overrides)
        check_sections(cfg)  # every key and value against its constructor, before any build
        if "model" not in cfg:
            raise ConfigError(f"{files}: no top-level 'model' section")
        t0 = time.perf_counter()
        model = build_on_meta(cfg.model)
        others = check_other_targets(cfg)
        check_image_logger(cfg, model)
    except ConfigError as e:
        log.error("error: %s", e)
        return 2
    log.info("built %s on meta in %.2fs", cfg.model.target, time.perf_counter() - t0)
    total = sum(p.numel() for p in model.parameters())
    for name, attr in COMPONENTS:
        sub = model
        for part in attr.split("."):
            sub = getattr(sub, part, None)
        if sub is not None:
            log.info("  %-5s %-24s %15s params", name, attr, f"{sum(p.numel() for p in sub.parameters()):,}")
    log.info("  total %-24s %15s params", "", f"{total:,}")
    for line in others:
        log.info("  ok    %s", line)
    sd = model.state_dict()
    log.info("state dict: %d keys", len(sd))
    if args.keys_tsv:
        args.keys_tsv.parent.mkdir(parents=True, exist_ok=True)
        lines = ["key\tshape"] + [f"{k}\t{shape_str(v)}" for k, v in sd.items()]
        args.keys_tsv.write_text("\n".join(lines) + "\n")
        log.info("wrote %s", args.keys_tsv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
