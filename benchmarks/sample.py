#!/usr/bin/env python
"""Inpainting sampling speed: seconds per image at 50 DDIM and 20 DPM-Solver++ steps with CFG, fast vs plain.

    python benchmarks/sample.py                  # CPU defaults: small scale, 256 px, 1 image (~2 min)
    python benchmarks/sample.py --device cuda    # GPU defaults: full size, 512 px, 1 image, bf16, compiled
    python benchmarks/sample.py --no-write       # print only

An image is one call of ``ldm.inference.inpaint`` (masked-image encode, prompt and "" text encodes, the
sampler with classifier-free guidance: two UNet evaluations per step, batched, then the VAE decode), on the
model of ``configs/inpaint.yaml`` at the chosen scale with random weights. Two tables:

* whole images, interleaved: the fast path (SDPA, bf16 autocast, channels_last, compiled UNet when compile is
  on) against the plain path (explicit softmax attention, fp32, NCHW, eager), for DDIM-50 and DPM-Solver++-20;
* one guided UNet evaluation (the per-step cost), interleaved, each switch off alone against the fast path.

Target (docs/DECISIONS.md R12): <= 1.0 s per 512 x 512 image at 50 DDIM steps on an A100-class GPU with SDPA + bf16.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import common
import numpy as np
import torch
from flops import ModelFlops, flops_from_config

from ldm.defaults import GUIDANCE_SCALE
from ldm.inference import SamplingOptions, inpaint
from ldm.modules.attention import attention_backend
from ldm.util import instantiate_from_config

log = logging.getLogger("bench_sample")
HEADING = "Sampling"
INTRO = """Script: `python benchmarks/sample.py` (CPU defaults: small scale, 256 px, one image per call, one
thread; `--device cuda`: full size, 512 px, compiled). One image = `ldm.inference.inpaint`: masked-image
encode, text encodes, sampler with classifier-free guidance (two UNet evaluations per step, batched), VAE
decode. Whole images are timed interleaved for the fast path (SDPA, bf16 autocast, channels_last, compiled
UNet when compile is on) and the plain path (explicit softmax attention, fp32, NCHW, eager); one guided UNet
evaluation is timed with each switch off alone. Target (docs/DECISIONS.md R12): <= 1.0 s per 512 x 512 image at
50 DDIM steps on an A100-class GPU."""
SAMPLERS = {"DDIM-50": ("ddim", 50), "DPM-Solver++-20": ("dpm", 20)}


@dataclass(frozen=True)
class Settings:
    """Fast-path switches of one sampling variant."""

    attention: Literal["sdpa", "math"] = "sdpa"
    bf16: bool = True
    channels_last: bool = True
    compile: bool = False


PLAIN = Settings("math", False, False, False)


def step_variants(compile_unet: bool) -> dict[str, Settings]:
    """Variants of the per-step table: the fast path and each switch off alone (on the eager model)."""
    eager = Settings()
    out = {"fast": dataclasses.replace(eager, compile=compile_unet)}
    if compile_unet:
        out["eager"] = eager
    changes = {"math": {"attention": "math"}, "fp32": {"bf16": False}, "nchw": {"channels_last": False}}
    out |= {name: dataclasses.replace(eager, **change) for name, change in changes.items()}
    return out | {"plain": PLAIN}


#: (switch, variant with it on, variant with it off) of the per-step table; "eager" is "fast" without compile
STEP_COMPARISONS = [
    ("all fast paths vs plain", "fast", "plain"),
    ("torch.compile vs eager", "fast", "eager"),
    ("SDPA vs explicit softmax attention", "eager", "math"),
    ("bf16 autocast vs fp32", "eager", "fp32"),
    ("channels_last vs NCHW", "eager", "nchw"),
]


def build(args: argparse.Namespace, s: Settings, device: torch.device) -> Any:
    torch.manual_seed(0)  # the same weights in every instance
    compile_arg = {"backend": args.compile_backend} if s.compile else False
    cfg = common.model_config(args.scale, args.config, use_ema=False, channels_last=s.channels_last,
                              compile_unet=compile_arg)
    return instantiate_from_config(cfg).to(device).eval().requires_grad_(False)


def image_and_mask(size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """An H x W x 3 uint8 image and an H x W {0, 1} mask (1 = hole) from ``ldm.data.synthetic``."""
    from ldm.data.synthetic import synthetic_sample

    sample = synthetic_sample(np.random.default_rng(seed), size, "512train-large", p_drop=0.0)
    image = np.round((sample["jpg"] + 1) * 127.5).astype(np.uint8)
    return image, sample["mask"][..., 0]


def image_fn(model: Any, s: Settings, sampler: str, steps: int,
             args: argparse.Namespace) -> Callable[[], Any]:
    """One inpainted image (or ``args.batch`` of them) with ``sampler`` at ``steps`` steps under ``s``."""
    image, mask = image_and_mask(args.resolution)
    options = SamplingOptions(sampler=sampler, steps=steps, scale=args.guidance,
                              precision="bf16" if s.bf16 else "fp32")

    def run() -> Any:
        with attention_backend(s.attention):
            return inpaint(model, image, mask, "a photograph of a garden", seed=0, num_samples=args.batch,
                           options=options)

    return run


def unet_step_fn(model: Any, s: Settings, args: argparse.Namespace,
                 device: torch.device) -> Callable[[], Any]:
    """One guided evaluation: the UNet on 2 x batch latents (conditional and unconditional halves)."""
    unet = model.model.diffusion_model
    h = args.resolution // 8
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2 * args.batch, unet.in_channels, h, h, generator=g).to(device)  # 2B x 9 x h x w
    t = torch.full((2 * args.batch,), 500, device=device)
    context = model.get_learned_conditioning(["a photograph of a garden", ""] * args.batch)  # 2B x 77 x D

    def run() -> Any:
        autocast = torch.autocast(device.type, torch.bfloat16, enabled=s.bf16)
        with torch.no_grad(), attention_backend(s.attention), autocast:
            return unet(x, t, context=context)

    return run


def run(args: argparse.Namespace, device: torch.device, compile_unet: bool) -> dict[str, dict[str, Any]]:
    """Per-step and whole-image timings (interleaved within each table)."""
    variants = step_variants(compile_unet)
    models: dict[tuple[bool, bool], Any] = {}
    for s in variants.values():
        key = (s.channels_last, s.compile)
        if key not in models:
            log.info("building the model (channels_last=%s, compiled=%s)", *key)
            models[key] = build(args, s, device)
    model_of = {name: models[(s.channels_last, s.compile)] for name, s in variants.items()}
    steps = {name: unet_step_fn(model_of[name], s, args, device) for name, s in variants.items()}
    first = {name: common.timed(steps[name], device) for name, s in variants.items() if s.compile}
    log.info("timing one guided UNet evaluation: %d variants x %d rounds", len(steps), args.step_rounds)
    step_times = common.time_interleaved(steps, args.step_rounds, 2, device)
    images = {}
    for path in ("fast", "plain"):
        for label, (sampler, n) in SAMPLERS.items():
            images[f"{path} {label}"] = image_fn(model_of[path], variants[path], sampler, n, args)
            image_fn(model_of[path], variants[path], sampler, 2, args)()  # warm-up: encoders, decoder
    log.info("timing whole images: %d cases x %d rounds", len(images), args.rounds)
    return {"steps": step_times, "images": common.time_interleaved(images, args.rounds, 0, device),
            "first": first}


def image_table(args: argparse.Namespace, times: dict[str, list[float]], flops: ModelFlops,
                peak: float) -> str:
    rows = []
    for label, (_, n) in SAMPLERS.items():
        fast, plain = times[f"fast {label}"], times[f"plain {label}"]
        tflops = args.batch * flops.sampling_per_image(n) / common.median(fast) / 1e12
        per_image = [f"{common.median(t) / args.batch:.3f}" for t in (fast, plain)]
        rows.append([label, *per_image, f"**{common.paired_ratio(plain, fast):.2f}x**", f"{tflops:.3f}",
                     f"{100 * tflops / peak:.1f}%"])
    headers = ["sampler (CFG)", "s/image fast", "s/image plain", "speed-up", "TFLOP/s fast", "MFU fast"]
    return common.markdown_table(headers, rows)


def step_table(times: dict[str, list[float]]) -> str:
    alias = {} if "eager" in times else {"eager": "fast"}
    rows = []
    for label, on, off in STEP_COMPARISONS:
        on, off = alias.get(on, on), alias.get(off, off)
        if on == off:
            continue
        ms_on, ms_off = 1e3 * common.median(times[on]), 1e3 * common.median(times[off])
        rows.append([label, on, off, f"{ms_on:.1f}", f"{ms_off:.1f}",
                     f"**{common.paired_ratio(times[off], times[on]):.2f}x**"])
    return common.markdown_table(["switch (one guided UNet evaluation)", "on", "off", "ms on", "ms off",
                                  "speed-up"], rows)


def target_line(args: argparse.Namespace, times: dict[str, list[float]], device: torch.device) -> str:
    seconds = common.median(times["fast DDIM-50"]) / args.batch
    if device.type == "cuda" and args.scale == "full" and args.resolution == 512:
        verdict = "meets" if seconds <= 1.0 else "misses"
        return (f"Target check: {seconds:.2f} s per 512 px image at 50 DDIM steps with CFG {verdict} the "
                "<= 1.0 s target (stated for A100-class GPUs).")
    return "The <= 1.0 s target is for the full-size model at 512 px on a GPU; this run's ratios carry over."


def report(args: argparse.Namespace, times: dict[str, dict[str, Any]], compile_unet: bool,
           device: torch.device) -> str:
    flops = flops_from_config(common.model_config(args.scale, args.config), args.resolution)
    peak, source = common.peak_tflops(device, torch.bfloat16)
    first = "".join(f"; first call {t:.0f} s, compile included" for t in times["first"].values())
    compiled = f"on ({args.compile_backend}{first})" if compile_unet else "off"
    return "\n\n".join([
        common.run_header(device).rstrip(),
        f"Scale `{args.scale}`, {args.resolution} px, {args.batch} image(s) per call, guidance scale "
        f"{args.guidance}; compile {compiled}; {args.rounds} rounds of whole images, {args.step_rounds} of "
        f"single evaluations. FLOPs per image: {flops.sampling_per_image(50) / 1e12:.3f} TFLOP (DDIM-50), "
        f"{flops.sampling_per_image(20) / 1e12:.3f} (DPM-20); MFU against {peak:.3f} TFLOP/s ({source}).",
        image_table(args, times["images"], flops, peak),
        step_table(times["steps"]),
        target_line(args, times["images"], device),
    ])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, ...")
    p.add_argument("--config", default=str(common.DEFAULT_CONFIG), help="training config (its model section)")
    p.add_argument("--scale", choices=sorted(common.SCALES), help="default: full on GPU, else small")
    p.add_argument("--resolution", type=int, help="image side in px (default: 512 on GPU, 256 on CPU)")
    p.add_argument("--batch", type=int, default=1, help="images per call (seconds are reported per image)")
    p.add_argument("--guidance", type=float, default=GUIDANCE_SCALE, help="classifier-free guidance scale")
    p.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                   help="compile the fast path's UNet; auto = on for GPUs, off on CPUs (inductor's CPU "
                        "compile of the UNet forward takes about 3 minutes on a 2-core machine)")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend")
    p.add_argument("--rounds", type=int, help="timed rounds of whole images (default: 5 on GPU, 2 on CPU)")
    p.add_argument("--step-rounds", type=int, help="timed rounds of one evaluation (default: 20 GPU, 8 CPU)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default 1, see common.setup)")
    p.add_argument("--no-write", action="store_true", help=f"print only; do not add results to {common.DOC}")
    args = p.parse_args(argv)
    gpu = common.resolve_device(args.device).type == "cuda"
    for key, value in {"scale": "full" if gpu else "small", "resolution": 512 if gpu else 256,
                       "rounds": 5 if gpu else 2, "step_rounds": 20 if gpu else 8}.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if min(args.batch, args.rounds, args.step_rounds) < 1 or args.resolution % 64:
        p.error("--batch, --rounds, --step-rounds must be >= 1 and --resolution a multiple of 64")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    common.setup(args.threads)
    device = common.resolve_device(args.device)
    torch.backends.cudnn.benchmark = True
    compile_unet = args.compile == "on" or (args.compile == "auto" and device.type == "cuda")
    times = run(args, device, compile_unet)
    text = report(args, times, compile_unet, device)
    print(text)
    if not args.no_write:
        log.info("added to %s", common.write_results(HEADING, text, INTRO))


if __name__ == "__main__":
    main()
