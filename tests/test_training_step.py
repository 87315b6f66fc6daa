"""Training on the tiny inpainting config: loss, gradients, optimizer contents, LR warm-up, EMA cadence."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from tests.helpers import FixedBatches, build_tiny, synthetic_batch


def _trainer(max_steps, accumulate=1, tmp_path=None):
    return pl.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, accumulate_grad_batches=accumulate,
                      default_root_dir=tmp_path, num_sanity_val_steps=0)


def test_one_step_finite_loss_and_grads_only_on_unet():
    model = build_tiny("inpaint")
    batch = synthetic_batch(2)
    z, cond = model.get_input(batch, "jpg")
    assert z.shape == (2, 4, 8, 8)
    assert cond["c_concat"][0].shape == (2, 5, 8, 8) and cond["c_crossattn"][0].shape == (2, 77, 32)
    # channel 4 is the nearest-resized mask: 1 inside the square hole, 0 outside
    torch.testing.assert_close(cond["c_concat"][0][:, 0], torch.nn.functional.interpolate(
        batch["mask"].permute(0, 3, 1, 2), size=(8, 8))[:, 0])
    model.train()
    loss, logs = model(z, cond)
    assert torch.isfinite(loss) and set(logs) >= {"train/loss_simple", "train/loss"}
    loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad and all(n.startswith("model.diffusion_model.") for n in with_grad)
    assert not any(p.requires_grad for p in model.first_stage_model.parameters())
    assert not any(p.requires_grad for p in model.cond_stage_model.parameters())


def test_training_step_does_not_decode(monkeypatch):
    model = build_tiny("inpaint")

    def boom(*a, **k):
        raise AssertionError("the training step must not decode latents (DECISIONS D8)")

    monkeypatch.setattr(model.first_stage_model, "decode", boom)
    model.train()
    loss = model.training_step(synthetic_batch(2), 0)
    assert torch.isfinite(loss)


def test_optimizer_holds_only_unet_params_and_lr_warms_up(tmp_path):
    model = build_tiny("inpaint")  # warm_up_steps [10], f_start 1e-6, base lr 1e-3
    opt_cfg = model.configure_optimizers()
    opt, sched = opt_cfg[0][0], opt_cfg[1][0]["scheduler"]
    unet_ids = {id(p) for p in model.model.parameters()}
    opt_ids = {id(p) for g in opt.param_groups for p in g["params"]}
    assert opt_ids == unet_ids
    assert opt.defaults["weight_decay"] == 0.01
    lrs = []
    for _ in range(14):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    base = 1e-3
    assert lrs[0] == pytest.approx(base * 1e-6)
    assert lrs[5] == pytest.approx(base * (1e-6 + (1 - 1e-6) * 0.5))
    assert lrs[10] == pytest.approx(base)
    assert lrs[13] == pytest.approx(base)


def _fixed_eval_loss(model, batch, seed=123):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        z, c = model.get_input(batch, "jpg")
        t = torch.randint(0, 1000, (z.shape[0] * 8,), generator=g)
        zz = z.repeat(8, 1, 1, 1)
        cc = {"c_concat": [c["c_concat"][0].repeat(8, 1, 1, 1)], "c_crossattn": [c["c_crossattn"][0].repeat(8, 1, 1)]}
        noise = torch.randn(zz.shape, generator=g)
        loss, _ = model.p_losses(zz, cc, t, noise=noise)
    return float(loss)


@pytest.mark.parametrize("param", ["v", "eps"])
def test_loss_drops_over_50_steps_on_a_fixed_batch(tmp_path, param):
    torch.manual_seed(0)
    model = build_tiny("inpaint", parameterization=param, ucg_training=None, scheduler_config=None)
    model.learning_rate = 2e-3
    batch = synthetic_batch(4)
    # fix the latents' posterior noise so the batch is really fixed
    before = _fixed_eval_loss(model, batch)
    _trainer(50, tmp_path=tmp_path).fit(model, DataLoader(FixedBatches(batch, 50), batch_size=None))
    after = _fixed_eval_loss(model, batch)
    assert after < 0.7 * before, (before, after)


def test_ema_updates_once_per_optimizer_step_with_accumulation(tmp_path):
    model = build_tiny("inpaint", scheduler_config=None, ucg_training=None)
    _trainer(3, accumulate=2, tmp_path=tmp_path).fit(
        model, DataLoader(FixedBatches(synthetic_batch(2), 6), batch_size=None))
    assert model.global_step == 3
    assert int(model.model_ema.num_updates) == 3


def test_ucg_dropout_is_deterministic_and_replaces_with_empty_string():
    model = build_tiny("inpaint")
    model.ucg_training = {"txt": {"p": 0.5, "val": ""}}
    batch = {"txt": [f"caption {i}" for i in range(200)]}
    a, b = model.apply_ucg(batch)["txt"], model.apply_ucg(batch)["txt"]
    assert a == b
    dropped = sum(x == "" for x in a)
    assert 70 < dropped < 130
    assert all(x in ("", f"caption {i}") for i, x in enumerate(a))


def test_precomputed_latent_moments_replace_the_image_encoder(monkeypatch):
    model = build_tiny("inpaint")
    batch = synthetic_batch(2)
    x = model.image_from_batch(batch, "jpg")
    moments = model.first_stage_model.encode(x).parameters  # B x 8 x h x w, as precompute_latents writes
    calls = []
    orig = model.first_stage_model.encode
    monkeypatch.setattr(model.first_stage_model, "encode", lambda t: calls.append(t.shape) or orig(t))
    torch.manual_seed(0)
    z_online, _ = model.get_input(batch, "jpg")
    torch.manual_seed(0)
    z_pre, c = model.get_input({**batch, "latent_moments": moments}, "jpg")
    torch.testing.assert_close(z_pre, z_online)  # same posterior, same noise -> same sample
    assert len(calls) == 1 + 2  # online: image + masked image; precomputed: masked image only


def test_channels_last_and_compile_switches_keep_outputs_and_keys():
    eager = build_tiny("inpaint")
    fast = build_tiny("inpaint", channels_last=True)
    fast.load_state_dict(eager.state_dict())
    assert fast.model.diffusion_model.input_blocks[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    x, t = torch.randn(2, 9, 8, 8), torch.tensor([3, 500])
    ctx = torch.randn(2, 77, 32)
    with torch.no_grad():
        for p in eager.model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
        fast.load_state_dict(eager.state_dict())
        torch.testing.assert_close(fast.model.diffusion_model(x, t, context=ctx),
                                   eager.model.diffusion_model(x, t, context=ctx), atol=1e-5, rtol=1e-5)
    compiled = build_tiny("inpaint", compile_unet={"backend": "eager"})
    assert set(compiled.state_dict()) == set(eager.state_dict())  # no _orig_mod. prefixes


def test_log_images_keys_and_ranges():
    model = build_tiny("inpaint", c_concat_log_start=1, c_concat_log_end=5)
    images = model.log_images(synthetic_batch(2), N=2, ddim_steps=2, unconditional_guidance_scale=3.0,
                              unconditional_guidance_label=[""], inpaint=False, plot_progressive_rows=False)
    assert set(images) == {"inputs", "reconstruction", "mask", "masked_image", "c_concat_decoded", "samples",
                           "samples_cfg_scale_3.00"}
    for key, x in images.items():
        assert x.shape == (2, 3, 64, 64), key
    assert set(images["mask"].unique().tolist()) <= {-1.0, 1.0}
    with pytest.raises(ValueError, match=r"log_images_kwargs\.ddim_stepz: unknown option \(did you mean 'ddim_steps'"):
        model.log_images(synthetic_batch(2), N=2, ddim_stepz=2)


def test_scale_by_std_estimates_once_and_is_kept_from_a_checkpoint(tmp_path):
    model = build_tiny("inpaint", scale_by_std=True, scale_factor=1.0, scheduler_config=None, ucg_training=None)
    batch = synthetic_batch(4)
    with torch.no_grad():
        torch.manual_seed(5)
        z = model.first_stage_model.encode(model.image_from_batch(batch, "jpg")).sample()
    _trainer(1, tmp_path=tmp_path).fit(model, DataLoader(FixedBatches(batch, 1), batch_size=None))
    factor = float(model.scale_factor)
    assert factor == pytest.approx(1.0 / float(z.flatten().std()), rel=0.15)  # posterior samples differ slightly
    assert "scale_factor" in model.state_dict()
    path = tmp_path / "m.ckpt"
    torch.save({"state_dict": model.state_dict()}, path)
    again = build_tiny("inpaint", scale_by_std=True, scale_factor=1.0, ckpt_path=str(path), finetune_keys=None,
                       scheduler_config=None, ucg_training=None)
    _trainer(1, tmp_path=tmp_path).fit(again, DataLoader(FixedBatches(synthetic_batch(4, seed=9), 1),
                                                         batch_size=None))
    assert float(again.scale_factor) == pytest.approx(factor)  # loaded, not re-estimated
