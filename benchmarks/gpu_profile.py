#!/usr/bin/env python
"""Where the full-size eager training step spends its time on one GPU (the follow-up to ``gpu_check.py``).

    python benchmarks/gpu_profile.py                 # on a GPU: phase table, batch scaling, top CUDA ops
    python benchmarks/gpu_profile.py --dry-run       # the same code on a CPU with the tiny model

Three views of the step that ``gpu_check.py`` times (bf16 autocast, SDPA, channels_last, fused AdamW, foreach
EMA, online encoders):

1. phases, each timed between device synchronisations: the encoders (``get_input``: VAE encode of image and
   masked image, text encoder), forward + loss, backward, optimizer step, EMA update;
2. the whole step at several batch sizes: if samples/s grows with the batch, the step is bound by launch
   overhead or small kernels rather than by the GPU's arithmetic;
3. ``torch.profiler``: the operators with the most device time over a few steps.

Printed only (``--out FILE`` also writes the text); record conclusions in docs/BENCHMARKS.md by hand.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

import common
import full_step
import torch
import train_step
from gpu_check import Model

log = logging.getLogger("bench_gpu_profile")


def phases(m: Model, batch: dict, device: torch.device, rounds: int) -> dict[str, float]:
    """Median seconds of each phase of the step (``full_step.one_step``), over ``rounds`` steps after one warm-up."""
    runs = [full_step.one_step(m.model, m.opt, batch, True, device) for _ in range(rounds + 1)][1:]
    return {k: common.median([r[k] for r in runs]) for k in runs[0] if k != "step"}


def encoder_variants(m: Model, device: torch.device, resolution: int, n: int, rounds: int,
                     compile_too: bool, say) -> None:
    """The VAE encode of ``n`` images (what the step does twice) in other layouts/precisions, timed in turns,
    with each variant's latent mean compared with the configured one (relative max difference)."""
    import copy

    vae = m.model.first_stage_model
    x = torch.randn(n, 3, resolution, resolution, device=device).clamp(-1, 1)
    xcl = x.contiguous(memory_format=torch.channels_last)
    variants = {"as configured (NCHW, fp32 weights, autocast)": (vae, x)}
    cl = copy.deepcopy(vae).to(memory_format=torch.channels_last)
    variants["channels_last"] = (cl, xcl)
    variants["channels_last + bf16 weights"] = (copy.deepcopy(cl).to(torch.bfloat16), xcl)
    if compile_too:
        comp = copy.deepcopy(cl)
        comp.encoder = torch.compile(comp.encoder, dynamic=False)
        variants["channels_last + compiled encoder"] = (comp, xcl)

    def call(v, inp):
        def f():
            with torch.no_grad(), torch.autocast(device.type, torch.bfloat16):
                return v.encode(inp).mean
        return f

    fns = {k: call(*v) for k, v in variants.items()}
    ref = fns[next(iter(fns))]().float()
    diffs = {}
    for k, f in fns.items():
        t0 = time.perf_counter()
        out = f().float()
        diffs[k] = ((out - ref).abs().max() / ref.abs().max()).item()
        say(f"first call of {k}: {time.perf_counter() - t0:.1f} s")
    times = common.time_interleaved(fns, rounds, 1, device)
    base = common.median(times[next(iter(times))])
    say(f"\n| VAE encode of {n} images at {resolution} px | ms | speed-up | rel. max diff |\n|---|---|---|---|")
    for k, t in times.items():
        say(f"| {k} | {1e3 * common.median(t):.1f} | {base / common.median(t):.2f}x | {diffs[k]:.1e} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="tiny model on the CPU at 64 px")
    p.add_argument("--batches", default="4,8,16", help="batch sizes for the scaling rows (default 4,8,16)")
    p.add_argument("--rounds", type=int, default=5, help="timed steps per measurement (default 5)")
    p.add_argument("--top", type=int, default=25, help="profiler rows (default 25)")
    p.add_argument("--out", help="also write the text here")
    p.add_argument("--encoders", action="store_true", help="only the VAE-encode variants (layout, precision)")
    p.add_argument("--compile", action="store_true", help="with --encoders: also the compiled encoder")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.backends.cudnn.benchmark = True  # as gpu_check.py and training (lightning.trainer.benchmark: true)
    device = torch.device("cpu" if args.dry_run or not torch.cuda.is_available() else "cuda")
    ns = argparse.Namespace(scale="small" if args.dry_run else "full", config=str(common.DEFAULT_CONFIG))
    resolution = 64 if args.dry_run else 512
    m = Model(ns, device)
    lines: list[str] = []

    def say(text: str) -> None:
        lines.append(text)
        print(text, flush=True)

    say(f"device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, {resolution} px, "
        f"torch {torch.__version__}")
    if args.encoders:
        encoder_variants(m, device, resolution, 16, args.rounds, args.compile, say)
        return 0
    batch = common.synthetic_batch(8, resolution, device)
    ph = phases(m, batch, device, args.rounds)
    total = sum(ph.values())
    say("\n| phase (batch 8) | ms | share |\n|---|---|---|")
    for k, v in ph.items():
        say(f"| {k} | {1e3 * v:.1f} | {100 * v / total:.0f}% |")
    say(f"| sum | {1e3 * total:.1f} | |")

    say("\n| batch | s per step | samples/s |\n|---|---|---|")
    for n in (int(x) for x in args.batches.split(",")):
        b = common.synthetic_batch(n, resolution, device)
        fn = train_step.step_fn(m, train_step.Settings(), b, device)
        try:
            t = [common.timed(fn, device) for _ in range(args.rounds + 1)][1:]
        except torch.OutOfMemoryError:
            say(f"| {n} | OOM | |")
            m.opt.zero_grad(set_to_none=True)
            continue
        say(f"| {n} | {common.median(t):.3f} | {n / common.median(t):.1f} |")

    fn = train_step.step_fn(m, train_step.Settings(), batch, device)
    acts = [torch.profiler.ProfilerActivity.CPU] + (
        [torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(3):
            fn()
        common.synchronize(device)
    key = "cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    say("\n" + prof.key_averages().table(sort_by=key, row_limit=args.top, max_name_column_width=60))
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
