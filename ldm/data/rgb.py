"""The one image rule: any image a shard or a user file can hold -> upright 8-bit RGB, size limits read first.

Training (``ldm.data.decode``), evaluation (``ldm.eval.data``), ``scripts/inpaint.py`` and
``scripts/make_shards.py`` all decode through :func:`open_rgb`, so a picture means the same pixels everywhere.

Mode rule of :func:`to_rgb8` (PIL modes; ``v`` is the stored value):

=================  =======================================================================================
``RGB``            as stored (48-bit PNGs are already reduced to 8 bits per channel by PIL when opened)
``L``, ``1``       grey replicated to R, G and B (``1`` is 0 or 255)
``P``              palette colours; a palette with a transparent index is treated as ``RGBA``
``I;16*``          16-bit grey: ``round(v / 257)`` so 0 -> 0, 32768 -> 128, 65535 -> 255
``I``              32-bit integer grey holding 16-bit data (how PIL opened 16-bit PNGs): ``round(v / 257)``;
                   values outside 0..65535 reject the image (the range is ambiguous)
``F``              float grey in [0, 1] (the float-image convention): ``round(255 v)``; values outside
                   [0, 1] or not finite reject the image
``CMYK``           PIL's conversion (Adobe-inverted JPEGs are un-inverted when read); no colour management
``YCbCr``, ``HSV`` PIL's conversion
``RGBX``           the padding channel is dropped
``RGBA``, ``LA``,  **alpha is composited on white**: ``(c * a + 255 * (255 - a)) / 255``, rounded. White is
``PA``, ``RGBa``,  the background img2dataset mattes transparent images onto when it writes LAION shards,
``La``, ``P``+t    so a transparent logo looks the same whether it arrives raw or through img2dataset.
other (``LAB``)    rejected with a ``ValueError`` naming the mode
=================  =======================================================================================

**Orientation** (:func:`apply_orientation`): an EXIF orientation tag (2-8: a camera held sideways or upside
down) is applied, so the pixels are the picture as every viewer displays it, the same picture a user paints a
mask on (``ldm.image_io`` applies it to mask files too). A tag of 1, none, or a value outside 1-8 leaves the
pixels as stored. Shards written by img2dataset or ``scripts/make_shards.py`` hold re-encoded JPEGs without the
tag (already upright), so for them nothing changes (docs/DECISIONS.md D14).

Left out: ICC colour profiles (no colour management).

Size limits (:class:`ImageLimits`) are checked on the image *header*, before any pixel is decoded and before
any resize: a 16000 x 8 strip is rejected for its aspect ratio without decoding it, and no resize can produce
more than ``max_pixels`` pixels. The limits do not depend on orientation; resize plans are made for the
displayed (oriented) size. Each rejection is an :class:`ImageRejected` carrying the counter name
(``too_small``, ``too_large``, ``extreme_aspect``; see ``ldm.data.stats``).
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageOps

#: the background that transparent pixels are composited on (white, as img2dataset's alpha matting)
ALPHA_BACKGROUND = 255
_ALPHA_MODES = {"RGBA": "RGBA", "LA": "LA", "PA": "RGBA", "RGBa": "RGBA", "La": "LA"}
_PIL_CONVERTED = ("1", "L", "P", "CMYK", "YCbCr", "HSV", "RGBX")
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")


class ImageRejected(ValueError):
    """An image outside the configured size limits; ``reason`` is the counter name."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


@dataclass(frozen=True)
class ImageLimits:
    """Size limits checked on the image header before decoding and before any resize.

    Args:
        min_size: Minimum width and height of the stored image (None = off). Counter ``too_small``.
        max_pixels: Maximum pixels decoded, and maximum pixels any resize may produce (None = off).
            Counter ``too_large``.
        max_aspect_ratio: Maximum ``long side / short side`` (None = off). Counter ``extreme_aspect``.
    """

    min_size: int | None = None
    max_pixels: int | None = None
    max_aspect_ratio: float | None = None

    def check(self, width: int, height: int) -> None:
        """Raise :class:`ImageRejected` when a ``width x height`` image breaks a limit."""
        if self.min_size is not None and min(width, height) < self.min_size:
            raise ImageRejected("too_small", f"{width}x{height} image is below min_size {self.min_size}")
        short, long = min(width, height), max(width, height)
        if self.max_aspect_ratio is not None and long > self.max_aspect_ratio * max(1, short):
            raise ImageRejected("extreme_aspect", f"{width}x{height} image has an aspect ratio above "
                                f"max_aspect_ratio {self.max_aspect_ratio:g}")
        self.check_pixels(width, height, "image")

    def check_pixels(self, width: int, height: int, what: str) -> None:
        """Raise :class:`ImageRejected` (``too_large``) when ``width x height`` exceeds ``max_pixels``."""
        if self.max_pixels is not None and width * height > self.max_pixels:
            raise ImageRejected("too_large", f"{what} of {width}x{height} = {width * height} pixels exceeds "
                                f"max_pixels {self.max_pixels}")


