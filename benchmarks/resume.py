"""Resume cost of the training data stream: time from a saved stream position to the next batch, at sample
positions P = 1e3, 1e4 and 1e5, and the size of the saved position.

Shards: ``--shards`` tars of ``--per-shard`` real photos (the demo set, seeded crops stored as ``--size`` px
JPEGs). Stream: the training split's resampled stream with a shuffle buffer of ``--buffer`` samples (and of
10x that for the state size), batches of 8, JPEG decode + random crop + ``AddMask``, in one process, on
local shards.

Reaching position P: the stream first runs with a processor that keeps every sample and decodes nothing (when
no sample is rejected the position after P samples does not depend on decoding), then its saved position is
restored into a stream with the real processor, and the time to that stream's first batch is measured: it
re-reads the buffered samples, re-enters the current shard by its headers, and decodes one batch. For
comparison, "replay" is the time to reach P by reading and decoding every sample, what a loader without a saved
position pays to get back to P (or one that fast-forwards by discarding batches); it is measured at P = 1e3 and
scaled linearly. All times are CPU seconds of this process (medians of ``--repeats``), so other jobs on the
machine do not inflate them.
"""

from __future__ import annotations

import argparse
import logging
import pickle
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))  # demo_data

import torch  # noqa: E402
from common import markdown_table, run_header, write_results  # noqa: E402
from demo_data import demo_records, load_manifest  # noqa: E402 - scripts/demo_data.py

from ldm.data.laion import WebDataModuleFromConfig  # noqa: E402
from ldm.data.shard_writer import write_shards  # noqa: E402
from ldm.data.stats import SharedCounts  # noqa: E402
from ldm.data.webdata import ShardStream  # noqa: E402

HEADING = "Data stream resume"
INTRO = """Script: `python benchmarks/resume.py` (several minutes: it writes 16,000 JPEGs and runs the stream to
100,000 samples twice; `--no-write` prints only).

Time from a saved training-stream position to the next batch at sample position P, the size of that saved
position, and the cost of getting back to P without one. Exact resume is described in `docs/DECISIONS.md`
(D15) and `ldm/data/webdata.py`; the target is a resume cost bounded by the shuffle buffer and the shard size,
independent of P."""


def passthrough(raw: dict[str, Any], words: tuple[int, ...], mon: Any) -> dict[str, Any]:  # noqa: ARG001
    return {"__key__": raw["__key__"]}


def stream(urls: list[str], processor: Callable, buffer: int) -> ShardStream:
    return ShardStream(urls, processor, split="train", batch_size=8, partial=False, resampled=True, shuffle=buffer,
                       seed=0, counts=SharedCounts(1), rank=0, world_size=1, resume_step=0, log_every_s=1e9)


def position(urls: list[str], buffer: int, samples: int) -> dict[str, Any]:
    """The saved position after ``samples`` samples (passed through without decoding)."""
    ds = stream(urls, passthrough, buffer)
    it = iter(ds)
    for _ in range(samples // 8):
        next(it)
    return ds.state_dict()


def cpu_seconds(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", type=int, default=16, help="tar shards written")
    p.add_argument("--per-shard", type=int, default=1000, help="samples per shard")
    p.add_argument("--size", type=int, default=128, help="stored image size (short side, px)")
    p.add_argument("--buffer", type=int, default=1000, help="shuffle buffer of the timed stream")
    p.add_argument("--positions", type=int, nargs="+", default=[1_000, 10_000, 100_000], help="sample positions P")
    p.add_argument("--repeats", type=int, default=5, help="timed resumes per position (median reported)")
    p.add_argument("--no-write", action="store_true", help="print only; do not add the run to docs/BENCHMARKS.md")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        records = demo_records(load_manifest(), repeat=-(-args.shards * args.per_shard // 10), seed=0)
        paths = write_shards(records, Path(tmp), samples_per_shard=args.per_shard, size=args.size,
                             resize_mode="center_crop")[: args.shards]
        urls = [str(p) for p in paths]
        shard_mb = float(np.mean([p.stat().st_size for p in paths])) / 2**20
        crop = [{"target": "torchvision.transforms.RandomCrop", "params": {"size": args.size}}]
        mask = {"target": "ldm.data.laion.AddMask", "params": {"mode": "512train-large", "p_drop": 0.25}}
        dm = WebDataModuleFromConfig(batch_size=8, num_workers=0, train={
            "shards": urls, "shuffle": args.buffer, "image_transforms": crop, "postprocess": mask})
        processor = dm.splits["train"].processor

        def replay() -> None:
            it = iter(stream(urls, processor, args.buffer))
            for _ in range(1000 // 8):
                next(it)

        per_sample = cpu_seconds(replay, 1) / 1000
        fresh = cpu_seconds(lambda: next(iter(stream(urls, processor, args.buffer))), args.repeats)
        rows = []
        for pos in args.positions:
            state = position(urls, args.buffer, pos)
            big = position(urls, 10 * args.buffer, pos)

            def resume(state: dict[str, Any] = state) -> None:
                ds = stream(urls, processor, args.buffer)
                ds.load_state_dict(state)
                next(iter(ds))

            t = cpu_seconds(resume, args.repeats)
            rows.append([f"{pos:,}", f"{t * 1e3:.0f}", f"{len(pickle.dumps(state)) / 1024:.1f}",
                         f"{len(pickle.dumps(big)) / 1024:.1f}", f"{per_sample * pos:.1f}"])
            logging.getLogger("bench").warning("P=%d resume %.3f s", pos, t)
        snap_ds = stream(urls, passthrough, 10 * args.buffer)
        it = iter(snap_ds)
        for _ in range(2 * 10 * args.buffer // 8):
            next(it)
        snapshot_ms = cpu_seconds(snap_ds.state_dict, 20) * 1e3
    table = markdown_table(
        ["P (samples)", f"resume to next batch, ms (buffer {args.buffer})", f"state, kB (buffer {args.buffer})",
         f"state, kB (buffer {10 * args.buffer})", "replay to P, s (read + decode)"], rows)
    text = "\n".join([
        run_header(torch.device("cpu")),
        f"Shards: {args.shards} x {args.per_shard} demo photos at {args.size} px (JPEG q95, {shard_mb:.1f} MB each), "
        f"local disk. First batch of a new stream (buffer fills to {min(args.buffer, 100)} samples first): "
        f"{fresh * 1e3:.0f} ms. Reading and decoding one sample: {per_sample * 1e3:.2f} ms.", "",
        table, "",
        f"Taking a worker's state (what each batch carries through the worker queue) with a full buffer of "
        f"{10 * args.buffer} samples: {snapshot_ms:.2f} ms.",
    ])
    print(text)
    if not args.no_write:
        write_results(HEADING, text, INTRO)


if __name__ == "__main__":
    main()
