#!/usr/bin/env python
"""Write img2dataset-compatible WebDataset shards from a captioned image folder or the embedded demo set.

Output: ``OUT/00000.tar ...`` (``<key>.jpg``, ``<key>.txt``, ``<key>.json``) and ``OUT/00000_stats.json ...``;
with ``--val-fraction`` the held-out images go to ``OUT/val`` and the rest to ``OUT/train``. The brace
pattern to put in a config's ``shards`` is logged at the end. ``OUT`` must be empty (or absent): old shards
next to new ones would be read by a pattern or a glob as one data set. ``--overwrite`` removes the files a
previous run wrote there first (shards, their stats, a ``latent_moments.json``), logged. Each shard is written
under a ``.partial`` name and renamed when complete.

Bad inputs are skipped and counted by reason, with the training pipeline's counter names (``ldm.data.stats``):
``corrupt_image`` (does not decode), ``missing_image`` (a table row's file is absent), ``missing_caption`` (no
caption .txt, or an empty caption), ``bad_caption`` (a caption .txt that is not UTF-8; re-save it as UTF-8),
``extreme_aspect`` (a strip that, scaled to ``--size``, would exceed a JPEG's 65535 px per side; ``too_large``
with ``--resize-mode no``).
Each skip is logged with its file and a summary follows; the exit code is 2 only if nothing was written, or at
the first bad input with ``--strict`` (which then leaves no shards behind). Images are read by the project's
image rule (``ldm.data.rgb``: EXIF orientation applied, any mode to 8-bit RGB).

    # the demo set, 10 photos x 8 (crops after the first copy), 128 px, 1 photo in 5 held out
    python scripts/make_shards.py --demo --size 128 --repeat 8 --samples-per-shard 8 --val-fraction 0.2 --out demo
    # a folder with a caption .txt next to each image
    python scripts/make_shards.py --images photos/ --out shards/ --size 512
    # a folder plus a caption table (json, jsonl or csv; extra columns are copied into each .json)
    python scripts/make_shards.py --images photos/ --captions captions.csv --out shards/

Caption tables: a csv/jsonl of records, a json list of records, or a json object ``{file: caption}`` /
``{file: {caption: ..., <columns>}}``. The image column is ``--image-col`` (default: the first of file_name,
file, image, path, filename) relative to ``--images`` (or absolute); the caption column is ``--caption-col``
(default: the first of caption, text, TEXT).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import re
import sys
from collections import Counter
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
    p.add_argument("--min-size", type=int, default=0,
                   help="skip images whose short side is below this many pixels (default 0: keep all; smaller "
                        "than --size are enlarged, counted and reported)")
    p.add_argument("--resize-mode", choices=("keep_ratio", "center_crop", "no"), default="keep_ratio",
                   help="keep_ratio: short side to --size; center_crop: square --size crop; no: keep pixels")
    p.add_argument("--samples-per-shard", type=int, default=10_000, help="samples per tar file (default 10000)")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality")
    p.add_argument("--repeat", type=int, default=1, help="demo only: copies of each photo")
    p.add_argument("--augment", choices=("none", "crop"), default="crop", help="demo only: what copies 2.. are")
    p.add_argument("--val-fraction", type=float, default=0.0, help="fraction of source images held out")
    p.add_argument("--seed", type=int, default=0, help="seed of the held-out choice and the demo crops")
    p.add_argument("--manifest", type=Path, default=None, help="demo manifest (default: data/demo/manifest.yaml)")
    p.add_argument("--overwrite", action="store_true",
                   help="OUT may hold an earlier run's shards: remove them first (default: refuse a non-empty OUT)")
    p.add_argument("--strict", action="store_true",
                   help="stop at the first bad input (exit 2, no shards left) instead of skipping it")
    return p.parse_args(argv)


if __name__ == "__main__":
    parse_args()  # --help and usage errors answer here, before the slow imports below (torch)

import numpy as np  # noqa: E402
from demo_data import DEMO_MANIFEST, demo_records, load_manifest  # noqa: E402 - sibling module in scripts/
from tqdm import tqdm  # noqa: E402
from tqdm.contrib.logging import logging_redirect_tqdm  # noqa: E402

from ldm.data.rgb import open_rgb  # noqa: E402
from ldm.data.shard_writer import PARTIAL_SUFFIX, Record, brace_pattern, check_storable, write_shards  # noqa: E402

log = logging.getLogger("make_shards")
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
IMAGE_COLS = ("file_name", "file", "image", "path", "filename")
CAPTION_COLS = ("caption", "text", "TEXT")


#: files of OUT (or OUT/train, OUT/val) that a run writes: shards, their stats, partial files, latents sidecar
OWN_FILE = re.compile(rf"\d{{5}}(\.tar|_stats\.json)({re.escape(PARTIAL_SUFFIX)})?|latent_moments\.json")


class InputError(ValueError):
    """Bad command-line input; reported without a traceback."""


class Skips:
    """Inputs left out, counted by reason; each is logged with its file. With ``strict`` the first one raises."""

    def __init__(self, strict: bool) -> None:
        self.strict = strict
        self.counts: Counter[str] = Counter()

    def skip(self, reason: str, path: Path | str, detail: str) -> None:
        if self.strict:
            raise InputError(f"{path}: {reason}: {detail} (--strict stops at the first bad input)")
        self.counts[reason] += 1
        log.warning("skipped %s: %s: %s", path, reason, detail)

    def summary(self) -> str:
        total = sum(self.counts.values())
        if not total:
            return "no input skipped"
        return f"{total} input(s) skipped: " + ", ".join(f"{n} {r}" for r, n in sorted(self.counts.items()))


class Upscales:
    """Inputs with a short side below ``--size``, which the resize enlarges (blur the model then learns from):
    counted, with the largest factor, and reported at the end; ``--min-size`` skips the smallest instead."""

    def __init__(self) -> None:
        self.n = 0
        self.worst: tuple[float, Path, int, int] | None = None  # (factor, file, width, height)

    def note(self, path: Path, width: int, height: int, size: int) -> None:
        factor = size / min(width, height)
        if factor > 1:
            self.n += 1
            if self.worst is None or factor > self.worst[0]:
                self.worst = (factor, path, width, height)

    def report(self, size: int) -> None:
        if self.worst is not None:
            factor, path, w, h = self.worst
            log.warning("%d image(s) had a short side below --size %d and were enlarged to it (the most: %s, %dx%d, "
                        "%.1fx); pass --min-size to skip small photos (the shards keep original_width/height, so "
                        "a training filter can also drop them)", self.n, size, path, w, h, factor)


def read_caption(path: Path, skips: Skips) -> str | None:
    """The stripped UTF-8 caption in ``path`` (a BOM is allowed), or None after counting why it is unusable."""
    if not path.is_file():
        skips.skip("missing_caption", path, "no caption .txt next to the image; add one or pass --captions")
        return None
    try:
        caption = path.read_bytes().decode("utf-8-sig").strip()
    except UnicodeDecodeError as e:
        skips.skip("bad_caption", path, f"not UTF-8 ({e.reason} at byte {e.start}); re-save the file as UTF-8")
        return None
    if not caption:
        skips.skip("missing_caption", path, "the caption is empty")
        return None
    return caption


def prepare_output(out: Path, overwrite: bool) -> None:
    """Refuse a non-empty ``out``; with ``overwrite`` remove the files an earlier run wrote there (logged)."""
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file; give a folder")
    entries = sorted(out.rglob("*")) if out.is_dir() else []
    if not entries:
        return
    if not overwrite:
        raise InputError(f"--out {out} is not empty ({len(entries)} entries, e.g. {entries[0]}); new shards next "
                         "to old ones would be read as one data set. Choose an empty folder, or pass --overwrite "
                         "to remove the earlier shards first")
    own = [p for p in entries if p.is_file() and OWN_FILE.fullmatch(p.name)
           and p.parent in (out, out / "train", out / "val")]
    for path in own:
        path.unlink()
    log.warning("--overwrite: removed %d file(s) of an earlier run from %s (shards, stats, latents sidecar)",
                len(own), out)
    others = [p for p in entries if p.is_file() and p not in own]
    if others:
        log.warning("--overwrite: left %d other file(s) in %s, e.g. %s", len(others), out, others[0])


def remove_own_files(out: Path) -> None:
    """Delete the shards and stats under ``out`` (it held none when the run started)."""
    for folder in (out, out / "train", out / "val"):
        for path in folder.glob("*") if folder.is_dir() else []:
            if OWN_FILE.fullmatch(path.name):
                path.unlink()


def _pick(row: dict[str, Any], wanted: str | None, candidates: tuple[str, ...], what: str, src: Path) -> str:
    names = (wanted,) if wanted else candidates
    for name in names:
        if name in row:
            return name
    raise InputError(f"{src}: no {what} column (looked for {', '.join(names)}); set --{what}-col")


def read_caption_table(path: Path) -> list[dict[str, Any]]:
    """Rows of a json/jsonl/csv caption table (UTF-8) as dicts."""
    if not path.is_file():
        raise InputError(f"caption table {path} does not exist")
    suffix = path.suffix.lower()
    try:
        path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise InputError(f"caption table {path} is not UTF-8 ({e.reason} at byte {e.start}); re-save it as "
                         "UTF-8") from None
    try:
        if suffix == ".csv":
            with path.open(newline="", encoding="utf-8-sig") as f:
                return list(csv.DictReader(f))
        if suffix == ".jsonl":
            return [json.loads(line) for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
        if suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8-sig"))
            if isinstance(data, dict):  # {file: caption} or {file: {caption: ..., ...}}
                return [{"file_name": k, **(v if isinstance(v, dict) else {"caption": v})} for k, v in data.items()]
            if isinstance(data, list):
                return data
    except (ValueError, csv.Error) as e:
        raise InputError(f"cannot parse caption table {path}: {e}") from e
    raise InputError(f"caption table {path}: use a .json, .jsonl or .csv file")


def folder_items(images: Path, captions: Path | None, image_col: str | None, caption_col: str | None,
                 skips: Skips) -> list[tuple[Path, str, dict[str, Any]]]:
    """(image path, caption, extra columns) for every captioned image of a folder; the rest are counted skips."""
    if not images.is_dir():
        raise InputError(f"--images {images} is not a directory")
    if captions is None:
        files = sorted(p for p in images.rglob("*") if p.suffix.lower() in IMAGE_EXTS)
        if not files:
            raise InputError(f"no images ({', '.join(sorted(IMAGE_EXTS))}) under {images}")
        read = [(p, read_caption(p.with_suffix(".txt"), skips), {}) for p in files]
        return [item for item in read if item[1] is not None]
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
            skips.skip("missing_image", f"{captions} row {i}", f"image '{row.get(icol)}' not found under {images}")
        elif not caption:
            skips.skip("missing_caption", f"{captions} row {i}", f"image '{row.get(icol)}' has no caption")
        else:
            items.append((path, caption, {k: v for k, v in row.items() if k not in (icol, ccol)}))
    return items


def folder_records(items: list[tuple[Path, str, dict[str, Any]]], root: Path, skips: Skips,
                   size: int | None = None, resize_mode: str = "keep_ratio", min_size: int = 0,
                   upscales: Upscales | None = None) -> Iterator[Record]:
    for path, caption, meta in items:
        try:
            image = open_rgb(path)  # the project's one image rule: EXIF orientation, any mode -> 8-bit RGB
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError ...
            skips.skip("corrupt_image", path, f"{type(e).__name__}: {e}")
            continue
        if min(image.size) < min_size:
            skips.skip("too_small", path, f"{image.width}x{image.height}: short side below --min-size {min_size}")
            continue
        if upscales is not None and size is not None and resize_mode != "no":
            upscales.note(path, image.width, image.height, size)
        try:  # a strip scaled to --size can outgrow what a JPEG holds: skipped here, not a crash in the writer
            check_storable(image.width, image.height, size, resize_mode)
        except ValueError as e:
            skips.skip("too_large" if resize_mode == "no" else "extreme_aspect", path, str(e))
            continue
        # a caption table may name files outside --images (absolute paths, ../): their url is the path as given
        url = str(path.relative_to(root)) if path.is_relative_to(root) else str(path)
        yield Record(image=image, caption=caption, url=url, meta=meta)


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
    skips = Skips(args.strict)
    try:
        if args.size < 1 or args.samples_per_shard < 1 or args.repeat < 1 or args.min_size < 0:
            raise InputError("--size, --samples-per-shard and --repeat must be positive, --min-size >= 0")
        if not 1 <= args.quality <= 100:
            raise InputError(f"--quality must be in 1..100 (JPEG quality), got {args.quality}")
        if args.images is not None and args.images.resolve() in (args.out.resolve(), *args.out.resolve().parents):
            # --images is read recursively: a later run would also read whatever lands next to the shards
            raise InputError(f"--out {args.out} is inside --images {args.images}; choose a folder outside it")
        prepare_output(args.out, args.overwrite)
        if args.demo:
            sources = load_manifest(args.manifest or DEMO_MANIFEST)
        else:
            sources = folder_items(args.images, args.captions, args.image_col, args.caption_col, skips)
            if not sources:
                raise InputError(f"no usable inputs under {args.images} ({skips.summary()}; each is named above)")
        train_idx, val_idx = split_holdout(len(sources), args.val_fraction, args.seed)
        splits = [("train", train_idx), ("val", val_idx)] if val_idx else [("", train_idx)]
        written, upscales = 0, Upscales()
        for name, idx in splits:
            written += write_split(args, name, [sources[i] for i in idx], skips, upscales)
        upscales.report(args.size)
    except InputError as e:
        if args.strict:
            remove_own_files(args.out)  # --strict: no partial data set is left behind
        log.error("%s", e)
        return 2
    if skips.counts:
        log.warning("%s (each is named above)", skips.summary())
    if not written:
        log.error("no shards written: every input was skipped (%s)", skips.summary())
        return 2
    return 0


def write_split(args: argparse.Namespace, name: str, chosen: list[Any], skips: Skips,
                upscales: Upscales | None = None) -> int:
    """Write one split's shards under ``args.out[/name]``, log its brace pattern; return the samples written."""
    if args.demo:
        records, total = demo_records(chosen, args.repeat, args.augment, args.seed), len(chosen) * args.repeat
    else:
        records = folder_records(chosen, args.images, skips, args.size, args.resize_mode, args.min_size, upscales)
        total = len(chosen)
    out = args.out / name if name else args.out
    counted = Counted(records)
    with logging_redirect_tqdm():  # skip warnings on lines of their own, not glued to the progress bar
        paths = write_shards(tqdm(counted, total=total, desc=f"shards {name or 'all'}", unit="img"), out,
                             args.samples_per_shard, args.size, args.resize_mode, args.quality)
    n = counted.n
    if not paths:
        log.warning("%s: no samples written (every input of this split was skipped)", name or "all")
        return 0
    log.info("%s: %d samples in %d shards: %s", name or "all", n, len(paths), brace_pattern(paths))
    return n


class Counted:
    """An iterable over ``records`` that counts what it handed out (``n``)."""

    def __init__(self, records: Iterator[Record]) -> None:
        self.records, self.n = records, 0

    def __iter__(self) -> Iterator[Record]:
        for record in self.records:
            self.n += 1
            yield record


if __name__ == "__main__":
    sys.exit(main())
