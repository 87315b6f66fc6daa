"""Export: official-layout .ckpt/.safetensors and diffusers folders, checked with diffusers/transformers as real
clients (offline) and the key maps checked against the full-size SD2 manifests."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from ldm.interop.diffusers_export import convert_to_diffusers, diffusers_configs
from ldm.interop.keymaps import KeyMapError, UNetLayout, unet_key, vae_key
from ldm.interop.ldm_format import PARAMETERIZATION_KEY, PROVENANCE_KEY, ema_key, read_parameterization
from tests.conftest import read_reference_tsv
from tests.helpers import REPO, build_tiny, load_script, tiny_config

export_script = load_script("export")

CONFIG = str(REPO / "configs" / "tiny" / "inpaint.yaml")




@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny inpainting checkpoint with non-trivial raw *and* EMA weights, exported every way."""
    d = tmp_path_factory.mktemp("export")
    model = build_tiny("inpaint")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # perturb everything, incl. the zero-initialised UNet output conv and the EMA copy
        for t in [*model.parameters(), *(b for n, b in model.named_buffers() if n.startswith("model_ema.diffusion"))]:
            t.add_(torch.randn(t.shape, generator=g) * 0.05)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    torch.save({"state_dict": sd, "global_step": 5}, d / "train.ckpt")
    argv = ["--config", CONFIG, "--ckpt", str(d / "train.ckpt")]
    assert export_script.main([*argv, "--out", str(d / "ema.safetensors"), "--diffusers", str(d / "pipe")]) == 0
    assert export_script.main([*argv, "--out", str(d / "raw.ckpt"), "--no-ema"]) == 0
    return {"dir": d, "sd": sd}


# ------------------------------------------------------------------------------------ official ldm layout
def test_exported_files_reload_strictly_with_ema_swapped_in(exported):
    d, sd = exported["dir"], exported["sd"]
    from safetensors.torch import load_file

    ema_file = load_file(str(d / "ema.safetensors"))
    raw_file = torch.load(d / "raw.ckpt", weights_only=True)
    assert set(raw_file) == {"state_dict", PARAMETERIZATION_KEY, PROVENANCE_KEY, "global_step"}
    assert raw_file["global_step"] == 5
    for name, flat in (("ema", ema_file), ("raw", raw_file["state_dict"])):
        assert not any(k.startswith("model_ema.") for k in flat)
        fresh = build_tiny("inpaint", use_ema=False)
        fresh.load_state_dict(flat, strict=True)  # raises on any missing or unexpected key
        unet = {k: v for k, v in flat.items() if k.startswith("model.diffusion_model.")}
        for k, v in unet.items():
            assert torch.equal(v, sd[ema_key(k)] if name == "ema" else sd[k]), k
        assert torch.equal(flat["first_stage_model.encoder.conv_in.weight"],
                           sd["first_stage_model.encoder.conv_in.weight"])
    assert read_parameterization(d / "ema.safetensors") == "v"
    assert read_parameterization(d / "raw.ckpt") == "v"


# ------------------------------------------------------------------------------------------ diffusers folder
def test_diffusers_folder_configs(exported):
    pipe_dir = exported["dir"] / "pipe"
    index = json.loads((pipe_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionInpaintPipeline"
    sched = json.loads((pipe_dir / "scheduler" / "scheduler_config.json").read_text())
    assert sched["prediction_type"] == "v_prediction"  # the tiny config trains with v (DECISIONS D1)
    assert (sched["steps_offset"], sched["set_alpha_to_one"], sched["beta_schedule"]) == (1, False, "scaled_linear")
    assert (sched["beta_start"], sched["beta_end"]) == (0.00085, 0.012)
    eps_cfg = tiny_config("inpaint", parameterization="eps").model
    assert diffusers_configs(eps_cfg)["scheduler/scheduler_config.json"]["prediction_type"] == "epsilon"


@pytest.fixture(scope="module")
def pipeline_and_model(exported):
    from diffusers import StableDiffusionInpaintPipeline

    from ldm.inference import load_model

    # low_cpu_mem_usage=False: what diffusers falls back to without `accelerate` (not a dependency here), said
    # explicitly so that it does not print its advice to install it
    pipe = StableDiffusionInpaintPipeline.from_pretrained(str(exported["dir"] / "pipe"), local_files_only=True,
                                                          low_cpu_mem_usage=False)
    ours = load_model(CONFIG, exported["dir"] / "ema.safetensors", device="cpu").model
    return pipe, ours


def test_diffusers_unet_vae_and_text_match_ours(pipeline_and_model):
    pipe, ours = pipeline_and_model
    g = torch.Generator().manual_seed(1)
    x, c_concat = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 8, 8, generator=g)
    t = torch.tensor([17, 801])
    prompts = ["a photo of a cat on a sofa", ""]
    with torch.no_grad():
        text = ours.get_learned_conditioning(prompts)
        ids = pipe.tokenizer(prompts, padding="max_length", max_length=77, truncation=True,
                             return_tensors="pt").input_ids
        assert torch.equal(ids, ours.cond_stage_model.tokenize(prompts))  # padded with 0 like open_clip
        theirs_text = pipe.text_encoder(ids)[0]
        ours_eps = ours.apply_model(x, t, {"c_concat": [c_concat], "c_crossattn": [text]})
        theirs_eps = pipe.unet(torch.cat([x, c_concat], dim=1), t, encoder_hidden_states=text).sample
        z = torch.randn(1, 4, 8, 8, generator=g)
        ours_img = ours.decode_first_stage(z)
        theirs_img = pipe.vae.decode(z / pipe.vae.config.scaling_factor).sample
    assert ours_eps.abs().mean() > 1e-2  # a non-trivial UNet output, so the comparison means something
    torch.testing.assert_close(theirs_eps, ours_eps, atol=1e-4, rtol=0)
    torch.testing.assert_close(theirs_text, text, atol=1e-4, rtol=0)
    torch.testing.assert_close(theirs_img, ours_img, atol=1e-4, rtol=0)


def test_diffusers_single_file_loader_agrees_with_our_conversion(exported, pipeline_and_model):
    """diffusers' own ldm converter (``from_single_file``) reading our exported .safetensors must produce exactly
    the weights our key maps wrote into the folder: an independent check of the maps."""
    from diffusers import StableDiffusionInpaintPipeline

    pipe, _ = pipeline_and_model
    single = StableDiffusionInpaintPipeline.from_single_file(
        str(exported["dir"] / "ema.safetensors"), config=str(exported["dir"] / "pipe"), local_files_only=True)
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(single, name).state_dict(), getattr(pipe, name).state_dict()
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), name


