#!/usr/bin/env python
"""Add VAE posterior moments of each image to WebDataset shards, so training encodes only the masked image.

    python scripts/precompute_latents.py --config configs/inpaint.yaml --ckpt checkpoints/512-base-ema.ckpt \\
        --shards '/data/laion/train/{00000..99999}.tar' --out /data/laion-latents/train --device cuda

Every input shard ``NAME.tar`` becomes ``OUT/NAME.tar`` with the same samples, in the same order, with every
member unchanged, plus ``<key>.latent_moments.npy``: the VAE encoder's output (``encode(x).parameters``) for
that sample's image, ``8 x h x w`` float16 (channels 0-3 the posterior mean, 4-7 its log-variance; unscaled,
i.e. before ``scale_factor``). Training samples the posterior from these moments as it would online
(``LatentDiffusion.get_input``), which removes one of the two VAE encodes per sample (~1.12 of 4.69 TFLOP at
512 px; docs/DECISIONS.md R10: the step costs ~1.48x the UNet instead of ~1.94x). The masked image is still encoded
online, because masks are drawn fresh every step.

**The crop is fixed.** The image is resized and centre-cropped exactly as the training config's
``image_transforms`` would (a ``RandomCrop`` is run as a ``CenterCrop``; a random flip is refused), and the
latent belongs to that crop. A data config that uses precomputed latents must therefore crop the image the
same way (``CenterCrop``), or the masked image would come from a different crop than the latent. Random-crop
augmentation is lost; a different crop per epoch would need one set of moments per crop.

A ``latent_moments.json`` next to the shards records the resize and crop (``ops``), image key, VAE config,
checkpoint and dtype. The training loader finds it beside the shards, refuses at start-up a split whose
transforms differ from the recorded ones, and then delivers the moments with every sample (``ldm.data.latents``;
the split key ``latent_moments`` overrides the lookup). Samples whose image cannot be decoded are copied without
moments; the loader skips them (``missing_latents``). ``--rank``/``--world-size`` split the shard list for
parallel runs (shard ``i`` goes to rank ``i % world_size``).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: VAE compute precisions this script offers (mapped to autocast dtypes below)
PRECISION_NAMES = ("fp32", "bf16")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="training config: model.params.first_stage_config and "
                   "data.params.train.image_transforms are used")
    p.add_argument("--ckpt", help="checkpoint with first_stage_model.* (VAE) weights")
    p.add_argument("--random-vae", action="store_true", help="allow a randomly initialised VAE (tests only)")
    p.add_argument("--shards", nargs="+", required=True, help="input shard patterns ({00000..00099} braces)")
    p.add_argument("--out", "--outdir", type=Path, required=True, help="output folder (shard file names are kept)")
    p.add_argument("--size", type=int, help="resize + centre crop to this side instead of the config's")
    p.add_argument("--image-key", default="jpg", help="image member extension")
    p.add_argument("--batch-size", type=int, default=32, help="images per VAE call")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, ...")
    p.add_argument("--precision", choices=PRECISION_NAMES, default="fp32", help="VAE compute precision")
    p.add_argument("--rank", type=int, default=0, help="this process's part of the shard list")
    p.add_argument("--world-size", type=int, default=1, help="number of parallel processes")
    p.add_argument("--overwrite", action="store_true", help="redo shards whose output exists")
    args = p.parse_args(argv)
    if args.batch_size < 1 or args.world_size < 1 or not 0 <= args.rank < args.world_size:
        p.error("--batch-size and --world-size must be >= 1 and 0 <= --rank < --world-size")
    return args


if __name__ == "__main__":
    parse_args()  # --help and usage errors answer here, before the slow imports below (torch)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import webdataset as wds  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from ldm.checkpoint import load_state_dict_file  # noqa: E402
from ldm.data.decode import decode_image  # noqa: E402
from ldm.data.latents import MEMBER, SIDECAR, op_spec  # noqa: E402
from ldm.data.transforms import Crop, ImageOp, Resize, build_image_transforms, to_float_hwc  # noqa: E402
from ldm.data.webdata import expand_shards  # noqa: E402
from ldm.inference import resolve_device  # noqa: E402
from ldm.paths import output_folder  # noqa: E402
from ldm.util import ConfigError, instantiate_from_config, load_config  # noqa: E402

log = logging.getLogger("precompute_latents")
PRECISIONS = dict(zip(PRECISION_NAMES, (None, torch.bfloat16)))


@dataclass
class Counts:
    """Samples written with moments and copied without (undecodable image)."""

    encoded: int = 0
    copied: int = 0


def deterministic_transforms(configs: Sequence[Any] | None, size: int | None) -> list[ImageOp]:
    """The training ``image_transforms`` with every random crop made a centre crop (see module docstring).

    ``size`` (or a config without transforms) means ``Resize(size, bicubic)`` + ``CenterCrop(size)``, the
    deterministic version of configs/inpaint.yaml's train transforms.
    """
    if size is not None or not configs:
        if size is None:
            raise ConfigError("the config has no data.params.train.image_transforms; pass --size")
        configs = [{"target": "torchvision.transforms.Resize", "params": {"size": size, "interpolation": 3}},
                   {"target": "torchvision.transforms.CenterCrop", "params": {"size": size}}]
    out: list[ImageOp] = []
    for op in build_image_transforms(configs, where="data.params.train"):
        if isinstance(op, Crop):
            out.append(Crop(op.size, random=False))
        elif isinstance(op, Resize):
            out.append(op)
        else:
            raise ConfigError(f"image transform {op} is random or unknown; precomputed latents need a fixed "
                              "resize and crop (Resize + RandomCrop/CenterCrop), or pass --size")
    return out


def load_vae(config: Any, ckpt: str | None, allow_random: bool, device: torch.device) -> torch.nn.Module:
    """The config's ``first_stage_config`` with the ``first_stage_model.*`` weights of ``ckpt``."""
    vae = instantiate_from_config(config.model.params.first_stage_config)
    if ckpt is None:
        if not allow_random:
            raise ConfigError("--ckpt is required (a checkpoint with first_stage_model.* weights); "
                              "--random-vae is for tests only")
        log.warning("no --ckpt: the VAE has RANDOM weights; these moments are only good for tests")
    else:
        prefix = "first_stage_model."
        sd = {k[len(prefix):]: v for k, v in load_state_dict_file(ckpt).items() if k.startswith(prefix)}
        if not sd:
            raise ConfigError(f"{ckpt} holds no '{prefix}*' tensors; pass an SD checkpoint with the VAE")
        vae.load_state_dict(sd, strict=True)
    return vae.to(device).eval().requires_grad_(False)


