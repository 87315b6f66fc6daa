#!/usr/bin/env python
"""Evaluate inpainting checkpoints the way the SD2 model card and the inpainting literature do.

Every checkpoint runs at every guidance scale (``--scales``) on every mask preset (``--masks``: LaMa thin, medium,
thick and SD's 512train-large by default) on the same held-out images, masks, captions and seeds. Pixel metrics
inside and outside the hole always run; FID (standard Inception weights), LPIPS and CLIP score run when their
weight files are given (docs/EVALUATION.md). Writes ``NAME.json`` per checkpoint, ``comparison.md`` /
``comparison.csv`` (checkpoint x scale x preset), ``curves/fid_vs_clip_PRESET.png`` and labelled
``grids/KEY_PRESET.png``. Samples are kept and reused, so a killed run continues where it stopped.

The model-card protocol for two checkpoints (add ``torchrun --nproc-per-node=K`` in front to shard the images
across K GPUs):

    python scripts/evaluate.py --config configs/inpaint.yaml \\
        --ckpt step100k=logs/a/checkpoints/step=100000.ckpt --ckpt official=512-inpainting-ema.safetensors \\
        --ckpt-config official=configs/stable-diffusion/v2-inpainting-inference.yaml \\
        --shards "data/val/{00000..00009}.tar" --num-images 1000 --out eval/ \\
        --scales 1.5 2 3 4 5 6 7 8 --steps 50 --sampler ddim \\
        --inception weights/weights-inception-2015-12-05-6726825d.pth \\
        --lpips-alexnet weights/alexnet-owt-7be5be79.pth \\
        --clip-arch ViT-H-14 --clip-weights weights/open_clip_vit_h14_laion2b_s32b_b79k.bin
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path

from ldm.defaults import GUIDANCE_SCALE, PRECISION_NAMES

#: pooled Inception layers for FID (``ldm.eval.feature_metrics.FID_DIMS``; written out so --help needs no torch)
FID_DIMS = (64, 192, 768, 2048)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", action="append", required=True, metavar="[NAME=]PATH",
                   help="checkpoint to evaluate (repeat); NAME defaults to the file stem")
    p.add_argument("--config", required=True, help="model yaml used for every checkpoint without --ckpt-config")
    p.add_argument("--ckpt-config", action="append", default=[], metavar="NAME=YAML",
                   help="a different yaml for one checkpoint (e.g. an eps model next to a v model)")
    p.add_argument("--ckpt-weights", action="append", default=[], metavar="NAME=ema|raw",
                   help="the weights of one checkpoint, over --ema: name one file twice to compare its EMA and raw "
                        "weights in one run (--ckpt e=F --ckpt r=F --ckpt-weights e=ema --ckpt-weights r=raw)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", help="folder of held-out images (+ NAME.txt captions)")
    src.add_argument("--shards", help="WebDataset shard pattern, e.g. 'val/{00000..00009}.tar'")
    p.add_argument("--num-images", type=int, default=None,
                   help="use the first N readable images; fewer available is an error (see --allow-fewer-images)")
    p.add_argument("--allow-fewer-images", action="store_true",
                   help="evaluate on the images there are when fewer than --num-images are readable (logged; "
                        "n and n_requested are both recorded)")
    p.add_argument("--size", type=int, default=512, help="square evaluation size (multiple of 64)")
    p.add_argument("--masks", nargs="+", default=None,
                   help="mask modes of ldm.data.masks (default: ldm.eval.data.DEFAULT_MASK_MODES, LaMa "
                   "thin/medium/thick 512 and SD 512train-large)")
    p.add_argument("--out", "--outdir", required=True, help="output folder (samples are kept and reused here)")
    p.add_argument("--seed", type=int, default=0, help="seeds masks and sampling")
    p.add_argument("--sampler", default="ddim", help="sampler name, e.g. ddim (default) or dpm (DPM-Solver++ 2M)")
    p.add_argument("--steps", type=int, default=50, help="sampler steps (default 50)")
    p.add_argument("--scales", "--scale", type=float, nargs="+", default=[GUIDANCE_SCALE],
                   help=f"classifier-free guidance scales, each a full run (default {GUIDANCE_SCALE}; the model "
                   "card sweeps 1.5 2 3 4 5 6 7 8)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0 = deterministic)")
    p.add_argument("--precision", choices=PRECISION_NAMES, default="fp32", help="autocast dtype")
    p.add_argument("--paste-back", action="store_true", help="score outputs with the known pixels pasted back")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=None, help="EMA weights (default: auto)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ... (torchrun: cuda:LOCAL_RANK)")
    p.add_argument("--grid-images", type=int, default=8, help="labelled grids for the first N images")
    m = p.add_argument_group("feature metrics (local weight files; docs/EVALUATION.md)")
    m.add_argument("--inception", help="standard FID Inception weights (weights-inception-2015-12-05-6726825d.pth)")
    m.add_argument("--fid-dims", type=int, choices=FID_DIMS, default=2048,
                   help="Inception features for FID: 2048 is the standard FID; 64/192/768 are reported as "
                        "fid_<D>d (cheap smoke runs, comparable with nothing published)")
    m.add_argument("--fid-torchvision", metavar="PATH",
                   help="ALSO report fid_torchvision with torchvision's Inception-v3 file (not comparable with "
                        "published FIDs)")
    m.add_argument("--lpips-alexnet", help="torchvision AlexNet weights (alexnet-owt-7be5be79.pth) -> LPIPS")
    m.add_argument("--clip-weights", help="open_clip weights file -> CLIP score (with --clip-arch)")
    m.add_argument("--clip-arch", default="ViT-H-14",
                   help="open_clip architecture of --clip-weights (a model name or a model-config .json)")
    return p.parse_args(argv)


if __name__ == "__main__":
    parse_args()  # --help and usage errors answer here, before the slow imports below (torch)

from ldm.checkpoint import check_checkpoint_path  # noqa: E402
from ldm.data.masks import get_mask_generator  # noqa: E402
from ldm.eval.data import (  # noqa: E402
    DEFAULT_MASK_MODES,
    SkipLog,
    fixed_masks,
    load_folder,
    load_shards,
    require_count,
)
from ldm.eval.feature_metrics import (  # noqa: E402
    LPIPS,
    ClipScore,
    InceptionFeatures,
    TorchvisionInceptionFeatures,
    clip_arch,
    require_weights,
)
from ldm.eval.report import write_curves, write_grids, write_json, write_tables  # noqa: E402
from ldm.eval.run import CheckpointSpec, Evaluation, FeatureMetrics, Protocol  # noqa: E402
from ldm.eval.shard import Shard, close_shard, init_shard  # noqa: E402
from ldm.inference import check_seeds, resolve_device, schedule_length  # noqa: E402
from ldm.models.diffusion.sampling import check_steps  # noqa: E402
from ldm.paths import output_folder  # noqa: E402

log = logging.getLogger("evaluate")


def _named(items: list[str], flag: str) -> list[tuple[str, str]]:
    out = []
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or Path(item).exists():  # an existing path wins: checkpoint names contain '=' (step=...)
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
    weights: dict[str, bool] = {}
    for item in args.ckpt_weights:
        name, _, choice = item.partition("=")
        if choice not in ("ema", "raw"):
            raise ValueError(f"--ckpt-weights {item!r}: expected NAME=ema or NAME=raw")
        if name not in names:
            raise ValueError(f"--ckpt-weights {item!r}: {name!r} matches no --ckpt name ({names})")
        weights[name] = choice == "ema"
    return [CheckpointSpec(n, configs.get(n, args.config), path, weights.get(n, args.ema)) for n, path in ckpts]


def feature_metrics(args: argparse.Namespace, shard: Shard) -> FeatureMetrics:
    dev = shard.device
    feats = FeatureMetrics(
        inception=InceptionFeatures(args.inception, dev, args.fid_dims) if args.inception else None,
        inception_tv=TorchvisionInceptionFeatures(args.fid_torchvision, dev) if args.fid_torchvision else None,
        lpips=LPIPS(args.lpips_alexnet, dev) if args.lpips_alexnet else None,
        clip=ClipScore(args.clip_arch, args.clip_weights, dev) if args.clip_weights else None,
    )
    skipped = [name for name, net in (("FID", feats.inception), ("LPIPS", feats.lpips), ("CLIP score", feats.clip))
               if net is None]
    if skipped and shard.is_main:
        log.warning("no weight files for %s: skipped (see docs/EVALUATION.md)", ", ".join(skipped))
    return feats


def make_protocol(args: argparse.Namespace) -> Protocol:
    return Protocol(tuple(args.scales), args.sampler, args.steps, args.eta, args.precision, args.paste_back,
                    args.seed)


def check_args(args: argparse.Namespace) -> list[CheckpointSpec]:
    """Validate the whole protocol before any image is read, any checkpoint hashed or any network loaded:
    sizes, counts, scales, sampler settings at every scale, DDIM steps against every model config, mask
    presets, and that every file named exists. Returns the checkpoint specs."""
    output_folder(args.out, "--out", {"--images": args.images})
    resolve_device(args.device)  # a device this machine lacks fails here, not after loading a model
    check_seeds([args.seed])
    if args.size < 64 or args.size % 64:
        raise ValueError(f"--size {args.size}: must be a positive multiple of 64")
    if args.steps < 1 or args.grid_images < 0:
        raise ValueError(f"--steps must be >= 1 and --grid-images >= 0, got {args.steps} and {args.grid_images}")
    if args.num_images is not None and args.num_images < 1:
        raise ValueError(f"--num-images {args.num_images}: must be >= 1")
    if args.allow_fewer_images and args.num_images is None:
        raise ValueError("--allow-fewer-images needs --num-images (without it every readable image is used)")
    if len(set(args.scales)) != len(args.scales):
        raise ValueError(f"--scales {args.scales}: repeated scale")
    bad = [s for s in args.scales if not math.isfinite(s) or s < 0]
    if bad:
        raise ValueError(f"--scales {bad}: guidance scales must be finite and >= 0 (1 = no guidance)")
    protocol = make_protocol(args)
    for scale in args.scales:
        protocol.options(scale)  # sampler name, eta rule, precision
    modes = args.masks or list(DEFAULT_MASK_MODES)
    if len(set(modes)) != len(modes):
        raise ValueError(f"--masks {modes}: repeated preset")
    for mode in modes:
        get_mask_generator(mode)  # an unknown name lists the valid ones
    specs = checkpoint_specs(args)
    for spec in specs:
        check_checkpoint_path(spec.ckpt)
    for length in sorted({schedule_length(spec.config) for spec in specs}):
        check_steps(args.sampler, args.steps, length)  # a step count the sampler refuses fails before loading
    for flag, value, what in (("--inception", args.inception, "FID"),
                              ("--fid-torchvision", args.fid_torchvision, "FID (torchvision variant)"),
                              ("--lpips-alexnet", args.lpips_alexnet, "LPIPS"),
                              ("--clip-weights", args.clip_weights, "CLIP score")):
        if value is not None:
            require_weights(value, what, flag)
    if args.clip_weights:
        clip_arch(args.clip_arch)
    if args.images and not Path(args.images).is_dir():
        raise ValueError(f"--images {args.images}: folder not found")
    return specs


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    shard = None
    try:
        specs = check_args(args)  # everything checkable before reading images or loading networks
        shard = init_shard(args.device)
        if not shard.is_main:
            logging.getLogger().setLevel(logging.WARNING)
        out = Path(args.out)
        feats = feature_metrics(args, shard)  # a wrong weight file stops here, before any checkpoint is hashed
        skips = SkipLog()  # reported in every NAME.json and under the tables
        images = (load_folder(args.images, args.size, args.num_images, skips) if args.images
                  else load_shards(args.shards, args.size, args.num_images, skips))
        require_count(images, args.num_images, skips, f"--images {args.images}" if args.images
                      else f"--shards {args.shards}", "--allow-fewer-images", args.allow_fewer_images)
        if feats.inception is not None and len(images) < 2:
            raise ValueError(f"--inception: FID needs at least 2 images, the held-out set has {len(images)}")
        masks = {mode: fixed_masks(mode, len(images), args.size, args.seed)
                 for mode in args.masks or DEFAULT_MASK_MODES}
        results = Evaluation(images, masks, make_protocol(args), out, feats, shard, skips, args.num_images).run(specs)
        if shard.is_main:
            for result in results:
                write_json(result, out / f"{result['name']}.json")
            md, _ = write_tables(results, out)
            curves = write_curves(results, out, feats.inception.column if feats.inception else "fid")
            grids = write_grids(results, [im.key for im in images[: args.grid_images]], list(masks), out, args.seed)
            log.info("wrote %s, %d JSON files, %d curves and %d grids under %s", md.name, len(results),
                     len(curves), len(grids), out)
        shard.barrier()
    except ValueError as e:  # includes ConfigError, CheckpointError, MissingWeightsError and WeightsFileError
        log.error("%s", e)
        return 2
    finally:
        if shard is not None:
            close_shard(shard)
    return 0


if __name__ == "__main__":
    sys.exit(main())
