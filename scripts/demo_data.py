"""The embedded demo set: photos shipped inside PyPI packages, captioned by hand in ``data/demo/manifest.yaml``.

The repository stores only the manifest (package, loader, caption, hand-assigned metadata); the pixels come
from the installed packages (scikit-image, matplotlib), so nothing is downloaded and nothing large is
committed. :func:`demo_records` turns the manifest into :class:`~ldm.data.shard_writer.Record` objects, with
optional seeded random crops so that a ten-photo set can yield as many distinct samples as a smoke run needs.

The demo's split: :func:`split_manifest` writes one manifest of training photos and one of the photos held out
(:data:`HELDOUT`, never trained on); :func:`write_folder` turns shards into the NAME.png / NAME_mask.png /
NAME.txt folders that evaluate.py, inpaint.py and the fixed-batch losses read.
"""

from __future__ import annotations

import importlib
import json
import shutil
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from PIL import Image

from ldm.data.shard_writer import Record
from ldm.eval.data import fixed_masks, load_shards
from ldm.image_io import save_png

DEMO_MANIFEST = Path(__file__).resolve().parents[1] / "data" / "demo" / "manifest.yaml"
#: photos never trained on, in every demo profile: a portrait and a still life
HELDOUT = ("coffee", "grace_hopper")
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


def split_manifest(manifest: str | Path, heldout: Sequence[str], train_photos: int | None,
                   out_dir: str | Path) -> dict[str, Path]:
    """Write ``OUT/train.yaml`` (the first ``train_photos`` photos not held out; None = all) and
    ``OUT/heldout.yaml`` (the ``heldout`` photos); returns ``{"train": path, "heldout": path}``."""
    content = yaml.safe_load(Path(manifest).read_text(encoding="utf-8"))
    entries = content["photos"]
    unknown = set(heldout) - {e["name"] for e in entries}
    if unknown:
        raise ValueError(f"{manifest}: held-out photo(s) {sorted(unknown)} are not in the manifest")
    chosen = {"train": [e for e in entries if e["name"] not in heldout][:train_photos],
              "heldout": [e for e in entries if e["name"] in heldout]}
    out: dict[str, Path] = {}
    for split, photos in chosen.items():
        out[split] = Path(out_dir) / f"{split}.yaml"
        out[split].parent.mkdir(parents=True, exist_ok=True)
        out[split].write_text(yaml.safe_dump({**content, "photos": photos}, sort_keys=False), encoding="utf-8")
    return out


def shard_names(shard: str | Path) -> dict[str, str]:
    """``{sample key: photo name}`` from a shard's ``.json`` members (the demo name, else the source file's)."""
    names = {}
    with tarfile.open(shard) as tar:
        for member in tar:
            if member.name.endswith(".json"):
                meta = json.load(tar.extractfile(member))
                key = member.name[: -len(".json")]
                names[key] = str(meta.get("demo_name") or Path(str(meta.get("url") or key)).stem)
    return names


def write_folder(shard_dir: str | Path, folder: str | Path, size: int, mask_mode: str, limit: int,
                 seed: int = 0) -> Path:
    """The first ``limit`` images (by name) of the shards in ``shard_dir`` as ``NAME.png``, ``NAME.txt``
    (caption) and ``NAME_mask.png`` (a fixed ``mask_mode`` mask, seeded by ``seed`` and the image's index)."""
    folder = Path(folder)
    shutil.rmtree(folder, ignore_errors=True)
    shards = sorted(Path(shard_dir).glob("*.tar"))
    names = {key: name for shard in shards for key, name in shard_names(shard).items()}
    images = sorted(load_shards([str(s) for s in shards], size), key=lambda im: names.get(im.key, im.key))[:limit]
    used: set[str] = set()
    for im, mask in zip(images, fixed_masks(mask_mode, len(images), size, seed)):
        name = names.get(im.key, im.key)
        name = name if name not in used else f"{name}_{im.key}"  # two photos of the same name in subfolders
        used.add(name)
        save_png(im.image, folder / f"{name}.png")
        save_png(mask, folder / f"{name}_mask.png")
        (folder / f"{name}.txt").write_text(im.caption + "\n", encoding="utf-8")
    return folder


__all__ = ["DEMO_MANIFEST", "HELDOUT", "DemoPhoto", "demo_records", "load_manifest", "load_photo", "shard_names",
           "split_manifest", "write_folder"]
