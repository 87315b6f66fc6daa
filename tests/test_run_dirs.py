"""ldm.run helpers: run-directory resolution, LR formula, override and section validation (no training)."""

from __future__ import annotations

import os
import sys
import time

import pytest
import torch
from omegaconf import OmegaConf

from ldm.run import check_overrides, check_sections, count_devices, effective_lr
from ldm.run_dirs import resolve_run_dirs
from ldm.util import ConfigError
from tests.helpers import REPO, damage


def test_new_run_name_and_layout(tmp_path):
    d = resolve_run_dirs("2026-01-01T00-00-00", str(tmp_path), None, "_x", ["configs/inpaint.yaml"], None)
    assert d.nowname == "2026-01-01T00-00-00_inpaint_x"
    assert d.ckptdir == tmp_path / d.nowname / "checkpoints" and d.resume_ckpt is None


def full_state(step: int, saved_at: float | None = None) -> dict:
    """The top-level layout of a Lightning training checkpoint (what ldm.resume.probe checks), tiny."""
    return {"state_dict": {"w": torch.full((64,), float(step))}, "optimizer_states": [{}], "lr_schedulers": [],
            "loops": {}, "callbacks": {}, "global_step": step, "epoch": 0,
            **({"provenance": {"saved_at": saved_at}} if saved_at is not None else {})}


def make_run(tmp_path):
    run = tmp_path / "2026-01-01T00-00-00_inpaint"
    (run / "checkpoints").mkdir(parents=True)
    (run / "configs").mkdir()
    (run / "configs" / "a-project.yaml").write_text("model: {}\n")
    return run


def test_resume_picks_the_highest_recorded_step_whatever_the_file_times(tmp_path, caplog):
    """A copy without preserved times (cp -r, rsync without -t, an object-store sync) makes any file the newest."""
    import logging

    caplog.set_level(logging.INFO)
    run = make_run(tmp_path)
    last, hpc = run / "checkpoints" / "last.ckpt", run / "hpc_ckpt_1.ckpt"
    step = run / "checkpoints" / "step=000000005.ckpt"
    torch.save(full_state(10, saved_at=100.0), last)
    torch.save(full_state(12, saved_at=200.0), hpc)
    torch.save(full_state(5, saved_at=50.0), step)
    now = time.time()
    for times in ((last, step, hpc), (hpc, last, step), (step, hpc, last)):  # oldest .. newest file time
        for i, f in enumerate(times):
            os.utime(f, (now + i, now + i))
        d = resolve_run_dirs("t", str(tmp_path), None, "", [], str(run))
        assert (d.resume_ckpt, d.resume_step) == (hpc, 12)
        assert f"chose {hpc}: step 12, the highest global step" in caplog.text
        assert "last.ckpt (step 10), step=000000005.ckpt (step 5)" in caplog.text
        assert d.logdir == run and d.resume_configs == [run / "configs" / "a-project.yaml"]
    # the same step: the later recorded save wins, not the later file time
    torch.save(full_state(12, saved_at=300.0), last)
    os.utime(last, (now - 1000, now - 1000))
    assert resolve_run_dirs("t", str(tmp_path), None, "", [], str(run)).resume_ckpt == last
    # a checkpoint file: the run dir is found above "checkpoints", also for hpc and periodic checkpoints
    for f, n in ((last, 12), (hpc, 12), (step, 5)):
        d = resolve_run_dirs("t", str(tmp_path), None, "", [], str(f))
        assert (d.logdir, d.resume_ckpt, d.resume_step) == (run, f, n)
    with pytest.raises(ConfigError, match="no such run"):
        resolve_run_dirs("t", str(tmp_path), None, "", [], str(tmp_path / "nope"))


