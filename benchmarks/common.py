"""Shared pieces of the benchmark scripts: model scales, interleaved timing, peak memory, reports.

* **Scales** (:data:`SCALES`): ``full`` is the SD2 inpainting model of ``configs/inpaint.yaml``; ``small``
  keeps its structure (levels, blocks, heads of 32 channels, VAE levels) at a fifth of the UNet width and a
  quarter of the VAE width, with the tests' tiny text tower, so a CPU runs a step in about a second.
* **Timing** (:func:`time_interleaved`): the cases of one benchmark run in turns (A B C A B C ...) after a
  warm-up, the order rotating each round, so load from other processes hits every case alike; reports use
  medians and the median of per-round ratios (:func:`paired_ratio`).
* **Memory** (:func:`peak_step_memory`): on CUDA the caching allocator's peak; elsewhere the peak of live
  tensor storages seen by the dispatcher (:class:`TensorMemoryTracker`). Both add the resident state.
* **Reports**: markdown tables, a machine/versions line, and :func:`write_results`, which inserts a dated run
  at the end of a section of ``docs/BENCHMARKS.md`` (creating the section when missing) and never rewrites
  other sections.

Left out: CUDA graphs, multi-GPU runs and energy; CPU MFU is relative to a GEMM measured in the same run (a
CPU has no single published peak).
"""

from __future__ import annotations

import datetime as dt
import functools
import gc
import logging
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tensor_memory import TensorMemoryTracker  # noqa: F401 - re-exported for the scripts and tests

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from ldm.callbacks import PEAK_TFLOPS  # noqa: E402
from ldm.data.synthetic import synthetic_sample  # noqa: E402

DOC = REPO / "docs" / "BENCHMARKS.md"
DEFAULT_CONFIG = REPO / "configs" / "inpaint.yaml"
log = logging.getLogger("bench")

#: config overrides per model scale (dotted keys under ``model.params``)
SCALES: dict[str, dict[str, Any]] = {
    "full": {},
    "small": {
        "unet_config.params.model_channels": 64,  # 320 in SD2
        "unet_config.params.num_head_channels": 32,  # 64 in SD2: same head counts at a fifth of the width
        "unet_config.params.context_dim": 32,
        "first_stage_config.params.ddconfig.ch": 32,  # 128 in SD2
        # the tests' 3-layer text tower: at full size the text encoder is 1% of the step's FLOPs
        "cond_stage_config.params.arch": str(REPO / "configs" / "tiny" / "open_clip_tiny_text.json"),
    },
}


# ------------------------------------------------------------------------------------------------ setup
def setup(threads: int | None = None) -> None:
    """Logging to stderr, offline hubs, and ``threads`` intra-op threads (default 1).

    One thread by default: on a machine shared with other jobs, OpenMP worker threads spin-wait against them
    and step times swing by 5x (measured on the 2-core CI box); one thread gives stable per-core numbers.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "offline")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # the randomly initialised text encoder warns on every build; benchmarks never need its weights
    logging.getLogger("ldm.modules.encoders.modules").setLevel(logging.ERROR)
    torch.set_num_threads(threads or 1)


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def model_config(scale: str, config: str | Path = DEFAULT_CONFIG, **params: Any) -> DictConfig:
    """The ``model`` section of ``config`` at ``scale``, without checkpoint and with random text weights.

    ``params`` override ``model.params`` keys after the scale (e.g. ``channels_last=True``).
    """
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {sorted(SCALES)}, got {scale!r}")
    cfg = OmegaConf.load(config).model
    OmegaConf.update(cfg, "params.ckpt_path", None, force_add=True)
    OmegaConf.update(cfg, "params.cond_stage_config.params.version", None, force_add=True)
    for key, value in {**SCALES[scale], **params}.items():
        OmegaConf.update(cfg, f"params.{key}", value, force_add=True)
    return cfg


# ----------------------------------------------------------------------------------------------- timing
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds of one call of ``fn`` (e.g. the first call of a compiled model: the compile time)."""
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t0