def prepare(sample: dict[str, Any], image_key: str, ops: list[ImageOp]) -> np.ndarray | None:
    """H x W x 3 float32 in [-1, 1] after the fixed resize and crop, or None if the image is unusable."""
    data = sample.get(image_key)
    if not isinstance(data, bytes):
        return None
    try:
        img = decode_image(data)
        for op in ops:
            img = op(img, np.random.default_rng(0))  # no op draws: crops are centred
    except Exception as e:  # corrupt or too small: copied without moments
        log.warning("%s %s: %s: %s", sample.get("__url__"), sample.get("__key__"), type(e).__name__, e)
        return None
    return to_float_hwc(img)


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


@torch.no_grad()
def encode(vae: torch.nn.Module, images: list[np.ndarray], device: torch.device,
           dtype: torch.dtype | None) -> list[bytes]:
    """``.npy`` bytes of the float16 ``8 x h x w`` moments of each H x W x 3 image."""
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).to(device)  # B x 3 x H x W
    with torch.autocast(device.type, dtype or torch.bfloat16, enabled=dtype is not None):
        moments = vae.encode(x).parameters  # B x 8 x h x w
    moments = moments.float().cpu().numpy().astype(np.float16)
    return [npy_bytes(m) for m in moments]


def _flush(pending: list[tuple[dict[str, Any], np.ndarray | None]], sink: wds.TarWriter, vae: torch.nn.Module,
           device: torch.device, dtype: torch.dtype | None, counts: Counts) -> None:
    """Encode the pending images and write the pending samples, in order."""
    images = [x for _, x in pending if x is not None]
    moments = iter(encode(vae, images, device, dtype) if images else [])
    for sample, x in pending:
        out = {k: v for k, v in sample.items() if not k.startswith("__")}  # every member, unchanged
        out["__key__"] = sample["__key__"]
        if x is not None:
            out[MEMBER] = next(moments)
            counts.encoded += 1
        else:
            out.pop(MEMBER, None)  # a stale member from an earlier run would not match this image
            counts.copied += 1
        sink.write(out)
    pending.clear()


