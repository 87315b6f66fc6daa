"""Reading and writing the images of the sampling and evaluation scripts: inputs, masks, prompts, PNGs, grids.

Conventions: images are ``H x W x 3`` uint8 RGB arrays; masks are ``H x W`` float32 in [0, 1] where white (1)
marks the pixels to inpaint. Every bad input raises ``ValueError`` naming the file and what to do.
Left out: EXIF orientation handling beyond PIL's default and colour management.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
MASK_SUFFIX = "_mask"

__all__ = ["find_pairs", "load_mask", "load_rgb", "make_grid", "read_prompts", "save_png"]


def _open(path: str | Path, what: str) -> Image.Image:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{what} file not found: {path}")
    try:
        img = Image.open(path)
        img.load()
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{what} file {path} is not a readable image ({e})") from e
    return img


def load_rgb(path: str | Path) -> np.ndarray:
    """An image file as ``H x W x 3`` uint8 RGB (alpha is dropped, grey is expanded)."""
    return np.asarray(_open(path, "image").convert("RGB"))


def load_mask(path: str | Path) -> np.ndarray:
    """A mask file as ``H x W`` float32 in [0, 1] (luminance / 255; white = inpaint)."""
    img = _open(path, "mask")
    if img.mode in ("RGBA", "LA") and img.getchannel("A").getextrema()[0] < 255:
        img = img.getchannel("A")  # a painted alpha layer is the mask (as the SD2 streamlit canvas)
    return np.asarray(img.convert("L"), dtype=np.float32) / 255.0


def find_pairs(folder: str | Path) -> list[tuple[Path, Path]]:
    """``(image, mask)`` pairs of a folder: ``NAME.ext`` with ``NAME_mask.ext`` (any image extensions), sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"input folder not found: {folder}")
    files = {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_EXTS}
    pairs = [(p, files[stem + MASK_SUFFIX]) for stem, p in sorted(files.items())
             if not stem.endswith(MASK_SUFFIX) and stem + MASK_SUFFIX in files]
    if not pairs:
        raise ValueError(f"{folder}: no image/mask pairs found; name them NAME.png and NAME{MASK_SUFFIX}.png")
    return pairs


def read_prompts(path: str | Path, n_images: int) -> list[str]:
    """Prompts from a text file: one line for all images, or one line per image (in sorted image order)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"prompts file not found: {path}")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(lines) == 1:
        return lines * n_images
    if len(lines) != n_images:
        raise ValueError(f"prompts file {path} has {len(lines)} prompts for {n_images} images; give one line "
                         "for all images or exactly one line per image")
    return lines


def save_png(image: np.ndarray, path: str | Path) -> Path:
    """Write an ``H x W x 3`` uint8 (or ``H x W`` mask in [0, 1]) array as PNG, creating the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = image if image.dtype == np.uint8 else (np.clip(image, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    Image.fromarray(arr).save(path)
    return path


def make_grid(rows: Sequence[Sequence[np.ndarray]], headers: Sequence[str] | None = None,
              row_labels: Sequence[str] | None = None) -> np.ndarray:
    """Tile rows of images (uint8 RGB, or masks in [0, 1]) with optional column headers: see :mod:`ldm.grids`."""
    from ldm.grids import labelled_grid

    return labelled_grid(rows, headers=headers, row_labels=row_labels)
