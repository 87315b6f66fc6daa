"""Diffusion loss reductions, ldm's log names, the ELBO term and Min-SNR-gamma weighting (``DiffusionLoss``)."""

from __future__ import annotations

import pytest
import torch

from ldm.models.diffusion import parameterization as P
from ldm.models.diffusion.losses import DiffusionLoss, per_sample_loss
from ldm.models.diffusion.schedule import NoiseSchedule, extract, make_beta_schedule


@pytest.fixture(scope="module")
def sched():
    return NoiseSchedule.from_betas(make_beta_schedule("linear", 1000, 0.00085, 0.012))


def test_per_sample_reductions():
    pred = torch.zeros(2, 3, 2, 2)
    target = torch.zeros(2, 3, 2, 2)
    target[0] = 2.0
    target[1, 0] = -3.0  # one of three channels
    torch.testing.assert_close(per_sample_loss(pred, target, "l2"), torch.tensor([4.0, 3.0]))
    torch.testing.assert_close(per_sample_loss(pred, target, "l1"), torch.tensor([2.0, 1.0]))
    with pytest.raises(ValueError, match="loss_type"):
        per_sample_loss(pred, target, "huber")
    with pytest.raises(ValueError, match="shapes"):
        per_sample_loss(pred, target[:, :2])


def make_loss(sched, **kwargs) -> DiffusionLoss:
    loss_fn = DiffusionLoss(**kwargs)
    loss_fn.set_schedule(sched)
    return loss_fn


def test_default_loss_is_plain_mse_with_ldm_log_names(sched):
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(4, 4, 3, 3, generator=g), torch.randn(4, 4, 3, 3, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    loss, logs = make_loss(sched)(pred, target, t, prefix="val")
    mse = ((pred - target) ** 2).mean()
    torch.testing.assert_close(loss, mse)
    # loss_vlb has weight 0 here, so it is not logged (ldm logged it anyway; for v it duplicates loss_simple)
    assert set(logs) == {"val/loss_simple", "val/loss"}
    torch.testing.assert_close(logs["val/loss_simple"], mse)
    assert not logs["val/loss"].requires_grad


def test_weights_elbo_and_logvar(sched):
    pred, target = torch.ones(2, 1, 2, 2), torch.zeros(2, 1, 2, 2)  # per-sample mse = 1
    t = torch.tensor([3, 7])
    lvlb = sched.lvlb_weights("eps")
    loss_fn = make_loss(sched, l_simple_weight=2.0, original_elbo_weight=0.1)
    loss_fn.logvar[7] = 0.5  # ldm's fixed per-timestep log-variance
    loss, logs = loss_fn(pred, target, t)
    simple = torch.tensor([1.0, 1.0 / torch.exp(torch.tensor(0.5)) + 0.5]).mean()
    vlb = lvlb[t].mean()
    torch.testing.assert_close(loss, 2.0 * simple + 0.1 * vlb)
    torch.testing.assert_close(logs["train/loss_vlb"], vlb)
    torch.testing.assert_close(logs["train/loss_simple"], torch.tensor(1.0))


@pytest.mark.parametrize("mode", ["eps", "v"])
def test_min_snr_weighting_equals_clipped_snr_times_x0_error(sched, mode):
    # Min-SNR-gamma: weighted loss on the trained quantity == min(SNR, gamma) * squared x0 error.
    gamma = 5.0
    g = torch.Generator().manual_seed(3)
    abar_table = torch.tensor(sched.alphas_cumprod)
    t = torch.tensor([1, 100, 400, 900])
    a, s = extract(abar_table.sqrt(), t, 4), extract((1 - abar_table).sqrt(), t, 4)
    x0, eps = torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64), torch.randn(4, 2, 3, 3, generator=g,
                                                                                     dtype=torch.float64)
    x_t = P.q_sample(x0, eps, a, s)
    target = P.training_target(mode, x0, eps, a, s)
    pred = target + 0.1 * torch.randn(target.shape, generator=g, dtype=torch.float64)
    _, x0_hat = P.split_prediction(mode, pred, x_t, a, s)
    snr = abar_table[t] / (1 - abar_table[t])
    expected = (snr.clamp(max=gamma) * ((x0_hat - x0) ** 2).mean(dim=(1, 2, 3))).mean()
    loss, _ = make_loss(sched, parameterization=mode, min_snr_gamma=gamma)(pred, target, t)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)  # the weight table is float32


def test_min_snr_weights_forms_and_errors():
    abar = torch.tensor([0.99, 0.5, 0.01], dtype=torch.float64)
    snr = abar / (1 - abar)
    torch.testing.assert_close(P.min_snr_weights("x0", abar, 5.0), snr.clamp(max=5.0))
    torch.testing.assert_close(P.min_snr_weights("eps", abar, 5.0), torch.tensor([5.0 / 99, 1.0, 1.0],
                                                                                 dtype=torch.float64))
    torch.testing.assert_close(P.min_snr_weights("v", abar.numpy(), 5.0), (snr.clamp(max=5.0) / (snr + 1)).numpy())
    with pytest.raises(ValueError, match="min_snr_gamma"):
        P.min_snr_weights("eps", abar, 0.0)
    with pytest.raises(ValueError, match="min_snr_gamma"):
        DiffusionLoss(min_snr_gamma=0.0)
    with pytest.raises(ValueError, match="loss_type"):
        DiffusionLoss(loss_type="huber")
    with pytest.raises(RuntimeError, match="set_schedule"):
        DiffusionLoss()(torch.zeros(1, 1), torch.zeros(1, 1), torch.tensor([0]))


def test_tables_follow_the_schedule_and_are_not_saved(sched):
    loss_fn = make_loss(sched, parameterization="x0", min_snr_gamma=5.0)
    torch.testing.assert_close(loss_fn.lvlb_weights, sched.lvlb_weights("x0"))
    assert loss_fn.logvar.shape == loss_fn.timestep_weights.shape == (1000,)
    assert dict(loss_fn.state_dict()) == {}  # recomputed from the schedule, never stored in checkpoints
    short = NoiseSchedule.from_betas(make_beta_schedule("linear", 10, 0.00085, 0.012))
    loss_fn.set_schedule(short)  # LatentDiffusion.register_schedule does this when the schedule changes
    assert loss_fn.lvlb_weights.shape == loss_fn.timestep_weights.shape == (10,)
    snr = short.alphas_cumprod / (1 - short.alphas_cumprod)
    torch.testing.assert_close(loss_fn.timestep_weights.double(), torch.tensor(snr.clip(max=5.0)), rtol=1e-6, atol=0)
