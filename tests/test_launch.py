"""The launcher's process count must match lightning.trainer.devices x num_nodes (ldm.launch), also with torchrun."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import main
from ldm.launch import check_launch
from ldm.util import ConfigError

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs/tiny/inpaint.yaml")
LAUNCH_VARS = ("TORCHELASTIC_RUN_ID", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK",
               "SLURM_NTASKS", "SLURM_NTASKS_PER_NODE", "SLURM_NNODES", "SLURM_PROCID", "SLURM_LOCALID",
               "SLURM_NODEID", "SLURM_JOB_NAME")


@pytest.fixture
def env(monkeypatch):
    for name in LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)

    def set_env(**values: str) -> None:
        for k, v in values.items():
            monkeypatch.setenv(k, v)
    return set_env


def torchrun(n: int, per_node: int | None = None) -> dict[str, str]:
    per_node = per_node or n
    return {"TORCHELASTIC_RUN_ID": "x", "RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": str(n),
            "LOCAL_WORLD_SIZE": str(per_node), "GROUP_RANK": "0"}


def srun(nodes: int, per_node: int) -> dict[str, str]:
    return {"SLURM_NTASKS": str(nodes * per_node), "SLURM_NTASKS_PER_NODE": str(per_node), "SLURM_NNODES": str(nodes),
            "SLURM_PROCID": "3", "SLURM_LOCALID": "3", "SLURM_NODEID": "0", "SLURM_JOB_NAME": "sd2"}


def test_plain_process_and_matching_launches_pass(env):
    assert check_launch(1, 1) is None
    env(**torchrun(16, 8))
    assert check_launch(8, 2).world_size == 16


@pytest.mark.parametrize("launch, devices, nodes, fix", [
    (torchrun(2), 1, 1, "devices=2 lightning.trainer.num_nodes=1"),       # torchrun -n 2 with the tiny config
    (torchrun(16, 8), 8, 1, "devices=8 lightning.trainer.num_nodes=2"),   # 2 nodes, num_nodes forgotten
    (torchrun(4), 8, 1, "devices=4 lightning.trainer.num_nodes=1"),       # fewer processes than devices: a hang
    (srun(32, 8), 8, 16, "devices=8 lightning.trainer.num_nodes=32"),      # sbatch --nodes changed, config not
    (srun(1, 4), 1, 1, "devices=4 lightning.trainer.num_nodes=1"),
])
def test_process_count_mismatch_is_one_line_saying_what_to_set(env, launch, devices, nodes, fix):
    env(**launch)
    with pytest.raises(ConfigError, match=f"set lightning.trainer.{fix}$"):
        check_launch(devices, nodes)


@pytest.mark.parametrize("values, devices, names", [
    ({"SLURM_NTASKS": "8", "SLURM_NTASKS_PER_NODE": "8", "SLURM_JOB_NAME": "sd2"}, 8, "SLURM_PROCID"),
    ({"SLURM_NTASKS": "8", "SLURM_PROCID": "0", "SLURM_JOB_NAME": "sd2"}, 1, "SLURM_LOCALID, SLURM_NODEID"),
    ({"TORCHELASTIC_RUN_ID": "x", "RANK": "0"}, 1, "LOCAL_RANK, WORLD_SIZE"),
    ({"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"}, 1, "RANK=1 is set but"),
    ({"SLURM_NTASKS": "eight", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0"}, 1, "SLURM_NTASKS="),
])
def test_half_set_launcher_environment_is_refused(env, values, devices, names):
    env(**values)
    with pytest.raises(ConfigError, match=names):
        check_launch(devices, 1)


@pytest.mark.parametrize("ntasks", ["1", "8"])
def test_single_device_run_in_a_slurm_allocation_outside_srun_passes(env, ntasks):
    """``salloc -n1 python main.py`` (job name "python") or a zsh salloc shell: SLURM_NTASKS without srun's task
    variables. One device means Lightning's single-device strategy, which never reads the SLURM ranks: the run
    trains as a plain process, so refusing it would block a working launch."""
    env(SLURM_NTASKS=ntasks, SLURM_NNODES="1", SLURM_JOB_NAME="python")
    assert check_launch(1, 1) is None
    with pytest.raises(ConfigError, match="SLURM_PROCID"):  # two devices would wait for ranks srun never started
        check_launch(2, 1)


def test_interactive_slurm_job_name_is_left_to_lightning(env):
    env(SLURM_NTASKS="8", SLURM_JOB_NAME="interactive")  # salloc shell: Lightning ignores SLURM, so do we
    assert check_launch(1, 1) is None


def test_main_refuses_half_set_slurm_before_writing_anything(env, tmp_path, caplog):
    env(SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="2", SLURM_JOB_NAME="sd2")
    assert main.main(["--base", TINY, "--train", "-l", str(tmp_path / "logs"), "lightning.trainer.devices=2"]) == 2
    assert "start it with srun" in caplog.text
    assert not (tmp_path / "logs").exists() or not any((tmp_path / "logs").rglob("*.*"))


@pytest.mark.slow  # two torchrun workers: process start-up and imports dominate
def test_torchrun_two_processes_with_devices_1_stop_instead_of_training_two_copies(tmp_path):
    """Real torchrun: before the check both processes trained and both wrote last.ckpt into one run directory."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", WANDB_MODE="offline", HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                        "main.py", "--base", TINY, "--train", "-l", str(tmp_path / "logs"),
                        "lightning.trainer.max_steps=2"], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=180)
    out = r.stdout + r.stderr
    assert r.returncode != 0, out[-3000:]
    errors = [line for line in out.splitlines() if " ERROR main: " in line]
    assert len(errors) == 2 and all("torchrun started 2 process(es)" in e for e in errors), out[-3000:]
    # (torchrun itself then prints its ChildFailedError summary; our processes print one line each)
    assert not list((tmp_path / "logs").rglob("*.ckpt"))


