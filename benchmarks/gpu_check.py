#!/usr/bin/env python
"""The one GPU check: full-size training step and DDIM sampling on one GPU, one table, in under 8 minutes.

    benchmarks/gpu_check.sh                  # on an H100 / H200 / A100 (the wrapper adds a time limit)
    python benchmarks/gpu_check.py --dry-run # the same code on a CPU with the tiny model, in seconds

What it runs, in this order (so that a time limit cuts the least important rows):

1. build the full 9-channel model of ``configs/inpaint.yaml`` on the GPU (random weights), channels_last,
   fused AdamW;
2. the training step at 8 samples per GPU, 512 px, bf16 autocast, SDPA, no activation checkpointing (retried
   with checkpointing if it runs out of memory), eager: with online encoders (2 VAE encodes + text per
   sample) and with precomputed image latents (1 encode);
3. 50-step DDIM inpainting with classifier-free guidance at 512 px, eager, ``--sample-batch`` images per call;
4. ``torch.compile`` (inductor) of the UNet and of the VAE encoder, then the two training rows again; the
   first call, which compiles, is reported separately;
5. if the time budget (``--budget-s``) allows, DDIM sampling with the compiled UNet (a second compile: no
   autograd, another batch size).

Each row is printed as soon as it is measured, and the table is printed again at the end (also after an
interrupt: ``gpu_check.sh`` sends SIGINT at its time limit). MFU is model FLOPs (``benchmarks/flops.py``:
4.69 TFLOP per training sample at 512 px with online encoders, 3.57 with a precomputed image latent) over the
GPU's dense bf16 peak. Peak memory is ``torch.cuda.max_memory_allocated`` over the timed steps of a row: all
tensors on the GPU (weights, EMA, AdamW moments, gradients, activations); reserved adds the allocator's cache.
Targets (docs/BENCHMARKS.md): >= 40% MFU, >= 84 samples/s per H100 (27 per A100) with online encoders,
< 40 GB at 8 per GPU; <= 1.0 s per DDIM-50 image on an A100-class GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import logging
import sys
import time
from collections.abc import Callable
from typing import Any

import common
import sample
import torch
import train_step
from flops import flops_from_config

from ldm.util import instantiate_from_config

log = logging.getLogger("bench_gpu_check")
HEADING = "GPU check"
INTRO = """Script: `benchmarks/gpu_check.sh` (`python benchmarks/gpu_check.py --dry-run` runs the same code on a
CPU with the tiny model). One table: the full-size training step at 8 samples per GPU, 512 px, bf16, SDPA,
channels_last, fused AdamW, eager and compiled, with online encoders and with precomputed image latents
(samples/s, MFU against 4.69 / 3.57 TFLOP per sample, peak memory), and 50-step DDIM sampling with CFG at
512 px (images/s). Targets: >= 40% MFU and >= 84 samples/s per H100 with online encoders, < 40 GB at 8 per
GPU, <= 1.0 s per DDIM-50 image on an A100-class GPU."""
HEADERS = ["case", "s per call (median)", "samples or images/s", "model TFLOP per sample", "MFU",
           "peak GiB (allocated)", "peak GiB (reserved)", "notes"]


class Model:
    """The built model and its fused AdamW (what ``train_step.step_fn`` expects of an instance)."""

    def __init__(self, args: argparse.Namespace, device: torch.device) -> None:
        torch.manual_seed(0)
        cfg = common.model_config(args.scale, args.config, channels_last=True,
                                  **{"unet_config.params.use_checkpoint": False})
        try:  # initialise on the GPU: a CPU init of 1.3 B parameters takes longer than the check's budget allows
            with torch.device(device):
                self.model = instantiate_from_config(cfg)
        except Exception as e:  # noqa: BLE001 - any failure of the on-device build falls back to the CPU build
            log.warning("building on %s failed (%s); building on the CPU instead", device, e)
            self.model = instantiate_from_config(cfg)
        self.model = self.model.to(device).train()
        self.opt = train_step.make_optimizer(list(self.model.model.parameters()), "fused", self.model)

    def optimizer(self, kind: str) -> torch.optim.Optimizer:
        if kind != "fused":
            raise ValueError("the GPU check uses the fused AdamW only")
        return self.opt


class Check:
    """Runs the cases, keeps the rows, prints each one as it comes."""

    def __init__(self, args: argparse.Namespace, device: torch.device) -> None:
        self.args, self.device = args, device
        self.rows: list[list[str]] = []
        self.notes: list[str] = []
        self.t0 = time.perf_counter()
        self.peak_tflops, self.peak_source = common.peak_tflops(device, torch.bfloat16)
        self.flops = flops_from_config(common.model_config(args.scale, args.config), args.resolution)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def add(self, row: list[str]) -> None:
        self.rows.append(row)
        print("| " + " | ".join(row) + " |", flush=True)

    def memory_reset(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)

    def memory(self, fn: Callable[[], Any], resident: int) -> tuple[str, str]:
        """(allocated, reserved) peak GiB over the calls made since ``memory_reset``; CPU: live tensors of one
        more call of ``fn`` (its eager run)."""
        if self.device.type == "cuda":
            return (f"{torch.cuda.max_memory_allocated(self.device) / 2**30:.1f}",
                    f"{torch.cuda.max_memory_reserved(self.device) / 2**30:.1f}")
        return f"{common.peak_step_memory(fn, self.device, resident) / 2**30:.2f}", "-"

    def time_calls(self, fn: Callable[[], Any], warmup: int, rounds: int) -> list[float]:
        for _ in range(warmup):
            fn()
        return common.time_interleaved({"case": fn}, rounds, 0, self.device)["case"]

    # ------------------------------------------------------------------------------------------ training
    def train_row(self, m: Model, batch: dict[str, Any], compiled: bool, precomputed: bool) -> None:
        args = self.args
        label = f"train, {'compiled' if compiled else 'eager'}, " + (
            "precomputed image latents" if precomputed else "online encoders")
        s = train_step.Settings(compile=compiled, precomputed=precomputed)
        note = ""
        for checkpointing in (False, True):
            s = dataclasses.replace(s, checkpointing=checkpointing)
            fn = train_step.step_fn(m, s, batch, self.device)
            self.memory_reset()
            try:
                if compiled and not precomputed:
                    first = common.timed(fn, self.device)
                    note = f"first call (compile) {first:.0f} s"
                times = self.time_calls(fn, args.warmup, args.rounds)
                break
            except torch.OutOfMemoryError:
                m.opt.zero_grad(set_to_none=True)
                if checkpointing:
                    self.add([label, "-", "-", "-", "-", "OOM", "-", "out of memory also with checkpointing"])
                    return
                note = "OOM without activation checkpointing; this row is with it"
        seconds = common.median(times)
        per_sample = self.flops.training_per_sample(precomputed_image_latent=precomputed)
        rate = args.batch / seconds
        mfu = rate * per_sample / 1e12 / self.peak_tflops
        resident = common.resident_bytes(m.model, m.opt)
        alloc, reserved = self.memory(fn, resident) if not (compiled and self.device.type != "cuda") else ("-", "-")
        self.add([label, f"{seconds:.3f}", f"**{rate:.1f}**", f"{per_sample / 1e12:.3g}", f"**{100 * mfu:.1f}%**",
                  alloc, reserved, note])

    # ------------------------------------------------------------------------------------------ sampling
    def sample_row(self, m: Model, compiled: bool) -> None:
        args = self.args
        ns = argparse.Namespace(resolution=args.resolution, guidance=7.5, batch=args.sample_batch)
        settings = sample.Settings(compile=compiled)
        m.model.eval()
        try:
            fn = sample.image_fn(m.model, settings, "ddim", args.sample_steps, ns)
            self.memory_reset()
            note = ""
            if compiled:
                note = f"first call (compile) {common.timed(fn, self.device):.0f} s"
            times = self.time_calls(fn, 0 if compiled else 1, args.sample_rounds)
            alloc, reserved = self.memory(lambda: None, 0) if self.device.type == "cuda" else ("-", "-")
        finally:
            m.model.train()
        seconds = common.median(times)
        per_image = self.flops.sampling_per_image(args.sample_steps)
        rate = args.sample_batch / seconds
        mfu = rate * per_image / 1e12 / self.peak_tflops
        mode = "compiled" if compiled else "eager"
        label = f"DDIM-{args.sample_steps} + CFG, {args.sample_batch} images/call, {mode}"
        self.add([label, f"{seconds:.3f}", f"**{rate:.2f}** ({seconds / args.sample_batch:.2f} s/image)",
                  f"{per_image / 1e12:.3g} per image", f"{100 * mfu:.1f}%", alloc, reserved, note])

    # ------------------------------------------------------------------------------------------- report
    def table(self) -> str:
        args, device = self.args, self.device
        gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (dry run)"
        header = (f"{gpu}: scale `{args.scale}`, {args.resolution} px, {args.batch} samples per step, bf16 autocast, "
                  f"SDPA, channels_last, fused AdamW, foreach EMA; {args.warmup} warm-up + {args.rounds} timed steps "
                  f"per row; compile backend {args.compile_backend}. MFU against {self.peak_tflops:.3g} TFLOP/s "
                  f"({self.peak_source}). Total time {self.elapsed():.0f} s.")
        return "\n\n".join([common.run_header(device).rstrip(), header,
                            common.markdown_table(HEADERS, self.rows), *self.notes])


def run(check: Check) -> int:
    """All cases; a case that fails gets an error row (traceback on stderr) and the others still run.
    Returns 1 if any case failed."""
    args, device = check.args, check.device
    print("| " + " | ".join(HEADERS) + " |\n|" + "---|" * len(HEADERS), flush=True)
    t0 = time.perf_counter()
    m = Model(args, device)
    check.notes.append(f"Model built in {time.perf_counter() - t0:.0f} s.")
    batch = common.synthetic_batch(args.batch, args.resolution, device)
    failed = 0

    def case(label: str, fn: Callable[[], None]) -> None:
        nonlocal failed
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - reported in the table and in the exit status
            log.exception("%s failed", label)
            check.add([label, "-", "-", "-", "-", "-", "-", f"**failed**: {type(e).__name__}: {str(e)[:200]}"])
            failed = 1
            m.opt.zero_grad(set_to_none=True)

    case("train, eager, online encoders", lambda: check.train_row(m, batch, compiled=False, precomputed=False))
    case("train, eager, precomputed", lambda: check.train_row(m, batch, compiled=False, precomputed=True))
    case("DDIM sampling, eager", lambda: check.sample_row(m, compiled=False))
    # static shapes: training (batch 8) and guided sampling (batch 16, no autograd) get a graph each
    m.model.model.diffusion_model.compile(backend=args.compile_backend, dynamic=False)
    # the frozen VAE encoder too (model.params.compile_first_stage_encoder): 2.6x faster on an H200
    m.model.first_stage_model.encoder.compile(backend=args.compile_backend, dynamic=False)
    case("train, compiled, online encoders", lambda: check.train_row(m, batch, compiled=True, precomputed=False))
    case("train, compiled, precomputed", lambda: check.train_row(m, batch, compiled=True, precomputed=True))
    if check.elapsed() < args.budget_s:
        case("DDIM sampling, compiled", lambda: check.sample_row(m, compiled=True))
    else:
        check.notes.append(f"Compiled sampling skipped: {check.elapsed():.0f} s used of the {args.budget_s} s budget.")
    return failed


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true",
                   help="CPU, tiny model, 64 px, batch 2, one round, compile backend 'eager': checks the code")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cuda, cuda:1, cpu")
    p.add_argument("--config", default=str(common.DEFAULT_CONFIG), help="training config (its model section)")
    p.add_argument("--scale", choices=sorted(common.SCALES), default="full")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--batch", type=int, default=8, help="training samples per step (default 8)")
    p.add_argument("--rounds", type=int, default=10, help="timed training steps per row (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    p.add_argument("--sample-batch", type=int, default=8, help="images per sampling call (default 8)")
    p.add_argument("--sample-steps", type=int, default=50, help="DDIM steps (default 50)")
    p.add_argument("--sample-rounds", type=int, default=2, help="timed sampling calls (default 2)")
    p.add_argument("--compile-backend", default="inductor")
    p.add_argument("--budget-s", type=float, default=330.0,
                   help="skip the compiled-sampling row when this many seconds have passed (default 330)")
    p.add_argument("--threads", type=int, help="torch intra-op threads on a CPU (default 1)")
    p.add_argument("--no-write", action="store_true", help="print only; do not add results to docs/BENCHMARKS.md")
    args = p.parse_args(argv)
    if args.dry_run:
        args.device, args.config = "cpu", str(common.REPO / "configs" / "tiny" / "inpaint.yaml")
        args.resolution, args.batch = 64, 2
        args.rounds, args.warmup, args.sample_batch, args.sample_rounds = 1, 0, 1, 1
        args.compile_backend = "eager"
    counts = (args.batch, args.rounds, args.sample_batch, args.sample_steps, args.sample_rounds)
    if min(counts) < 1 or args.resolution % 64:
        p.error("batch sizes, rounds and steps must be >= 1, --resolution a multiple of 64")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    common.setup(args.threads)
    device = common.resolve_device(args.device)
    if device.type != "cuda" and not args.dry_run:
        log.warning("no CUDA device: running the full-size check on %s will take very long (use --dry-run)", device)
    torch.backends.cudnn.benchmark = True  # as training (lightning.trainer.benchmark: true)
    check = Check(args, device)
    status = 0
    try:
        status = run(check)
    except KeyboardInterrupt:  # gpu_check.sh's time limit: report what was measured
        check.notes.append(f"**Interrupted after {check.elapsed():.0f} s**; the rows above are complete.")
        status = 124
    text = check.table()
    print("\n" + text, flush=True)
    if not args.no_write and not args.dry_run:
        log.info("added to %s", common.write_results(HEADING, text, INTRO))
    return status


if __name__ == "__main__":
    sys.exit(main())
