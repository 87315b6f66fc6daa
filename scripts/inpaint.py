#!/usr/bin/env python
"""Inpaint images with an SD2-style inpainting checkpoint (.ckpt or .safetensors) and its yaml config.

Mask convention: white = inpaint; RGBA/LA masks follow the rule of ``ldm.image_io`` (what the mask shows on
black, or its alpha channel when all visible pixels share one colour); a mask of another size than its image
but the same aspect ratio is resized (nearest neighbour) with a warning, one of another aspect ratio is refused
(stretching would move the hole); a mask with no hole after binarisation at 0.5, or with many grey
pixels below it, is warned about. Inputs are padded (edge, default) or resized to multiples of 64 and the outputs
are brought back to the input size.

Outputs are named after the settings that change the picture, so sweeps into one folder never collide:
``NAME_{SAMPLER}{STEPS}_s{SCALE}[_eta{ETA}][_{PRECISION}][_resize][_pasted]_seed{S}_{k}.png`` per sample (e.g.
``dog_ddim50_s7.5_seed1_0.png``; STEPS is the number of steps the sampler really ran) and ``..._grid.png`` without
the seed (headers input | mask | masked input | each sample; one row per seed). Every PNG also records its prompt,
seed and settings, checkpoint and weights as PNG text (``PIL.Image.open(p).text``). Files that exist already (a
rerun with another prompt or checkpoint) are refused unless ``--overwrite`` is given; every input, the output folder,
the device, the checkpoint path and the step count are checked before the model is loaded.

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
    p.add_argument("--no-grid", action="store_true", help="do not write the NAME_..._grid.png files")
    p.add_argument("--overwrite", action="store_true", help="replace output files that exist already")
    return p.parse_args(argv)


if __name__ == "__main__":
    parse_args()  # --help and usage errors answer here, before the slow imports below (torch)

import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from ldm.checkpoint import CheckpointError, check_checkpoint_path  # noqa: E402
from ldm.data.masks import is_hole  # noqa: E402
from ldm.image_io import find_pairs, load_mask, load_rgb, make_grid, read_prompts, save_png  # noqa: E402
from ldm.inference import (  # noqa: E402
    SamplingOptions,
    check_seeds,
    inpaint,
    load_model,
    resolve_device,
    schedule_length,
)
from ldm.models.diffusion.sampling import check_steps  # noqa: E402
from ldm.paths import output_folder, refuse_existing  # noqa: E402
from ldm.util import ConfigError, load_config  # noqa: E402

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


def settings_tag(options: SamplingOptions, steps_run: int, fit: str) -> str:
    """The part of an output name that says how it was sampled (see the module docstring)."""
    tag = f"{options.sampler}{steps_run}_s{options.scale:g}"
    if options.eta:
        tag += f"_eta{options.eta:g}"
    if options.precision != "fp32":
        tag += f"_{options.precision}"
    if fit != "pad":
        tag += f"_{fit}"
    if options.paste_back:
        tag += "_pasted"
    return tag


def sample_name(stem: str, tag: str, seed: int, k: int) -> str:
    return f"{stem}_{tag}_seed{seed}_{k}.png"


def grid_name(stem: str, tag: str) -> str:
    return f"{stem}_{tag}_grid.png"


def output_names(out: Path, stem: str, tag: str, seeds: list[int], num_samples: int, grid: bool) -> list[Path]:
    """Every file one image's run writes (checked for existing files before the model loads)."""
    names = [out / sample_name(stem, tag, seed, k) for seed in seeds for k in range(num_samples)]
    return names + ([out / grid_name(stem, tag)] if grid else [])


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        # everything the user can get wrong is checked before the model is loaded
        jobs = gather_inputs(args)
        options = SamplingOptions(args.sampler, args.steps, args.scale, args.eta, args.precision, args.paste_back)
        if args.num_samples < 1:
            raise ValueError(f"--num-samples must be >= 1, got {args.num_samples}")
        check_seeds(args.seed)
        if len(set(args.seed)) != len(args.seed):
            raise ValueError(f"--seed {' '.join(map(str, args.seed))}: a seed is repeated")
        out = output_folder(args.out, "--out", {"--input-dir": args.input_dir})
        device = resolve_device(args.device)
        check_checkpoint_path(args.ckpt)
        cfg = load_config([args.config])
        steps_run = check_steps(args.sampler, args.steps, schedule_length(cfg))
        tag = settings_tag(options, steps_run, args.fit)
        refuse_existing([p for img, _, _ in jobs
                         for p in output_names(out, img.stem, tag, args.seed, args.num_samples, not args.no_grid)],
                        args.overwrite)
        for img_path, mask_path, _ in jobs:  # unreadable files and surprising masks are reported now, not midway
            load_mask(mask_path, size=load_rgb(img_path).shape[1::-1])
        loaded = load_model(cfg, args.ckpt, use_ema=args.ema, device=device)
        record = {"sampler": args.sampler, "steps": steps_run, "steps_requested": args.steps,
                  "scale": f"{args.scale:g}", "eta": f"{args.eta:g}", "precision": args.precision, "fit": args.fit,
                  "paste_back": args.paste_back, "checkpoint": args.ckpt, "weights": loaded.weights,
                  "parameterization": loaded.parameterization, "global_step": loaded.global_step}
        bar = tqdm(total=len(jobs) * len(args.seed), desc="inpainting", unit="seed")
        for img_path, mask_path, prompt in jobs:
            image = load_rgb(img_path)
            mask = load_mask(mask_path, size=(image.shape[1], image.shape[0]), check=False)
            rows = []
            for seed in args.seed:
                samples = inpaint(loaded.model, image, mask, prompt, seed, args.num_samples, options, fit=args.fit)
                for k, sample in enumerate(samples):
                    save_png(sample, out / sample_name(img_path.stem, tag, seed, k),
                             text={"prompt": prompt, "seed": str(seed), "sample": str(k), "image": str(img_path),
                                   "mask": str(mask_path), **record})
                masked = np.where(is_hole(mask)[..., None], 127, image).astype(np.uint8)
                rows.append([image, mask, masked, *samples])
                bar.update(1)
            if not args.no_grid:
                names = (f"#{k} s={args.scale:g}" if args.num_samples > 1 else f"s={args.scale:g}"
                         for k in range(args.num_samples))
                grid = make_grid(rows, headers=["input", "mask", "masked input", *names],
                                 row_labels=[f"seed {s}" for s in args.seed])
                save_png(grid, out / grid_name(img_path.stem, tag), text={"prompt": prompt, **record})
        bar.close()
    except (ValueError, ConfigError, CheckpointError) as e:
        log.error("%s", e)
        return 2
    log.info("wrote %d images to %s (%s weights, %s)", len(jobs) * len(args.seed) * args.num_samples, out,
             loaded.weights, tag)
    return 0


if __name__ == "__main__":
    sys.exit(main())
