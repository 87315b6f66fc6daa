"""Evaluation: pixel metrics against independent computations, FID / LPIPS / CLIP score against the libraries they
come from (random weights of the real layouts, from local files), the model-card protocol end to end with resume,
two gloo processes against one, and the in-training evaluation on a fixed held-out set."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import subprocess
import sys
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
from tests.helpers import REPO, build_tiny, load_script, synthetic_batch

evaluate_script = load_script("evaluate")

CONFIG = str(REPO / "configs" / "tiny" / "inpaint.yaml")

MODES = ["lama-thin-256", "512train-large"]


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


# ------------------------------------------------------------------------------------------ the script
def _cell(grid: np.ndarray, rows: int, cols: int, i: int, j: int, size: int = 64, pad: int = 2) -> np.ndarray:
    """Cell (i, j) of a labelled grid of ``rows x cols`` cells: the header band and row-label band are what is
    left above and to the left of the tiled body."""
    top, left = grid.shape[0] - (rows * (size + pad) + pad), grid.shape[1] - (cols * (size + pad) + pad)
    y, x = top + pad + i * (size + pad), left + pad + j * (size + pad)
    return grid[y : y + size, x : x + size]


def test_model_card_protocol_two_checkpoints_resumes(checkpoints, image_dir, weights, tmp_path, caplog):
    out = tmp_path / "eval"
    argv = ["--config", CONFIG, "--ckpt", str(checkpoints["a"]), "--ckpt", f"b={checkpoints['b']}", "--images",
            str(image_dir), "--num-images", "2", "--size", "64", "--masks", *MODES, "--out", str(out), "--steps",
            "2", "--scales", "2", "5", "--lpips-alexnet", str(weights["alexnet"]), "--clip-arch", "eval_tiny_clip",
            "--clip-weights", str(weights["clip"]), "--grid-images", "1"]
    assert evaluate_script.main(argv) == 0
    results = {name: json.loads((out / f"{name}.json").read_text()) for name in ("a", "b")}
    for res in results.values():
        assert res["sampling"]["steps"] == res["sampling"]["steps_run"] == 2  # asked for, and really run
        assert res["samples_drawn"] == 8 and [(g["scale"], g["mask"]) for g in res["groups"]] == [
            (s, m) for s in (2.0, 5.0) for m in MODES]
        for s in res["samples"]:  # masked PSNR recomputed independently from the PNGs on disk
            gt = _rgb(out / "inputs" / f"{s['key']}.png").astype(np.float64) / 255
            png = out / "samples" / res["run"] / f"scale_{s['scale']:g}" / s["mask"] / f"{s['key']}_seed{s['seed']}.png"
            pred = _rgb(png).astype(np.float64) / 255
            hole = np.asarray(Image.open(out / "masks" / f"{s['key']}_{s['mask']}.png")) >= 128
            assert s["psnr_hole"] == pytest.approx(10 * np.log10(1 / np.mean((pred - gt)[hole] ** 2)), rel=1e-7)
            assert (s["clip_score"] is None) == (s["key"] == "astronaut")  # no caption, no CLIP score
        for g in res["groups"]:
            rows = [s for s in res["samples"] if (s["scale"], s["mask"]) == (g["scale"], g["mask"])]
            assert g["psnr_hole"] == pytest.approx(np.mean([s["psnr_hole"] for s in rows]))
            assert g["lpips"] == pytest.approx(np.mean([s["lpips"] for s in rows])) and g["lpips"] > 0
    # the same seeds and masks for both checkpoints and all scales; other weights or scale -> other pixels
    seeds = {name: [(s["key"], s["mask"], s["seed"], s["hole_fraction"]) for s in res["samples"]]
             for name, res in results.items()}
    assert seeds["a"] == seeds["b"] and results["a"]["run"] != results["b"]["run"]
    assert results["a"]["samples"][0]["psnr_hole"] != results["b"]["samples"][0]["psnr_hole"]

    with (out / "comparison.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [(r["mask"], r["checkpoint"], float(r["scale"])) for r in table] == [
        (m, c, s) for m in MODES for c in ("a", "b") for s in (2.0, 5.0)]
    assert float(table[1]["lpips"]) == pytest.approx(results["a"]["groups"][2]["lpips"])  # (mask 0, a, scale 5)
    md = (out / "comparison.md").read_text().splitlines()
    assert len(md) == 2 + 8 + 2 and md[-1] == "Held-out set: 2 images evaluated; none skipped while reading."
    assert results["a"]["input_skips"] == {"read": 2, "skipped": 0, "by_reason": {}, "listed": [], "unlisted": 0}
    grid = _rgb(out / "grids" / f"astronaut_{MODES[0]}.png")  # rows a, b; input | mask | masked | scale 2 | 5
    seed = results["b"]["samples"][0]["seed"]
    b_scale5 = out / "samples" / results["b"]["run"] / "scale_5" / MODES[0] / f"astronaut_seed{seed}.png"
    assert np.array_equal(_cell(grid, 2, 5, 1, 4), _rgb(b_scale5))
    assert np.array_equal(_cell(grid, 2, 5, 0, 0), _rgb(out / "inputs" / "astronaut.png"))
    assert (grid[:10] < 128).any()  # the header band holds text
    assert not (out / "curves").exists() and "no FID-vs-CLIP plot" in caplog.text  # no --inception given

    # a killed run: one sample never written; the rerun draws only that one and reproduces every number
    b_scale5.unlink()
    caplog.clear()
    assert evaluate_script.main(argv) == 0
    again = {name: json.loads((out / f"{name}.json").read_text()) for name in ("a", "b")}
    assert (again["a"]["samples_drawn"], again["b"]["samples_drawn"], again["b"]["samples_reused"]) == (0, 1, 7)
    for name in ("a", "b"):
        for g1, g2 in zip(again[name]["groups"], results[name]["groups"]):
            assert {k: (g1[k], g2[k]) for k in g1 if g1[k] != g2[k]} == {}
    assert not list(out.rglob("*.tmp"))


def test_fid_vs_clip_curves_one_png_per_preset(tmp_path):
    from ldm.eval.report import write_curves

    groups = [{"mask": m, "scale": s, "fid": 10 + s, "clip_score": 20 + s} for m in MODES for s in (1.5, 4.0, 8.0)]
    results = [{"name": "a", "groups": groups}, {"name": "b", "groups": [{**g, "fid": g["fid"] + 3} for g in groups]}]
    paths = write_curves(results, tmp_path)
    assert [p.name for p in paths] == [f"fid_vs_clip_{m}.png" for m in MODES]
    img = _rgb(paths[0])
    assert img.shape[0] > 300 and len(np.unique(img.reshape(-1, 3), axis=0)) > 10  # two coloured lines, labels


@pytest.mark.slow  # two torchrun workers: process start-up and imports dominate
def test_torchrun_two_gloo_processes_equal_one(checkpoints, image_dir, weights, tmp_path):
    args = ["--config", CONFIG, "--ckpt", f"a={checkpoints['a']}", "--images", str(image_dir), "--size", "64",
            "--masks", "lama-thin-256", "--steps", "2", "--scales", "2", "5", "--device", "cpu", "--inception",
            str(weights["inception"]), "--fid-dims", "64", "--lpips-alexnet", str(weights["alexnet"]),
            "--clip-arch", str(weights["clip_config"]), "--clip-weights", str(weights["clip"])]
    assert evaluate_script.main([*args, "--out", str(tmp_path / "one")]) == 0
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                        str(REPO / "scripts" / "evaluate.py"), *args, "--out", str(tmp_path / "two")],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    one, two = (json.loads((tmp_path / d / "a.json").read_text()) for d in ("one", "two"))
    assert two["samples_drawn"] == 6 and len(two["samples"]) == 6  # 3 images (2 + 1 per rank) x 2 scales
    assert two["samples"] == one["samples"]  # exact: same pixels, same order
    for g1, g2 in zip(one["groups"], two["groups"]):
        assert g1["fid_64d"] > 0 and g2["fid_64d"] == pytest.approx(g1["fid_64d"], rel=1e-6)
        assert {k: v for k, v in g1.items() if k != "fid_64d"} == {k: v for k, v in g2.items() if k != "fid_64d"}
    for d in ("one", "two"):  # FID (here its 64-d variant) against CLIP score, a point per scale
        assert (tmp_path / d / "curves" / "fid_vs_clip_lama-thin-256.png").is_file()


def test_evaluate_script_rejects_bad_arguments(checkpoints, image_dir, tmp_path, caplog):
    base = ["--config", CONFIG, "--images", str(image_dir), "--out", str(tmp_path / "o"), "--masks",
            "lama-thin-256", "--steps", "1", "--num-images", "1", "--size", "64"]
    a = str(checkpoints["a"])
    assert evaluate_script.main([*base, "--ckpt", a, "--ckpt", a]) == 2
    assert evaluate_script.main([*base, "--ckpt", a, "--ckpt-config", f"zzz={CONFIG}"]) == 2
    assert evaluate_script.main([*base[:-1], "100", "--ckpt", a]) == 2
    assert evaluate_script.main([*base, "--ckpt", a, "--masks", "no-such-preset"]) == 2
    assert evaluate_script.main([*base, "--ckpt", str(tmp_path / "missing.ckpt")]) == 2
    assert "checkpoint not found" in caplog.text and "missing.ckpt" in caplog.text  # checked before loading
    assert evaluate_script.main([*base, "--ckpt", a, "--inception", str(tmp_path / "nope.pth")]) == 2
    # the same --out with other masks: refused instead of mixing two held-out sets
    assert evaluate_script.main([*base, "--ckpt", a, "--scales", "3"]) == 0
    caplog.clear()
    assert evaluate_script.main([*base, "--ckpt", a, "--seed", "1"]) == 2
    assert "another held-out set" in caplog.text and "Traceback" not in caplog.text


def test_skipped_held_out_samples_are_in_the_results(checkpoints, tmp_path):
    """A shard set with a corrupt JPEG and a non-UTF-8 caption: both are counted by reason and named (shard and key)
    in every checkpoint's JSON and under the Markdown table, next to the number of images actually evaluated."""
    import webdataset as wds
    from skimage import data

    def jpeg(array: np.ndarray) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(array).resize((80, 64)).save(buf, format="JPEG", quality=90)
        return buf.getvalue()

    shards = tmp_path / "shards"
    shards.mkdir()
    with wds.TarWriter(str(shards / "00000.tar")) as sink:
        sink.write({"__key__": "cat", "jpg": jpeg(data.chelsea()), "txt": b"a ginger cat"})
        sink.write({"__key__": "broken", "jpg": jpeg(data.coffee())[:300], "txt": b"a cut-off file"})
    with wds.TarWriter(str(shards / "00001.tar")) as sink:
        sink.write({"__key__": "latin1", "jpg": jpeg(data.astronaut()), "txt": "caf\xe9 na\xefve".encode("latin-1")})
        sink.write({"__key__": "coffee", "jpg": jpeg(data.coffee()), "txt": b"a cup of coffee"})
    out = tmp_path / "eval"
    argv = ["--config", CONFIG, "--ckpt", f"a={checkpoints['a']}", "--ckpt", f"b={checkpoints['b']}", "--shards",
            str(shards / "{00000..00001}.tar"), "--size", "64", "--masks", "lama-thin-256", "--steps", "1",
            "--scales", "2", "--out", str(out), "--grid-images", "0"]
    assert evaluate_script.main(argv) == 0
    for name in ("a", "b"):
        res = json.loads((out / f"{name}.json").read_text())
        assert res["num_images"] == 2 and sorted(s["key"] for s in res["samples"]) == ["cat", "coffee"]
        skips = res["input_skips"]
        assert (skips["read"], skips["skipped"], skips["unlisted"]) == (2, 2, 0)
        assert skips["by_reason"] == {"bad_caption": 1, "corrupt_image": 1}
        named = [(Path(i["source"]).name, i["reason"], i["detail"].split(":")[0]) for i in skips["listed"]]
        assert named == [("00000.tar", "corrupt_image", "broken"), ("00001.tar", "bad_caption", "latin1")]
    footer = (out / "comparison.md").read_text().split("\n\n", 1)[1]
    assert footer.startswith("Held-out set: 2 images evaluated; **2 skipped** while reading (bad_caption 1, "
                             "corrupt_image 1):")
    assert "`00000.tar` corrupt_image: broken:" in footer and "`00001.tar` bad_caption: latin1:" in footer
    with (out / "comparison.csv").open() as f:  # the CSV stays one clean table
        assert len(list(csv.DictReader(f))) == 2


