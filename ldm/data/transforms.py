"""Image transforms of a data split: the configs' torchvision targets, run as seeded PIL operations.

The SD configs list ``torchvision.transforms.Resize`` / ``RandomCrop`` / ``CenterCrop`` under
``image_transforms``. torchvision's random transforms draw from torch's *global* RNG, which makes crops
depend on worker seeding and breaks reproducibility, so these targets (and ``RandomHorizontalFlip``) are
recognised and replaced by equivalent PIL operations that draw from the sample's own generator:

* :class:`Resize` reproduces torchvision's output size rule (short side to ``size``, long side truncated,
  optional ``max_size``) and calls the same ``PIL.Image.resize``; outputs are pixel-identical.
* :class:`Crop` uses torchvision's centre formula; random offsets are uniform like ``RandomCrop``.

Any other target is instantiated and called on the PIL image as is (its randomness, if any, is not seeded;
a warning says so). After the list, :func:`to_float_hwc` gives the H x W x 3 float32 [-1, 1] array the
model expects (ldm's ``ToTensor`` then ``x * 2 - 1``, then CHW -> HWC).

COMPAT: an image smaller than a crop is skipped as ``too_small``; torchvision would pad (CenterCrop) or
raise (RandomCrop). With a ``Resize`` to the crop size first, as in every SD config, this never happens.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from ldm.util import ConfigError, instantiate_from_config

log = logging.getLogger(__name__)

# PIL's resampling codes are the integers torchvision accepts for ``interpolation`` (3 = bicubic).
_RESAMPLING_NAMES = {m.name.lower(): m for m in Image.Resampling}
_TORCHVISION = ("torchvision.transforms.", "torchvision.transforms.v2.")
# torchvision targets that turn the image into a tensor: the pipeline does that itself, after the list
_TENSOR_OPS = ("ToTensor", "PILToTensor", "Normalize", "ConvertImageDtype", "ToImage", "ToDtype", "ToPureTensor")


class TooSmall(Exception):
    """The image cannot be cropped to the requested size."""


def _size(value: Any, where: str) -> tuple[int, int] | int:
    if isinstance(value, int):
        return value
    if isinstance(value, Sequence) and len(value) == 1:
        return int(value[0])
    if isinstance(value, Sequence) and len(value) == 2:
        return int(value[0]), int(value[1])
    raise ConfigError(f"{where}: 'size' must be an int or [height, width], got {value!r}")


def _resampling(value: Any, where: str) -> Image.Resampling:
    name = getattr(value, "value", value)  # torchvision InterpolationMode -> its string value
    if isinstance(name, int) and name in Image.Resampling._value2member_map_:
        return Image.Resampling(name)
    if isinstance(name, str) and name.lower() in _RESAMPLING_NAMES:
        return _RESAMPLING_NAMES[name.lower()]
    raise ConfigError(f"{where}: unknown 'interpolation' {value!r}; use 0-5 or a name such as 'bicubic'")


@dataclass(frozen=True)
class Resize:
    """``torchvision.transforms.Resize`` for PIL images (int size = shorter side)."""

    size: tuple[int, int] | int
    interpolation: Image.Resampling = Image.Resampling.BILINEAR
    max_size: int | None = None

    def output_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) after resizing, by torchvision's rule."""
        if not isinstance(self.size, int):
            return self.size[1], self.size[0]
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = self.size, int(self.size * long / short)
        if self.max_size is not None and new_long > self.max_size:
            new_short, new_long = int(self.max_size * new_short / new_long), self.max_size
        return (new_short, new_long) if width <= height else (new_long, new_short)

    def __call__(self, img: Image.Image, _rng: np.random.Generator) -> Image.Image:
        out = self.output_size(*img.size)
        return img if out == img.size else img.resize(out, self.interpolation)


@dataclass(frozen=True)
class Crop:
    """Centre crop, or a uniformly random crop drawn from the sample's generator."""

    size: tuple[int, int] | int
    random: bool

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        th, tw = (self.size, self.size) if isinstance(self.size, int) else self.size
        w, h = img.size
        if w < tw or h < th:
            raise TooSmall(f"{w}x{h} image is smaller than the {tw}x{th} crop")
        if self.random:
            top, left = int(rng.integers(0, h - th + 1)), int(rng.integers(0, w - tw + 1))
        else:
            top, left = int(round((h - th) / 2.0)), int(round((w - tw) / 2.0))
        return img.crop((left, top, left + tw, top + th))


@dataclass(frozen=True)
class HorizontalFlip:
    """``RandomHorizontalFlip(p)`` drawn from the sample's generator."""

    p: float = 0.5

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < self.p else img


