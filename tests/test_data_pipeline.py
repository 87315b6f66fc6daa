"""WebDataModuleFromConfig over real shards on disk: batch contract, pixels, seeding, splits, filters, config."""

from __future__ import annotations

import io
import logging
import random
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torchvision.transforms as T
from omegaconf import OmegaConf
from PIL import Image

from ldm.data.decode import decode_image, finalize_batch
from ldm.data.laion import WebDataModuleFromConfig
from ldm.data.shard_writer import Record, brace_pattern, write_shards
from ldm.util import ConfigError, instantiate_from_config

REPO = Path(__file__).resolve().parents[1]
SIZE = 32
MASK = {"target": "ldm.data.laion.AddMask", "params": {"mode": "512train-large", "p_drop": 0.25}}


def _image(i: int, w: int = 72, h: int = 56) -> Image.Image:
    """A smooth colour field plus noise, different for every i (so pixels identify the sample)."""
    rng = np.random.default_rng(i)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    base = rng.uniform(0, 255, 3) * (0.5 + 0.5 * np.sin(6 * xx + 4 * yy + i))[..., None]
    return Image.fromarray(np.clip(base + rng.normal(0, 10, (h, w, 3)), 0, 255).astype(np.uint8))


def _shards(tmp: Path, n_shards: int, per_shard: int, meta: dict | None = None) -> str:
    records = [Record(_image(i), f"a test picture number {i}", f"test://{i}", dict(meta or {"punsafe": 0.0}))
               for i in range(n_shards * per_shard)]
    return brace_pattern(write_shards(records, tmp, samples_per_shard=per_shard, size=None, resize_mode="no"))


def _split(pattern, crop: str = "RandomCrop", **extra) -> dict:
    resize = {"target": "torchvision.transforms.Resize", "params": {"size": SIZE, "interpolation": 3}}
    crop_cfg = {"target": f"torchvision.transforms.{crop}", "params": {"size": SIZE}}
    return {"shards": pattern, "image_key": "jpg", "image_transforms": [resize, crop_cfg], "postprocess": MASK,
            **extra}


def _module(pattern, workers=0, **kw) -> WebDataModuleFromConfig:
    kw.setdefault("train", _split(pattern, shuffle=20))
    kw.setdefault("validation", _split(pattern, crop="CenterCrop"))
    return WebDataModuleFromConfig(batch_size=4, num_workers=workers, **kw)


def _take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def test_batch_matches_the_model_contract(tmp_path):
    batch = _take(_module(_shards(tmp_path, 2, 6)).train_dataloader(), 1)[0]
    assert set(batch) == {"jpg", "txt", "json", "mask", "masked_image", "__key__", "__url__"}
    jpg, mask, masked = batch["jpg"], batch["mask"], batch["masked_image"]
    assert jpg.shape == (4, SIZE, SIZE, 3) and jpg.dtype == torch.float32
    assert -1.0 <= jpg.min() and jpg.max() <= 1.0 and jpg.std() > 0.05
    assert mask.shape == (4, SIZE, SIZE, 1) and mask.dtype == torch.float32
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert masked.shape == jpg.shape and torch.equal(masked, jpg * (mask < 0.5))
    assert all(isinstance(t, str) and t.startswith("a test picture") for t in batch["txt"])
    assert all(isinstance(j, dict) and j["original_width"] == 72 for j in batch["json"])
    assert all(u.endswith(".tar") for u in batch["__url__"]) and len(set(map(type, batch["__key__"]))) == 1


def test_validation_pixels_equal_torchvision(tmp_path):
    pattern = _shards(tmp_path, 1, 4)
    batches = list(_module(pattern).val_dataloader())
    tv = T.Compose([T.Resize(SIZE, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(SIZE), T.ToTensor()])
    with tarfile.open(tmp_path / "00000.tar") as tar:
        jpgs = {m.name.split(".")[0]: tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".jpg")}
    for batch in batches:
        for key, img in zip(batch["__key__"], batch["jpg"]):
            expected = (tv(Image.open(io.BytesIO(jpgs[key])).convert("RGB")) * 2 - 1).permute(1, 2, 0)
            assert torch.equal(img, expected), key


