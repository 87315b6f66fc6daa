"""Classifier-free guidance: [uncond, cond] batching of tensor / list / dict conditioning and the mix."""

from __future__ import annotations

import pytest
import torch

from ldm.models.diffusion.guidance import cfg_batch, cfg_combine, guided_model_fn

B = 3


def _x_t():
    return torch.randn(B, 4, 8, 8), torch.tensor([5, 5, 5])


def test_tensor_conditioning_batch_order():
    x, t = _x_t()
    cond, uncond = torch.full((B, 7, 16), 1.0), torch.full((B, 7, 16), -1.0)
    x_in, t_in, c_in = cfg_batch(x, t, cond, uncond)
    assert x_in.shape == (2 * B, 4, 8, 8) and t_in.shape == (2 * B,) and c_in.shape == (2 * B, 7, 16)
    torch.testing.assert_close(x_in[:B], x)
    torch.testing.assert_close(x_in[B:], x)
    assert torch.all(c_in[:B] == -1) and torch.all(c_in[B:] == 1)  # uncond first, as ldm


def test_list_conditioning():
    x, t = _x_t()
    cond = [torch.ones(B, 2), torch.ones(B, 3) * 2]
    uncond = [torch.zeros(B, 2), torch.zeros(B, 3)]
    _, _, c_in = cfg_batch(x, t, cond, uncond)
    assert isinstance(c_in, list) and [c.shape for c in c_in] == [(2 * B, 2), (2 * B, 3)]
    assert torch.all(c_in[1][:B] == 0) and torch.all(c_in[1][B:] == 2)


def test_hybrid_dict_conditioning():
    x, t = _x_t()
    concat = torch.randn(B, 5, 8, 8)  # mask + masked-image latent, shared by both halves in SD scripts
    cond = {"c_concat": [concat], "c_crossattn": [torch.ones(B, 77, 16)]}
    uncond = {"c_concat": [concat], "c_crossattn": [torch.zeros(B, 77, 16)]}
    _, _, c_in = cfg_batch(x, t, cond, uncond)
    assert set(c_in) == {"c_concat", "c_crossattn"}
    assert c_in["c_concat"][0].shape == (2 * B, 5, 8, 8) and c_in["c_crossattn"][0].shape == (2 * B, 77, 16)
    torch.testing.assert_close(c_in["c_concat"][0][B:], concat)
    assert torch.all(c_in["c_crossattn"][0][:B] == 0) and torch.all(c_in["c_crossattn"][0][B:] == 1)
    # a dict entry may also be a bare tensor
    _, _, c_in = cfg_batch(x, t, {"c_crossattn": torch.ones(B, 2)}, {"c_crossattn": torch.zeros(B, 2)})
    assert c_in["c_crossattn"].shape == (2 * B, 2)


def test_mismatched_structure_raises():
    x, t = _x_t()
    with pytest.raises(ValueError, match="keys"):
        cfg_batch(x, t, {"c_crossattn": [torch.ones(B, 2)]}, {"c_concat": [torch.ones(B, 2)]})
    with pytest.raises(ValueError, match="list of 2"):
        cfg_batch(x, t, [torch.ones(B, 2)] * 2, [torch.ones(B, 2)])
    with pytest.raises(ValueError, match="tensor"):
        cfg_batch(x, t, torch.ones(B, 2), [torch.ones(B, 2)])


def test_cfg_combine_formula():
    out = torch.cat([torch.full((B, 2), 1.0), torch.full((B, 2), 3.0)])  # [uncond, cond]
    torch.testing.assert_close(cfg_combine(out, 7.5), torch.full((B, 2), 1.0 + 7.5 * 2.0))


class _CountingModel:
    """apply_model whose output depends on x, t and the text embedding, and that counts its batch sizes."""

    def __init__(self):
        self.batch_sizes = []

    def __call__(self, x, t, cond):
        self.batch_sizes.append(x.shape[0])
        emb = cond["c_crossattn"][0].mean(dim=(1, 2))  # [N]
        return x * 0.5 + t.float().view(-1, 1, 1, 1) * 0.01 + emb.view(-1, 1, 1, 1)


def test_guided_model_fn_scales():
    x, t = _x_t()
    cond = {"c_crossattn": [torch.full((B, 4, 2), 2.0)]}
    uncond = {"c_crossattn": [torch.full((B, 4, 2), -1.0)]}
    model = _CountingModel()
    out_cond, out_uncond = model(x, t, cond), model(x, t, uncond)

    model.batch_sizes.clear()
    torch.testing.assert_close(guided_model_fn(model, cond, uncond, 1.0)(x, t), out_cond)
    assert model.batch_sizes == [B]  # scale 1 skips the doubled batch
    torch.testing.assert_close(guided_model_fn(model, cond, uncond, 0.0)(x, t), out_uncond)
    torch.testing.assert_close(guided_model_fn(model, cond, uncond, 5.0)(x, t),
                               out_uncond + 5.0 * (out_cond - out_uncond))
    assert model.batch_sizes[-1] == 2 * B
    model.batch_sizes.clear()
    torch.testing.assert_close(guided_model_fn(model, cond, None, 5.0)(x, t), out_cond)
    assert model.batch_sizes == [B]
