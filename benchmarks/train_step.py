#!/usr/bin/env python
"""Training-step throughput of the 9-channel inpainting model: samples/s, MFU, peak memory, fast vs plain.

    python benchmarks/train_step.py                # CPU: small scale, 256 px, batch 2, all variants (~2 min)
    python benchmarks/train_step.py --device cuda  # GPU: full size, 512 px, batch 8, fast and fast-ckpt
    python benchmarks/train_step.py --device cuda --variants eager,math,fp32   # a GPU ablation
    python benchmarks/train_step.py --no-write     # print only

One step is what ``LatentDiffusion.training_step`` does (text dropout, VAE encodes of the image and the
masked image, text encode, noise, UNet forward, v-loss) plus backward, AdamW step and EMA update; Lightning's
loop and logging are left out. The model is ``configs/inpaint.yaml`` at the chosen scale (see
``benchmarks/common.py``) with random weights.

Variants run side by side, interleaved (see ``common.time_interleaved``); each fast-path switch is compared
with the same step with only that switch off, on the eager model:

=======================  ===================================================================================
variant                  what differs from "fast, eager" (SDPA, bf16 autocast, channels_last, fused AdamW,
                         foreach EMA, no checkpointing, image latent encoded online)
=======================  ===================================================================================
fast                     + ``torch.compile`` of the UNet (same as "fast, eager" when compile is off)
eager                    "fast, eager" itself (listed only when compile is on)
math                     explicit softmax attention instead of SDPA
fp32                     no autocast
nchw                     contiguous (NCHW) instead of channels_last
ckpt                     + activation checkpointing of every ResBlock and transformer block
precomputed              image latent from precomputed VAE moments (``latent_moments``): one encode, not two
fast-ckpt                "fast" + activation checkpointing (the memory lever at full size)
plain                    all switches off: math attention, fp32, NCHW, eager, for-loop AdamW, reference EMA
=======================  ===================================================================================

MFU counts model FLOPs (``benchmarks/flops.py``: 3 x UNet forward + VAE encodes + text; no recompute) against the
GPU's dense bf16 peak, or on a CPU against a GEMM measured in the same run. The optimizer and the EMA update
are also timed alone (fused / foreach / for-loop AdamW; foreach / reference EMA).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import common
import torch
from flops import ModelFlops, flops_from_config

from ldm.modules.attention import BasicTransformerBlock, attention_backend
from ldm.modules.diffusionmodules.openaimodel import ResBlock
from ldm.util import instantiate_from_config

log = logging.getLogger("bench_train_step")
HEADING = "Training step"
INTRO = """Script: `python benchmarks/train_step.py` (CPU defaults: small scale, 256 px, batch 2, one
thread; `--device cuda` for the full-size run, see "GPU" below). One step = text dropout, VAE encodes of
image and masked image, text encode, UNet forward, v-loss, backward, AdamW step, EMA update. Variants run
interleaved in one process; each fast-path switch is compared with the same eager step with only that switch
off, and the speed-up is the median of the per-round time ratios. MFU counts model FLOPs (`benchmarks/flops.py`:
3 x UNet forward + 2 VAE encodes + text) against the GPU's dense bf16 peak, or on a CPU against a GEMM
measured in the same run. Peak memory: the CUDA allocator's peak, or on a CPU the peak of live tensor
storages; both include parameters, EMA and optimizer state.

