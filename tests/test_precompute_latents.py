"""scripts/precompute_latents.py on real JPEG shards with the tiny VAE loaded from a checkpoint file.

Checks: the stored moments equal an independent encode (PIL decode, torchvision resize + centre crop) of each
image; every other member is copied byte for byte and in order; an undecodable image is copied without
moments; the moments give ``LatentInpaintDiffusion.get_input`` the same latent as online encoding; and the
script refuses random VAE weights and random transforms.
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
import torch
import torchvision.transforms as T
from demo_data import load_manifest, load_photo
from PIL import Image
from webdataset import TarWriter

from ldm.data.shard_writer import Record, write_shards
from ldm.data.transforms import Crop, Resize
from ldm.util import ConfigError
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
