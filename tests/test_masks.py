"""Mask generators and AddMask: layouts, seeding, no global RNG, and coverage statistics vs docs/DECISIONS.md R6."""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest
import torch

from ldm.data.inpainting import AddMask
from ldm.data.masks import (
    MASK_MODES,
    LamaBoxMask,
    LamaIrregularMask,
    MaskCoverageError,
    MaxCoverage,
    MixedMask,
    NativeSize,
    OutpaintingMask,
    SDMask,
    get_mask_generator,
    native_canvas,
    resize_nearest,
)
from ldm.data.rng import SEED_KEY


def _draw(mode: str, n: int, size: int, seed: int = 0) -> np.ndarray:
    gen, rng = MASK_MODES[mode], np.random.default_rng(seed)
    return np.array([gen(rng, size, size).mean() for _ in range(n)])


@pytest.mark.parametrize("mode", list(MASK_MODES))
@pytest.mark.parametrize("hw", [(64, 64), (96, 160), (256, 256)])
def test_every_mode_gives_binary_float_masks(mode, hw):
    rng = np.random.default_rng(1)
    masks = [MASK_MODES[mode](rng, *hw) for _ in range(5)]
    for m in masks:
        assert m.shape == hw and m.dtype == np.float32
        assert set(np.unique(m).tolist()) <= {0.0, 1.0}
    assert any(m.any() for m in masks), "a generator that never masks anything"


@pytest.mark.parametrize("mode", ["512train-large", "lama-thin-512", "lama-train", "outpainting"])
def test_fixed_seed_fixed_mask_and_seeds_differ(mode):
    gen = MASK_MODES[mode]
    a = gen(np.random.default_rng(7), 128, 128)
    b = gen(np.random.default_rng(7), 128, 128)
    c = gen(np.random.default_rng(8), 128, 128)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_generators_and_addmask_leave_global_rng_untouched():
    np.random.seed(123)
    random.seed(123)
    torch.manual_seed(123)
    np_state, py_state, torch_state = np.random.get_state()[1].copy(), random.getstate(), torch.get_rng_state()
    rng = np.random.default_rng(0)
    for gen in MASK_MODES.values():
        gen(rng, 64, 64)
    AddMask("512train-large", p_drop=0.5)({"jpg": np.zeros((64, 64, 3), np.float32), SEED_KEY: (1, 2, 3)})
    np.testing.assert_array_equal(np.random.get_state()[1], np_state)
    assert random.getstate() == py_state
    assert torch.equal(torch.get_rng_state(), torch_state)


def test_unknown_mode_lists_valid_modes():
    with pytest.raises(ValueError, match="512train-large"):
        get_mask_generator("512-train-large")


def test_lama_box_mask_respects_margin_and_size_range():
    gen = LamaBoxMask(margin=10, min_size=30, max_size=60, min_times=1, max_times=1)
    rng = np.random.default_rng(0)
    for _ in range(50):
        m = gen(rng, 128, 128)
        assert not m[:10].any() and not m[:, :10].any() and not m[-10:].any() and not m[:, -10:].any()
        rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
        assert 30 <= rows.size <= 60 and 30 <= cols.size <= 60
        assert m.sum() == rows.size * cols.size  # one solid axis-aligned box


def test_lama_irregular_stroke_count_matches_generator_semantics():
    # times = 0..max_times+1 at ramp coefficient 1: with min=max=0 some draws have one stroke, some none.
    gen = LamaIrregularMask(max_len=20, max_width=5, min_times=0, max_times=0)
    rng = np.random.default_rng(0)
    nonempty = [gen(rng, 64, 64).any() for _ in range(200)]
    assert 0.3 < np.mean(nonempty) < 0.7


def test_outpainting_is_a_union_of_border_bands():
    gen, rng = OutpaintingMask(), np.random.default_rng(3)
    for _ in range(100):
        m = gen(rng, 100, 120)
        assert m[50, 60] == 0  # bands are at most 25% of a side: the centre is never masked
        bands = [m[:, 0].all(), m[0, :].all(), m[:, -1].all(), m[-1, :].all()]
        assert any(bands)
        # every hole pixel lies in a full row or full column band touching a border
        rows, cols = m.all(1), m.all(0)
        assert np.array_equal(m.astype(bool), rows[:, None] | cols[None, :])


