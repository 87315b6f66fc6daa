#!/usr/bin/env python
"""One complete full-size training step of the 9-channel SD2 inpainting model, with its peak memory.

    python benchmarks/full_step.py                      # CPU: 512 px, batch 1, fp32, checkpointing (~20 GB)
    python benchmarks/full_step.py --terms mm.json      # compare with benchmarks/memory_model.py's fitted terms
    python benchmarks/full_step.py --no-write           # print only

The model is ``configs/inpaint.yaml`` as configured for training (865 M UNet with activation checkpointing,
the KL VAE, the OpenCLIP ViT-H text encoder, EMA), with random weights in the official shapes. One step is
what training does: caption dropout, VAE encodes of the image and the masked image and the text encode
(frozen, without autograd), the v-loss, backward, fused AdamW (its moments are allocated here, on the first
step), the EMA update. Timed per phase; peak memory is the peak of live tensor storages during the step
(``tensor_memory.TensorMemoryTracker``) plus what was resident before it, and the process's peak RSS.

Memory: about 20 GB on a CPU in fp32 (weights, EMA and AdamW moments of the UNet are 14 GB alone). Run it
on an otherwise idle machine; it checks the free memory first (``--min-free-gib``) and refuses to start
below it.

With ``--terms`` (the JSON ``memory_model.py --json`` writes) the measured peak is compared with the memory
model's prediction for the same setting.
"""

from __future__ import annotations

import argparse
import gc
import logging
import resource
import time
from pathlib import Path
from typing import Any

import common
import torch
import train_step
from flops import flops_from_config

from ldm.util import instantiate_from_config

log = logging.getLogger("bench_full_step")
HEADING = "Full-size step"
INTRO = """Script: `python benchmarks/full_step.py` (see its docstring; needs about 20 GB free). One complete
training step of the full 9-channel model (865 M UNet, VAE, ViT-H text encoder, EMA; random weights, official
shapes) at 512 px on a CPU: caption dropout, two VAE encodes and the text encode, v-loss, backward with
activation checkpointing, fused AdamW (moments allocated on this first step), EMA. Reports the time per phase,
the peak of live tensors (plus what was resident before the step) and the process's peak RSS, and compares
the peak with `benchmarks/memory_model.py`."""


