#!/usr/bin/env python
"""Inpaint images with an SD2-style inpainting checkpoint (.ckpt or .safetensors) and its yaml config.

Mask convention: white = inpaint; RGBA/LA masks follow the rule of ``ldm.image_io`` (what the mask shows on
black, or its alpha channel when all visible pixels share one colour); a mask of another size than its image
is resized (nearest neighbour) with a warning. Inputs are padded (edge, default) or resized to multiples of 64
and the outputs are brought back to the input size. Writes ``NAME_seed{S}_{k}.png`` per sample and ``NAME_grid.png``
(column headers input | mask | masked input | each sample with its scale; one row per seed, labelled).

    # one image
    python scripts/inpaint.py --config configs/inpaint.yaml --ckpt last.ckpt \\
        --image dog.png --mask dog_mask.png --prompt "a corgi on a bench" --out out/
    # a folder of NAME.png + NAME_mask.png pairs, one prompt per line, 3 seeds x 2 samples, DPM-Solver++
    python scripts/inpaint.py --config configs/inpaint.yaml --ckpt model.safetensors --input-dir pairs/ \\
        --prompts-file prompts.txt --seed 1 2 3 --num-samples 2 --sampler dpm --steps 25 --out out/
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ldm.defaults import GUIDANCE_SCALE, PRECISION_NAMES


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="model yaml (its parameterization is used for sampling)")
    p.add_argument("--ckpt", required=True, help=".ckpt or .safetensors in the official ldm layout")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--image", help="input image (needs --mask)")
    src.add_argument("--input-dir", help="folder of NAME.ext + NAME_mask.ext pairs")
    p.add_argument("--mask", help="mask image for --image (white = inpaint)")
    txt = p.add_mutually_exclusive_group()
    txt.add_argument("--prompt", help="text prompt (may be empty: \"\")")
    txt.add_argument("--prompts-file", help="one prompt for all images, or one line per image in sorted order")
    p.add_argument("--out", "--outdir", required=True, help="output folder")
    p.add_argument("--sampler", default="ddim", help="sampler name, e.g. ddim (default) or dpm (DPM-Solver++ 2M)")
    p.add_argument("--steps", type=int, default=50, help="sampler steps (default 50)")
    p.add_argument("--scale", type=float, default=GUIDANCE_SCALE,
                   help=f"classifier-free guidance scale (default {GUIDANCE_SCALE}; 1 = no guidance)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0 = deterministic)")
    p.add_argument("--seed", type=int, nargs="+", default=[0], help="one or more seeds; each is reproducible")
    p.add_argument("--num-samples", type=int, default=1, help="samples per seed (drawn as one batch)")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=None,
                   help="use EMA weights (default: EMA when the checkpoint has them)")
    p.add_argument("--precision", choices=PRECISION_NAMES, default="fp32", help="autocast dtype")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--paste-back", action="store_true", help="copy the known pixels from the input")
    fit = p.add_mutually_exclusive_group()
    fit.add_argument("--pad", dest="fit", action="store_const", const="pad", help="edge-pad to x64 (default)")
    fit.add_argument("--resize", dest="fit", action="store_const", const="resize", help="resize to x64")
    p.set_defaults(fit="pad")
    p.add_argument("--no-grid", action="store_true", help="do not write NAME_grid.png")
    return p.parse_args(argv)


if __name__ == "__main__":
    parse_args()  # --help and usage errors answer here, before the slow imports below (torch)

import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from ldm.checkpoint import CheckpointError  # noqa: E402
from ldm.data.masks import is_hole  # noqa: E402
from ldm.image_io import find_pairs, load_mask, load_rgb, make_grid, read_prompts, save_png  # noqa: E402
from ldm.inference import SamplingOptions, inpaint, load_model  # noqa: E402
from ldm.util import ConfigError  # noqa: E402

log = logging.getLogger("inpaint")


def gather_inputs(args: argparse.Namespace) -> list[tuple[Path, Path, str]]:
    """``(image, mask, prompt)`` jobs from the arguments; raises ValueError with a fix for bad input."""
    if args.image is not None:
        if args.mask is None:
            raise ValueError("--image needs --mask (white = inpaint)")
        pairs = [(Path(args.image), Path(args.mask))]
    else:
        if args.mask is not None:
            raise ValueError("--mask goes with --image; with --input-dir masks are NAME_mask.ext files")
        pairs = find_pairs(args.input_dir)
    for path in (p for pair in pairs for p in pair):
        if not path.is_file():
            raise ValueError(f"{'mask' if path in {m for _, m in pairs} else 'image'} file not found: {path}")
    if args.prompt is None and args.prompts_file is None:
        raise ValueError("no prompt: pass --prompt TEXT (may be \"\") or --prompts-file FILE")
    prompts = [args.prompt] * len(pairs) if args.prompt is not None else read_prompts(args.prompts_file, len(pairs))
    return [(img, msk, prompt) for (img, msk), prompt in zip(pairs, prompts)]


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        jobs = gather_inputs(args)
        options = SamplingOptions(args.sampler, args.steps, args.scale, args.eta, args.precision, args.paste_back)
        if args.num_samples < 1:
            raise ValueError(f"--num-samples must be >= 1, got {args.num_samples}")
        loaded = load_model(args.config, args.ckpt, use_ema=args.ema, device=args.device)
        out = Path(args.out)
        bar = tqdm(total=len(jobs) * len(args.seed), desc="inpainting", unit="seed")
        for img_path, mask_path, prompt in jobs:
            image = load_rgb(img_path)
            mask = load_mask(mask_path, size=(image.shape[1], image.shape[0]))
            rows = []
            for seed in args.seed:
                samples = inpaint(loaded.model, image, mask, prompt, seed, args.num_samples, options, fit=args.fit)
                for k, sample in enumerate(samples):
                    save_png(sample, out / f"{img_path.stem}_seed{seed}_{k}.png")
                masked = np.where(is_hole(mask)[..., None], 127, image).astype(np.uint8)
                rows.append([image, mask, masked, *samples])
                bar.update(1)
            if not args.no_grid:
                headers = ["input", "mask", "masked input",
                           *(f"sample {k} (scale {args.scale:g})" for k in range(args.num_samples))]
                grid = make_grid(rows, headers=headers, row_labels=[f"seed {s}" for s in args.seed])
                save_png(grid, out / f"{img_path.stem}_grid.png")
        bar.close()
    except (ValueError, ConfigError, CheckpointError) as e:
        log.error("%s", e)
        return 2
    log.info("wrote %d images to %s (%s weights)", len(jobs) * len(args.seed) * args.num_samples, out,
             "EMA" if loaded.used_ema else "raw")
    return 0


if __name__ == "__main__":
    sys.exit(main())
