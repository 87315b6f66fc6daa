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
