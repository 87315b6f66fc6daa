"""Reading and writing the images of the sampling and evaluation scripts: inputs, masks, prompts, PNGs, grids.

Conventions: images are ``H x W x 3`` uint8 RGB arrays, decoded by the project's one rule (``ldm.data.rgb``:
every PIL mode to 8-bit RGB, alpha composited on white); masks are ``H x W`` float32 in [0, 1] where white (1)
marks the pixels to inpaint (samplers binarise at 0.5). Every bad input raises ``ValueError`` naming the file
and what to do. Image and mask files are turned upright by their EXIF orientation, as every viewer shows them
(``ldm.data.rgb``), so a mask painted on the displayed photo fits it. Left out: colour management.

**Mask rule** (:func:`mask_from_image`), the same for grey, RGB, palette, RGBA and LA files: the mask is what the
file shows *composited on black*, as luminance (white = hole; black or transparent = keep). One exception: when
the file has transparency and every visible pixel (alpha > 0) has the same colour, the colour carries no
information and the alpha channel is the mask (painted = hole), as on SD2's painting canvas or a hole painted in
any single colour on an empty layer. So an opaque white-on-black mask, the same mask with its background
made transparent, and the same hole painted on a transparent layer all give the same hole, and a few
semi-transparent pixels (anti-aliased edges) never switch the rule for the whole picture.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ldm.data.rgb import apply_orientation, open_rgb, to_rgb8

log = logging.getLogger(__name__)

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
MASK_SUFFIX = "_mask"

_TRANSPARENT_MODES = ("RGBA", "LA", "PA", "RGBa", "La")

__all__ = ["find_pairs", "load_mask", "load_rgb", "make_grid", "mask_from_image", "read_prompts", "save_png"]


def _open(path: str | Path, what: str) -> Image.Image:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{what} file not found: {path}")
    try:
        img = Image.open(path)
        img.load()
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{what} file {path} is not a readable image ({e})") from e
    return apply_orientation(img)  # as displayed, like the image it belongs to (ldm.data.rgb)


def load_rgb(path: str | Path) -> np.ndarray:
    """An image file as ``H x W x 3`` uint8 RGB by the project's decode rule (``ldm.data.rgb``)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"image file not found: {path}")
    try:
        return np.asarray(open_rgb(path))
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ValueError(f"image file {path} is not a readable image ({e})") from e


def mask_from_image(img: Image.Image) -> np.ndarray:
    """``H x W`` float32 in [0, 1] (1 = hole) from a mask image of any mode, by the module's mask rule."""
    has_alpha = img.mode in _TRANSPARENT_MODES or (img.mode == "P" and "transparency" in img.info)
    if not has_alpha:
        return np.asarray(to_rgb8(img).convert("L"), dtype=np.float32) / 255.0
    rgba = np.asarray(img.convert("RGBA"))  # H x W x 4, straight alpha (premultiplied modes are undone)
    colour, alpha = rgba[..., :3], rgba[..., 3]
    grey = np.asarray(Image.fromarray(colour).convert("L"), dtype=np.float32) / 255.0
    if alpha.min() == 255:
        return grey
    visible = colour[alpha > 0]  # N x 3
    if len(visible) == 0 or (visible == visible[0]).all():
        return alpha.astype(np.float32) / 255.0  # one colour: only the alpha channel says where the hole is
    return grey * (alpha.astype(np.float32) / 255.0)  # composited on black: transparent = keep


def load_mask(path: str | Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """A mask file as ``H x W`` float32 in [0, 1] (white = inpaint) by the module's mask rule.

    ``size`` is the ``(width, height)`` of the image the mask belongs to; a mask of another size is resized to
    it with nearest-neighbour interpolation (so the hole stays a hole) and a warning.
    """
    mask = mask_from_image(_open(path, "mask"))
    if size is not None and (mask.shape[1], mask.shape[0]) != tuple(size):
        log.warning("mask %s is %dx%d but its image is %dx%d; resizing the mask (nearest neighbour)", path,
                    mask.shape[1], mask.shape[0], size[0], size[1])
        mask = np.asarray(Image.fromarray(mask).resize(tuple(size), Image.Resampling.NEAREST))
    return mask


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
