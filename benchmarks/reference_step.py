#!/usr/bin/env python
"""Our UNet training step against the official Stability-AI code, side by side, on one shape.

    python benchmarks/reference_step.py                        # ours only: step time, memory, profile split
    REF=/tmp/ref python benchmarks/reference_step.py            # ours vs the reference, 1 thread
    REF=/tmp/ref python benchmarks/reference_step.py --threads 2
    REF=/tmp/ref python benchmarks/reference_step.py --also before=/tmp/old   # a third implementation too
    python benchmarks/reference_step.py --no-write              # print only

``REF`` (or ``--ref``) is a checkout of https://github.com/Stability-AI/stablediffusion that the user
fetched (e.g. ``git clone https://github.com/Stability-AI/stablediffusion /tmp/ref``); nothing of it is copied
into this repository. Its code needs ``einops``, which this project installs too.

The step: SD2's inpainting UNet (9 input channels, ``channel_mult`` 1-2-4-4, heads of 64 channels, linear
transformer projections, context width 1024) at ``--model-channels`` (128; SD2 has 320), a latent of
``--latent`` (32) x 32, batch ``--batch`` (2), 77 context tokens, fp32, no activation checkpointing; forward,
MSE against a fixed target, backward, gradients dropped. No optimizer: the comparison is about the network.

How it is measured: both implementations are packages called ``ldm``, so each lives in its own worker
process (this script with ``--worker ROOT``), and the parent alternates them (ours, ref; ref, ours; ...),
one step at a time, after a warm-up. ``--also LABEL=ROOT`` adds another checkout (an older commit of this
repository, say: ``git archive <commit> ldm | tar -x -C /tmp/old``) to the rotation. Each worker times its
step itself (no IPC inside the timing); the speed ratio is the median of the per-round ratios, so load from
other jobs that comes and goes hits both alike. Both workers build their weights from the parameter *names* (a seeded
generator per key), so they hold identical weights without a file; the parity check compares the output and
every parameter's gradient norm and fails (exit 1) beyond ``--parity-tol`` (relative, 1e-5).

Also reported per implementation: the peak of live tensor storages during a step plus the parameters
(``tensor_memory.TensorMemoryTracker``); the step's floating-point operations (``step_flops``) divided by the
core's best fp32 GEMM rate (``gemm_rate``), a floor no exact implementation goes below, so a target under it
is out of reach by removing overhead; and a ``torch.profiler`` split of the step's time into
convolution / GEMM / attention kernels and everything else (norms, copies and layout changes, element-wise
ops, softmax, and what no operator accounts for: Python and dispatch overhead).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import statistics
import subprocess
import sys
import time
import zlib
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

HEADING = "Reference step"
INTRO = """Script: `REF=<checkout of Stability-AI/stablediffusion> python benchmarks/reference_step.py`
(see its docstring). Our UNet's training step (forward, MSE, backward) against the official code's, in two
worker processes alternated step by step, on SD2's inpainting UNet at model_channels 128, latent 32 x 32,
batch 2, context 77 x 1024, fp32 on a CPU. Reports the median of per-round time ratios, the step's peak
memory, a parity check (output and per-parameter gradient norms, relative 1e-5), the step's arithmetic
against the core's best GEMM rate (the least time any exact implementation can take) and a torch.profiler
split of the step into convolution / GEMM / attention kernels and everything else.

Targets: ours <= 0.8x the reference's step time at 1 thread, <= 1.0x at 2 threads."""

log = logging.getLogger("bench_reference_step")

#: SD2 inpainting UNet (configs/stable-diffusion/v2-inpainting-inference.yaml) minus the width and checkpointing
UNET_PARAMS: dict[str, Any] = {
    "image_size": 32, "in_channels": 9, "out_channels": 4, "model_channels": 320,
    "attention_resolutions": [4, 2, 1], "num_res_blocks": 2, "channel_mult": [1, 2, 4, 4],
    "num_head_channels": 64, "use_spatial_transformer": True, "use_linear_in_transformer": True,
    "transformer_depth": 1, "context_dim": 1024, "legacy": False, "use_checkpoint": False,
}

