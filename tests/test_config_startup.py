"""Mistakes that used to run silently or crash at step 1 stop at start-up with one line naming the key: ranges in
constructor signatures, caption-dropout entries, ImageLogger's log_images_kwargs, parts of the model that do not
fit together (channels, widths, conditioning key) and null sections."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import pytest
import torch

import main
from ldm.config_schema import NonNegativeInt, PositiveFloat, Probability, Range, check_value, describe_range
from ldm.models.diffusion.conditioning import check_caption_dropout
from ldm.models.diffusion.visualize import check_log_images_kwargs
from ldm.run import check_sections
from ldm.util import ConfigError, instantiate_from_config, load_config
from tests.helpers import REPO, load_script

TINY = REPO / "configs/tiny/inpaint.yaml"
SHARDS_CFG = REPO / "configs/tiny/inpaint_shards.yaml"


def _check(*overrides: str, base: Path = TINY) -> None:
    check_sections(load_config([base], overrides))


def _build(*overrides: str) -> torch.nn.Module:
    """The tiny model from a checked config, on the meta device (no weights: fast)."""
    cfg = load_config([TINY], overrides)
    check_sections(cfg)
    with torch.device("meta"):
        return instantiate_from_config(cfg.model, where="model")


def _one_error_line(caplog: pytest.LogCaptureFixture) -> str:
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "\n" not in errors[0], errors
    return errors[0]


def test_range_annotations():
    unit_open = Range(0, 1, hi_open=True)
    assert str(unit_open) == "in [0, 1)" and str(Range(0, lo_open=True)) == "> 0" and str(Range(1)) == ">= 1"
    assert check_value(1.0, Probability) is None and check_value(0, Probability) is None
    assert check_value(1.5, Probability) == "float in [0, 1]"
    assert check_value(float("nan"), Probability) == "float in [0, 1]"  # NaN is in no range
    assert check_value(0.0, PositiveFloat) == "float > 0" and check_value(1e-12, PositiveFloat) is None
    assert check_value(True, NonNegativeInt) == "int >= 0"  # the base type still decides first
    assert check_value(None, Probability | None) is None
    assert check_value(2, Probability | None) == "float in [0, 1] or null"
    assert check_value([0.9, 1.0], list[float]) is None
    assert check_value([0.9, 1.0], list[Annotated[float, unit_open]]) == "a list of float in [0, 1)"
    assert describe_range(Probability | None) == "in [0, 1]" and describe_range(int) == ""


@pytest.mark.parametrize("override, expected", [
    ("data.params.p_drop=2.0", "data.params.p_drop: expected float in [0, 1], got 2.0"),
    ("data.params.batch_size=0", "data.params.batch_size: expected int >= 1, got 0"),
    ("model.base_learning_rate=-1", "model.base_learning_rate: expected float > 0, got -1"),
    ("model.params.ucg_training.txt.p=1.5", "model.params.ucg_training.txt.p: expected float in [0, 1], got 1.5"),
    ("model.params.min_snr_gamma=0", "model.params.min_snr_gamma: expected float > 0 or null, got 0"),
    ("model.params.ema_decay=1.5", "model.params.ema_decay: expected float in [0, 1], got 1.5"),
    ("model.params.weight_decay=.nan", "model.params.weight_decay: expected float >= 0, got nan"),
    ("model.params.adam_betas=[0.9,1.0]",
     "model.params.adam_betas: expected a list of float in [0, 1), got [0.9, 1.0]"),
    ("model.params.linear_end=0", "model.params.linear_end: expected float in (0, 1), got 0"),
    ("model.params.scheduler_config.params.f_start=[-1]",
     "model.params.scheduler_config.params.f_start: expected a list of float >= 0, got [-1]"),
    ("model.params.unet_config.params.dropout=1.0",
     "model.params.unet_config.params.dropout: expected float in [0, 1)"),
    ("lightning.callbacks.image_logger.params.max_images=0",
     "lightning.callbacks.image_logger.params.max_images: expected int >= 1, got 0"),
    ("lightning.ddp_bucket_cap_mb=0", "lightning.ddp_bucket_cap_mb: expected int >= 1, got 0"),
])
def test_out_of_range_values_are_named(override, expected):
    with pytest.raises(ConfigError) as e:
        _check(override)
    assert expected in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("override, expected", [
    ("data.params.max_bad_fraction=1.5", "data.params.max_bad_fraction: expected float in [0, 1], got 1.5"),
    ("data.params.train.shuffle=-1", "data.params.train.shuffle: expected int >= 0, got -1"),
    ("data.params.train.postprocess.params.p_drop=1.2",
     "data.params.train.postprocess.params.p_drop: expected float in [0, 1], got 1.2"),
    ("data.params.max_aspect_ratio=0.5", "data.params.max_aspect_ratio: expected float >= 1 or null, got 0.5"),
])
def test_out_of_range_shard_values_are_named(override, expected):
    with pytest.raises(ConfigError) as e:
        _check("data.params.train.shards=/x/{0..1}.tar", override, base=SHARDS_CFG)
    assert expected in str(e.value)


# --------------------------------------------------------------------------------------- caption dropout
def test_caption_dropout_entries_are_checked():
    assert check_caption_dropout({"txt": {"p": 0.1}}, "txt") == {"txt": {"p": 0.1, "val": ""}}
    assert check_caption_dropout(None, "txt") == {}
    cases = [({"txt": {"prob": 0.1}}, r"^ucg_training\.txt\.prob: unknown key .*Valid keys: p, val"),
             ({"txt": {"val": ""}}, r"^ucg_training\.txt: 'CaptionDropout' needs the key\(s\) p"),  # p=0: drops nothing
             ({"txt": {"p": 1.5}}, r"^ucg_training\.txt\.p: expected float in \[0, 1\], got 1\.5"),
             ({"text": {"p": 0.1}}, r"^ucg_training\.text: caption dropout applies to the conditioning batch key, "
                                    r"cond_stage_key='txt'.*did you mean 'txt'")]
    for spec, message in cases:
        with pytest.raises(ConfigError, match=message):
            check_caption_dropout(spec, "txt")


def test_caption_dropout_mistakes_stop_the_config():
    with pytest.raises(ConfigError, match=r"^model\.params\.ucg_training\.txt\.prob: unknown key"):
        _check("~model.params.ucg_training.txt.p", "model.params.ucg_training.txt.prob=0.1")
    with pytest.raises(ConfigError, match=r"^model\.params\.ucg_training\.text: caption dropout applies to"):
        _build("model.params.ucg_training.text.p=0.1")
    assert _build().ucg_training == {"txt": {"p": 0.1, "val": ""}}


# --------------------------------------------------------------------------------------- log_images_kwargs
def test_log_images_kwargs_are_checked_against_log_images():
    check_log_images_kwargs({"N": 4, "ddim_steps": 5, "unconditional_guidance_scale": 3.0, "inpaint": True}, 1000)
    cases = [({"ddim_step": 5}, r"^log_images_kwargs\.ddim_step: unknown option \(did you mean 'ddim_steps'\?\)"),
             ({"ddim_steps": 0}, r"^log_images_kwargs\.ddim_steps: expected int >= 1, got 0"),
             ({"ddim_steps": 3}, r"^log_images_kwargs\.ddim_steps: ddim_num_steps=3 .*beyond the 1000-step"),
             ({"sampler": "dpmm"}, r"^log_images_kwargs\.sampler: sampler 'dpmm' is unknown"),
             ({"sampler": "dpm", "ddim_eta": 0.5}, r"^log_images_kwargs\.ddim_eta: .*deterministic"),
             ({"N": "four"}, r"^log_images_kwargs\.N: expected int >= 1, got 'four'")]
    for kwargs, message in cases:
        with pytest.raises(ConfigError, match=message):
            check_log_images_kwargs(kwargs, 1000)


# --------------------------------------------------------------------------------------- parts that must fit
@pytest.mark.parametrize("override, expected", [
    ("model.params.unet_config.params.in_channels=4",
     "model.params.unet_config.params.in_channels: 4, but with conditioning_key 'hybrid' the UNet input is noisy "
     "latent 4 + mask 'mask' 1 + masked-image latent 'masked_image' 4 = 9 channels; set in_channels: 9"),
    ("model.params.conditioning_key=crossattn",
     "model.params.conditioning_key: LatentInpaintDiffusion needs 'hybrid'"),
    ("model.params.channels=3", "model.params.channels: 3, but the VAE makes 4-channel latents"),
    ("model.params.unet_config.params.out_channels=8", "model.params.unet_config.params.out_channels: 8, but"),
    ("model.params.unet_config.params.context_dim=64",
     "model.params.unet_config.params.context_dim: 64, but the text encoder (cond_stage_config) returns 32-wide"),
    ("model.params.concat_keys=[mask,masked_image,extra]",
     "model.params.concat_keys: ['mask', 'masked_image', 'extra'] must be one mask key plus masked_image_key"),
    # built for real only in configure_optimizers / the training step: checked at construction too
    ("~model.params.scheduler_config.params.f_min",
     "model.params.scheduler_config.params: 'LambdaLinearScheduler' needs the key(s) f_min"),
    ("model.params.ucg_training.txt=null",
     "model.params.ucg_training.txt: expected a mapping {p: probability, val: replacement}, got None"),
])
def test_model_mistakes_are_named_at_construction(override, expected):
    with pytest.raises(ConfigError) as e:
        _build(override)
    assert str(e.value).startswith(expected) and "\n" not in str(e.value)


# --------------------------------------------------------------------------------------- the whole start-up
@pytest.mark.parametrize("override, expected", [
    ("model.params.unet_config.params.in_channels=4", "model.params.unet_config.params.in_channels: 4, but"),
    ("lightning.callbacks.image_logger.params.log_images_kwargs.ddim_step=5",
     "lightning.callbacks.image_logger.params.log_images_kwargs.ddim_step: unknown option (did you mean "
     "'ddim_steps'?)"),
    ("lightning.trainer=null", "lightning.trainer: expected a mapping, got null; to use the defaults delete the key"),
    ("lightning=null", "lightning: expected a mapping, got null"),
    ("data.params.p_drop=2.0", "data.params.p_drop: expected float in [0, 1], got 2.0"),
])
def test_main_stops_before_training(tmp_path, caplog, override, expected):
    assert main.main(["--base", str(TINY), "--train", "-l", str(tmp_path), override]) == 2
    assert expected in _one_error_line(caplog)
    assert not list(tmp_path.iterdir())  # nothing was written: no run directory


def test_check_config_names_null_params_and_log_images_typos(tmp_path, caplog):
    check_config = load_script("check_config")
    cfg = tmp_path / "x.yaml"
    cfg.write_text("model:\n  target: ldm.models.diffusion.ddpm.LatentDiffusion\n  params: null\n")
    assert check_config.main([str(cfg)]) == 2
    assert "model.params: 'LatentDiffusion' needs the key(s) unet_config" in _one_error_line(caplog)
    caplog.clear()
    assert check_config.main([str(TINY), "lightning.callbacks.image_logger.params.log_images_kwargs.N=0"]) == 2
    assert "lightning.callbacks.image_logger.params.log_images_kwargs.N: expected int >= 1" in _one_error_line(caplog)