def test_mixed_and_max_coverage():
    full, empty = (lambda r, h, w: np.ones((h, w), np.float32)), (lambda r, h, w: np.zeros((h, w), np.float32))
    mixed, rng = MixedMask((full, empty), (3.0, 1.0)), np.random.default_rng(0)
    share_full = np.mean([mixed(rng, 8, 8).mean() for _ in range(2000)])
    assert abs(share_full - 0.75) < 0.03
    capped = MaxCoverage(MASK_MODES["lama-thick-512"], 0.5)
    assert max(capped(rng, 128, 128).mean() for _ in range(100)) <= 0.5
    with pytest.raises(MaskCoverageError, match="no mask .* covering <= 0.5 of a 8 x 8 image in 3 draws"):
        MaxCoverage(full, 0.5, max_tries=3)(rng, 8, 8)
    assert issubclass(MaskCoverageError, ValueError)  # scripts answer it with one line and exit code 2
    with pytest.raises(ValueError, match="weights"):
        MixedMask((full,), (-1.0,))


def test_sd_boxes_fit_small_images():
    # 512train-large boxes are 75..449 px; at 64 px the sides are capped instead of raising.
    gen = dataclasses.replace(MASK_MODES["512train-large"].base, p_irregular=0.0)
    m = gen(np.random.default_rng(0), 64, 64)
    assert m.any() and isinstance(gen, SDMask)


# ------------------------------------------------------------------------------- presets at any image size
NATIVE = {"256train": 256, "256narrow": 256, "512train": 512, "512train-large": 512, "lama-train": 256,
          "lama-thin-256": 256, "lama-medium-256": 256, "lama-thick-256": 256, "lama-thin-512": 512,
          "lama-medium-512": 512, "lama-thick-512": 512}


def test_every_pixel_preset_has_its_native_size():
    assert {m: g.size for m, g in MASK_MODES.items() if isinstance(g, NativeSize)} == NATIVE
    assert set(MASK_MODES) - set(NATIVE) == {"outpainting"}  # bands are fractions of the side: no native size


@pytest.mark.parametrize("mode", ["512train-large", "lama-thin-512", "lama-thick-512", "lama-train"])
def test_preset_is_its_native_mask_resized_nearest(mode):
    gen, native = MASK_MODES[mode], NATIVE[mode]
    for seed in range(3):
        ref = gen(np.random.default_rng(seed), native, native)
        assert np.array_equal(ref, gen.base(np.random.default_rng(seed), native, native))  # native: unchanged
        for size in (64, 96, 128, 768):
            m = gen(np.random.default_rng(seed), size, size)
            assert m.shape == (size, size) and m.dtype == np.float32 and set(np.unique(m)) <= {0.0, 1.0}
            assert np.array_equal(m, resize_nearest(ref, size, size))
    # AddMask (training) draws through the same rule: its 64 px mask is the 512 px one, resized
    add, native_add = AddMask(mode), AddMask(mode)
    small = add.make_mask(np.random.default_rng(5), 64, 64)
    assert np.array_equal(small, resize_nearest(native_add.make_mask(np.random.default_rng(5), native, native),
                                                64, 64))


def test_preset_coverage_is_the_same_at_every_size():
    """Mean coverage over the same 100 seeds at 64, 128 and 256 px against 512 px: drawn unscaled on a 64 px
    image 512train-large covered 0.58 on average and lama-thin-512 0.98 (DECISIONS R6 gives 0.326 and 0.292)."""
    for mode in ("512train-large", "lama-thin-512", "lama-medium-512", "lama-thick-512", "256train"):
        gen = MASK_MODES[mode]
        means = {size: np.mean([gen(np.random.default_rng(i), size, size).mean() for i in range(100)])
                 for size in (64, 128, 256, 512)}
        for size in (64, 128, 256):
            assert abs(means[size] - means[512]) < 0.005, (mode, means)
        unscaled = np.mean([gen.base(np.random.default_rng(i), 64, 64).mean() for i in range(100)])
        assert unscaled - means[512] > 0.1, (mode, unscaled, means)  # what the rule prevents


