"""Random-weight warnings come after all loading: one per sub-model that really stays random, none otherwise."""

from __future__ import annotations

import logging

import pytest
import torch

from ldm.modules.random_weights import random_submodules
from tests.helpers import REPO, build_tiny

LOGGER = "ldm.modules.random_weights"


def _random_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno >= logging.WARNING]


@pytest.fixture(scope="module")
def full_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "full.ckpt"
    torch.save({"state_dict": build_tiny("inpaint").state_dict()}, path)
    return path


def test_each_random_frozen_submodel_warns_once_and_the_trained_unet_is_info(caplog):
    with caplog.at_level(logging.INFO, logger=LOGGER):
        model = build_tiny("inpaint")
    warnings = _random_warnings(caplog)
    assert len(warnings) == 2
    assert sum(w.startswith("first_stage_model (AutoencoderKL) keeps RANDOMLY") for w in warnings) == 1
    assert sum(w.startswith("cond_stage_model (FrozenOpenCLIPEmbedder) keeps RANDOMLY") for w in warnings) == 1
    infos = [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.INFO]
    assert infos == ["model (DiffusionWrapper) starts from random weights (no model.params.ckpt_path) and is trained"]
    assert random_submodules(model) == {}  # reported: never again


def test_no_warning_when_ckpt_path_loads_every_tensor(full_ckpt, caplog):
    with caplog.at_level(logging.INFO, logger=LOGGER):
        model = build_tiny("inpaint", ckpt_path=str(full_ckpt))
    assert not [r for r in caplog.records if r.name == LOGGER]
    assert not [r for r in caplog.records if "RANDOMLY" in r.getMessage()]  # the text encoder said nothing early
    assert random_submodules(model) == {}


def test_a_checkpoint_without_the_frozen_models_leaves_them_random(full_ckpt, tmp_path, caplog):
    """A UNet-only file is a partial load (init is strict by default), so the run must name the prefixes it lets
    stay missing; the frozen VAE and text encoder then stay random and each says so once."""
    sd = torch.load(full_ckpt, weights_only=True)["state_dict"]
    unet_only = tmp_path / "unet.ckpt"
    torch.save({"state_dict": {k: v for k, v in sd.items() if k.startswith("model.")}}, unet_only)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        build_tiny("inpaint", ckpt_path=str(unet_only),
                   allow_missing_prefixes=["first_stage_model.", "cond_stage_model."])
    warnings = _random_warnings(caplog)
    assert len(warnings) == 2 and not [r for r in caplog.records if r.name == LOGGER and r.levelno == logging.INFO]


def test_sampling_loader_reports_nothing_for_a_complete_checkpoint(full_ckpt, caplog):
    from ldm.inference import load_model

    with caplog.at_level(logging.INFO, logger=LOGGER):
        load_model(REPO / "configs/tiny/inpaint.yaml", full_ckpt)
    assert not [r for r in caplog.records if r.name == LOGGER]
