"""Saving and restoring the position of shard streams: exact continuation, cost bounded by the buffer, and a
loud reseed when the saved position does not fit the run."""

from __future__ import annotations

import io
import logging
import pickle
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from webdataset import TarWriter

from ldm.data.laion import WebDataModuleFromConfig
from ldm.data.shard_writer import Record, brace_pattern, write_shards
from ldm.data.tarstream import TarScanner

MASK = {"target": "ldm.data.laion.AddMask", "params": {"mode": "256train", "p_drop": 0.25}}
CROP = [{"target": "torchvision.transforms.RandomCrop", "params": {"size": 16}}]


def _records(n: int, start: int = 0, side: int = 24) -> list[Record]:
    rng = np.random.default_rng(start)
    return [Record(Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)), f"picture {i}", f"t://{i}")
            for i in range(start, start + n)]


@pytest.fixture
def shards(tmp_path) -> str:
    """Six shards of seven samples; shard 2 also holds a corrupt image and a repeated key (counts must continue)."""
    paths = write_shards(_records(42), tmp_path, samples_per_shard=7, size=None, resize_mode="no")
    good = [s for s in _tar_samples(paths[2])]
    bad = {"__key__": "bad", "jpg": b"not a jpeg", "txt": b"broken", "json": b"{}"}
    with TarWriter(str(paths[2])) as sink:
        for s in good[:3] + [bad] + good[3:] + [good[1]]:
            sink.write(s)
    return brace_pattern(paths)


def _tar_samples(path: Path) -> list[dict]:
    import tarfile

    out: dict[str, dict] = {}
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            out.setdefault(key, {"__key__": key})[ext] = tar.extractfile(m).read()
    return list(out.values())


def _module(pattern: str, workers: int, **kw) -> WebDataModuleFromConfig:
    split = {"shards": pattern, "image_transforms": CROP, "postprocess": MASK}
    kw.setdefault("train", {**split, "shuffle": 10})
    kw.setdefault("validation", {**split, "shuffle": 5})
    return WebDataModuleFromConfig(batch_size=4, num_workers=workers, max_bad_fraction=1.0, **kw)


def _equal(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(x["__key__"] == y["__key__"] and torch.equal(x["jpg"], y["jpg"])
                                    and torch.equal(x["mask"], y["mask"]) for x, y in zip(a, b))


@pytest.mark.parametrize("workers", [0, 2])
def test_a_restored_stream_continues_exactly(shards, workers):
    straight = _module(shards, workers)
    it = iter(straight.train_dataloader())
    train_ref = [next(it) for _ in range(10)]
    val_ref = list(straight.val_dataloader())

    first = _module(shards, workers)
    it = iter(first.train_dataloader())
    head = [next(it) for _ in range(4)]
    vit = iter(first.val_dataloader())
    vhead = [next(vit) for _ in range(3)]
    state = first.state_dict()
    assert len(pickle.dumps(state)) < 20_000  # positions and a few numbers, no image bytes
    buf = io.BytesIO()
    torch.save(state, buf)  # through a checkpoint file, loaded the strict way
    state = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)

    resumed = _module(shards, workers)
    resumed.load_state_dict(state)
    it = iter(resumed.train_dataloader())
    assert _equal(head + [next(it) for _ in range(6)], train_ref)
    vtail = list(resumed.val_dataloader())
    assert _equal(vhead + vtail, val_ref)  # the finite (evaluation) stream resumes the same way
    keys = [k for b in val_ref for k in b["__key__"]]
    assert len(keys) == len(set(keys)) == 6 * 7 and any(len(b["__key__"]) < 4 for b in val_ref)
    # the skip counts continue from the saved ones: the resumed pass ends with the uninterrupted pass's totals
    assert resumed.data_stats("validation") == straight.data_stats("validation")
    counts = straight.data_stats("validation")
    assert counts["corrupt_image"] == 1 and counts["duplicate_key"] == 1 and counts["ok"] == 42


def test_resume_reads_only_headers_and_the_buffered_samples(tmp_path, monkeypatch):
    pattern = brace_pattern(write_shards(_records(120, side=40), tmp_path, 60, size=None, resize_mode="no"))
    split = {"shards": pattern, "image_transforms": CROP, "postprocess": MASK, "shuffle": 16}
    ref = _module(pattern, 0, validation=split)
    it = iter(ref.val_dataloader())
    head = [next(it) for _ in range(12)]  # 48 of the 120 samples delivered
    state = ref.state_dict()
    following = next(it)

    data_read: list[str] = []
    decoded: list[str] = []
    real_read = TarScanner.read
    monkeypatch.setattr(TarScanner, "read", lambda self, m: data_read.append(m.name) or real_read(self, m))
    resumed = _module(pattern, 0, validation=split)
    processor = resumed.splits["validation"].processor
    real_call = type(processor).__call__
    monkeypatch.setattr(type(processor), "__call__",
                        lambda self, raw, *a: decoded.append(raw["__key__"]) or real_call(self, raw, *a))
    resumed.load_state_dict(state)
    batch = next(iter(resumed.val_dataloader()))

    assert _equal([batch], [following])
    consumed = {k for b in head for k in b["__key__"]}
    read_keys = {name.split(".")[0] for name in data_read}
    assert not read_keys & consumed  # nothing already delivered is read again, let alone decoded
    assert len(read_keys) <= 16 + 4 + 1  # the buffered samples, the next batch's draws, one look-ahead member
    assert decoded == batch["__key__"]  # only the samples of the batch itself are decoded


