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
from ldm.data.masks import MaskCoverageError, MaxCoverage, get_mask_generator, preset_name
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
    """The first ``limit`` images of a folder (sorted by name); a ``NAME.txt`` next to ``NAME.jpg`` is its caption.

    Unreadable images and non-UTF-8 captions are skipped and recorded in ``skips`` (and logged). No readable
    image raises ValueError; fewer than ``limit`` is returned as found (:func:`require_count` decides).
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
    return _checked(out, skips, f"--images {folder}")


def load_shards(shards: str | Sequence[str], size: int, limit: int | None = None,
                skips: SkipLog | None = None) -> list[EvalImage]:
    """The first ``limit`` samples of WebDataset shards (``jpg``/``png`` + ``txt``), in shard order.

    Samples are read and decoded by the training pipeline's reader and decoder; every bad record (unreadable or
    truncated shard, corrupt image, non-UTF-8 caption, missing image) is skipped and recorded in ``skips``.
    No readable sample raises ValueError, as in :func:`load_folder`.
    """
    from ldm.data.webdata import expand_shards, read_shard

    urls = expand_shards(shards, where="--shards")
    where = "--shards " + (shards if isinstance(shards, str) else " ".join(shards[:3]) + (" ..." if len(shards) > 3
                                                                                         else ""))
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
                return _checked(out, skips, where)
    return _checked(out, skips, where)


def _checked(images: list[EvalImage], skips: SkipLog, where: str) -> list[EvalImage]:
    """The one rule of both sources: skips are logged, and a source without a readable image is an error.
    Whether fewer images than asked for will do is the caller's decision (:func:`require_count`)."""
    if skips.total_skipped:
        log.warning("evaluation set %s: %s", where, skips.summary())
    if not images:
        raise ValueError(f"{where}: no readable images ({skips.summary()})")
    return images


def require_count(images: Sequence[EvalImage], asked: int | None, skips: SkipLog, where: str,
                  opt_in: str | None = None, accept_fewer: bool = False) -> None:
    """Stop when the held-out set has fewer than ``asked`` images: a FID or a mean over fewer images is another
    number. With ``accept_fewer`` (the explicit opt-in called ``opt_in``) the shortfall is logged instead."""
    if asked is None or len(images) >= asked:
        return
    if accept_fewer:
        log.warning("%s: evaluating %d images instead of the %d asked for (%s); the results record both numbers",
                    where, len(images), asked, opt_in or "fewer accepted")
        return
    raise ValueError(f"{where}: {len(images)} readable images, {asked} asked for ({skips.summary()}); add images, "
                     f"ask for {len(images)}" + (f", or pass {opt_in} to evaluate on them" if opt_in else ""))


def fixed_masks(mode: str, count: int, size: int, seed: int = 0) -> list[np.ndarray]:
    """``count`` masks (``size x size`` float32, 1 = hole) of preset ``mode``, image ``i`` seeded by
    ``(seed, stable_hash(mode), i)``; LaMa presets reject masks covering more than 50 % (LaMa's eval rule).

    Presets draw at their native size and are resized to ``size`` (``ldm.data.masks.NativeSize``), so the
    coverage of a preset is the same at every evaluation size."""
    gen = get_mask_generator(mode)
    if preset_name(mode).startswith("lama-") and preset_name(mode) != "lama-train":
        gen = MaxCoverage(gen, 0.5)
    try:
        return [gen(np.random.default_rng([seed, stable_hash(mode), i]), size, size).astype(np.float32)
                for i in range(count)]
    except MaskCoverageError as e:
        raise MaskCoverageError(f"mask preset {mode!r} at {size} px: {e}") from None
