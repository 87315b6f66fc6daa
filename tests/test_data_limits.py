"""Real shards through the training pipeline and the evaluation readers: decoded-size filters, aspect and pixel
limits before any resize, 16-bit images, non-UTF-8 captions; every skip counted under its reason and named."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from webdataset import TarWriter

from ldm.data.laion import WebDataModuleFromConfig
from ldm.eval.data import SkipLog, load_folder, load_shards


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(w: int, h: int, seed: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _meta(w: int = 1000, h: int = 1000) -> bytes:
    return json.dumps({"original_width": w, "original_height": h}).encode()


def _write(path: Path, samples: list[dict]) -> str:
    with TarWriter(str(path)) as sink:
        for s in samples:
            sink.write(s)
    return str(path)


def _split(shards: list[str], image_key: str = "png") -> dict:
    return {"shards": shards, "image_key": image_key, "image_transforms": [
        {"target": "torchvision.transforms.Resize", "params": {"size": 32}},
        {"target": "torchvision.transforms.CenterCrop", "params": {"size": 32}}]}


@pytest.fixture
def shard(tmp_path) -> str:
    grey16 = np.full((40, 40), 32768, np.uint16)
    return _write(tmp_path / "limits.tar", [
        {"__key__": "grey16", "png": _png(grey16), "txt": b"grey", "json": _meta()},
        {"__key__": "tiny_liar", "png": _png(np.zeros((1, 1, 3), np.uint8)), "txt": b"x", "json": _meta(600, 600)},
        {"__key__": "strip", "png": _png(np.zeros((8, 16000), np.uint8)), "txt": b"x", "json": _meta()},
        {"__key__": "big", "png": _png(np.zeros((300, 300), np.uint8)), "txt": b"x", "json": _meta()},
        {"__key__": "latin1", "png": _png(np.zeros((40, 40), np.uint8)), "txt": "café".encode("latin-1"),
         "json": _meta()},
        {"__key__": "rgba", "png": _png(np.zeros((40, 50, 4), np.uint8)), "txt": b"clear", "json": _meta()},
    ])


def test_limits_and_decoded_sizes_in_the_training_pipeline(shard):
    dm = WebDataModuleFromConfig(batch_size=8, num_workers=0, validation=_split([shard]), min_size=8,
                                 max_pixels=50_000, max_aspect_ratio=10.0)
    batches = list(dm.val_dataloader())
    got = {k: img for b in batches for k, img in zip(b["__key__"], b["png"])}
    assert sorted(got) == ["grey16", "rgba"]
    # 32768 of 65535 -> 128 of 255 -> 128 / 255 * 2 - 1 in the model's range (was white: +1.0)
    assert got["grey16"].unique().tolist() == pytest.approx([128 / 255 * 2 - 1], abs=1e-6)
    assert got["rgba"].unique().tolist() == [1.0]  # fully transparent composites on white
    stats = dm.data_stats("validation")
    assert {k: v for k, v in stats.items() if v and k != "shards"} == {
        "ok": 2, "too_small": 1, "extreme_aspect": 1, "too_large": 1, "bad_caption": 1}


def test_without_an_aspect_limit_the_strip_is_stopped_by_its_resize_size(shard):
    # short side 8 -> 32 makes the strip 64000 x 32 = 2,048,000 pixels, over max_pixels: refused before decoding
    dm = WebDataModuleFromConfig(batch_size=8, num_workers=0, validation=_split([shard]), max_pixels=1_000_000,
                                 max_aspect_ratio=None)
    keys = [k for b in dm.val_dataloader() for k in b["__key__"]]
    assert "strip" not in keys and "big" in keys and "tiny_liar" in keys  # no min_size: upscaled as configured
    assert dm.data_stats("validation")["too_large"] == 1


def test_limit_settings_are_checked():
    from ldm.util import ConfigError

    with pytest.raises(ConfigError, match="max_aspect_ratio"):
        WebDataModuleFromConfig(max_aspect_ratio=0.5)
    with pytest.raises(ConfigError, match="max_pixels"):
        WebDataModuleFromConfig(max_pixels=0)


# ------------------------------------------------------------------------------------- the evaluation readers
def test_evaluation_shards_skip_count_and_name_bad_samples(tmp_path, caplog):
    good = _write(tmp_path / "00000.tar", [
        {"__key__": "a", "jpg": _jpeg(40, 36, 1), "txt": b"first"},
        {"__key__": "corrupt", "jpg": _jpeg(40, 36, 2)[:200], "txt": b"cut"},
        {"__key__": "latin1", "jpg": _jpeg(40, 36, 3), "txt": "naïve".encode("latin-1")},
        {"__key__": "nocaption", "jpg": _jpeg(40, 36, 4)},
        {"__key__": "noimage", "txt": b"text only"},
        {"__key__": "b", "png": _png(np.full((36, 40), 32768, np.uint16)), "txt": b"second"},
    ])
    full = _write(tmp_path / "full.tar", [{"__key__": f"t{i}", "jpg": _jpeg(40, 36, 10 + i), "txt": b"t"}
                                          for i in range(3)])
    data = Path(full).read_bytes()
    Path(tmp_path / "00001.tar").write_bytes(data[: len(data) // 2])
    skips = SkipLog()
    with caplog.at_level(logging.WARNING):
        images = load_shards([good, str(tmp_path / "00001.tar")], 32, skips=skips)
    keys = [im.key for im in images]
    assert keys[:3] == ["a", "nocaption", "b"] and set(keys[3:]) <= {"t0", "t1"}
    assert [im.caption for im in images[:3]] == ["first", "", "second"]
    assert np.unique(images[2].image).tolist() == [128]
    assert skips.counts["corrupt_image"] == 1 and skips.counts["bad_caption"] == 1
    assert skips.counts["missing_image"] == 1 and skips.counts["truncated_tar"] == 1
    named = {(Path(src).name, reason, detail.split(":")[0]) for src, reason, detail in skips.skipped}
    assert {("00000.tar", "corrupt_image", "corrupt"), ("00000.tar", "bad_caption", "latin1"),
            ("00000.tar", "missing_image", "noimage")} <= named
    assert "00000.tar" in caplog.text and "latin1" in caplog.text


def test_evaluation_folder_skips_unreadable_files(tmp_path):
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "ok.png")
    (tmp_path / "broken.jpg").write_bytes(_jpeg(40, 40)[:100])
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "badtxt.png")
    (tmp_path / "badtxt.txt").write_bytes("\xe9t\xe9".encode("latin-1"))
    skips = SkipLog()
    images = load_folder(tmp_path, 32, skips=skips)
    assert [im.key for im in images] == ["ok"]
    assert skips.counts["corrupt_image"] == 1 and skips.counts["bad_caption"] == 1
    assert {Path(d.split(":")[0]).name for _, _, d in skips.skipped} == {"broken.jpg", "badtxt.png"}
