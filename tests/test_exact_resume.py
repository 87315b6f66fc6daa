"""Exact resume on the synthetic data module: 2N steps straight equal N steps, a SIGKILL, ``-r``, and N more.

One straight run (A) and three interrupted ones share a config with gradient accumulation (2 micro-batches per
optimizer step), a warming-up LR, periodic full-state checkpoints every N steps and weights-only snapshots every 2:

* B: SIGKILL at step N+1, after the step-N checkpoint; resumed twice from copies of its directory, through
  ``-r <run dir>`` (with a broken, newer ``hpc_ckpt`` and an orphaned temp file planted, which must be skipped /
  removed) and through ``-r <checkpoint file>``;
* C: under a (simulated) SLURM allocation, SIGUSR1 saves ``hpc_ckpt_1.ckpt`` at a step boundary and requeues the
  job (a fake ``scontrol`` on PATH records the call); then ``-r <run dir>`` resumes from that file.

The final UNet, EMA (weights and ``num_updates``) and AdamW state of every resumed run must be bit-equal to A's,
and every checkpoint any run wrote holds exactly ``global_step`` EMA updates. The resumed run also continues the
same CSV and TensorBoard version directory, with each step logged once, and its progress bar counts steps.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import main
from tests.helpers import damage, record_saves

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs/tiny/inpaint.yaml")
N = 4
SEED = "7"  # not the default: every resume below omits --seed and must keep the run's own
COMMON = [
    f"lightning.trainer.max_steps={2 * N}",
    "lightning.trainer.accumulate_grad_batches=2",
    "lightning.trainer.log_every_n_steps=1",
    f"lightning.modelcheckpoint.params.every_n_train_steps={N}",
    "lightning.callbacks.metrics_over_trainsteps_checkpoint.params.every_n_train_steps=2",
    "lightning.callbacks.image_logger.params.disabled=true",
    "lightning.loggers.csv.params.flush_logs_every_n_steps=1",  # the killed run's rows reach the disk
]
SLURM_ENV = {"SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_NNODES": "1", "SLURM_JOB_NAME": "sd2-test",
             "SLURM_JOB_ID": "4242", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
             "SLURM_NODELIST": "localhost"}


def only_dir(root: Path) -> Path:
    dirs = [d for d in root.iterdir() if d.is_dir()]
    assert len(dirs) == 1, dirs
    return dirs[0]


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_ema_count_matches_step(path: Path) -> int:
    ck = load(path)
    updates = int(ck["state_dict"]["model_ema.num_updates"])
    assert updates == ck["global_step"], f"{path.name}: {updates} EMA updates at step {ck['global_step']}"
    return ck["global_step"]


def assert_same_training_state(a: Path, b: Path) -> None:
    """UNet, EMA (incl. num_updates) and AdamW moments, step counts and LR: bit-equal."""
    ca, cb = load(a), load(b)
    assert ca["global_step"] == cb["global_step"] == 2 * N
    keys = [k for k in ca["state_dict"] if k.startswith(("model.", "model_ema."))]
    assert keys and keys == [k for k in cb["state_dict"] if k.startswith(("model.", "model_ema."))]
    diff = [k for k in keys if not torch.equal(ca["state_dict"][k], cb["state_dict"][k])]
    assert not diff, f"{len(diff)} tensors differ, e.g. {diff[:3]}"
    assert int(cb["state_dict"]["model_ema.num_updates"]) == 2 * N
    oa, ob = ca["optimizer_states"][0], cb["optimizer_states"][0]
    assert oa["param_groups"][0]["lr"] == ob["param_groups"][0]["lr"]
    assert oa["state"].keys() == ob["state"].keys() and len(oa["state"]) > 0
    for i in oa["state"]:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(oa["state"][i][name], ob["state"][i][name]), (i, name)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("exact")
    # A: straight
    assert main.main(["--base", TINY, "--train", "-s", SEED, "-l", str(root / "a"), *COMMON]) == 0
    # B: killed without warning after the step-N checkpoint (a real SIGKILL needs its own process)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    killed = subprocess.run(
        [sys.executable, "main.py", "--base", TINY, "--train", "-s", SEED, "-l", str(root / "b"), *COMMON,
         "lightning.callbacks.kill.target=tests.helpers.KillAtStep", f"lightning.callbacks.kill.params.step={N + 1}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -9, killed.stderr[-2000:]
    b = only_dir(root / "b")
    copies = {}
    for kind in ("dir", "file"):
        copies[kind] = root / f"b_{kind}" / b.name
        shutil.copytree(b, copies[kind])
    return {"root": root, "a": only_dir(root / "a"), "b": b, **copies}


def test_killed_run_left_the_step_n_checkpoint(runs):
    b = runs["b"]
    assert load(b / "checkpoints" / "last.ckpt")["global_step"] == N
    assert sorted(p.name for p in (b / "checkpoints").glob("step=*.ckpt")) == [f"step={N:09d}.ckpt"]


def test_every_checkpoint_of_the_straight_run_holds_step_ema_updates(runs):
    ckpts = runs["a"] / "checkpoints"
    periodic = sorted(ckpts.glob("step=*.ckpt"))
    snapshots = sorted((ckpts / "trainstep_checkpoints").glob("*.ckpt"))
    # retention: every periodic full-state checkpoint is kept, as the README promises
    assert [assert_ema_count_matches_step(p) for p in periodic] == [N, 2 * N]
    assert [assert_ema_count_matches_step(p) for p in snapshots] == [2, 4, 6, 8]
    assert assert_ema_count_matches_step(ckpts / "last.ckpt") == 2 * N
    assert "optimizer_states" not in load(snapshots[0]) and "optimizer_states" in load(periodic[0])


def test_resume_from_run_dir_is_exact_and_skips_broken_files(runs, caplog, capsys, monkeypatch):
    """Also: the killed run's stale run.lock is taken over; a newer file with damaged tensor bytes is skipped (and
    moved aside, not overwritten); the step-N file the run resumed from is never written again, and no snapshot
    is written twice (accumulation 2: the first micro-batch after the resume is still at step N)."""
    run = runs["dir"]
    ckpts = run / "checkpoints"
    broken = run / "hpc_ckpt_9.ckpt"
    broken.write_bytes(b"")  # newer than last.ckpt, and unreadable
    damaged = run / "hpc_ckpt_3.ckpt"  # step 2N, complete, but one tensor byte flipped
    shutil.copy(runs["a"] / "checkpoints" / f"step={2 * N:09d}.ckpt", damaged)
    damage(damaged)
    orphan = ckpts / ".last.ckpt.a1b2c3d4.tmp"
    orphan.write_bytes(b"\0" * 1024)  # what a kill during a save leaves behind
    resumed_from = ckpts / f"step={N:09d}.ckpt"
    before = resumed_from.read_bytes()
    assert json.loads((run / "run.lock").read_text())["pid"] != os.getpid()  # left by the SIGKILLed process
    saves = record_saves(monkeypatch)
    assert main.main(["-r", str(run), "--train", "lightning.callbacks.kill=null"]) == 0
    # each file once per step, at a step boundary, never step N again and never a "-v1" duplicate
    assert len(saves) == len(set(saves)) and all(p == 2 * step for _, step, p in saves), saves
    assert all(step > N for _, step, _ in saves) and not [p for p in run.rglob("*-v*.ckpt")], saves
    assert not orphan.exists() and f"removed {orphan}" in caplog.text
    assert f"skipping {broken}" in caplog.text and "empty (0 bytes)" in caplog.text
    assert f"skipping {damaged} (step {2 * N})" in caplog.text and "CRC-32" in caplog.text
    assert not damaged.exists() and len(list((ckpts / "superseded").rglob(damaged.name))) == 1
    assert "taking over the lock" in caplog.text and "is no longer running" in caplog.text
    assert not (run / "run.lock").exists()  # released at the end
    assert resumed_from.read_bytes() == before
    assert_same_training_state(runs["a"] / "checkpoints" / "last.ckpt", ckpts / "last.ckpt")
    snaps = sorted(p.name for p in (ckpts / "trainstep_checkpoints").glob("*.ckpt"))
    assert snaps == [f"epoch=000000-step={s:09d}.ckpt" for s in (2, 4, 6, 8)], snaps
    for path in [*ckpts.glob("*.ckpt"), *(ckpts / "trainstep_checkpoints").glob("*.ckpt")]:
        assert_ema_count_matches_step(path)
        # a step boundary: every micro-batch of the saved steps processed, none of the next step
        progress = load(path)["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]["processed"]
        assert progress == 2 * load(path)["global_step"], (path.name, progress)
    out = capsys.readouterr().out
    assert "train step: 100%" in out and f"{2 * N}/{2 * N}" in out and "/-2" not in out  # steps, not epochs
    # one CSV and one TensorBoard version directory; every step logged exactly once, in order
    assert [p.name for p in (run / "csv").iterdir()] == ["version_0"]
    assert [p.name for p in (run / "tensorboard").iterdir()] == ["version_0"]
    rows = list(csv.DictReader(open(run / "csv" / "version_0" / "metrics.csv")))
    steps = [int(r["step"]) for r in rows if r.get("train/loss")]
    assert steps == list(range(2 * N)), steps
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard" / "version_0")).Reload()
    tb_steps = [e.step for e in events.Scalars("train/loss")]
    assert sorted(tb_steps) == list(range(N, 2 * N)) or sorted(tb_steps) == list(range(2 * N)), tb_steps


def test_resume_from_checkpoint_file_is_exact(runs):
    run = runs["file"]
    step_ckpt = run / "checkpoints" / f"step={N:09d}.ckpt"
    assert main.main(["-r", str(step_ckpt), "--train", "lightning.callbacks.kill=null"]) == 0
    assert_same_training_state(runs["a"] / "checkpoints" / "last.ckpt", run / "checkpoints" / "last.ckpt")


def test_slurm_requeue_checkpoint_then_resume_is_exact(runs, monkeypatch, caplog, tmp_path):
    caplog.set_level(logging.INFO)
    fakebin = tmp_path / "bin"
    fakebin.mkdir()
    calls = tmp_path / "scontrol_calls.txt"
    (fakebin / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\n")
    (fakebin / "scontrol").chmod(0o755)
    for key, value in SLURM_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("PATH", f"{fakebin}{os.pathsep}{os.environ['PATH']}")
    logs = runs["root"] / "c"
    assert main.main(["--base", TINY, "--train", "-s", SEED, "-l", str(logs), *COMMON,
                      "lightning.callbacks.kill.target=tests.helpers.SignalAtStep",
                      f"lightning.callbacks.kill.params.step={N - 2}",
                      "lightning.callbacks.kill.params.signal_name=SIGUSR1"]) == 0
    run = only_dir(logs)
    hpc = run / "hpc_ckpt_1.ckpt"
    saved_at = assert_ema_count_matches_step(hpc)
    assert N - 2 <= saved_at <= N - 1  # at the step boundary after the signal, before any periodic checkpoint
    # stopping ends the epoch, where ModelCheckpoint also writes last.ckpt: the same state, at the same step
    last = run / "checkpoints" / "last.ckpt"
    assert assert_ema_count_matches_step(last) == saved_at
    last.unlink()  # so that the resume below reads the SLURM file
    assert calls.read_text().split() == ["requeue", "4242"]
    for key in SLURM_ENV:
        monkeypatch.delenv(key)
    assert main.main(["-r", str(run), "--train", "lightning.callbacks.kill=null"]) == 0
    assert f"from {hpc} (step {saved_at})" in caplog.text
    assert_same_training_state(runs["a"] / "checkpoints" / "last.ckpt", run / "checkpoints" / "last.ckpt")


def test_real_checkpoints_record_provenance(runs):
    ckpts = runs["a"] / "checkpoints"
    for path in (ckpts / "last.ckpt", sorted((ckpts / "trainstep_checkpoints").glob("*.ckpt"))[0]):
        ck = load(path)
        rec = ck["provenance"]
        assert ck["parameterization"] == rec["parameterization"] == "v", path.name
        assert rec["scale_factor"] == pytest.approx(0.18215)
        assert rec["config"]["lightning"]["trainer"]["max_steps"] == 2 * N  # the resolved run config
        assert rec["config"]["model"]["params"]["parameterization"] == "v"
        assert rec["package_version"] and "git_revision" in rec


def test_resume_from_a_weights_only_snapshot_says_how_to_start_from_it(runs, caplog):
    import shlex

    from ldm.util import instantiate_from_config, load_config

    snap = sorted((runs["a"] / "checkpoints" / "trainstep_checkpoints").glob("*.ckpt"))[-1]
    assert main.main(["-r", str(snap), "--train"]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "weights-only snapshot" in errors[0], errors
    # the suggested command starts a new run from the snapshot's weights: check that those are what it loads
    argv = shlex.split(errors[0].split("python main.py ", 1)[1])
    bases = argv[argv.index("--base") + 1: argv.index("--train")]
    override = argv[argv.index("--train") + 1:]
    assert override == [f"model.params.ckpt_path={snap}"] and all(Path(b).is_file() for b in bases)
    cfg = load_config(bases, override)
    model = instantiate_from_config(cfg.model)
    sd = load(snap)["state_dict"]
    for key in ("model.diffusion_model.out.2.weight", "model_ema.diffusion_modelout2weight",
                "model.diffusion_model.input_blocks.0.0.weight"):
        assert torch.equal(model.state_dict()[key], sd[key]), key


def test_lr_and_schedule_changed_on_resume_take_effect(runs):
    """Resume B with a new base LR, warm-up, weight decay and EMA decay: all of them are used, the LR exactly as
    logged."""
    from ldm.lr_scheduler import LambdaLinearScheduler

    run = runs["root"] / "b_lr" / runs["b"].name
    shutil.copytree(runs["b"], run)
    assert main.main(["-r", str(run), "--train", "lightning.callbacks.kill=null", "model.base_learning_rate=5e-4",
                      "model.params.scheduler_config.params.warm_up_steps=[6]", "model.params.weight_decay=0.02",
                      "model.params.ema_decay=0.99"]) == 0
    f = LambdaLinearScheduler(warm_up_steps=[6], f_min=[1.0], f_max=[1.0], f_start=[1e-6],
                              cycle_lengths=[10000000000000])
    rows = list(csv.DictReader(open(run / "csv" / "version_0" / "metrics.csv")))
    logged = {int(r["step"]): float(r["lr-AdamW"]) for r in rows if r.get("lr-AdamW")}
    abs_logged = {int(r["step"]): float(r["lr_abs"]) for r in rows if r.get("lr_abs")}
    for s in range(N, 2 * N):
        assert logged[s] == pytest.approx(5e-4 * f(s), rel=1e-6), (s, logged[s])
        assert abs_logged[s] == pytest.approx(logged[s], rel=1e-6)
    last = load(run / "checkpoints" / "last.ckpt")
    group = last["optimizer_states"][0]["param_groups"][0]
    assert group["initial_lr"] == 5e-4 and group["lr"] == pytest.approx(5e-4 * f(2 * N), rel=1e-9)
    assert group["weight_decay"] == 0.02 and float(last["state_dict"]["model_ema.decay"]) == pytest.approx(0.99)
    assert logged[N - 1] == pytest.approx(1e-3 * (1e-6 + (1 - 1e-6) * (N - 1) / 10), rel=1e-6)  # before: old settings


def test_sigterm_inside_an_accumulation_saves_at_the_step_end_and_resumes_exactly(runs, monkeypatch, caplog):
    """SIGTERM after the first of the two micro-batches of step N+1: the step is finished, then saved and the run
    stops; the resume gives the straight run's state. Every file is written once per step, at a step boundary, and
    never as a Lightning "-v1" duplicate (also not by the first micro-batch after the resume)."""
    caplog.set_level(logging.INFO)
    logs = runs["root"] / "term"
    saves = record_saves(monkeypatch)
    assert main.main(["--base", TINY, "--train", "-s", SEED, "-l", str(logs), *COMMON,
                      "lightning.callbacks.kill.target=tests.helpers.SignalAtBatch",
                      f"lightning.callbacks.kill.params.batch={2 * N + 1}"]) == 0
    run = only_dir(logs)
    last = run / "checkpoints" / "last.ckpt"
    assert assert_ema_count_matches_step(last) == N + 1
    assert ("last.ckpt", N + 1, 2 * (N + 1)) in saves and saves.count(("last.ckpt", N + 1, 2 * (N + 1))) == 1
    assert main.main(["-r", str(run), "--train", "lightning.callbacks.kill=null"]) == 0
    assert f"from {last} (step {N + 1})" in caplog.text
    assert_same_training_state(runs["a"] / "checkpoints" / "last.ckpt", last)
    assert all(processed == 2 * step for _, step, processed in saves), saves
    assert len(saves) == len(set(saves)), saves  # no file written twice for one step
    names = [p.name for p in run.rglob("*.ckpt")]
    assert not [n for n in names if "-v" in n], names
    assert sorted(n for n in names if n.startswith("step=")) == [f"step={N:09d}.ckpt", f"step={2 * N:09d}.ckpt"]


def test_a_new_run_from_our_checkpoint_restarts_the_ema_count_and_a_resume_keeps_it(runs, caplog):
    """model.params.ckpt_path=<step N full state>: the EMA weights are loaded, its num_updates (N) is reset and
    logged, so the new run's checkpoints hold num_updates == global_step; resuming that run keeps its count."""
    caplog.set_level(logging.INFO)
    source = runs["a"] / "checkpoints" / f"step={N:09d}.ckpt"
    logs = runs["root"] / "from_ckpt"
    quick = ["lightning.callbacks.image_logger.params.disabled=true", "lightning.callbacks.kill=null",
             "lightning.modelcheckpoint.params.every_n_train_steps=2", f"model.params.ckpt_path={source}"]
    assert main.main(["--base", TINY, "--train", "-l", str(logs), "lightning.trainer.max_steps=2", *quick]) == 0
    assert f"{source} carried num_updates={N}; reset to 0 for this new run" in caplog.text
    run = only_dir(logs)
    assert assert_ema_count_matches_step(run / "checkpoints" / "last.ckpt") == 2
    assert main.main(["-r", str(run), "--train", "lightning.trainer.max_steps=3"]) == 0
    assert assert_ema_count_matches_step(run / "checkpoints" / "last.ckpt") == 3
