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
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ldm.data.rgb import apply_orientation, open_rgb, to_rgb8

log = logging.getLogger(__name__)

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
MASK_SUFFIX = "_mask"

#: :func:`check_mask`: mask values above this and below 0.5 are "grey" (not JPEG noise around black) ...
SOFT_MIN = 8 / 255
#: ... and are worth a warning when they are at least this fraction of the hole and this many pixels
SOFT_WARN_FRACTION = 0.25
SOFT_WARN_MIN_PIXELS = 64

_TRANSPARENT_MODES = ("RGBA", "LA", "PA", "RGBa", "La")

__all__ = ["check_mask", "find_pairs", "load_mask", "load_rgb", "make_grid", "mask_from_image", "read_prompts",
           "read_text", "save_png"]


def _open(path: str | Path, what: str) -> Image.Image:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{what} file not found: {path}")
    try:
        img = Image.open(path)
        img.load()
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise ValueError(f"{what} file {path} is not a readable image ({e})") from e
    return apply_orientation(img)  # as displayed, like the image it belongs to (ldm.data.rgb)


def load_rgb(path: str | Path) -> np.ndarray:
    """An image file as ``H x W x 3`` uint8 RGB by the project's decode rule (``ldm.data.rgb``)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"image file not found: {path}")
    try:
        return np.asarray(open_rgb(path))
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
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


def load_mask(path: str | Path, size: tuple[int, int] | None = None, check: bool = True) -> np.ndarray:
    """A mask file as ``H x W`` float32 in [0, 1] (white = inpaint) by the module's mask rule.

    ``size`` is the ``(width, height)`` of the image the mask belongs to; a mask of another size but the same
    aspect ratio (up to a pixel of rounding in the mask's size) is resized to it with nearest-neighbour interpolation
    (so the hole stays a hole) and a warning. Another aspect ratio is a ``ValueError``: stretching would move
    the hole, and the usual cause is a mask drawn on the stored orientation of a photo that EXIF rotates on
    reading. ``check``: report what binarisation makes of it (:func:`check_mask`); False for a file read a
    second time.
    """
    mask = mask_from_image(_open(path, "mask"))
    if size is not None and (mask.shape[1], mask.shape[0]) != tuple(size):
        (mh, mw), (w, h) = mask.shape[:2], size
        if abs(mw * h / w - mh) > 1 and abs(mh * w / h - mw) > 1:  # a scaled copy is off by rounding only
            raise ValueError(f"mask {path} is {mask.shape[1]}x{mask.shape[0]} but its image is {size[0]}x{size[1]} "
                             "(as displayed, after any EXIF rotation): another aspect ratio, so resizing would "
                             "stretch the hole. Make the mask on the image as displayed, at its size")
        if check:
            log.warning("mask %s is %dx%d but its image is %dx%d; resizing the mask (nearest neighbour)", path,
                        mask.shape[1], mask.shape[0], size[0], size[1])
        mask = np.asarray(Image.fromarray(mask).resize(tuple(size), Image.Resampling.NEAREST))
    if check:
        check_mask(mask, path)
    return mask


def check_mask(mask: np.ndarray, name: str | Path) -> None:
    """Log what binarisation at 0.5 (``ldm.data.masks.is_hole``) makes of a mask, where it may surprise.

    * no hole at all (all black, or a grey brush below 0.5): a warning, since the output is only the input
      after a VAE round trip;
    * many grey pixels below 0.5 (a soft brush's faint part, which counts as keep): a warning with the numbers;
    * a hole covering the whole image: logged as information (legitimate: the model draws from the prompt alone).
    """
    from ldm.data.masks import is_hole

    hole = int(is_hole(mask).sum())
    dropped = int(((mask > SOFT_MIN) & ~is_hole(mask)).sum())  # grey, but below the threshold: kept
    total = mask.size
    grey = f"{dropped} pixels ({100 * dropped / total:.1f}%) are grey below 0.5 (brightest {mask.max() * 255:.0f}/255)"
    if hole == 0:
        log.warning("mask %s has no hole after binarisation at 0.5 (white = inpaint)%s; the output will be the input "
                    "after a VAE round trip. Paint the hole white", name, f": {grey}" if dropped else "")
    elif dropped >= SOFT_WARN_FRACTION * hole and dropped >= SOFT_WARN_MIN_PIXELS:
        log.warning("mask %s: %s and count as keep, next to a %d-pixel hole; samplers binarise at 0.5, so paint "
                    "the hole white (a soft brush's faint edge is dropped)", name, grey, hole)
    elif hole == total:
        log.info("mask %s covers the whole image: nothing is kept and the model draws from the prompt alone "
                 "(a full mask is legitimate)", name)


def find_pairs(folder: str | Path) -> list[tuple[Path, Path]]:
    """``(image, mask)`` pairs of a folder: ``NAME.ext`` with ``NAME_mask.ext``, sorted by name.

    Names match case-insensitively (``y.PNG`` pairs with ``y_MASK.png``), any image extension on either side. Nothing
    is dropped silently: two images or two masks for one NAME (``a.png`` and ``a.jpg``) is an error naming the files;
    images without a mask and masks without an image are listed in a warning; other files are logged.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"input folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.is_file())
    images: dict[str, list[Path]] = {}
    masks: dict[str, list[Path]] = {}
    for p in (p for p in files if p.suffix.lower() in IMAGE_EXTS):
        stem = p.stem.lower()
        if stem.endswith(MASK_SUFFIX):
            masks.setdefault(stem[: -len(MASK_SUFFIX)], []).append(p)
        else:
            images.setdefault(stem, []).append(p)
    paired = sorted(images.keys() & masks.keys())
    ambiguous = [images[k] + masks[k] for k in paired if len(images[k]) > 1 or len(masks[k]) > 1]
    if ambiguous:
        groups = "; ".join(" + ".join(p.name for p in group) for group in ambiguous)
        raise ValueError(f"{folder}: cannot tell which image goes with which mask: {groups}. Keep one NAME.ext and "
                         f"one NAME{MASK_SUFFIX}.ext per name (names match case-insensitively)")
    lonely = [p for k in sorted(images.keys() - masks.keys()) for p in images[k]]
    if lonely:
        log.warning("%s: %d image(s) without a NAME%s mask are skipped: %s", folder, len(lonely), MASK_SUFFIX,
                    _names(lonely))
    orphans = [p for k in sorted(masks.keys() - images.keys()) for p in masks[k]]
    if orphans:
        log.warning("%s: %d mask(s) without an image are skipped: %s", folder, len(orphans), _names(orphans))
    others = [p for p in files if p.suffix.lower() not in IMAGE_EXTS]
    if others:
        log.info("%s: ignored %d file(s) without an image extension (%s): %s", folder, len(others),
                 " ".join(IMAGE_EXTS), _names(others))
    if not paired:
        raise ValueError(f"{folder}: no image/mask pairs found; name them NAME.png and NAME{MASK_SUFFIX}.png")
    return [(images[k][0], masks[k][0]) for k in paired]


def _names(paths: Sequence[Path], limit: int = 10) -> str:
    shown = ", ".join(p.name for p in paths[:limit])
    return shown + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def read_text(path: str | Path, what: str) -> str:
    """A UTF-8 text file (a byte-order mark is dropped); ``ValueError`` naming the file when it is missing or not
    UTF-8. ``what`` names the file in messages ("prompts file")."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{what} not found: {path}")
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} {path} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); "
                         "save it as UTF-8") from None


def read_prompts(path: str | Path, n_images: int) -> list[str]:
    """Prompts from a UTF-8 text file: one line for all images, or one line per image (in sorted image order)."""
    path = Path(path)
    lines = [line.strip() for line in read_text(path, "prompts file").splitlines() if line.strip()]
    if len(lines) == 1:
        return lines * n_images
    if len(lines) != n_images:
        raise ValueError(f"prompts file {path} has {len(lines)} prompts for {n_images} images; give one line "
                         "for all images or exactly one line per image")
    return lines


def save_png(image: np.ndarray, path: str | Path, text: Mapping[str, str] | None = None) -> Path:
    """Write an ``H x W x 3`` uint8 (or ``H x W`` mask in [0, 1]) array as PNG, creating the folder.

    ``text``: key/value pairs stored as PNG text chunks (e.g. the sampling settings; ``PIL.Image.open(p).text``).
    """
    from PIL.PngImagePlugin import PngInfo

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = image if image.dtype == np.uint8 else (np.clip(image, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    info = None
    if text:
        info = PngInfo()
        for key, value in text.items():
            info.add_itxt(key, str(value))
    Image.fromarray(arr).save(path, pnginfo=info)
    return path


def make_grid(rows: Sequence[Sequence[np.ndarray]], headers: Sequence[str] | None = None,
              row_labels: Sequence[str] | None = None) -> np.ndarray:
    """Tile rows of images (uint8 RGB, or masks in [0, 1]) with optional column headers: see :mod:`ldm.grids`."""
    from ldm.grids import labelled_grid

    return labelled_grid(rows, headers=headers, row_labels=row_labels)
