"""A fixed, versioned held-out set for in-training evaluation: images, masks, prompts and seeds on disk.

Layout of a set folder::

    set.json          format version, size, per item: key, caption, mask preset, seed, file SHA-256s; and what
                      reading the shards skipped to fill it (``skipped``: counts by reason, named records)
    images/KEY.png    size x size RGB (the validation transform: short side resized, centre crop)
    masks/KEY.png     white = hole

:func:`build_fixed_set` makes one from the first images of WebDataset shards (the validation shards), cycling
the mask presets over the images; :func:`load_fixed_set` reads one back and refuses files that changed since it
was written (a :class:`ldm.util.ConfigError`: one line from ``main.py``). The set's ``fingerprint`` (a hash of
everything in ``set.json``) is logged with every evaluation, so numbers from two runs are compared only when they
were measured on the same set.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ldm.eval.data import DEFAULT_MASK_MODES, SkipLog, fixed_masks, load_shards, require_count
from ldm.eval.feature_metrics import file_sha256
from ldm.eval.run import atomic_png, sample_seed
from ldm.image_io import load_mask, load_rgb
from ldm.util import ConfigError

log = logging.getLogger(__name__)

FORMAT = 1
SET_FILE = "set.json"


@dataclass(frozen=True)
class HeldOutItem:
    """One image of the set.

    Args:
        key: identifier (file stem).
        image: ``size x size x 3`` uint8.
        mask: ``size x size`` float32, 1 = hole.
        caption: the prompt.
        mask_mode: the preset the mask was drawn from.
        seed: the sampling seed.
    """

    key: str
    image: np.ndarray
    mask: np.ndarray
    caption: str
    mask_mode: str
    seed: int


@dataclass(frozen=True)
class FixedSet:
    """A loaded set.

    Args:
        root: its folder.
        size: image side in pixels.
        items: the images, in set order.
        fingerprint: first 12 hex digits of the SHA-256 of ``set.json``'s canonical content.
        built_with: the ``num_images``, ``size`` and ``seed`` it was built with.
    """

    root: Path
    size: int
    items: tuple[HeldOutItem, ...]
    fingerprint: str
    built_with: dict


def _fingerprint(meta: dict) -> str:
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:12]


def build_fixed_set(shards: str | Sequence[str], root: str | Path, num_images: int = 8, size: int = 512,
                    modes: Sequence[str] = DEFAULT_MASK_MODES, seed: int = 0) -> FixedSet:
    """Write a set of the first ``num_images`` shard samples to ``root`` (which must not hold one yet)."""
    root = Path(root)
    if (root / SET_FILE).exists():
        raise ConfigError(f"{root / SET_FILE} exists; a held-out set is never overwritten (remove it or pick a "
                         "new folder)")
    skips = SkipLog()
    try:  # a set never holds fewer images than its config says: it would be another set under the same name
        images = load_shards(shards, size, num_images, skips)
        require_count(images, num_images, skips, f"shards {shards}")
        masks = {mode: fixed_masks(mode, len(images), size, seed) for mode in modes}
    except ValueError as e:
        raise ConfigError(f"cannot build the held-out set {root}: {e}") from None
    items = []
    for i, im in enumerate(images):
        mode = modes[i % len(modes)]
        atomic_png(im.image, root / "images" / f"{im.key}.png")
        atomic_png(masks[mode][i], root / "masks" / f"{im.key}.png")
        items.append({"key": im.key, "caption": im.caption, "mask_mode": mode, "seed": sample_seed(seed, mode, i),
                      "image_sha256": file_sha256(root / "images" / f"{im.key}.png"),
                      "mask_sha256": file_sha256(root / "masks" / f"{im.key}.png")})
    meta = {"format": FORMAT, "size": size, "num_images": num_images, "seed": seed, "source": str(shards),
            "items": items, "skipped": skips.report()}
    tmp = root / f".{SET_FILE}.tmp"
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    tmp.replace(root / SET_FILE)  # the set exists only once complete
    log.info("built held-out set %s: %d images from %s (fingerprint %s)", root, len(items), shards,
             _fingerprint(meta))
    return load_fixed_set(root)


def load_fixed_set(root: str | Path) -> FixedSet:
    """Read a set written by :func:`build_fixed_set`, checking every file against its recorded SHA-256."""
    root = Path(root)
    path = root / SET_FILE
    if not path.is_file():
        raise ConfigError(f"held-out set {root}: no {SET_FILE}; build one from validation shards (set `shards` "
                         "in the callback config) or point set_dir at an existing set")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT:
        raise ConfigError(f"{path}: format {meta.get('format')!r}, this code reads format {FORMAT}")
    items = []
    for it in meta["items"]:
        for kind in ("image", "mask"):
            f = root / f"{kind}s" / f"{it['key']}.png"
            if not f.is_file() or file_sha256(f) != it[f"{kind}_sha256"]:
                raise ConfigError(f"held-out set {root}: {f} is missing or changed since the set was built; "
                                 "restore it or build a new set in a new folder")
        items.append(HeldOutItem(it["key"], load_rgb(root / "images" / f"{it['key']}.png"),
                                 load_mask(root / "masks" / f"{it['key']}.png"), it["caption"], it["mask_mode"],
                                 int(it["seed"])))
    built_with = {k: meta[k] for k in ("num_images", "size", "seed")}
    return FixedSet(root, int(meta["size"]), tuple(items), _fingerprint(meta), built_with)
