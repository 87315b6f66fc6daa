"""Exact resume on real JPEG shards through ``main.py``: a run SIGKILLed right after a periodic checkpoint and
resumed with ``-r`` equals the run that never stopped. Both use 2 DataLoader workers per rank, the resampled
training stream and a shuffle buffer; they must see the same sample keys per rank and step, in the same order,
and end with bit-equal UNet, EMA and AdamW state. Once with one process, once with 2 ranks over gloo."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
N = 4  # the kill comes right after the periodic checkpoint at step N; both runs end at 2N
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    """The tiny inpainting model over 8 shards of real 64 px photos (JPEG), 2 workers, shuffle buffer 12."""
    from demo_data import demo_records, load_manifest
    from omegaconf import OmegaConf

    from ldm.data.shard_writer import write_shards

    root = tmp_path_factory.mktemp("exact_resume")
    write_shards(demo_records(load_manifest(), repeat=4, seed=0), root / "shards", samples_per_shard=5, size=64,
                 resize_mode="center_crop")
    cfg = OmegaConf.load(REPO / "configs/tiny/inpaint.yaml")
    crop = [{"target": "torchvision.transforms.RandomCrop", "params": {"size": 64}}]
    mask = {"target": "ldm.data.laion.AddMask", "params": {"mode": "256train", "p_drop": 0.25}}
    cfg.data = {"target": "ldm.data.laion.WebDataModuleFromConfig", "params": {
        "batch_size": 2, "num_workers": 2, "seed": 0,
        "train": {"shards": str(root / "shards" / "{00000..00007}.tar"), "shuffle": 12, "image_transforms": crop,
                  "postprocess": mask}}}
    path = root / "config.yaml"
    OmegaConf.save(cfg, path)
    return path


def _main(args: list[str], log: Path) -> int:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline",
           "OMP_NUM_THREADS": "1"}
    with open(log, "w") as out:  # a file, not a pipe: orphaned workers of a killed run must not hold it open
        return subprocess.run([sys.executable, "main.py", *args], cwd=REPO, env=env, stdout=out,
                              stderr=subprocess.STDOUT, timeout=600).returncode


def _run_dir(root: Path) -> Path:
    (run,) = [d for d in root.iterdir() if d.is_dir()]
    return run


@pytest.mark.parametrize("ranks", [1, 2])
def test_killed_after_a_checkpoint_and_resumed_equals_the_run_that_never_stopped(config, tmp_path, ranks):
    common = ["--base", str(config), "--train", "lightning.callbacks.image_logger.params.disabled=true",
              f"lightning.modelcheckpoint.params.every_n_train_steps={N}", f"lightning.trainer.max_steps={2 * N}",
              "lightning.callbacks.metrics_over_trainsteps_checkpoint.params.every_n_train_steps=1000",
              "lightning.callbacks.keys.target=tests.helpers.RecordKeys"]
    if ranks == 2:  # two processes forked by Lightning, joined by a gloo process group
        common += ["lightning.strategy=ddp_fork", "lightning.trainer.devices=2"]
    a, b = tmp_path / "a", tmp_path / "b"
    rc = _main([*common, "-l", str(a), f"lightning.callbacks.keys.params.out_dir={tmp_path / 'keys_a'}"],
               tmp_path / "a.log")
    assert rc == 0, (tmp_path / "a.log").read_text()[-3000:]
    kill = ["lightning.callbacks.kill.target=tests.helpers.KillBeforeStep", f"lightning.callbacks.kill.params.step={N}"]
    rc = _main([*common, *kill, "-l", str(b), f"lightning.callbacks.keys.params.out_dir={tmp_path / 'keys_b'}"],
               tmp_path / "b.log")
    run_b = _run_dir(b)
    assert rc != 0 and torch.load(run_b / "checkpoints/last.ckpt", weights_only=False)["global_step"] == N
    log = tmp_path / "resume.log"
    assert _main(["-r", str(run_b), "--train", "lightning.callbacks.kill=null"], log) == 0, log.read_text()[-3000:]
    assert "continuing from the saved position" in log.read_text() and "not sample-exact" not in log.read_text()

    keys_a = [(tmp_path / "keys_a" / f"rank{r}.txt").read_text().split() for r in range(ranks)]
    keys_b = [(tmp_path / "keys_b" / f"rank{r}.txt").read_text().split() for r in range(ranks)]
    for r in range(ranks):  # per rank and step, the same samples in the same order
        assert len(keys_a[r]) == 2 * N * 2
        assert keys_b[r] == keys_a[r], f"rank {r}"
    if ranks == 2:
        assert keys_a[0] != keys_a[1]  # each rank restored its own stream, not rank 0's

    ck_a = torch.load(_run_dir(a) / "checkpoints/last.ckpt", weights_only=False)
    ck_b = torch.load(run_b / "checkpoints/last.ckpt", weights_only=False)
    data_state = ck_b["WebDataModuleFromConfig"]
    assert len(data_state["ranks"]) == ranks and len(pickle.dumps(data_state)) < 8_000 * ranks  # small, per rank
    assert ck_a["global_step"] == ck_b["global_step"] == 2 * N
    sd_a, sd_b = ck_a["state_dict"], ck_b["state_dict"]
    unet = [k for k in sd_a if k.startswith("model.diffusion_model.")]
    ema = [k for k in sd_a if k.startswith("model_ema.")]
    assert unet and len(ema) == len(unet) + 2  # + num_updates and decay
    assert sd_a.keys() == sd_b.keys() and all(torch.equal(sd_a[k], sd_b[k]) for k in unet + ema)
    assert int(sd_b["model_ema.num_updates"]) == 2 * N
    opt_a, opt_b = ck_a["optimizer_states"][0]["state"], ck_b["optimizer_states"][0]["state"]
    assert opt_a.keys() == opt_b.keys() and len(opt_a) == len(unet)
    for i in opt_a:
        for name in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(opt_a[i][name], opt_b[i][name]), (i, name)
