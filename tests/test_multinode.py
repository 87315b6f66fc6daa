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


def write_config(tmp_path: Path) -> Path:
    """The tiny inpainting config over 8 real 64 px demo shards on disk (WebDataModuleFromConfig + AddMask)."""
    from demo_data import demo_records, load_manifest
    from omegaconf import OmegaConf

    from ldm.data.shard_writer import write_shards

    shards = write_shards(demo_records(load_manifest(), repeat=4, seed=0), tmp_path / "shards",
                          samples_per_shard=5, size=64, resize_mode="center_crop")
    assert len(shards) == 8
    cfg = OmegaConf.load(REPO / "configs/tiny/inpaint.yaml")
    transforms = [{"target": "torchvision.transforms.Resize", "params": {"size": 64, "interpolation": 3}},
                  {"target": "torchvision.transforms.RandomCrop", "params": {"size": 64}}]
    cfg.data = {"target": "ldm.data.laion.WebDataModuleFromConfig", "params": {
        "batch_size": 4, "num_workers": 1, "multinode": True, "seed": 0,
        "train": {"shards": str(tmp_path / "shards" / "{00000..00007}.tar"), "shuffle": 0, "image_key": "jpg",
                  "image_transforms": transforms,
                  "postprocess": {"target": "ldm.data.laion.AddMask", "params": {"mode": "256train",
                                                                                 "p_drop": 0.25}}}}}
    path = tmp_path / "multinode.yaml"
    OmegaConf.save(cfg, path)
    return path


def launch_two_nodes(tmp_path: Path, extra: list[str], skew_node1: bool = False) -> list[subprocess.CompletedProcess]:
    """Both nodes on this machine; ``skew_node1`` runs node 1 with its clock an hour ahead."""
    config = write_config(tmp_path)
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    procs = []
    for node_rank in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
               f"--node-rank={node_rank}", "--master-addr=127.0.0.1", f"--master-port={port}",
               *(["tests/skewed_clock.py"] if skew_node1 and node_rank else []),
               "main.py", "--base", str(config), "--train", "-l", str(tmp_path / f"logs{node_rank}"),
               "-n", "multinode", "lightning.trainer.num_nodes=2", "lightning.trainer.devices=1",
               "lightning.trainer.max_steps=4", "lightning.trainer.log_every_n_steps=1",
               "lightning.modelcheckpoint.params.every_n_train_steps=2",
               "lightning.callbacks.image_logger.params.batch_frequency=2",
               "lightning.callbacks.record.target=tests.helpers.RecordKeys",
               f"lightning.callbacks.record.params.out_dir={tmp_path / 'keys'}",
               "lightning.callbacks.rundir.target=tests.helpers.RecordRunDir",
               f"lightning.callbacks.rundir.params.out_dir={tmp_path / 'keys'}", *extra]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    results = []
    for p in procs:
        out, _ = p.communicate(timeout=600)
        results.append(subprocess.CompletedProcess(p.args, p.returncode, out, ""))
    return results


def test_two_nodes_train_read_different_data_and_only_rank0_writes(tmp_path):
    """Node 1's clock is an hour ahead, so it names the run directory differently: it uses rank 0's name."""
    results = launch_two_nodes(tmp_path, [], skew_node1=True)
    for r in results:
        assert r.returncode == 0, r.stdout[-4000:]
    keys0 = (tmp_path / "keys/rank0.txt").read_text().split()
    keys1 = (tmp_path / "keys/rank1.txt").read_text().split()
    assert len(keys0) == len(keys1) == 4 * 4  # 4 steps x batch 4 on each rank
    # ranks read different shard streams (seeded by rank): the sample sequences differ
    assert keys0 != keys1 and all(k.count("/") == 0 for k in keys0)
    run0 = next((tmp_path / "logs0").iterdir())
    seen = [(tmp_path / f"keys/rundir{rank}.txt").read_text().split() for rank in (0, 1)]
    assert seen[0] == seen[1] == [str(run0), str(run0 / "checkpoints")], seen
    ckpt = torch.load(run0 / "checkpoints/last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 4
    assert list((run0 / "images/train").glob("*.png")) and list((run0 / "csv").rglob("metrics.csv"))
    # node 1 (global rank 1) writes no checkpoints, images or metrics
    written = [p for p in (tmp_path / "logs1").rglob("*") if p.is_file()] if (tmp_path / "logs1").exists() else []
    assert written == [], written


def test_two_nodes_with_sharded_optimizer_state_checkpoint_consolidated(tmp_path):
    results = launch_two_nodes(tmp_path, ["model.params.shard_optimizer_state=true"])
    for r in results:
        assert r.returncode == 0, r.stdout[-4000:]
    run0 = next((tmp_path / "logs0").iterdir())
    ckpt = torch.load(run0 / "checkpoints/last.ckpt", weights_only=False)
    n_params = sum(1 for k in ckpt["state_dict"] if k.startswith("model.diffusion_model."))
    state = ckpt["optimizer_states"][0]["state"]
    assert len(state) == n_params  # rank 0 saved the consolidated state of every UNet parameter
    assert all(float(s["exp_avg_sq"].abs().sum()) > 0 for s in state.values())
