"""``model.params.ckpt_path`` loads strictly: a missing or unexpected tensor in the UNet, VAE or text encoder is
one error line with the count and the first keys. Only the documented exceptions pass silently-but-logged: no EMA in
the file, the widened input conv, and prefixes named in ``allow_missing_prefixes``."""

from __future__ import annotations

import logging

import pytest
import torch

import main
from ldm.checkpoint import CheckpointError
from ldm.models.diffusion.schedule import NoiseSchedule
from tests.helpers import REPO, build_tiny

TINY = str(REPO / "configs/tiny/inpaint.yaml")


@pytest.fixture(scope="module")
def base_sd():
    """A tiny 4-channel text-to-image state dict (random, non-zero weights), with its EMA."""
    base = build_tiny("base")
    with torch.no_grad():
        for p in base.model.parameters():
            p.normal_(0, 0.05)
    base.copy_weights_to_ema()
    return {k: v.clone() for k, v in base.state_dict().items()}


def _save(tmp_path, sd, name="init.ckpt"):
    path = tmp_path / name
    torch.save({"state_dict": sd}, path)
    return path


def _without(sd, *prefixes):
    return {k: v for k, v in sd.items() if not k.startswith(prefixes)}


@pytest.mark.parametrize("part, key", [
    ("UNet", "model.diffusion_model.out.2.bias"),
    ("VAE", "first_stage_model.decoder.conv_out.bias"),
    ("text encoder", "cond_stage_model.model.ln_final.weight"),
])
def test_one_missing_tensor_is_an_error(tmp_path, base_sd, part, key):
    path = _save(tmp_path, {k: v for k, v in base_sd.items() if k != key})
    with pytest.raises(CheckpointError, match=rf"1 model tensors missing from the checkpoint \({key}\)"):
        build_tiny("inpaint", ckpt_path=str(path))


def test_no_unet_and_unrelated_files_name_the_counts(tmp_path, base_sd):
    n_unet = sum(k.startswith("model.diffusion_model.") for k in base_sd)
    no_unet = _save(tmp_path, _without(base_sd, "model.", "model_ema."), "no_unet.ckpt")
    with pytest.raises(CheckpointError, match=rf"{n_unet} model tensors missing .*\(model\.diffusion_model\."):
        build_tiny("inpaint", ckpt_path=str(no_unet))
    unrelated = _save(tmp_path, {"fc.weight": torch.ones(3, 3), "fc.bias": torch.ones(3)}, "other.ckpt")
    model = build_tiny("inpaint")  # a file without EMA may lack model_ema.* (then copied), and the schedule
    n_model = sum(not k.startswith("model_ema.") and k not in NoiseSchedule.buffer_names() for k in model.state_dict())
    with pytest.raises(CheckpointError) as info:
        build_tiny("inpaint", ckpt_path=str(unrelated))
    msg = str(info.value)
    assert f"{n_model} model tensors missing" in msg and "2 checkpoint tensors the model does not have" in msg
    assert "fc.bias, fc.weight" in msg or "fc.weight, fc.bias" in msg
    assert "\n" not in msg and "other.ckpt" in msg


def test_unexpected_tensor_is_an_error_unless_ignored(tmp_path, base_sd):
    path = _save(tmp_path, {**base_sd, "model.diffusion_model.surplus": torch.ones(2)})
    with pytest.raises(CheckpointError, match=r"1 checkpoint tensors the model does not have \(model\.diffusion_model\."
                                              r"surplus\)"):
        build_tiny("inpaint", ckpt_path=str(path))
    model = build_tiny("inpaint", ckpt_path=str(path), ignore_keys=["model.diffusion_model.surplus"])
    torch.testing.assert_close(model.model.diffusion_model.out[2].bias, base_sd["model.diffusion_model.out.2.bias"])


def test_documented_exceptions_load(tmp_path, base_sd, caplog):
    # no EMA in the file: the EMA starts from the loaded (and widened) weights
    model = build_tiny("inpaint", ckpt_path=str(_save(tmp_path, _without(base_sd, "model_ema."), "no_ema.ckpt")))
    assert torch.equal(model.model_ema.diffusion_modelout2bias, base_sd["model.diffusion_model.out.2.bias"])
    # an explicit partial load: the VAE may be missing and keeps its constructed weights (logged with a count)
    caplog.set_level(logging.INFO)
    n_vae = sum(k.startswith("first_stage_model.") for k in base_sd)
    torch.manual_seed(7)
    fresh_vae = build_tiny("inpaint").first_stage_model.state_dict()
    torch.manual_seed(7)
    partial = build_tiny("inpaint", ckpt_path=str(_save(tmp_path, _without(base_sd, "first_stage_model."), "p.ckpt")),
                         allow_missing_prefixes=["first_stage_model."])
    assert all(torch.equal(v, fresh_vae[k]) for k, v in partial.first_stage_model.state_dict().items())
    assert f"{n_vae} model tensors not in the checkpoint keep their initial values" in caplog.text
    torch.testing.assert_close(partial.model.diffusion_model.out[2].bias, base_sd["model.diffusion_model.out.2.bias"])


def test_main_stops_with_one_line_instead_of_training_from_scratch(tmp_path, base_sd, caplog):
    path = _save(tmp_path, _without(base_sd, "model.", "model_ema."), "no_unet.ckpt")
    rc = main.main(["--base", TINY, "--train", "-l", str(tmp_path / "logs"), f"model.params.ckpt_path={path}"])
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert rc == 2 and len(errors) == 1 and "model tensors missing" in errors[0] and "\n" not in errors[0]
    assert not list((tmp_path / "logs").rglob("*.ckpt"))  # nothing was trained
