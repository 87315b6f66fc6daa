"""Evaluation: pixel metrics against independent computations, FID / LPIPS / CLIP score against the libraries they
come from (random weights of the real layouts, from local files), the model-card protocol end to end with resume,
two gloo processes against one, and the in-training evaluation on a fixed held-out set."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.eval.data import fixed_masks, load_folder, load_shards
from ldm.eval.feature_metrics import (
    LPIPS,
    ClipScore,
    InceptionFeatures,
    MissingWeightsError,
    TorchvisionInceptionFeatures,
    frechet_distance,
)
from ldm.eval.metrics import PSNR_CAP, region_metrics
from tests.helpers import REPO, build_tiny, load_script

evaluate_script = load_script("evaluate")

CONFIG = str(REPO / "configs" / "tiny" / "inpaint.yaml")
MODES = ["lama-thin-256", "512train-large"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Two tiny checkpoints with different (non-trivial) weights."""
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


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    from skimage import data

    d = tmp_path_factory.mktemp("images")
    Image.fromarray(data.astronaut()).resize((80, 96)).save(d / "astronaut.png")
    Image.fromarray(data.chelsea()).save(d / "cat.jpg", quality=95)
    (d / "cat.txt").write_text("a ginger cat\n")
    Image.fromarray(data.coffee()).save(d / "coffee.jpg", quality=95)
    (d / "coffee.txt").write_text("a cup of coffee\n")
    return d


@pytest.fixture(scope="module")
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
    return {"inception": d / "inception.pth", "alexnet": d / "alexnet.pth", "clip": d / "clip.pt"}


