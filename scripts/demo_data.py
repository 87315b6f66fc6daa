"""The embedded demo set: photos shipped inside PyPI packages, captioned by hand in ``data/demo/manifest.yaml``.

The repository stores only the manifest (package, loader, caption, hand-assigned metadata); the pixels come
from the installed packages (scikit-image, matplotlib), so nothing is downloaded and nothing large is
committed. :func:`demo_records` turns the manifest into :class:`~ldm.data.shard_writer.Record` objects, with
optional seeded random crops so that a ten-photo set can yield as many distinct samples as a smoke run needs.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from PIL import Image

from ldm.data.shard_writer import Record

DEMO_MANIFEST = Path(__file__).resolve().parents[1] / "data" / "demo" / "manifest.yaml"
Augment = Literal["none", "crop"]


@dataclass(frozen=True)
class DemoPhoto:
    """One manifest entry (see the manifest's header for the fields)."""

    name: str
    package: str
    loader: str
    caption: str
    args: tuple[Any, ...] = ()
    index: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def url(self) -> str:
        suffix = f"[{self.index}]" if self.index is not None else ""
        return f"{self.package}://{self.loader}{suffix}"


def load_manifest(path: str | Path = DEMO_MANIFEST) -> list[DemoPhoto]:
    """Parse and validate a demo manifest; errors name the entry and the field."""
    content = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    entries = content.get("photos") if isinstance(content, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{path}: expected a non-empty 'photos' list")
    photos, seen = [], set()
    for i, e in enumerate(entries):
        missing = [k for k in ("name", "package", "loader", "caption") if not e.get(k)]
        if missing:
            raise ValueError(f"{path}: photos[{i}] lacks {missing}")
        if e["name"] in seen:
            raise ValueError(f"{path}: duplicate photo name '{e['name']}'")
        seen.add(e["name"])
        photos.append(DemoPhoto(name=e["name"], package=e["package"], loader=e["loader"],
                                caption=" ".join(str(e["caption"]).split()), args=tuple(e.get("args", ())),
                                index=e.get("index"), meta=dict(e.get("meta") or {})))
    return photos


def load_photo(photo: DemoPhoto) -> Image.Image:
    """Call the photo's loader (offline) and return an RGB PIL image."""
    module, _, name = photo.loader.rpartition(".")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise RuntimeError(f"demo photo '{photo.name}': cannot load {photo.loader} "
                           f"(is the '{photo.package}' package installed?): {e}") from e
    out = fn(*photo.args)
    if photo.index is not None:
        out = out[photo.index]
    if isinstance(out, np.ndarray):
        return Image.fromarray(out).convert("RGB")
    with Image.open(out) as img:  # a path or an open file (matplotlib's sample data)
        return img.convert("RGB")


def _random_crop_box(img: Image.Image, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """A (left, top, right, bottom) box of 50-100% of the area, aspect ratio in [3/4, 4/3] (RandomResizedCrop-like)."""
    w, h = img.size
    area = rng.uniform(0.5, 1.0) * w * h
    ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    cw, ch = min(w, round(np.sqrt(area * ratio))), min(h, round(np.sqrt(area / ratio)))
    left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    return left, top, left + cw, top + ch


def demo_records(photos: Sequence[DemoPhoto], repeat: int = 1, augment: Augment = "crop",
                 seed: int = 0) -> Iterator[Record]:
    """Records for ``photos``, each photo ``repeat`` times in a row.

    The first copy is the full photo; later copies are seeded random crops when ``augment="crop"`` (their
    ``original_width``/``original_height`` are then the crop's size in source pixels, and the json also
    records ``source_width``/``source_height`` and the crop box). Captions are unchanged by cropping.
    """
    if repeat < 1:
        raise ValueError(f"repeat must be >= 1, got {repeat}")
    if augment not in ("none", "crop"):
        raise ValueError(f"augment must be 'none' or 'crop', got {augment!r}")
    for p_idx, photo in enumerate(photos):
        full = load_photo(photo)
        base = {**photo.meta, "demo_name": photo.name, "source_width": full.width, "source_height": full.height}
        for r in range(repeat):
            img, meta = full, dict(base)
            if r > 0 and augment == "crop":
                box = _random_crop_box(full, np.random.default_rng([seed, p_idx, r]))
                img, meta["crop_box"] = full.crop(box), list(box)
            yield Record(image=img, caption=photo.caption, url=photo.url, meta={**meta, "repeat": r})


__all__ = ["DEMO_MANIFEST", "DemoPhoto", "demo_records", "load_manifest", "load_photo"]