def test_diffusers_pipeline_two_step_inpaint(pipeline_and_model):
    pipe, _ = pipeline_and_model
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    out = pipe(prompt="a red ball", image=image, mask_image=Image.fromarray(mask), num_inference_steps=2,
               height=64, width=64, output_type="np", generator=torch.Generator().manual_seed(0))
    assert isinstance(out.images, np.ndarray) and out.images.shape == (1, 64, 64, 3)
    assert np.isfinite(out.images).all() and 0.0 <= out.images.min() and out.images.max() <= 1.0


# ----------------------------------------------------------------------------- full-size key maps (meta device)
def test_key_maps_match_full_size_diffusers_models():
    """Map every tensor of the SD2-inpainting manifest and compare with diffusers/transformers models built on
    the meta device from our own generated configs: same key set, same shapes."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    ref = read_reference_tsv("sd2-inpainting-keys.tsv")
    configs = diffusers_configs(OmegaConf.load(REPO / "configs/stable-diffusion/v2-inpainting-inference.yaml").model)
    converted = convert_to_diffusers({k: torch.empty(s, device="meta") for k, s in ref.items()}, configs)
    with torch.device("meta"):
        models = {
            "unet": UNet2DConditionModel.from_config(configs["unet/config.json"]),
            "vae": AutoencoderKL.from_config(configs["vae/config.json"]),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**configs["text_encoder/config.json"])),
        }
    for name, model in models.items():
        want = {k.removeprefix("text_model."): tuple(v.shape) for k, v in model.state_dict().items()
                if not k.endswith("position_ids")}
        got = {k.removeprefix("text_model."): tuple(v.shape) for k, v in converted[name].items()}
        assert got == want, (name, sorted(set(got) ^ set(want))[:5])
    assert configs["text_encoder/config.json"]["num_hidden_layers"] == 23  # penultimate of ViT-H's 24
    assert configs["unet/config.json"]["attention_head_dim"] == [5, 10, 20, 20]


def test_key_map_spot_checks_and_unknown_keys():
    sd2 = UNetLayout(num_levels=4, num_res_blocks=2)
    assert unet_key("input_blocks.0.0.weight", sd2) == "conv_in.weight"
    assert unet_key("input_blocks.3.0.op.weight", sd2) == "down_blocks.0.downsamplers.0.conv.weight"
    assert unet_key("input_blocks.4.0.skip_connection.bias", sd2) == "down_blocks.1.resnets.0.conv_shortcut.bias"
    assert unet_key("input_blocks.8.1.proj_in.weight", sd2) == "down_blocks.2.attentions.1.proj_in.weight"
    assert unet_key("middle_block.2.emb_layers.1.weight", sd2) == "mid_block.resnets.1.time_emb_proj.weight"
    assert unet_key("output_blocks.2.1.conv.weight", sd2) == "up_blocks.0.upsamplers.0.conv.weight"
    assert unet_key("output_blocks.5.2.conv.bias", sd2) == "up_blocks.1.upsamplers.0.conv.bias"
    assert unet_key("output_blocks.11.1.transformer_blocks.0.attn2.to_k.weight", sd2) == (
        "up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_k.weight")
    assert vae_key("decoder.up.0.block.2.nin_shortcut.weight", 4) == (
        "decoder.up_blocks.3.resnets.2.conv_shortcut.weight")
    assert vae_key("encoder.mid.attn_1.proj_out.bias", 4) == "encoder.mid_block.attentions.0.to_out.0.bias"
    with pytest.raises(KeyMapError, match="label_emb"):
        unet_key("label_emb.0.0.weight", sd2)
    with pytest.raises(KeyMapError):
        vae_key("encoder.down.1.attn.0.q.weight", 4)


# ------------------------------------------------------------------------------------- what exports record
def test_an_export_of_the_ema_says_so_when_loaded(exported, caplog):
    from ldm.checkpoint import CheckpointError
    from ldm.inference import load_model
    from ldm.provenance import read

    d, sd = exported["dir"], exported["sd"]
    assert read(d / "ema.safetensors")["unet_weights"] == "ema" and read(d / "ema.safetensors")["global_step"] == 5
    assert read(d / "raw.ckpt")["unet_weights"] == "raw"
    with caplog.at_level(logging.INFO):
        auto = load_model(CONFIG, d / "ema.safetensors", device="cpu")
    assert auto.used_ema is True and auto.global_step == 5 and "EMA weights already" in caplog.text
    assert "raw (non-EMA)" not in caplog.text and "(EMA weights" in caplog.text and "step 5)" in caplog.text
    asked = load_model(CONFIG, d / "ema.safetensors", use_ema=True, device="cpu")  # --ema just works
    key = "model.diffusion_model.out.2.weight"
    assert torch.equal(asked.model.state_dict()[key], sd[ema_key(key)])
    with pytest.raises(CheckpointError, match="holds only the EMA"):
        load_model(CONFIG, d / "ema.safetensors", use_ema=False, device="cpu")
    raw = load_model(CONFIG, d / "raw.ckpt", device="cpu")
    assert raw.used_ema is False and raw.global_step == 5
    with pytest.raises(CheckpointError, match="holds only the raw") as err:
        load_model(CONFIG, d / "raw.ckpt", use_ema=True, device="cpu")
    assert "export the EMA from the training checkpoint" not in str(err.value)  # it may be that checkpoint
    assert "use_ema: false" in str(err.value) and "exported with --no-ema" in str(err.value)
    from safetensors import safe_open

    with safe_open(str(d / "pipe" / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        record = json.loads(f.metadata()["provenance"])
    assert record["unet_weights"] == "ema" and record["global_step"] == 5


def test_export_never_overwrites_its_input_or_a_training_state(exported, tmp_path, caplog, monkeypatch):
    source = exported["dir"] / "train.ckpt"
    link = tmp_path / "link.ckpt"
    link.symlink_to(source)
    full = tmp_path / "last.ckpt"  # a resumable training checkpoint
    torch.save({"state_dict": {}, "optimizer_states": [], "lr_schedulers": [], "loops": {}, "global_step": 3}, full)
    earlier = tmp_path / "earlier.safetensors"
    earlier.write_bytes(b"an earlier export")
    folder = tmp_path / "pipe"  # an earlier export
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text("{}")
    other = tmp_path / "notes"  # a folder of something else, never replaced
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    (tmp_path / "a_file").write_text("")
    snapshot = {p: p.read_bytes() for p in (source, full, earlier)}

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the paths were checked")

    monkeypatch.setattr(export_script, "load_model", no_loading)
    cases = [
        (["--out", str(source)], "is the input checkpoint"),
        (["--out", str(link)], "is the input checkpoint"),
        (["--out", str(full), "--overwrite"], "resumable training checkpoint"),
        (["--out", str(earlier)], "--overwrite"),
        (["--out", str(tmp_path / "x.txt")], ".safetensors or .ckpt"),
        (["--diffusers", str(tmp_path / "a_file")], "not a folder"),
        (["--diffusers", str(folder)], "--overwrite"),
        (["--diffusers", str(other), "--overwrite"], "is not a diffusers pipeline"),
        (["--diffusers", str(other)], "is not a diffusers pipeline"),  # not "pass --overwrite": it would not help
        (["--out", str(tmp_path / "x.ckpt"), "--ckpt", str(tmp_path)], "is a directory"),
        (["--out", str(folder / "inner.safetensors"), "--diffusers", str(folder), "--overwrite"],
         "lies inside --diffusers"),
    ]
    for extra, expected in cases:
        ckpt = [] if "--ckpt" in extra else ["--ckpt", str(source)]
        caplog.clear()
        assert export_script.main(["--config", CONFIG, *ckpt, *extra]) == 2, extra
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1 and expected in errors[0], (extra, errors)
    assert all(p.read_bytes() == data for p, data in snapshot.items())
    assert (other / "keep.txt").read_text() == "mine"
    monkeypatch.undo()
    # --overwrite replaces an earlier export, atomically: no temp file or folder is left behind
    assert export_script.main(["--config", CONFIG, "--ckpt", str(source), "--out", str(earlier), "--overwrite",
                               "--diffusers", str(folder)]) == 0
    from safetensors.torch import load_file

    assert len(load_file(str(earlier))) > 100 and (folder / "model_index.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "earlier.safetensors", "last.ckpt", "link.ckpt",
                                                          "notes", "pipe"]