def process_shard(url: str, out_path: Path, vae: torch.nn.Module, ops: list[ImageOp], image_key: str,
                  device: torch.device, dtype: torch.dtype | None, batch_size: int) -> Counts:
    """Write ``out_path``: the samples of ``url`` plus their moments (atomically, via a temporary file)."""
    counts = Counts()
    tmp = out_path.with_name(out_path.name + ".tmp")
    dataset = wds.WebDataset(url, shardshuffle=False, nodesplitter=None, empty_check=False)
    pending: list[tuple[dict[str, Any], np.ndarray | None]] = []
    with wds.TarWriter(str(tmp)) as sink:
        for sample in dataset:
            pending.append((sample, prepare(sample, image_key, ops)))
            if sum(x is not None for _, x in pending) >= batch_size:
                _flush(pending, sink, vae, device, dtype, counts)
        _flush(pending, sink, vae, device, dtype, counts)
    os.replace(tmp, out_path)
    return counts


def shard_name(url: str) -> str:
    name = url.rstrip().rstrip("-").rstrip().split("/")[-1]
    if not name.endswith(".tar"):
        raise ValueError(f"cannot name the output for shard URL {url!r}: it does not end in <name>.tar")
    return name


def metadata(args: argparse.Namespace, cfg: Any, ops: list[ImageOp]) -> dict[str, Any]:
    meta = {
        "member": MEMBER, "dtype": "float16",
        "layout": "8 x h x w: posterior mean (channels 0-3) and log-variance (4-7), before scale_factor",
        "ops": [op_spec(op) for op in ops],  # what the training loader checks its split against
        "transforms": [repr(op) for op in ops], "image_key": args.image_key, "precision": args.precision,
        "ckpt": args.ckpt, "first_stage_config": OmegaConf.to_container(cfg.model.params.first_stage_config),
        "source_shards": args.shards, "created": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    return json.loads(json.dumps(meta))  # as it reads back


#: what decides the stored moments; an --out computed with other values is not extended
DECIDING = ("ops", "image_key", "ckpt", "first_stage_config", "precision")


def check_existing(out: Path, meta: dict[str, Any], overwrite: bool) -> None:
    """Refuse to add shards to an ``--out`` whose existing shards were computed otherwise (without --overwrite
    they would be kept, and the new ``latent_moments.json`` would describe them wrongly)."""
    path = out / SIDECAR
    if overwrite or not path.is_file():
        return
    old = json.loads(path.read_text())
    changed = [k for k in DECIDING if old.get(k) != meta[k]]
    if changed:
        raise ConfigError(f"{path}: the shards in {out} were computed with other {', '.join(changed)}; pass "
                          "--overwrite to recompute them all, or choose a new --out")


def write_metadata(out: Path, meta: dict[str, Any]) -> None:
    tmp = out / f".{SIDECAR}.tmp"
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, out / SIDECAR)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        device = resolve_device(args.device)
        output_folder(args.out, "--out")
        cfg = load_config([args.config])
        train = OmegaConf.select(cfg, "data.params.train", default=None)
        has_transforms = train is not None and "image_transforms" in train
        transforms = OmegaConf.to_container(train.image_transforms) if has_transforms else None
        ops = deterministic_transforms(transforms, args.size)
        vae = load_vae(cfg, args.ckpt, args.random_vae, device)
        urls = expand_shards(args.shards)[args.rank::args.world_size]
        names = [shard_name(u) for u in urls]
        meta = metadata(args, cfg, ops)
        check_existing(args.out, meta, args.overwrite)
    except (ConfigError, ValueError) as e:
        log.error("error: %s", e)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    if args.rank == 0:
        write_metadata(args.out, meta)
    total = Counts()
    for url, name in zip(urls, names):
        target = args.out / name
        if target.exists() and not args.overwrite:
            log.info("%s exists, skipped (--overwrite to redo)", target)
            continue
        t0 = time.perf_counter()
        counts = process_shard(url, target, vae, ops, args.image_key, device, PRECISIONS[args.precision],
                               args.batch_size)
        total.encoded, total.copied = total.encoded + counts.encoded, total.copied + counts.copied
        log.info("%s: %d encoded, %d copied without moments, %.1f images/s", target, counts.encoded,
                 counts.copied, counts.encoded / max(time.perf_counter() - t0, 1e-9))
    log.info("done: %d shards, %d samples with moments, %d without", len(urls), total.encoded, total.copied)
    return 0


if __name__ == "__main__":
    sys.exit(main())
