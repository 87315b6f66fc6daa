"""Config plumbing: target/params instantiation, merging, overrides, and every target in configs/."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ldm.util import ConfigError, check_params, get_obj_from_str, instantiate_from_config, load_config

REPO = Path(__file__).resolve().parents[1]


def test_instantiate_target_params():
    lin = instantiate_from_config({"target": "torch.nn.Linear", "params": {"in_features": 3, "out_features": 2}})
    assert tuple(lin.weight.shape) == (2, 3)
    assert instantiate_from_config({"target": "torch.nn.Identity"}).__class__.__name__ == "Identity"
    assert instantiate_from_config("__is_first_stage__") is None


def test_unknown_param_names_key_and_target():
    with pytest.raises(ConfigError, match=r"in_featurez.*torch\.nn\.Linear|Linear.*in_featurez"):
        instantiate_from_config({"target": "torch.nn.Linear", "params": {"in_featurez": 3, "out_features": 2}})


def test_bad_target_errors():
    with pytest.raises(ConfigError, match="no attribute 'Nope'"):
        get_obj_from_str("torch.nn.Nope")
    with pytest.raises(ConfigError, match="cannot import module"):
        get_obj_from_str("no_such_pkg.Thing")
    with pytest.raises(ConfigError, match="'target'"):
        instantiate_from_config({"params": {}})


def test_merge_order_and_dotlist(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("model:\n  x: 1\n  y: [1, 2]\nlightning:\n  trainer:\n    max_steps: 5\n")
    b.write_text("model:\n  x: 2\n")
    cfg = load_config([a, b], ["lightning.trainer.max_steps=20", "model.z=hello"])
    assert cfg.model.x == 2 and list(cfg.model.y) == [1, 2]
    assert cfg.lightning.trainer.max_steps == 20 and cfg.model.z == "hello"
    with pytest.raises(ConfigError, match="not found"):
        load_config([tmp_path / "missing.yaml"])
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config([a], ["=3"])


def _targets(node, path=""):
    if isinstance(node, dict):
        if "target" in node:
            yield path, node
        for k, v in node.items():
            yield from _targets(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _targets(v, f"{path}[{i}]")


CONFIGS = sorted(p for p in (REPO / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_target_imports_and_every_param_is_real(path):
    cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    found = list(_targets(cfg))
    assert found, f"{path} has no targets"
    for where, node in found:
        obj = get_obj_from_str(node["target"])
        params = node.get("params") or {}
        check_params(obj, params, where=f"{path}:{where}")


def test_config_reference_is_current():
    import sys

    sys.path.insert(0, str(REPO / "scripts"))
    import config_reference

    assert config_reference.main(["--check"]) == 0, "run: python scripts/config_reference.py"
    text = (REPO / "configs" / "README.md").read_text()
    assert "| `ckpt_path` |" in text and "| `uint8_transport` |" in text
    assert not [line for line in text.splitlines() if line.startswith("| `") and line.rstrip().endswith("|  |")]