def test_random_crop_is_a_window_of_the_resized_image(tmp_path):
    pattern = _shards(tmp_path, 1, 4)
    batch = _take(_module(pattern).train_dataloader(), 1)[0]
    with tarfile.open(tmp_path / "00000.tar") as tar:
        data = {m.name.split(".")[0]: tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".jpg")}
    for key, img in zip(batch["__key__"], batch["jpg"]):
        full = decode_image(data[key]).resize((41, SIZE), Image.Resampling.BICUBIC)  # 72x56 -> short side 32
        arr = torch.from_numpy(np.asarray(full, np.float32) / 255 * 2 - 1)
        assert any(torch.allclose(arr[:, x : x + SIZE], img, atol=1e-6) for x in range(41 - SIZE + 1)), key


def test_training_stream_is_reproducible_per_seed_and_resume_step(tmp_path):
    pattern = _shards(tmp_path, 4, 4)

    def first(seed=0, step=None):
        dm = _module(pattern, workers=2, seed=seed)
        if step is not None:
            dm.set_resume_step(step)
        return _take(dm.train_dataloader(), 3)

    a, b, c, d = first(), first(), first(seed=1), first(step=100)
    for x, y in zip(a, b):
        assert x["__key__"] == y["__key__"]
        assert torch.equal(x["jpg"], y["jpg"]) and torch.equal(x["mask"], y["mask"])
    assert [x["__key__"] for x in a] != [x["__key__"] for x in c]
    assert [x["__key__"] for x in a] != [x["__key__"] for x in d]
    assert [x["__key__"] for x in d] == [x["__key__"] for x in first(step=100)]


def test_validation_is_finite_ordered_complete_and_repeatable(tmp_path):
    pattern = _shards(tmp_path, 3, 5)
    dm = _module(pattern, workers=2)
    passes = [list(dm.val_dataloader()) for _ in range(2)]
    keys = [k for b in passes[0] for k in b["__key__"]]
    assert sorted(keys) == sorted(set(keys)) and len(keys) == 15  # every sample once, partial batches kept
    assert any(len(b["__key__"]) < 4 for b in passes[0])
    for x, y in zip(*passes):
        assert x["__key__"] == y["__key__"] and torch.equal(x["mask"], y["mask"]) and torch.equal(x["jpg"], y["jpg"])
    # validation crops and masks are keyed by the sample, not by the reader layout
    single = {k: m for b in _module(pattern, workers=0).val_dataloader() for k, m in zip(b["__key__"], b["mask"])}
    multi = {k: m for b in passes[0] for k, m in zip(b["__key__"], b["mask"])}
    assert all(torch.equal(single[k], multi[k]) for k in single)


def test_uint8_transport_finalizes_to_the_same_batch(tmp_path):
    pattern = _shards(tmp_path, 1, 8)
    ref = _take(_module(pattern).train_dataloader(), 2)
    fast_dm = _module(pattern, uint8_transport=True)
    fast = _take(fast_dm.train_dataloader(), 2)
    assert fast[0]["jpg"].dtype == torch.uint8 and fast[0]["mask"].dtype == torch.uint8
    for r, f in zip(ref, fast):
        f = fast_dm.on_after_batch_transfer(f, 0)
        for k in ("jpg", "mask", "masked_image"):
            assert f[k].dtype == torch.float32 and torch.equal(r[k], f[k]), k
    assert finalize_batch(ref[0]) is ref[0]  # float batches pass through