# --------------------------------------------------------------------------------- in-training evaluation
class _Batches(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, i):
        return synthetic_batch(2, seed=i)


def _validation_shard(image_dir: Path, tmp_path: Path) -> str:
    """The held-out images as one validation shard (what the callback builds its default set from)."""
    import webdataset as wds

    path = tmp_path / "val-00000.tar"
    with wds.TarWriter(str(path)) as sink:
        for im in load_folder(image_dir, 64):
            sink.write({"__key__": im.key, "png": Image.fromarray(im.image), "txt": im.caption or "a photo"})
    return str(path)


def test_heldout_evaluation_logs_non_finite_weights_as_an_error_and_goes_on(image_dir, tmp_path, caplog):
    # Only rank 0 evaluates: raising would leave the other ranks of a multi-node run waiting, and clamping would
    # log black images. The weights that sample NaN get an error line and a metric; the others are evaluated.
    import logging

    import pytorch_lightning as pl
    from pytorch_lightning.loggers import CSVLogger

    from ldm.eval.callback import HeldOutEvaluation

    cb = HeldOutEvaluation(str(tmp_path / "heldout"), every_n_steps=1, shards=_validation_shard(image_dir, tmp_path),
                           num_images=2, size=64, steps=2, scale=3.0, logdir=str(tmp_path / "run"))
    model = build_tiny("inpaint")
    with torch.no_grad():  # the raw UNet overflows; its EMA copy is untouched
        model.model.diffusion_model.out[-1].bias.fill_(float("inf"))
    trainer = pl.Trainer(max_steps=1, accelerator="cpu", logger=CSVLogger(tmp_path / "run", name="csv"),
                         enable_progress_bar=False, enable_model_summary=False)
    cb.setup(trainer, model, "fit")
    with caplog.at_level(logging.ERROR, logger="ldm.eval.callback"):
        metrics = cb.evaluate(trainer, model)
    assert metrics["heldout/raw/nonfinite"] == 1.0 and "heldout/raw/psnr_hole" not in metrics
    assert math.isfinite(metrics["heldout/ema/psnr_hole"]) and "heldout/ema/nonfinite" not in metrics
    assert "step 0, raw weights: sampling produced NaN/inf in 1 of 1 sample(s)" in caplog.text
    line = json.loads((tmp_path / "run" / "heldout" / "metrics.jsonl").read_text())
    assert line["heldout/raw/nonfinite"] == 1.0
    grid = _rgb(tmp_path / "run" / "heldout" / "step_000000000.png")  # input | mask | masked | EMA: no raw column
    assert model.training  # put back in training mode after the failure
    model.eval()
    with model.ema_scope():
        ema = cb.inpaint_set(model)
    assert grid.shape == cb.grid({"ema": ema}).shape and np.array_equal(_cell(grid, 2, 4, 1, 3), ema[1])


