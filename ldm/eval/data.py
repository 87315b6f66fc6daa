"""The fixed held-out evaluation set: images (a folder or WebDataset shards) and seeded masks.

* :func:`load_folder` / :func:`load_shards` read images and captions, resize the short side (bicubic) and
  centre-crop to a square, exactly as the validation split of the SD configs (``Resize`` + ``CenterCrop``).
* :func:`fixed_masks` draws the masks of one preset from generators seeded by ``(seed, preset, image index)``,
  so every checkpoint, and every later run, is scored on the same holes. LaMa's evaluation presets keep LaMa's
  rule that masks covering more than half of the image are redrawn (DECISIONS R5).

Left out: LaMa's segmentation-based masks and its multi-mask-per-image proposals.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ldm.data.decode import decode_image
from ldm.data.masks import MaxCoverage, get_mask_generator
from ldm.data.rng import stable_hash
from ldm.data.transforms import Crop, Resize
from ldm.image_io import IMAGE_EXTS

log = logging.getLogger(__name__)

#: default evaluation presets: LaMa thin/medium/thick (512) and SD's 512train-large
DEFAULT_MASK_MODES = ("lama-thin-512", "lama-medium-512", "lama-thick-512", "512train-large")
CAPTION_EXTS = ("txt",)
IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp")


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


def square(img: Image.Image, size: int) -> np.ndarray:
    """Short side to ``size`` (bicubic), then centre crop ``size x size`` (the SD validation transform)."""
    img = Resize(size, Image.Resampling.BICUBIC)(img.convert("RGB"), np.random.default_rng(0))
    return np.asarray(Crop(size, random=False)(img, np.random.default_rng(0)))


def load_folder(folder: str | Path, size: int, limit: int | None = None) -> list[EvalImage]:
    """Images of a folder (sorted by name); a ``NAME.txt`` next to ``NAME.jpg`` is its caption."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"--images: folder not found: {folder}")
    files = [p for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_EXTS and not p.stem.endswith("_mask")]
    if not files:
        raise ValueError(f"--images: no images ({', '.join(IMAGE_EXTS)}) in {folder}")
    out = []
    for p in files[:limit]:
        caption_file = p.with_suffix(".txt")
        caption = caption_file.read_text(encoding="utf-8").strip() if caption_file.is_file() else ""
        with Image.open(p) as img:
            out.append(EvalImage(p.stem, square(img, size), caption))
    return out


def load_shards(shards: str | Sequence[str], size: int, limit: int | None = None) -> list[EvalImage]:
    """The first ``limit`` samples of WebDataset shards (``jpg``/``png`` + ``txt``), in shard order."""
    import webdataset as wds

    from ldm.data.webdata import expand_shards

    urls = expand_shards(shards, where="--shards")
    dataset = wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False)
    out: list[EvalImage] = []
    for sample in dataset:
        member = next((m for m in IMAGE_MEMBERS if m in sample), None)
        if member is None:
            log.warning("shard sample %s has no image member; skipped", sample.get("__key__"))
            continue
        caption = sample.get("txt", b"").decode("utf-8").strip()
        out.append(EvalImage(str(sample["__key__"]).replace("/", "_"), square(decode_image(sample[member]), size),
                             caption))
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise ValueError(f"--shards: no image samples in {urls[:3]}{' ...' if len(urls) > 3 else ''}")
    return out


def fixed_masks(mode: str, count: int, size: int, seed: int = 0) -> list[np.ndarray]:
    """``count`` masks (``size x size`` float32, 1 = hole) of preset ``mode``, image ``i`` seeded by
    ``(seed, stable_hash(mode), i)``; LaMa presets reject masks covering more than 50 % (LaMa's eval rule)."""
    gen = get_mask_generator(mode)
    if mode.startswith("lama-") and mode != "lama-train":
        gen = MaxCoverage(gen, 0.5)
    return [gen(np.random.default_rng([seed, stable_hash(mode), i]), size, size).astype(np.float32)
            for i in range(count)]
