"""Data is never lost: atomic checkpoint writes, non-finite loss detection, SIGUSR1 save-and-stop, wandb offline."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch

import main
from ldm.atomic import atomic_torch_save
from ldm.callbacks import FiniteLossGuard
from tests.helpers import limited_disk, record_saves

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
    ck = torch.load(run / "checkpoints/last.ckpt", weights_only=True)
    assert ck["global_step"] == 5 and int(ck["state_dict"]["model_ema.num_updates"]) == 5


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


def test_keep_last_n_retention(tmp_path):
    """Default: every periodic checkpoint is kept (tests/test_exact_resume.py); keep_last_n keeps the newest n."""
    assert main.main(["--base", TINY, "--train", "-l", str(tmp_path), "lightning.trainer.max_steps=8",
                      "lightning.callbacks.image_logger.params.disabled=true",
                      "lightning.modelcheckpoint.params.every_n_train_steps=2",
                      "lightning.modelcheckpoint.params.keep_last_n=2",
                      "lightning.callbacks.metrics_over_trainsteps_checkpoint.params.every_n_train_steps=2",
                      "lightning.callbacks.metrics_over_trainsteps_checkpoint.params.keep_last_n=3"]) == 0
    ckpts = next(tmp_path.iterdir()) / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("*.ckpt")) == ["last.ckpt", "step=000000006.ckpt", "step=000000008.ckpt"]
    snaps = sorted(p.name.split("step=")[1] for p in (ckpts / "trainstep_checkpoints").glob("*.ckpt"))
    assert snaps == ["000000004.ckpt", "000000006.ckpt", "000000008.ckpt"]



def test_final_steps_are_saved_when_max_steps_is_not_a_multiple_of_the_interval(tmp_path, monkeypatch):
    """max_steps=5, every 2 steps: last.ckpt holds step 5, written once (with accumulation 2, at the step end)."""
    saves = record_saves(monkeypatch)
    assert main.main(["--base", TINY, "--train", "-l", str(tmp_path), "lightning.trainer.max_steps=5",
                      "lightning.trainer.accumulate_grad_batches=2",
                      "lightning.callbacks.image_logger.params.disabled=true",
                      "lightning.modelcheckpoint.params.every_n_train_steps=2"]) == 0
    ckpts = next(tmp_path.iterdir()) / "checkpoints"
    ck = torch.load(ckpts / "last.ckpt", weights_only=True)
    assert ck["global_step"] == 5 and int(ck["state_dict"]["model_ema.num_updates"]) == 5
    assert sorted(p.name for p in ckpts.glob("step=*.ckpt")) == ["step=000000002.ckpt", "step=000000004.ckpt"]
    assert [s for s in saves if s[0] == "last.ckpt" and s[1] == 5] == [("last.ckpt", 5, 10)], saves
    assert len(saves) == len(set(saves)), saves

@pytest.fixture
def small_disk(tmp_path, monkeypatch):
    """A directory on a file system that holds 48 MiB (the tiny model's full checkpoint is ~35 MB), from
    ``tests.helpers.limited_disk``: a real tmpfs where this process may mount, else ENOSPC injected."""
    yield from limited_disk(tmp_path / "disk", 48 * 2**20, monkeypatch)


def test_full_disk_is_one_line_naming_the_directory(small_disk, caplog):
    rc = main.main(["--base", TINY, "--train", "-l", str(small_disk), "lightning.trainer.max_steps=4",
                    "lightning.callbacks.image_logger.params.disabled=true",
                    "lightning.callbacks.metrics_over_trainsteps_checkpoint=null",
                    "lightning.modelcheckpoint.params.every_n_train_steps=2"])
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    ckpts = next(small_disk.iterdir()) / "checkpoints"
    assert rc == 2 and len(errors) == 1, errors
    assert "no space left on device" in errors[0] and f"in {ckpts} " in errors[0] and "\n" not in errors[0]
    assert not list(ckpts.glob(".*.tmp"))  # the interrupted write left no temp file
    first = torch.load(ckpts / "step=000000002.ckpt", weights_only=True)  # the save before it is intact
    assert first["global_step"] == 2


@pytest.mark.parametrize("factor, expected", [(1e9, "exceeds max_grad_norm=100000"),
                                              (float("nan"), "non-finite gradient norm")])
def test_exploding_gradient_stops_before_the_step(tmp_path, caplog, factor, expected):
    rc = main.main(["--base", TINY, "--train", "-l", str(tmp_path), "lightning.trainer.max_steps=6",
                    "lightning.callbacks.image_logger.params.disabled=true",
                    "lightning.modelcheckpoint.params.every_n_train_steps=2",
                    "lightning.callbacks.metrics_over_trainsteps_checkpoint.params.every_n_train_steps=1",
                    "lightning.callbacks.scale.target=tests.helpers.ScaleGradsAtStep",
                    "lightning.callbacks.scale.params.step=3",
                    f"lightning.callbacks.scale.params.factor={'.nan' if factor != factor else factor}"])  # yaml NaN
    assert rc == 4
    assert expected in caplog.text and "global step 3 (before its optimizer step)" in caplog.text
    ckpts = next(tmp_path.iterdir()) / "checkpoints"
    steps = sorted(torch.load(p, weights_only=True)["global_step"] for p in ckpts.rglob("*.ckpt"))
    assert max(steps) == 3  # step 3's snapshot: weights after 3 good steps; the poisoned 4th never happened
    last_snap = max(ckpts.rglob("*step=000000003.ckpt"))
    sd = torch.load(last_snap, weights_only=True)["state_dict"]
    assert all(torch.isfinite(v).all() and v.abs().max() < 1e3 for v in sd.values() if v.is_floating_point())


def test_non_finite_weights_are_never_written():
    from ldm.checkpoint import CheckpointError
    from tests.helpers import build_tiny

    model = build_tiny("inpaint")
    with torch.no_grad():
        model.model.diffusion_model.out[2].bias[0] = float("inf")
    with pytest.raises(CheckpointError, match=r"refusing to write a checkpoint at step 9: 1 tensors hold NaN or inf "
                                              r"\(first: model\.diffusion_model\.out\.2\.bias\)"):
        model.on_save_checkpoint({"state_dict": model.state_dict(), "global_step": 9})


def test_grad_norm_guard_leaves_fp16_overflow_to_the_grad_scaler():
    """With a fp16 GradScaler, inf/NaN gradients are routine (the scaler skips the step); only the threshold stops."""
    from types import SimpleNamespace

    import pytorch_lightning as pl

    from ldm.callbacks import GradNormGuard

    p = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.AdamW([p])
    module = pl.LightningModule()
    guard = GradNormGuard(max_grad_norm=100.0)
    plain = SimpleNamespace(global_step=7, precision_plugin=SimpleNamespace())
    scaled = SimpleNamespace(global_step=7, precision_plugin=SimpleNamespace(scaler=torch.amp.GradScaler("cpu")))
    p.grad = torch.tensor([3.0, 4.0, 0.0])  # norm 5: fine
    guard.on_before_optimizer_step(plain, module, opt)
    p.grad = torch.tensor([float("inf"), 0.0, 0.0])
    guard.on_before_optimizer_step(scaled, module, opt)  # the scaler's business
    with pytest.raises(FloatingPointError, match="non-finite gradient norm"):
        guard.on_before_optimizer_step(plain, module, opt)
    p.grad = torch.tensor([300.0, 400.0, 0.0])  # norm 500 > 100: stops with or without a scaler
    for trainer in (plain, scaled):
        with pytest.raises(FloatingPointError, match="gradient norm 500 exceeds max_grad_norm=100"):
            guard.on_before_optimizer_step(trainer, module, opt)


def test_keep_last_n_counts_the_files_on_disk_after_the_run_directory_moved(tmp_path, caplog):
    """A run saved under one path, moved, then resumed: retention ranks the files in the new checkpoints/ and the
    run's hpc_ckpt_* by recorded step (not Lightning's remembered paths), so the old step files are pruned too."""
    caplog.set_level(logging.INFO)
    common = ["lightning.callbacks.image_logger.params.disabled=true",
              "lightning.modelcheckpoint.params.every_n_train_steps=2",
              "lightning.modelcheckpoint.params.keep_last_n=2"]
    assert main.main(["--base", TINY, "--train", "-l", str(tmp_path / "old"), "lightning.trainer.max_steps=4",
                      *common]) == 0
    moved = tmp_path / "new" / "run"
    moved.parent.mkdir()
    next((tmp_path / "old").iterdir()).rename(moved)
    ckpts = moved / "checkpoints"
    (moved / "hpc_ckpt_1.ckpt").write_bytes((ckpts / "step=000000002.ckpt").read_bytes())  # an old requeue save
    assert main.main(["-r", str(moved), "--train", "lightning.trainer.max_steps=8", *common]) == 0
    assert sorted(p.name for p in ckpts.glob("*.ckpt")) == ["last.ckpt", "step=000000006.ckpt", "step=000000008.ckpt"]
    assert not (moved / "hpc_ckpt_1.ckpt").exists()
    assert f"removed {ckpts / 'step=000000004.ckpt'} (step 4)" in caplog.text


def test_a_requeue_save_removes_the_older_hpc_checkpoints(tmp_path, caplog):
    from ldm.callbacks import GracefulStop
    from ldm.callbacks.resilience import remove_older_hpc

    caplog.set_level(logging.INFO)
    for n in (1, 2, 3):
        torch.save({"global_step": n}, tmp_path / f"hpc_ckpt_{n}.ckpt")
    stop = GracefulStop(str(tmp_path / "checkpoints" / "last.ckpt"), hpc_dir=str(tmp_path))
    newest = tmp_path / "hpc_ckpt_3.ckpt"
    assert stop.hpc_path(None) == tmp_path / "hpc_ckpt_4.ckpt"
    assert sorted(remove_older_hpc(newest)) == [tmp_path / "hpc_ckpt_1.ckpt", tmp_path / "hpc_ckpt_2.ckpt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hpc_ckpt_3.ckpt"]
    assert torch.load(newest, weights_only=True)["global_step"] == 3
    assert f"removed {tmp_path / 'hpc_ckpt_1.ckpt'}: superseded by hpc_ckpt_3.ckpt" in caplog.text
