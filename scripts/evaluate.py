#!/usr/bin/env python
"""Evaluate one or more inpainting checkpoints on a fixed held-out set with fixed seeded masks.

Images come from a folder (``NAME.jpg`` + optional ``NAME.txt`` caption) or WebDataset shards (``jpg``/``txt``),
resized and centre-cropped to ``--size``. Masks: LaMa thin/medium/thick and SD's 512train-large by default, each
seeded per image, so every checkpoint sees the same holes. Pixel metrics (PSNR/SSIM/L1 inside and outside the hole,
known-region change) always run; FID, LPIPS and CLIP score run when their weight files are given
(docs/EVALUATION.md). Writes ``NAME.json`` per checkpoint, ``comparison.md`` / ``comparison.csv`` and
``grids/KEY_MODE.png`` (input | mask | masked input | each checkpoint).

    python scripts/evaluate.py --config configs/inpaint.yaml \\
        --ckpt step100k=logs/a/checkpoints/step=100000.ckpt --ckpt official=512-inpainting-ema.safetensors \\
        --ckpt-config official=configs/stable-diffusion/v2-inpainting-inference.yaml \\
        --shards "data/val/{00000..00009}.tar" --num-images 500 --out eval/ --steps 50 --scale 7.5
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ldm.defaults import GUIDANCE_SCALE, PRECISION_NAMES


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", action="append", required=True, metavar="[NAME=]PATH",
                   help="checkpoint to evaluate (repeat); NAME defaults to the file stem")
    p.add_argument("--config", required=True, help="model yaml used for every checkpoint without --ckpt-config")
    p.add_argument("--ckpt-config", action="append", default=[], metavar="NAME=YAML",
                   help="a different yaml for one checkpoint (e.g. an eps model next to a v model)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", help="folder of held-out images (+ NAME.txt captions)")
    src.add_argument("--shards", help="WebDataset shard pattern, e.g. 'val/{00000..00009}.tar'")
    p.add_argument("--num-images", type=int, default=None, help="use the first N images")
    p.add_argument("--size", type=int, default=512, help="square evaluation size (multiple of 64)")
    p.add_argument("--masks", nargs="+", default=None,
                   help="mask modes of ldm.data.masks (default: ldm.eval.data.DEFAULT_MASK_MODES, LaMa "
                   "thin/medium/thick 512 and SD 512train-large)")
    p.add_argument("--out", "--outdir", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0, help="seeds masks and sampling")
    p.add_argument("--sampler", default="ddim", help="sampler name, e.g. ddim (default) or dpm (DPM-Solver++ 2M)")
    p.add_argument("--steps", type=int, default=50, help="sampler steps (default 50)")
    p.add_argument("--scale", type=float, default=GUIDANCE_SCALE,
                   help=f"classifier-free guidance scale (default {GUIDANCE_SCALE}; 1 = no guidance)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0 = deterministic)")
    p.add_argument("--precision", choices=PRECISION_NAMES, default="fp32", help="autocast dtype")
    p.add_argument("--paste-back", action="store_true", help="score outputs with the known pixels pasted back")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=None, help="EMA weights (default: auto)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--inception", help="torchvision Inception-v3 weights file -> FID")
    p.add_argument("--lpips-alexnet", help="torchvision AlexNet weights file (with --lpips-heads) -> LPIPS")
    p.add_argument("--lpips-heads", help="LPIPS v0.1 alex.pth linear heads")
    p.add_argument("--clip-weights", help="open_clip weights file -> CLIP score (with --clip-arch)")
    p.add_argument("--clip-arch", default="ViT-B-32", help="open_clip architecture of --clip-weights")
    return p.parse_args(argv)


if __name__ == "__main__":
    parse_args()  # --help and usage errors answer here, before the slow imports below (torch)

from ldm.checkpoint import CheckpointError  # noqa: E402
from ldm.eval.data import DEFAULT_MASK_MODES, fixed_masks, load_folder, load_shards  # noqa: E402
from ldm.eval.feature_metrics import LPIPS, ClipScore, InceptionFeatures  # noqa: E402
from ldm.eval.report import write_grids, write_json, write_tables  # noqa: E402
from ldm.eval.run import CheckpointSpec, FeatureMetrics, evaluate_checkpoint, write_inputs  # noqa: E402
from ldm.inference import SamplingOptions  # noqa: E402

log = logging.getLogger("evaluate")


def _named(items: list[str], flag: str) -> list[tuple[str, str]]:
    out = []
    for item in items:
        name, sep, path = item.partition("=")
        if not sep:
            name, path = Path(item).stem, item
        if not name or not path:
            raise ValueError(f"{flag} {item!r}: expected NAME=PATH or PATH")
        out.append((name, path))
    return out


def checkpoint_specs(args: argparse.Namespace) -> list[CheckpointSpec]:
    ckpts = _named(args.ckpt, "--ckpt")
    names = [n for n, _ in ckpts]
    if len(set(names)) != len(names):
        raise ValueError(f"--ckpt names must be unique, got {names}; use NAME=PATH")
    configs = dict(_named(args.ckpt_config, "--ckpt-config"))
    unknown = set(configs) - set(names)
    if unknown:
        raise ValueError(f"--ckpt-config names {sorted(unknown)} match no --ckpt name ({names})")
    return [CheckpointSpec(n, configs.get(n, args.config), path, args.ema) for n, path in ckpts]


def feature_metrics(args: argparse.Namespace) -> FeatureMetrics:
    feats = FeatureMetrics()
    if args.inception:
        feats.inception = InceptionFeatures(args.inception)
    if args.lpips_alexnet or args.lpips_heads:
        feats.lpips = LPIPS(args.lpips_alexnet, args.lpips_heads)
    if args.clip_weights:
        feats.clip = ClipScore(args.clip_arch, args.clip_weights)
    skipped = [name for name, net in (("FID", feats.inception), ("LPIPS", feats.lpips), ("CLIP score", feats.clip))
               if net is None]
    if skipped:
        log.info("no weight files for %s: skipped (see docs/EVALUATION.md)", ", ".join(skipped))
    return feats


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    out = Path(args.out)
    try:
        if args.size % 64:
            raise ValueError(f"--size {args.size} must be a multiple of 64")
        specs = checkpoint_specs(args)
        options = SamplingOptions(args.sampler, args.steps, args.scale, args.eta, args.precision, args.paste_back)
        feats = feature_metrics(args)
        images = (load_folder(args.images, args.size, args.num_images) if args.images
                  else load_shards(args.shards, args.size, args.num_images))
        masks = {mode: fixed_masks(mode, len(images), args.size, args.seed)
                 for mode in args.masks or DEFAULT_MASK_MODES}
        write_inputs(images, masks, out)
        results = []
        for spec in specs:
            result = evaluate_checkpoint(spec, images, masks, options, out, args.seed, args.device, feats)
            write_json(result, out / f"{spec.name}.json")
            results.append(result)
        md, _ = write_tables(results, out)
        write_grids([s.name for s in specs], [im.key for im in images], list(masks), out)
    except (ValueError, CheckpointError) as e:
        log.error("%s", e)
        return 2
    log.info("wrote %s, %d JSON files and %d grids under %s", md.name, len(results),
             len(images) * len(masks), out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
