"""scripts/evaluate.py stops on user mistakes with one line and exit code 2, before the work they would spoil:
the protocol and every named file are checked before images are read, wrong weight files stop the run before any
checkpoint is hashed, fewer readable images than asked for are an error unless explicitly accepted (and then both
numbers are recorded), and a source without a readable image is refused the same way for folders and shards.
Also: the in-training evaluation shares evaluate.py's guidance scale and finds its set from any directory."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from PIL import Image

from ldm.eval.data import load_folder, load_shards
from tests.helpers import REPO, load_script

evaluate_script = load_script("evaluate")

CONFIG = str(REPO / "configs" / "tiny" / "inpaint.yaml")


def _boom(*args, **kwargs):
    raise AssertionError("reached work that the checks should have prevented")


def _errors(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]


def test_evaluate_checks_the_whole_protocol_before_any_work(checkpoints, image_dir, tmp_path, caplog, monkeypatch):
    """Every user mistake is one ERROR line and exit code 2 before the process group, the images, the metric
    networks or the checkpoints are touched (init_shard, the first of them, must not run)."""
    monkeypatch.setattr(evaluate_script, "init_shard", _boom)
    existing = tmp_path / "exists.bin"
    existing.write_bytes(b"x")
    base = ["--config", CONFIG, "--ckpt", str(checkpoints["a"]), "--images", str(image_dir), "--out",
            str(tmp_path / "o"), "--size", "64", "--masks", "lama-thin-256", "--steps", "2"]
    cases = [
        # DDIM with 3 steps would visit 1, 334, 667, 1000: past the 1000-step schedule
        (["--steps", "3"], "--steps 3 does not work with the DDIM sampler"),
        (["--scales", "nan"], "finite"),
        (["--scales", "2", "-1"], "finite and >= 0"),
        (["--sampler", "dpm", "--eta", "0.5"], "eta"),
        (["--sampler", "euler"], "sampler 'euler' is unknown"),
        (["--masks", "lama-thin-256", "lama-thin-256"], "repeated preset"),
        (["--masks", "thin"], "unknown mask mode 'thin'"),
        (["--num-images", "0"], "--num-images 0"),
        (["--size", "0"], "--size 0"),
        (["--allow-fewer-images"], "--allow-fewer-images needs --num-images"),
        (["--ckpt-config", f"a={tmp_path / 'missing.yaml'}"], "config file not found"),
        (["--inception", str(tmp_path / "no.pth")], "(--inception)"),
        (["--fid-torchvision", str(tmp_path / "no.pth")], "(--fid-torchvision)"),
        (["--clip-weights", str(tmp_path / "no.bin")], "(--clip-weights)"),
        (["--clip-weights", str(existing), "--clip-arch", "no-such-arch"], "--clip-arch no-such-arch"),
        (["--images", str(tmp_path / "nodir")], "folder not found"),
        (["--out", str(existing)], "is not a folder"),
    ]
    for extra, expected in cases:
        caplog.clear()
        assert evaluate_script.main([*base, *extra]) == 2, extra
        assert len(_errors(caplog)) == 1 and expected in _errors(caplog)[0], (extra, caplog.text)
        assert "Traceback" not in caplog.text
    assert not (tmp_path / "o").exists()


def test_wrong_weight_files_are_one_line_before_any_checkpoint_is_hashed(checkpoints, image_dir, weights, tmp_path,
                                                                         caplog, monkeypatch):
    from safetensors.torch import save_file

    import ldm.eval.run

    monkeypatch.setattr(ldm.eval.run, "checkpoint_sha256", _boom)
    monkeypatch.setattr(evaluate_script, "load_folder", _boom)
    safetensors = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(2)}, str(safetensors))
    junk = tmp_path / "truncated.pth"
    junk.write_bytes(b"PK\x03\x04 not a whole file")
    base = ["--config", CONFIG, "--ckpt", str(checkpoints["a"]), "--images", str(image_dir), "--out",
            str(tmp_path / "o"), "--size", "64", "--masks", "lama-thin-256", "--steps", "2"]
    cases = [
        (["--inception", str(checkpoints["b"])], f"--inception {checkpoints['b']}: not the FID Inception-v3"),
        (["--inception", str(weights["alexnet"])], f"--inception {weights['alexnet']}: not the FID Inception-v3"),
        (["--lpips-alexnet", str(safetensors)], f"--lpips-alexnet {safetensors}: not torchvision's AlexNet"),
        (["--lpips-alexnet", str(checkpoints["b"])], f"--lpips-alexnet {checkpoints['b']}: not torchvision's"),
        (["--fid-torchvision", str(junk)], f"--fid-torchvision {junk}: not torchvision's Inception-v3"),
        (["--clip-arch", str(weights["clip_config"]), "--clip-weights", str(checkpoints["b"])],
         f"--clip-weights {checkpoints['b']}: not open_clip weights of --clip-arch eval_tiny_clip"),
    ]
    for extra, expected in cases:
        caplog.clear()
        assert evaluate_script.main([*base, *extra]) == 2, extra
        assert len(_errors(caplog)) == 1 and _errors(caplog)[0].startswith(expected), (extra, caplog.text)
        assert "\n" not in _errors(caplog)[0] and "Traceback" not in caplog.text
    assert not (tmp_path / "o" / "checkpoint_sha256.json").exists()


def test_fewer_images_than_asked_stop_the_run_unless_accepted(checkpoints, image_dir, tmp_path, caplog,
                                                              monkeypatch):
    import ldm.eval.run

    folder = tmp_path / "two"
    folder.mkdir()
    for name in ("cat.jpg", "cat.txt", "coffee.jpg", "coffee.txt"):
        (folder / name).write_bytes((image_dir / name).read_bytes())
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    argv = ["--config", CONFIG, "--ckpt", str(checkpoints["a"]), "--images", str(folder), "--num-images", "5",
            "--out", str(tmp_path / "o"), "--size", "64", "--masks", "lama-thin-256", "--steps", "1", "--scales", "2",
            "--grid-images", "0"]
    with monkeypatch.context() as m:
        m.setattr(ldm.eval.run, "checkpoint_sha256", _boom)  # stops before any checkpoint is hashed or loaded
        assert evaluate_script.main(argv) == 2
    assert _errors(caplog) == [f"--images {folder}: 2 readable images, 5 asked for (2 images read, 1 skipped "
                               "{'corrupt_image': 1}); add images, ask for 2, or pass --allow-fewer-images to "
                               "evaluate on them"]
    caplog.clear()
    assert evaluate_script.main([*argv, "--allow-fewer-images"]) == 0
    assert "evaluating 2 images instead of the 5 asked for (--allow-fewer-images)" in caplog.text
    res = json.loads((tmp_path / "o" / "a.json").read_text())
    assert (res["num_images"], res["num_images_requested"]) == (2, 5)
    assert [(g["n"], g["n_requested"]) for g in res["groups"]] == [(2, 5)]
    with (tmp_path / "o" / "comparison.csv").open() as f:
        row = next(csv.DictReader(f))
    assert (row["n"], row["n_requested"]) == ("2", "5")
    assert "| n | n_requested |" in (tmp_path / "o" / "comparison.md").read_text()


def test_no_readable_image_is_one_rule_for_folders_and_shards(checkpoints, tmp_path, caplog):
    import webdataset as wds

    folder = tmp_path / "bad"
    folder.mkdir()
    for name in ("a.jpg", "b.png"):
        (folder / name).write_bytes(b"not an image")
    with wds.TarWriter(str(tmp_path / "bad-00000.tar")) as sink:
        sink.write({"__key__": "a", "jpg": b"not an image", "txt": "x"})
    with pytest.raises(ValueError, match=r"^--images .*bad: no readable images \(0 images read, 2 skipped"):
        load_folder(folder, 64)
    with pytest.raises(ValueError, match=r"^--shards .*bad-00000.tar: no readable images \(0 images read, 1 "):
        load_shards(str(tmp_path / "bad-00000.tar"), 64)
    for source in (["--images", str(folder)], ["--shards", str(tmp_path / "bad-00000.tar")]):
        caplog.clear()
        assert evaluate_script.main(["--config", CONFIG, "--ckpt", str(checkpoints["a"]), *source, "--out",
                                     str(tmp_path / "o"), "--size", "64", "--masks", "lama-thin-256"]) == 2
        assert len(_errors(caplog)) == 1 and "no readable images" in _errors(caplog)[0]
        assert "Traceback" not in caplog.text and not (tmp_path / "o" / "samples").exists()


def test_fixed_set_refuses_fewer_images_than_its_config(image_dir, tmp_path):
    import webdataset as wds

    from ldm.eval.fixed_set import build_fixed_set
    from ldm.util import ConfigError

    with wds.TarWriter(str(tmp_path / "val-00000.tar")) as sink:
        for im in load_folder(image_dir, 64)[:2]:
            sink.write({"__key__": im.key, "png": Image.fromarray(im.image), "txt": "a photo"})
    with pytest.raises(ConfigError, match="heldout: shards .*: 2 readable images, 3 asked for"):
        build_fixed_set(str(tmp_path / "val-00000.tar"), tmp_path / "heldout", num_images=3, size=64)
    assert not (tmp_path / "heldout" / "set.json").exists()


def test_callbacks_and_shipped_config_share_the_default_guidance_scale(tmp_path):
    import inspect

    from ldm.defaults import GUIDANCE_SCALE
    from ldm.eval.callback import HeldOutEvaluation
    from ldm.models.diffusion.visualize import log_images
    from ldm.util import load_config

    callbacks = load_config([REPO / "configs" / "inpaint.yaml"]).lightning.callbacks
    params = {**callbacks.heldout_eval.params, "set_dir": str(tmp_path / "set")}
    assert HeldOutEvaluation(**params).options.scale == GUIDANCE_SCALE
    kwargs = callbacks.image_logger.params.log_images_kwargs
    default = inspect.signature(log_images).parameters["unconditional_guidance_scale"].default
    assert kwargs.get("unconditional_guidance_scale", default) == GUIDANCE_SCALE == 7.5


def test_relative_set_dir_is_under_the_repository_root(tmp_path, monkeypatch, caplog):
    from ldm.eval.callback import HeldOutEvaluation, resolve_set_dir
    from ldm.util import REPO_ROOT

    places = []
    for cwd in (tmp_path / "one", tmp_path / "two"):  # two launch directories, one set
        cwd.mkdir()
        monkeypatch.chdir(cwd)
        places.append(HeldOutEvaluation("data/heldout-v9", every_n_steps=1).set_dir)
    assert places == [REPO_ROOT / "data" / "heldout-v9"] * 2
    assert resolve_set_dir(tmp_path / "abs") == tmp_path / "abs"
    (tmp_path / "two" / "data" / "heldout-v9").mkdir(parents=True)
    (tmp_path / "two" / "data" / "heldout-v9" / "set.json").write_text("{}")
    assert resolve_set_dir("data/heldout-v9") == REPO_ROOT / "data" / "heldout-v9"
    assert "in the working directory is not used" in caplog.text




def test_one_checkpoint_can_be_compared_with_its_own_raw_weights(tmp_path):
    # --ckpt-weights picks the weights per name, over --ema; the two names key their samples apart
    from ldm.eval.run import Protocol, run_identity

    ckpt = tmp_path / "last.ckpt"
    ckpt.write_bytes(b"x")
    base = ["--config", CONFIG, "--images", str(tmp_path), "--out", str(tmp_path / "o"),
            "--ckpt", f"e={ckpt}", "--ckpt", f"r={ckpt}", "--ckpt", f"auto={ckpt}", "--ckpt-weights", "r=raw"]
    specs = evaluate_script.checkpoint_specs(evaluate_script.parse_args([*base, "--ckpt-weights", "e=ema"]))
    assert [(s.name, s.ckpt, s.use_ema) for s in specs] == [("e", str(ckpt), True), ("r", str(ckpt), False),
                                                            ("auto", str(ckpt), None)]
    specs = evaluate_script.checkpoint_specs(evaluate_script.parse_args([*base, "--ema"]))
    assert [s.use_ema for s in specs] == [True, False, True]  # --ema for every name without its own choice
    protocol = Protocol((3.0,), "ddim", 2, 0.0, "fp32", False, 0)
    assert run_identity(specs[0], protocol, "0" * 64)[0] != run_identity(specs[1], protocol, "0" * 64)[0]
    for bad, message in ((["--ckpt-weights", "e=EMA"], "expected NAME=ema or NAME=raw"),
                         (["--ckpt-weights", "x=raw"], "'x' matches no --ckpt name")):
        with pytest.raises(ValueError, match=message):
            evaluate_script.checkpoint_specs(evaluate_script.parse_args([*base, *bad]))