def _composite_on_background(rgba: np.ndarray) -> np.ndarray:
    """``H x W x (C+1)`` uint8 colour + straight alpha -> ``H x W x C`` uint8 composited on ``ALPHA_BACKGROUND``."""
    colour = rgba[..., :-1].astype(np.uint32)
    alpha = rgba[..., -1:].astype(np.uint32)
    out = (colour * alpha + ALPHA_BACKGROUND * (255 - alpha) + 127) // 255  # integer rounding of c*a + bg*(1-a)
    return out.astype(np.uint8)


def _grey_to_rgb(grey: np.ndarray) -> Image.Image:
    return Image.fromarray(np.repeat(grey[..., None], 3, axis=2))


def to_rgb8(img: Image.Image) -> Image.Image:
    """``img`` (any supported mode, pixels loaded or not) as an 8-bit ``RGB`` image by the module's rule."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P" and "transparency" in img.info:
        mode, img = "RGBA", _convert_quiet(img, "RGBA")
    if mode in _ALPHA_MODES:
        arr = np.asarray(img if mode in ("RGBA", "LA") else img.convert(_ALPHA_MODES[mode]))
        out = _composite_on_background(arr)
        return Image.fromarray(out) if out.shape[2] == 3 else _grey_to_rgb(out[..., 0])
    if mode in _PIL_CONVERTED:
        return img.convert("RGB")
    if mode in _SIXTEEN_BIT or mode == "I":
        arr = np.asarray(img).astype(np.int64)
        if mode == "I" and arr.size and (arr.min() < 0 or arr.max() > 65535):
            raise ValueError(f"mode I image with values {arr.min()}..{arr.max()}: expected 16-bit data 0..65535")
        return _grey_to_rgb(((arr * 2 + 257) // 514).astype(np.uint8))  # round(v / 257), exact integers
    if mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        if arr.size and (not np.isfinite(arr).all() or arr.min() < 0.0 or arr.max() > 1.0):
            raise ValueError(f"mode F image with values {np.nanmin(arr):g}..{np.nanmax(arr):g}: expected floats "
                             "in [0, 1]")
        return _grey_to_rgb(np.rint(arr * 255.0).astype(np.uint8))
    raise ValueError(f"image mode {mode} is not supported (convert the file to RGB)")


def orientation(img: Image.Image) -> int:
    """The image's EXIF orientation (tag 0x0112, 1-8; PIL also reads it from XMP), 1 when it has none or an
    invalid one."""
    try:
        value = img.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:  # a damaged EXIF block: the pixels as stored (the decode itself decides if they are usable)
        return 1
    return value if value in range(1, 9) else 1


def apply_orientation(img: Image.Image) -> Image.Image:
    """``img`` turned upright by its EXIF orientation (see the module docstring); ``img`` itself when upright.

    The turned image's orientation tag is reset (PIL's ``exif_transpose``), so applying this twice is harmless.
    """
    return img if orientation(img) == 1 else ImageOps.exif_transpose(img)


def _convert_quiet(img: Image.Image, mode: str) -> Image.Image:
    with warnings.catch_warnings():  # PIL warns on every palette-with-transparency conversion; this is the way
        warnings.simplefilter("ignore", UserWarning)
        return img.convert(mode)


def open_rgb(
    source: bytes | str | Path,
    limits: ImageLimits | None = None,
    plan: Callable[[int, int], Sequence[tuple[int, int]]] | None = None,
    draft: bool = False,
) -> Image.Image:
    """Decode image bytes or a file to 8-bit RGB by the module's rule, checking ``limits`` before decoding.

    The EXIF orientation is applied (module docstring); ``plan`` receives the displayed size.

    Args:
        source: encoded bytes or a file path.
        limits: size limits (header size; see :class:`ImageLimits`); None = only PIL's decompression-bomb guard.
        plan: ``(width, height) -> [(width, height), ...]``: the outputs of the resizes that will follow, checked
            against ``limits.max_pixels`` before anything is decoded.
        draft: let libjpeg decode a JPEG at 1/2, 1/4 or 1/8 scale that is still at least the first ``plan`` size.

    Raises:
        ImageRejected: a limit is broken (nothing was decoded).
        Exception: anything PIL raises for corrupt or truncated data (``OSError``, ``SyntaxError``,
            ``Image.DecompressionBombError``, ...), or ``ValueError`` for an unsupported mode or value range.
    """
    img = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    if limits is not None:
        limits.check(*img.size)  # the header only: nothing decoded yet (the limits hold for either orientation)
    turned = orientation(img) in (5, 6, 7, 8)  # displayed with width and height swapped
    shown = img.size[::-1] if turned else img.size
    sizes = list(plan(*shown)) if plan is not None else []
    if limits is not None:
        for size in sizes:
            limits.check_pixels(*size, "resize output")
    if draft and sizes and img.format == "JPEG":
        img.draft(img.mode, tuple(sizes[0][::-1]) if turned else sizes[0])  # libjpeg scales the stored image
    img.load()  # the full decode: broken data raises here
    return to_rgb8(apply_orientation(img))


__all__ = ["ALPHA_BACKGROUND", "ImageLimits", "ImageRejected", "apply_orientation", "open_rgb", "orientation",
           "to_rgb8"]
