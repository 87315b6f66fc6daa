"""LitEma: update values against a hand computation, warm-up, ldm buffer names, fused vs reference update,
copy_to/store/restore, and the full-size SD2 ``model_ema.*`` manifest."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import read_reference_tsv
from test_unet import sd2_unet_config
from torch import nn

from ldm.modules.ema import LitEma
from ldm.util import instantiate_from_config


class Wrapper(nn.Module):
    """Stands in for DiffusionWrapper: the tracked module sits under `diffusion_model`."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.diffusion_model = inner


def small_model() -> nn.Module:
    model = Wrapper(nn.Sequential(nn.Linear(3, 4), nn.SiLU(), nn.Linear(4, 2)))
    model.diffusion_model[2].bias.requires_grad_(False)  # frozen: no shadow
    return model


def perturb(model: nn.Module, step: int) -> None:
    g = torch.Generator().manual_seed(100 + step)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g))


def test_buffers_and_names():
    model = small_model()
    ema = LitEma(model)
    assert ema.decay.dtype == torch.float32 and ema.decay.shape == () and ema.decay.item() == pytest.approx(0.9999)
    assert ema.num_updates.dtype == torch.int32 and ema.num_updates.item() == 0
    assert list(ema.state_dict()) == [
        "decay",
        "num_updates",
        "diffusion_model0weight",
        "diffusion_model0bias",
        "diffusion_model2weight",
    ]
    assert ema.m_name2s_name["diffusion_model.2.weight"] == "diffusion_model2weight"
    assert torch.equal(ema.diffusion_model0weight, model.diffusion_model[0].weight)
    assert ema.diffusion_model0weight.data_ptr() != model.diffusion_model[0].weight.data_ptr()
    assert LitEma(model, use_num_upates=False).num_updates.item() == -1
    with pytest.raises(ValueError, match="decay"):
        LitEma(model, decay=1.5)


def test_update_values_match_hand_computation():
    """15 updates with decay 0.6: warm-up (1+n)/(10+n) governs n <= 12, the target decay after."""
    model = small_model()
    ema = LitEma(model, decay=0.6)
    w = model.diffusion_model[0].weight
    expected = w.detach().double().clone()
    for n in range(1, 16):
        perturb(model, n)
        ema(model)
        d = min(0.6, (1 + n) / (10 + n))
        expected = expected - (1 - d) * (expected - w.detach().double())
        assert ema.num_updates.item() == n
    torch.testing.assert_close(ema.diffusion_model0weight.double(), expected, atol=1e-6, rtol=1e-6)
    # The frozen bias is neither tracked nor required.
    assert "diffusion_model2bias" not in ema.state_dict()


@pytest.mark.parametrize(
    "n, decay_eff", [(1, 2 / 11), (10, 11 / 20), (100, 101 / 110), (5000, 5001 / 5010), (100_000, 0.9999)]
)
def test_warmup_decay(n, decay_eff):
    """One update from shadow 0 to param 1 leaves shadow = 1 - decay_eff."""
    model = Wrapper(nn.Linear(2, 2))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    ema = LitEma(model)
    ema.num_updates.fill_(n - 1)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0)
    ema(model)
    assert ema.num_updates.item() == n and ema.num_updates.dtype == torch.int32
    torch.testing.assert_close(ema.diffusion_modelweight, torch.full((2, 2), 1 - decay_eff), atol=1e-6, rtol=0)


def test_no_warmup_uses_target_decay():
    model = Wrapper(nn.Linear(2, 2))
    ema = LitEma(model, decay=0.75, use_num_upates=False)
    start = ema.diffusion_modelweight.clone()
    perturb(model, 0)
    ema(model)
    assert ema.num_updates.item() == -1
    expected = start - 0.25 * (start - model.diffusion_model.weight.detach())
    torch.testing.assert_close(ema.diffusion_modelweight, expected)


@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16])
def test_foreach_update_equals_reference(param_dtype):
    model = small_model()
    fused, reference = LitEma(model), LitEma(model)
    model.to(param_dtype)  # the EMA stays float32; parameters are converted on update
    for step in range(12):
        perturb(model, step)
        fused(model)
        reference.update_reference(model)
    assert fused.num_updates.item() == reference.num_updates.item() == 12
    for name, buf in reference.state_dict().items():
        assert fused.state_dict()[name].dtype == buf.dtype
        torch.testing.assert_close(fused.state_dict()[name], buf, atol=1e-6, rtol=1e-6, msg=name)
    assert not torch.equal(fused.diffusion_model0weight, LitEma(small_model()).diffusion_model0weight)


def test_copy_to_store_restore_round_trip():
    model = small_model()
    ema = LitEma(model)
    for step in range(3):
        perturb(model, step)
        ema(model)
    trained = copy.deepcopy(model.state_dict())
    ema.store(model.parameters())
    ema.copy_to(model)
    assert torch.equal(model.diffusion_model[0].weight, ema.diffusion_model0weight)
    assert torch.equal(model.diffusion_model[2].bias, trained["diffusion_model.2.bias"])  # frozen: untouched
    assert not torch.equal(model.diffusion_model[0].weight, trained["diffusion_model.0.weight"])
    ema.restore(model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, trained[k]), k
    with pytest.raises(ValueError, match="restore"):
        ema.restore(list(model.parameters())[:1])


def test_reset_num_updates_and_state_dict_round_trip():
    model = small_model()
    ema = LitEma(model)
    perturb(model, 0)
    ema(model)
    ema(model)
    fresh = LitEma(small_model())
    fresh.load_state_dict(ema.state_dict())  # strict: same keys
    assert fresh.num_updates.item() == 2
    assert torch.equal(fresh.diffusion_model0weight, ema.diffusion_model0weight)
    ema.reset_num_updates()
    assert ema.num_updates.item() == 0 and ema.num_updates.dtype == torch.int32


def test_mismatched_model_is_rejected():
    ema = LitEma(small_model())
    with pytest.raises(ValueError, match="trainable parameters differ"):
        ema(Wrapper(nn.Linear(3, 4)))


@pytest.mark.slow
def test_full_size_ema_names_match_reference():
    ref = read_reference_tsv("sd2-inpainting-ema-keys.tsv")
    with torch.device("meta"):
        wrapper = Wrapper(instantiate_from_config(sd2_unet_config("v2-inpainting-inference.yaml")))
        ema = LitEma(wrapper)
    ours = {f"model_ema.{k}": tuple(v.shape) for k, v in ema.state_dict().items()}
    assert len(ref) == 688
    assert sorted(ours.keys() - ref.keys()) == [] and sorted(ref.keys() - ours.keys()) == []
    assert {k for k in ours if ours[k] != ref[k]} == set()
