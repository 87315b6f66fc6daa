#!/usr/bin/env python
"""What hashing a checkpoint costs: the SHA-256 that keys ``scripts/evaluate.py``'s samples.

``ldm.eval.run.checkpoint_sha256`` caches the hash under the file's (device, inode, size, mtime, ctime); this
measures what the cache saves. It writes a file of ``--gb`` GB (random blocks, default 5: a full-state SD2
checkpoint is about 15.6 GB, a weights-only one 8.7 GB, an fp16 export 2.6 GB) in ``--dir``, hashes it twice
with ``ldm.eval.feature_metrics.file_sha256`` (the first read may come partly from the page cache the write
filled), and hashes 1 GiB held in memory (the CPU cost alone). The file is deleted afterwards.

    python benchmarks/checkpoint_hash.py --gb 5 --dir /tmp
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path

HEADING = "Checkpoint hashing"
INTRO = """`python benchmarks/checkpoint_hash.py`: seconds to SHA-256 a checkpoint-sized file (what
`scripts/evaluate.py` does to key a checkpoint's samples, cached under the file's device, inode, size, mtime and
ctime; docs/EVALUATION.md) and the CPU cost alone (1 GiB in memory). The cache is what keeps a re-scoring run
(every sample already drawn) from reading every checkpoint whole."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gb", type=float, default=5.0, help="file size in GB (10^9 bytes)")
    p.add_argument("--dir", default=tempfile.gettempdir(), help="where to write the file (needs --gb free)")
    p.add_argument("--no-write", action="store_true", help="print only, do not append to docs/BENCHMARKS.md")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch
    from common import markdown_table, run_header, write_results

    from ldm.eval.feature_metrics import file_sha256

    block = os.urandom(1 << 26)  # 64 MiB
    t0 = time.perf_counter()
    h = hashlib.sha256()
    for _ in range(16):
        h.update(block)
    memory_rate = 1.0 / (time.perf_counter() - t0)  # GiB/s

    size = int(args.gb * 1e9)
    fd, name = tempfile.mkstemp(dir=args.dir, suffix=".ckpt")
    path = Path(name)
    rows = []
    try:
        with os.fdopen(fd, "wb") as f:
            for written in range(0, size, len(block)):
                f.write(block[: min(len(block), size - written)])
        for attempt in ("first", "second"):
            t0 = time.perf_counter()
            file_sha256(path)
            seconds = time.perf_counter() - t0
            rows.append((f"{args.gb:g} GB file, {attempt} read", f"{seconds:.1f}", f"{size / 2**30 / seconds:.2f}"))
    finally:
        path.unlink(missing_ok=True)
    rows.append(("1 GiB in memory (CPU only)", f"{1 / memory_rate:.2f}", f"{memory_rate:.2f}"))
    text = (f"{run_header(torch.device('cpu'))}\nFile system of `--dir`: {args.dir}.\n\n"
            + markdown_table(["case", "seconds", "GiB/s"], rows) + "\n")
    print(text)
    if not args.no_write:
        write_results(HEADING, text, INTRO)
    return 0


if __name__ == "__main__":
    sys.exit(main())
