"""Fixtures shared by the inference tests (tests/test_inference.py, tests/test_inpaint_script.py): tiny inpainting
checkpoints with and without EMA (raw and EMA weights differ), a model loaded from one, and a real photo crop with a
mask. Session-scoped, so the two files build them once (tests/conftest.py makes them available)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.inference import load_model
from ldm.interop.ldm_format import save_ldm_checkpoint
from tests.helpers import REPO, build_tiny

CONFIG = str(REPO / "configs" / "tiny" / "inpaint.yaml")
UNET_KEY = "model.diffusion_model.out.2.weight"  # zero-initialised in a fresh UNet: perturbed below


def _perturbed_state_dict(seed: int) -> dict[str, torch.Tensor]:
    """Tiny inpainting state dict with non-trivial raw weights and a *different* EMA copy."""
    model = build_tiny("inpaint")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in [*model.parameters(), *(b for n, b in model.named_buffers() if n.startswith("model_ema.diffusion"))]:
            t.add_(torch.randn(t.shape, generator=g) * 0.05)
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="session")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("ckpts")
    sd = _perturbed_state_dict(0)
    no_ema = {k: v for k, v in sd.items() if not k.startswith("model_ema.")}
    base = dict(no_ema)
    base["model.diffusion_model.input_blocks.0.0.weight"] = sd["model.diffusion_model.input_blocks.0.0.weight"][:, :4]
    paths = {"ema": d / "with_ema.ckpt", "raw": d / "no_ema.ckpt", "base": d / "base.ckpt"}
    torch.save({"state_dict": sd, "global_step": 7}, paths["ema"])
    torch.save({"state_dict": no_ema}, paths["raw"])
    torch.save({"state_dict": base}, paths["base"])
    paths["eps"] = save_ldm_checkpoint(no_ema, d / "eps.safetensors", parameterization="eps")
    paths["junk"] = d / "notes.ckpt"
    paths["junk"].write_text("not a checkpoint")
    torch.save(sd, d / "sd.pt")
    paths["sd"] = d / "sd.pt"
    return paths


@pytest.fixture(scope="session")
def raw_model(ckpts):
    return load_model(CONFIG, ckpts["raw"], device="cpu").model


@pytest.fixture(scope="session")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    """A 40 x 52 photo crop (not a multiple of 64) and a mask with a white rectangle."""
    from skimage import data

    d = tmp_path_factory.mktemp("pair")
    img = data.astronaut()[100:140:1, 200:252]  # 40 x 52 x 3
    mask = np.zeros(img.shape[:2], np.uint8)
    mask[10:30, 15:40] = 255
    Image.fromarray(img).save(d / "astro.png")
    Image.fromarray(mask).save(d / "astro_mask.png")
    return d / "astro.png", d / "astro_mask.png"
