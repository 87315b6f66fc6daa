"""Provenance and the numbers that must survive export: parameterization, scale factor, a float32 schedule.

Training checkpoints here are written the way Lightning writes them (``on_save_checkpoint`` fills the record);
tests/test_exact_resume.py checks the same record in files a real run wrote.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors import safe_open

from ldm import provenance
from ldm.inference import load_model
from ldm.models.diffusion.schedule import NoiseSchedule
from tests.helpers import REPO, build_tiny, load_script, tiny_config

export_script = load_script("export")
inpaint_script = load_script("inpaint")
evaluate_script = load_script("evaluate")
SCALE = float(torch.tensor(0.905))  # a scale_by_std run's learned factor, as float32 stores it


def training_checkpoint(path: Path, **params) -> Path:
    """A Lightning-style training checkpoint of the tiny inpainting model with non-trivial weights."""
    model = build_tiny("inpaint", **params)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
        if model.scale_by_std:
            model.scale_factor.fill_(SCALE)
    model.run_config = OmegaConf.to_container(tiny_config("inpaint", **params), resolve=True)
    ckpt = {"state_dict": model.state_dict(), "global_step": 11}
    model.on_save_checkpoint(ckpt)
    torch.save(ckpt, path)
    return path


def write_config(path: Path, drop: tuple[str, ...] = (), **params) -> str:
    cfg = tiny_config("inpaint", **params)
    for key in drop:
        cfg.model.params.pop(key)
    OmegaConf.save(cfg, path)
    return str(path)


@pytest.fixture(scope="module")
def v_ckpt(tmp_path_factory):
    return training_checkpoint(tmp_path_factory.mktemp("prov") / "last.ckpt")


def test_training_checkpoint_records_provenance(v_ckpt):
    ck = torch.load(v_ckpt, weights_only=True)  # plain types only
    rec = ck["provenance"]
    assert ck["parameterization"] == rec["parameterization"] == "v"
    assert rec["scale_factor"] == pytest.approx(0.18215)
    assert rec["unet_weights"] == "raw"  # model.diffusion_model.* are the trained weights; the EMA is model_ema.*
    assert rec["config"]["model"]["params"]["parameterization"] == "v"
    from importlib import metadata

    assert rec["package_version"] == metadata.version("sd2-inpaint")
    assert rec["git_revision"] == provenance.git_revision()
    import subprocess

    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:  # a checkout: the revision is HEAD's (+ "-dirty" with uncommitted changes)
        assert rec["git_revision"] in (head.stdout.strip(), head.stdout.strip() + "-dirty")


@pytest.mark.parametrize("script", ["export", "inpaint", "evaluate"])
def test_scripts_refuse_a_config_that_contradicts_the_checkpoint(v_ckpt, tmp_path, caplog, script):
    eps_cfg = write_config(tmp_path / "eps.yaml", parameterization="eps")
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (64, 64), (20, 200, 20)).save(images / "a.png")
    Image.new("L", (64, 64), 255).save(images / "a_mask.png")
    argv = {
        "export": ["--out", str(tmp_path / "x.safetensors")],
        "inpaint": ["--image", str(images / "a.png"), "--mask", str(images / "a_mask.png"), "--prompt", "",
                    "--outdir", str(tmp_path / "out"), "--steps", "2"],
        "evaluate": ["--images", str(images), "--size", "64", "--out", str(tmp_path / "eval"), "--steps", "2"],
    }[script]
    module = {"export": export_script, "inpaint": inpaint_script, "evaluate": evaluate_script}[script]
    rc = module.main(["--config", eps_cfg, "--ckpt", str(v_ckpt), *argv])
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert rc == 2 and len(errors) == 1, errors
    assert "trained with parameterization 'v' but the config says 'eps'" in errors[0]


def test_a_config_without_parameterization_takes_the_checkpoints(v_ckpt, tmp_path, caplog):
    # the official SD2 inference config states none (LatentDiffusion's default would be eps): with it, our v
    # checkpoints are sampled as v because they record it
    official = OmegaConf.load(REPO / "configs" / "stable-diffusion" / "v2-inpainting-inference.yaml")
    assert "parameterization" not in official.model.params
    silent = write_config(tmp_path / "silent.yaml", drop=("parameterization",))
    loaded = load_model(silent, v_ckpt, device="cpu")
    assert loaded.parameterization == loaded.model.parameterization == "v"
    assert export_script.main(["--config", silent, "--ckpt", str(v_ckpt), "--out", str(tmp_path / "e.ckpt"),
                               "--diffusers", str(tmp_path / "pipe")]) == 0
    exported = torch.load(tmp_path / "e.ckpt", weights_only=True)
    assert exported["parameterization"] == exported["provenance"]["parameterization"] == "v"
    sched = json.loads((tmp_path / "pipe" / "scheduler" / "scheduler_config.json").read_text())
    assert sched["prediction_type"] == "v_prediction"
    # the export keeps the training record and adds its own
    assert exported["provenance"]["config"]["model"]["params"]["parameterization"] == "v"
    assert exported["provenance"]["export"]["source"] == str(v_ckpt) and exported["provenance"]["export"]["ema"]
    # sampling with the silent config says where the parameterization came from, and records it
    from PIL import Image

    Image.new("RGB", (64, 64), (20, 200, 20)).save(tmp_path / "a.png")
    Image.new("L", (64, 64), 255).save(tmp_path / "a_mask.png")
    with caplog.at_level(logging.INFO):
        assert inpaint_script.main(["--config", silent, "--ckpt", str(v_ckpt), "--image", str(tmp_path / "a.png"),
                                    "--mask", str(tmp_path / "a_mask.png"), "--prompt", "", "--steps", "2",
                                    "--no-grid", "--out", str(tmp_path / "out")]) == 0
    assert "parameterization 'v' taken from the checkpoint" in caplog.text
    (png,) = (tmp_path / "out").glob("a_*.png")
    assert Image.open(png).text["parameterization"] == "v"


def test_diffusers_scaling_factor_is_the_learned_buffer(tmp_path):
    ckpt = training_checkpoint(tmp_path / "std.ckpt", scale_by_std=True, scale_factor=1.0)
    cfg = write_config(tmp_path / "std.yaml", scale_by_std=True, scale_factor=1.0)
    assert export_script.main(["--config", cfg, "--ckpt", str(ckpt), "--diffusers", str(tmp_path / "pipe"),
                               "--out", str(tmp_path / "std.safetensors")]) == 0
    vae = json.loads((tmp_path / "pipe" / "vae" / "config.json").read_text())
    assert vae["scaling_factor"] == SCALE  # not the config's 1.0
    with safe_open(str(tmp_path / "pipe" / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["provenance"])["scale_factor"] == SCALE
    assert provenance.read(tmp_path / "std.safetensors")["scale_factor"] == SCALE
    # a fixed-scale config must agree with the learned factor; a config that does not say takes it
    fixed = write_config(tmp_path / "fixed.yaml", scale_factor=0.18215)
    with pytest.raises(Exception, match="trained with scale_factor 0.9049"):
        load_model(fixed, ckpt, device="cpu")
    silent = write_config(tmp_path / "silent.yaml", drop=("scale_factor",))
    assert float(load_model(silent, ckpt, device="cpu").model.scale_factor) == SCALE


def test_fp16_export_casts_networks_only_and_sampling_uses_fp32_schedule(v_ckpt, tmp_path):
    cfg = str(REPO / "configs" / "tiny" / "inpaint.yaml")
    assert export_script.main(["--config", cfg, "--ckpt", str(v_ckpt), "--out", str(tmp_path / "h.ckpt"),
                               "--dtype", "fp16"]) == 0
    sd = torch.load(tmp_path / "h.ckpt", weights_only=True)["state_dict"]
    fp32 = build_tiny("inpaint").state_dict()
    schedule = NoiseSchedule.buffer_names()
    assert sd["model.diffusion_model.out.2.weight"].dtype == torch.float16
    assert sd["first_stage_model.decoder.conv_out.weight"].dtype == torch.float16
    for name in schedule:
        assert sd[name].dtype == torch.float32 and torch.equal(sd[name], fp32[name]), name
    # an older export that cast everything: the stored fp16 schedule is replaced by the config's float32 one
    legacy = {k: (v.half() if v.is_floating_point() else v) for k, v in sd.items()}
    torch.save({"state_dict": legacy, "parameterization": "v"}, tmp_path / "legacy.ckpt")
    for path in (tmp_path / "h.ckpt", tmp_path / "legacy.ckpt"):
        model = load_model(cfg, path, device="cpu").model
        assert model.alphas_cumprod.dtype == torch.float32 and torch.equal(model.alphas_cumprod, fp32["alphas_cumprod"])
    # DDIM's last step uses alphas_cumprod[0]: 0.99915 in float32, 0.99902 if the fp16 copy were used
    assert float(model.alphas_cumprod[0]) == pytest.approx(0.99915, abs=5e-6)
    assert float(legacy["alphas_cumprod"][0]) == pytest.approx(0.99902, abs=5e-6)
