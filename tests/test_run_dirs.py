"""ldm.run helpers: run-directory resolution, LR formula, override and section validation (no training)."""

from __future__ import annotations

import os
import time

import pytest
from omegaconf import OmegaConf

from ldm.run import check_overrides, check_sections, count_devices, effective_lr, resolve_run_dirs
from ldm.util import ConfigError


def test_new_run_name_and_layout(tmp_path):
    d = resolve_run_dirs("2026-01-01T00-00-00", str(tmp_path), None, "_x", ["configs/inpaint.yaml"], None)
    assert d.nowname == "2026-01-01T00-00-00_inpaint_x"
    assert d.ckptdir == tmp_path / d.nowname / "checkpoints" and d.resume_ckpt is None


def test_resume_picks_newest_of_last_and_hpc(tmp_path):
    run = tmp_path / "2026-01-01T00-00-00_inpaint"
    (run / "checkpoints").mkdir(parents=True)
    (run / "configs").mkdir()
    (run / "configs" / "a-project.yaml").write_text("model: {}\n")
    last, hpc = run / "checkpoints" / "last.ckpt", run / "hpc_ckpt_1.ckpt"
    last.write_bytes(b"x")
    hpc.write_bytes(b"x")
    now = time.time()
    os.utime(last, (now - 100, now - 100))
    d = resolve_run_dirs("t", str(tmp_path), None, "", [], str(run))
    assert d.resume_ckpt == hpc and d.logdir == run and d.resume_configs == [run / "configs" / "a-project.yaml"]
    os.utime(last, (now + 100, now + 100))
    assert resolve_run_dirs("t", str(tmp_path), None, "", [], str(run)).resume_ckpt == last
    # a checkpoint file: the run dir is found above "checkpoints", also for hpc and trainstep checkpoints
    snap = run / "checkpoints" / "trainstep_checkpoints" / "s.ckpt"
    snap.parent.mkdir()
    snap.write_bytes(b"x")
    for f in (last, hpc, snap):
        assert resolve_run_dirs("t", str(tmp_path), None, "", [], str(f)).logdir == run
    with pytest.raises(ConfigError, match="no such run"):
        resolve_run_dirs("t", str(tmp_path), None, "", [], str(tmp_path / "nope"))


def test_effective_lr_formula():
    assert effective_lr(1e-4, 8, 8, 32, 1, scale_lr=False)[0] == pytest.approx(1e-4)
    lr, text = effective_lr(1e-4, 8, 8, 32, 2, scale_lr=True)
    assert lr == pytest.approx(2 * 8 * 32 * 8 * 1e-4) and "32 (nodes)" in text
    assert count_devices("0,1,2") == 3 and count_devices([0, 1]) == 2 and count_devices(4) == 4


def test_unknown_sections_and_overrides_are_errors():
    cfg = OmegaConf.create({"model": {"target": "torch.nn.Identity", "params": {"a": 1}}, "lightning": {"trainer": {}}})
    check_sections(cfg)
    with pytest.raises(ConfigError, match="lightning.trainr"):
        check_sections(OmegaConf.merge(cfg, {"lightning": {"trainr": {}}}))
    with pytest.raises(ConfigError, match="max_stepz"):
        check_overrides(cfg, ["lightning.trainer.max_stepz=3"])
    with pytest.raises(ConfigError, match="'modle'"):
        check_overrides(cfg, ["modle.params.a=3"])
    check_overrides(cfg, ["lightning.trainer.max_steps=3", "model.params.a=2"])


def test_checkpoint_callbacks_without_a_modelcheckpoint_section(tmp_path):
    from ldm.run import checkpoint_callbacks

    d = resolve_run_dirs("t", str(tmp_path), None, "", ["x.yaml"], None)
    (cb,) = checkpoint_callbacks(d, OmegaConf.create({"trainer": {}}))
    assert cb.dirpath == str(d.ckptdir) and cb.save_last
