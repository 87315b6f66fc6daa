"""The fixed held-out evaluation set: images (a folder or WebDataset shards) and seeded masks.

* :func:`load_folder` / :func:`load_shards` read images and captions, resize the short side (bicubic) and
  centre-crop to a square, exactly as the validation split of the SD configs (``Resize`` + ``CenterCrop``).
* Bad samples are skipped, counted and reported the way training does it (the same shard reader and sample
  decoder, ``ldm.data.decode.SampleProcessor``): a :class:`SkipLog` names the shard (or folder) and key of each
  skipped sample with its reason (``corrupt_image``, ``bad_caption``, ``truncated_tar``, ...); reading never
  aborts on one sample.
* :func:`fixed_masks` draws the masks of one preset from generators seeded by ``(seed, preset, image index)``,
  so every checkpoint, and every later run, is scored on the same holes. LaMa's evaluation presets keep LaMa's
  rule that masks covering more than half of the image are redrawn (DECISIONS R5).

Left out: LaMa's segmentation-based masks and its multi-mask-per-image proposals.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ldm.data.decode import SampleProcessor
from ldm.data.filters import MetadataFilter
from ldm.data.masks import MaxCoverage, get_mask_generator
from ldm.data.rgb import ImageLimits, open_rgb
from ldm.data.rng import stable_hash
from ldm.data.transforms import Crop, Resize
from ldm.image_io import IMAGE_EXTS

log = logging.getLogger(__name__)

#: default evaluation presets: LaMa thin/medium/thick (512) and SD's 512train-large
DEFAULT_MASK_MODES = ("lama-thin-512", "lama-medium-512", "lama-thick-512", "512train-large")
CAPTION_EXTS = ("txt",)
IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp")
#: the held-out set's size limits: no aspect-ratio filter (every image counts), the training pixel bound
EVAL_LIMITS = ImageLimits(max_pixels=50_000_000)


@dataclass(frozen=True)
class EvalImage:
    """One held-out image.

    Args:
        key: stable identifier (file stem or shard sample key), used in output names.
        image: ``size x size x 3`` uint8 RGB.
        caption: prompt for inpainting ("" when the source has none).
    """

    key: str
    image: np.ndarray
    caption: str


@dataclass
class SkipLog:
    """What reading the evaluation set skipped: counts by reason and every ``(source, reason, detail)``.

    It has the methods of ``ldm.data.stats.BadDataMonitor`` that the shard reader and the sample decoder call,
    but never stops: an evaluation set is read to the end and its skips are reported.

    Args:
        counts: records by reason (``ok``, ``shards`` and the reasons of ``ldm.data.stats``).
        skipped: one ``(shard or folder, reason, detail)`` per skipped record; the detail starts with the
            sample key (or the file name) for sample-level skips.
    """

    counts: Counter = field(default_factory=Counter)
    skipped: list[tuple[str, str, str]] = field(default_factory=list)

    def ok(self) -> None:
        self.counts["ok"] += 1

    def shard_opened(self) -> None:
        self.counts["shards"] += 1

    def skip(self, reason: str, url: str, detail: str = "") -> None:
        self.counts[reason] += 1
        self.skipped.append((url, reason, detail))
        log.warning("evaluation set: skipping (%s) in %s: %s", reason, url, detail)

    @property
    def total_skipped(self) -> int:
        return len(self.skipped)

    @property
    def by_reason(self) -> dict[str, int]:
        """Skipped records per reason, sorted by reason."""
        return {k: v for k, v in sorted(self.counts.items()) if k not in ("ok", "shards") and v}

    def summary(self) -> str:
        return f"{self.counts['ok']} images read, {self.total_skipped} skipped {self.by_reason or ''}".rstrip()

    def report(self, max_listed: int = 100) -> dict:
        """JSON-ready: images read, records skipped, counts by reason and the first ``max_listed`` skipped records
        (``source``, ``reason``, ``detail``); ``unlisted`` says how many more there were."""
        listed = [{"source": src, "reason": reason, "detail": detail}
                  for src, reason, detail in self.skipped[:max_listed]]
        return {"read": self.counts["ok"], "skipped": self.total_skipped, "by_reason": self.by_reason,
                "listed": listed, "unlisted": max(0, self.total_skipped - max_listed)}


def square(img: Image.Image, size: int) -> np.ndarray:
    """Short side to ``size`` (bicubic), then centre crop ``size x size`` (the SD validation transform)."""
    img = Resize(size, Image.Resampling.BICUBIC)(img, np.random.default_rng(0))
    return np.asarray(Crop(size, random=False)(img, np.random.default_rng(0)))


def _caption_file(path: Path) -> str:
    return path.read_bytes().decode("utf-8").strip() if path.is_file() else ""


def load_folder(folder: str | Path, size: int, limit: int | None = None,
                skips: SkipLog | None = None) -> list[EvalImage]:
    """Images of a folder (sorted by name); a ``NAME.txt`` next to ``NAME.jpg`` is its caption.

    Unreadable images and non-UTF-8 captions are skipped and recorded in ``skips`` (and logged).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"--images: folder not found: {folder}")
    files = [p for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_EXTS and not p.stem.endswith("_mask")]
    if not files:
        raise ValueError(f"--images: no images ({', '.join(IMAGE_EXTS)}) in {folder}")
    skips = skips if skips is not None else SkipLog()
    out = []
    for p in files:
        if limit is not None and len(out) >= limit:
            break
        try:
            caption = _caption_file(p.with_suffix(".txt"))
        except UnicodeDecodeError as e:
            skips.skip("bad_caption", str(folder), f"{p.name}: {p.stem}.txt is not UTF-8 ({e})")
            continue
        try:
            image = open_rgb(p, EVAL_LIMITS)
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError ...
            reason = getattr(e, "reason", "corrupt_image")
            skips.skip(reason, str(folder), f"{p.name}: {type(e).__name__}: {e}")
            continue
        skips.ok()
        out.append(EvalImage(p.stem, square(image, size), caption))
    _report(skips, str(folder))
    return out


