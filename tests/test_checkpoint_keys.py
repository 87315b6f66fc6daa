"""Full-size models built on the meta device match the reference key/shape manifests and counts (DECISIONS R9, R10)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.conftest import read_reference_tsv

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import check_config  # noqa: E402

pytestmark = pytest.mark.slow


def _keys(tsv: Path) -> dict[str, tuple[int, ...]]:
    out = {}
    for line in tsv.read_text().splitlines()[1:]:
        k, _, s = line.partition("\t")
        out[k] = tuple(int(d) for d in s.split(",")) if s else ()
    return out


@pytest.mark.parametrize(
    "config, manifest",
    [
        ("configs/stable-diffusion/v2-inference.yaml", "sd2-512-base-keys.tsv"),
        ("configs/stable-diffusion/v2-inpainting-inference.yaml", "sd2-inpainting-keys.tsv"),
    ],
)
def test_official_configs_match_manifest(tmp_path, config, manifest):
    out = tmp_path / "keys.tsv"
    assert check_config.main([str(REPO / config), "--keys-tsv", str(out)]) == 0
    ours, ref = _keys(out), read_reference_tsv(manifest)
    assert set(ours) == set(ref), (sorted(set(ours) - set(ref))[:5], sorted(set(ref) - set(ours))[:5])
    assert {k: ours[k] for k in ref} == ref


def test_ema_keys_match_manifest(tmp_path):
    out = tmp_path / "keys.tsv"
    cfg = str(REPO / "configs/stable-diffusion/v2-inpainting-inference.yaml")
    assert check_config.main([cfg, "model.params.use_ema=true", "--keys-tsv", str(out)]) == 0
    ours = _keys(out)
    ema_ref = read_reference_tsv("sd2-inpainting-ema-keys.tsv")
    ema_ours = {k: v for k, v in ours.items() if k.startswith("model_ema.")}
    assert ema_ours == ema_ref
    assert len(ours) == 1928  # 1240 + 688 (DECISIONS R9)


def test_parameter_counts_match_reference():
    from omegaconf import OmegaConf

    expected = {
        "v2-inference.yaml": (865_910_724, 1_303_597_228),
        "v2-inpainting-inference.yaml": (865_925_124, 1_303_611_628),
    }
    for name, (unet, total) in expected.items():
        cfg = OmegaConf.load(REPO / "configs/stable-diffusion" / name)
        model = check_config.build_on_meta(cfg.model)
        count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        assert count(model.model.diffusion_model) == unet
        assert count(model.first_stage_model) == 83_653_863
        assert count(model.cond_stage_model) == 354_032_641
        assert count(model) == total
