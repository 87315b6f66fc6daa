"""scripts/make_shards.py and the embedded demo set: img2dataset layout, inputs, held-out split, errors."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import logging
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from demo_data import demo_records, load_manifest, load_photo
from PIL import Image

from ldm.data.laion import WebDataModuleFromConfig

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "make_shards.py"
_spec = importlib.util.spec_from_file_location("make_shards", SCRIPT)
make_shards = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_shards)


def _members(tar_path: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(tar_path) as tar:
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return samples


def test_demo_manifest_loads_every_photo_offline():
    photos = load_manifest()
    assert len(photos) == 10 and len({p.name for p in photos}) == 10
    assert len({p.caption for p in photos}) == 10 and all(len(p.caption.split()) >= 8 for p in photos)
    sizes = {p.name: load_photo(p).size for p in photos}
    assert sizes["astronaut"] == (512, 512) and sizes["grace_hopper"] == (512, 600)  # PIL: (width, height)
    assert sizes["motorcycle_left"] == sizes["motorcycle_right"] == (741, 500)
    assert all(load_photo(p).mode == "RGB" for p in photos[:2])


def test_demo_records_repeat_with_seeded_crops():
    photo = load_manifest()[0]
    a = list(demo_records([photo], repeat=3, seed=1))
    b = list(demo_records([photo], repeat=3, seed=1))
    assert a[0].image.size == (512, 512) and "crop_box" not in a[0].meta
    assert a[1].meta["crop_box"] == b[1].meta["crop_box"] and a[1].meta["crop_box"] != a[2].meta["crop_box"]
    assert all(r.caption == photo.caption for r in a)
    w, h = a[1].image.size
    assert 0.45 * 512 * 512 <= w * h <= 512 * 512


def test_demo_cli_writes_img2dataset_shards_with_a_disjoint_holdout(tmp_path):
    out = tmp_path / "demo"
    rc = make_shards.main(["--demo", "--size", "64", "--repeat", "3", "--samples-per-shard", "8",
                           "--val-fraction", "0.2", "--out", str(out)])
    assert rc == 0
    train, val = sorted((out / "train").glob("*.tar")), sorted((out / "val").glob("*.tar"))
    assert [p.name for p in train] == ["00000.tar", "00001.tar", "00002.tar"] and len(val) == 1
    samples = {k: v for p in train for k, v in _members(p).items()}
    assert len(samples) == 8 * 3 and all(set(s) == {"jpg", "json", "txt"} for s in samples.values())
    assert sorted(samples)[:2] == ["000000", "000001"] and "000027" in samples  # shard id + 1-digit row
    meta = json.loads(samples["000000"]["json"])
    for field in ("caption", "url", "key", "status", "width", "height", "original_width", "original_height"):
        assert field in meta, field
    first = Image.open(io.BytesIO(samples["000000"]["jpg"]))
    assert min(first.size) == 64 and (meta["width"], meta["height"]) == first.size
    photo = next(p for p in load_manifest() if p.name == meta["demo_name"])
    assert (meta["original_width"], meta["original_height"]) == load_photo(photo).size
    assert samples["000000"]["txt"].decode() == photo.caption == meta["caption"]
    stats = json.loads((out / "train" / "00000_stats.json").read_text())
    assert stats["count"] == stats["successes"] == 8 and stats["status_dict"] == {"success": 8}
    val_names = {json.loads(s["json"])["demo_name"] for s in _members(val[0]).values()}
    train_names = {json.loads(s["json"])["demo_name"] for s in samples.values()}
    assert len(val_names) == 2 and not val_names & train_names  # whole photos held out, never their crops


def _folder(tmp_path: Path, n: int = 3) -> Path:
    d = tmp_path / "images"
    d.mkdir()
    for i in range(n):
        Image.fromarray(np.full((40, 60, 3), 40 * i, np.uint8)).save(d / f"img{i}.png")
    return d


def test_folder_with_txt_captions_and_with_a_csv_table(tmp_path):
    d = _folder(tmp_path)
    for i in range(3):
        (d / f"img{i}.txt").write_text(f"a flat grey picture {i}\n")
    assert make_shards.main(["--images", str(d), "--out", str(tmp_path / "a"), "--size", "32"]) == 0
    got = _members(tmp_path / "a" / "00000.tar")
    assert sorted(s["txt"].decode() for s in got.values()) == [f"a flat grey picture {i}" for i in range(3)]

    table = tmp_path / "captions.csv"
    with table.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file_name", "caption", "punsafe"])
        writer.writerows([[f"img{i}.png", f"caption {i}", "0.05"] for i in range(3)])
    assert make_shards.main(["--images", str(d), "--captions", str(table), "--out", str(tmp_path / "b"),
                             "--size", "32", "--resize-mode", "center_crop", "--samples-per-shard", "2"]) == 0
    got = {**_members(tmp_path / "b" / "00000.tar"), **_members(tmp_path / "b" / "00001.tar")}
    metas = [json.loads(s["json"]) for s in got.values()]
    assert all(m["punsafe"] == "0.05" and (m["width"], m["height"]) == (32, 32) for m in metas)
    assert sorted(m["original_width"] for m in metas) == [60, 60, 60]


def _errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def test_bad_input_gives_clear_errors(tmp_path, caplog):
    assert make_shards.main(["--images", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "not a directory" in caplog.text
    d = _folder(tmp_path)
    table = tmp_path / "t.csv"
    table.write_bytes("file_name,caption\nimg0.png,caf\u00e9\n".encode("latin-1"))
    assert make_shards.main(["--images", str(d), "--captions", str(table), "--out", str(tmp_path / "o")]) == 2
    assert _errors(caplog)[-1].startswith(f"caption table {table} is not UTF-8 (invalid continuation byte at byte")
    assert make_shards.main(["--images", str(d), "--out", str(tmp_path / "o"), "--quality", "0"]) == 2
    assert not (tmp_path / "o").exists()


def test_bad_inputs_are_skipped_counted_and_named(tmp_path, caplog):
    d = _folder(tmp_path, n=4)
    (d / "img0.txt").write_text("a good picture")
    (d / "img1.txt").write_bytes("un caf\u00e9 cr\u00e8me".encode("latin-1"))  # not UTF-8
    good = (d / "img2.png").read_bytes()
    (d / "img2.png").write_bytes(good[: len(good) // 2])  # truncated
    (d / "img2.txt").write_text("a truncated picture")
    # img3 has no caption .txt
    assert make_shards.main(["--images", str(d), "--out", str(tmp_path / "o"), "--size", "32"]) == 0
    assert [s["txt"].decode() for s in _members(tmp_path / "o" / "00000.tar").values()] == ["a good picture"]
    skips = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipped ")]
    assert skips == [f"skipped {d / 'img1.txt'}: bad_caption: not UTF-8 (invalid continuation byte at byte 6); "
                     "re-save the file as UTF-8",
                     f"skipped {d / 'img3.txt'}: missing_caption: no caption .txt next to the image; add one or "
                     "pass --captions",
                     f"skipped {d / 'img2.png'}: corrupt_image: OSError: image file is truncated"]
    assert "3 input(s) skipped: 1 bad_caption, 1 corrupt_image, 1 missing_caption (each is named above)" in caplog.text
    caplog.clear()
    table = tmp_path / "t.json"
    table.write_text(json.dumps({"img0.png": "x", "missing.png": "y", "img3.png": ""}))
    assert make_shards.main(["--images", str(d), "--captions", str(table), "--out", str(tmp_path / "t")]) == 0
    assert f"skipped {table} row 1: missing_image: image 'missing.png' not found under {d}" in caplog.text
    assert f"skipped {table} row 2: missing_caption: image 'img3.png' has no caption" in caplog.text

    # --strict: the first bad input stops the run, and no shard is left behind
    caplog.clear()
    (d / "img1.txt").write_text("now UTF-8")
    assert make_shards.main(["--images", str(d), "--out", str(tmp_path / "s"), "--size", "32", "--strict",
                             "--samples-per-shard", "1"]) == 2
    assert _errors(caplog) == [f"{d / 'img3.txt'}: missing_caption: no caption .txt next to the image; add one "
                               "or pass --captions (--strict stops at the first bad input)"]
    (d / "img3.txt").write_text("a caption at last")
    assert make_shards.main(["--images", str(d), "--out", str(tmp_path / "s2"), "--size", "32", "--strict",
                             "--samples-per-shard", "1"]) == 2  # img0, img1 written, then img2 is corrupt
    assert "img2.png: corrupt_image: " in _errors(caplog)[-1]
    assert not [p for p in (tmp_path / "s2").iterdir() if p.suffix in (".tar", ".json", ".partial")]

    # nothing usable: exit 2
    for txt in d.glob("*.txt"):
        txt.write_bytes(b"\xff\xfe")
    assert make_shards.main(["--images", str(d), "--out", str(tmp_path / "n")]) == 2
    assert "no usable inputs under" in _errors(caplog)[-1]


def test_a_non_empty_output_folder_is_refused_and_overwrite_replaces_it(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="make_shards")
    d = _folder(tmp_path, n=7)
    for i in range(7):
        (d / f"img{i}.txt").write_text(f"picture {i}")
    out = tmp_path / "S"
    assert make_shards.main(["--images", str(d), "--out", str(out), "--size", "16", "--samples-per-shard", "3"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(before) == ["00000.tar", "00000_stats.json", "00001.tar", "00001_stats.json", "00002.tar",
                              "00002_stats.json"]
    one = tmp_path / "one"
    one.mkdir()
    for ext in ("png", "txt"):
        (one / f"img0.{ext}").write_bytes((d / f"img0.{ext}").read_bytes())
    assert make_shards.main(["--images", str(one), "--out", str(out), "--size", "16"]) == 2
    assert _errors(caplog) == [f"--out {out} is not empty (6 entries, e.g. {out / '00000.tar'}); new shards next "
                               "to old ones would be read as one data set. Choose an empty folder, or pass "
                               "--overwrite to remove the earlier shards first"]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # untouched

    (out / "notes.md").write_text("mine")
    (out / "00007.tar.partial").write_bytes(b"left by a crash")
    assert make_shards.main(["--images", str(one), "--out", str(out), "--size", "16", "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["00000.tar", "00000_stats.json", "notes.md"]
    assert [s["txt"] for s in _members(out / "00000.tar").values()] == [b"picture 0"]
    assert f"--overwrite: removed 7 file(s) of an earlier run from {out}" in caplog.text
    assert f"--overwrite: left 1 other file(s) in {out}, e.g. {out / 'notes.md'}" in caplog.text
    assert f"all: 1 samples in 1 shards: {out / '00000.tar'}" in caplog.text


def test_shards_are_written_atomically(tmp_path):
    from ldm.data.shard_writer import Record, write_shards

    good = Image.fromarray(np.zeros((8, 8, 3), np.uint8))
    records = [Record(good, "ok", "a"), Record(good, "ok", "b"), Record(Image.new("LAB", (8, 8)), "bad", "c")]
    with pytest.raises(ValueError, match="image mode LAB is not supported"):
        write_shards(records, tmp_path, samples_per_shard=2, size=None, resize_mode="no")
    # the complete first shard is in place; the failed second one left neither a shard nor a partial file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000.tar", "00000_stats.json"]
    assert len(_members(tmp_path / "00000.tar")) == 2


@pytest.mark.slow
def test_cli_entry_point_and_round_trip_through_the_data_module(tmp_path):
    out = tmp_path / "demo"
    # stored at 512 (small photos upscaled by the writer), so the stored-size check passes and the json
    # pre-filter on the original sizes decides
    subprocess.run([sys.executable, str(SCRIPT), "--demo", "--size", "512", "--samples-per-shard", "4",
                    "--out", str(out)], check=True, capture_output=True, cwd=tmp_path)
    shards = sorted(out.glob("*.tar"))
    crop = {"target": "torchvision.transforms.CenterCrop", "params": {"size": 48}}
    dm = WebDataModuleFromConfig(batch_size=4, num_workers=0, min_size=512, p_unsafe_threshold=0.1,
                                 max_pwatermark=0.45, filter_word_list="data/filters.yaml",
                                 validation={"shards": [str(p) for p in shards], "image_transforms": [crop],
                                             "postprocess": {"target": "ldm.data.laion.AddMask"}})
    batches = list(dm.val_dataloader())
    names = sorted(meta["demo_name"] for b in batches for meta in b["json"])
    # the SD2 filters keep exactly the five photos whose short side is >= 512 (DECISIONS R11)
    assert names == ["astronaut", "grace_hopper", "hubble_deep_field", "immunohistochemistry", "retina"]
    assert dm.data_stats("validation")["too_small"] == 5


def test_table_paths_outside_the_folder_and_jpeg_sized_strips_are_handled(tmp_path, caplog):
    """A caption table may name absolute paths; a strip too long for a JPEG at --size is a named skip, not a crash."""
    d = _folder(tmp_path, n=1)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    Image.fromarray(np.full((30, 50, 3), 90, np.uint8)).save(elsewhere / "far.png")
    Image.new("RGB", (3000, 10), (1, 2, 3)).save(d / "strip.png")  # 153600 x 512 at the default --size
    table = tmp_path / "t.csv"
    table.write_text(f"file_name,caption\nimg0.png,near\n{elsewhere / 'far.png'},far\nstrip.png,a strip\n")
    assert make_shards.main(["--images", str(d), "--captions", str(table), "--out", str(tmp_path / "o")]) == 0
    metas = sorted((json.loads(s["json"]) for s in _members(tmp_path / "o" / "00000.tar").values()),
                   key=lambda m: m["caption"])
    assert [(m["caption"], m["url"], m["width"], m["height"]) for m in metas] == [
        ("far", str(elsewhere / "far.png"), 853, 512), ("near", "img0.png", 768, 512)]
    assert (f"skipped {d / 'strip.png'}: extreme_aspect: a 3000x10 image would be stored at 153600x512, beyond "
            "the JPEG limit of 65535 px per side; crop it, or use --resize-mode center_crop") in caplog.text
    assert "1 input(s) skipped: 1 extreme_aspect" in caplog.text
    # the same strip fits once the writer crops it to a square
    caplog.clear()
    assert make_shards.main(["--images", str(d), "--captions", str(table), "--out", str(tmp_path / "c"),
                             "--resize-mode", "center_crop", "--size", "32"]) == 0
    assert len(_members(tmp_path / "c" / "00000.tar")) == 3 and "skipped" not in caplog.text


def test_skip_warnings_are_not_glued_to_the_progress_bar(tmp_path):
    """Each skip is a line of its own in the CLI's stderr (tqdm's bar is redrawn around it)."""
    d = _folder(tmp_path, n=3)
    for i in range(3):
        (d / f"img{i}.txt").write_text(f"picture {i}")
    (d / "img1.png").write_bytes(b"not a png")
    r = subprocess.run([sys.executable, str(SCRIPT), "--images", str(d), "--out", str(tmp_path / "o"), "--size", "16"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    pieces = [p for p in r.stderr.replace("\r", "\n").splitlines() if "skipped" in p]
    assert len(pieces) == 2 and all(p.startswith("WARNING make_shards: ") for p in pieces), pieces


@pytest.mark.parametrize("inside", [".", "shards", "shards/v1"])
def test_out_inside_the_images_folder_is_refused_by_make_shards_and_the_demo(tmp_path, caplog, inside):
    # --images is read recursively: whatever a run writes under it (the demo's NAME.png / NAME_mask.png folders,
    # a later run's files) would be read as training photos the next time
    d = _folder(tmp_path, n=2)
    before = sorted(p.name for p in d.rglob("*"))
    out = d / inside
    assert make_shards.main(["--images", str(d), "--out", str(out), "--size", "16"]) == 2
    assert _errors(caplog) == [f"--out {out} is inside --images {d}; choose a folder outside it"]
    demo = subprocess.run([sys.executable, str(REPO / "scripts" / "demo.py"), "--images", str(d), "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert demo.returncode == 2 and f"--out {out} is inside --images {d}" in demo.stderr
    assert sorted(p.name for p in d.rglob("*")) == before  # nothing written


def test_small_photos_enlarged_to_size_are_counted_and_min_size_skips_them(tmp_path, caplog):
    d = _folder(tmp_path, n=2)  # 60 x 40
    Image.fromarray(np.full((8, 12, 3), 200, np.uint8)).save(d / "tiny.png")
    for name in ("img0", "img1", "tiny"):
        (d / f"{name}.txt").write_text("a photo")
    with caplog.at_level(logging.WARNING):
        assert make_shards.main(["--images", str(d), "--out", str(tmp_path / "a"), "--size", "32"]) == 0
    warning = [m for m in caplog.messages if "enlarged" in m]  # only tiny.png (8 px) is below 32: 4x
    assert len(warning) == 1 and warning[0].startswith("1 image(s) had a short side below --size 32")
    assert f"{d / 'tiny.png'}, 12x8, 4.0x" in warning[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert make_shards.main(["--images", str(d), "--out", str(tmp_path / "b"), "--size", "64",
                                 "--min-size", "20"]) == 0
    assert any(f"skipped {d / 'tiny.png'}: too_small: 12x8: short side below --min-size 20" in m
               for m in caplog.messages)
    assert any(m.startswith("2 image(s) had a short side below --size 64") for m in caplog.messages)
    assert any("1 input(s) skipped: 1 too_small" in m for m in caplog.messages)
