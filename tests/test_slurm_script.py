"""scripts/slurm/train.sbatch run by bash with stand-in srun/scontrol: which main.py command a (re)queued job runs."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts/slurm/train.sbatch"
pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def submit(tmp_path: Path, *args: str, **env: str) -> tuple[list[str], dict[str, str]]:
    """Run the batch script in ``tmp_path`` as SLURM would on the first node; return srun's argv and env."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "srun").write_text('#!/bin/bash\nprintf "%s\\n" "$@" > "$SRUN_ARGS"\nenv > "$SRUN_ENV"\n')
    (bin_dir / "scontrol").write_text('#!/bin/bash\n[ "$1 $2" = "show hostnames" ] && echo node001 && echo node002\n')
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).chmod(0o755)
    full = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(tmp_path), "SRUN_ARGS": str(tmp_path / "argv"),
            "SRUN_ENV": str(tmp_path / "env"), "SLURM_JOB_ID": "42", "SLURM_JOB_NODELIST": "node[001-002]",
            "SLURM_NNODES": "2", "SLURM_NTASKS_PER_NODE": "8", "SLURM_CPUS_PER_TASK": "10", **env}
    r = subprocess.run(["bash", str(SCRIPT), *args], cwd=tmp_path, env=full, capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0, r.stderr
    srun_env = dict(line.split("=", 1) for line in (tmp_path / "env").read_text().splitlines() if "=" in line)
    argv = (tmp_path / "argv").read_text().splitlines()
    assert argv[:2] == ["--kill-on-bad-exit=1", "python"], argv  # one failed rank ends the step, no hang
    return argv[2:], srun_env


def test_syntax():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True, timeout=30)


def test_new_job_starts_a_run_with_the_allocation_as_world_and_the_extra_overrides(tmp_path):
    argv, env = submit(tmp_path, "model.base_learning_rate=5e-5")
    assert argv[:4] == ["main.py", "--base", "configs/inpaint.yaml", "-n"] and argv[4] == "inpaint-42"
    assert "--train" in argv and argv[-1] == "model.base_learning_rate=5e-5"
    assert "lightning.trainer.num_nodes=2" in argv and "lightning.trainer.devices=8" in argv
    assert env["MASTER_ADDR"] == "node001"
    assert env["SRUN_CPUS_PER_TASK"] == "10"  # srun (SLURM >= 22.05) does not inherit sbatch's --cpus-per-task


@pytest.mark.parametrize("checkpoint", ["hpc_ckpt_3.ckpt", "checkpoints/last.ckpt", "checkpoints/step=000005000.ckpt"])
def test_requeued_job_resumes_its_run_from_any_checkpoint_kind(tmp_path, checkpoint):
    """A SIGUSR1 requeue before the first periodic save leaves only hpc_ckpt_<n>.ckpt: it must be resumed, not
    replaced by a new run from step 0 (the old `compgen -G a b` treated b as a prefix filter, not a pattern)."""
    run = tmp_path / "logs/2030-01-01T00-00-00_inpaint-42"
    (run / checkpoint).parent.mkdir(parents=True, exist_ok=True)
    (run / checkpoint).write_bytes(b"x")
    argv, _ = submit(tmp_path)
    assert argv[:3] == ["main.py", "-r", "logs/2030-01-01T00-00-00_inpaint-42"], argv


def test_run_directory_without_checkpoint_starts_over_and_logdir_is_honoured(tmp_path):
    (tmp_path / "runs/2030-01-01T00-00-00_inpaint-42/checkpoints").mkdir(parents=True)
    argv, _ = submit(tmp_path, LOGDIR="runs")
    assert argv[1] == "--base" and argv[argv.index("-l") + 1] == "runs"
    (tmp_path / "runs/2030-01-01T00-00-00_inpaint-42/hpc_ckpt_1.ckpt").write_bytes(b"x")
    argv, _ = submit(tmp_path, LOGDIR="runs")
    assert argv[1:3] == ["-r", "runs/2030-01-01T00-00-00_inpaint-42"]


def test_explicit_resume_wins(tmp_path):
    argv, _ = submit(tmp_path, RESUME="logs/other")
    assert argv[1:3] == ["-r", "logs/other"]


def test_a_job_submitted_with_ntasks_instead_of_ntasks_per_node_says_what_to_do(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/bash\ntouch ran\n")
    (bin_dir / "srun").chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(tmp_path), "SLURM_JOB_ID": "42",
           "SLURM_JOB_NODELIST": "node001", "SLURM_NNODES": "1", "SLURM_NTASKS": "8"}
    r = subprocess.run(["bash", str(SCRIPT)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode != 0 and not (tmp_path / "ran").exists()
    assert "submit with --ntasks-per-node=<GPUs per node> (one task per GPU), not --ntasks" in r.stderr
