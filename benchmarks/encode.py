#!/usr/bin/env python
"""Encoder throughput: VAE encodes (images/s) and text encodes (captions/s), fast vs plain settings.

    python benchmarks/encode.py                  # CPU: full-size encoders, 256 px, 1 image / 4 captions
    python benchmarks/encode.py --device cuda    # GPU defaults: full size, 512 px, 16 images / 64 captions
    python benchmarks/encode.py --no-write       # print only

The encoders are the ones of ``configs/inpaint.yaml`` (random weights): the SD2 KL-VAE encoder (incl.
``quant_conv``; the training step runs it twice per sample, ``scripts/precompute_latents.py`` once) and the
OpenCLIP ViT-H-14 text tower up to its penultimate block. Cases run interleaved in one process:

* VAE: bf16 autocast vs fp32, channels_last vs NCHW (its attention always uses SDPA);
* text: bf16 autocast vs fp32.

MFU: model FLOPs from ``benchmarks/flops.py`` against the GPU's dense bf16 peak or a GEMM measured on this CPU.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from typing import Any

import common
import torch
from flops import flops_from_config

from ldm.util import instantiate_from_config

log = logging.getLogger("bench_encode")
HEADING = "Encoders"
INTRO = """Script: `python benchmarks/encode.py` (CPU defaults: the full-size encoders, VAE at 256 px one
image per call, text 4 captions per call, one thread; `--device cuda`: 512 px, 16 images, 64 captions).
Measures the SD2 VAE encoder (incl. `quant_conv`; run twice per training sample online, once per image by
`scripts/precompute_latents.py`) and the OpenCLIP ViT-H-14 text tower (penultimate layer), interleaved:
bf16 autocast vs fp32 for both, channels_last vs NCHW for the VAE. Rates are per second of wall time; MFU
against the GPU's dense bf16 peak or a GEMM measured on this CPU in the same run."""

#: case name -> (encoder, bf16 autocast, channels_last)
CASES = {
    "VAE bf16 channels_last": ("vae", True, True),
    "VAE bf16 NCHW": ("vae", True, False),
    "VAE fp32 channels_last": ("vae", False, True),
    "VAE fp32 NCHW": ("vae", False, False),
    "text bf16": ("text", True, False),
    "text fp32": ("text", False, False),
}
#: (switch, case with it on, case with it off)
COMPARISONS = [
    ("VAE: bf16 + channels_last vs fp32 + NCHW", "VAE bf16 channels_last", "VAE fp32 NCHW"),
    ("VAE: bf16 autocast vs fp32", "VAE bf16 channels_last", "VAE fp32 channels_last"),
    ("VAE: channels_last vs NCHW", "VAE bf16 channels_last", "VAE bf16 NCHW"),
    ("text: bf16 autocast vs fp32", "text bf16", "text fp32"),
]


def build_encoders(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """The VAE (two copies: NCHW and channels_last weights) and the text encoder of the config."""
    params = common.model_config(args.scale, args.config).params
    torch.manual_seed(0)
    vae = instantiate_from_config(params.first_stage_config).to(device).eval().requires_grad_(False)
    torch.manual_seed(0)
    vae_cl = instantiate_from_config(params.first_stage_config).to(device).eval().requires_grad_(False)
    vae_cl.to(memory_format=torch.channels_last)
    text = instantiate_from_config(params.cond_stage_config).to(device).eval().requires_grad_(False)
    return {"vae": vae, "vae_cl": vae_cl, "text": text}


def case_fn(name: str, enc: dict[str, Any], args: argparse.Namespace,
            device: torch.device) -> Callable[[], Any]:
    kind, bf16, channels_last = CASES[name]
    if kind == "vae":
        model = enc["vae_cl" if channels_last else "vae"]
        side = args.resolution
        x = torch.rand(args.batch, 3, side, side, device=device) * 2 - 1  # B x 3 x H x W in [-1, 1]
        x = x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)

        def run() -> Any:
            with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=bf16):
                return model.encode(x).parameters
    else:
        captions = [f"a photograph of object {i} on a wooden table" for i in range(args.captions)]

        def run() -> Any:
            with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=bf16):
                return enc["text"].encode(captions)
    return run


