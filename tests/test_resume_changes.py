"""Resuming with a changed config: layout changes (use_ema, scale_by_std, schedule, trainable parameters,
architecture), max_steps at or below the checkpoint's step, and how a resume's overrides are recorded."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import main
from ldm.checkpoint import CheckpointError, load_checkpoint_file
from tests.helpers import REPO, build_tiny

TINY = str(REPO / "configs/tiny/inpaint.yaml")
QUIET = ["lightning.callbacks.image_logger.params.disabled=true",
         "lightning.callbacks.metrics_over_trainsteps_checkpoint=null"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny run trained for 2 optimizer steps (EMA on, warm-up LR schedule)."""
    root = tmp_path_factory.mktemp("run")
    assert main.main(["--base", TINY, "--train", "-l", str(root), "lightning.trainer.max_steps=2", *QUIET]) == 0
    return next(root.iterdir())


@pytest.fixture
def run(trained, tmp_path) -> Path:
    """A private copy of the trained run, free to be resumed."""
    return Path(shutil.copytree(trained, tmp_path / trained.name))


def errors(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.fixture(scope="module")
def tiny():
    """A tiny model built from the run's config (on_load_checkpoint leaves its layout as built)."""
    return build_tiny()


# ------------------------------------------------------------------------------------ use_ema and records
def test_resume_drops_then_adds_the_ema_and_records_each_resume(run, caplog):
    base = {p.name: p.read_bytes() for p in (run / "configs").glob("*.yaml")}
    assert main.main(["-r", str(run), "--train", "lightning.trainer.max_steps=3", "model.params.use_ema=false"]) == 0
    assert "drops the checkpoint's EMA (2 updates)" in caplog.text
    at3 = load_checkpoint_file(run / "checkpoints/last.ckpt")
    assert at3["global_step"] == 3 and not any(k.startswith("model_ema.") for k in at3["state_dict"])
    # the run's config is left as it was; the resume's command line and changes are recorded beside it
    assert {p.name: p.read_bytes() for p in (run / "configs").glob("*.yaml")} == base
    [record] = (run / "configs/resumes").glob("*-overrides.yaml")
    saved = OmegaConf.load(record)
    assert list(saved.command_line.overrides) == ["lightning.trainer.max_steps=3", "model.params.use_ema=false"]
    assert list(saved.changes) == ["lightning.trainer.max_steps: 2 -> 3", "model.params.use_ema: True -> False"]

    caplog.clear()
    assert main.main(["-r", str(run), "--train", "lightning.trainer.max_steps=4", "model.params.use_ema=true"]) == 0
    inherited = next(r.getMessage() for r in caplog.records if "earlier resumes" in r.getMessage())
    assert "2 change(s)" in inherited and "model.params.use_ema: True -> False" in inherited
    assert "starts one from its weights at step 3" in caplog.text
    at4 = load_checkpoint_file(run / "checkpoints/last.ckpt")["state_dict"]
    assert int(at4["model_ema.num_updates"]) == 1
    # one LitEma update from the step-3 weights: shadow = w3 - (1 - d) (w3 - w4), d = (1 + 1) / (10 + 1)
    d = 2 / 11
    for name in ("input_blocks.0.0.weight", "out.2.bias"):
        w3, w4 = at3["state_dict"][f"model.diffusion_model.{name}"], at4[f"model.diffusion_model.{name}"]
        ema = at4["model_ema.diffusion_model" + name.replace(".", "")]
        assert not torch.equal(w3, w4)
        torch.testing.assert_close(ema, w3 - (1 - d) * (w3 - w4))

    caplog.clear()
    assert main.main(["-r", str(run), "--train"]) == 0  # a plain -r (a requeue) keeps the resumes' max_steps=4
    assert "lightning.trainer.max_steps: 2 -> 4" in caplog.text and "the run is complete" in caplog.text


# --------------------------------------------------------------------------------- refused layout changes
@pytest.mark.parametrize("params, expected", [
    ({"scale_by_std": True}, "model.params.scale_by_std=true, which estimates the factor at step 0 only"),
    ({"linear_end": 0.02}, "noise schedule differs from this config's ('betas' differs)"),
    ({"cond_stage_trainable": True}, "model.params.cond_stage_trainable was False, the config says True"),
    ({"unet_config.params.num_res_blocks": 2}, "the UNet (model.params.unet_config) differs (tensors: "),
])
def test_resume_refuses_a_layout_change_naming_the_setting(trained, params, expected):
    checkpoint = load_checkpoint_file(trained / "checkpoints/last.ckpt")
    model = build_tiny(**params)
    with pytest.raises(CheckpointError) as info:
        model.on_load_checkpoint(checkpoint)
    assert expected in str(info.value) and "\n" not in str(info.value)
    assert "model.params.ckpt_path=" in str(info.value)  # the way out: a new run from these weights


def test_resume_layout_refusal_is_one_line_from_main(run, caplog):
    assert main.main(["-r", str(run), "--train", "lightning.trainer.max_steps=3", "model.params.timesteps=500"]) == 2
    assert len(errors(caplog)) == 1 and "noise schedule differs from this config's (1000 timesteps vs 500)" in \
        errors(caplog)[0]
    assert not (run / "configs/resumes").exists()  # a refused resume records nothing


def test_resume_keeps_a_learned_scale_factor_fixed_only_when_equal(trained, tiny):
    checkpoint = load_checkpoint_file(trained / "checkpoints/last.ckpt")
    checkpoint["state_dict"]["scale_factor"] = torch.tensor(0.25)  # as a scale_by_std run stores it
    checkpoint["provenance"]["scale_factor"] = 0.25
    with pytest.raises(CheckpointError, match="was trained with scale_factor 0.25"):
        tiny.on_load_checkpoint(checkpoint)
    build_tiny(scale_factor=0.25).on_load_checkpoint(checkpoint)
    assert "scale_factor" not in checkpoint["state_dict"]  # restored strictly into a model without the buffer


def test_resume_continues_an_added_lr_schedule_at_the_checkpoint_step(trained, tiny, caplog):
    checkpoint = load_checkpoint_file(trained / "checkpoints/last.ckpt")
    checkpoint["lr_schedulers"] = []  # a run trained without model.params.scheduler_config
    tiny.on_load_checkpoint(checkpoint)
    [_opt], [cfg] = tiny.configure_optimizers()
    cfg["scheduler"].load_state_dict(checkpoint["lr_schedulers"][0])  # what Lightning restores next
    assert cfg["scheduler"].last_epoch == 2 and "continues at step 2" in caplog.text

    checkpoint = load_checkpoint_file(trained / "checkpoints/last.ckpt")
    build_tiny(scheduler_config=None).on_load_checkpoint(checkpoint)
    assert checkpoint["lr_schedulers"] == [] and "LR schedule is dropped" in caplog.text


# ---------------------------------------------------------------------------------------------- max_steps
def test_resume_below_or_at_max_steps_says_so(run, caplog):
    before = (run / "checkpoints/last.ckpt").stat().st_mtime_ns
    assert main.main(["-r", str(run), "--train", "lightning.trainer.max_steps=1"]) == 2
    assert len(errors(caplog)) == 1
    assert "lightning.trainer.max_steps=1 is below the step of the resume checkpoint" in errors(caplog)[0]
    caplog.clear()
    assert main.main(["-r", str(run), "--train"]) == 0  # the run's own max_steps=2: finished, not an error
    assert "the run is complete" in caplog.text and "lightning.trainer.max_steps=N (N > 2)" in caplog.text
    assert (run / "checkpoints/last.ckpt").stat().st_mtime_ns == before
    assert not (run / "configs/resumes").exists()




def test_resume_without_train_is_refused_in_one_line_and_touches_nothing(run, caplog):
    """`-r run` alone would train nothing and exit 0: the resume command a user copies must not be a no-op."""
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    assert main.main(["-r", str(run), "lightning.trainer.max_steps=3"]) == 2
    (line,) = errors(caplog)
    assert line.startswith("nothing to do: without --train") and f"add --train to continue the run {run}" in line
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before  # no lock, no resume record left


def test_a_mistyped_override_on_resume_is_said_before_the_checkpoints_are_read(run, caplog, monkeypatch):
    """Choosing and verifying full-size checkpoints takes minutes; a typo must not wait for it."""
    import ldm.run_dirs

    def no_reading(*args, **kwargs):
        raise AssertionError("the checkpoints were read before the overrides were checked")

    monkeypatch.setattr(ldm.run_dirs, "resume_from", no_reading)
    assert main.main(["-r", str(run), "--train", "lightning.trainer.max_stpes=3"]) == 2
    (line,) = errors(caplog)
    assert "max_stpes" in line and "did you mean 'max_steps'" in line
    assert not (run / "run.lock").exists()


def test_a_resume_does_not_repeat_lightnings_checkpoint_directory_warning(run):
    import warnings

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert main.main(["-r", str(run), "--train", "lightning.trainer.max_steps=3", *QUIET]) == 0
    assert not [w for w in seen if "exists and is not empty" in str(w.message)]


def test_a_resume_keeps_scale_lr_unless_the_command_line_says_otherwise(tmp_path, caplog):
    # The requeue and SIGTERM commands are "-r RUN --train": without the run's --scale_lr the learning rate
    # would drop by the global batch (4 here, 2048 on 32 x 8 GPUs at batch 8), said only as a config change.
    root = tmp_path / "logs"
    assert main.main(["--base", TINY, "--train", "--scale_lr", "-l", str(root), "lightning.trainer.max_steps=2",
                      *QUIET]) == 0
    run = next(root.iterdir())

    def base_lr(ckpt: Path) -> float:
        return load_checkpoint_file(ckpt)["optimizer_states"][0]["param_groups"][0]["initial_lr"]

    assert base_lr(run / "checkpoints" / "last.ckpt") == pytest.approx(4 * 1e-3)  # batch 4 * 1e-3
    caplog.set_level(logging.INFO)
    assert main.main(["-r", str(run), "--train", "lightning.trainer.max_steps=3"]) == 0
    assert base_lr(run / "checkpoints" / "last.ckpt") == pytest.approx(4 * 1e-3)
    assert "the run was started with --scale_lr, which is kept: learning rate 4.00e-03" in caplog.text
    assert "base learning rate" not in caplog.text  # no change to warn about
    caplog.clear()
    assert main.main(["-r", str(run), "--train", "--scale_lr", "false", "lightning.trainer.max_steps=4"]) == 0
    assert base_lr(run / "checkpoints" / "last.ckpt") == pytest.approx(1e-3)  # given: the command line wins
    assert "resume: base learning rate 0.004 (checkpoint) -> 0.001 (config)" in caplog.text
    caplog.clear()  # the choice just made is what the next plain resume keeps
    assert main.main(["-r", str(run), "--train", "lightning.trainer.max_steps=5"]) == 0
    assert base_lr(run / "checkpoints" / "last.ckpt") == pytest.approx(1e-3) and "is kept" not in caplog.text