def _trainer(step: int) -> SimpleNamespace:
    return SimpleNamespace(global_rank=0, world_size=1, global_step=step, training=True, testing=False,
                           validating=False, sanity_checking=False)


def test_a_changed_worker_count_or_shard_list_reseeds_and_says_so_in_one_line(shards, caplog):
    src = _module(shards, 2)
    it = iter(src.train_dataloader())
    [next(it) for _ in range(3)]
    state = src.state_dict()

    def reload(workers: int, pattern: str = shards, **kw) -> tuple[list[str], list[str]]:
        dm = _module(pattern, workers, **kw)
        dm.trainer = _trainer(7)
        dm.load_state_dict(state)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="ldm.data.laion"):
            it = iter(dm.train_dataloader())
        return [k for _ in range(3) for k in next(it)["__key__"]], [r.getMessage() for r in caplog.records]

    reseeded = _module(shards, 0)
    reseeded.set_resume_step(7)
    it = iter(reseeded.train_dataloader())
    expected = [k for _ in range(3) for k in next(it)["__key__"]]

    keys, lines = reload(0)
    assert keys == expected and len(lines) == 1
    assert "num_workers 2 -> 0" in lines[0] and "seeded by step 7" in lines[0] and "not sample-exact" in lines[0]
    fewer = shards.replace("00005", "00004")  # one shard less
    _, lines = reload(2, fewer)
    assert len(lines) == 1 and "shards 6 -> 5" in lines[0]
    dm = _module(shards, 2)
    dm.trainer = _trainer(7)  # a checkpoint without any stream position (older code)
    with caplog.at_level(logging.WARNING, logger="ldm.data.laion"):
        caplog.clear()
        dm.train_dataloader()
    assert len(caplog.records) == 1 and "holds no train stream position" in caplog.records[0].getMessage()


def test_a_rewritten_shard_is_detected_and_the_stream_reseeded(tmp_path, caplog):
    paths = write_shards(_records(8), tmp_path, samples_per_shard=8, size=None, resize_mode="no")
    pattern = brace_pattern(paths)
    src = _module(pattern, 0)
    it = iter(src.train_dataloader())
    [next(it) for _ in range(2)]
    state = src.state_dict()
    write_shards(_records(8, start=100), tmp_path, samples_per_shard=8, size=None, resize_mode="no")
    samples = _tar_samples(paths[0])  # same file name, other pictures ...
    with TarWriter(str(paths[0])) as sink:  # ... and other keys
        for s in samples:
            sink.write({**s, "__key__": "x" + s["__key__"]})
    dm = _module(pattern, 0)
    dm.trainer = _trainer(2)
    dm.load_state_dict(state)
    with caplog.at_level(logging.WARNING):
        batch = next(iter(dm.train_dataloader()))
    assert all(k.startswith("x") for k in batch["__key__"])
    lines = [r.getMessage() for r in caplog.records if "saved data position" in r.getMessage()]
    assert len(lines) == 1 and "seeded by step 2" in lines[0]


def test_in_a_trainer_the_saved_position_is_the_consumed_batch_not_the_prefetched_one(shards):
    straight = _module(shards, 2)
    it = iter(straight.train_dataloader())
    train_ref = [next(it) for _ in range(6)]
    val_loader = straight.val_dataloader()  # Lightning builds it once and iterates it for every pass
    val_passes = [list(val_loader) for _ in range(2)]
    assert not _equal(*val_passes)  # passes shuffle differently: which pass comes next matters

    dm = _module(shards, 2)
    dm.trainer = _trainer(0)
    it = iter(dm.train_dataloader())
    fetched = [next(it)]
    for _ in range(3):  # as Lightning's fetcher does: the next batch is pulled before this one is used
        fetched.append(next(it))
        dm.on_before_batch_transfer(fetched[-2], 0)
    dm.trainer.training, dm.trainer.validating = False, True
    next(iter(dm.val_dataloader()))  # a validation pass under way (Lightning never saves inside one)
    state = dm.state_dict()

    resumed = _module(shards, 2)
    resumed.trainer = _trainer(3)
    resumed.load_state_dict(state)
    it = iter(resumed.train_dataloader())
    assert _equal(fetched[:3] + [next(it) for _ in range(3)], train_ref)  # batch 4 was fetched, not consumed
    assert _equal(list(resumed.val_dataloader()), val_passes[1])  # the next validation pass, from its start


def test_a_new_batch_size_continues_the_same_sample_sequence(shards):
    straight = _module(shards, 0)
    it = iter(straight.train_dataloader())
    ref = [k for _ in range(6) for k in next(it)["__key__"]]
    first = _module(shards, 0)
    it = iter(first.train_dataloader())
    head = [k for _ in range(2) for k in next(it)["__key__"]]
    resumed = _module(shards, 0)
    resumed.batch_size = 2
    resumed.load_state_dict(first.state_dict())
    it = iter(resumed.train_dataloader())
    assert head + [k for _ in range(8) for k in next(it)["__key__"]] == ref