def test_a_preset_at_another_size_is_asked_for_by_name():
    """``NAME@N`` draws preset NAME at N px (the explicit opt-in to other hole sizes, e.g. the demo's thick holes):
    at N equal to the image size the preset's pixel numbers are taken as they are."""
    gen = get_mask_generator("lama-thick-256@64")
    base = MASK_MODES["lama-thick-256"].base
    for seed in range(3):
        assert np.array_equal(gen(np.random.default_rng(seed), 64, 64), base(np.random.default_rng(seed), 64, 64))
    assert get_mask_generator("512train-large@128") == NativeSize(MASK_MODES["512train-large"].base, 128)
    for bad in ("outpainting@64", "lama-thick-256@", "lama-thick-256@x", "lama-thick-256@0"):
        with pytest.raises(ValueError, match="NAME@N needs a positive pixel size"):
            get_mask_generator(bad)
    with pytest.raises(ValueError, match="unknown mask mode 'thick'"):
        get_mask_generator("thick@64")


def test_native_canvas_keeps_the_aspect_ratio():
    assert native_canvas(64, 64, 512) == (512, 512)
    assert native_canvas(96, 160, 256) == (256, 427)
    assert native_canvas(1024, 768, 512) == (683, 512)
    m = MASK_MODES["512train-large"](np.random.default_rng(0), 96, 160)
    assert m.shape == (96, 160)
    with pytest.raises(ValueError, match="positive"):
        native_canvas(0, 64, 512)


def test_evaluation_masks_at_64px_keep_lamas_rule(monkeypatch):
    """``evaluate.py --size 64`` with the default presets once stopped with "no mask with coverage <= 0.5 in 1000
    draws" (lama-thin-512 drawn unscaled covers ~0.98 of a 64 px image)."""
    from ldm.eval.data import DEFAULT_MASK_MODES, fixed_masks

    for mode in DEFAULT_MASK_MODES:
        masks = fixed_masks(mode, 9, 64, seed=0)
        assert len(masks) == 9 and all(m.shape == (64, 64) for m in masks)
        if mode.startswith("lama-"):
            assert all(m.mean() <= 0.5 for m in masks)
    # a preset that cannot meet LaMa's limit is a ValueError naming preset and size (one line from the script)
    monkeypatch.setitem(MASK_MODES, "lama-everything", lambda r, h, w: np.ones((h, w), np.float32))
    with pytest.raises(MaskCoverageError, match="mask preset 'lama-everything' at 64 px: .*no mask"):
        fixed_masks("lama-everything", 1, 64)


# ---------------------------------------------------------------------------------------------- AddMask


@pytest.mark.parametrize("as_tensor", [False, True])
def test_addmask_layout_and_masked_image(as_tensor):
    img = np.random.default_rng(0).uniform(-1, 1, (48, 40, 3)).astype(np.float32)
    sample = {"jpg": torch.from_numpy(img) if as_tensor else img, SEED_KEY: (0, 0, 5)}
    out = AddMask("lama-thick-256")(sample)
    mask, masked = np.asarray(out["mask"]), np.asarray(out["masked_image"])
    assert mask.shape == (48, 40, 1) and mask.dtype == np.float32 and set(np.unique(mask)) <= {0.0, 1.0}
    assert masked.shape == (48, 40, 3) and masked.dtype == np.float32
    # ldm's formula, bit for bit (signed zeros included): holes are 0, not -1
    np.testing.assert_array_equal(masked.view(np.uint32), (img * (mask < 0.5)).view(np.uint32))
    assert isinstance(out["mask"], torch.Tensor) == as_tensor


