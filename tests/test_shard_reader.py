"""The tar shard reader on damaged shards: every good sample once, every fault counted, resumable at any sample.

The property test builds valid shards, damages them at random (dropped and duplicated members, byte flips in
headers and data, truncation) and checks the pipeline against an independent model of what must come out.
"""

from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
import random
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldm.data.laion import WebDataModuleFromConfig
from ldm.data.shards import POS_KEY, ShardReader, read_groups
from ldm.data.stats import COUNTERS, BadDataMonitor, SharedCounts

SIZE = 16


def _jpeg(i: int) -> bytes:
    arr = np.random.default_rng(i).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


JPEGS = [_jpeg(i) for i in range(8)]


def _sample(key: str, i: int) -> list[tuple[str, bytes]]:
    meta = json.dumps({"key": key, "original_width": SIZE, "original_height": SIZE}).encode()
    return [(f"{key}.jpg", JPEGS[i % len(JPEGS)]), (f"{key}.txt", f"caption {i}".encode()), (f"{key}.json", meta)]


def _tar(members: list[tuple[str, bytes]], fmt: int = tarfile.USTAR_FORMAT) -> tuple[bytes, list[tuple[int, int]]]:
    """Tar bytes plus (header offset, data offset) of each member."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    raw = buf.getvalue()
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        layout = [(m.offset, m.offset_data) for m in tar.getmembers()]
    return raw, layout


def _module(shards: list[str]) -> WebDataModuleFromConfig:
    return WebDataModuleFromConfig(batch_size=4, num_workers=0, validation={"shards": shards},
                                   max_bad_fraction=1.0)


def _deliver(shards: list[str]) -> tuple[list[str], dict[str, int]]:
    dm = _module(shards)
    keys = [k for batch in dm.val_dataloader() for k in batch["__key__"]]
    return keys, {k: v for k, v in dm.data_stats("validation").items() if v}


def _verdict(group: dict[str, bytes]) -> str:
    """What the sample checks make of a group (no filters configured, so json is optional)."""
    if "jpg" not in group:
        return "missing_image"
    if "txt" not in group:
        return "missing_caption"
    try:
        if not group["txt"].decode("utf-8").strip():
            return "missing_caption"
    except UnicodeDecodeError:
        return "bad_caption"
    if "json" in group:
        try:
            if not isinstance(json.loads(group["json"]), dict):
                return "bad_json"
        except ValueError:
            return "bad_json"
    try:
        with Image.open(io.BytesIO(group["jpg"])) as img:
            img.load()
    except Exception:
        return "corrupt_image"
    return "ok"


def _model(members, layout, header_flips: set[int], data: list[bytes], cut: int | None, size: int):
    """Independent model of the reader: expected delivered keys and counts for a damaged tar.

    A member is seen when its whole header lies before the cut and passed its checksum; it brings its data when
    the data lies wholly before the cut too (else the archive ends there). Seen members group by consecutive key
    with distinct extensions; the first group of a key is judged, later ones are duplicates.
    """
    counts: dict[str, int] = {"shards": 1}
    seen_valid, corrupt_runs, in_run = 0, 0, False
    groups: list[dict] = []
    ended = False
    for i, ((name, _), (hdr, dat)) in enumerate(zip(members, layout)):
        if cut is not None and hdr + 512 > cut:
            ended = True
            break
        if i in header_flips:
            corrupt_runs += 0 if in_run else 1
            in_run = True
            continue
        in_run = False
        seen_valid += 1
        key, ext = name.split(".", 1)
        if not groups or groups[-1]["__key__"] != key or ext in groups[-1]:
            groups.append({"__key__": key})
        if cut is not None and dat + len(data[i]) > cut:
            ended = True
            break
        groups[-1][ext] = data[i]
    end_block = (layout[-1][1] + len(members[-1][1]) + 511) // 512 * 512
    zero_block_before_cut = cut is None or cut >= end_block + 512
    if not seen_valid and not zero_block_before_cut:
        return [], {"shards": 1, "read_error": 1}
    if corrupt_runs:
        counts["corrupt_header"] = corrupt_runs
    if ended or not zero_block_before_cut:
        counts["truncated_tar"] = 1
    delivered, keys = [], set()
    for g in groups:
        key = g.pop("__key__")
        if key in keys:
            reason = "duplicate_key"
        else:
            keys.add(key)
            reason = _verdict(g)
            if reason == "ok":
                delivered.append(key)
        counts[reason] = counts.get(reason, 0) + 1
    return delivered, counts


def _damage(rng: random.Random, n_samples: int):
    members = [m for i in range(n_samples) for m in _sample(f"s{i:02d}", i)]
    for _ in range(rng.randint(0, 2)):  # member-level damage
        op = rng.choice(["drop", "dup_member", "dup_sample"])
        if op == "drop" and len(members) > 1:
            members.pop(rng.randrange(len(members)))
        elif op == "dup_member":
            members.insert(rng.randrange(len(members) + 1), members[rng.randrange(len(members))])
        else:
            i = rng.randrange(n_samples)
            members[rng.randrange(len(members) + 1):0] = _sample(f"s{i:02d}", i)
    raw, layout = _tar(members)
    buf = bytearray(raw)
    data = [d for _, d in members]
    header_flips: set[int] = set()
    for _ in range(rng.randint(0, 3)):  # byte flips in a header or in data
        i = rng.randrange(len(members))
        if rng.random() < 0.4:
            buf[layout[i][0] + rng.randrange(512)] ^= 0x80
            header_flips.add(i)
        else:
            j = rng.randrange(len(data[i]))
            buf[layout[i][1] + j] ^= 0x80
            d = bytearray(data[i])
            d[j] ^= 0x80
            data[i] = bytes(d)
    cut = rng.randrange(len(buf)) if rng.random() < 0.5 else None
    return members, layout, header_flips, data, cut, bytes(buf if cut is None else buf[:cut])


def test_damaged_shards_deliver_exactly_the_good_samples_and_count_the_rest(tmp_path):
    rng = random.Random(1234)
    for trial in range(120):
        members, layout, header_flips, data, cut, raw = _damage(rng, n_samples=4)
        path = tmp_path / f"{trial:03d}.tar"
        path.write_bytes(raw)
        expect_keys, expect_counts = _model(members, layout, header_flips, data, cut, len(raw))
        keys, counts = _deliver([str(path)])
        what = f"trial {trial}: cut={cut} header_flips={sorted(header_flips)} members={[m[0] for m in members]}"
        assert keys == expect_keys, what  # in order, none twice
        assert counts == expect_counts, what
        # every group got exactly one verdict: delivered + bad + filtered + duplicates = groups formed
        assert counts.get("ok", 0) == len(keys) == len(set(keys))

        # resuming at any sample boundary continues with exactly the rest, and the counts add up
        table = SharedCounts(2)
        whole = BadDataMonitor(table.row(0), 1.0, 10**9, "whole")
        groups, offsets, snaps = [], [], []
        reader = ShardReader(str(path), whole, index=0)
        for g in reader:
            groups.append(g)
            offsets.append(reader.next_offset)
            snaps.append(whole.counts())
        if not groups:
            continue
        k = rng.randrange(len(groups))
        if offsets[k] is not None:
            rest = BadDataMonitor(table.row(1), 1.0, 10**9, "rest")
            assert list(ShardReader(str(path), rest, start=offsets[k], index=0)) == groups[k + 1 :], what
            combined = {c: snaps[k].get(c, 0) + rest.counts().get(c, 0) for c in COUNTERS}
            assert {c: v for c, v in combined.items() if v} == whole.counts(), what
        # a shuffle buffer refill reads back the very same samples
        for url in [str(path)] + ([f"pipe:cat {path}"] if trial % 10 == 0 else []):  # by seeks; read forward
            again = read_groups(url, [g[POS_KEY][1] for g in groups], index=0)
            assert [{**again[g[POS_KEY][1]], "__url__": g["__url__"]} for g in groups] == groups, what


def _good_tar(path: Path, n: int = 5, fmt: int = tarfile.USTAR_FORMAT, prefix: str = "k") -> list[str]:
    raw, _ = _tar([m for i in range(n) for m in _sample(f"{prefix}{i}", i)], fmt)
    path.write_bytes(raw)
    return [f"{prefix}{i}" for i in range(n)]


@pytest.mark.parametrize("suffix, compress", [(".tar.gz", gzip.compress), (".tgz", gzip.compress),
                                              (".tar.bz2", bz2.compress), (".tar.xz", lzma.compress)])
def test_compressed_shards_are_read_whole_and_counted_right(tmp_path, suffix, compress):
    plain = tmp_path / "plain.tar"
    keys = _good_tar(plain)
    packed = tmp_path / f"00000{suffix}"
    packed.write_bytes(compress(plain.read_bytes()))
    got, counts = _deliver([str(packed)])
    assert got == keys and counts == {"ok": 5, "shards": 1}
    got, counts = _deliver([f"pipe:cat {packed}"])  # not seekable: read forward
    assert got == keys and counts == {"ok": 5, "shards": 1}
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(packed.read_bytes()[: len(packed.read_bytes()) * 2 // 3])
    got, counts = _deliver([str(cut)])
    if suffix == ".tar.bz2":  # bzip2 decodes 900 kB blocks whole: a cut first block yields nothing readable
        assert got == [] and counts == {"shards": 1, "read_error": 1}
    else:
        assert got == keys[: len(got)] and 0 < len(got) < 5
        assert counts.pop("shards") == 1 and counts.pop("ok") == len(got) and counts.pop("truncated_tar") == 1
        assert sum(counts.values()) <= 1 and set(counts) <= {"missing_image", "missing_caption"}  # the cut sample


def test_a_repeated_key_is_delivered_once_and_counted(tmp_path):
    members = _sample("a", 0) + _sample("b", 1) + _sample("a", 2) + _sample("b", 1) + _sample("c", 3)
    path = tmp_path / "dup.tar"
    path.write_bytes(_tar(members)[0])
    keys, counts = _deliver([str(path)])
    assert keys == ["a", "b", "c"] and counts == {"ok": 3, "shards": 1, "duplicate_key": 2}
    dm = _module([str(path)])
    first_a = next(iter(dm.val_dataloader()))["txt"][0]
    assert first_a == "caption 0"  # the first occurrence wins


def test_a_corrupt_header_costs_one_member_not_the_rest_of_the_shard(tmp_path):
    members = [m for i in range(5) for m in _sample(f"k{i}", i)]
    raw, layout = _tar(members)
    buf = bytearray(raw)
    buf[layout[3][0] + 10] ^= 0x01  # the header of k1.jpg
    path = tmp_path / "flip.tar"
    path.write_bytes(bytes(buf))
    with tarfile.open(path) as tar:  # what webdataset's reader sees: the archive silently ends there
        assert [m.name for m in tar.getmembers()] == ["k0.jpg", "k0.txt", "k0.json"]
    keys, counts = _deliver([str(path)])
    assert keys == ["k0", "k2", "k3", "k4"]
    assert counts == {"ok": 4, "shards": 1, "corrupt_header": 1, "missing_image": 1}


def test_trailing_garbage_and_missing_end_blocks(tmp_path):
    good = tmp_path / "good.tar"
    keys = _good_tar(good)
    raw = good.read_bytes()
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(raw + b"\x01" * 512)  # junk after the end-of-archive blocks
    assert _deliver([str(garbage)]) == (keys, {"ok": 5, "shards": 1, "corrupt_header": 1})
    end = _tar([m for i in range(5) for m in _sample(f"k{i}", i)])[1][-1][1] + 512  # past the last member's data
    no_end = tmp_path / "no_end.tar"
    no_end.write_bytes(raw[:end])  # cut exactly at a member boundary: nothing but the end block is missing
    assert _deliver([str(no_end)]) == (keys, {"ok": 5, "shards": 1, "truncated_tar": 1})
    for name, content in (("empty.tar", b""), ("html.tar", b"<html>404 not found</html>" * 40)):
        (tmp_path / name).write_bytes(content)
        assert _deliver([str(tmp_path / name)]) == ([], {"shards": 1, "read_error": 1})


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_long_member_names_group_and_resume(tmp_path, fmt):
    prefix = "very/long/" + "x" * 120 + "/key"
    path = tmp_path / "long.tar"
    keys = _good_tar(path, n=3, fmt=fmt, prefix=prefix)
    assert _deliver([str(path)]) == (keys, {"ok": 3, "shards": 1})
    mon = BadDataMonitor(SharedCounts(1).row(0), 1.0, 10**9, "t")
    reader = ShardReader(str(path), mon, index=0)
    it = iter(reader)
    first = next(it)
    rest = list(ShardReader(str(path), mon, start=reader.next_offset, index=0))
    assert [first["__key__"]] + [g["__key__"] for g in rest] == keys