def test_heldout_evaluation_during_training(image_dir, tmp_path, caplog):
    import pytorch_lightning as pl
    from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from ldm.eval.callback import HeldOutEvaluation
    from ldm.eval.fixed_set import load_fixed_set
    from ldm.eval.metrics import region_metrics as metrics_of

    set_dir = tmp_path / "heldout"
    cb = HeldOutEvaluation(str(set_dir), every_n_steps=1, shards=_validation_shard(image_dir, tmp_path),
                           num_images=2, size=64, steps=2, scale=3.0, logdir=str(tmp_path / "run"))
    model = build_tiny("inpaint")
    with torch.no_grad():  # raw weights away from the EMA copy, so the two columns differ
        for p in model.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    loggers = [CSVLogger(tmp_path / "run", name="csv"), TensorBoardLogger(tmp_path / "run", name="tb")]
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", logger=loggers, callbacks=[cb], enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(model, torch.utils.data.DataLoader(_Batches(), batch_size=None))

    fixed = load_fixed_set(set_dir)
    assert [it.key for it in fixed.items] == ["astronaut", "cat"] and fixed.size == 64
    lines = [json.loads(x) for x in (tmp_path / "run" / "heldout" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2] and {x["fingerprint"] for x in lines} == {fixed.fingerprint}
    assert json.loads((set_dir / "set.json").read_text())["skipped"]["read"] == 2  # what filling it skipped
    # the logged numbers are the metrics of what the weights at step 2 draw from the fixed seeds
    model.eval()
    with model.ema_scope():
        ema = cb.inpaint_set(model)
    raw = cb.inpaint_set(model)
    for weights, outs in (("ema", ema), ("raw", raw)):
        expected = np.mean([metrics_of(o, it.image, it.mask)["psnr_hole"] for o, it in zip(outs, fixed.items)])
        assert lines[-1][f"heldout/{weights}/psnr_hole"] == pytest.approx(expected)
    assert not np.array_equal(ema[0], raw[0])
    grid = _rgb(tmp_path / "run" / "heldout" / "step_000000002.png")  # input | mask | masked | EMA | raw
    assert np.array_equal(_cell(grid, 2, 5, 1, 3), ema[1]) and np.array_equal(_cell(grid, 2, 5, 1, 4), raw[1])
    # every logger: CSV rows and TensorBoard scalars + image at steps 1 and 2
    with open(next((tmp_path / "run" / "csv").rglob("metrics.csv"))) as f:
        csv_rows = [r for r in csv.DictReader(f) if r.get("heldout/raw/psnr_hole")]
    assert [int(r["step"]) for r in csv_rows] == [1, 2]
    acc = EventAccumulator(str(next((tmp_path / "run" / "tb").rglob("events.*")).parent)).Reload()
    assert [e.step for e in acc.Scalars("heldout/ema/ssim_hole")] == [1, 2]
    assert [e.step for e in acc.Images("heldout/grid")] == [1, 2]

    other = HeldOutEvaluation(str(set_dir), every_n_steps=1, num_images=3, size=64)  # the set has 2 images
    with pytest.raises(ValueError, match="never changes"):
        other.setup(trainer, model, "fit")
    (set_dir / "masks" / "cat.png").write_bytes((set_dir / "masks" / "astronaut.png").read_bytes())
    with pytest.raises(ValueError, match="cat.png is missing or changed"):
        load_fixed_set(set_dir)


def test_image_logger_overview_labels_every_column():
    from ldm.callbacks import ImageLogger

    logger = ImageLogger(batch_frequency=1, max_images=2, log_images_kwargs={"seed": 3})
    g = torch.Generator().manual_seed(0)
    images = {k: torch.rand(3, 3, 16, 16, generator=g) * 2 - 1
              for k in ("inputs", "mask", "masked_image", "samples", "samples_cfg_scale_5.00")}
    grid = logger.overview(images)
    cell = logger.to_grid(images["samples_cfg_scale_5.00"][1:2])  # 20 x 20: the image and make_grid's padding
    assert np.array_equal(_cell(grid, 2, 5, 1, 4, size=cell.shape[0]), cell)
    assert (grid[: grid.shape[0] - 2 * (20 + 2) - 2] < 128).any()  # header text above the two rows


def test_image_logger_draws_non_finite_pixels_magenta_and_logs_their_count(tmp_path, caplog):
    # A cast to uint8 turns NaN into black pixels: a plausible image. The grid must show them and the log count them.
    import logging

    import pytorch_lightning as pl

    from ldm.callbacks import ImageLogger

    logger = ImageLogger(batch_frequency=1, max_images=2, nrow=2, logdir=str(tmp_path))
    samples = torch.zeros(2, 3, 8, 8)
    samples[1, 0, 2, 5] = float("nan")
    samples[1, 2, 7, 0] = float("inf")
    grid = logger.to_grid(samples)  # two 8 x 8 images side by side, 2 px padding
    cell = grid[2:10, 12:20]
    assert tuple(cell[2, 5]) == tuple(cell[7, 0]) == ImageLogger.NON_FINITE_RGB
    assert (cell == 128).all(axis=-1).sum() == 64 - 2 and (grid[2:10, 2:10] == 128).all()  # the rest: 0 -> mid-grey
    trainer = pl.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                         default_root_dir=str(tmp_path))
    with caplog.at_level(logging.ERROR, logger="ldm.callbacks.images"):
        logger.save(trainer, {"inputs": torch.zeros(2, 3, 8, 8), "samples": samples}, "train", 0)
    assert "NaN/inf values in samples (2 values)" in caplog.text and "inputs" not in caplog.text
    saved = np.asarray(Image.open(next((tmp_path / "images" / "train").glob("samples_*.png"))))
    assert np.array_equal(saved, grid)