def test_resume_falls_back_past_a_damaged_checkpoint_and_moves_the_abandoned_attempt_aside(tmp_path, caplog):
    """last.ckpt (step 8) has a flipped byte in a tensor: its zip directory and pickle are intact, so it probes and
    even loads, with a wrong weight. The owner verifies checksums, resumes from step 4 and moves every file beyond
    step 4 (the damaged one, a weights-only snapshot of step 6) aside, where no save of the new attempt reaches."""
    import logging

    from ldm.checkpoint import CheckpointError, load_checkpoint_file
    from ldm.resume import pick

    caplog.set_level(logging.INFO)
    run = make_run(tmp_path)
    last, four = run / "checkpoints" / "last.ckpt", run / "checkpoints" / "step=000000004.ckpt"
    torch.save(full_state(8), last)
    torch.save(full_state(4), four)
    (run / "checkpoints" / "trainstep_checkpoints").mkdir()
    snap = run / "checkpoints" / "trainstep_checkpoints" / "epoch=000000-step=000000006.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "global_step": 6}, snap)
    damage(last)
    cut = run / "hpc_ckpt_1.ckpt"  # step 7, truncated inside its tensor data (a copy that stopped)
    torch.save(full_state(7), cut)
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    assert load_checkpoint_file(last, mmap=True)["global_step"] == 8  # the cheap probe cannot tell
    with pytest.raises(CheckpointError, match="CRC-32"):
        load_checkpoint_file(last)  # a full load verifies
    assert pick(run, verify=False) == (last, 8)
    assert pick(run) == (four, 4)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(f"skipping {last} (step 8)" in w and "CRC-32" in w for w in warnings), warnings
    assert any("damaged, ranked above it: last.ckpt (step 8)" in w for w in warnings), warnings
    assert any(f"skipping {cut}" in w for w in warnings), warnings
    d = resolve_run_dirs("2026-02-02T00-00-00", str(tmp_path), None, "", [], str(run), owner=True)
    assert (d.resume_ckpt, d.resume_step) == (four, 4) and (run / "run.lock").is_file()
    aside = run / "checkpoints" / "superseded" / "2026-02-02T00-00-00"
    assert not last.exists() and not snap.exists() and four.exists()
    assert (aside / "last.ckpt").is_file() and (aside / "trainstep_checkpoints" / snap.name).is_file()
    d.lock.release()
    assert not (run / "run.lock").exists()
    # an explicit file that is damaged is an error, not a fallback
    damage(four)
    with pytest.raises(CheckpointError, match="is damaged"):
        resolve_run_dirs("t", str(tmp_path), None, "", [], str(four), owner=True)
    assert not (run / "run.lock").exists()  # released on the error



def test_a_run_directory_in_use_by_a_live_process_is_one_line_and_exit_2(tmp_path, caplog):
    """A second process holds run.lock (alive, same host): -r into that directory stops with one line and rc 2.
    Once that process is dead, the stale lock is taken over (logged) and released at the end."""
    import logging
    import subprocess

    import main

    run = make_run(tmp_path)
    (run / "configs" / "a-project.yaml").write_text((REPO / "configs/tiny/inpaint.yaml").read_text())  # checked first
    torch.save(full_state(4), run / "checkpoints" / "last.ckpt")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from ldm.runlock import RunLock; "
                               "RunLock(Path(sys.argv[1])); print('held', flush=True); time.sleep(120)", str(run)],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main.main(["-r", str(run), "--train"]) == 2
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1 and f"in use by pid {holder.pid} on" in errors[0] and "--break-lock" in errors[0]
        assert "\n" not in errors[0]
    finally:
        holder.kill()
        holder.wait()
    caplog.clear()
    d = resolve_run_dirs("t", str(tmp_path), None, "", [], str(run), owner=True)
    assert f"process {holder.pid} is no longer running" in caplog.text and (run / "run.lock").is_file()
    d.lock.release()
    assert not (run / "run.lock").exists()

def test_effective_lr_formula():
    assert effective_lr(1e-4, 8, 8, 32, 1, scale_lr=False)[0] == pytest.approx(1e-4)
    lr, text = effective_lr(1e-4, 8, 8, 32, 2, scale_lr=True)
    assert lr == pytest.approx(2 * 8 * 32 * 8 * 1e-4) and "32 (nodes)" in text
    assert count_devices("0,1,2") == 3 and count_devices([0, 1]) == 2 and count_devices(4) == 4
    # "auto" is every GPU of the node, but one process with the CPU accelerator (what Lightning runs)
    assert count_devices("auto", "cpu") == count_devices(-1, "cpu") == 1
    assert count_devices("auto") == max(torch.cuda.device_count(), 1)


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