def load_shards(shards: str | Sequence[str], size: int, limit: int | None = None,
                skips: SkipLog | None = None) -> list[EvalImage]:
    """The first ``limit`` samples of WebDataset shards (``jpg``/``png`` + ``txt``), in shard order.

    Samples are read and decoded by the training pipeline's reader and decoder; every bad record (unreadable or
    truncated shard, corrupt image, non-UTF-8 caption, missing image) is skipped and recorded in ``skips``.
    """
    from ldm.data.webdata import expand_shards, read_shard

    urls = expand_shards(shards, where="--shards")
    skips = skips if skips is not None else SkipLog()
    processor = SampleProcessor(image_key="jpg", metadata_filter=MetadataFilter(),
                                image_ops=[Resize(size, Image.Resampling.BICUBIC), Crop(size, random=False)],
                                uint8_images=True, limits=EVAL_LIMITS, require_caption=False)
    out: list[EvalImage] = []
    for url in urls:
        for raw in read_shard(url, skips):
            member = next((m for m in IMAGE_MEMBERS if m in raw), None)
            if member is None:
                skips.skip("missing_image", url, f"{raw['__key__']}: no {'/'.join(IMAGE_MEMBERS)} member")
                continue
            sample = processor({**raw, "jpg": raw[member]}, (0,), skips)
            if sample is None:
                continue
            skips.ok()
            out.append(EvalImage(str(sample["__key__"]).replace("/", "_"), sample["jpg"], sample["txt"]))
            if limit is not None and len(out) >= limit:
                _report(skips, str(shards))
                return out
    _report(skips, str(shards))
    if not out:
        raise ValueError(f"--shards: no readable image samples in {urls[:3]}{' ...' if len(urls) > 3 else ''} "
                         f"({skips.summary()})")
    return out


def _report(skips: SkipLog, source: str) -> None:
    if skips.total_skipped:
        log.warning("evaluation set %s: %s", source, skips.summary())


def fixed_masks(mode: str, count: int, size: int, seed: int = 0) -> list[np.ndarray]:
    """``count`` masks (``size x size`` float32, 1 = hole) of preset ``mode``, image ``i`` seeded by
    ``(seed, stable_hash(mode), i)``; LaMa presets reject masks covering more than 50 % (LaMa's eval rule)."""
    gen = get_mask_generator(mode)
    if mode.startswith("lama-") and mode != "lama-train":
        gen = MaxCoverage(gen, 0.5)
    return [gen(np.random.default_rng([seed, stable_hash(mode), i]), size, size).astype(np.float32)
            for i in range(count)]