def test_global_batch_counts_every_factor():
    from omegaconf import OmegaConf

    from ldm.launch import global_batch
    cfg = OmegaConf.create({"data": {"params": {"batch_size": 8}}, "lightning": {"trainer": {
        "devices": 8, "num_nodes": 32, "accumulate_grad_batches": 1}}})
    assert global_batch(cfg)[0] == 2048  # configs/inpaint.yaml's run
    cfg.lightning.trainer.num_nodes, cfg.lightning.trainer.accumulate_grad_batches = 16, 2
    assert global_batch(cfg) == (2048, "8 (batch size) * 8 (devices) * 16 (nodes) * 2 (accumulate_grad_batches)")


def test_resume_with_another_global_batch_says_so(env, tmp_path, caplog):
    """Fewer nodes after a preemption (or another batch size / accumulation) halves the samples per step while
    the learning rate stays: before, the change was only written to configs/resumes/*-overrides.yaml."""
    logs = tmp_path / "logs"
    assert main.main(["--base", TINY, "--train", "-l", str(logs), "lightning.trainer.max_steps=1"]) == 0
    caplog.clear()
    run = next(logs.iterdir())
    assert main.main(["-r", str(run), "--train", "lightning.trainer.max_steps=2", "data.params.batch_size=2"]) == 0
    warning = [r.getMessage() for r in caplog.records if "global batch changes" in r.getMessage()]
    assert warning == ["resume: the global batch changes from 4 (4 (batch size) * 1 (devices) * 1 (nodes) * 1 "
                       "(accumulate_grad_batches)) to 2 samples per optimizer step; the learning rate is not "
                       "rescaled (--scale_lr off). Keep the run's batch with the batch size or "
                       "lightning.trainer.accumulate_grad_batches"], warning
    caplog.clear()
    assert main.main(["-r", str(run), "--train", "lightning.trainer.max_steps=3"]) == 0  # inherits batch 2: no news
    assert "global batch changes" not in caplog.text


def test_resume_batch_warning_names_the_runs_recorded_scale_lr_choice(env, tmp_path, caplog):
    """Without --scale_lr on the resume command, the run's choice recorded in the checkpoint decides (it is kept),
    so the warning says which; a checkpoint from before that record is named as such."""
    import torch

    logs = tmp_path / "logs"
    assert main.main(["--base", TINY, "--train", "--scale_lr", "-l", str(logs), "lightning.trainer.max_steps=1"]) == 0
    run = next(logs.iterdir())
    caplog.clear()
    assert main.main(["-r", str(run), "--train", "lightning.trainer.max_steps=2", "data.params.batch_size=2"]) == 0
    warning = [r.getMessage() for r in caplog.records if "global batch changes" in r.getMessage()]
    assert len(warning) == 1 and "the learning rate is rescaled by --scale_lr." in warning[0], warning
    last = run / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=True)
    assert ckpt.pop("learning_rate_choice")["scale_lr"] is True
    torch.save(ckpt, last)  # as written before the record existed
    caplog.clear()
    assert main.main(["-r", str(run), "--train", "lightning.trainer.max_steps=3", "data.params.batch_size=1"]) == 0
    warning = [r.getMessage() for r in caplog.records if "global batch changes" in r.getMessage()]
    assert len(warning) == 1 and "predates the record of --scale_lr" in warning[0], warning
