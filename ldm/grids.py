"""Labelled image grids: every picture this project writes says what each column (and optionally row) shows.

One function, :func:`labelled_grid`, serves the sampling script, the evaluation report, the training image logs
and the demo. Cells are tiled with :func:`torchvision.utils.make_grid`; a header band with one label per column
(and an optional label band on the left, one per row) is drawn with PIL's built-in font, so no font file is
needed. Labels wrap over up to :data:`MAX_LINES` lines (the band grows to fit), so a narrow cell's header stays
readable; callers keep labels short ("s=7.5", "seed 3"). Cells of different sizes are placed top-left in a white
cell of the largest size.

Conventions: a cell is an ``H x W x 3`` uint8 RGB array or an ``H x W`` float mask in [0, 1] (shown as grey).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torchvision
from PIL import Image, ImageDraw, ImageFont

__all__ = ["MAX_LINES", "labelled_grid", "to_rgb_uint8", "wrap_text"]

#: pixels of white between cells and around the grid
PAD = 2
#: header and row-label text wraps over at most this many lines (the band grows to fit)
MAX_LINES = 3


def to_rgb_uint8(cell: np.ndarray) -> np.ndarray:
    """An ``H x W x 3`` uint8 view of a cell: uint8 RGB passes through, a [0, 1] mask or float image is scaled."""
    arr = np.asarray(cell)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3):
        raise ValueError(f"a grid cell must be H x W, H x W x 1 or H x W x 3, got shape {arr.shape}")
    if arr.dtype != np.uint8:
        arr = (np.clip(arr.astype(np.float32), 0.0, 1.0) * 255.0).round().astype(np.uint8)
    return np.repeat(arr, 3, axis=-1) if arr.shape[-1] == 1 else arr


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1: a scalable built-in font
    except TypeError:  # older Pillow: the fixed bitmap font
        return ImageFont.load_default()


def _fit_text(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont, width: int) -> str:
    """``text`` shortened with an ellipsis until it fits ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def wrap_text(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont, width: int,
              max_lines: int = MAX_LINES) -> list[str]:
    """``text`` broken into at most ``max_lines`` lines of at most ``width`` pixels.

    Lines break between words; a word wider than a line is broken between characters. Text that still does not fit
    ends in an ellipsis on the last line.
    """
    width = max(width, 1)
    lines: list[str] = []
    line = ""
    for word in str(text).split():
        candidate = f"{line} {word}" if line else word
        if draw.textlength(candidate, font=font) <= width:
            line = candidate
            continue
        if line:
            lines.append(line)
        while draw.textlength(word, font=font) > width and len(word) > 1:  # break a long word by characters
            cut = 1
            while cut < len(word) and draw.textlength(word[: cut + 1], font=font) <= width:
                cut += 1
            lines.append(word[:cut])
            word = word[cut:]
        line = word
    if line:
        lines.append(line)
    if len(lines) > max_lines:
        lines = [*lines[: max_lines - 1], _fit_text(draw, " ".join(lines[max_lines - 1 :]), font, width)]
    return lines or [""]


def labelled_grid(
    rows: Sequence[Sequence[np.ndarray]],
    headers: Sequence[str] | None = None,
    row_labels: Sequence[str] | None = None,
    pad: int = PAD,
) -> np.ndarray:
    """Tile ``rows`` of cells into one ``H x W x 3`` uint8 image with column headers and optional row labels.

    Args:
        rows: a list of rows, each a list of cells (see the module docstring); rows may have different lengths.
        headers: one label per column (``None``: no header band). Must match the longest row.
        row_labels: one label per row, drawn in a band on the left (``None``: no band).
        pad: white pixels between cells.
    """
    if not rows or not any(rows):
        raise ValueError("labelled_grid needs at least one cell")
    cells = [[to_rgb_uint8(c) for c in row] for row in rows]
    ncol = max(len(row) for row in cells)
    if headers is not None and len(headers) != ncol:
        raise ValueError(f"labelled_grid: {len(headers)} headers for {ncol} columns")
    if row_labels is not None and len(row_labels) != len(cells):
        raise ValueError(f"labelled_grid: {len(row_labels)} row labels for {len(cells)} rows")
    h = max(c.shape[0] for row in cells for c in row)
    w = max(c.shape[1] for row in cells for c in row)
    tiles = torch.full((len(cells) * ncol, 3, h, w), 255, dtype=torch.uint8)  # missing cells stay white
    for i, row in enumerate(cells):
        for j, c in enumerate(row):
            # np.array copies: cells are often read-only views of PIL images, which torch.from_numpy warns about
            tiles[i * ncol + j, :, : c.shape[0], : c.shape[1]] = torch.from_numpy(np.array(c)).permute(2, 0, 1)
    body = torchvision.utils.make_grid(tiles, nrow=ncol, padding=pad, pad_value=255)  # 3 x H' x W'
    body = body.permute(1, 2, 0).numpy()
    if headers is None and row_labels is None:
        return np.ascontiguousarray(body)

    font_px = max(10, min(16, w // 10))
    line_px = font_px + 3
    font = _font(font_px)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    left = 0
    if row_labels is not None:
        left = min(int(max(probe.textlength(str(t), font=font) for t in row_labels)) + 2 * pad + 2, 2 * w)
    head_lines = [wrap_text(probe, str(t), font, w - 2) for t in headers or ()]
    row_lines = [wrap_text(probe, str(t), font, left - 2 * pad) for t in row_labels or ()]
    top = max(len(lines) for lines in head_lines) * line_px + 2 * pad if headers is not None else 0
    canvas = Image.new("RGB", (left + body.shape[1], top + body.shape[0]), "white")
    canvas.paste(Image.fromarray(body), (left, top))
    draw = ImageDraw.Draw(canvas)
    for j, lines in enumerate(head_lines):
        x = left + pad + j * (w + pad)
        for k, line in enumerate(lines):
            draw.text((x + 1, pad + k * line_px), line, fill="black", font=font)
    for i, lines in enumerate(row_lines):
        y = top + pad + i * (h + pad) + max(0, (h - len(lines) * line_px) // 2)
        for k, line in enumerate(lines):
            draw.text((pad, y + k * line_px), line, fill="black", font=font)
    return np.asarray(canvas)
