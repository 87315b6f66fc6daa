"""AutoencoderKL, its Encoder/Decoder blocks, the diagonal-Gaussian posterior and the reconstruction+KL loss."""

from __future__ import annotations

import logging
import math

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from safetensors.torch import save_file
from torch.distributions import Normal, kl_divergence

from ldm.checkpoint import CheckpointError
from ldm.models.autoencoder import AutoencoderKL
from ldm.modules.diffusionmodules.model import AttnBlock, Decoder, Downsample, Encoder
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.modules.losses import ReconstructionKLLoss
from ldm.util import instantiate_from_config
from tests.conftest import REPO, read_reference_tsv

TRAIN_LOSS = {"target": "ldm.modules.losses.ReconstructionKLLoss", "params": {"kl_weight": 1e-6}}


def tiny_vae_config(**params):
    cfg = OmegaConf.load(REPO / "configs" / "tiny" / "inpaint.yaml").model.params.first_stage_config
    cfg = OmegaConf.to_container(cfg, resolve=True)
    cfg["params"].update(params)
    return cfg


def tiny_vae(**params) -> AutoencoderKL:
    return instantiate_from_config(tiny_vae_config(**params))


def images(b: int = 2, size: int = 64, seed: int = 0) -> torch.Tensor:
    """Smooth random images (B x H x W x 3 in [-1, 1]): low-frequency noise upsampled, so they are learnable."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(b, 3, size // 8, size // 8, generator=g) * 2 - 1
    return F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False).permute(0, 2, 3, 1)


# ------------------------------------------------------------------------------------------ posterior


def test_posterior_logvar_is_clamped_and_std_var_follow():
    mean = torch.randn(2, 4, 3, 3)
    logvar = torch.full((2, 4, 3, 3), 0.3)
    logvar[0, 0, 0, 0], logvar[1, 1, 1, 1] = 100.0, -100.0
    post = DiagonalGaussianDistribution(torch.cat([mean, logvar], dim=1))
    assert torch.equal(post.mean, mean)
    assert post.logvar[0, 0, 0, 0] == 20.0 and post.logvar[1, 1, 1, 1] == -30.0
    assert post.logvar[0, 1, 0, 0] == pytest.approx(0.3)
    torch.testing.assert_close(post.std, torch.exp(0.5 * post.logvar))
    torch.testing.assert_close(post.var, torch.exp(post.logvar))
    assert post.std[0, 0, 0, 0].item() == pytest.approx(math.exp(10.0), rel=1e-5)
    assert torch.equal(post.mode(), mean)


def test_posterior_sample_statistics_and_generator():
    mean = torch.full((8, 4, 32, 32), 1.5)
    logvar = torch.full_like(mean, math.log(0.25))  # std 0.5
    post = DiagonalGaussianDistribution(torch.cat([mean, logvar], dim=1))
    s = post.sample(torch.Generator().manual_seed(1))
    assert s.shape == mean.shape
    assert s.mean().item() == pytest.approx(1.5, abs=0.02)
    assert s.std().item() == pytest.approx(0.5, abs=0.02)
    assert torch.equal(s, post.sample(torch.Generator().manual_seed(1)))
    assert not torch.equal(s, post.sample(torch.Generator().manual_seed(2)))


def test_deterministic_posterior_is_its_mean():
    params = torch.randn(3, 8, 4, 4)
    post = DiagonalGaussianDistribution(params, deterministic=True)
    assert torch.equal(post.sample(), params[:, :4])
    assert torch.equal(post.kl(), torch.zeros(3))


def test_kl_by_hand():
    # one channel, 2x2, mean 1, logvar 0: each element contributes 0.5 * (1 + 1 - 1 - 0) = 0.5
    post = DiagonalGaussianDistribution(torch.cat([torch.ones(1, 1, 2, 2), torch.zeros(1, 1, 2, 2)], dim=1))
    assert post.kl().item() == pytest.approx(2.0)
    # against N(0, e^2): 0.5 * (1/e^2 + 1/e^2 - 1 - 0 + 2) per element
    other = DiagonalGaussianDistribution(torch.cat([torch.zeros(1, 1, 2, 2), torch.full((1, 1, 2, 2), 2.0)], dim=1))
    assert post.kl(other).item() == pytest.approx(4 * 0.5 * (2 * math.exp(-2) + 1))


def test_kl_and_nll_match_torch_distributions():
    p = DiagonalGaussianDistribution(torch.randn(3, 8, 5, 5))
    q = DiagonalGaussianDistribution(torch.randn(3, 8, 5, 5))
    p_ref, q_ref = Normal(p.mean, p.std), Normal(q.mean, q.std)
    std_normal = Normal(torch.zeros_like(p.mean), torch.ones_like(p.mean))
    torch.testing.assert_close(p.kl(), kl_divergence(p_ref, std_normal).sum(dim=(1, 2, 3)))
    torch.testing.assert_close(p.kl(q), kl_divergence(p_ref, q_ref).sum(dim=(1, 2, 3)))
    x = torch.randn(3, 4, 5, 5)
    torch.testing.assert_close(p.nll(x), -p_ref.log_prob(x).sum(dim=(1, 2, 3)))
    assert p.kl().shape == (3,)


def test_odd_channel_parameters_are_rejected():
    with pytest.raises(ValueError, match="even channel count"):
        DiagonalGaussianDistribution(torch.randn(1, 7, 2, 2))


# ------------------------------------------------------------------------------------------ blocks


def test_vae_groupnorms_use_eps_1e6_and_32_groups():
    norms = [m for m in tiny_vae().modules() if isinstance(m, torch.nn.GroupNorm)]
    assert len(norms) > 10
    assert all(m.eps == 1e-6 and m.num_groups == 32 and m.affine for m in norms)


def test_downsample_pads_right_and_bottom_only():
    torch.manual_seed(0)
    down = Downsample(2, with_conv=True)
    x = torch.randn(1, 2, 6, 6)
    y = down(x)
    assert y.shape == (1, 2, 3, 3)
    # Output (0, 0) sees input rows/cols 0..2 (no left/top padding) ...
    first = (down.conv.weight[0] * x[0, :, 0:3, 0:3]).sum() + down.conv.bias[0]
    torch.testing.assert_close(y[0, 0, 0, 0], first)
    # ... and the last output sees rows/cols 4, 5 plus one zero row/col of padding.
    last = (down.conv.weight[0, :, :2, :2] * x[0, :, 4:6, 4:6]).sum() + down.conv.bias[0]
    torch.testing.assert_close(y[0, 0, 2, 2], last)


def test_attn_block_is_single_head_softmax_attention():
    torch.manual_seed(0)
    attn = AttnBlock(32)
    x = torch.randn(2, 32, 4, 5)
    h = attn.norm(x)
    q, k, v = (conv(h).flatten(2) for conv in (attn.q, attn.k, attn.v))  # B x C x HW
    weights = torch.softmax(q.transpose(1, 2) @ k / math.sqrt(32), dim=-1)  # B x HW(query) x HW(key)
    out = (v @ weights.transpose(1, 2)).reshape(2, 32, 4, 5)
    torch.testing.assert_close(attn(x), x + attn.proj_out(out), rtol=1e-5, atol=1e-5)


def test_tiny_vae_downsamples_by_8_and_round_trips_shapes():
    vae = tiny_vae().eval()
    x = images(2, 64).permute(0, 3, 1, 2)
    post = vae.encode(x)
    assert post.mean.shape == (2, 4, 8, 8)
    assert vae.decode(post.sample()).shape == (2, 3, 64, 64)
    rect = vae.encode(torch.randn(1, 3, 64, 32))
    assert rect.mean.shape == (1, 4, 8, 4)
    assert vae.decode(rect.mode()).shape == (1, 3, 64, 32)
    dec, post2 = vae(x, sample_posterior=False)
    torch.testing.assert_close(dec, vae.decode(post2.mode()))


def test_full_size_vae_on_meta_matches_reference_keys_and_param_counts():
    cfg = OmegaConf.load(REPO / "configs" / "stable-diffusion" / "v2-inpainting-inference.yaml")
    with torch.device("meta"):
        vae = instantiate_from_config(cfg.model.params.first_stage_config)
    got = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    ref = {
        k.removeprefix("first_stage_model."): v
        for k, v in read_reference_tsv("sd2-inpainting-keys.tsv").items()
        if k.startswith("first_stage_model.")
    }
    assert len(ref) == 248
    assert got == ref

    def count(*prefixes):
        return sum(p.numel() for n, p in vae.named_parameters() if n.startswith(prefixes))

    assert count("encoder.", "quant_conv.") == 34_163_664
    assert count("decoder.", "post_quant_conv.") == 49_490_199


def test_xformers_attn_type_is_the_same_block_and_bad_options_raise():
    dd = tiny_vae_config()["params"]["ddconfig"]
    plain, xf = tiny_vae(), tiny_vae(ddconfig={**dd, "attn_type": "vanilla-xformers"})
    assert {k: v.shape for k, v in plain.state_dict().items()} == {k: v.shape for k, v in xf.state_dict().items()}
    for bad, match in (({"attn_type": "linear"}, "attn_type"), ({"use_linear_attn": True}, "use_linear_attn"),
                       ({"typo_key": 1}, "typo_key")):
        with pytest.raises(ValueError, match=match):
            tiny_vae(ddconfig={**dd, **bad})
    with pytest.raises(ValueError, match="colorize_nlabels"):
        tiny_vae(colorize_nlabels=182)
    with pytest.raises(ValueError, match="ema_decay"):
        tiny_vae(ema_decay=0.999)
    with pytest.raises(ValueError, match="double_z"):
        tiny_vae(ddconfig={**dd, "double_z": False})
    # COMPAT: each half accepts (and ignores) the other half's ddconfig keys, as ldm passes one dict to both.
    Encoder(**{**dd, "give_pre_end": True})
    Decoder(**dd)


def test_decoder_give_pre_end_and_tanh_out():
    dd = tiny_vae_config()["params"]["ddconfig"]
    torch.manual_seed(0)
    dec = Decoder(**{**dd, "tanh_out": True})
    z = torch.randn(1, 4, 8, 8) * 10
    out = dec(z)
    assert out.abs().max() <= 1.0
    dec.give_pre_end = True
    assert dec(z).shape == (1, 32, 64, 64)  # features before norm_out/conv_out, ch * ch_mult[0] channels


# ------------------------------------------------------------------------------------------ checkpoints


def test_ckpt_path_loads_wrapped_prefixed_ckpt_and_bare_safetensors(tmp_path, caplog):
    src = tiny_vae()
    sd = src.state_dict()
    wrapped = tmp_path / "ldm.ckpt"
    torch.save({"state_dict": {f"first_stage_model.{k}": v for k, v in sd.items()} | {"model.x": torch.ones(1)}},
               wrapped)
    bare = tmp_path / "vae.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(bare))
    for path in (wrapped, bare):
        torch.manual_seed(123)  # a different init, so equality proves loading
        loaded = tiny_vae(ckpt_path=str(path))
        assert all(torch.equal(v, sd[k]) for k, v in loaded.state_dict().items())

    # strict by default: dropping the decoder leaves its tensors missing, which is an error naming them ...
    with pytest.raises(CheckpointError, match=r"missing from the checkpoint \(decoder\.conv_in\.weight"):
        tiny_vae(ckpt_path=str(bare), ignore_keys=["decoder."])
    # ... unless the partial load is asked for explicitly
    torch.manual_seed(123)
    with caplog.at_level(logging.INFO):
        partial = tiny_vae(ckpt_path=str(bare), ignore_keys=["decoder."], allow_missing_prefixes=["decoder."])
    assert torch.equal(partial.encoder.conv_in.weight, sd["encoder.conv_in.weight"])
    assert not torch.equal(partial.decoder.conv_in.weight, sd["decoder.conv_in.weight"])
    n_decoder = sum(k.startswith("decoder.") for k in sd)
    assert any(f"{n_decoder} model tensors not in the checkpoint" in r.getMessage() for r in caplog.records)
    # a bigger model than the file (an unexpected tensor in the file) is refused too
    extra = tmp_path / "extra.safetensors"
    save_file({**{k: v.contiguous() for k, v in sd.items()}, "encoder.surplus": torch.ones(1)}, str(extra))
    with pytest.raises(CheckpointError, match=r"1 checkpoint tensors the model does not have \(encoder\.surplus\)"):
        tiny_vae(ckpt_path=str(extra))


# ------------------------------------------------------------------------------------------ training


def test_reconstruction_kl_loss_matches_formula():
    x, xrec = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    post = DiagonalGaussianDistribution(torch.randn(2, 8, 2, 2))
    for kind, err in (("l1", (x - xrec).abs()), ("l2", (x - xrec) ** 2)):
        loss_fn = ReconstructionKLLoss(kl_weight=0.5, rec_loss=kind, logvar_init=0.7)
        loss, logs = loss_fn(x, xrec, post, split="val")
        nll = (err / math.exp(0.7) + 0.7).sum() / 2
        expected = nll + 0.5 * post.kl().sum() / 2
        torch.testing.assert_close(loss, expected)
        torch.testing.assert_close(logs["val/rec_loss"], err.mean())
        torch.testing.assert_close(logs["val/nll_loss"], nll)
    with pytest.raises(ValueError, match="rec_loss"):
        ReconstructionKLLoss(rec_loss="lpips")


def _eval_loss(vae: AutoencoderKL, batch: dict) -> float:
    with torch.no_grad():
        x = vae.get_input(batch, "image")
        rec, post = vae(x, sample_posterior=False)
        return vae.loss(x, rec, post)[0].item()


def test_training_steps_reduce_the_loss():
    torch.manual_seed(0)
    vae = tiny_vae(lossconfig=TRAIN_LOSS)
    vae.learning_rate = 5e-4
    batch = {"image": images(4, 64)}
    before = _eval_loss(vae, batch)
    items = [{"image": img} for img in batch["image"]]
    train = torch.utils.data.DataLoader(items * 12, batch_size=4)  # the same 4 images, 12 steps
    val = torch.utils.data.DataLoader(items, batch_size=4)
    trainer = pl.Trainer(max_steps=12, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(vae, train_dataloaders=train, val_dataloaders=val)
    after = _eval_loss(vae, batch)
    assert after < 0.85 * before
    assert "val/rec_loss" in trainer.callback_metrics


def test_configure_optimizers_uses_learning_rate_and_learn_logvar():
    vae = tiny_vae(lossconfig=TRAIN_LOSS, learn_logvar=True)
    opt = vae.configure_optimizers()
    assert opt.param_groups[0]["lr"] == vae.base_learning_rate
    vae.learning_rate = 3e-4
    opt = vae.configure_optimizers()
    params = opt.param_groups[0]["params"]
    assert opt.param_groups[0]["lr"] == 3e-4 and opt.param_groups[0]["betas"] == (0.5, 0.9)
    assert any(p is vae.loss.logvar for p in params)
    assert len(params) == sum(1 for _ in vae.parameters())  # every AE parameter plus logvar
    no_logvar = tiny_vae(lossconfig=TRAIN_LOSS).configure_optimizers().param_groups[0]["params"]
    assert len(no_logvar) == len(params) - 1
    with pytest.raises(ValueError, match="learn_logvar"):
        tiny_vae(learn_logvar=True)  # Identity loss has no logvar


def test_identity_lossconfig_builds_but_cannot_train():
    vae = tiny_vae()
    assert isinstance(vae.loss, torch.nn.Identity)
    with pytest.raises(ValueError, match="ReconstructionKLLoss"):
        vae.training_step({"image": images(1, 64)}, 0)
    with pytest.raises(ValueError, match="ReconstructionKLLoss"):
        vae.configure_optimizers()


def test_log_images_returns_inputs_reconstructions_samples():
    vae = tiny_vae().eval()
    out = vae.log_images({"image": images(3, 64)}, N=2, split="train")
    assert set(out) == {"inputs", "reconstructions", "samples"}
    assert all(v.shape == (2, 3, 64, 64) for v in out.values())
    torch.testing.assert_close(out["inputs"], images(3, 64)[:2].permute(0, 3, 1, 2))
    assert set(vae.log_images({"image": images(1, 64)}, only_inputs=True)) == {"inputs"}
