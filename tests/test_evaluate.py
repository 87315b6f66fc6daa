"""Evaluation: pixel metrics against independent computations, feature metrics from local weight files, the
held-out set readers, and scripts/evaluate.py end to end on two tiny checkpoints."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.eval.data import fixed_masks, load_folder, load_shards
from ldm.eval.feature_metrics import LPIPS, ClipScore, InceptionFeatures, MissingWeightsError
from ldm.eval.metrics import PSNR_CAP, frechet_distance, gaussian_stats, region_metrics
from ldm.eval.run import CheckpointSpec, FeatureMetrics, evaluate_checkpoint
from ldm.inference import SamplingOptions
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
    return d


def _rgb(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


# ------------------------------------------------------------------------------------------- pixel metrics
def test_region_metrics_against_independent_formulas():
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(0)
    target = rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)
    pred = np.clip(target.astype(int) + rng.integers(-30, 31, target.shape), 0, 255).astype(np.uint8)
    mask = np.zeros((48, 40), np.float32)
    mask[10:30, 5:25] = 1
    pred[mask < 0.5] = target[mask < 0.5]  # known region untouched, as with paste-back
    m = region_metrics(pred, target, mask)
    diff = (pred.astype(np.float64) - target) / 255.0
    assert m["psnr_hole"] == pytest.approx(10 * np.log10(1 / np.mean(diff[mask == 1] ** 2)), abs=1e-9)
    assert m["l1_hole"] == pytest.approx(np.abs(diff[mask == 1]).mean(), abs=1e-12)
    assert m["psnr_known"] == PSNR_CAP and m["l1_known"] == 0.0 and m["known_changed"] == 0.0
    assert m["ssim_hole"] < m["ssim_known"] < 1.0  # known windows near the hole still see changed pixels
    ref = structural_similarity(pred / 255.0, target / 255.0, channel_axis=2, data_range=1.0,
                                gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
    assert m["ssim"] == pytest.approx(ref, abs=1e-9)
    assert m["hole_fraction"] == pytest.approx(mask.mean())


def test_frechet_distance_matches_scipy_sqrtm():
    import scipy.linalg

    rng = np.random.default_rng(1)
    f1, f2 = rng.normal(size=(64, 6)), rng.normal(size=(80, 6)) @ rng.normal(size=(6, 6)) + 0.3
    (m1, s1), (m2, s2) = gaussian_stats(f1), gaussian_stats(f2)
    ref = np.sum((m1 - m2) ** 2) + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(ref, rel=1e-8)
    assert frechet_distance(m1, s1, m1, s1) == pytest.approx(0.0, abs=1e-8)


# --------------------------------------------------------------------------------------- weight-file metrics
def test_feature_metrics_need_weight_files(tmp_path):
    for build in (lambda: InceptionFeatures(None), lambda: LPIPS(tmp_path / "alex.pth", None),
                  lambda: ClipScore("ViT-B-32", tmp_path / "nope.bin")):
        with pytest.raises(MissingWeightsError, match="docs/EVALUATION.md"):
            build()


def test_lpips_and_clip_score_from_local_files(tmp_path):
    import open_clip
    import torchvision

    alex = torchvision.models.alexnet().state_dict()
    torch.save({k: v for k, v in alex.items() if k.startswith("features.")}, tmp_path / "alex.pth")
    g = torch.Generator().manual_seed(0)
    torch.save({f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1, generator=g)
                for i, c in enumerate((64, 192, 384, 256, 256))}, tmp_path / "heads.pth")
    lpips = LPIPS(tmp_path / "alex.pth", tmp_path / "heads.pth")
    rng = np.random.default_rng(0)
    a, b = (rng.integers(0, 256, (2, 64, 64, 3), dtype=np.uint8) for _ in range(2))
    assert np.allclose(lpips(a, a), 0.0)
    d = lpips(a, b)
    assert d.shape == (2,) and (d > 0).all()
    assert np.allclose(d, lpips(b, a)) and np.allclose(d[1:], lpips(a[1:], b[1:]))  # symmetric, per pair

    cfg = json.loads((REPO / "configs/tiny/open_clip_tiny_text.json").read_text())
    cfg["vision_cfg"]["head_width"] = 16
    (tmp_path / "eval_tiny_clip.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / "eval_tiny_clip.json")
    torch.save(open_clip.create_model("eval_tiny_clip").state_dict(), tmp_path / "clip.pt")
    scores = ClipScore("eval_tiny_clip", tmp_path / "clip.pt")(a, ["a cat", "a dog"])
    assert scores.shape == (2,) and ((scores >= 0) & (scores <= 100)).all()


@pytest.mark.slow  # four Inception-v3 passes at 299 px on CPU
def test_fid_runs_with_an_inception_file(checkpoints, image_dir, tmp_path):
    import torchvision

    torch.save(torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False).state_dict(),
               tmp_path / "inception.pth")
    feats = FeatureMetrics(inception=InceptionFeatures(tmp_path / "inception.pth"))
    images = load_folder(image_dir, 64)
    masks = {"lama-thin-256": fixed_masks("lama-thin-256", len(images), 64)}
    result = evaluate_checkpoint(CheckpointSpec("a", CONFIG, str(checkpoints["a"])), images, masks,
                                 SamplingOptions(steps=2, scale=3.0), tmp_path / "out", feats=feats)
    fid = result["modes"]["lama-thin-256"]["fid"]
    assert np.isfinite(fid) and fid > 0


# ------------------------------------------------------------------------------------------------ data
def test_held_out_readers_and_fixed_masks(image_dir, tmp_path):
    import webdataset as wds

    images = load_folder(image_dir, 64)
    assert [(im.key, im.caption, im.image.shape) for im in images] == [
        ("astronaut", "", (64, 64, 3)), ("cat", "a ginger cat", (64, 64, 3))]
    with wds.TarWriter(str(tmp_path / "00000.tar")) as sink:
        for im in images:
            sink.write({"__key__": im.key, "png": Image.fromarray(im.image), "txt": im.caption})
    from_shards = load_shards(str(tmp_path / "00000.tar"), 64, limit=1)
    assert len(from_shards) == 1 and from_shards[0].key == "astronaut"
    assert np.array_equal(from_shards[0].image, images[0].image)  # already 64 x 64: no resampling
    a, b = fixed_masks("lama-thick-256", 3, 64, seed=0), fixed_masks("lama-thick-256", 3, 64, seed=0)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], a[1]) and all(m.mean() <= 0.5 for m in a)  # LaMa's max_tamper_area


# ------------------------------------------------------------------------------------------ the script
def test_evaluate_script_two_checkpoints(checkpoints, image_dir, tmp_path):
    out = tmp_path / "eval"
    rc = evaluate_script.main(["--config", CONFIG, "--ckpt", str(checkpoints["a"]), "--ckpt", f"b={checkpoints['b']}",
                               "--images", str(image_dir), "--size", "64", "--masks", *MODES, "--out", str(out),
                               "--steps", "2", "--scale", "3"])
    assert rc == 0
    results = {name: json.loads((out / f"{name}.json").read_text()) for name in ("a", "b")}
    for name, res in results.items():
        assert set(res["modes"]) == set(MODES) and len(res["samples"]) == 2 * len(MODES)
        for s in res["samples"]:  # masked PSNR recomputed independently from the PNGs on disk
            gt = _rgb(out / "inputs" / f"{s['key']}.png").astype(np.float64) / 255
            pred = _rgb(out / "samples" / name / f"{s['key']}_{s['mode']}.png").astype(np.float64) / 255
            hole = np.asarray(Image.open(out / "masks" / f"{s['key']}_{s['mode']}.png")) >= 128
            assert s["psnr_hole"] == pytest.approx(10 * np.log10(1 / np.mean((pred - gt)[hole] ** 2)), abs=1e-9)
        for mode in MODES:
            rows = [s["psnr_hole"] for s in res["samples"] if s["mode"] == mode]
            assert res["modes"][mode]["psnr_hole"] == pytest.approx(np.mean(rows))
    # same masks for both checkpoints, different weights -> different outputs
    coverage = {name: [s["hole_fraction"] for s in res["samples"]] for name, res in results.items()}
    assert coverage["a"] == coverage["b"]
    assert results["a"]["samples"][0]["psnr_hole"] != results["b"]["samples"][0]["psnr_hole"]

    with (out / "comparison.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [(r["mask"], r["checkpoint"]) for r in table] == [(m, c) for m in MODES for c in ("a", "b")]
    assert float(table[0]["psnr_hole"]) == pytest.approx(results["a"]["modes"][MODES[0]]["psnr_hole"])
    md = (out / "comparison.md").read_text().splitlines()
    assert len(md) == 2 + 4 and "psnr_hole" in md[0]
    grid = _rgb(out / "grids" / f"cat_{MODES[0]}.png")
    assert grid.shape == (64 + 4, 5 * (64 + 2) + 2, 3)  # input | mask | masked input | a | b


def test_evaluate_script_rejects_bad_arguments(checkpoints, image_dir, tmp_path):
    base = ["--config", CONFIG, "--images", str(image_dir), "--out", str(tmp_path / "o"), "--size", "64"]
    assert evaluate_script.main([*base, "--ckpt", str(checkpoints["a"]), "--ckpt", str(checkpoints["a"])]) == 2
    assert evaluate_script.main([*base, "--ckpt", str(checkpoints["a"]), "--ckpt-config", f"zzz={CONFIG}"]) == 2
    assert evaluate_script.main([*base[:-1], "100", "--ckpt", str(checkpoints["a"])]) == 2