def test_filters_count_policy_skips(tmp_path):
    metas = [{"punsafe": 0.0, "pwatermark": 0.1, "aesthetic": 6.0},  # kept
             {"punsafe": 0.5, "pwatermark": 0.1, "aesthetic": 6.0},  # filtered_punsafe
             {"punsafe": 0.0, "pwatermark": 0.9, "aesthetic": 6.0},  # filtered_watermark
             {"punsafe": 0.0, "pwatermark": 0.1, "aesthetic": 3.0},  # filtered_aesthetic
             {"punsafe": 0.0, "pwatermark": 0.1, "AESTHETIC_SCORE": 5.0},  # kept (alternate field name)
             {"pwatermark": 0.1, "aesthetic": 6.0}]  # missing_punsafe
    records = [Record(_image(i), f"picture {i}", f"t://{i}", m) for i, m in enumerate(metas)]
    records.append(Record(_image(6), "an NSFW picture", "t://6", metas[0]))  # filtered_words
    records.append(Record(_image(7, 40, 30), "small picture", "t://7", metas[0]))  # too_small
    pattern = brace_pattern(write_shards(records, tmp_path, 100, size=None, resize_mode="no"))
    kw = dict(p_unsafe_threshold=0.1, max_pwatermark=0.45, min_aesthetic=4.5, min_size=50,
              filter_word_list="data/filters.yaml", validation=_split(pattern, crop="CenterCrop"))
    dm = _module(pattern, **kw)
    keys = [k for b in dm.val_dataloader() for k in b["__key__"]]
    assert keys == ["0000000", "0000004"]  # 5-digit shard id + 2-digit row (100 samples per shard)
    stats = dm.data_stats("validation")
    for reason in ("filtered_punsafe", "filtered_watermark", "filtered_aesthetic", "filtered_words", "too_small",
                   "missing_punsafe"):
        assert stats[reason] == 1, reason
    assert stats["ok"] == 2 and stats["shards"] == 1
    keep = _module(pattern, missing_field_policy="keep", **kw)
    assert [k for b in keep.val_dataloader() for k in b["__key__"]] == ["0000000", "0000004", "0000005"]


def test_official_config_builds_without_touching_network_or_shards(monkeypatch):
    def forbidden(*a, **k):
        raise AssertionError("building the data module must not start processes or open shards")

    monkeypatch.setattr(subprocess, "Popen", forbidden)
    cfg = OmegaConf.load(REPO / "configs" / "stable-diffusion" / "v2-inpainting-inference.yaml").data
    dm = instantiate_from_config(cfg)
    train, val = dm.splits["train"], dm.splits["validation"]
    assert len(train.urls) == 5 * 18700 and len(val.urls) == 94333 - 93001 + 1
    assert train.urls[0] == "pipe:aws s3 cp s3://stability-aws/laion-a-native/part-0/00000.tar -"
    assert val.urls[-1] == "pipe:aws s3 cp s3://deep-floyd-s3/datasets/laion_cleaned-part5/94333.tar -"
    assert train.resampled and not val.resampled and train.shuffle == 10000 and val.shuffle == 0
    post = train.processor.postprocess
    assert (post.mode, post.p_drop) == ("512train-large", 0.25)
    f = dm.metadata_filter
    assert (f.min_size, f.p_unsafe_threshold, f.max_pwatermark) == (512, 0.1, 0.45) and "nsfw" in f.words
    assert train.processor.image_ops[0].interpolation == Image.Resampling.BICUBIC
    assert dm.batch_size == 8 and dm.num_workers == 6 and dm.multinode is True


def test_config_mistakes_raise_config_errors(tmp_path, monkeypatch):
    pattern = _shards(tmp_path, 1, 2)
    with pytest.raises(ConfigError, match="shufle"):
        _module(pattern, train={"shards": pattern, "shufle": 10})
    with pytest.raises(ConfigError, match="shards"):
        _module(pattern, train={"shuffle": 10})
    with pytest.raises(ConfigError, match="interpolation"):
        _module(pattern, train=_split(pattern) | {"image_transforms": [
            {"target": "torchvision.transforms.Resize", "params": {"size": 8, "interpolation": "cubic-ish"}}]})
    with pytest.raises(ConfigError, match="batch_sise"):
        instantiate_from_config({"target": "ldm.data.laion.WebDataModuleFromConfig", "params": {"batch_sise": 2}})
    with pytest.raises(ConfigError, match="filter_word_list"):
        _module(pattern, filter_word_list="data/no_such_list.yaml")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="multinode"):
        _module(pattern, multinode=False).train_dataloader()
    with pytest.raises(ConfigError, match="no 'test' split"):
        _module(pattern).test_dataloader()


