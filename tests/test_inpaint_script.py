"""scripts/inpaint.py end to end on a tiny model (CPU): reproducible seeds, sizes, folder mode, every input checked
before the model loads, output names, and the checks it shares with scripts/evaluate.py."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import load_script
from tests.inference_fixtures import CONFIG, UNET_KEY

inpaint_script = load_script("inpaint")


# ------------------------------------------------------------------------------------------- scripts/inpaint.py
def _run(ckpt: Path, pair: tuple[Path, Path], out: Path, *extra: str) -> int:
    img, mask = pair
    return inpaint_script.main(["--config", CONFIG, "--ckpt", str(ckpt), "--image", str(img), "--mask", str(mask),
                                "--prompt", "an astronaut", "--outdir", str(out), "--steps", "2", "--scale", "4",
                                *extra])


def _png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_script_is_reproducible_per_seed_and_keeps_size(ckpts, pair, tmp_path):
    # eta > 0 so the DDIM noise and the VAE posterior sample are exercised as well as x_T
    assert _run(ckpts["ema"], pair, tmp_path / "a", "--seed", "11", "12", "--eta", "1.0") == 0
    assert _run(ckpts["ema"], pair, tmp_path / "b", "--seed", "11", "--eta", "1.0") == 0
    tag = "ddim2_s4_eta1"  # the settings that change the picture are in the name
    first, again, other = (_png(tmp_path / d / f"astro_{tag}_seed{s}_0.png")
                           for d, s in (("a", 11), ("b", 11), ("a", 12)))
    assert first.shape == (40, 52, 3)  # input size restored from the 64 x 64 working size
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)
    assert (tmp_path / "a" / f"astro_{tag}_grid.png").is_file()


def test_script_folder_mode_resize_and_num_samples(ckpts, pair, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a helmet\n")
    img, _ = pair
    rc = inpaint_script.main(["--config", CONFIG, "--ckpt", str(ckpts["raw"]), "--input-dir", str(img.parent),
                              "--prompts-file", str(prompts), "--outdir", str(tmp_path / "o"), "--steps", "2",
                              "--num-samples", "2", "--resize", "--sampler", "dpm", "--no-ema"])
    assert rc == 0
    outs = sorted((tmp_path / "o").glob("astro_*_seed0_*.png"))
    assert [p.name for p in outs] == ["astro_dpm2_s7.5_resize_seed0_0.png", "astro_dpm2_s7.5_resize_seed0_1.png"]
    assert all(_png(p).shape == (40, 52, 3) for p in outs)
    assert not np.array_equal(_png(outs[0]), _png(outs[1]))  # two different samples of one batch


def test_script_reports_bad_input(ckpts, pair, tmp_path, caplog):
    img, mask = pair
    small, square = tmp_path / "small_mask.png", tmp_path / "square_mask.png"
    Image.fromarray(np.zeros((20, 26), np.uint8)).save(small)  # half the 52 x 40 image
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(square)
    base = ["--config", CONFIG, "--ckpt", str(ckpts["raw"]), "--outdir", str(tmp_path / "o"), "--steps", "2"]
    cases = [
        (["--image", str(img), "--mask", str(tmp_path / "nope.png"), "--prompt", "x"], "mask file not found"),
        (["--image", str(img), "--mask", str(square), "--prompt", "x"], "another aspect ratio"),
        (["--image", str(img), "--mask", str(mask)], "no prompt"),
        (["--image", str(img), "--prompt", "x"], "needs --mask"),
    ]
    for extra, message in cases:
        caplog.clear()
        with caplog.at_level(logging.ERROR):
            assert inpaint_script.main(base + extra) == 2
        assert message in caplog.text
    caplog.clear()  # a mask of another size, same aspect ratio, is resized (nearest neighbour) with a warning
    with caplog.at_level(logging.WARNING):
        assert inpaint_script.main([*base, "--image", str(img), "--mask", str(small), "--prompt", "x",
                                    "--no-grid"]) == 0
    assert "resizing the mask" in caplog.text


# ------------------------------------------------------------------ what scripts/inpaint.py reads and writes
def _touch_images(folder: Path, *names: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        Image.new("L" if "mask" in name.lower() else "RGB", (8, 8)).save(folder / name)


def test_find_pairs_matches_case_insensitively_and_says_what_it_skips(tmp_path, caplog):
    from ldm.image_io import find_pairs

    _touch_images(tmp_path, "a.png", "a_mask.png", "y.PNG", "y_MASK.png", "lonely.jpg", "orphan_mask.png")
    (tmp_path / "prompts.txt").write_text("x\n")
    with caplog.at_level(logging.INFO):
        pairs = find_pairs(tmp_path)
    assert [(i.name, m.name) for i, m in pairs] == [("a.png", "a_mask.png"), ("y.PNG", "y_MASK.png")]
    skipped = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(skipped) == 2 and "lonely.jpg" in skipped[0] and "orphan_mask.png" in skipped[1], skipped
    assert "prompts.txt" in caplog.text  # non-images are logged too


@pytest.mark.parametrize("names, named", [
    (("a.png", "a.jpg", "a_mask.png", "b.png", "b_mask.png"), ("a.jpg", "a.png", "a_mask.png")),
    (("x.png", "x_mask.png", "x_mask.jpg"), ("x.png", "x_mask.jpg", "x_mask.png")),
])
def test_ambiguous_pairs_are_an_error_naming_the_files(tmp_path, names, named):
    from ldm.image_io import find_pairs

    _touch_images(tmp_path, *names)
    with pytest.raises(ValueError, match="cannot tell which image goes with which mask") as err:
        find_pairs(tmp_path)
    assert all(n in str(err.value) for n in named), str(err.value)


def _mask_file(path: Path, values: np.ndarray) -> Path:
    Image.fromarray(values.astype(np.uint8)).save(path)
    return path


def test_masks_that_binarise_to_surprises_are_reported(tmp_path, caplog):
    from ldm.image_io import load_mask

    hard = np.zeros((64, 64), np.uint8)
    hard[16:48, 16:48] = 255
    hard[15, 16:48] = 100  # a one-pixel anti-aliased edge: normal, no warning
    soft = np.full((64, 64), 90, np.uint8)  # a soft brush: a small white core in a wide grey halo
    soft[28:36, 28:36] = 255
    cases = {"hard": (hard, None), "black": (np.zeros((64, 64)), "no hole"),
             "grey": (np.full((64, 64), 120), "no hole"), "soft": (soft, "grey below 0.5"),
             "full": (np.full((64, 64), 255), "covers the whole image")}
    for name, (values, expected) in cases.items():
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="ldm.image_io"):
            load_mask(_mask_file(tmp_path / f"{name}.png", values))
        notes = [r for r in caplog.records if r.name == "ldm.image_io"]
        if expected is None:
            assert not notes, [r.getMessage() for r in notes]
            continue
        assert len(notes) == 1 and expected in notes[0].getMessage() and f"{name}.png" in notes[0].getMessage()
        assert notes[0].levelno == (logging.INFO if name == "full" else logging.WARNING)  # a full mask is legitimate
        if name == "grey":  # the numbers that explain it
            assert "4096 pixels (100.0%) are grey below 0.5 (brightest 120/255)" in notes[0].getMessage()


def test_prompts_file_must_be_utf8_and_a_bom_is_dropped(tmp_path):
    from ldm.image_io import read_prompts

    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("un caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.txt is not UTF-8 text .*save it as UTF-8"):
        read_prompts(latin1, 1)
    bom = tmp_path / "bom.txt"
    bom.write_bytes("\ufeffa bench\n".encode())
    assert read_prompts(bom, 2) == ["a bench", "a bench"]


def test_script_checks_every_input_before_loading_the_model(ckpts, pair, tmp_path, caplog, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(inpaint_script, "load_model", no_loading)
    img, mask = pair
    (tmp_path / "a_file").write_text("")
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"x")
    pipe = tmp_path / "pipe"
    pipe.mkdir()
    (pipe / "model_index.json").write_text("{}")
    latin1 = tmp_path / "prompts.txt"
    latin1.write_bytes(b"caf\xe9\n")
    existing = tmp_path / "done"
    existing.mkdir()
    (existing / "astro_ddim2_s7.5_seed0_0.png").write_bytes(b"earlier result")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    cases = [
        (["--out", str(tmp_path / "a_file")], "--out"),
        (["--out", str(tmp_path / "a_file" / "sub")], "is a file"),
        (["--device", f"cuda:{gpus}"], "--device cuda"),
        (["--device", "gpu"], "not a device name"),
        (["--ckpt", str(run_dir)], str(run_dir / "checkpoints" / "last.ckpt")),
        (["--ckpt", str(pipe)], "diffusers pipeline folder"),
        (["--steps", "9"], "nearest counts that work: 8 or 10"),
        (["--prompts-file", str(latin1)], "save it as UTF-8"),
        (["--out", str(existing), "--steps", "2"], "--overwrite"),
        (["--seed", "1", "1"], "repeated"),
        (["--image", str(latin1)], "not a readable image"),  # every input is decoded before the model loads
    ]
    for extra, expected in cases:
        argv = {"--ckpt": str(ckpts["raw"]), "--out": str(tmp_path / "o"), "--steps": "4", "--prompt": "x"}
        flags = [a for a in extra if a.startswith("--")]
        for flag in flags:
            argv.pop(flag, None)
        if "--prompts-file" in flags:
            argv.pop("--prompt")
        caplog.clear()
        rc = inpaint_script.main(["--config", CONFIG, "--image", str(img), "--mask", str(mask),
                                  *(x for kv in argv.items() for x in kv), *extra])
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert rc == 2 and len(errors) == 1 and expected in errors[0], (extra, errors)
    assert (existing / "astro_ddim2_s7.5_seed0_0.png").read_bytes() == b"earlier result"


def test_outputs_are_named_by_their_settings_and_never_overwritten(ckpts, pair, tmp_path, caplog):
    out = tmp_path / "sweep"
    for scale in ("2", "3"):  # a scale sweep into one folder keeps every result
        assert _run(ckpts["raw"], pair, out, "--scale", scale) == 0
    # (_run passes --scale 4 first; argparse keeps the last --scale)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["astro_ddim2_s2_grid.png", "astro_ddim2_s2_seed0_0.png", "astro_ddim2_s3_grid.png",
                     "astro_ddim2_s3_seed0_0.png"]
    before = (out / "astro_ddim2_s2_seed0_0.png").read_bytes()
    caplog.clear()
    assert _run(ckpts["raw"], pair, out, "--scale", "2", "--prompt", "another prompt") == 2
    assert "exist already" in caplog.text and (out / "astro_ddim2_s2_seed0_0.png").read_bytes() == before
    assert _run(ckpts["raw"], pair, out, "--scale", "2", "--prompt", "another prompt", "--overwrite") == 0
    assert (out / "astro_ddim2_s2_seed0_0.png").read_bytes() != before
    # DDIM's uniform grid runs 46 steps for --steps 45: said once, and recorded (name and PNG text)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert _run(ckpts["raw"], pair, out, "--steps", "45", "--no-grid") == 0
    assert sum("runs 46 steps" in r.getMessage() for r in caplog.records) == 1
    text = Image.open(out / "astro_ddim46_s4_seed0_0.png").text
    assert (text["steps"], text["steps_requested"], text["scale"], text["seed"]) == ("46", "45", "4", "0")
    assert text["prompt"] == "an astronaut" and text["weights"] == "as stored"


@pytest.mark.parametrize("script", ["inpaint", "evaluate"])
def test_sampling_scripts_share_the_checks_made_before_loading(script, ckpts, pair, tmp_path, caplog, monkeypatch):
    """scripts/evaluate.py refuses what scripts/inpaint.py refuses, with the same line, before any model is built."""
    img, mask = pair

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    evaluate_script = load_script("evaluate")
    monkeypatch.setattr(inpaint_script, "load_model", no_loading)
    monkeypatch.setattr(evaluate_script, "Evaluation", no_loading)
    (tmp_path / "a_file").write_text("")
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"x")
    cut = tmp_path / "cut.ckpt"  # a copy that stopped halfway
    cut.write_bytes(ckpts["raw"].read_bytes()[: ckpts["raw"].stat().st_size // 2])
    base = {"inpaint": ["--image", str(img), "--mask", str(mask), "--prompt", "x"],
            "evaluate": ["--images", str(img.parent), "--size", "64"]}[script]
    main = {"inpaint": inpaint_script.main, "evaluate": evaluate_script.main}[script]
    cases = [(["--steps", "9"], "--steps 9 does not work with the DDIM sampler"),
             (["--ckpt", str(run_dir)], "is a directory (a training run's?)"),
             (["--ckpt", str(cut)], "is truncated: it starts like a torch checkpoint"),
             (["--device", "gpu"], "not a device name"),
             (["--out", str(tmp_path / "a_file")], "is not a folder"),
             (["--seed", "-1"], "--seed -1: seeds must be integers >= 0"),
             (["--scale", "nan"], "must be finite and >= 0"),
             (["--scale", "inf"], "must be finite and >= 0"),
             (["--scale", "-3"], "must be finite and >= 0")]
    for extra, expected in cases:
        argv = {"--ckpt": str(ckpts["raw"]), "--out": str(tmp_path / "o"), "--steps": "2"}
        for flag in extra[::2]:
            argv.pop(flag, None)
        caplog.clear()
        assert main(["--config", CONFIG, *base, *(x for kv in argv.items() for x in kv), *extra]) == 2
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1 and expected in errors[0], (extra, errors)


@pytest.mark.parametrize("script", ["inpaint", "evaluate"])
@pytest.mark.parametrize("where", [".", "results/.."])
def test_the_output_folder_may_not_be_the_input_folder(script, where, ckpts, pair, tmp_path, caplog, monkeypatch):
    # The next run would read the samples as inputs (unpaired images, held-out images that are model outputs).
    img, _ = pair
    monkeypatch.setattr(inpaint_script, "load_model", lambda *a, **k: pytest.fail("loaded before the check"))
    flag = {"inpaint": "--input-dir", "evaluate": "--images"}[script]
    argv = ["--config", CONFIG, "--ckpt", str(ckpts["raw"]), flag, str(img.parent), "--steps", "2",
            "--out", str(img.parent / where)]
    if script == "inpaint":
        argv += ["--prompt", "x"]
        main = inpaint_script.main
    else:
        argv += ["--size", "64"]
        main = load_script("evaluate").main
    assert main(argv) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and f"is {flag} {img.parent}" in errors[0], errors
    assert sorted(p.name for p in img.parent.iterdir()) == sorted(p.name for p in img.parent.iterdir()
                                                                  if p.is_file())  # no folder was created


def test_a_subfolder_of_the_input_folder_is_a_valid_output_folder(tmp_path):
    """``--input-dir photos --out photos/out``: both readers list only a folder's own files, so outputs in a
    subfolder are never read back; refusing it blocked a common layout. A symlink to the input folder itself, or
    a path that resolves to it, is still refused."""
    from ldm.eval.data import load_folder
    from ldm.image_io import find_pairs
    from ldm.paths import output_folder

    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (64, 64), "red").save(photos / "a.png")
    Image.new("L", (64, 64), 255).save(photos / "a_mask.png")
    out = output_folder(photos / "out" / "deeper", "--out", {"--input-dir": photos})
    out.mkdir(parents=True)
    for name in ("a_sample0.png", "b.png", "b_mask.png"):  # what an earlier run could leave there
        Image.new("RGB", (64, 64), "blue").save(out / name)
    assert [(i.name, m.name) for i, m in find_pairs(photos)] == [("a.png", "a_mask.png")]
    assert [e.key for e in load_folder(photos, 64)] == ["a"]
    assert output_folder(tmp_path / "photos_out", "--out", {"--images": photos}) == tmp_path / "photos_out"
    (tmp_path / "link").symlink_to(photos)
    for same in (tmp_path / "link", photos / "out" / ".."):
        with pytest.raises(ValueError, match="is --images"):
            output_folder(same, "--out", {"--images": photos})


def test_non_finite_samples_are_an_error_not_black_images(ckpts, pair, tmp_path, caplog):
    """NaN/inf in the decoded sample (fp16 overflow, broken weights) used to be clamped to black PNGs, rc 0."""
    sd = torch.load(ckpts["raw"], weights_only=False)["state_dict"]
    sd[UNET_KEY] = torch.full_like(sd[UNET_KEY], float("inf"))
    broken = tmp_path / "broken.ckpt"
    torch.save({"state_dict": sd}, broken)
    out = tmp_path / "o"
    caplog.clear()
    assert _run(broken, pair, out) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "NaN/inf in 1 of 1 sample(s)" in errors[0], errors
    assert not out.exists() or not any(out.iterdir())