def time_interleaved(
    cases: Mapping[str, Callable[[], Any]], rounds: int, warmup: int, device: torch.device
) -> dict[str, list[float]]:
    """Seconds per call of each case, measured in turns: ``warmup`` untimed rounds, then ``rounds`` timed.

    The order rotates by one case per round, so no case always runs right after the same neighbour.
    """
    names = list(cases)
    for _ in range(warmup):
        for name in names:
            cases[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            synchronize(device)
            t0 = time.perf_counter()
            cases[name]()
            synchronize(device)
            times[name].append(time.perf_counter() - t0)
    return times


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def paired_ratio(slow: Sequence[float], fast: Sequence[float]) -> float:
    """Median over rounds of ``slow_i / fast_i``: speed-up of ``fast``, robust to load varying by round."""
    return statistics.median(s / f for s, f in zip(slow, fast))


# ----------------------------------------------------------------------------------------------- memory
def resident_bytes(*objects: torch.nn.Module | torch.optim.Optimizer | torch.Tensor) -> int:
    """Bytes of the distinct storages of modules (parameters, buffers, grads), optimizer state, tensors."""
    tensors: list[torch.Tensor] = []
    for obj in objects:
        if isinstance(obj, torch.nn.Module):
            tensors += [*obj.parameters(), *obj.buffers()]
            tensors += [p.grad for p in obj.parameters() if p.grad is not None]
        elif isinstance(obj, torch.optim.Optimizer):
            tensors += [v for st in obj.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
        else:
            tensors.append(obj)
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if t.numel()}
    return sum(storages.values())


def peak_step_memory(fn: Callable[[], Any], device: torch.device, resident: int) -> int:
    """Peak bytes while ``fn`` runs: ``resident`` (state that lives between steps) + the step's own peak."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        synchronize(device)
        return resident + torch.cuda.max_memory_allocated(device) - base
    with TensorMemoryTracker() as tracker:
        fn()
    return resident + tracker.peak


# --------------------------------------------------------------------------------------------- compute
def gemm_tflops(device: torch.device, dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """Best-of-``repeats`` TFLOP/s of an ``n x n`` matmul: the practical peak of a CPU in this run."""
    a = torch.randn(n, n, device=device).to(dtype)
    a @ a  # warm-up (library initialisation)
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        a @ a
        synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e12


@functools.cache
def peak_tflops(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """(peak TFLOP/s for MFU, where it comes from).

    GPUs: the dense bf16 spec-sheet peak (``ldm.callbacks.PEAK_TFLOPS``; docs/DECISIONS.md R10 MFU convention, also
    for fp32 runs). CPUs: a square GEMM measured in ``dtype``, once per process.
    """
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for fragment, tflops in PEAK_TFLOPS.items():
            if fragment in name:
                return tflops, f"{fragment} dense bf16 spec"
        return gemm_tflops(device, torch.bfloat16), "measured bf16 GEMM (unknown GPU)"
    return gemm_tflops(device, dtype), f"measured {str(dtype).removeprefix('torch.')} GEMM on this CPU"


# --------------------------------------------------------------------------------------------- reports
def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "-"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine(device: torch.device, threads: int | None = None) -> str:
    """One line: CPU (logical cores), GPU, OS, and the versions that change the numbers.

    ``threads``: the torch thread count the timed work ran with, where that was another process's (default:
    this process's).
    """
    threads = threads or torch.get_num_threads()
    parts = [f"{_cpu_name()}, {os.cpu_count()} logical cores, {threads} torch thread{'s' * (threads != 1)}"]
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        parts.append(f"{props.name} ({props.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}")
    parts.append(f"{platform.system()} {platform.release()}")
    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "pytorch-lightning": _version("pytorch-lightning"), "open_clip": _version("open_clip_torch")}
    return "; ".join(parts) + "; " + ", ".join(f"{k} {v}" for k, v in versions.items())


def run_header(device: torch.device, threads: int | None = None) -> str:
    """Markdown lines naming the date, the exact command and the machine (``threads``: see ``machine``)."""
    command = " ".join(["python", *(a if " " not in a else repr(a) for a in sys.argv)])
    return (f"#### Run of {dt.date.today().isoformat()}\n\nCommand: `{command}`\n"
            f"Machine: {machine(device, threads)}.\n")


def load_average() -> str:
    """The 1, 5 and 15 minute load averages ("-" where the OS has none): how busy a shared machine was."""
    try:
        return " / ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "-"


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(heading: str, text: str, intro: str = "", doc: Path = DOC) -> Path:
    """Insert ``text`` at the end of the ``## heading`` section of ``doc`` (sections after it stay in place).

    A missing section is appended at the end of the file with ``intro`` and a ``### Results log`` heading;
    a missing file is created with a ``# Benchmarks`` title.
    """
    content = doc.read_text(encoding="utf-8") if doc.exists() else "# Benchmarks\n"
    marker = f"\n## {heading}\n"
    start = content.find(marker)
    if start < 0:
        section = f"## {heading}\n\n{intro.strip()}\n\n### Results log\n".replace("\n\n\n", "\n\n")
        content = f"{content.rstrip()}\n\n{section}"
        start = content.find(marker)
    end = content.find("\n## ", start + len(marker))
    end = len(content) if end < 0 else end + 1
    tail = f"\n{content[end:]}" if end < len(content) else ""
    content = f"{content[:end].rstrip()}\n\n{text.strip()}\n{tail}"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(content, encoding="utf-8")
    return doc


def synthetic_batch(batch: int, size: int, device: torch.device, seed: int = 0) -> dict[str, Any]:
    """A training batch in the LAION layout (docs/DECISIONS.md R7) from ``ldm.data.synthetic``: images, masks, text."""
    rng = np.random.default_rng(seed)
    samples = [synthetic_sample(rng, size, "512train-large", p_drop=0.25) for _ in range(batch)]
    out: dict[str, Any] = {k: torch.from_numpy(np.stack([s[k] for s in samples])).to(device)  # B x H x W x C
                           for k in ("jpg", "mask", "masked_image")}
    out["txt"] = [s["txt"] for s in samples]
    return out
