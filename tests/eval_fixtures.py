"""Fixtures shared by the evaluation tests (tests/test_evaluate*.py): two tiny checkpoints, a folder of real
photos with captions, and random weight files in the layouts of the real metric networks. Session-scoped, so the
tests that use them build them once (tests/conftest.py makes them available)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Two tiny checkpoints with different (non-trivial) weights."""
    from tests.helpers import build_tiny

    d = tmp_path_factory.mktemp("ckpts")
    base = build_tiny("inpaint", use_ema=False).state_dict()
    paths = {}
    for seed, name in ((1, "a"), (2, "b")):
        g = torch.Generator().manual_seed(seed)
        sd = {k: v + 0.05 * torch.randn(v.shape, generator=g) if k.startswith("model.") else v
              for k, v in base.items()}
        paths[name] = d / f"{name}.ckpt"
        torch.save({"state_dict": sd}, paths[name])
    return paths


@pytest.fixture(scope="session")
def image_dir(tmp_path_factory) -> Path:
    from skimage import data

    d = tmp_path_factory.mktemp("images")
    Image.fromarray(data.astronaut()).resize((80, 96)).save(d / "astronaut.png")
    Image.fromarray(data.chelsea()).save(d / "cat.jpg", quality=95)
    (d / "cat.txt").write_text("a ginger cat\n")
    Image.fromarray(data.coffee()).save(d / "coffee.jpg", quality=95)
    (d / "coffee.txt").write_text("a cup of coffee\n")
    return d


@pytest.fixture(scope="session")
def weights(tmp_path_factory) -> dict[str, Path]:
    """Random weight files in the layouts of the real ones: FID Inception (torch-fidelity's names, 1008-way fc),
    torchvision AlexNet features, a tiny open_clip model. He-scaled convolutions keep the Inception features
    O(1) through 90 layers, so FIDs are far from round-off."""
    import open_clip
    import torchvision

    d = tmp_path_factory.mktemp("weights")
    g = torch.Generator().manual_seed(0)
    sd = {}
    layout = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False).state_dict()
    for k, v in layout.items():
        sd[k] = torch.randn(v.shape, generator=g) * math.sqrt(2.0 / v[0].numel()) if k.endswith("conv.weight") else v
    sd["fc.weight"], sd["fc.bias"] = torch.randn(1008, 2048, generator=g) * 0.01, torch.zeros(1008)
    torch.save(sd, d / "inception.pth")
    alex = torchvision.models.alexnet().state_dict()
    torch.save({k: v for k, v in alex.items() if k.startswith("features.")}, d / "alexnet.pth")
    cfg = json.loads((REPO / "configs/tiny/open_clip_tiny_text.json").read_text())
    cfg["vision_cfg"]["head_width"] = 16
    (d / "eval_tiny_clip.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(d / "eval_tiny_clip.json")
    torch.save(open_clip.create_model("eval_tiny_clip").state_dict(), d / "clip.pt")
    return {"inception": d / "inception.pth", "alexnet": d / "alexnet.pth", "clip": d / "clip.pt",
            "clip_config": d / "eval_tiny_clip.json"}


