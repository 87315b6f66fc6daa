"""Bad data on disk is skipped, counted in the right bucket, and never stops a run unless it dominates."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from webdataset import TarWriter

from ldm.data.laion import WebDataModuleFromConfig
from ldm.data.stats import BAD_REASONS, BadDataError


def _jpeg(i: int, w: int = 48, h: int = 40) -> bytes:
    arr = np.random.default_rng(i).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _meta(i: int, **over) -> bytes:
    return json.dumps({"original_width": 600, "original_height": 500, "punsafe": 0.0, "key": i, **over}).encode()


def _good(key: str, i: int) -> dict:
    return {"__key__": key, "jpg": _jpeg(i), "txt": f"caption {i}".encode(), "json": _meta(i)}


def _write(path: Path, samples: list[dict]) -> None:
    with TarWriter(str(path)) as sink:
        for s in samples:
            sink.write(s)


def _split(shards) -> dict:
    crop = {"target": "torchvision.transforms.CenterCrop", "params": {"size": 32}}
    return {"shards": shards, "image_transforms": [crop],
            "postprocess": {"target": "ldm.data.laion.AddMask", "params": {"mode": "256train"}}}


@pytest.fixture
def broken_shards(tmp_path) -> tuple[list[str], set[str]]:
    """Four shards: good, every kind of bad sample, truncated mid-member, and a missing file."""
    good_keys = set()
    good = [_good(f"a{i}", i) for i in range(4)]
    good_keys |= {s["__key__"] for s in good}
    _write(tmp_path / "good.tar", good)

    jpg = _jpeg(99)
    bad = [
        _good("b_ok1", 10),
        {"__key__": "b_notjpeg", "jpg": b"this is not an image", "txt": b"x", "json": _meta(1)},
        {"__key__": "b_cutjpeg", "jpg": jpg[: len(jpg) // 2], "txt": b"x", "json": _meta(2)},
        {"__key__": "b_nocaption", "jpg": _jpeg(3), "json": _meta(3)},
        {"__key__": "b_blankcaption", "jpg": _jpeg(4), "txt": b"  \n ", "json": _meta(4)},
        {"__key__": "b_nojson", "jpg": _jpeg(5), "txt": b"x"},
        {"__key__": "b_badjson", "jpg": _jpeg(6), "txt": b"x", "json": b"{not json"},
        {"__key__": "b_nosize", "jpg": _jpeg(7), "txt": b"x", "json": json.dumps({"punsafe": 0.0}).encode()},
        {"__key__": "b_noimage", "txt": b"x", "json": _meta(8)},
        {"__key__": "b_small", "jpg": _jpeg(9), "txt": b"x", "json": _meta(9, original_width=30)},
        _good("b_ok2", 11),
    ]
    good_keys |= {"b_ok1", "b_ok2"}
    _write(tmp_path / "bad.tar", bad)

    whole = [_good(f"c{i}", 20 + i) for i in range(4)]
    _write(tmp_path / "full.tar", whole)
    with tarfile.open(tmp_path / "full.tar") as tar:
        third_jpg = next(m for m in tar.getmembers() if m.name == "c2.jpg")
    data = (tmp_path / "full.tar").read_bytes()
    (tmp_path / "truncated.tar").write_bytes(data[: third_jpg.offset_data + 100])  # cut inside c2.jpg
    good_keys |= {"c0", "c1"}

    shards = [str(tmp_path / n) for n in ("good.tar", "bad.tar", "truncated.tar", "missing.tar")]
    return shards, good_keys


# c2 lost its image to the cut and goes on without it: one more missing_image (every sample gets a verdict)
EXPECTED = {"corrupt_image": 2, "missing_caption": 2, "missing_json": 1, "bad_json": 1, "missing_size": 1,
            "missing_image": 2, "too_small": 1, "truncated_tar": 1, "read_error": 1}


@pytest.mark.parametrize("workers", [0, 2])
def test_every_bad_sample_is_skipped_counted_and_good_ones_arrive(broken_shards, workers):
    shards, good_keys = broken_shards
    dm = WebDataModuleFromConfig(batch_size=3, validation=_split(shards), num_workers=workers, min_size=40,
                                 p_unsafe_threshold=0.5)
    keys = [k for batch in dm.val_dataloader() for k in batch["__key__"]]
    assert sorted(keys) == sorted(good_keys)
    stats = dm.data_stats("validation")
    assert {k: v for k, v in stats.items() if v and k not in ("ok", "shards")} == EXPECTED
    assert stats["ok"] == len(good_keys) and stats["shards"] == 3  # the missing file never opens


def test_training_keeps_going_past_bad_data(broken_shards):
    shards, good_keys = broken_shards
    dm = WebDataModuleFromConfig(batch_size=4, train=_split(shards), num_workers=0, min_size=40)
    it = iter(dm.train_dataloader())
    seen = {k for _ in range(10) for k in next(it)["__key__"]}
    assert seen <= good_keys and len(seen) >= 4
    assert dm.data_stats("train")["corrupt_image"] >= 2


def _all_corrupt(tmp_path: Path, n: int = 6) -> str:
    path = tmp_path / "junk.tar"
    _write(path, [{"__key__": f"j{i}", "jpg": b"\xff\xd8 garbage", "txt": b"x", "json": _meta(i)} for i in range(n)])
    return str(path)


@pytest.mark.parametrize("workers", [0, 1])
def test_too_much_bad_data_stops_with_the_shard_named(tmp_path, workers):
    junk = _all_corrupt(tmp_path)
    dm = WebDataModuleFromConfig(batch_size=2, validation=_split([junk]), num_workers=workers,
                                 max_bad_fraction=0.5, bad_check_min_samples=4)
    with pytest.raises(BadDataError, match=r"junk\.tar.*corrupt_image"):
        list(dm.val_dataloader())


def test_policy_filters_never_count_as_bad(tmp_path):
    path = tmp_path / "small.tar"
    _write(path, [{"__key__": f"s{i}", "jpg": _jpeg(i), "txt": b"x", "json": _meta(i, original_width=64)}
                  for i in range(8)])
    dm = WebDataModuleFromConfig(batch_size=2, validation=_split([str(path)]), num_workers=0, min_size=512,
                                 max_bad_fraction=0.0, bad_check_min_samples=1)
    assert list(dm.val_dataloader()) == []
    assert dm.data_stats("validation")["too_small"] == 8
    assert set(EXPECTED) - {"too_small"} <= set(BAD_REASONS)


def test_an_infinite_stream_that_rejects_everything_fails_loudly(tmp_path):
    path = tmp_path / "small.tar"
    _write(path, [{"__key__": f"s{i}", "jpg": _jpeg(i), "txt": b"x", "json": _meta(i, original_width=64)}
                  for i in range(4)])
    dm = WebDataModuleFromConfig(batch_size=2, train=_split([str(path)]), num_workers=0, min_size=512,
                                 bad_check_min_samples=20)
    with pytest.raises(BadDataError, match="too_small"):
        next(iter(dm.train_dataloader()))