@dataclass(frozen=True)
class External:
    """Any other configured transform, called on the PIL image (not seeded by the pipeline)."""

    fn: Callable[[Image.Image], Image.Image]

    def __call__(self, img: Image.Image, _rng: np.random.Generator) -> Image.Image:
        return self.fn(img)


ImageOp = Callable[[Image.Image, np.random.Generator], Image.Image]


def _build_one(cfg: Mapping[str, Any], where: str) -> ImageOp:
    target = str(cfg.get("target", ""))
    params = dict(cfg.get("params") or {})
    name = next((target[len(p) :] for p in _TORCHVISION if target.startswith(p)), None)
    allowed = {"Resize": {"size", "interpolation", "max_size", "antialias"}, "RandomCrop": {"size"},
               "CenterCrop": {"size"}, "RandomHorizontalFlip": {"p"}}
    if name in _TENSOR_OPS:
        raise ConfigError(f"{where}: {target} makes a tensor, but image_transforms work on PIL images; remove it: "
                          "the pipeline turns the result into a [-1, 1] float tensor itself (ToTensor, then x*2-1)")
    if name in allowed and set(params) <= allowed[name]:
        if name == "Resize":
            if params.get("antialias") is False:
                raise ConfigError(f"{where}: antialias=False is not supported (PIL resizing always antialiases)")
            interp = _resampling(params.get("interpolation", Image.Resampling.BILINEAR), where)
            return Resize(_size(params["size"], where), interp, params.get("max_size"))
        if name == "RandomHorizontalFlip":
            return HorizontalFlip(float(params.get("p", 0.5)))
        return Crop(_size(params["size"], where), random=name == "RandomCrop")
    log.warning("%s: transform '%s' runs as is; any randomness in it is not controlled by the data seed",
                where, target)
    return External(instantiate_from_config(cfg))


def build_image_transforms(configs: Sequence[Mapping[str, Any]] | None, where: str) -> list[ImageOp]:
    """Turn an ``image_transforms`` list of ``{target, params}`` into seeded PIL operations."""
    if configs is None:
        return []
    if not isinstance(configs, Sequence) or isinstance(configs, str):
        raise ConfigError(f"{where}: 'image_transforms' must be a list of {{target, params}} mappings")
    return [_build_one(cfg, f"{where}.image_transforms[{i}]") for i, cfg in enumerate(configs)]


def gives_one_size(ops: Sequence[ImageOp]) -> bool | None:
    """Whether ``ops`` bring every image to one size: True, False, or None when an ``External`` op makes it unknown.

    Images of one size are what a batch needs; a list that ends with an int ``Resize`` (short side only) or has
    no crop gives the stored sizes' aspect ratios, which can be batched only if they all agree.
    """
    fixed = False
    for op in ops:
        if isinstance(op, External):
            return None
        if isinstance(op, Crop) or (isinstance(op, Resize) and not isinstance(op.size, int)):
            fixed = True
        elif isinstance(op, Resize):
            fixed = False
    return fixed


def check_rgb(img: Any) -> Image.Image:
    """``img`` if it is an RGB PIL image (what the list must end with), else a :class:`ConfigError` saying so."""
    if isinstance(img, Image.Image) and img.mode == "RGB":
        return img
    kind = type(img)
    got = f"a {img.mode} PIL image" if isinstance(img, Image.Image) else f"a {kind.__module__}.{kind.__name__}"
    raise ConfigError(f"image_transforms must end with an RGB PIL image, got {got}; drop tensor or colour-mode "
                      "transforms from the list (the pipeline makes the [-1, 1] float tensor itself)")


def to_float_hwc(img: Image.Image) -> np.ndarray:
    """H x W x 3 float32 in [-1, 1] from an RGB PIL image (values equal ``ToTensor()(img) * 2 - 1``)."""
    arr = np.asarray(img)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise TypeError(f"image transforms must end with an RGB PIL image, got array {arr.dtype} {arr.shape}")
    # The same float32 operations in the same order as ToTensor (x / 255) then ldm's x * 2 - 1: bit-identical,
    # and in place, so one allocation for the whole conversion.
    out = arr.astype(np.float32)
    out /= np.float32(255.0)
    out *= np.float32(2.0)
    out -= np.float32(1.0)
    return out


__all__ = ["Crop", "External", "HorizontalFlip", "ImageOp", "Resize", "TooSmall", "build_image_transforms",
           "check_rgb", "gives_one_size", "to_float_hwc"]