#: profiler operator names (self time) that are the network's arithmetic: convolutions, GEMMs, attention
COMPUTE_OPS = (
    "conv", "mm", "addmm", "bmm", "baddbmm", "matmul", "einsum", "linear", "scaled_dot_product",
    "flash_attention",
)
#: the rest, by kind (first match wins); what matches nothing is "other ops"
OTHER_KINDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("norms", ("group_norm", "layer_norm", "batch_norm")),
    ("softmax", ("softmax",)),
    ("copies and layout", ("copy", "clone", "contiguous", "cat", "to_copy", "reshape", "view", "transpose",
                           "permute", "unflatten", "flatten", "expand", "as_strided", "chunk", "split",
                           "unsafe_", "empty", "zeros", "stack", "slice", "select", "t", "detach", "alias")),
    ("element-wise", ("add", "mul", "sub", "div", "gelu", "silu", "sigmoid", "exp", "sin", "cos", "neg",
                      "fill", "where", "pow", "rsub", "sum", "mean", "mse", "upsample", "nearest", "pool",
                      "arange", "threshold", "dropout", "ones", "zero_")),
)


# ------------------------------------------------------------------------------------------------- worker
def _is_compute(name: str) -> bool:
    op = name.removeprefix("aten::").lower()
    return any(op == c or op.startswith(c) or f"_{c}" in op or op.endswith(c) for c in COMPUTE_OPS)


def _kind(name: str) -> str:
    op = name.removeprefix("aten::").lower()
    for kind, keys in OTHER_KINDS:
        if any(op == k or op.startswith(k) or op.startswith(f"_{k}") or f"_{k}" in op for k in keys):
            return kind
    return "other ops"


def _init_by_name(model: Any) -> None:
    """Deterministic weights from the parameter names, so two implementations with the same keys agree.

    Matrices and kernels get N(0, 1/fan_in) (activations keep their scale through the 30-odd blocks), 1-D
    tensors 1 + N(0, 0.1^2) for norm weights and N(0, 0.02^2) for biases. Zero-initialised layers become
    random too, so every path of the network contributes to the output and the gradients.
    """
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
            if p.ndim > 1:
                p.copy_(noise.mul_(p[0].numel() ** -0.5))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(noise.mul_(0.1).add_(1))
            else:
                p.copy_(noise.mul_(0.02))


def _worker(root: str, spec: dict[str, Any]) -> None:
    """Serve ``step`` / ``profile`` / ``memory`` / ``parity`` requests on stdin, one JSON line each."""
    protocol = sys.stdout
    sys.stdout = sys.stderr  # anything the imported code prints must not corrupt the protocol
    sys.path.insert(0, root)
    import torch
    import torch.nn.functional as F
    from tensor_memory import TensorMemoryTracker

    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    torch.set_num_threads(spec["threads"])
    params = {**UNET_PARAMS, "model_channels": spec["model_channels"]}
    unet = UNetModel(**params).train()
    _init_by_name(unet)
    g = torch.Generator().manual_seed(1234)
    b, s = spec["batch"], spec["latent"]
    x = torch.randn(b, 9, s, s, generator=g)  # B x 9 x h x w
    t = torch.randint(0, 1000, (b,), generator=g)
    context = torch.randn(b, 77, 1024, generator=g)  # B x 77 x 1024
    target = torch.randn(b, 4, s, s, generator=g)
    weights = list(unet.parameters())

    def step() -> None:
        loss = F.mse_loss(unet(x, t, context=context), target)
        loss.backward()
        for p in weights:
            p.grad = None

    def profile(repeats: int) -> dict[str, Any]:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            for _ in range(repeats):
                step()
            seconds = (time.perf_counter() - t0) / repeats
        self_ms: dict[str, float] = defaultdict(float)
        calls: dict[str, int] = defaultdict(int)
        for evt in prof.key_averages():
            self_ms[evt.key] += evt.self_cpu_time_total / 1e3 / repeats
            calls[evt.key] += evt.count // repeats
        return {"step_ms": 1e3 * seconds, "self_ms": self_ms, "calls": calls}

    def parity() -> dict[str, Any]:
        out = unet(x, t, context=context)
        F.mse_loss(out, target).backward()
        norms = {n: p.grad.double().norm().item() for n, p in unet.named_parameters()}
        for p in weights:
            p.grad = None
        return {"output": out.detach().double().flatten().tolist(), "grad_norms": norms}

    def memory() -> dict[str, Any]:
        with TensorMemoryTracker() as tracker:
            step()
        return {"step_peak": tracker.peak, "params": sum(p.numel() * p.element_size() for p in weights)}

    def arithmetic() -> dict[str, Any]:
        return {"flops": step_flops(step), "gemm_flops_per_s": gemm_rate()}

    def timed_step() -> dict[str, Any]:
        t0 = time.perf_counter()
        step()
        return {"seconds": time.perf_counter() - t0}

    handlers: dict[str, Callable[..., dict[str, Any]]] = {
        "step": timed_step, "profile": profile, "parity": parity, "memory": memory, "arithmetic": arithmetic,
    }
    reply({"ready": True, "params": sum(p.numel() for p in weights), "keys": len(unet.state_dict())}, protocol)
    for line in sys.stdin:
        request = json.loads(line)
        if request["op"] == "quit":
            break
        reply(handlers[request["op"]](**request.get("args", {})), protocol)


