"""Config mistakes stop at start-up with one line naming the key; paths resolve against the config's folder;
``~key`` deletes; the tiny model trains on user shards with one command."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

import main
from ldm.config_schema import accepted_params, check_params, check_value
from ldm.run import check_sections
from ldm.util import ConfigError, instantiate_from_config, load_config
from tests.helpers import REPO, load_script

TINY = REPO / "configs/tiny/inpaint.yaml"
SHARDS_CFG = REPO / "configs/tiny/inpaint_shards.yaml"


def _check(*overrides: str, base: Path = TINY) -> None:
    check_sections(load_config([base], overrides))


@pytest.mark.parametrize("override, expected", [
    ("data.params.batch_size=abc", "data.params.batch_size: expected int >= 1, got 'abc'"),
    ("lightning.trainer.max_steps=abc", "lightning.trainer.max_steps: expected int, got 'abc'"),
    ("model.params.unet_config.params.model_channels=abc",
     "model.params.unet_config.params.model_channels: expected int >= 1, got 'abc'"),
    ("model.base_learning_rate=fast", "model.base_learning_rate: expected float > 0, got 'fast'"),
    ("model.base_learing_rate=1e30", "model.base_learing_rate: unknown key (did you mean 'base_learning_rate'?)"),
    ("model.params.base_learning_rate=1e-4", "model.params.base_learning_rate: unknown key for "
                                             "'LatentInpaintDiffusion'; base_learning_rate belongs beside "
                                             "target/params: write model.base_learning_rate"),
    ("data.params.mask_mode=large", "data.params.mask_mode: expected one of '256train', '256narrow', '512train'"),
    ("model.params.parameterizaton=v", "model.params.parameterizaton: unknown key for 'LatentInpaintDiffusion' "
                                       "(did you mean 'parameterization'?)"),
    ("model.params.parameterization=vv", "model.params.parameterization: expected one of 'eps', 'x0', 'v'"),
    ("model.params.cond_stage_config.params.layr=last", "(did you mean 'layer'?)"),
    ("lightning.trainer.max_stepz=3", "lightning.trainer.max_stepz: unknown key for 'Trainer' (did you mean "
                                      "'max_steps'?)"),
    ("lightning.callbacks.image_logger.params.batch_frequency=abc",
     "lightning.callbacks.image_logger.params.batch_frequency: expected int"),
    ("lightning.modelcheckpoint.params.every_n_train_step=3", "(did you mean 'every_n_train_steps'?)"),
    ("lightning.ddp_bucket_cap=25", "lightning.ddp_bucket_cap: unknown key (did you mean 'ddp_bucket_cap_mb'?)"),
    ("lightning.find_unused_parameters=maybe", "lightning.find_unused_parameters: expected bool"),
    ("modle.params.x=1", "(did you mean 'model'?)"),
    ("model.params.ucg_training.txt.vall=x",
     "model.params.ucg_training.txt.vall: unknown key for 'CaptionDropout' (did you mean 'val'?)"),
    ("model.params.ucg_training.txt.p=often",
     "model.params.ucg_training.txt.p: expected float in [0, 1], got 'often'"),
])
def test_each_mistake_is_one_line_naming_the_key(override, expected):
    with pytest.raises(ConfigError) as e:
        _check(override)
    assert expected in str(e.value) and "\n" not in str(e.value)


def test_shard_config_data_mistakes(tmp_path):
    shards = "data.params.train.shards=/x/{0..1}.tar"
    with pytest.raises(ConfigError,
                       match=r"data\.params\.p_unsafe_threshold: expected float in \[0, 1\] or null, got 'high'"):
        _check(shards, "data.params.p_unsafe_threshold=high", base=SHARDS_CFG)
    with pytest.raises(ConfigError, match=r"postprocess\.params\.p_dorp: unknown key.*did you mean 'p_drop'"):
        _check(shards, "data.params.train.postprocess.params.p_dorp=0.1", base=SHARDS_CFG)
    with pytest.raises(ConfigError, match=r"postprocess\.params\.mode: expected one of '256train'.*or a mapping"):
        _check(shards, "data.params.train.postprocess.params.mode=big", base=SHARDS_CFG)
    with pytest.raises(ConfigError, match=r"^data\.params\.train\.shards: this value is required"):
        _check(base=SHARDS_CFG)


def test_kwargs_are_followed_only_where_they_reach_super():
    from pytorch_lightning.loggers import WandbLogger

    from ldm.models.diffusion.ddpm import LatentDiffusion, LatentInpaintDiffusion

    inpaint = accepted_params(LatentInpaintDiffusion)
    assert set(accepted_params(LatentDiffusion)) < set(inpaint) and "concat_keys" in inpaint
    assert accepted_params(WandbLogger) is None  # its **kwargs go to wandb.init: any key may be meant
    check_params(WandbLogger, {"entity": "me", "project": "p"}, "lightning.loggers.wandb.params")
    assert check_value([1, 2], tuple[int, int]) is None and check_value([1], tuple[int, int]) is not None
    assert check_value(True, int) == "int" and check_value(3, float) is None
    assert check_value({"a": [1.5]}, dict[str, list[int]]) == "a mapping of a list of int"


def test_constructor_errors_name_their_place(tmp_path):
    cfg = OmegaConf.to_container(load_config([TINY]).model, resolve=True)
    cfg["params"]["cond_stage_config"]["params"]["version"] = str(tmp_path / "nope.bin")
    with pytest.raises(ConfigError, match=r"^model\.params\.cond_stage_config\.params\.version: weights file not "
                                          r"found: .*nope\.bin$"):
        instantiate_from_config(cfg, where="model")
    cfg["params"]["cond_stage_config"]["params"]["version"] = ""
    with pytest.raises(ConfigError, match=r"^model\.params\.cond_stage_config\.params\.version: empty"):
        instantiate_from_config(cfg, where="model")


@pytest.mark.parametrize("override, expected", [
    ("model.params.cond_stage_config.params.version=/nope/open_clip.bin",
     "model.params.cond_stage_config.params.version=/nope/open_clip.bin: weights file not found"),
    ("lightning.callbacks.image_loger.params.batch_frequency=3",
     "lightning.callbacks.image_loger: no default callback has this name (did you mean 'image_logger'?)"),
    ("~data", "--train needs a 'data' section"),
])
def test_main_stops_with_one_line_and_rc_2(tmp_path, caplog, override, expected):
    assert main.main(["--base", str(TINY), "--train", "-l", str(tmp_path), override]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and expected in errors[0]
    assert not list(tmp_path.iterdir())  # nothing was written


@pytest.mark.parametrize("override, expected", [
    ("data.params.train.shufle=10",
     "data.params.train.shufle: unknown key for 'SplitConfig' (did you mean 'shuffle'?)"),
    ("data.params.validation={shards: /x/0.tar, image_kye: png}",
     "data.params.validation.image_kye: unknown key for 'SplitConfig' (did you mean 'image_key'?)"),
    ("data.params.train.shuffle=many", "data.params.train.shuffle: expected int >= 0, got 'many'"),
    ("data.params.train.latent_moments=[a]",
     "data.params.train.latent_moments: expected bool (true/false) or str or null"),
])
def test_split_keys_are_checked_like_every_other_key(tmp_path, caplog, override, expected):
    argv = ["--base", str(SHARDS_CFG), "--train", "-l", str(tmp_path), "data.params.train.shards=/x/{0..1}.tar"]
    assert main.main([*argv, override]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and expected in errors[0] and "\n" not in errors[0]
    assert not list(tmp_path.iterdir())
    # built directly (not from a config), the data module names the split key the same way
    from ldm.data.laion import WebDataModuleFromConfig

    with pytest.raises(ConfigError, match=r"^train\.shufle: unknown key .*did you mean 'shuffle'"):
        WebDataModuleFromConfig(train={"shards": "/x/0.tar", "shufle": 1})


# --------------------------------------------------------------------------------------- paths and overrides
def test_relative_paths_resolve_against_the_config_folder(tmp_path, monkeypatch):
    folder = tmp_path / "mine"
    folder.mkdir()
    shutil.copy(REPO / "configs/tiny/open_clip_tiny_text.json", folder / "text.json")
    cfg = OmegaConf.load(TINY)
    cfg.model.params.cond_stage_config.params.arch = "text.json"
    OmegaConf.save(cfg, folder / "cfg.yaml")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    loaded = load_config([folder / "cfg.yaml"])
    assert loaded.model.params.cond_stage_config.params.arch == str((folder / "text.json").resolve())
    assert load_config([folder / "cfg.yaml"], ["x.y=val/loss"]).x.y == "val/loss"  # command line: untouched


@pytest.mark.parametrize("path", sorted((REPO / "configs").rglob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_names_its_files_absolutely_from_any_directory(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    raw = OmegaConf.to_container(OmegaConf.load(path))
    loaded = OmegaConf.to_container(load_config([path]))

    def walk(a, b, key=""):
        if isinstance(a, dict):
            for k in a:
                walk(a[k], b[k], f"{key}.{k}")
        elif isinstance(a, list):
            for i, (x, y) in enumerate(zip(a, b)):
                walk(x, y, f"{key}[{i}]")
        elif isinstance(a, str) and (REPO / a).is_file():  # a repository file named relatively
            assert Path(b).is_absolute() and Path(b).is_file(), key

    walk(raw, loaded)


def test_tiny_model_builds_from_another_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config([TINY])
    model = instantiate_from_config(cfg.model, where="model")
    assert model.cond_stage_model.model.token_embedding.weight.shape[1] == 32


def test_deleting_and_replacing_a_section(tmp_path):
    cfg = load_config([TINY], ["~data", "data.target=ldm.data.laion.WebDataModuleFromConfig",
                               "data.params.train.shards=/x/{0..1}.tar", "~lightning.callbacks.image_logger"])
    assert OmegaConf.to_container(cfg.data) == {"target": "ldm.data.laion.WebDataModuleFromConfig",
                                                "params": {"train": {"shards": "/x/{0..1}.tar"}}}
    assert "image_logger" not in cfg.lightning.callbacks
    check_sections(cfg)
    with pytest.raises(ConfigError, match=r"there is no 'dta' to delete \(did you mean 'data'\?\)"):
        load_config([TINY], ["~dta"])


def test_the_shards_config_has_the_tiny_model_and_trains_on_user_shards(tmp_path):
    assert OmegaConf.load(SHARDS_CFG).model == OmegaConf.load(TINY).model
    from ldm.data.shard_writer import Record, write_shards

    rng = np.random.default_rng(0)
    records = [Record(Image.fromarray(rng.integers(0, 256, (72, 80, 3), dtype=np.uint8)), f"picture {i}",
                      f"img{i}.png") for i in range(8)]
    write_shards(records, tmp_path / "shards", 4, 64, "keep_ratio", 90)
    rc = main.main(["--base", str(SHARDS_CFG), "--train", "-l", str(tmp_path / "logs"),
                    f"data.params.train.shards={tmp_path}/shards/{{00000..00001}}.tar", "data.params.num_workers=0",
                    "lightning.trainer.max_steps=2", "lightning.callbacks.image_logger.params.disabled=true"])
    assert rc == 0
    assert list((tmp_path / "logs").glob("*/checkpoints/last.ckpt"))


def test_evaluate_ckpt_path_with_equals_signs_is_a_path(tmp_path):
    evaluate = load_script("evaluate")
    ckpt = tmp_path / "epoch=000000-step=000000010.ckpt"
    ckpt.write_bytes(b"")
    assert evaluate._named([str(ckpt)], "--ckpt") == [("epoch=000000-step=000000010", str(ckpt))]
    assert evaluate._named([f"a={ckpt}"], "--ckpt") == [("a", str(ckpt))]
    assert evaluate._named(["b=missing.ckpt"], "--ckpt") == [("b", "missing.ckpt")]