def test_resume_with_no_loadable_checkpoint_is_one_line_naming_each(tmp_path):
    from ldm.checkpoint import CheckpointError

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"")
    torch.save({"state_dict": {"w": torch.ones(1)}, "global_step": 3}, run / "hpc_ckpt_1.ckpt")  # weights only
    with pytest.raises(CheckpointError) as info:
        resolve_run_dirs("t", str(tmp_path), None, "", [], str(run))
    msg = str(info.value)
    assert "\n" not in msg and "last.ckpt: " in msg and "empty (0 bytes)" in msg
    assert "hpc_ckpt_1.ckpt: " in msg and "weights-only snapshot" in msg


def test_default_callbacks_target_the_library_and_ldm_paths_still_resolve(tmp_path):
    import main
    from ldm import callbacks
    from ldm.run import default_callbacks
    from ldm.util import get_obj_from_str

    d = resolve_run_dirs("t", str(tmp_path), None, "", ["x.yaml"], None)
    specs = default_callbacks(d, "t", OmegaConf.create({"model": {}}), OmegaConf.create({}), 1, False, None)
    ours = [s["target"] for s in specs.values() if not s["target"].startswith("pytorch_lightning.")]
    assert ours and all(t.startswith("ldm.callbacks.") for t in ours), ours
    assert specs["image_logger"]["params"]["logdir"] == str(d.logdir)  # passed explicitly, not via the trainer
    for name in ("ImageLogger", "SetupCallback", "CUDACallback", "GracefulStop"):  # ldm configs say main.<Name>
        assert get_obj_from_str(f"main.{name}") is getattr(callbacks, name) is getattr(main, name)


def test_the_checkpoint_io_cannot_be_replaced():
    from pytorch_lightning.plugins.io import TorchCheckpointIO

    from ldm.run import checkpoint_plugins

    (plugin,) = checkpoint_plugins(None)
    assert type(plugin).__name__ == "AtomicCheckpointIO"
    with pytest.raises(ConfigError, match="CheckpointIO"):
        checkpoint_plugins([TorchCheckpointIO()])


def test_harness_uses_no_private_lightning_api():
    """Private Lightning attributes (``fit_loop._should_accumulate()``, ``self._trainer``, attributes parked on the
    trainer) break silently across Lightning releases; the harness sticks to the public API."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    private = re.compile(r"fit_loop\._|\bself\._trainer\b|\btrainer\._\w+|\bstrategy\._\w+|_ldm_logdir")
    hits = [f"{p.relative_to(root)}:{i + 1}: {line.strip()}"
            for p in [root / "main.py", *sorted((root / "ldm").rglob("*.py"))]
            for i, line in enumerate(p.read_text().splitlines()) if private.search(line)]
    assert not hits, "\n".join(hits)
    assert private.search("if trainer.fit_loop._should_accumulate():")  # the pattern can fail


def test_ldm_main_targets_resolve_without_importing_main(monkeypatch):
    """Run from outside the repository root, ``import main`` fails (or finds another project's main.py): ldm's
    ``main.<Callback>`` targets still resolve, to ``ldm.callbacks``; other ``main.X`` targets import as written."""
    from ldm import callbacks
    from ldm.util import check_tree, get_obj_from_str, load_config

    monkeypatch.setitem(sys.modules, "main", None)  # any `import main` now raises ModuleNotFoundError
    assert get_obj_from_str("main.ImageLogger") is callbacks.ImageLogger
    official = load_config([REPO / "configs" / "stable-diffusion" / "v2-inpainting-inference.yaml"])
    assert official.lightning.callbacks.image_logger.target == "main.ImageLogger"  # official configs stay as shipped
    check_tree(OmegaConf.to_container(official.lightning.callbacks), "lightning.callbacks")
    with pytest.raises(ConfigError, match="cannot import module 'main'"):
        get_obj_from_str("main.NotACallback")
    # the configs this project authors name the library directly
    for path in [REPO / "configs" / "inpaint.yaml", *(REPO / "configs").glob("tiny/*.yaml"),
                 *(REPO / "configs").glob("demo/*.yaml")]:
        assert "target: main." not in path.read_text(), path