def test_env_rank_selects_this_ranks_validation_shards(tmp_path, monkeypatch):
    pattern = _shards(tmp_path, 4, 2)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    urls = {u for b in _module(pattern).val_dataloader() for u in b["__url__"]}
    assert sorted(Path(u).name for u in urls) == ["00001.tar", "00003.tar"]


def test_pipe_urls_and_lists_of_patterns(tmp_path):
    pattern = _shards(tmp_path, 2, 3)
    shards = [f"pipe:cat {tmp_path / '00000.tar'}", str(tmp_path / "00001.tar")]
    dm = _module(pattern, validation=_split(shards, crop="CenterCrop"))
    keys = [k for b in dm.val_dataloader() for k in b["__key__"]]
    assert len(keys) == 6 and len(set(keys)) == 6


def test_local_globs_expand_sorted_and_one_that_matches_nothing_is_a_config_error(tmp_path):
    from ldm.data.shards import expand_shards

    _shards(tmp_path, 3, 2)
    names = [p.name for p in sorted(tmp_path.glob("0000?.tar"))]
    assert [Path(u).name for u in expand_shards(str(tmp_path / "*.tar"))] == names == ["00000.tar", "00001.tar",
                                                                                          "00002.tar"]
    assert [Path(u).name for u in expand_shards([str(tmp_path / "0000[02].tar"), f"pipe:cat {tmp_path}/*.tar"])] == [
        "00000.tar", "00002.tar", "*.tar"]  # a pipe: command is the shell's business
    dm = _module(str(tmp_path / "*.tar"), validation=_split(str(tmp_path / "*.tar"), crop="CenterCrop"))
    assert len({k for b in dm.val_dataloader() for k in b["__key__"]}) == 6
    with pytest.raises(ConfigError, match=r"validation.shards': the glob '.*/nowhere/\*.tar' matches no files"):
        _module(str(tmp_path / "*.tar"), validation=_split(str(tmp_path / "nowhere/*.tar"))).val_dataloader()


def test_loader_leaves_global_rng_alone_and_counts_are_readable(tmp_path, caplog):
    pattern = _shards(tmp_path, 1, 8)
    np.random.seed(5)
    random.seed(5)
    torch.manual_seed(5)
    states = (np.random.get_state()[1].copy(), random.getstate(), torch.get_rng_state())
    dm = _module(pattern)
    _take(dm.train_dataloader(), 3)
    np.testing.assert_array_equal(np.random.get_state()[1], states[0])
    assert random.getstate() == states[1] and torch.equal(torch.get_rng_state(), states[2])
    assert dm.data_stats("train")["ok"] >= 12 and dm.data_stats("test") == {}
    with caplog.at_level(logging.INFO, logger="ldm.data.laion"):
        dm.log_data_stats()
    assert "data train" in caplog.text


class _Recorder(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.seen = []

    def training_step(self, batch, batch_idx):
        self.seen.append((batch["jpg"].dtype, tuple(batch["mask"].shape), batch["masked_image"].dtype))
        return (self.w - batch["jpg"].mean()) ** 2

    def validation_step(self, batch, batch_idx):
        self.seen.append(("val", len(batch["__key__"])))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_fit_sees_float_batches_with_uint8_transport(tmp_path):
    pattern = _shards(tmp_path, 2, 4)
    dm = _module(pattern, uint8_transport=True)
    model = _Recorder()
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, val_check_interval=2, limit_val_batches=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=dm)
    train_seen = [s for s in model.seen if s[0] != "val"]
    assert train_seen == [(torch.float32, (4, SIZE, SIZE, 1), torch.float32)] * 2
    assert ("val", 4) in model.seen
    assert dm.data_stats("train")["ok"] >= 8


def test_jpeg_draft_decodes_large_images_faster_to_the_same_geometry(tmp_path):
    big = [Record(_image(i, 400, 300), f"big picture {i}", f"t://{i}") for i in range(2)]
    pattern = brace_pattern(write_shards(big, tmp_path, 10, size=None, resize_mode="no", quality=95))
    exact = list(_module(pattern).val_dataloader())[0]
    draft = list(_module(pattern, jpeg_draft=True).val_dataloader())[0]
    assert draft["jpg"].shape == exact["jpg"].shape == (2, SIZE, SIZE, 3)
    diff = (draft["jpg"] - exact["jpg"]).abs()
    assert 0 < diff.mean() < 0.05  # a 1/8-scale DCT decode then bicubic: close, not identical


