"""scripts/precompute_latents.py on real JPEG shards with the tiny VAE loaded from a checkpoint file.

Checks: the stored moments equal an independent encode (PIL decode, torchvision resize + centre crop) of each
image; every other member is copied byte for byte and in order; an undecodable image is copied without
moments; the moments give ``LatentInpaintDiffusion.get_input`` the same latent as online encoding; the
script refuses random VAE weights and random transforms. Then the training side on the same shards: the data
module delivers each sample's own moments (through a worker, uint8 transport), refuses transforms that would
not match them, and a Lightning training step on them encodes only the masked image and gives the online loss.
"""

from __future__ import annotations

import importlib.util
import io
import json
import logging
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torchvision.transforms as T
from demo_data import load_manifest, load_photo
from omegaconf import OmegaConf
from PIL import Image
from webdataset import TarWriter

from ldm.data.shard_writer import Record, write_shards
from ldm.data.transforms import Crop, Resize
from ldm.util import ConfigError, instantiate_from_config
from tests.helpers import REPO, build_tiny, synthetic_batch

SIZE = 64  # tiny VAE: f = 8 -> 8 x 8 latents


def _load_script():
    name = "_script_precompute_latents"
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / "precompute_latents.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)
    return module


precompute = _load_script()


def _members(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Two shards of real photos (two non-square: the crop matters), one undecodable sample, a VAE ckpt."""
    root = tmp_path_factory.mktemp("latents")
    photos = load_manifest()[:3]
    records = [Record(load_photo(p), p.caption, p.url, {"punsafe": 0.0}) for p in photos]
    write_shards(records, root / "in", samples_per_shard=2, size=96, resize_mode="keep_ratio")
    with TarWriter(str(root / "in" / "00002.tar")) as sink:
        sink.write({"__key__": "00002broken", "jpg": b"not a jpeg", "txt": b"broken", "json": b"{}"})
    torch.manual_seed(0)
    model = build_tiny("inpaint")
    sd = {f"first_stage_model.{k}": v for k, v in model.first_stage_model.state_dict().items()}
    torch.save({"state_dict": sd}, root / "vae.ckpt")
    out = root / "out"
    code = precompute.main(["--config", str(REPO / "configs/tiny/inpaint.yaml"), "--ckpt",
                            str(root / "vae.ckpt"), "--shards", str(root / "in" / "{00000..00002}.tar"),
                            "--out", str(out), "--size", str(SIZE), "--batch-size", "2", "--device", "cpu"])
    assert code == 0
    return root, model


def _reference_input(jpg: bytes) -> torch.Tensor:
    """torchvision's Resize(64, bicubic) + CenterCrop(64), ToTensor * 2 - 1: 1 x 3 x 64 x 64."""
    img = Image.open(io.BytesIO(jpg)).convert("RGB")
    img = T.CenterCrop(SIZE)(T.Resize(SIZE, interpolation=T.InterpolationMode.BICUBIC)(img))
    return (T.ToTensor()(img) * 2 - 1)[None]


def test_moments_equal_an_independent_encode_of_the_centre_crop(workdir):
    root, model = workdir
    checked = 0
    for shard in ("00000.tar", "00001.tar"):
        members = dict(_members(root / "out" / shard))
        for name, data in members.items():
            if not name.endswith(".jpg"):
                continue
            key = name.removesuffix(".jpg")
            stored = np.load(io.BytesIO(members[f"{key}.latent_moments.npy"]))
            assert stored.dtype == np.float16 and stored.shape == (8, SIZE // 8, SIZE // 8)
            with torch.no_grad():
                ref = model.first_stage_model.encode(_reference_input(data)).parameters[0]
            assert ref.abs().mean() > 1e-2  # a real signal, not zeros
            torch.testing.assert_close(torch.from_numpy(stored).float(), ref, atol=2e-3, rtol=2e-3)
            checked += 1
    assert checked == 3


def test_members_copied_unchanged_in_order_and_broken_image_without_moments(workdir):
    root, _ = workdir
    for shard in ("00000.tar", "00001.tar", "00002.tar"):
        before, after = _members(root / "in" / shard), _members(root / "out" / shard)
        kept = [(n, d) for n, d in after if not n.endswith(".latent_moments.npy")]
        assert kept == before  # same names, same bytes, same order
        keys_with_jpg = {n.removesuffix(".jpg") for n, _ in before if n.endswith(".jpg")}
        keys_with_moments = {n.removesuffix(".latent_moments.npy") for n, _ in after
                             if n.endswith(".latent_moments.npy")}
        assert keys_with_moments == (keys_with_jpg - {"00002broken"})
    meta = json.loads((root / "out" / "latent_moments.json").read_text())
    assert meta["dtype"] == "float16" and meta["member"] == "latent_moments.npy"
    assert "random=False" in meta["transforms"][1]


def test_precomputed_moments_give_the_online_latent(workdir):
    root, model = workdir
    members = dict(_members(root / "out" / "00000.tar"))
    keys = sorted(n.removesuffix(".jpg") for n in members if n.endswith(".jpg"))
    images = torch.cat([_reference_input(members[f"{k}.jpg"]) for k in keys])  # B x 3 x H x W
    batch = synthetic_batch(len(keys), SIZE)
    batch["jpg"] = images.permute(0, 2, 3, 1)  # B x H x W x 3, the loader's layout
    moments = torch.stack([torch.from_numpy(np.load(io.BytesIO(members[f"{k}.latent_moments.npy"])))
                           for k in keys])  # B x 8 x h x w (float16, as collated)
    torch.manual_seed(1)
    z_online, _ = model.get_input(batch, "jpg")
    torch.manual_seed(1)
    z_pre, _ = model.get_input({**batch, "latent_moments": moments}, "jpg")
    assert z_pre.dtype == torch.float32
    torch.testing.assert_close(z_pre, z_online, atol=5e-3, rtol=5e-3)


def test_refuses_random_weights_and_random_transforms(tmp_path, caplog):
    args = ["--config", str(REPO / "configs/tiny/inpaint.yaml"), "--shards", str(tmp_path / "x.tar"),
            "--out", str(tmp_path / "o"), "--size", "64", "--device", "cpu"]
    assert precompute.main(args) == 2
    assert "--ckpt is required" in caplog.text
    random_ops = [{"target": "torchvision.transforms.Resize", "params": {"size": 64}},
                  {"target": "torchvision.transforms.RandomCrop", "params": {"size": 64}}]
    ops = precompute.deterministic_transforms(random_ops, None)
    assert isinstance(ops[0], Resize) and ops[1] == Crop(64, random=False)
    with pytest.raises(ConfigError, match="random or unknown"):
        flip = {"target": "torchvision.transforms.RandomHorizontalFlip"}
        precompute.deterministic_transforms([*random_ops, flip], None)


def test_output_file_and_missing_device_are_one_line(tmp_path, caplog):
    (tmp_path / "a_file").write_text("")
    base = ["--config", str(REPO / "configs/tiny/inpaint.yaml"), "--shards", str(tmp_path / "x.tar"), "--size", "64",
            "--random-vae"]
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for extra, expected in ((["--out", str(tmp_path / "a_file")], "--out"),
                            (["--out", str(tmp_path / "o"), "--device", f"cuda:{gpus}"], "--device cuda")):
        caplog.clear()
        assert precompute.main([*base, *extra]) == 2
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1 and expected in errors[0], errors


# --------------------------------------------------------------------------- the training data path uses them
def _data_config(shards: str, transforms: list[dict] | None = None, **params):
    """configs/tiny/inpaint_shards.yaml's data section on ``shards``, with the fixed crop the latents were made
    with (its RandomCrop would not match them), one worker and the uint8 transport."""
    cfg = OmegaConf.load(REPO / "configs" / "tiny" / "inpaint_shards.yaml").data
    cfg.params.train.shards = shards
    cfg.params.train.shuffle = 0
    cfg.params.train.image_transforms = transforms if transforms is not None else [
        {"target": "torchvision.transforms.Resize", "params": {"size": SIZE, "interpolation": 3}},
        {"target": "torchvision.transforms.CenterCrop", "params": {"size": SIZE}}]
    cfg.params.update({"batch_size": 2, "num_workers": 1, "uint8_transport": True, **params})
    return cfg


def _first_batch(dm) -> dict:
    batch = next(iter(dm.train_dataloader()))
    return dm.finalize_batch(batch)


def test_training_batches_carry_the_stored_moments(workdir):
    root, _ = workdir
    dm = instantiate_from_config(_data_config(str(root / "out" / "{00000..00002}.tar")), where="data")
    assert dm.latent_sidecars == {"train": [root / "out" / "latent_moments.json"]}
    seen = {}
    loader = dm.train_dataloader()
    for batch, _ in zip(loader, range(3)):  # through a worker and shared memory (uint8 transport)
        moments = batch["latent_moments"]
        assert moments.dtype == torch.float16 and moments.shape == (2, 8, SIZE // 8, SIZE // 8)
        for url, key, m in zip(batch["__url__"], batch["__key__"], moments):
            stored = dict(_members(Path(url)))[f"{key}.latent_moments.npy"]
            assert np.array_equal(m.numpy(), np.load(io.BytesIO(stored)))  # this sample's own moments
            seen[key] = True
    assert len(seen) == 3  # every good sample; the one copied without moments is skipped, not encoded online
    assert dm.data_stats("train")["missing_latents"] >= 1
    # shards without a latent_moments.json beside them: online encoding, no key in the batch
    online = instantiate_from_config(_data_config(str(root / "in" / "{00000..00001}.tar")), where="data")
    assert online.latent_sidecars == {} and "latent_moments" not in _first_batch(online)


@pytest.mark.parametrize("change, key", [
    ("random_crop", "data.params.train.image_transforms[1]"),
    ("flip", "data.params.train.image_transforms[2]"),
    ("size", "data.params.train.image_transforms"),
    ("interpolation", "data.params.train.image_transforms"),
    ("jpeg_draft", "data.params.jpeg_draft"),
    ("image_key", "data.params.train.image_key"),
])
def test_transforms_that_disagree_with_the_stored_latents_are_refused(workdir, change, key):
    root, _ = workdir
    resize = {"target": "torchvision.transforms.Resize", "params": {"size": SIZE, "interpolation": 3}}
    crop = {"target": "torchvision.transforms.CenterCrop", "params": {"size": SIZE}}
    variants = {
        "random_crop": ([resize, {**crop, "target": "torchvision.transforms.RandomCrop"}], {}),
        "flip": ([resize, crop, {"target": "torchvision.transforms.RandomHorizontalFlip"}], {}),
        "size": ([{**resize, "params": {"size": 72, "interpolation": 3}}, crop], {}),
        "interpolation": ([{**resize, "params": {"size": SIZE}}, crop], {}),
        "jpeg_draft": (None, {"jpeg_draft": True}),
        "image_key": (None, {}),
    }
    transforms, params = variants[change]
    cfg = _data_config(str(root / "out" / "{00000..00001}.tar"), transforms, **params)
    if change == "image_key":
        cfg.params.train.image_key = "png"
    with pytest.raises(ConfigError) as err:
        instantiate_from_config(cfg, where="data")
    message = str(err.value)
    assert message.startswith(f"{key}: ") and "\n" not in message
    assert "latent_moments: false" in message  # names the way out
    # the opt-out: the same split encodes online
    cfg.params.train.latent_moments = False
    if change != "image_key":
        dm = instantiate_from_config(cfg, where="data")
        assert dm.latent_sidecars == {} and not dm.splits["train"].processor.use_latents


def test_a_training_step_on_precomputed_moments_skips_the_image_encode(workdir, tmp_path, caplog):
    """Lightning fit on the real data module: one VAE encode per step (the masked image), logged once; and the
    loss equals the online path's on the same batch with the same draws, up to the float16 storage."""
    root, model = workdir
    calls = []
    encode = model.first_stage_model.encode
    model.first_stage_model.encode = lambda x: calls.append(x.shape) or encode(x)
    try:
        dm = instantiate_from_config(_data_config(str(root / "out" / "{00000..00002}.tar"), num_workers=0),
                                     where="data")
        trainer = pl.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
        with caplog.at_level(logging.INFO):
            trainer.fit(model, datamodule=dm)
        assert calls == [(2, 3, SIZE, SIZE)] * 2  # the masked image only, once per step
        assert caplog.text.count("training on precomputed image latents") == 1

        pre = _first_batch(instantiate_from_config(
            _data_config(str(root / "out" / "{00000..00002}.tar"), num_workers=0), where="data"))
        off = _data_config(str(root / "out" / "{00000..00002}.tar"), num_workers=0)
        off.params.train.latent_moments = False
        online = _first_batch(instantiate_from_config(off, where="data"))
        assert "latent_moments" not in online and online["__key__"] == pre["__key__"]
        for k in ("jpg", "mask", "masked_image"):  # the member changes no pixel and no random draw
            assert torch.equal(online[k], pre[k])
        model.eval()
        losses = {}
        with torch.no_grad():
            for name, batch, seed in (("pre", pre, 7), ("online", online, 7), ("other seed", online, 8)):
                torch.manual_seed(seed)  # posterior sample, then t and noise: the same draws in the same order
                calls.clear()
                losses[name] = float(model.shared_step(batch)[0])
                assert len(calls) == (1 if name == "pre" else 2)
        # Not bit-equal: the stored moments are float16 (the online ones float32), up to ~5e-4 relative in each
        # posterior mean and log-variance; averaged into the loss that is ~1e-6. Another seed moves it ~10 %.
        assert losses["pre"] == pytest.approx(losses["online"], rel=1e-4)
        assert abs(losses["other seed"] - losses["online"]) > 50 * abs(losses["pre"] - losses["online"])
    finally:
        model.first_stage_model.encode = encode


def test_an_out_folder_computed_otherwise_is_not_extended(workdir, caplog):
    """Without --overwrite, existing shards are kept: a run with another crop must not relabel them."""
    root, _ = workdir
    before = (root / "out" / "latent_moments.json").read_text()
    argv = ["--config", str(REPO / "configs/tiny/inpaint.yaml"), "--ckpt", str(root / "vae.ckpt"), "--shards",
            str(root / "in" / "00000.tar"), "--out", str(root / "out"), "--size", "48", "--device", "cpu"]
    assert precompute.main(argv) == 2
    assert "computed with other ops" in caplog.text and "--overwrite" in caplog.text
    assert (root / "out" / "latent_moments.json").read_text() == before