def step_flops(step: Callable[[], None]) -> int:
    """Floating-point operations of one ``step()``, attention counted at its plain (math) formula.

    ``FlopCounterMode`` knows convolutions and matrix products but not the CPU's fused attention. Those are
    charged what einsum + softmax would cost: two products forward, and four backward (the gradients of
    both), so a fused and a plain implementation are charged the same arithmetic. (The fused backward also
    recomputes the attention weights; that is the price of its memory saving, not arithmetic the step
    needs, so it is not charged.)
    """
    import torch
    from torch.utils import flop_counter

    aten = torch.ops.aten
    cpu_attention = {
        aten._scaled_dot_product_flash_attention_for_cpu:
            lambda q, k, v, *_args, **_kwargs: flop_counter.sdpa_flop_count(q, k, v),
        aten._scaled_dot_product_flash_attention_for_cpu_backward:
            lambda _grad, q, k, v, *_args, **_kwargs: 2 * flop_counter.sdpa_flop_count(q, k, v),
    }
    with flop_counter.FlopCounterMode(display=False, custom_mapping=cpu_attention) as counter:
        step()
    return counter.get_total_flops()


def gemm_rate(size: int = 2048, repeats: int = 5) -> float:
    """This process's best fp32 matrix-product rate (FLOP/s): a square GEMM, best of ``repeats``.

    The GEMM is the fastest thing the core does (no layout or memory traffic to speak of), so arithmetic
    divided by this rate is about the least time any exact implementation of the step can take.
    """
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up: the first call pays for the library's setup
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best


def reply(obj: dict[str, Any], stream: Any) -> None:
    stream.write(json.dumps(obj) + "\n")
    stream.flush()


