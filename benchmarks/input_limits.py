#!/usr/bin/env python
"""Cost of one hostile sample: a 16000 x 8 strip whose json claims 1000 x 1000, through the training decoder.

    python benchmarks/input_limits.py              # about half a minute; adds a run to docs/BENCHMARKS.md
    python benchmarks/input_limits.py --no-write   # print only

Each case runs in a fresh process: build the sample (a PNG strip, caption, json), then time
``SampleProcessor`` (the training decoder with the SD2 train transforms: bicubic Resize 512 + RandomCrop 512)
on it and read the peak resident memory it added (Linux ``VmHWM``, reset just before, minus the resident
size before).

* **limits on** (the defaults of ``WebDataModuleFromConfig``: ``max_aspect_ratio`` 10, ``max_pixels`` 50M):
  the header says 16000 x 8, the sample is skipped as ``extreme_aspect`` before any pixel is decoded.
* **limits off** (``max_aspect_ratio`` and ``max_pixels`` null, what the reference loader does): the strip is
  decoded and its short side upscaled to 512, a 1,024,000 x 512 image.
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

CASES = {"limits on": {"max_aspect_ratio": 10.0, "max_pixels": 50_000_000},
         "limits off": {"max_aspect_ratio": None, "max_pixels": None}}
HEADING = "Input limits"
INTRO = ("One hostile sample (a 16000 x 8 strip whose json claims 1000 x 1000) through the training decoder "
         "with the SD2 train transforms; `benchmarks/input_limits.py`. The limits are read from the image "
         "header, so a rejected sample costs no decode.")


def _rss_mb() -> float:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize() / 2**20


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux: the peak resident size (VmHWM) restarts from now


def _peak_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError("no VmHWM in /proc/self/status")


def child(case: str) -> dict[str, float | str]:
    import numpy as np
    from PIL import Image

    from ldm.data.decode import SampleProcessor
    from ldm.data.filters import MetadataFilter
    from ldm.data.rgb import ImageLimits
    from ldm.data.stats import BadDataMonitor, SharedCounts
    from ldm.data.transforms import build_image_transforms

    buf = io.BytesIO()
    Image.fromarray(np.full((8, 16000, 3), 120, np.uint8)).save(buf, format="PNG")
    raw = {"__key__": "strip", "__url__": "bench.tar", "jpg": buf.getvalue(), "txt": b"a long strip",
           "json": json.dumps({"original_width": 1000, "original_height": 1000}).encode()}
    ops = build_image_transforms([
        {"target": "torchvision.transforms.Resize", "params": {"size": 512, "interpolation": 3}},
        {"target": "torchvision.transforms.RandomCrop", "params": {"size": 512}}], where="bench")
    # no min_size: the json's 1000 x 1000 would pass it, and the point is the aspect and pixel limits
    processor = SampleProcessor("jpg", MetadataFilter(), ops, limits=ImageLimits(**CASES[case]))
    counts = SharedCounts(1)
    mon = BadDataMonitor(counts.row(0), 1.0, 10, "bench")
    before = _rss_mb()
    _reset_peak()
    t0 = time.perf_counter()
    sample = processor(raw, (0,), mon)
    seconds = time.perf_counter() - t0
    peak = _peak_mb()
    skipped = [k for k, v in counts.totals().items() if v and k != "ok"]
    return {"seconds": seconds, "peak_mb": max(0.0, peak - before),
            "outcome": "delivered" if sample is not None else f"skipped ({', '.join(skipped)})"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", choices=sorted(CASES), help=argparse.SUPPRESS)
    parser.add_argument("--no-write", action="store_true", help="print only, do not append to docs/BENCHMARKS.md")
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child)))
        return 0
    import torch
    from common import markdown_table, run_header, write_results

    rows = []
    for case in CASES:
        out = subprocess.run([sys.executable, __file__, "--child", case], capture_output=True, text=True,
                             check=True, cwd=REPO)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append((case, result["outcome"], f"{result['seconds'] * 1000:.2f}", f"{result['peak_mb']:.0f}"))
    table = markdown_table(["case", "outcome", "time (ms)", "peak RSS added (MB)"], rows)
    text = f"{run_header(torch.device('cpu'))}\n{table}\n"
    print(text)
    if not args.no_write:
        write_results(HEADING, text, INTRO)
    return 0


if __name__ == "__main__":
    sys.exit(main())
