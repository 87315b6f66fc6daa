#!/usr/bin/env python
"""Memory model of one training step of the SD2 inpainting model: what sits in memory, per GPU, at 8 samples.

    python benchmarks/memory_model.py                 # measure the activation terms on this CPU, print the model
    python benchmarks/memory_model.py --json out.json # also write the fitted terms (full_step.py reads them)
    python benchmarks/memory_model.py --terms out.json  # the report again from saved terms (no measuring)
    python benchmarks/memory_model.py --no-write      # print only

The model (bytes; N_u, N_v, N_t = UNet, VAE and text-encoder parameters, counted on the meta device):

=========================  ========================================================================
held between steps         UNet weights 4 N_u (fp32 master weights, also under bf16 autocast)
                           EMA shadow 4 N_u
                           AdamW moments 8 N_u, divided by the world size W with ZeRO-1
                           (``model.params.shard_optimizer_state``)
                           frozen VAE 4 N_v and text encoder 4 N_t (fp32, as built)
added by the step          UNet gradients 4 N_u (fp32; DDP's buckets alias them,
                           ``gradient_as_bucket_view=True`` in ``ldm.run``)
                           UNet forward + backward: ``fixed + per_sample * B * (px / 512)^2``: the
                           autocast weight copies (2 N_u in bf16), saved activations and the largest
                           transient of the backward; measured, see below
                           or, before the UNet runs, the VAE encoder's transient (no grad; one image
                           batch at a time), ``enc_per_sample * B * (px / 512)^2``
=========================  ========================================================================

Peak = held + max(encoder term, gradients + UNet term) from the second step on (the first allocates the
AdamW moments at its end, see ``predict``). The optimizer step adds nothing else measurable (fused AdamW
updates in place) and EMA is an in-place ``lerp``.

**Measured, not guessed**: the UNet and encoder terms come from the real full-width networks on this CPU
(random weights) at 128 and 256 px, batch 1, with ``tensor_memory.TensorMemoryTracker`` (peak of live tensor
storages), with gradients allocated beforehand so they are not counted twice. Activations are linear in the
number of latent pixels once attention is SDPA (no N x N matrices), so two sizes fix ``fixed`` and
``per_sample``; ``full_step.py`` checks the extrapolation at 512 px against a complete step. A GPU saves the
same tensors (cuDNN convolutions and flash / memory-efficient SDPA save inputs, outputs and log-sum-exp
like the CPU kernels); what the model leaves out on GPUs is the CUDA context (about 0.5 GiB, outside the
allocator), cuBLAS/cuDNN workspaces and allocator fragmentation, covered by a margin (``--margin``, 10%).
``benchmarks/gpu_check.sh`` measures the real peak at 8 samples per GPU.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import common
import torch
from flops import unet_context_dim
from omegaconf import OmegaConf

from ldm.util import instantiate_from_config

log = logging.getLogger("bench_memory_model")
HEADING = "Memory model"
INTRO = """Script: `python benchmarks/memory_model.py` (about 2 minutes on the 2-core box; needs about 9 GB of
free memory). Predicts the per-GPU memory of the full-size training step from parameter counts and measured
activation terms (see the script's docstring for the model); `benchmarks/full_step.py` checks it against a
complete full-size step on this CPU."""
GIB = 2**30
GPUS = {"A100 40GB": 40e9, "A100 80GB / H100 80GB": 80e9, "H200 141GB": 141e9}
CUDA_CONTEXT = 0.5 * GIB  # CUDA context and kernels, outside the caching allocator (typical for torch 2.x)


@dataclass(frozen=True)
class Counts:
    """Parameter counts of the three networks."""

    unet: int
    vae: int
    text: int


@dataclass(frozen=True)
class LinearTerm:
    """``fixed + per_sample * batch * (px / 512)^2`` bytes, fitted from two measured sizes."""

    fixed: float
    per_sample: float  # at 512 px
    measured: dict[str, float]  # "128": bytes, "256": bytes (batch 1)

    def at(self, batch: int, px: int) -> float:
        return self.fixed + self.per_sample * batch * (px / 512) ** 2

    @classmethod
    def fit(cls, small: tuple[int, float], large: tuple[int, float]) -> LinearTerm:
        (px_a, a), (px_b, b) = small, large
        slope = (b - a) / ((px_b / 512) ** 2 - (px_a / 512) ** 2)
        return cls(fixed=a - slope * (px_a / 512) ** 2, per_sample=slope, measured={str(px_a): a, str(px_b): b})


@dataclass(frozen=True)
class Setting:
    """One way to run the step: precision of the UNet's compute, checkpointing, ZeRO-1 world size."""

    name: str
    bf16: bool
    checkpointing: bool
    zero1_world: int = 1


SETTINGS = [
    Setting("bf16, no checkpointing", True, False),
    Setting("bf16, activation checkpointing", True, True),
    Setting("bf16, no checkpointing, ZeRO-1 over 8 GPUs", True, False, 8),
    Setting("bf16, activation checkpointing, ZeRO-1 over 8 GPUs", True, True, 8),
    Setting("fp32, activation checkpointing", False, True),
    Setting("fp32, no checkpointing", False, False),
]


def count_parameters(config: str | Path = common.DEFAULT_CONFIG) -> Counts:
    """Parameters of UNet, VAE and text encoder of the full-size model, built on the meta device."""
    cfg = common.model_config("full", config, use_ema=False)
    with torch.device("meta"):
        model = instantiate_from_config(cfg)
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return Counts(n(model.model), n(model.first_stage_model), n(model.cond_stage_model))


def held_bytes(c: Counts, s: Setting) -> dict[str, float]:
    """Bytes that live between steps, by component."""
    return {"UNet weights (fp32)": 4 * c.unet, "EMA (fp32)": 4 * c.unet,
            "AdamW moments (fp32)": 8 * c.unet / s.zero1_world, "VAE (fp32)": 4 * c.vae,
            "text encoder (fp32)": 4 * c.text}


def predict(c: Counts, unet_term: LinearTerm, enc_term: LinearTerm, s: Setting, batch: int,
            px: int = 512, first_step: bool = False) -> dict[str, float]:
    """Bytes by component and the predicted peak of a step (``"peak"``).

    The encoders run before the UNet, while the gradients are still unallocated (``zero_grad`` sets them to
    None), so a step peaks at ``held + max(encoder term, gradients + UNet term)``. ``first_step``: AdamW
    allocates its moments inside the first ``optimizer.step()``, after the backward has freed the
    activations: ``held - moments + max(encoder term, gradients + max(UNet term, moments))``.
    """
    out = held_bytes(c, s)
    grads = out["UNet gradients (fp32)"] = 4 * c.unet
    unet, enc = unet_term.at(batch, px), enc_term.at(batch, px)
    out["UNet forward + backward"] = unet
    out["VAE encode transient"] = enc
    held = sum(held_bytes(c, s).values())
    if first_step:
        moments = out["AdamW moments (fp32)"]
        out["peak"] = held - moments + max(enc, grads + max(unet, moments))
    else:
        out["peak"] = held + max(enc, grads + unet)
    return out


# ------------------------------------------------------------------------------------------- measurement
def _fill(module: torch.nn.Module) -> torch.nn.Module:
    """Small random weights (the values do not change memory; this is faster than the layers' own init)."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.02)
    return module


def build_unet(checkpointing: bool, config: str | Path = common.DEFAULT_CONFIG) -> torch.nn.Module:
    cfg = OmegaConf.load(config).model.params.unet_config
    OmegaConf.update(cfg, "params.use_checkpoint", checkpointing, force_add=True)
    with torch.device("meta"):
        unet = instantiate_from_config(cfg)
    return _fill(unet.to_empty(device="cpu")).train()


def build_vae_encoder(config: str | Path = common.DEFAULT_CONFIG) -> torch.nn.Module:
    cfg = OmegaConf.load(config).model.params.first_stage_config
    with torch.device("meta"):
        vae = instantiate_from_config(cfg)
    return _fill(vae.to_empty(device="cpu")).eval().requires_grad_(False)


def unet_step_bytes(unet: torch.nn.Module, px: int, batch: int, bf16: bool) -> int:
    """Peak live bytes of one UNet forward + backward beyond weights and (pre-allocated) gradients."""
    h = px // 8
    x = torch.randn(batch, unet.in_channels, h, h)  # B x 9 x h x w
    t = torch.randint(0, 1000, (batch,))
    context = torch.randn(batch, 77, unet_context_dim(unet))  # B x 77 x 1024
    for p in unet.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    gc.collect()
    with common.TensorMemoryTracker() as tracker:
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            out = unet(x, t, context=context)
        out.float().square().mean().backward()
        del out
    return tracker.peak


def encoder_bytes(vae: torch.nn.Module, px: int, batch: int, bf16: bool) -> int:
    """Peak live bytes of one VAE encode (no grad), as the training step runs it."""
    x = torch.randn(batch, 3, px, px)
    gc.collect()
    with common.TensorMemoryTracker() as tracker, torch.no_grad():
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            vae.encode(x)
    return tracker.peak


def measure(sizes: tuple[int, int] = (128, 256), only: list[Setting] | None = None,
            config: str | Path = common.DEFAULT_CONFIG) -> dict[str, Any]:
    """Fit the UNet term per (precision, checkpointing) and the encoder term per precision."""
    needed = {(s.bf16, s.checkpointing) for s in (only or SETTINGS)}
    unet_terms: dict[str, LinearTerm] = {}
    for ckpt in sorted({c for _, c in needed}):
        unet = build_unet(ckpt, config)
        for bf16 in sorted({b for b, c in needed if c == ckpt}):
            t0 = time.perf_counter()
            points = [(px, float(unet_step_bytes(unet, px, 1, bf16))) for px in sizes]
            unet_terms[_key(bf16, ckpt)] = LinearTerm.fit(*points)
            log.info("UNet %s: %s (%.0f s)", _key(bf16, ckpt), points, time.perf_counter() - t0)
        del unet
        gc.collect()
    vae = build_vae_encoder(config)
    enc_terms = {}
    for bf16 in sorted({b for b, _ in needed}):
        points = [(px, float(encoder_bytes(vae, px, 1, bf16))) for px in sizes]
        enc_terms["bf16" if bf16 else "fp32"] = LinearTerm.fit(*points)
        log.info("VAE encoder %s: %s", "bf16" if bf16 else "fp32", points)
    return {"unet": unet_terms, "encoder": enc_terms}


def _key(bf16: bool, checkpointing: bool) -> str:
    return f"{'bf16' if bf16 else 'fp32'}{', checkpointing' if checkpointing else ''}"


def terms_for(terms: dict[str, Any], s: Setting) -> tuple[LinearTerm, LinearTerm]:
    return terms["unet"][_key(s.bf16, s.checkpointing)], terms["encoder"]["bf16" if s.bf16 else "fp32"]


def save_terms(terms: dict[str, Any], counts: Counts, path: Path) -> None:
    data = {"counts": asdict(counts),
            "unet": {k: asdict(v) for k, v in terms["unet"].items()},
            "encoder": {k: asdict(v) for k, v in terms["encoder"].items()}}
    path.write_text(json.dumps(data, indent=1))


def load_terms(path: Path) -> tuple[Counts, dict[str, Any]]:
    data = json.loads(path.read_text())
    terms = {part: {k: LinearTerm(**v) for k, v in data[part].items()} for part in ("unet", "encoder")}
    return Counts(**data["counts"]), terms


# ---------------------------------------------------------------------------------------------- report
def fits(total: float, capacity: float, margin: float) -> str:
    need = total * (1 + margin) + CUDA_CONTEXT
    return "fits" if need <= capacity else "**no**"


def max_batch(c: Counts, unet_term: LinearTerm, enc_term: LinearTerm, s: Setting, capacity: float,
              margin: float, px: int = 512, limit: int = 1024) -> int:
    """Largest batch per GPU whose predicted peak fits ``capacity`` (0 if not even one sample fits)."""
    n = 0
    while n < limit and fits(predict(c, unet_term, enc_term, s, n + 1, px)["peak"], capacity, margin) == "fits":
        n += 1
    return n


def report(counts: Counts, terms: dict[str, Any], margin: float, batch: int = 8,
           config: str | Path = common.DEFAULT_CONFIG) -> str:
    lines = [
        f"Parameters: UNet {counts.unet / 1e6:.1f} M, VAE {counts.vae / 1e6:.1f} M, text encoder "
        f"{counts.text / 1e6:.1f} M (meta-device count of the model in `{Path(config).name}`).",
    ]
    rows = []
    for key, term in terms["unet"].items():
        rows.append([f"UNet forward + backward, {key}", *[f"{v / GIB:.2f}" for v in term.measured.values()],
                     f"{term.fixed / GIB:.2f}", f"{term.per_sample / GIB:.2f}"])
    for key, term in terms["encoder"].items():
        rows.append([f"VAE encode (no grad), {key}", *[f"{v / GIB:.2f}" for v in term.measured.values()],
                     f"{term.fixed / GIB:.2f}", f"{term.per_sample / GIB:.2f}"])
    sizes = list(next(iter(terms["unet"].values())).measured)
    lines.append(common.markdown_table(
        ["measured term (GiB)", *[f"{s} px, batch 1" for s in sizes], "fixed", "per sample at 512 px"], rows))
    rows = []
    for s in SETTINGS:
        if _key(s.bf16, s.checkpointing) not in terms["unet"]:
            continue
        unet_term, enc_term = terms_for(terms, s)
        p1 = predict(counts, unet_term, enc_term, s, 1)
        p8 = predict(counts, unet_term, enc_term, s, batch)
        held = sum(held_bytes(counts, s).values())
        largest = [max_batch(counts, unet_term, enc_term, s, cap, margin) for cap in GPUS.values()]
        rows.append([s.name, f"{held / GIB:.1f}", f"{p1['UNet forward + backward'] / GIB:.1f}",
                     f"{p8['UNet forward + backward'] / GIB:.1f}", f"{p1['peak'] / GIB:.1f}",
                     f"**{p8['peak'] / GIB:.1f}**",
                     *[f"{fits(p8['peak'], cap, margin)} (max {n})" for cap, n in zip(GPUS.values(), largest)]])
    lines.append(common.markdown_table(
        ["setting (512 px)", "held GiB", "UNet fwd+bwd GiB, batch 1", f"batch {batch}", "peak GiB, batch 1",
         f"peak GiB, batch {batch}", *[f"{batch}/GPU on {g} (largest batch)" for g in GPUS]], rows))
    lines.append(f"'fits': predicted peak x {1 + margin:.2f} (allocator fragmentation, workspaces) + "
                 f"{CUDA_CONTEXT / GIB:.1f} GiB CUDA context <= the GPU's memory. Held = weights, EMA, AdamW "
                 "moments, frozen encoders; peak = held + max(encoder term, gradients + UNet term).")
    return "\n\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(common.DEFAULT_CONFIG), help="training config (its model section)")
    p.add_argument("--sizes", default="128,256", help="two image sizes (px) to fit the linear terms at")
    p.add_argument("--settings", default="all",
                   help="'all' or a comma-separated subset of bf16, bf16-ckpt, fp32, fp32-ckpt")
    p.add_argument("--margin", type=float, default=0.10, help="fragmentation/workspace margin (default 0.10)")
    p.add_argument("--threads", type=int, help="torch threads (default 1)")
    p.add_argument("--json", help="write the counts and fitted terms here (read by full_step.py)")
    p.add_argument("--terms", help="report from terms a previous --json wrote instead of measuring again")
    p.add_argument("--no-write", action="store_true", help="print only; do not add results to docs/BENCHMARKS.md")
    args = p.parse_args(argv)
    sizes = [int(v) for v in args.sizes.split(",")]
    if len(sizes) != 2 or sizes[0] >= sizes[1] or any(v % 64 for v in sizes):
        p.error("--sizes: two increasing multiples of 64, e.g. 128,256")
    args.sizes = tuple(sizes)
    return args


def select(spec: str) -> list[Setting]:
    if spec == "all":
        return SETTINGS
    wanted = {v.strip() for v in spec.split(",")}
    known = {f"{'bf16' if s.bf16 else 'fp32'}{'-ckpt' if s.checkpointing else ''}" for s in SETTINGS}
    if wanted - known:
        raise SystemExit(f"--settings: unknown {sorted(wanted - known)}; known: {sorted(known)}")
    return [s for s in SETTINGS if f"{'bf16' if s.bf16 else 'fp32'}{'-ckpt' if s.checkpointing else ''}" in wanted]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    common.setup(args.threads)
    if args.terms:
        counts, terms = load_terms(Path(args.terms))
    else:
        counts = count_parameters(args.config)
        terms = measure(args.sizes, select(args.settings), args.config)
    if args.json:
        save_terms(terms, counts, Path(args.json))
    text = "\n\n".join([common.run_header(torch.device("cpu")).rstrip(),
                        report(counts, terms, args.margin, config=args.config)])
    print(text)
    if not args.no_write:
        log.info("added to %s", common.write_results(HEADING, text, INTRO))


if __name__ == "__main__":
    main()
