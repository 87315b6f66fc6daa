"""FixedBatchLoss (loss on fixed images, masks, timesteps and noise during training) and the log-noise filters."""

from __future__ import annotations

import csv
import logging
import warnings

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger
from torch.utils.data import DataLoader

from ldm.fixed_batch import FixedBatchLoss, _stratified_timesteps, folder_batch
from ldm.image_io import save_png
from ldm.quiet import explain_eval_modules, silence_known_noise
from tests.helpers import FixedBatches, build_tiny


def _write_folder(folder, n=2, size=64, seed=0):
    rng = np.random.default_rng(seed)
    for i in range(n):
        save_png(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), folder / f"img{i}.png")
        mask = np.zeros((size, size), np.float32)
        mask[16:40, 8 + 4 * i: 40 + 4 * i] = 1.0
        save_png(mask, folder / f"img{i}_mask.png")
        (folder / f"img{i}.txt").write_text(f"caption {i}\n")
    return folder


def test_folder_batch_layout_matches_training(tmp_path):
    batch = folder_batch(_write_folder(tmp_path), repeats=3)
    assert batch["jpg"].shape == (6, 64, 64, 3) and batch["mask"].shape == (6, 64, 64, 1)
    assert batch["jpg"].min() >= -1 and batch["jpg"].max() <= 1
    assert set(batch["mask"].unique().tolist()) == {0.0, 1.0}
    torch.testing.assert_close(batch["masked_image"], batch["jpg"] * (1 - batch["mask"]))
    assert batch["txt"] == ["caption 0"] * 3 + ["caption 1"] * 3


def test_stratified_timesteps_cover_the_schedule():
    t = _stratified_timesteps(8, 1000, torch.Generator().manual_seed(0))
    assert sorted((t // 125).tolist()) == list(range(8))  # one per eighth of [0, 1000)


def test_loss_is_fixed_and_leaves_the_global_rng_alone(tmp_path):
    model = build_tiny("inpaint")
    probe = FixedBatchLoss({"a": str(_write_folder(tmp_path))}, repeats=2)
    batch = folder_batch(tmp_path, 2)
    torch.manual_seed(5)
    state = torch.random.get_rng_state()
    first, second = probe.loss(model, batch), probe.loss(model, batch)
    assert first == second  # same timesteps, noise and VAE samples every time
    assert torch.equal(torch.random.get_rng_state(), state)
    assert model.training  # restored
    with torch.no_grad():
        model.model.diffusion_model.out[-1].weight.add_(0.05)  # the output conv starts at zero: move it
    assert probe.loss(model, batch) != first


def test_autoencoder_loss_is_the_l1_of_the_posterior_mode(tmp_path):
    model = build_tiny("inpaint").first_stage_model
    model.image_key = "jpg"  # an AutoencoderKL as a training target carries its image key
    batch = folder_batch(_write_folder(tmp_path))
    x = batch["jpg"].permute(0, 3, 1, 2)
    with torch.no_grad():
        expected = float((x - model.decode(model.encode(x).mode())).abs().mean())
    assert FixedBatchLoss({"a": str(tmp_path)}).loss(model, batch) == pytest.approx(expected, rel=1e-6)




def test_logged_at_step_0_every_period_and_at_the_end_and_shows_learning(tmp_path):
    torch.manual_seed(0)
    model = build_tiny("inpaint", ucg_training=None, scheduler_config=None, scale_by_std=True)
    model.learning_rate = 2e-3
    folder = _write_folder(tmp_path / "probe")
    probe = FixedBatchLoss({"train": str(folder)}, every_n_train_steps=5, repeats=4)
    scales = []  # the latent scale each evaluation saw
    measure = probe.loss
    probe.loss = lambda m, b, use_ema=False: scales.append(float(m.scale_factor)) or measure(m, b, use_ema)
    batch = folder_batch(folder, 2)  # train on the probe's own images: its loss must fall
    logger = CSVLogger(tmp_path, name="csv")
    trainer = pl.Trainer(max_steps=12, accelerator="cpu", devices=1, logger=logger, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[probe],
                         num_sanity_val_steps=0, limit_val_batches=0, log_every_n_steps=1)
    trainer.fit(model, DataLoader(FixedBatches(batch, 12), batch_size=None))
    assert [s for s, _, _ in probe.history] == [0, 5, 10, 12]
    # step 0 is measured after the first forward pass, so it already uses the scale scale_by_std estimated there
    assert scales[0] == float(model.scale_factor) != 0.18215
    with open(logger.experiment.metrics_file_path) as f:
        logged = [(int(r["step"]), float(r["fixed_batch/train"])) for r in csv.DictReader(f) if r["fixed_batch/train"]]
    assert logged == [(s, v) for s, _, v in probe.history]
    assert logged[-1][1] < 0.99 * logged[0][1], logged  # 12 steps: a small but real improvement


def test_rejects_models_without_a_loss_it_knows(tmp_path):
    probe = FixedBatchLoss({"a": str(_write_folder(tmp_path))})
    with pytest.raises(TypeError, match="neither p_losses"):
        probe.on_train_start(None, torch.nn.Linear(1, 1))
    with pytest.raises(ValueError, match="at least one folder"):
        FixedBatchLoss({})


def test_known_noise_is_silenced_and_nothing_else(caplog):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        silence_known_noise()
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use x", FutureWarning, stacklevel=1)
        warnings.warn("Found 201 module(s) in eval mode at the start of training. This may", UserWarning,
                      stacklevel=1)
        warnings.warn("some other FutureWarning", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in seen] == ["some other FutureWarning"]
    tip_logger = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    with caplog.at_level(logging.INFO, logger=tip_logger.name):
        tip_logger.info("💡 Tip: For seamless cloud logging ... try installing [litlogger](https://pypi.org/...)")
        tip_logger.info("GPU available: False, used: False")
    assert [r.getMessage() for r in caplog.records] == ["GPU available: False, used: False"]


def test_frozen_modules_are_named_once(caplog):
    model = build_tiny("inpaint")
    with caplog.at_level(logging.INFO, logger="ldm.quiet"):
        frozen = explain_eval_modules(model)
    assert frozen == ["first_stage_model", "cond_stage_model"]
    lines = [r.getMessage() for r in caplog.records if r.name == "ldm.quiet"]
    assert len(lines) == 1 and "first_stage_model, cond_stage_model" in lines[0]
