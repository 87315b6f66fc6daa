"""Multi-node for real: 2 processes (2 nodes x 1 process) over gloo, launched by torchrun on localhost."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two_nodes(tmp_path: Path, extra: list[str]) -> list[subprocess.CompletedProcess]:
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    procs = []
    for node_rank in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
               f"--node-rank={node_rank}", "--master-addr=127.0.0.1", f"--master-port={port}",
               "main.py", "--base", "configs/tiny/inpaint.yaml", "--train", "-l", str(tmp_path / f"logs{node_rank}"),
               "-n", "multinode", "lightning.trainer.num_nodes=2", "lightning.trainer.devices=1",
               "lightning.trainer.max_steps=4", "lightning.trainer.log_every_n_steps=1",
               "lightning.modelcheckpoint.params.every_n_train_steps=2",
               "lightning.callbacks.image_logger.params.batch_frequency=2",
               "lightning.callbacks.record.target=tests.helpers.RecordKeys",
               f"lightning.callbacks.record.params.out_dir={tmp_path / 'keys'}", *extra]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    results = []
    for p in procs:
        out, _ = p.communicate(timeout=600)
        results.append(subprocess.CompletedProcess(p.args, p.returncode, out, ""))
    return results


def test_two_nodes_train_read_different_data_and_only_rank0_writes(tmp_path):
    results = launch_two_nodes(tmp_path, [])
    for r in results:
        assert r.returncode == 0, r.stdout[-4000:]
    keys0 = (tmp_path / "keys/rank0.txt").read_text().split()
    keys1 = (tmp_path / "keys/rank1.txt").read_text().split()
    assert len(keys0) == len(keys1) == 4 * 4  # 4 steps x batch 4 on each rank
    assert not set(keys0) & set(keys1)  # ranks read different data
    run0 = next((tmp_path / "logs0").iterdir())
    ckpt = torch.load(run0 / "checkpoints/last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 4
    assert list((run0 / "images/train").glob("*.png")) and list((run0 / "csv").rglob("metrics.csv"))
    # node 1 (global rank 1) writes no checkpoints, images or metrics
    written = [p for p in (tmp_path / "logs1").rglob("*") if p.is_file()] if (tmp_path / "logs1").exists() else []
    assert written == [], written
