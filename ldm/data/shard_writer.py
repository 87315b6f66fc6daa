"""Writing img2dataset-compatible WebDataset shards (without installing img2dataset, see DECISIONS R11).

Layout, as img2dataset 1.47 writes it: ``<out>/00000.tar, 00001.tar, ...`` holding ``<key>.jpg``,
``<key>.txt`` (caption) and ``<key>.json`` per sample, plus ``<out>/00000_stats.json`` per shard. Keys are
the 5-digit shard id followed by the row index zero-padded to ``ceil(log10(samples_per_shard))`` digits
(at least one). The json holds the record's extra metadata columns first, then ``caption, url, key, status,
error_message, width, height, original_width, original_height, sha256`` (hash of the stored JPEG bytes;
img2dataset hashes the downloaded original, which a local source does not have).

Resize modes follow img2dataset: ``keep_ratio`` (shorter side to ``size``), ``center_crop`` (then a centre
square) and ``no``. ``original_width``/``original_height`` are the size of the record's source image.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from PIL import Image
from webdataset import TarWriter

from ldm.data.rgb import to_rgb8

log = logging.getLogger(__name__)
ResizeMode = Literal["keep_ratio", "center_crop", "no"]
#: suffix of a shard (or stats) file while it is being written
PARTIAL_SUFFIX = ".partial"
#: the largest width or height a JPEG can hold (16-bit fields in its frame header)
JPEG_MAX_SIDE = 65_535


@dataclass
class Record:
    """One sample to write.

    Args:
        image: The source image (any PIL mode; stored as RGB JPEG).
        caption: The caption text.
        url: Where the image came from (a path, or ``package://name`` for the demo set).
        meta: Extra metadata columns copied into the json (e.g. ``punsafe``, ``pwatermark``, ``aesthetic``).
    """

    image: Image.Image
    caption: str
    url: str
    meta: dict[str, Any] = field(default_factory=dict)


def resized_size(width: int, height: int, size: int | None, mode: ResizeMode) -> tuple[int, int]:
    """(width, height) that :func:`resize_image` scales a ``width x height`` image to, before any centre crop."""
    if mode not in ("keep_ratio", "center_crop", "no"):
        raise ValueError(f"unknown resize mode '{mode}'; use keep_ratio, center_crop or no")
    if size is None or mode == "no":
        return width, height
    scale = size / min(width, height)
    return max(size, round(width * scale)), max(size, round(height * scale))


def check_storable(width: int, height: int, size: int | None, mode: ResizeMode) -> None:
    """Raise ``ValueError`` when a ``width x height`` image would be stored wider or taller than a JPEG can be.

    Checked before resizing: a 3000 x 10 strip scaled to a 512 px short side would need a 153600 x 512 buffer,
    and then fail in the JPEG encoder anyway.
    """
    stored = resized_size(width, height, size, mode)
    if mode == "center_crop" and size is not None:
        stored = (size, size)
    if max(stored) > JPEG_MAX_SIDE:
        raise ValueError(f"a {width}x{height} image would be stored at {stored[0]}x{stored[1]}, beyond the JPEG "
                         f"limit of {JPEG_MAX_SIDE} px per side; crop it, or use --resize-mode center_crop")


def resize_image(img: Image.Image, size: int | None, mode: ResizeMode) -> Image.Image:
    """Resize like img2dataset's ``resize_mode`` (LANCZOS; antialiased when shrinking), after the project's decode
    rule (``ldm.data.rgb.to_rgb8``: any mode to 8-bit RGB, alpha composited on white)."""
    new = resized_size(img.width, img.height, size, mode)  # validates ``mode`` before any work
    img = to_rgb8(img)
    img = img.resize(new, Image.Resampling.LANCZOS) if new != img.size else img
    if mode == "center_crop" and size is not None:
        left, top = (img.width - size) // 2, (img.height - size) // 2
        img = img.crop((left, top, left + size, top + size))
    return img


def _encode_jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _chunks(records: Iterable[Record], n: int) -> Iterator[list[Record]]:
    chunk: list[Record] = []
    for r in records:
        chunk.append(r)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def write_shards(
    records: Iterable[Record],
    out_dir: str | Path,
    samples_per_shard: int = 10_000,
    size: int | None = 512,
    resize_mode: ResizeMode = "keep_ratio",
    quality: int = 95,
    first_shard: int = 0,
) -> list[Path]:
    """Write ``records`` as numbered tar shards plus per-shard stats json; return the tar paths.

    Each file is written under a ``.partial`` name and renamed into place once complete, so a reader (or a crash)
    never sees a half-written shard under a shard name. Existing files of the same names are replaced; keeping
    old shards out of the folder is the caller's job (``scripts/make_shards.py`` refuses a non-empty folder).
    """
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    digits = max(1, math.ceil(math.log10(samples_per_shard)))
    paths = []
    for shard_id, chunk in enumerate(_chunks(records, samples_per_shard), start=first_shard):
        start = time.time()
        path = out / f"{shard_id:05d}.tar"
        with _atomic(path) as partial, TarWriter(str(partial)) as sink:
            for row, rec in enumerate(chunk):
                key = f"{shard_id:05d}{row:0{digits}d}"
                check_storable(rec.image.width, rec.image.height, size, resize_mode)
                img = resize_image(rec.image, size, resize_mode)
                jpg = _encode_jpeg(img, quality)
                meta = {**rec.meta, "caption": rec.caption, "url": rec.url, "key": key, "status": "success",
                        "error_message": None, "width": img.width, "height": img.height,
                        "original_width": rec.image.width, "original_height": rec.image.height,
                        "sha256": hashlib.sha256(jpg).hexdigest()}
                sink.write({"__key__": key, "jpg": jpg, "txt": rec.caption, "json": json.dumps(meta)})
        end = time.time()
        stats = {"count": len(chunk), "successes": len(chunk), "failed_to_download": 0, "failed_to_resize": 0,
                 "duration": end - start, "start_time": start, "end_time": end,
                 "status_dict": {"success": len(chunk)}}
        with _atomic(out / f"{shard_id:05d}_stats.json") as partial:
            partial.write_text(json.dumps(stats, indent=2))
        paths.append(path)
        log.debug("wrote %s (%d samples)", path, len(chunk))
    return paths


@contextlib.contextmanager
def _atomic(path: Path) -> Iterator[Path]:
    """Yield ``<path>.partial`` to write; rename it to ``path`` on success, delete it on any error."""
    partial = path.with_name(path.name + PARTIAL_SUFFIX)
    try:
        yield partial
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def brace_pattern(paths: list[Path]) -> str:
    """The ``{00000..000NN}.tar`` pattern covering consecutive shard paths (for a config's ``shards``)."""
    if not paths:
        raise ValueError("no shards written")
    first, last = paths[0].stem, paths[-1].stem
    return str(paths[0].parent / (f"{first}.tar" if first == last else f"{{{first}..{last}}}.tar"))


__all__ = ["JPEG_MAX_SIDE", "PARTIAL_SUFFIX", "Record", "ResizeMode", "brace_pattern", "check_storable",
           "resize_image", "resized_size", "write_shards"]