def free_gib() -> float:
    """MemAvailable from /proc/meminfo (GiB); inf where it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("inf")


def build(args: argparse.Namespace, device: torch.device) -> Any:
    torch.manual_seed(0)
    cfg = common.model_config(args.scale, args.config, **{"unet_config.params.use_checkpoint": args.checkpointing})
    return instantiate_from_config(cfg).to(device).train()


def one_step(model: Any, opt: torch.optim.Optimizer, batch: dict[str, Any], bf16: bool,
             device: torch.device) -> dict[str, float]:
    """A training step, timed per phase between device synchronisations (seconds); also used by gpu_profile.py."""
    times: dict[str, float] = {}
    recompute = any(getattr(m, "use_checkpoint", False) for m in model.model.diffusion_model.modules())

    def mark(name: str, t0: float) -> float:
        common.synchronize(device)
        now = time.perf_counter()
        times[name] = now - t0
        return now

    common.synchronize(device)  # work queued before the step is not counted in its first phase
    t = time.perf_counter()
    with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
        b = model.apply_ucg(batch)
        z, cond = model.get_input(b, model.first_stage_key)
        t = mark("encode (2 x VAE, text)", t)
        loss, _ = model(z, cond)
        t = mark("UNet forward + v-loss", t)
    loss.backward()
    t = mark("backward (with recompute)" if recompute else "backward", t)
    opt.step()
    opt.zero_grad(set_to_none=True)
    t = mark("AdamW (fused)", t)
    model.model_ema(model.model)
    mark("EMA", t)
    times["step"] = sum(times.values())
    return times


def run(args: argparse.Namespace, device: torch.device) -> str:
    available = free_gib()
    if device.type == "cpu" and available < args.min_free_gib:
        raise SystemExit(f"full_step: only {available:.1f} GiB available, --min-free-gib is {args.min_free_gib}; "
                         "wait for an idle machine (the step needs about 20 GB on a CPU)")
    t0 = time.perf_counter()
    model = build(args, device)
    params = list(model.trainable_parameters())
    opt = train_step.make_optimizer(params, "fused", model)
    build_s = time.perf_counter() - t0
    batch = common.synthetic_batch(args.batch, args.resolution, device)
    gc.collect()
    resident_before = common.resident_bytes(model, opt)
    log.info("built in %.0f s; resident %.2f GiB; running %d step(s)", build_s, resident_before / 2**30, args.steps)
    steps, peaks = [], []
    for i in range(args.steps):
        resident = common.resident_bytes(model, opt)
        if device.type == "cuda":
            peak = common.peak_step_memory(lambda: steps.append(one_step(model, opt, batch, args.bf16, device)),
                                           device, resident)
        else:
            with common.TensorMemoryTracker() as tracker:
                steps.append(one_step(model, opt, batch, args.bf16, device))
            peak = resident + tracker.peak
        peaks.append(peak)
        log.info("step %d: %.0f s, peak %.2f GiB", i, steps[-1]["step"], peak / 2**30)
    resident_after = common.resident_bytes(model, opt)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    flops = flops_from_config(common.model_config(args.scale, args.config), args.resolution)
    return report(args, device, steps, peaks, resident_before, resident_after, rss, build_s, available, flops)


def report(args: argparse.Namespace, device: torch.device, steps: list[dict[str, float]], peaks: list[int],
           resident_before: int, resident_after: int, rss: int, build_s: float, available: float,
           flops: Any) -> str:
    gib = 2**30
    rows = [[phase, *[f"{s[phase]:.1f}" for s in steps]] for phase in steps[0]]
    heads = ["phase (seconds)", *[f"step {i + 1}" + (" (allocates AdamW moments)" if i == 0 else "")
                                  for i in range(len(steps))]]
    work = flops.training_per_sample() * args.batch
    lines = [
        common.run_header(device).rstrip(),
        f"Scale `{args.scale}`, {args.resolution} px, batch {args.batch}, {'bf16 autocast' if args.bf16 else 'fp32'}, "
        f"activation checkpointing {'on' if args.checkpointing else 'off'}, fused AdamW, foreach EMA. Model built "
        f"in {build_s:.0f} s; {available:.1f} GiB were available before the run; load average "
        f"{common.load_average()} at the end.",
        common.markdown_table(heads, rows),
        common.markdown_table(["memory", "GiB"], [
            ["resident before the first step (weights, EMA, frozen encoders)", f"{resident_before / gib:.2f}"],
            ["resident after it (+ AdamW moments)", f"{resident_after / gib:.2f}"],
            ["**peak of live tensors during step 1** (resident + the step's own)", f"**{peaks[0] / gib:.2f}**"],
            *[[f"peak during step {i + 1}", f"{p / gib:.2f}"] for i, p in enumerate(peaks[1:], 1)],
            ["process peak RSS (tensors + Python, libraries, allocator slack)", f"{rss / gib:.2f}"],
        ]),
        f"Model FLOPs per step: {work / 1e12:.2f} TFLOP ({work / 1e12 / steps[-1]['step']:.3f} TFLOP/s on the "
        "last step; activation checkpointing's recompute is not counted).",
    ]
    if args.terms:
        lines.append(compare_with_model(args, peaks))
    return "\n\n".join(lines)


def compare_with_model(args: argparse.Namespace, peaks: list[int]) -> str:
    """The memory model's components and predicted peaks (step 1, later steps) beside the measured ones."""
    import memory_model as mm

    counts, terms = mm.load_terms(Path(args.terms))
    setting = mm.Setting("this run", args.bf16, args.checkpointing)
    unet_term, enc_term = mm.terms_for(terms, setting)
    first = mm.predict(counts, unet_term, enc_term, setting, args.batch, args.resolution, first_step=True)
    later = mm.predict(counts, unet_term, enc_term, setting, args.batch, args.resolution)
    rows = [[k, f"{v / 2**30:.2f}", "", ""] for k, v in later.items() if k != "peak"]
    rows.append(["**peak, step 1** (moments allocated at its end)", f"**{first['peak'] / 2**30:.2f}**",
                 f"**{peaks[0] / 2**30:.2f}**", f"{peaks[0] / first['peak']:.3f}"])
    if len(peaks) > 1:
        rows.append(["**peak, later steps**", f"**{later['peak'] / 2**30:.2f}**",
                     f"**{max(peaks[1:]) / 2**30:.2f}**", f"{max(peaks[1:]) / later['peak']:.3f}"])
    else:
        rows.append(["peak, later steps (not run)", f"{later['peak'] / 2**30:.2f}", "-", "-"])
    return common.markdown_table(["memory model, same setting", "predicted GiB", "measured GiB",
                                  "measured / predicted"], rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, ...")
    p.add_argument("--config", default=str(common.DEFAULT_CONFIG), help="training config (its model section)")
    p.add_argument("--scale", choices=sorted(common.SCALES), default="full", help="model scale (default full)")
    p.add_argument("--resolution", type=int, default=512, help="image side in px (default 512)")
    p.add_argument("--batch", type=int, default=1, help="samples per step (default 1)")
    p.add_argument("--steps", type=int, default=1, help="steps to run (default 1)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (default fp32)")
    p.add_argument("--no-checkpointing", dest="checkpointing", action="store_false",
                   help="activation checkpointing off (default on, as configs/inpaint.yaml trains)")
    p.add_argument("--terms", help="JSON from `memory_model.py --json`: compare the peak with the model")
    p.add_argument("--min-free-gib", type=float, default=21.0,
                   help="refuse to start on a CPU with less memory available (default 21)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default 1)")
    p.add_argument("--no-write", action="store_true", help="print only; do not add results to docs/BENCHMARKS.md")
    args = p.parse_args(argv)
    if args.batch < 1 or args.steps < 1 or args.resolution % 64:
        p.error("--batch and --steps must be >= 1, --resolution a multiple of 64")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    common.setup(args.threads)
    device = common.resolve_device(args.device)
    text = run(args, device)
    print(text)
    if not args.no_write:
        log.info("added to %s", common.write_results(HEADING, text, INTRO))


if __name__ == "__main__":
    main()
