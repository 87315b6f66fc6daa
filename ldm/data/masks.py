"""Pure inpainting-mask generators: a seeded ``numpy.random.Generator`` in, an ``H x W`` float32 mask out.

Every generator is a frozen dataclass with ``__call__(rng, height, width) -> np.ndarray`` returning a float32
array of shape ``(height, width)`` with values in {0, 1}, **1 = hole** (the pixels the model must fill).
Nothing here reads or writes global RNG state; the caller owns the seed (see ``ldm.data.rng``).

What is here (numbers: docs/DECISIONS.md R5):

* :class:`SDMask` -- the SD "synthetic mask" generator behind ``AddMask(mode=...)`` in the SD inpainting
  configs: 1-4 straight thick strokes *or* 1-3 boxes (half plain rectangles, half rounded squares).
  Presets ``256train``, ``256narrow``, ``512train`` and ``512train-large`` (SD 1.5 / SD2 inpainting).
* :class:`LamaIrregularMask`, :class:`LamaBoxMask`, :class:`MixedMask` -- LaMa's chained round-capped strokes,
  axis-aligned boxes and their random mixture, with LaMa's training preset (``lama-train``, the abl-04 config
  of big-lama) and the thin/medium/thick evaluation presets at 256 and 512 (``lama-thin-512`` ...).
* :class:`OutpaintingMask` -- border bands on 1-4 sides (LaMa's outpainting generator), mode ``outpainting``.
* :class:`MaxCoverage` -- rejection wrapper reproducing LaMa's evaluation rule "masks covering more than
  ``max_tamper_area`` (0.5) of the image are discarded".
* :class:`NativeSize` -- the size rule of the named presets (:data:`MASK_MODES`): a preset draws at its native
  size (256 or 512 px, the images its pixel numbers were made for) and the mask is resized to the image with
  nearest neighbour, so its coverage statistics are the same at 64, 128 or 768 px (docs/DECISIONS.md D6).
  The generator classes themselves draw in absolute pixels at whatever size they are called with.

Left out on purpose: LaMa's segmentation-based masks (need a detector), super-resolution grid masks, and the
linear-ramp curriculum (LaMa's configs use a constant coefficient of 1, which is what the presets encode).

COMPAT: the draw *distributions* follow the references; bit-exact masks are not reproducible (the SD code
mixes the global numpy RNG with a per-process ``RandomState``, LaMa draws with OpenCV). Coverage statistics
are checked against docs/DECISIONS.md R6 in tests/test_masks.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Literal, TypeVar

import numpy as np
from PIL import Image, ImageDraw

from ldm.config_schema import NonNegativeInt, PositiveInt, Probability, Range
from ldm.util import ConfigError

if TYPE_CHECKING:
    import torch

MaskGenerator = Callable[[np.random.Generator, int, int], np.ndarray]

# LaMa mirrors the stroke angle with this truncated constant, not math.pi (a fact of its code).
_LAMA_TWO_PI = 2 * 3.1415926


def _canvas(height: int, width: int) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    if height < 1 or width < 1:
        raise ValueError(f"mask size must be positive, got height={height}, width={width}")
    img = Image.new("L", (width, height), 0)
    return img, ImageDraw.Draw(img)


def _to_array(img: Image.Image) -> np.ndarray:
    # "L" pixels are 0/1 already; one cast gives the float32 {0,1} contract.
    return np.asarray(img, dtype=np.float32)


def _fit(lo: int, hi: int, limit: int) -> tuple[int, int]:
    """Clamp a half-open integer range ``[lo, hi)`` so that ``hi <= limit`` while staying non-empty."""
    hi = max(2, min(hi, limit))
    return min(lo, hi - 1), hi


@dataclass(frozen=True)
class SDMask:
    """The SD synthetic mask: straight strokes with probability ``p_irregular``, else boxes.

    Ranges are half-open like the reference's ``randint(lo, hi)`` calls, so ``strokes=(1, 5)`` means 1-4.

    Args:
        p_irregular: Probability of the stroke branch (the rest draws boxes).
        strokes: Half-open range of the number of strokes.
        max_len: Exclusive upper bound of a stroke's length in pixels (lower bound 10).
        max_width: Exclusive upper bound of a stroke's width in pixels (lower bound 5).
        boxes: Half-open range of the number of boxes.
        box_side: Half-open range of a box side in pixels.
        margin: Minimum distance in pixels between a box's top-left corner and the image border.
    """

    p_irregular: Probability
    strokes: tuple[NonNegativeInt, PositiveInt]
    max_len: PositiveInt
    max_width: PositiveInt
    boxes: tuple[NonNegativeInt, PositiveInt] = (1, 4)
    box_side: tuple[PositiveInt, PositiveInt] = (30, 150)
    margin: NonNegativeInt = 10

    def __call__(self, rng: np.random.Generator, height: int, width: int) -> np.ndarray:
        img, draw = _canvas(height, width)
        # COMPAT: the reference picks the branch with the *global* np.random; we use the per-sample rng so
        # that ranks and workers never share the choice (DECISIONS D6).
        if rng.random() < self.p_irregular:
            self._strokes(rng, draw, height, width)
        else:
            self._boxes(rng, draw, height, width)
        return _to_array(img)

    def _strokes(self, rng: np.random.Generator, draw: ImageDraw.ImageDraw, height: int, width: int) -> None:
        n = int(rng.integers(*self.strokes))
        ys, xs = rng.integers(0, height, n), rng.integers(0, width, n)
        # COMPAT: an integer number of *degrees* fed to sin/cos as radians; unchained strokes with flat ends.
        angles = rng.integers(0, 360, n).astype(np.float64)
        lengths = rng.integers(10, self.max_len, n)
        widths = rng.integers(5, self.max_width, n)
        x_end, y_end = xs + lengths * np.sin(angles), ys + lengths * np.cos(angles)
        for i in range(n):
            draw.line([(int(xs[i]), int(ys[i])), (float(x_end[i]), float(y_end[i]))], fill=1, width=int(widths[i]))

    def _boxes(self, rng: np.random.Generator, draw: ImageDraw.ImageDraw, height: int, width: int) -> None:
        m = self.margin
        # Images smaller than the preset was made for: cap sides to fit inside the margins (the reference raises).
        side_lo, side_hi = _fit(*self.box_side, min(height, width) - 2 * m)
        for _ in range(int(rng.integers(*self.boxes))):
            h, w = (int(v) for v in rng.integers(side_lo, side_hi, 2))
            x0 = int(rng.integers(m, max(m + 1, width - m - w)))
            y0 = int(rng.integers(m, max(m + 1, height - m - h)))
            if rng.random() < 0.5:
                draw.rectangle([x0, y0, x0 + w - 1, y0 + h - 1], fill=1)
            else:
                # COMPAT: the rounded variant is a square of side w (h unused), PIL corners inclusive.
                draw.rounded_rectangle([x0, y0, x0 + w, y0 + w], radius=int(rng.integers(0, 60)), fill=1)


@dataclass(frozen=True)
class LamaIrregularMask:
    """LaMa's irregular mask: chains of 1-5 straight segments with round ends (OpenCV thick lines).

    Matches ``RandomIrregularMaskGenerator`` at ramp coefficient 1, so the stroke count is uniform over
    ``[min_times, max_times + 1]`` (the generator adds one to LaMa's configured maximum).

    Args:
        max_angle: Segment angles are ``0.01 + k`` radians for integer ``k < max_angle`` (mirrored on even strokes).
        max_len: Segment length is ``10 + k`` pixels, ``k < max_len``.
        max_width: Brush width is ``5 + k`` pixels, ``k < max_width``.
        min_times: Minimum number of strokes.
        max_times: Configured maximum number of strokes (effective maximum is ``max_times + 1``).
    """

    max_angle: PositiveInt = 4
    max_len: PositiveInt = 60
    max_width: PositiveInt = 20
    min_times: NonNegativeInt = 0
    max_times: NonNegativeInt = 10

    def __call__(self, rng: np.random.Generator, height: int, width: int) -> np.ndarray:
        img, draw = _canvas(height, width)
        times = int(rng.integers(self.min_times, self.max_times + 2))
        n_vertex = 1 + rng.integers(0, 5, times)
        starts = rng.integers(0, (width, height), (times, 2)).tolist()
        # All per-segment draws at once (same distribution as LaMa's per-vertex calls, far fewer numpy calls).
        n_seg = int(n_vertex.sum())
        angle = 0.01 + rng.integers(0, self.max_angle, n_seg)
        mirrored = np.repeat(np.arange(times) % 2 == 0, n_vertex)
        angle = np.where(mirrored, _LAMA_TWO_PI - angle, angle)
        length = 10 + rng.integers(0, self.max_len, n_seg)
        # COMPAT: OpenCV fills both boundary rows of a thick line, so it is about thickness + 1 wide.
        widths = (6 + rng.integers(0, self.max_width, n_seg)).tolist()
        dx, dy = (length * np.sin(angle)).tolist(), (length * np.cos(angle)).tolist()
        seg = 0
        for (x, y), nv in zip(starts, n_vertex.tolist()):
            prev_w = 0
            for _ in range(nv):
                w = widths[seg]
                # LaMa truncates toward zero, then clips to [0, W] x [0, H]; the next segment starts here.
                nx, ny = min(max(int(x + dx[seg]), 0), width), min(max(int(y + dy[seg]), 0), height)
                draw.line([(x, y), (nx, ny)], fill=1, width=w)
                _disc(draw, x, y, max(w, prev_w))  # concentric caps: the wider one covers both segments' ends
                x, y, prev_w, seg = nx, ny, w, seg + 1
            _disc(draw, x, y, prev_w)
        return _to_array(img)


def _disc(draw: ImageDraw.ImageDraw, x: int, y: int, diameter: int) -> None:
    r = diameter / 2
    draw.ellipse([x - r, y - r, x + r, y + r], fill=1)


@dataclass(frozen=True)
class LamaBoxMask:
    """LaMa's rectangle mask: ``min_times..max_times`` axis-aligned boxes with sides ``min_size..max_size``.

    Matches ``RandomRectangleMaskGenerator`` at ramp coefficient 1 (both ranges inclusive); sides are capped
    at the image size minus both margins.

    Args:
        margin: Minimum distance in pixels between a box and the image border.
        min_size: Minimum box side in pixels.
        max_size: Maximum box side in pixels (inclusive).
        min_times: Minimum number of boxes.
        max_times: Maximum number of boxes (inclusive).
    """

    margin: NonNegativeInt = 10
    min_size: PositiveInt = 30
    max_size: PositiveInt = 100
    min_times: NonNegativeInt = 0
    max_times: NonNegativeInt = 3

    def __call__(self, rng: np.random.Generator, height: int, width: int) -> np.ndarray:
        mask = np.zeros((height, width), np.float32)
        m = self.margin
        lo, hi = _fit(self.min_size, self.max_size + 1, min(height, width) - 2 * m)
        for _ in range(int(rng.integers(self.min_times, self.max_times + 1))):
            bw, bh = (int(v) for v in rng.integers(lo, hi, 2))
            x0 = int(rng.integers(m, max(m + 1, width - m - bw + 1)))
            y0 = int(rng.integers(m, max(m + 1, height - m - bh + 1)))
            mask[y0 : y0 + bh, x0 : x0 + bw] = 1.0
        return mask


@dataclass(frozen=True)
class OutpaintingMask:
    """Border bands: each side is masked with probability ``p_side`` (at least one side always is).

    A band's thickness is uniform in ``[min_frac, max_frac]`` of the image height (top/bottom) or width
    (left/right), as in LaMa's ``OutpaintingMaskGenerator`` defaults.

    Args:
        min_frac: Minimum band thickness as a fraction of the image side.
        max_frac: Maximum band thickness as a fraction of the image side.
        p_side: Probability that each of the four sides gets a band.
    """

    min_frac: Probability = 0.04
    max_frac: Probability = 0.25
    p_side: Probability = 0.5

    def __call__(self, rng: np.random.Generator, height: int, width: int) -> np.ndarray:
        mask = np.zeros((height, width), np.float32)
        sides = rng.random(4) < self.p_side  # left, top, right, bottom
        if not sides.any():
            sides[rng.integers(0, 4)] = True
        frac = rng.uniform(self.min_frac, self.max_frac, 4)
        bands = [max(1, int(round(f * d))) for f, d in zip(frac, (width, height, width, height))]
        if sides[0]:
            mask[:, : bands[0]] = 1.0
        if sides[1]:
            mask[: bands[1], :] = 1.0
        if sides[2]:
            mask[:, width - bands[2] :] = 1.0
        if sides[3]:
            mask[height - bands[3] :, :] = 1.0
        return mask


@dataclass(frozen=True)
class MixedMask:
    """Pick one generator per draw with probability proportional to its weight; optionally invert.

    Args:
        generators: The candidate generators.
        weights: Non-negative weights, one per generator (normalised internally, like LaMa's ``*_proba``).
        invert_proba: Probability of returning ``1 - mask``.
    """

    generators: tuple[MaskGenerator, ...]
    weights: tuple[float, ...]
    invert_proba: Probability = 0.0

    def __post_init__(self) -> None:
        if len(self.generators) != len(self.weights) or not self.generators:
            raise ValueError("MixedMask: 'generators' and 'weights' must be non-empty and of equal length")
        if min(self.weights) < 0 or sum(self.weights) <= 0:
            raise ValueError(f"MixedMask: 'weights' must be >= 0 with a positive sum, got {self.weights}")

    def __call__(self, rng: np.random.Generator, height: int, width: int) -> np.ndarray:
        p = np.asarray(self.weights, np.float64)
        idx = int(rng.choice(len(self.generators), p=p / p.sum()))
        mask = self.generators[idx](rng, height, width)
        if self.invert_proba > 0 and rng.random() < self.invert_proba:
            mask = 1.0 - mask
        return mask


class MaskCoverageError(ValueError):
    """:class:`MaxCoverage` found no mask small enough: the generator cannot meet the coverage limit."""


@dataclass(frozen=True)
class MaxCoverage:
    """Redraw until the hole covers at most ``max_fraction`` of the image (LaMa eval's ``max_tamper_area``).

    The result is the base distribution conditioned on coverage <= ``max_fraction``, which is what LaMa's
    evaluation sets hold (it proposes several masks per image and keeps one that passes).

    Args:
        base: The generator to draw from.
        max_fraction: Largest accepted mean of the mask.
        max_tries: Give up with :class:`MaskCoverageError` after this many rejected draws (a generator that
            cannot pass).
    """

    base: MaskGenerator
    max_fraction: Annotated[float, Range(0, 1, lo_open=True)] = 0.5
    max_tries: PositiveInt = 1000

    def __call__(self, rng: np.random.Generator, height: int, width: int) -> np.ndarray:
        for _ in range(self.max_tries):
            mask = self.base(rng, height, width)
            if mask.mean() <= self.max_fraction:
                return mask
        raise MaskCoverageError(
            f"MaxCoverage: no mask of {type(self.base).__name__} covering <= {self.max_fraction} of a {height} x "
            f"{width} image in {self.max_tries} draws; use another mask mode or a larger max coverage")


def native_canvas(height: int, width: int, native: int) -> tuple[int, int]:
    """The canvas a preset of native side ``native`` draws on for an ``height x width`` target: short side
    ``native``, the target's aspect ratio (rounded to whole pixels)."""
    if height < 1 or width < 1:
        raise ValueError(f"mask size must be positive, got height={height}, width={width}")
    scale = native / min(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def resize_nearest(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize of an ``H x W`` mask, sampling each target pixel's centre (PIL's NEAREST rule).

    Values are copied, never blended, so a {0, 1} mask stays {0, 1} and its coverage is kept up to the sampling
    of edge pixels.
    """
    h, w = mask.shape
    if (h, w) == (height, width):
        return mask
    rows = ((np.arange(height) + 0.5) * (h / height)).astype(np.int64)
    cols = ((np.arange(width) + 0.5) * (w / width)).astype(np.int64)
    return mask[np.minimum(rows, h - 1)[:, None], np.minimum(cols, w - 1)[None, :]]


@dataclass(frozen=True)
class NativeSize:
    """Draw at a preset's native size, then resize to the target with nearest neighbour (docs/DECISIONS.md D6).

    The SD and LaMa presets give stroke lengths, widths and box sides in pixels of the images they were made
    for (256 or 512 px). Drawn directly on a 64 px image, the same pixels cover most of it (512train-large:
    mean 0.58 instead of 0.326). Drawing on a canvas whose short side is the native size, with the target's
    aspect ratio, and resizing the mask keeps the coverage statistics of docs/DECISIONS.md R6 at every image
    size; at the native size the mask is the base generator's own, unchanged.

    Args:
        base: The generator whose pixel parameters are meant for images of side ``size``.
        size: The native (reference) side in pixels.
    """

    base: MaskGenerator
    size: PositiveInt

    def __call__(self, rng: np.random.Generator, height: int, width: int) -> np.ndarray:
        h, w = native_canvas(height, width, self.size)
        return resize_nearest(self.base(rng, h, w), height, width)


def _lama_eval(irregular: LamaIrregularMask, box: LamaBoxMask | None) -> MaskGenerator:
    # LaMa eval presets: irregular_proba 1 and box_proba 0.3 -> 1/1.3 irregular after normalisation.
    return irregular if box is None else MixedMask((irregular, box), (1.0, 0.3))


# Named modes, as AddMask(mode=...) and the configs spell them. Numbers: docs/DECISIONS.md R5 (SD and LaMa).
# Each preset draws at its native size (the image side its pixel numbers were made for) and is resized to the
# target (NativeSize, D6); the outpainting bands are fractions of the image and need no native size.
MASK_MODES: dict[str, MaskGenerator] = {
    "256train": NativeSize(
        SDMask(0.5, strokes=(1, 5), max_len=200, max_width=100, boxes=(1, 4), box_side=(30, 150)), 256),
    "256narrow": NativeSize(SDMask(1.0, strokes=(4, 50), max_len=40, max_width=10), 256),
    "512train": NativeSize(
        SDMask(0.5, strokes=(1, 5), max_len=450, max_width=250, boxes=(1, 4), box_side=(30, 300)), 512),
    "512train-large": NativeSize(
        SDMask(0.5, strokes=(1, 5), max_len=450, max_width=400, boxes=(1, 4), box_side=(75, 450)), 512),
    "lama-train": NativeSize(MixedMask(  # big-lama trains on 256 px crops
        (LamaIrregularMask(4, 200, 100, 1, 5), LamaBoxMask(10, 30, 150, 1, 4)), weights=(1.0, 1.0)), 256),
    "lama-thin-256": NativeSize(_lama_eval(LamaIrregularMask(4, 40, 10, 4, 50), None), 256),
    "lama-medium-256": NativeSize(
        _lama_eval(LamaIrregularMask(4, 100, 50, 4, 5), LamaBoxMask(0, 10, 50, 1, 5)), 256),
    "lama-thick-256": NativeSize(
        _lama_eval(LamaIrregularMask(4, 200, 100, 1, 5), LamaBoxMask(10, 30, 150, 1, 3)), 256),
    "lama-thin-512": NativeSize(_lama_eval(LamaIrregularMask(4, 100, 20, 4, 70), None), 512),
    "lama-medium-512": NativeSize(
        _lama_eval(LamaIrregularMask(4, 200, 100, 4, 10), LamaBoxMask(0, 30, 150, 1, 5)), 512),
    "lama-thick-512": NativeSize(
        _lama_eval(LamaIrregularMask(4, 450, 250, 1, 5), LamaBoxMask(10, 30, 300, 1, 4)), 512),
    "outpainting": OutpaintingMask(),
}


#: the mode names as a type, so config checks (``ldm.config_schema``) list them as the valid choices
MaskMode = Literal[tuple(MASK_MODES)]  # built from the table above: one list of names


def preset_name(mode: str) -> str:
    """The preset of a mode name: ``lama-thick-256@64`` -> ``lama-thick-256``."""
    return mode.partition("@")[0]


def get_mask_generator(mode: str) -> MaskGenerator:
    """Look up a named mode; unknown names raise ConfigError listing the valid ones.

    ``NAME@N`` is preset ``NAME`` drawn at ``N`` px instead of its native size, the explicit way to ask for
    other hole sizes (``lama-thick-256@64`` on 64 px images: the 256 px pixel numbers taken as they are, strokes
    four times as thick relative to the image as the preset's). Its coverage statistics are not the preset's.
    """
    if not isinstance(mode, str):
        raise ConfigError(f"mask mode must be a name, got {mode!r}; valid modes: {', '.join(MASK_MODES)}")
    name, at, size = mode.partition("@")
    if name not in MASK_MODES:
        raise ConfigError(f"unknown mask mode {name!r}; valid modes: {', '.join(MASK_MODES)}")
    gen = MASK_MODES[name]
    if not at:
        return gen
    if not isinstance(gen, NativeSize) or not size.isdigit() or int(size) < 1:
        sized = [m for m, g in MASK_MODES.items() if isinstance(g, NativeSize)]
        raise ConfigError(f"mask mode {mode!r}: NAME@N needs a positive pixel size N and a preset with a native "
                          f"size ({', '.join(sized)})")
    return NativeSize(gen.base, int(size))


# ------------------------------------------------------------------------ mask polarity and the masked image
#: a mask value at or above this marks a hole (1 = hole, the pixels to fill; docs/DECISIONS.md D5, D6)
HOLE_THRESHOLD = 0.5
ArrayLike = TypeVar("ArrayLike", np.ndarray, "torch.Tensor")  # this module stays importable without torch


def is_hole(mask: ArrayLike) -> ArrayLike:
    """Boolean hole map of a mask (numpy or torch): ``mask >= 0.5``."""
    return mask >= HOLE_THRESHOLD


def binarize_mask(mask: ArrayLike) -> ArrayLike:
    """The mask as float32 {0, 1}, 1 = hole (numpy or torch, same shape)."""
    hole = is_hole(mask)
    return hole.astype(np.float32) if isinstance(hole, np.ndarray) else hole.float()


def masked_image(image: ArrayLike, mask: ArrayLike) -> ArrayLike:
    """The model's masked-image input: ``image * (mask < 0.5)``, so hole pixels become 0 (mid grey in [-1, 1]).

    The one definition used by the data pipeline, training batches, inference and tests (DECISIONS D5, as in SD2's
    inpainting data code). ``image`` and ``mask`` are both numpy arrays or both tensors, in broadcastable
    layouts (``H x W x 3`` with ``H x W x 1``, ``B x 3 x H x W`` with ``B x 1 x H x W``, ...). The keep-map is
    cast to the image's dtype first, which is bit-identical to the boolean product and faster in numpy.
    """
    keep = mask < HOLE_THRESHOLD
    return image * (keep.astype(image.dtype) if isinstance(keep, np.ndarray) else keep.to(image.dtype))


def coverage(mask: np.ndarray) -> float:
    """Fraction of hole pixels (mask == 1)."""
    return float(mask.mean())


def full_mask(height: int, width: int) -> np.ndarray:
    """The all-hole mask used for ``p_drop`` (a pure text-to-image sample)."""
    return np.ones((height, width), np.float32)


__all__ = [
    "HOLE_THRESHOLD",
    "MASK_MODES",
    "MaskMode",
    "LamaBoxMask",
    "LamaIrregularMask",
    "MaskCoverageError",
    "MaskGenerator",
    "MaxCoverage",
    "MixedMask",
    "NativeSize",
    "OutpaintingMask",
    "SDMask",
    "binarize_mask",
    "coverage",
    "full_mask",
    "get_mask_generator",
    "is_hole",
    "masked_image",
    "native_canvas",
    "preset_name",
    "resize_nearest",
]