def report(args: argparse.Namespace, times: dict[str, list[float]], flops: dict[str, int],
           device: torch.device) -> str:
    peaks = {bf16: common.peak_tflops(device, torch.bfloat16 if bf16 else torch.float32)
             for bf16 in (True, False)}
    rows = []
    for name, (kind, bf16, _) in CASES.items():
        seconds = common.median(times[name])
        items = args.batch if kind == "vae" else args.captions
        tflops = items * flops[kind] / seconds / 1e12
        rows.append([name, f"{1e3 * seconds:.1f}", f"{items / seconds:.2f}", f"{tflops:.3f}",
                     f"{100 * tflops / peaks[bf16][0]:.1f}%"])
    table = common.markdown_table(["case", "ms per call (median)", "items/s", "TFLOP/s", "MFU"], rows)
    comp = common.markdown_table(
        ["switch", "speed-up (median of rounds)"],
        [[label, f"**{common.paired_ratio(times[off], times[on]):.2f}x**"] for label, on, off in COMPARISONS])
    peak_note = "; ".join(f"{'bf16' if k else 'fp32'}: {v:.3f} TFLOP/s ({src})"
                          for k, (v, src) in peaks.items())
    fast = "VAE bf16 channels_last"
    per_image = common.median(times[fast]) / args.batch
    return "\n\n".join([
        common.run_header(device).rstrip(),
        f"Scale `{args.scale}`; VAE: {args.batch} images of {args.resolution} px per call "
        f"({flops['vae'] / 1e9:.1f} GFLOP each); text: {args.captions} captions per call "
        f"({flops['text'] / 1e9:.2f} GFLOP each); {args.rounds} (VAE) and {args.text_rounds} (text) timed "
        f"rounds after {args.warmup} warm-up.",
        table, comp,
        f"MFU peaks: {peak_note}. Precomputing image latents at this rate (fast VAE case): "
        f"{per_image * 1e6 / 3600:.1f} device-hours per million images at {args.resolution} px.",
    ])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, ...")
    p.add_argument("--config", default=str(common.DEFAULT_CONFIG), help="training config (its model section)")
    p.add_argument("--scale", choices=sorted(common.SCALES), default="full", help="encoder size")
    p.add_argument("--resolution", type=int, help="image side in px (default: 512 on GPU, 256 on CPU)")
    p.add_argument("--batch", type=int, help="images per VAE call (default: 16 on GPU, 1 on CPU)")
    p.add_argument("--captions", type=int, help="captions per text call (default: 64 on GPU, 4 on CPU)")
    p.add_argument("--rounds", type=int, help="timed rounds of the VAE cases (default: 10 on GPU, 4 on CPU)")
    p.add_argument("--text-rounds", type=int,
                   help="timed rounds of the text cases (default: 10 on GPU, 2 on CPU, where a bf16 call of "
                        "the ViT-H text tower takes about 30 s, see docs/BENCHMARKS.md)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default 1, see common.setup)")
    p.add_argument("--no-write", action="store_true", help=f"print only; do not add results to {common.DOC}")
    args = p.parse_args(argv)
    gpu = common.resolve_device(args.device).type == "cuda"
    for key, value in {"resolution": 512 if gpu else 256, "batch": 16 if gpu else 1,
                       "captions": 64 if gpu else 4, "rounds": 10 if gpu else 4,
                       "text_rounds": 10 if gpu else 2}.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    counts = (args.batch, args.captions, args.rounds, args.text_rounds)
    if min(counts) < 1 or args.warmup < 0 or args.resolution % 8:
        p.error("--batch, --captions, --rounds, --text-rounds must be >= 1, --warmup >= 0, "
                "--resolution a multiple of 8")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    common.setup(args.threads)
    device = common.resolve_device(args.device)
    torch.backends.cudnn.benchmark = True
    log.info("building the encoders (scale %s)", args.scale)
    enc = build_encoders(args, device)
    counted = flops_from_config(common.model_config(args.scale, args.config), args.resolution)  # on meta
    flops = {"vae": counted.vae_encoder, "text": counted.text_encoder}
    times = {}
    for kind, rounds in (("vae", args.rounds), ("text", args.text_rounds)):
        cases = {name: case_fn(name, enc, args, device) for name, case in CASES.items() if case[0] == kind}
        log.info("timing %d %s cases x %d rounds (+%d warm-up)", len(cases), kind, rounds, args.warmup)
        times |= common.time_interleaved(cases, rounds, args.warmup, device)
    text = report(args, times, flops, device)
    print(text)
    if not args.no_write:
        log.info("added to %s", common.write_results(HEADING, text, INTRO))


if __name__ == "__main__":
    main()