def _rgb(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def _images(n: int, size: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


# ------------------------------------------------------------------------------------------- pixel metrics
def test_region_metrics_against_independent_formulas():
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(0)
    target = rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)
    pred = np.clip(target.astype(int) + rng.integers(-30, 31, target.shape), 0, 255).astype(np.uint8)
    mask = np.zeros((48, 40), np.float32)
    mask[10:30, 5:25] = 1  # >= 5 px from the border: the SSIM windows there need no padding
    pred[mask < 0.5] = target[mask < 0.5]  # known region untouched, as with paste-back
    m = region_metrics(pred, target, mask)
    diff = (pred.astype(np.float64) - target) / 255.0
    hole = mask == 1
    # torchmetrics' PSNR multiplies by a float32 10 / ln(10): float32 round-off
    assert m["psnr_hole"] == pytest.approx(10 * np.log10(1 / np.mean(diff[hole] ** 2)), rel=1e-7)
    assert m["l1_hole"] == pytest.approx(np.abs(diff[hole]).mean(), abs=1e-12)
    assert m["psnr_known"] == PSNR_CAP and m["l1_known"] == 0.0 and m["known_changed"] == 0.0
    _, smap = structural_similarity(pred / 255.0, target / 255.0, channel_axis=2, data_range=1.0, full=True,
                                    gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
    assert m["ssim_hole"] == pytest.approx(smap.mean(-1)[hole].mean(), abs=1e-9)
    assert m["ssim_hole"] < m["ssim_known"] < 1.0  # known windows near the hole still see changed pixels
    assert m["hole_fraction"] == pytest.approx(mask.mean())
    assert math.isnan(region_metrics(pred, target, np.ones_like(mask))["psnr_known"])  # empty region


# --------------------------------------------------------------------------------------- weight-file metrics
def test_fid_is_torchmetrics_fid_with_the_library_extractor(weights):
    import scipy.linalg
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    from torchmetrics.image.fid import FrechetInceptionDistance

    real, fake = _images(3, seed=1), _images(3, seed=2)
    pool3 = InceptionFeatures(weights["inception"])  # the standard 2048-d features: identical to the library's
    assert isinstance(pool3.net, FeatureExtractorInceptionV3) and not pool3.standard and pool3.column == "fid"
    lib = FrechetInceptionDistance(feature_extractor_weights_path=str(weights["inception"]), antialias=False)
    f_fake = pool3(fake)
    assert f_fake.shape == (3, 2048) and f_fake.std() > 1e-2
    assert np.array_equal(lib.inception(torch.from_numpy(fake).permute(0, 3, 1, 2)).double().numpy(), f_fake)
    # the FID value, on the 64-d features (the same code path; a 2048-d FID costs ~10 s of eigen-solver here)
    ours = InceptionFeatures(weights["inception"], dims=64)
    lib = FrechetInceptionDistance(feature=64, feature_extractor_weights_path=str(weights["inception"]),
                                   antialias=False)
    f_real, f_fake = ours(real), ours(fake)
    lib.update(torch.from_numpy(real).permute(0, 3, 1, 2), real=True)
    lib.update(torch.from_numpy(fake).permute(0, 3, 1, 2), real=False)
    fid = frechet_distance(f_fake, f_real)
    assert fid == pytest.approx(float(lib.compute()), rel=1e-6)
    (m1, s1), (m2, s2) = ((f.mean(0), np.cov(f, rowvar=False)) for f in (f_fake, f_real))
    independent = np.sum((m1 - m2) ** 2) + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    assert fid == pytest.approx(independent, rel=1e-6) and fid > 0


def test_lpips_is_the_v01_formula_with_the_given_backbone(weights):
    import torchmetrics
    import torchvision

    lpips = LPIPS(weights["alexnet"])
    a, b = _images(2, seed=3), _images(2, seed=4)
    d = lpips(a, b)
    # independent: torchvision AlexNet from the same file, relu1..5, unit-normalised channels, v0.1 heads
    features = torchvision.models.alexnet().features
    features.load_state_dict({k[9:]: v for k, v in torch.load(weights["alexnet"]).items()})
    heads = torch.load(Path(torchmetrics.__file__).parent / "functional/image/lpips_models/alex.pth",
                       map_location="cpu")
    shift, scale = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), torch.tensor([0.458, 0.448, 0.450])
    xa, xb = ((torch.from_numpy(x).permute(0, 3, 1, 2).float() / 127.5 - 1 - shift) / scale.view(1, 3, 1, 1)
              for x in (a, b))
    ref = torch.zeros(2)
    with torch.no_grad():
        for i, (start, stop) in enumerate(((0, 2), (2, 5), (5, 8), (8, 10), (10, 12))):  # relu1 .. relu5
            xa, xb = features[start:stop](xa), features[start:stop](xb)
            na, nb = (x / torch.sqrt((x**2).sum(1, keepdim=True) + 1e-8) for x in (xa, xb))
            ref += (((na - nb) ** 2) * heads[f"lin{i}.model.1.weight"]).sum(1).mean((1, 2))
    np.testing.assert_allclose(d, ref.double().numpy(), rtol=1e-5)
    assert np.allclose(lpips(a, a), 0.0) and (d > 0).all() and np.allclose(d, lpips(b, a))


def test_clip_score_is_100_times_clamped_cosine(weights):
    import open_clip

    images, captions = _images(4, seed=5), ["a cat", "a dog", "a red car", "the sea"]
    scores = ClipScore("eval_tiny_clip", weights["clip"])(images, captions)
    model, _, preprocess = open_clip.create_model_and_transforms("eval_tiny_clip", pretrained=str(weights["clip"]))
    with torch.no_grad():
        fi = model.encode_image(torch.stack([preprocess(Image.fromarray(x)) for x in images]))
        ft = model.encode_text(open_clip.get_tokenizer("eval_tiny_clip")(captions))
    cos = torch.nn.functional.cosine_similarity(fi, ft).double().numpy()
    np.testing.assert_allclose(scores, 100 * np.maximum(cos, 0), atol=1e-4)


def test_feature_metrics_need_weight_files(tmp_path):
    for build in (lambda: InceptionFeatures(None), lambda: TorchvisionInceptionFeatures(tmp_path / "x.pth"),
                  lambda: LPIPS(tmp_path / "alex.pth"), lambda: ClipScore("ViT-B-32", tmp_path / "nope.bin")):
        with pytest.raises(MissingWeightsError, match="docs/EVALUATION.md"):
            build()


# ------------------------------------------------------------------------------------------------ data
def test_held_out_readers_and_fixed_masks(image_dir, tmp_path):
    import webdataset as wds

    images = load_folder(image_dir, 64)
    assert [(im.key, im.caption, im.image.shape) for im in images] == [
        ("astronaut", "", (64, 64, 3)), ("cat", "a ginger cat", (64, 64, 3)),
        ("coffee", "a cup of coffee", (64, 64, 3))]
    with wds.TarWriter(str(tmp_path / "00000.tar")) as sink:
        for im in images:
            sink.write({"__key__": im.key, "png": Image.fromarray(im.image), "txt": im.caption})
    from_shards = load_shards(str(tmp_path / "00000.tar"), 64, limit=1)
    assert len(from_shards) == 1 and from_shards[0].key == "astronaut"
    assert np.array_equal(from_shards[0].image, images[0].image)  # already 64 x 64: no resampling
    a, b = fixed_masks("lama-thick-256", 3, 64, seed=0), fixed_masks("lama-thick-256", 3, 64, seed=0)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], a[1]) and all(m.mean() <= 0.5 for m in a)  # LaMa's max_tamper_area
