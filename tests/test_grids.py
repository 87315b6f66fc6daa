"""Labelled grids: cell placement is exact, headers and row labels draw ink only in their bands."""

from __future__ import annotations

import numpy as np
import pytest

from ldm.grids import PAD, labelled_grid, to_rgb_uint8
from ldm.image_io import make_grid


def _cells():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (16, 20, 3), dtype=np.uint8)
    b = rng.integers(0, 256, (12, 20, 3), dtype=np.uint8)  # smaller: placed top-left, white below
    m = np.zeros((16, 20), np.float32)
    m[4:8] = 1.0
    return a, b, m


def test_cells_are_placed_exactly_without_labels():
    a, b, m = _cells()
    grid = labelled_grid([[a, m], [b]])
    h, w = 16, 20
    assert grid.shape == (2 * h + 3 * PAD, 2 * w + 3 * PAD, 3) and grid.dtype == np.uint8
    assert np.array_equal(grid[PAD : PAD + h, PAD : PAD + w], a)
    assert np.array_equal(grid[PAD : PAD + h, 2 * PAD + w : 2 * PAD + 2 * w], to_rgb_uint8(m))
    y = 2 * PAD + h
    assert np.array_equal(grid[y : y + 12, PAD : PAD + w], b)
    assert (grid[y + 12 : y + h, PAD : PAD + w] == 255).all()  # below the smaller cell
    assert (grid[y : y + h, 2 * PAD + w : 2 * PAD + 2 * w] == 255).all()  # the missing cell of row 2
    assert np.array_equal(make_grid([[a, m], [b]]), grid)


def test_headers_and_row_labels_add_bands_with_ink_and_keep_the_cells():
    a, b, m = _cells()
    plain = labelled_grid([[a, m], [b, a]])
    grid = labelled_grid([[a, m], [b, a]], headers=["input", "mask"], row_labels=["seed 1", "seed 2"])
    top, left = grid.shape[0] - plain.shape[0], grid.shape[1] - plain.shape[1]
    assert top > 0 and left > 0
    assert np.array_equal(grid[top:, left:], plain)  # the body is unchanged
    assert (grid[:top] < 128).any(), "header text is drawn"
    assert (grid[top:, :left] < 128).any(), "row labels are drawn"


def test_label_count_mismatch_is_an_error():
    a, _, _ = _cells()
    with pytest.raises(ValueError, match="2 headers for 1 columns"):
        labelled_grid([[a]], headers=["x", "y"])
    with pytest.raises(ValueError, match="must be H x W"):
        labelled_grid([[np.zeros((4, 4, 4), np.uint8)]])


def test_long_headers_wrap_and_the_band_grows():
    from PIL import Image, ImageDraw

    from ldm.grids import _font, wrap_text

    cell = np.zeros((64, 64, 3), np.uint8)
    one = labelled_grid([[cell]], headers=["input"])
    two = labelled_grid([[cell]], headers=["scale 1.5 (seed 3)"])  # was cut to "scale 1.5 (se..."
    three = labelled_grid([[cell]], headers=["sample 0 scale 1.5 seed 3 ddim 50"])
    bands = [g.shape[0] - 64 - 2 * PAD for g in (one, two, three)]
    assert bands[0] < bands[1] < bands[2], bands  # one, two, three lines of text
    draw, font = ImageDraw.Draw(Image.new("RGB", (1, 1))), _font(10)
    lines = wrap_text(draw, "s=1.5 seed 3", font, 62)
    assert lines == ["s=1.5 seed 3"]  # the callers' short labels fit a 64 px cell on one line
    lines = wrap_text(draw, "scale 1.5 (seed 3)", font, 62)
    assert " ".join(lines) == "scale 1.5 (seed 3)" and all(draw.textlength(x, font=font) <= 62 for x in lines)
    many = wrap_text(draw, "a b c d e f g h i j k l m n o p q r s t u v w x y z " * 3, font, 30)
    assert len(many) == 3 and many[-1].endswith("...")  # at most three lines, the rest elided visibly
    assert all(draw.textlength(x, font=font) <= 30 for x in wrap_text(draw, "x" * 40, font, 30))  # long words break
    # row labels wrap inside their band too, and every line is drawn
    labelled = labelled_grid([[cell], [cell]], headers=["input"], row_labels=["seed 1", "seed 2"])
    assert (labelled[one.shape[0] - 64 - PAD :, :10] < 128).any()


def test_read_only_cells_raise_no_warning():
    import warnings

    from PIL import Image

    cell = np.asarray(Image.new("RGB", (16, 16), (10, 20, 30)))  # PIL's arrays are read-only
    assert not cell.flags.writeable
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        grid = labelled_grid([[cell, cell]], headers=["a", "b"], row_labels=["r"])
    assert (grid == (10, 20, 30)).all(axis=-1).any()
