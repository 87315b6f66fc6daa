#!/usr/bin/env python
"""Write img2dataset-compatible WebDataset shards from a captioned image folder or the embedded demo set.

Output: ``OUT/00000.tar ...`` (``<key>.jpg``, ``<key>.txt``, ``<key>.json``) and ``OUT/00000_stats.json ...``;
with ``--val-fraction`` the held-out images go to ``OUT/val`` and the rest to ``OUT/train``. The brace
pattern to put in a config's ``shards`` is logged at the end.

    # the demo set, 10 photos x 8 (crops after the first copy), 128 px, 1 photo in 5 held out
    python scripts/make_shards.py --demo --size 128 --repeat 8 --samples-per-shard 8 --val-fraction 0.2 --out demo
    # a folder with a caption .txt next to each image
    python scripts/make_shards.py --images photos/ --out shards/ --size 512
    # a folder plus a caption table (json, jsonl or csv; extra columns are copied into each .json)
    python scripts/make_shards.py --images photos/ --captions captions.csv --out shards/

Caption tables: a csv/jsonl of records, a json list of records, or a json object ``{file: caption}`` /
``{file: {caption: ..., <columns>}}``. The image column is ``--image-col`` (default: the first of file_name,
file, image, path, filename) relative to ``--images``; the caption column is ``--caption-col`` (default: the
first of caption, text, TEXT).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--demo", action="store_true", help="use the embedded demo set (see --manifest)")
    src.add_argument("--images", type=Path, help="folder of images")
    p.add_argument("--captions", type=Path, help="caption table (.json/.jsonl/.csv); default: .txt per image")
    p.add_argument("--image-col", help="image column of the caption table")
    p.add_argument("--caption-col", help="caption column of the caption table")
    p.add_argument("--out", "--outdir", type=Path, required=True, help="output folder")
    p.add_argument("--size", type=int, default=512, help="target size in pixels (see --resize-mode)")
    p.add_argument("--resize-mode", choices=("keep_ratio", "center_crop", "no"), default="keep_ratio",
                   help="keep_ratio: short side to --size; center_crop: square --size crop; no: keep pixels")
    p.add_argument("--samples-per-shard", type=int, default=10_000, help="samples per tar file (default 10000)")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality")
    p.add_argument("--repeat", type=int, default=1, help="demo only: copies of each photo")
    p.add_argument("--augment", choices=("none", "crop"), default="crop", help="demo only: what copies 2.. are")
    p.add_argument("--val-fraction", type=float, default=0.0, help="fraction of source images held out")
    p.add_argument("--seed", type=int, default=0, help="seed of the held-out choice and the demo crops")
    p.add_argument("--manifest", type=Path, default=None, help="demo manifest (default: data/demo/manifest.yaml)")
    return p.parse_args(argv)


if __name__ == "__main__":
    parse_args()  # --help and usage errors answer here, before the slow imports below (torch)

import numpy as np  # noqa: E402
from demo_data import DEMO_MANIFEST, demo_records, load_manifest  # noqa: E402 - sibling module in scripts/
from tqdm import tqdm  # noqa: E402

from ldm.data.rgb import open_rgb  # noqa: E402
from ldm.data.shard_writer import Record, brace_pattern, write_shards  # noqa: E402
from ldm.image_io import read_text  # noqa: E402

log = logging.getLogger("make_shards")
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
IMAGE_COLS = ("file_name", "file", "image", "path", "filename")
CAPTION_COLS = ("caption", "text", "TEXT")


class InputError(ValueError):
    """Bad command-line input; reported without a traceback."""


def _pick(row: dict[str, Any], wanted: str | None, candidates: tuple[str, ...], what: str, src: Path) -> str:
    names = (wanted,) if wanted else candidates
    for name in names:
        if name in row:
            return name
    raise InputError(f"{src}: no {what} column (looked for {', '.join(names)}); set --{what}-col")


def read_caption_table(path: Path) -> list[dict[str, Any]]:
    """Rows of a json/jsonl/csv caption table as dicts."""
    if not path.is_file():
        raise InputError(f"caption table {path} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            with path.open(newline="", encoding="utf-8") as f:
                return list(csv.DictReader(f))
        if suffix == ".jsonl":
            return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(data, dict):  # {file: caption} or {file: {caption: ..., ...}}
                return [{"file_name": k, **(v if isinstance(v, dict) else {"caption": v})} for k, v in data.items()]
            if isinstance(data, list):
                return data
    except UnicodeDecodeError as e:
        raise InputError(f"caption table {path} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset "
                         f"{e.start}); save it as UTF-8") from None
    except (ValueError, csv.Error) as e:
        raise InputError(f"cannot parse caption table {path}: {e}") from e
    raise InputError(f"caption table {path}: use a .json, .jsonl or .csv file")


def _caption_file(path: Path) -> str:
    try:
        return read_text(path, "caption file").strip()
    except ValueError as e:  # not UTF-8: names the file and says to save it as UTF-8
        raise InputError(str(e)) from None


def folder_items(images: Path, captions: Path | None, image_col: str | None,
                 caption_col: str | None) -> list[tuple[Path, str, dict[str, Any]]]:
    """(image path, caption, extra columns) for every captioned image of a folder."""
    if not images.is_dir():
        raise InputError(f"--images {images} is not a directory")
    if captions is None:
        files = sorted(p for p in images.rglob("*") if p.suffix.lower() in IMAGE_EXTS)
        if not files:
            raise InputError(f"no images ({', '.join(sorted(IMAGE_EXTS))}) under {images}")
        missing = [p for p in files if not p.with_suffix(".txt").is_file()]
        if missing:
            raise InputError(f"{len(missing)} image(s) have no caption .txt next to them, e.g. "
                             f"{', '.join(str(p) for p in missing[:5])}; add them or pass --captions")
        return [(p, _caption_file(p.with_suffix(".txt")), {}) for p in files]
    rows = read_caption_table(captions)
    if not rows:
        raise InputError(f"caption table {captions} has no rows")
    icol = _pick(rows[0], image_col, IMAGE_COLS, "image", captions)
    ccol = _pick(rows[0], caption_col, CAPTION_COLS, "caption", captions)
    items = []
    for i, row in enumerate(rows):
        path = images / str(row.get(icol, ""))
        caption = str(row.get(ccol) or "").strip()
        if not path.is_file():
            raise InputError(f"{captions} row {i}: image '{row.get(icol)}' not found under {images}")
        if not caption:
            raise InputError(f"{captions} row {i}: image '{row.get(icol)}' has no caption")
        items.append((path, caption, {k: v for k, v in row.items() if k not in (icol, ccol)}))
    return items


def folder_records(items: list[tuple[Path, str, dict[str, Any]]], root: Path) -> Iterator[Record]:
    for path, caption, meta in items:
        try:
            image = open_rgb(path)  # the project's one decode rule: any mode -> 8-bit RGB, alpha on white
        except (OSError, ValueError) as e:
            raise InputError(f"cannot read image {path}: {e}") from e
        yield Record(image=image, caption=caption, url=str(path.relative_to(root)), meta=meta)


def split_holdout(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train indices, held-out indices): a seeded choice of ``round(n * fraction)`` items (>= 1 if fraction > 0)."""
    if not 0.0 <= fraction < 1.0:
        raise InputError(f"--val-fraction must be in [0, 1), got {fraction}")
    n_val = 0 if fraction == 0 else min(n - 1, max(1, round(n * fraction)))
    order = np.random.default_rng(seed).permutation(n).tolist()
    return sorted(order[n_val:]), sorted(order[:n_val])


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        if args.size < 1 or args.samples_per_shard < 1 or args.repeat < 1:
            raise InputError("--size, --samples-per-shard and --repeat must be positive")
        if args.demo:
            sources = load_manifest(args.manifest or DEMO_MANIFEST)
        else:
            sources = folder_items(args.images, args.captions, args.image_col, args.caption_col)
        train_idx, val_idx = split_holdout(len(sources), args.val_fraction, args.seed)
        splits = [("train", train_idx), ("val", val_idx)] if val_idx else [("", train_idx)]
        for name, idx in splits:
            chosen = [sources[i] for i in idx]
            if args.demo:
                records, total = demo_records(chosen, args.repeat, args.augment, args.seed), len(chosen) * args.repeat
            else:
                records, total = folder_records(chosen, args.images), len(chosen)
            out = args.out / name if name else args.out
            paths = write_shards(tqdm(records, total=total, desc=f"shards {name or 'all'}", unit="img"), out,
                                 args.samples_per_shard, args.size, args.resize_mode, args.quality)
            log.info("%s: %d samples in %d shards: %s", name or "all", total, len(paths), brace_pattern(paths))
    except InputError as e:
        log.error("%s", e)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