Targets (docs/DECISIONS.md R12): >= 40% MFU of all model FLOPs (4.69 TFLOP/sample at 512 px) and < 40 GB at 8
samples per GPU for the full 9-channel model in bf16."""


@dataclass(frozen=True)
class Settings:
    """Fast-path switches of one variant."""

    attention: Literal["sdpa", "math"] = "sdpa"
    bf16: bool = True
    channels_last: bool = True
    compile: bool = False
    checkpointing: bool = False
    precomputed: bool = False
    optimizer: Literal["fused", "foreach", "for-loop"] = "fused"
    ema: Literal["foreach", "reference"] = "foreach"


EAGER = Settings()
PLAIN = Settings("math", False, False, False, False, False, "for-loop", "reference")


def variants(compile_unet: bool) -> dict[str, Settings]:
    """Variant name -> settings (see the module docstring)."""
    fast = dataclasses.replace(EAGER, compile=compile_unet)
    out = {"fast": fast, "plain": PLAIN}
    if compile_unet:
        out["eager"] = EAGER
        out["fast-ckpt"] = dataclasses.replace(fast, checkpointing=True)
    plain_one = {"math": {"attention": "math"}, "fp32": {"bf16": False}, "nchw": {"channels_last": False},
                 "ckpt": {"checkpointing": True}, "precomputed": {"precomputed": True}}
    out |= {name: dataclasses.replace(EAGER, **change) for name, change in plain_one.items()}
    return out


#: (switch, variant with the switch on, variant with it off); the speed-up is time(off) / time(on)
COMPARISONS = [
    ("all fast paths together", "fast", "plain"),
    ("torch.compile (inductor) vs eager", "fast", "eager"),
    ("SDPA vs explicit softmax attention", "eager", "math"),
    ("bf16 autocast vs fp32", "eager", "fp32"),
    ("channels_last vs NCHW", "eager", "nchw"),
    ("activation checkpointing on vs off", "ckpt", "eager"),
    ("precomputed image latents vs online encode", "precomputed", "eager"),
]


def set_checkpointing(unet: torch.nn.Module, on: bool) -> None:
    """Activation checkpointing of every ResBlock and transformer block on/off (the UNet's use_checkpoint)."""
    for module in unet.modules():
        if isinstance(module, ResBlock):
            module.use_checkpoint = on
        elif isinstance(module, BasicTransformerBlock):
            module.checkpoint = on


def make_optimizer(params: list[torch.nn.Parameter], kind: str, model: Any) -> torch.optim.AdamW:
    """AdamW with the model's hyper-parameters and the chosen kernel (fused, foreach, per-tensor loop)."""
    kernel = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for-loop": {"foreach": False}}[kind]
    return torch.optim.AdamW(params, lr=1e-4, betas=model.adam_betas, eps=model.adam_eps,
                             weight_decay=model.weight_decay, **kernel)


class Instance:
    """One built model (memory layout and compilation are fixed at build time) with its optimizers."""

    def __init__(self, args: argparse.Namespace, channels_last: bool, compiled: bool,
                 device: torch.device) -> None:
        torch.manual_seed(0)  # every instance starts from the same weights
        compile_arg = {"backend": args.compile_backend} if compiled else False
        cfg = common.model_config(args.scale, args.config, channels_last=channels_last,
                                  compile_unet=compile_arg)
        self.model = instantiate_from_config(cfg).to(device).train()
        self.optimizers: dict[str, torch.optim.AdamW] = {}

    def optimizer(self, kind: str) -> torch.optim.AdamW:
        if kind not in self.optimizers:
            self.optimizers[kind] = make_optimizer(list(self.model.model.parameters()), kind, self.model)
        return self.optimizers[kind]


def step_fn(inst: Instance, s: Settings, batch: dict[str, Any], device: torch.device) -> Callable[[], None]:
    """One training step of ``inst`` under ``s`` (the closure the timers call)."""
    model = inst.model
    opt = inst.optimizer(s.optimizer)
    if s.precomputed:
        with torch.no_grad():
            x = model.image_from_batch(batch, model.first_stage_key)
            moments = model.first_stage_model.encode(x).parameters  # B x 8 x h x w, as precomputed
        batch = {**batch, model.latent_moments_key: moments}

    def step() -> None:
        set_checkpointing(model.model.diffusion_model, s.checkpointing)
        with attention_backend(s.attention), torch.autocast(device.type, torch.bfloat16, enabled=s.bf16):
            b = model.apply_ucg(batch)
            z, cond = model.get_input(b, model.first_stage_key)
            loss, _ = model(z, cond)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if s.ema == "foreach":
            model.model_ema(model.model)
        else:
            model.model_ema.update_reference(model.model)

    return step


def run_variants(args: argparse.Namespace, chosen: dict[str, Settings],
                 device: torch.device) -> dict[str, Any]:
    """Build what the variants need, time them interleaved, then measure each one's peak memory.

    Memory per variant is ``(peak, resident)`` bytes (resident: weights, EMA, optimizer state), or None for
    compiled variants off CUDA (the CPU tracker is a dispatch mode and would not see the compiled graph).
    """
    instances: dict[tuple[bool, bool], Instance] = {}
    steps = {}
    batch = common.synthetic_batch(args.batch, args.resolution, device)
    for name, s in chosen.items():
        key = (s.channels_last, s.compile)
        if key not in instances:
            log.info("building the model (channels_last=%s, compiled=%s)", *key)
            instances[key] = Instance(args, *key, device)
        steps[name] = step_fn(instances[key], s, batch, device)
    first = {name: common.timed(steps[name], device) for name, s in chosen.items() if s.compile}
    log.info("first calls of compiled variants (compile time included): %s", first)
    log.info("timing %d variants x %d rounds (+%d warm-up)", len(steps), args.rounds, args.warmup)
    times = common.time_interleaved(steps, args.rounds, args.warmup, device)
    memory: dict[str, tuple[int, int] | None] = {}
    for name, s in chosen.items():
        inst = instances[(s.channels_last, s.compile)]
        if s.compile and device.type != "cuda":
            memory[name] = None
            continue
        resident = common.resident_bytes(inst.model, inst.optimizer(s.optimizer))
        memory[name] = (common.peak_step_memory(steps[name], device, resident), resident)
    # keep one model for the optimizer/EMA timing and free the rest first (full-size states are ~15 GB each)
    keep = instances.get((True, False)) or next(iter(instances.values()))
    steps.clear()
    instances.clear()
    keep.optimizers.clear()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    micro = time_optimizer_and_ema(args, keep, device)
    return {"times": times, "memory": memory, "first": first, "micro": micro}


def time_optimizer_and_ema(args: argparse.Namespace, inst: Instance,
                           device: torch.device) -> dict[str, list[float]]:
    """AdamW step (fused / foreach / for-loop) and EMA update (foreach / reference) alone, UNet params."""
    unet = inst.model.model
    params = list(unet.parameters())
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    opts = {kind: make_optimizer(params, kind, inst.model) for kind in ("fused", "foreach", "for-loop")}
    ema = inst.model.model_ema
    cases: dict[str, Callable[[], Any]] = {f"AdamW {k}": opt.step for k, opt in opts.items()}
    cases |= {"EMA foreach": lambda: ema(unet), "EMA reference": lambda: ema.update_reference(unet)}
    times = common.time_interleaved(cases, args.rounds + 2, 1, device)
    for p in params:
        p.grad = None
    return times


# ---------------------------------------------------------------------------------------------------- report
def describe(s: Settings) -> str:
    parts = [s.attention, "bf16" if s.bf16 else "fp32", "channels_last" if s.channels_last else "NCHW",
             "compiled" if s.compile else "eager", f"{s.optimizer} AdamW", f"{s.ema} EMA"]
    parts += ["checkpointing"] * s.checkpointing + ["precomputed latents"] * s.precomputed
    return ", ".join(parts)


def variant_table(args: argparse.Namespace, chosen: dict[str, Settings], result: dict[str, Any],
                  flops: ModelFlops, device: torch.device) -> tuple[str, dict[str, float]]:
    """Markdown table per variant and the headline numbers of "fast"."""
    peaks: dict[bool, tuple[float, str]] = {}
    rows, headline = [], {}
    for name, s in chosen.items():
        if s.bf16 not in peaks:
            peaks[s.bf16] = common.peak_tflops(device, torch.bfloat16 if s.bf16 else torch.float32)
        seconds = common.median(result["times"][name])
        rate = args.batch / seconds
        achieved = rate * flops.training_per_sample(precomputed_image_latent=s.precomputed) / 1e12
        mfu = achieved / peaks[s.bf16][0]
        mem = result["memory"][name]
        gib = ["-", "-"] if mem is None else [f"{mem[0] / 2**30:.2f}", f"{(mem[0] - mem[1]) / 2**30:.2f}"]
        rows.append([name, describe(s), f"{seconds:.3f}", f"{rate:.2f}", f"{achieved:.3f}",
                     f"{100 * mfu:.1f}%", *gib])
        if name == "fast":
            peak = mem[0] / 2**30 if mem else float("nan")
            headline = {"samples_per_s": rate, "mfu": mfu, "peak_gib": peak}
    headers = ["variant", "settings", "s/step (median)", "samples/s", "model TFLOP/s", "MFU", "peak GiB",
               "peak - resident GiB"]
    table = common.markdown_table(headers, rows)
    peak_note = "; ".join(f"{'bf16' if bf16 else 'fp32'}: {v:.3f} TFLOP/s ({src})"
                          for bf16, (v, src) in peaks.items())
    return f"{table}\n\nMFU peaks: {peak_note}.", headline


def comparison_table(chosen: dict[str, Settings], result: dict[str, Any]) -> str:
    times, memory = result["times"], result["memory"]
    alias = {} if "eager" in chosen else {"eager": "fast"}
    rows = []
    for label, on, off in COMPARISONS:
        on, off = alias.get(on, on), alias.get(off, off)
        if on == off or on not in times or off not in times:
            continue
        speedup = common.paired_ratio(times[off], times[on])
        mem = "-" if memory[on] is None or memory[off] is None else f"{memory[on][0] / memory[off][0]:.2f}"
        rows.append([label, on, off, f"{common.median(times[on]):.3f}", f"{common.median(times[off]):.3f}",
                     f"**{speedup:.2f}x**", mem])
    return common.markdown_table(
        ["switch", "on", "off", "s/step on", "s/step off", "speed-up (off/on, median of rounds)",
         "peak memory on/off"], rows)


def micro_table(micro: dict[str, list[float]]) -> str:
    rows = [[k, f"{1e3 * common.median(v):.1f}"] for k, v in micro.items()]
    for fast, plain in (("AdamW fused", "AdamW for-loop"), ("AdamW foreach", "AdamW for-loop"),
                        ("EMA foreach", "EMA reference")):
        speedup = common.paired_ratio(micro[plain], micro[fast])
        rows.append([f"speed-up {fast} vs {plain}", f"**{speedup:.2f}x**"])
    return common.markdown_table(["UNet parameters only", "ms (median)"], rows)


def target_lines(args: argparse.Namespace, headline: dict[str, float], device: torch.device) -> str:
    full_run = device.type == "cuda" and args.scale == "full" and args.resolution == 512 and args.batch == 8
    if not full_run or not headline:
        return ("Targets (>= 40% MFU, < 40 GB at 8/GPU, 512 px, full size) apply to the GPU run only; this "
                "run's absolute numbers are not comparable with them, its ratios are.")
    mfu_ok = "meets" if headline["mfu"] >= 0.40 else "misses"
    mem_ok = "meets" if headline["peak_gib"] * 2**30 < 40e9 else "misses"
    return (f"Target check (fast path): MFU {100 * headline['mfu']:.1f}% {mfu_ok} the >= 40% target; peak "
            f"memory {headline['peak_gib']:.1f} GiB {mem_ok} the < 40 GB target; "
            f"{headline['samples_per_s']:.1f} samples/s.")


def compile_note(args: argparse.Namespace, first: dict[str, float]) -> str:
    if not first:
        return "off"
    calls = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in first.items())
    return f"on ({args.compile_backend}; first calls, compile included: {calls})"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1 ...")
    p.add_argument("--config", default=str(common.DEFAULT_CONFIG), help="training config (its model section)")
    p.add_argument("--scale", choices=sorted(common.SCALES), help="default: full on GPU, else small")
    p.add_argument("--resolution", type=int, help="image side in px (default: 512 on GPU, 256 on CPU)")
    p.add_argument("--batch", type=int, help="samples per step (default: 8 on GPU, 2 on CPU)")
    p.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                   help="add torch.compile variants; auto = on for GPUs, off on CPUs (inductor's CPU compile "
                        "of the UNet's training graph takes about 5 minutes on a 2-core machine)")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend")
    p.add_argument("--variants", help="comma-separated subset of: " + ", ".join(variants(True)) +
                   " (default: all on CPUs; fast,fast-ckpt on GPUs)")
    p.add_argument("--rounds", type=int, help="timed rounds (default: 10 on GPU, 5 on CPU)")
    p.add_argument("--warmup", type=int, help="untimed rounds first (default: 3 on GPU, 1 on CPU)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default 1, see common.setup)")
    p.add_argument("--no-write", action="store_true", help=f"print only; do not add results to {common.DOC}")
    args = p.parse_args(argv)
    gpu = common.resolve_device(args.device).type == "cuda"
    defaults = {"scale": "full" if gpu else "small", "resolution": 512 if gpu else 256,
                "batch": 8 if gpu else 2, "rounds": 10 if gpu else 5, "warmup": 3 if gpu else 1}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.batch < 1 or args.rounds < 1 or args.warmup < 0 or args.resolution % 64:
        p.error("--batch and --rounds must be >= 1, --warmup >= 0, --resolution a multiple of 64")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    common.setup(args.threads)
    device = common.resolve_device(args.device)
    torch.backends.cudnn.benchmark = True  # as the training config (lightning.trainer.benchmark: true)
    compile_unet = args.compile == "on" or (args.compile == "auto" and device.type == "cuda")
    chosen = variants(compile_unet)
    if not args.variants and device.type == "cuda":
        # full-size instances hold ~15 GB of state each: by default only the headline pair (one instance);
        # the ablations are separate runs (docs/BENCHMARKS.md, "GPU")
        args.variants = "fast,fast-ckpt" if compile_unet else "fast,ckpt"
    if args.variants:
        names = [v.strip() for v in args.variants.split(",") if v.strip()]
        unknown = sorted(set(names) - set(chosen))
        if unknown:
            raise SystemExit(f"--variants: unknown {unknown}; known with this --compile: {sorted(chosen)}")
        chosen = {n: chosen[n] for n in names}
    flops = flops_from_config(common.model_config(args.scale, args.config), args.resolution)
    log.info("model FLOPs per sample at %d px: %s", args.resolution,
             {k: round(v, 2) for k, v in flops.as_dict().items()})
    result = run_variants(args, chosen, device)
    table, headline = variant_table(args, chosen, result, flops, device)
    text = "\n\n".join([
        common.run_header(device).rstrip(),
        f"Scale `{args.scale}`, {args.resolution} px, batch {args.batch}, {args.rounds} timed rounds after "
        f"{args.warmup} warm-up; compile {compile_note(args, result['first'])}. "
        f"Model FLOPs per sample: {flops.training_per_sample() / 1e9:.1f} GFLOP "
        f"({flops.training_per_sample(precomputed_image_latent=True) / 1e9:.1f} with precomputed latents).",
        table,
        comparison_table(chosen, result),
        micro_table(result["micro"]),
        target_lines(args, headline, device),
    ])
    print(text)
    if not args.no_write:
        log.info("added to %s", common.write_results(HEADING, text, INTRO))


if __name__ == "__main__":
    main()
