"""Data is never lost: atomic checkpoint writes, non-finite loss detection, SIGUSR1 save-and-stop, wandb offline."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import main
from ldm.callbacks import FiniteLossGuard
from ldm.checkpoint import atomic_torch_save

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs/tiny/inpaint.yaml")


class Exploding:
    """Pickles part of the way, then fails: a crash in the middle of writing a checkpoint."""

    def __reduce__(self):
        raise OSError("disk vanished mid-write")


def test_crash_mid_write_keeps_the_old_checkpoint(tmp_path):
    path = tmp_path / "last.ckpt"
    atomic_torch_save({"step": 1, "w": torch.ones(1000)}, path)
    with pytest.raises(OSError, match="mid-write"):
        atomic_torch_save({"step": 2, "w": torch.zeros(1000), "bad": Exploding()}, path)
    assert torch.load(path, weights_only=True)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temp file left behind


def test_non_finite_loss_names_the_step():
    class T:
        global_step, current_epoch = 17, 0

    guard = FiniteLossGuard()
    guard.on_before_backward(T(), None, torch.tensor(1.0))
    with pytest.raises(FloatingPointError, match="global step 17"):
        guard.on_before_backward(T(), None, torch.tensor(math.nan))


def test_nan_during_training_stops_with_a_clear_error(tmp_path, caplog):
    rc = main.main(["--base", TINY, "--train", "-l", str(tmp_path), "lightning.trainer.max_steps=10",
                    "lightning.callbacks.image_logger.params.disabled=true",
                    "lightning.callbacks.poison.target=tests.helpers.PoisonAtStep",
                    "lightning.callbacks.poison.params.step=3"])
    assert rc == 4
    assert "non-finite training loss" in caplog.text and "global step 3" in caplog.text


def test_sigusr1_saves_and_stops(tmp_path):
    assert main.main(["--base", TINY, "--train", "-l", str(tmp_path), "lightning.trainer.max_steps=50",
                      "lightning.callbacks.image_logger.params.disabled=true",
                      "lightning.modelcheckpoint.params.every_n_train_steps=1000",
                      "lightning.callbacks.kill.target=tests.helpers.SignalAtStep",
                      "lightning.callbacks.kill.params.step=4",
                      "lightning.callbacks.kill.params.signal_name=SIGUSR1"]) == 0
    run = next(tmp_path.iterdir())
    # the signal arrives after GracefulStop's check of step 4 (callback order), so it saves at the end of step 5
    assert torch.load(run / "checkpoints/last.ckpt", weights_only=False)["global_step"] == 5


def test_wandb_offline_logger(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    assert main.main(["--base", TINY, "--train", "-l", str(tmp_path), "lightning.trainer.max_steps=3",
                      "lightning.trainer.log_every_n_steps=1",
                      "lightning.callbacks.image_logger.params.batch_frequency=2",
                      "lightning.loggers.wandb.params.project=sd2-inpaint-test"]) == 0
    run = next(p for p in tmp_path.iterdir() if p.name.endswith("_inpaint"))
    offline = list((run / "wandb").glob("offline-run-*"))
    assert offline, list(run.rglob("*"))[:20]