# ------------------------------------------------------------------------------------------------- parent
class Worker:
    """One worker process holding one implementation's UNet; ``call`` sends a request and waits."""

    def __init__(self, label: str, root: Path, spec: dict[str, Any]) -> None:
        self.label = label
        env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "PYTHONPATH": str(root)}
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--worker", str(root), "--spec", json.dumps(spec)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=str(root),
        )
        self.info: dict[str, Any] = {}

    def wait_ready(self) -> None:
        """Block until the worker has built its model (workers start in parallel, then each is awaited)."""
        self.info = self._read()

    def _read(self) -> dict[str, Any]:
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"reference_step: the {self.label} worker died (exit {self.proc.wait()}); "
                             "its error is above")
        return json.loads(line)

    def call(self, op: str, **args: Any) -> dict[str, Any]:
        self.proc.stdin.write(json.dumps({"op": op, "args": args}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        """Ask the worker to quit; kill it if it does not within a minute (or is stuck)."""
        try:
            if self.proc.poll() is None:
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        finally:
            for stream in (self.proc.stdin, self.proc.stdout):
                with contextlib.suppress(OSError):  # a dead worker's pipe may refuse the last flush
                    stream.close()


def split_profile(result: dict[str, Any]) -> dict[str, float]:
    """Milliseconds per step: compute kernels, each kind of the rest, and unaccounted time (Python etc.)."""
    step_ms = result["step_ms"]
    out: dict[str, float] = defaultdict(float)
    for name, ms in result["self_ms"].items():
        out["compute" if _is_compute(name) else _kind(name)] += ms
    # time no operator accounts for: the Python of the modules, autograd bookkeeping, the dispatcher (and the
    # profiler's own cost per operator, a few microseconds)
    out["python and dispatch (unaccounted)"] = max(0.0, step_ms - sum(out.values()))
    out["step"] = step_ms
    return dict(out)


def check_parity(ours: dict[str, Any], ref: dict[str, Any], tol: float) -> tuple[float, float]:
    """(relative max output difference, worst relative gradient-norm difference); SystemExit beyond tol."""
    a, b = ours["output"], ref["output"]
    scale = max(abs(v) for v in b)
    out_diff = max(abs(u - v) for u, v in zip(a, b)) / scale
    keys_a, keys_b = set(ours["grad_norms"]), set(ref["grad_norms"])
    if keys_a != keys_b:
        raise SystemExit(f"parameter names differ: only ours {sorted(keys_a - keys_b)[:5]}, "
                         f"only reference {sorted(keys_b - keys_a)[:5]}")
    grad_diff = max(abs(ours["grad_norms"][k] - ref["grad_norms"][k]) / max(ref["grad_norms"][k], 1e-30)
                    for k in keys_a)
    if out_diff > tol or grad_diff > tol:
        raise SystemExit(f"parity FAILED: output differs by {out_diff:.2e}, a gradient norm by {grad_diff:.2e} "
                         f"(relative; tolerance {tol:.0e})")
    return out_diff, grad_diff


def run(args: argparse.Namespace) -> str:
    import common

    spec = {"threads": args.threads, "model_channels": args.model_channels, "latent": args.latent,
            "batch": args.batch}
    roots = {"ours": Path(args.ours or common.REPO).resolve()}
    for item in args.also:
        label, _, root = item.partition("=")
        if not label or not root or label in ("ours", "reference") or label in roots:
            raise SystemExit(f"--also {item!r}: expected LABEL=ROOT with a new label")
        roots[label] = Path(root).resolve()
    if args.ref:
        roots["reference"] = Path(args.ref).resolve()
    for label, root in roots.items():
        if not (root / "ldm" / "modules" / "diffusionmodules" / "openaimodel.py").is_file():
            flag = {"ours": "--ours", "reference": "REF / --ref"}.get(label, "--also")
            raise SystemExit(f"{flag} {root}: no ldm/modules/diffusionmodules/openaimodel.py in it "
                             "(expected a checkout of this repository or of Stability-AI/stablediffusion)")
    loads = [common.load_average()]
    workers = {label: Worker(label, root, spec) for label, root in roots.items()}
    try:
        for label, w in workers.items():
            w.wait_ready()
            log.info("%s worker: %d parameters, %d state-dict keys", label, w.info["params"], w.info["keys"])
        parity: dict[str, tuple[float, float]] = {}
        if "reference" in workers:
            expected = workers["reference"].call("parity")
            for name, w in workers.items():
                if name != "reference":
                    parity[name] = check_parity(w.call("parity"), expected, args.parity_tol)
        names = list(workers)
        for _ in range(args.warmup):
            for name in names:
                workers[name].call("step")
        times: dict[str, list[float]] = {name: [] for name in names}
        for r in range(args.rounds):
            for name in names[r % len(names):] + names[: r % len(names)]:
                times[name].append(workers[name].call("step")["seconds"])
        loads.append(common.load_average())
        memory = {name: w.call("memory") for name, w in workers.items()}
        arithmetic = {name: w.call("arithmetic") for name, w in workers.items()}
        profiles = {}
        for name, w in workers.items() if args.profile_repeats else ():
            raw = w.call("profile", repeats=args.profile_repeats)
            top = sorted(raw["self_ms"].items(), key=lambda kv: -kv[1])[: args.profile_top]
            log.info("%s: top operators by self time, ms per step (calls):\n%s", name, "\n".join(
                f"  {ms:8.1f}  {op} ({raw['calls'][op]})" for op, ms in top))
            profiles[name] = split_profile(raw)
        loads.append(common.load_average())
    finally:
        for w in workers.values():
            w.close()
    return report(args, times, memory, arithmetic, profiles, parity, loads, common)


def floor_line(times: dict[str, list[float]], arithmetic: dict[str, dict[str, float]]) -> str:
    """How close each step runs to the core's GEMM rate, and the least step time that rate allows.

    The floor is the step's arithmetic at the best GEMM rate. Against the reference it says how low a step
    ratio removing overhead could reach at all: a target below it needs fewer FLOPs or another precision.
    """
    # the implementations perform the same arithmetic (the parity check holds); take the largest count
    flops = max(a["flops"] for a in arithmetic.values())
    rate = max(a["gemm_flops_per_s"] for a in arithmetic.values())
    floor_s = flops / rate
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    per_impl = "; ".join(f"{name} {flops / medians[name] / rate:.0%} of it" for name in medians)
    text = (f"Arithmetic: {flops / 1e9:.1f} GFLOP per step (attention at its math count); this core's best "
            f"fp32 GEMM rate: {rate / 1e9:.1f} GFLOP/s, so no step can take less than about {floor_s:.3f} s. "
            f"Median steps run at {per_impl}")
    if "reference" in medians:
        text += f". **Floor / reference step: {floor_s / medians['reference']:.2f}x**"
    return text + "."


def report(args: argparse.Namespace, times: dict[str, list[float]], memory: dict[str, Any],
           arithmetic: dict[str, dict[str, float]], profiles: dict[str, dict[str, float]],
           parity: dict[str, tuple[float, float]], loads: list[str],
           common: Any) -> str:
    import torch

    rows = []
    for name, ts in times.items():
        mem = memory[name]
        rows.append([name, f"{statistics.median(ts):.3f}", f"{min(ts):.3f}", f"{max(ts):.3f}",
                     f"{(mem['step_peak'] + mem['params']) / 2**30:.2f}", f"{mem['step_peak'] / 2**30:.2f}"])
    table = common.markdown_table(["implementation", "s/step (median)", "min", "max", "peak GiB (params + step)",
                                   "step peak GiB"], rows)
    parts = [common.run_header(torch.device("cpu"), threads=args.threads).rstrip(),
             f"UNet model_channels {args.model_channels}, latent {args.latent} x {args.latent}, batch "
             f"{args.batch}, context 77 x 1024, fp32, {args.threads} thread(s); {args.rounds} alternating rounds "
             f"after {args.warmup} warm-up. Load average (1/5/15 min) before, after timing, at the end: "
             f"{'; '.join(loads)}.", table]
    if "reference" in times:
        target = 0.8 if args.threads == 1 else 1.0
        ref_mem = memory["reference"]["step_peak"] + memory["reference"]["params"]
        for name in (n for n in times if n != "reference"):
            ratios = [o / r for o, r in zip(times[name], times["reference"])]
            ratio = statistics.median(ratios)
            verdict = "meets" if ratio <= target else "misses"
            mem_ratio = (memory[name]["step_peak"] + memory[name]["params"]) / ref_mem
            out_diff, grad_diff = parity[name]
            parts.append(
                f"**{name} / reference step time: {ratio:.2f}x** (median of per-round ratios; per round: "
                f"{', '.join(f'{r:.2f}' for r in ratios)}); {verdict} the <= {target}x target at "
                f"{args.threads} thread(s). Peak memory {name} / reference: {mem_ratio:.2f}x. Parity: output "
                f"{out_diff:.1e}, gradient norms {grad_diff:.1e} (relative, tolerance {args.parity_tol:.0e}).")
    parts.append(floor_line(times, arithmetic))
    if profiles:
        kinds = ["compute", "norms", "softmax", "copies and layout", "element-wise", "other ops",
                 "python and dispatch (unaccounted)"]
        prow = []
        for kind in kinds:
            cells = []
            for name in profiles:
                p = profiles[name]
                cells.append(f"{p.get(kind, 0.0):.0f} ({100 * p.get(kind, 0.0) / p['step']:.0f}%)")
            prow.append([kind, *cells])
        prow.append(["**everything but compute**",
                     *[f"**{p['step'] - p['compute']:.0f} ({100 * (1 - p['compute'] / p['step']):.0f}%)**"
                       for p in profiles.values()]])
        prow.append(["step (profiled, mean)", *[f"{p['step']:.0f}" for p in profiles.values()]])
        parts.append(common.markdown_table(["ms per step (torch.profiler self CPU time)", *profiles], prow))
    return "\n\n".join(parts)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ref", default=os.environ.get("REF"),
                   help="checkout of Stability-AI/stablediffusion (default: $REF); without it, ours only")
    p.add_argument("--ours", help="root of the implementation labelled 'ours' (default: this repository)")
    p.add_argument("--also", action="append", default=[], metavar="LABEL=ROOT",
                   help="one more implementation to alternate with (e.g. before=/tmp/old-checkout); repeatable")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads per worker (default 1)")
    p.add_argument("--model-channels", type=int, default=128, help="UNet base width (SD2: 320; default 128)")
    p.add_argument("--latent", type=int, default=32, help="latent side (default 32)")
    p.add_argument("--batch", type=int, default=2, help="batch size (default 2)")
    p.add_argument("--rounds", type=int, default=10, help="alternating timed rounds (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default 2)")
    p.add_argument("--profile-repeats", type=int, default=3,
                   help="steps under torch.profiler per implementation (0: no profile; default 3)")
    p.add_argument("--profile-top", type=int, default=15, help="operators to list per profile (to stderr)")
    p.add_argument("--parity-tol", type=float, default=1e-5, help="relative parity tolerance (default 1e-5)")
    p.add_argument("--no-write", action="store_true", help="print only; do not add results to docs/BENCHMARKS.md")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if min(args.threads, args.model_channels, args.latent, args.batch, args.rounds) < 1 or args.warmup < 0:
        p.error("--threads, --model-channels, --latent, --batch and --rounds must be >= 1, --warmup >= 0")
    if args.model_channels % 64 or args.latent % 8:
        p.error("--model-channels must be a multiple of 64 (heads of 64) and --latent a multiple of 8")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        _worker(args.worker, json.loads(args.spec))
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    text = run(args)
    print(text)
    if not args.no_write:
        import common

        log.info("added to %s", common.write_results(HEADING, text, INTRO))


if __name__ == "__main__":
    main()