def test_addmask_p_drop_extremes():
    img = np.ones((32, 32, 3), np.float32)
    always = AddMask("outpainting", p_drop=1.0)
    never = AddMask("outpainting", p_drop=0.0)  # outpainting bands never cover the whole image
    for i in range(50):
        full = always({"jpg": img, SEED_KEY: (i,)})
        assert full["mask"].all() and not full["masked_image"].any()
        assert not never({"jpg": img, SEED_KEY: (i,)})["mask"].all()


def test_addmask_draws_from_sample_seed_words():
    img = np.zeros((64, 64, 3), np.float32)
    add = AddMask("512train-large", p_drop=0.25)
    a = add({"jpg": img, SEED_KEY: (0, 0, 0, 0, 1, 0, 17)})["mask"]
    b = AddMask("512train-large", p_drop=0.25)({"jpg": img, SEED_KEY: (0, 0, 0, 0, 1, 0, 17)})["mask"]
    c = add({"jpg": img, SEED_KEY: (0, 0, 0, 0, 1, 0, 18)})["mask"]
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_addmask_fallback_generator_is_seeded_and_warns(caplog):
    img = np.zeros((64, 64, 3), np.float32)
    first = AddMask("lama-train", seed=3)({"jpg": img})["mask"]
    again = AddMask("lama-train", seed=3)({"jpg": img})["mask"]
    np.testing.assert_array_equal(first, again)
    assert "__seed__" in caplog.text


def test_addmask_accepts_a_generator_config_and_rejects_bad_params():
    add = AddMask({"target": "ldm.data.masks.LamaBoxMask", "params": {"margin": 0, "min_size": 8, "max_size": 8,
                                                                       "min_times": 1, "max_times": 1}})
    m = add({"jpg": np.zeros((16, 16, 3), np.float32), SEED_KEY: (1,)})["mask"]
    assert m.sum() == 64
    with pytest.raises(ValueError, match="p_drop"):
        AddMask(p_drop=1.5)
    with pytest.raises(ValueError, match="valid modes"):
        AddMask("no-such-mode")


def test_addmask_uint8_transport_keeps_uint8_mask():
    out = AddMask("outpainting")({"jpg": np.zeros((16, 16, 3), np.uint8), SEED_KEY: (1,)})
    assert out["mask"].dtype == np.uint8 and out["mask"].shape == (16, 16, 1) and "masked_image" not in out


# ------------------------------------------------------------------------------ coverage vs DECISIONS R6


@pytest.mark.slow
def test_512train_large_coverage_matches_reference():
    cov = _draw("512train-large", 4000, 512)
    assert abs(cov.mean() - 0.326) < 0.02 and abs(np.median(cov) - 0.304) < 0.02
    assert abs(np.quantile(cov, 0.1) - 0.067) < 0.02 and abs(np.quantile(cov, 0.9) - 0.622) < 0.03
    add, rng = AddMask("512train-large", p_drop=0.25), np.random.default_rng(1)
    after = np.array([add.make_mask(rng, 512, 512).mean() for _ in range(4000)])
    assert abs(after.mean() - 0.496) < 0.02 and abs(np.median(after) - 0.418) < 0.03
    assert abs((after == 1.0).mean() - 0.25) < 0.03


@pytest.mark.slow
@pytest.mark.parametrize(
    "mode, mean, p50, p90",
    [("lama-thick-512", 0.458, 0.445, 0.801), ("lama-medium-512", 0.304, 0.323, 0.506),
     ("lama-thin-512", 0.292, 0.302, 0.468)],
)
def test_lama_eval_presets_match_spec_rows(mode, mean, p50, p90):
    cov = _draw(mode, 4000, 512)
    assert abs(cov.mean() - mean) < 0.02 and abs(np.median(cov) - p50) < 0.02
    assert abs(np.quantile(cov, 0.9) - p90) < 0.03


@pytest.mark.slow
def test_sd_and_lama_training_rows_match_reference():
    for mode, size, mean, p50 in (("512train", 512, 0.182, 0.165), ("256train", 256, 0.172, 0.157),
                                  ("lama-train", 256, 0.349, 0.314)):
        cov = _draw(mode, 2000, size)
        assert abs(cov.mean() - mean) < 0.02 and abs(np.median(cov) - p50) < 0.02, mode
