"""Inference: checkpoint loading (EMA or raw, wrong files), input preparation, SD2 conditioning and seeded sampling
on a tiny model (CPU); scripts/inpaint.py end to end is in tests/test_inpaint_script.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ldm import compat
from ldm.checkpoint import CheckpointError
from ldm.inference import (
    SamplingOptions,
    fit_to_multiple,
    image_tensors,
    inpaint,
    inpaint_conditioning,
    load_model,
    restore_size,
)
from ldm.interop.ldm_format import ema_key
from tests.inference_fixtures import CONFIG, UNET_KEY


# ---------------------------------------------------------------------------------------------------- loading
def test_ema_chosen_when_present_and_raw_on_request(ckpts):
    sd = torch.load(ckpts["ema"], weights_only=True)["state_dict"]
    ema, raw = sd[ema_key(UNET_KEY)], sd[UNET_KEY]
    assert not torch.equal(ema, raw)

    auto = load_model(CONFIG, ckpts["ema"], device="cpu")
    assert auto.used_ema and auto.global_step == 7
    assert torch.equal(auto.model.state_dict()[UNET_KEY], ema)
    assert not hasattr(auto.model, "model_ema")

    forced_raw = load_model(CONFIG, ckpts["ema"], use_ema=False, device="cpu")
    assert not forced_raw.used_ema
    assert torch.equal(forced_raw.model.state_dict()[UNET_KEY], raw)
    # the rest of the model is the same either way
    key = "first_stage_model.decoder.conv_out.weight"
    assert torch.equal(auto.model.state_dict()[key], forced_raw.model.state_dict()[key])


def test_checkpoint_without_ema_loads_raw_weights(ckpts):
    loaded = load_model(CONFIG, ckpts["raw"], device="cpu")
    sd = torch.load(ckpts["raw"], weights_only=True)["state_dict"]
    assert loaded.used_ema is None and loaded.weights == "as stored"  # no EMA copy and no record of which
    assert all(torch.equal(loaded.model.state_dict()[k], v) for k, v in sd.items())
    with pytest.raises(CheckpointError, match="no model_ema"):
        load_model(CONFIG, ckpts["raw"], use_ema=True, device="cpu")


def test_bare_state_dict_file_loads(ckpts):
    assert load_model(CONFIG, ckpts["sd"], device="cpu").used_ema


def test_wrong_architecture_and_non_checkpoint_files_raise(ckpts, tmp_path):
    with pytest.raises(CheckpointError, match=r"input_blocks\.0\.0\.weight"):
        load_model(CONFIG, ckpts["base"], device="cpu")
    with pytest.raises(CheckpointError, match="not a loadable checkpoint"):
        load_model(CONFIG, ckpts["junk"], device="cpu")
    with pytest.raises(CheckpointError, match="not found"):
        load_model(CONFIG, tmp_path / "missing.ckpt", device="cpu")
    partial = tmp_path / "partial.ckpt"
    sd = torch.load(ckpts["raw"], weights_only=True)["state_dict"]
    torch.save({"state_dict": {k: v for k, v in sd.items() if not k.startswith("first_stage_model.")}}, partial)
    with pytest.raises(CheckpointError, match="missing tensors"):
        load_model(CONFIG, partial, device="cpu")


def test_recorded_parameterization_must_match_config(ckpts):
    with pytest.raises(CheckpointError, match="parameterization 'eps'.*'v'"):
        load_model(CONFIG, ckpts["eps"], device="cpu")


# ------------------------------------------------------------------------------------------- inputs, geometry
def test_fit_pad_and_resize_restore_original_size():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)
    mask = (rng.random((70, 90)) > 0.5).astype(np.float32)
    padded, pmask, geo = fit_to_multiple(img, mask, 64, "pad")
    assert padded.shape == (128, 128, 3) and pmask.shape == (128, 128)
    assert np.array_equal(padded[:70, :90], img) and np.array_equal(padded[100, 120], img[69, 89])  # edge pad
    assert np.array_equal(restore_size(padded, geo), img)
    resized, rmask, geo = fit_to_multiple(img, mask, 64, "resize")
    assert resized.shape == (64, 64, 3) and rmask.shape == (64, 64)
    assert restore_size(resized, geo).shape == img.shape
    with pytest.raises(ValueError, match="differs from image size"):
        fit_to_multiple(img, mask[:60], 64, "pad")


def test_image_tensors_binarise_and_zero_the_hole():
    img = np.full((8, 8, 3), 255, np.uint8)
    mask = np.zeros((8, 8), np.float32)
    mask[:, :4] = 0.5  # exactly 0.5 counts as hole
    mask[:, 4:6] = 0.49
    x, m, masked = image_tensors(img, mask, 2, torch.device("cpu"))
    assert x.shape == (2, 3, 8, 8) and m.shape == (2, 1, 8, 8)
    assert torch.equal(m[0, 0, 0], torch.tensor([1.0] * 4 + [0.0] * 4))
    assert torch.all(masked[:, :, :, :4] == 0) and torch.all(masked[:, :, :, 4:] == 1.0)


def test_conditioning_matches_training_and_uncond_shares_concat(raw_model):
    model = raw_model
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    mask = np.zeros((64, 64), np.float32)
    mask[8:40, 16:48] = 1
    x, m, masked = image_tensors(img, mask, 2, torch.device("cpu"))
    with torch.no_grad():
        cond, uncond = inpaint_conditioning(model, m, masked, ["a red car", "a red car"],
                                            torch.Generator().manual_seed(5))
        torch.manual_seed(5)  # the training path draws the posterior sample from the global RNG
        batch = {"mask": m.permute(0, 2, 3, 1), "masked_image": masked.permute(0, 2, 3, 1)}
        reference = model.concat_conditioning(batch, (8, 8))
        empty = model.get_learned_conditioning([""])
    assert cond["c_concat"][0].shape == (2, 5, 8, 8)
    assert torch.equal(cond["c_concat"][0], reference)
    assert uncond["c_concat"][0] is cond["c_concat"][0]
    assert torch.equal(uncond["c_crossattn"][0], empty.expand(2, -1, -1))
    assert not torch.equal(cond["c_crossattn"][0], uncond["c_crossattn"][0])


def test_null_conditioning_and_concat_keys_are_the_models(raw_model, monkeypatch):
    """The unconditional branch is the model's one rule (keep c_concat, replace the text), and the mask goes to
    whichever key ``concat_keys`` names: nothing hard-codes "mask" (inference, training batches, image logs)."""
    model = raw_model
    img = np.random.default_rng(3).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    mask = np.zeros((64, 64), np.float32)
    mask[16:48, 8:40] = 1
    x, m, masked = image_tensors(img, mask, 2, torch.device("cpu"))
    with torch.no_grad():
        ref, _ = inpaint_conditioning(model, m, masked, ["a", "b"], torch.Generator().manual_seed(5))
        uncond = model.null_conditioning(ref, "a cat")
        assert uncond["c_concat"] is ref["c_concat"]
        assert torch.equal(uncond["c_crossattn"][0], model.get_learned_conditioning(["a cat"]).expand(2, -1, -1))
        monkeypatch.setattr(model, "concat_keys", ("hole", "masked_image"))
        assert model.mask_key == "hole"
        cond, _ = inpaint_conditioning(model, m, masked, ["a", "b"], torch.Generator().manual_seed(5))
        assert torch.equal(cond["c_concat"][0], ref["c_concat"][0])
        batch = {"jpg": x.permute(0, 2, 3, 1), "hole": m.permute(0, 2, 3, 1),
                 "masked_image": masked.permute(0, 2, 3, 1), "txt": ["a", "b"]}
        logged = model.log_images(batch, N=2, sample=False, **dict.fromkeys(compat.IGNORED_LOG_IMAGES_KWARGS, True))
        assert torch.equal(logged["mask"], (m * 2 - 1).repeat(1, 3, 1, 1))
        monkeypatch.setattr(model, "concat_keys", ("hole", "depth", "masked_image"))
        with pytest.raises(ValueError, match="one mask key plus masked_image_key"):
            inpaint_conditioning(model, m, masked, ["a", "b"])
        with pytest.raises(ValueError, match="c_concat"):
            model.null_conditioning({"c_crossattn": ref["c_crossattn"]})


def test_paste_back_keeps_known_pixels_exactly(raw_model):
    model = raw_model
    rng = np.random.default_rng(2)
    img = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    mask = np.zeros((40, 50), np.float32)
    mask[5:25, 10:30] = 1
    opts = SamplingOptions(steps=2, scale=3.0, paste_back=True)
    out = inpaint(model, img, mask, "x", seed=3, options=opts)[0]
    assert out.shape == img.shape and out.dtype == np.uint8
    assert np.array_equal(out[mask < 0.5], img[mask < 0.5])
    assert not np.array_equal(out[mask >= 0.5], img[mask >= 0.5])


def test_dpm_sampler_runs_and_rejects_eta(raw_model):
    model = raw_model
    img = np.zeros((64, 64, 3), np.uint8)
    mask = np.ones((64, 64), np.float32)
    a = inpaint(model, img, mask, "", seed=0, options=SamplingOptions(sampler="dpm", steps=2, scale=1.0))[0]
    b = inpaint(model, img, mask, "", seed=0, options=SamplingOptions(sampler="dpm", steps=2, scale=1.0))[0]
    assert np.array_equal(a, b)
    with pytest.raises(ValueError, match="eta must be 0"):
        SamplingOptions(sampler="dpm", eta=1.0)
