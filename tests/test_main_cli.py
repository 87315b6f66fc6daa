"""main.py end to end on the tiny config: train, checkpoint, images, metrics, resume, and clear errors."""

from __future__ import annotations

import csv
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import main

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs/tiny/inpaint.yaml")


def run_dir(root: Path) -> Path:
    dirs = [d for d in root.iterdir() if d.is_dir()]
    assert len(dirs) == 1, dirs
    return dirs[0]


def test_train_writes_checkpoint_images_metrics_and_resumes(tmp_path):
    assert main.main(["--base", TINY, "--train", "-l", str(tmp_path), "lightning.trainer.max_steps=20"]) == 0
    run = run_dir(tmp_path)
    ckpt = torch.load(run / "checkpoints/last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 20
    assert any(k.startswith("model_ema.") for k in ckpt["state_dict"])
    assert (run / "checkpoints/trainstep_checkpoints").is_dir()
    snaps = sorted((run / "checkpoints/trainstep_checkpoints").glob("*.ckpt"))
    assert len(snaps) == 2 and "optimizer_states" not in torch.load(snaps[-1], weights_only=True)
    assert sorted(p.name.split("-")[-1] for p in (run / "configs").glob("*.yaml")) == ["lightning.yaml",
                                                                                       "project.yaml"]
    images = {p.name.split("_gs-")[0] for p in (run / "images/train").glob("*.png")}
    assert {"inputs", "mask", "masked_image", "samples", "samples_cfg_scale_3.00"} <= images
    rows = list(csv.DictReader(open(next((run / "csv").rglob("metrics.csv")))))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert losses and all(map(lambda x: x == x, losses))  # finite, logged
    assert any(r.get("lr-AdamW") for r in rows)  # LearningRateMonitor

    assert main.main(["-r", str(run), "--train", "lightning.trainer.max_steps=30"]) == 0
    ckpt = torch.load(run / "checkpoints/last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 30
    # the LR schedule continued (warm-up of 10 steps is over; no restart at f_start)
    assert ckpt["lr_schedulers"][0]["last_epoch"] == 30


def test_learning_rate_is_logged_once_per_optimizer_step_with_accumulation(tmp_path):
    assert main.main(["--base", TINY, "--train", "-l", str(tmp_path), "lightning.trainer.max_steps=4",
                      "lightning.trainer.accumulate_grad_batches=3", "lightning.trainer.log_every_n_steps=1",
                      "lightning.callbacks.image_logger.params.disabled=true"]) == 0
    rows = list(csv.DictReader(open(next((run_dir(tmp_path) / "csv").rglob("metrics.csv")))))
    lr_steps = [int(r["step"]) for r in rows if r.get("lr-AdamW")]
    assert lr_steps == [0, 1, 2, 3]  # one row per optimizer step, not one per micro-batch


def _state(path: Path):
    ck = torch.load(path, weights_only=True)
    return ck["global_step"], ck["state_dict"], ck["optimizer_states"][0]["state"]


def test_sigterm_then_resume_is_exact(tmp_path, caplog):
    """A: 2N steps straight. B: SIGTERM after N steps, resume to 2N. Weights, EMA and Adam state match."""
    caplog.set_level(logging.INFO, logger="ldm.modules.random_weights")
    n = 6
    common = ["--base", TINY, "--train", "lightning.callbacks.image_logger.params.disabled=true",
              "lightning.modelcheckpoint.params.every_n_train_steps=1000"]
    a_root, b_root = tmp_path / "a", tmp_path / "b"
    assert main.main([*common, "-l", str(a_root), f"lightning.trainer.max_steps={2 * n}"]) == 0
    assert main.main([*common, "-l", str(b_root), f"lightning.trainer.max_steps={2 * n}",
                      "lightning.callbacks.kill.target=tests.helpers.SignalAtStep",
                      f"lightning.callbacks.kill.params.step={n}"]) == 0
    b_run = run_dir(b_root)
    step_b, sd_b, _ = _state(b_run / "checkpoints/last.ckpt")
    # the signal arrives after GracefulStop's check of step n (callback order): saved at the end of step n + 1
    assert step_b == n + 1
    assert int(sd_b["model_ema.num_updates"]) == n + 1  # with every EMA update of those steps
    assert "model (DiffusionWrapper) starts from random weights" in caplog.text
    caplog.clear()
    assert main.main(["-r", str(b_run), "--train", "lightning.callbacks.kill=null"]) == 0
    assert "random weights" not in caplog.text and "RANDOMLY" not in caplog.text  # restored from the checkpoint
    step_a, sd_a, opt_a = _state(run_dir(a_root) / "checkpoints/last.ckpt")
    step_b, sd_b, opt_b = _state(b_run / "checkpoints/last.ckpt")
    assert step_a == step_b == 2 * n
    assert sd_a.keys() == sd_b.keys()
    for k in sd_a:
        if k.startswith(("model.", "model_ema.")):
            assert torch.equal(sd_a[k], sd_b[k]), k
    for idx in opt_a:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt_a[idx][name], opt_b[idx][name]), (idx, name)


def test_a_held_out_set_without_its_source_shards_fails_before_the_model_is_built(tmp_path, caplog):
    """configs/inpaint.yaml's heldout_eval builds its set from LAION validation shards; on one's own photos a
    missing source is one line naming the callback key and how to drop it, and no run directory is written."""
    pattern = str(tmp_path / "val" / "{00000..00003}.tar")
    cb = ("lightning.callbacks.heldout_eval={target: ldm.eval.callback.HeldOutEvaluation, params: {set_dir: "
          f"{tmp_path / 'set'}, shards: '{pattern}', size: 64, num_images: 2}}}}")
    rc = main.main(["--base", TINY, "--train", "-l", str(tmp_path / "logs"), cb])
    assert rc == 2
    assert ("lightning.callbacks.heldout_eval.params.shards: none of the 4 local shard files of" in caplog.text
            and "drop it with ~lightning.callbacks.heldout_eval" in caplog.text)
    assert not (tmp_path / "logs").exists() or not any((tmp_path / "logs").iterdir())


def _cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "main.py", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_full_config_fails_fast_and_clearly(tmp_path):
    r = _cli("--base", "configs/inpaint.yaml", "--train", "-l", str(tmp_path))
    assert r.returncode == 2
    assert "512-base-ema.ckpt" in r.stderr and "model.params.ckpt_path" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize(
    "override, expected",
    [
        ("model.params.unet_config.params.num_res_blockz=1", "num_res_blockz"),
        ("lightning.trainer.max_stepz=3", "max_stepz"),
        ("modle.params.x=1", "modle"),
    ],
)
def test_bad_input_names_the_key(tmp_path, override, expected, caplog):
    rc = main.main(["--base", TINY, "--train", "-l", str(tmp_path), override])
    assert rc == 2
    assert expected in caplog.text


def test_missing_shards_name_the_pattern(tmp_path, caplog):
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(TINY)
    cfg.data = {"target": "ldm.data.laion.WebDataModuleFromConfig",
                "params": {"batch_size": 2, "num_workers": 0,
                           "train": {"shards": str(tmp_path / "nowhere/{00000..00003}.tar"), "image_key": "jpg"}}}
    path = tmp_path / "cfg.yaml"
    OmegaConf.save(cfg, path)
    rc = main.main(["--base", str(path), "--train", "-l", str(tmp_path / "logs"), "lightning.trainer.max_steps=2"])
    assert rc == 2
    assert "nowhere/{00000..00003}.tar" in caplog.text and "data.params.train.shards" in caplog.text
    # found before the model is built: no run directory is left behind by the mistake
    assert not (tmp_path / "logs").exists() or not any((tmp_path / "logs").iterdir())
    assert "building" not in caplog.text and "run directory" not in caplog.text


def test_a_training_crop_that_disagrees_with_image_size_is_warned_about(caplog):
    # image_size is ignored by training, but an export writes it as the diffusers UNet's sample_size
    from omegaconf import OmegaConf

    from ldm.data_checks import check_image_size

    cfg = OmegaConf.load(REPO / "configs" / "tiny" / "inpaint_shards.yaml")
    with caplog.at_level(logging.WARNING, logger="ldm.data_checks"):
        check_image_size(cfg)  # 64 px crop, image_size 8, VAE factor 8: consistent
        assert not caplog.records
        cfg.data.params.train.image_transforms[-1].params.size = 128
        check_image_size(cfg)
    assert len(caplog.records) == 1
    assert ("model.params.image_size is 8 (64 px), but the training crop is 128 px" in caplog.text
            and "Set model.params.image_size=16" in caplog.text)
    for name in ("inpaint.yaml", "demo/inpaint.yaml", "demo/base.yaml"):  # the shipped configs agree
        caplog.clear()
        check_image_size(OmegaConf.load(REPO / "configs" / name))
        assert not caplog.records, name