def test_without_a_validation_split_lightning_skips_validation(tmp_path):
    pattern = _shards(tmp_path, 1, 4)
    dm = WebDataModuleFromConfig(batch_size=2, num_workers=0, train=_split(pattern))
    assert dm.val_dataloader() == []
    model = _Recorder()
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=dm)
    assert len(model.seen) == 2 and all(s[0] == torch.float32 for s in model.seen)


@pytest.mark.parametrize("workers, persistent", [(0, False), (2, False), (2, True)])
def test_each_pass_over_the_training_loader_draws_a_new_stream(tmp_path, workers, persistent):
    pattern = _shards(tmp_path, 4, 4)
    loader = _module(pattern, workers=workers, persistent_workers=persistent).train_dataloader()
    first, second = ([k for b in _take(loader, 2) for k in b["__key__"]] for _ in range(2))
    again = [k for b in _take(_module(pattern, workers=workers).train_dataloader(), 2) for k in b["__key__"]]
    assert first != second and first == again


def test_image_transforms_that_break_batching_are_config_errors_named_early(tmp_path, caplog):
    """Tensor transforms are refused when the module is built; a list that leaves sizes free is warned about at
    build time and, at the first batch of two shapes, is a ConfigError (one line in main.py), not a ValueError."""
    records = [Record(_image(i, w=72 if i % 2 else 60), f"picture {i}", f"test://{i}", {"punsafe": 0.0})
               for i in range(4)]  # 72x56 and 60x56: two aspect ratios
    pattern = brace_pattern(write_shards(records, tmp_path, samples_per_shard=4, size=None, resize_mode="no"))
    resize = {"target": "torchvision.transforms.Resize", "params": {"size": SIZE}}
    to_tensor = {"target": "torchvision.transforms.ToTensor"}
    with pytest.raises(ConfigError, match=r"image_transforms\[1\]: torchvision.transforms.ToTensor makes a tensor"):
        _module(pattern, validation={"shards": pattern, "image_transforms": [resize, to_tensor]})

    with caplog.at_level(logging.WARNING, logger="ldm.data.laion"):
        dm = _module(pattern, validation={"shards": pattern, "image_transforms": [resize], "shuffle": 0})
    assert "data.params.validation.image_transforms: no crop after the last Resize" in caplog.text
    assert "data.params.train.image_transforms" not in caplog.text  # the train split crops
    with pytest.raises(ConfigError, match=r"cannot batch 'jpg': shapes differ \[\(32, 34, 3\), \(32, 41, 3\)\]"):
        list(dm.val_dataloader())

    gray = {"target": "torchvision.transforms.Grayscale"}
    for uint8 in (True, False):  # both transports check what the list hands over
        dm = WebDataModuleFromConfig(batch_size=2, num_workers=0, uint8_transport=uint8,
                                     validation={"shards": pattern, "image_transforms": [*_split(pattern)[
                                         "image_transforms"][:1], {"target": "torchvision.transforms.CenterCrop",
                                                                   "params": {"size": SIZE}}, gray]})
        with pytest.raises(ConfigError, match="image_transforms must end with an RGB PIL image, got a L PIL image"):
            list(dm.val_dataloader())


class _RaisesInWorker(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 1

    def __getitem__(self, i: int):
        raise ConfigError("data.params.train.image_transforms: fix me")


def test_a_config_error_from_a_dataloader_worker_is_one_line_in_main():
    import main

    loader = torch.utils.data.DataLoader(_RaisesInWorker(), num_workers=1)
    with pytest.raises(ConfigError) as caught:
        next(iter(loader))
    assert "Original Traceback" in str(caught.value)  # the worker's traceback rides along in the message
    assert main.last_line(caught.value) == "data.params.train.image_transforms: fix me"
    assert main.last_line(ConfigError("plain", key="k")) == "k: plain"
