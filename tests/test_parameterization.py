"""eps / x0 / v conversions, training targets and the prediction dispatcher, on random alphas."""

from __future__ import annotations

import pytest
import torch

from ldm.models.diffusion import parameterization as P
from ldm.models.diffusion.schedule import NoiseSchedule, extract, make_beta_schedule


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(6, 4, 5, 5, generator=g, dtype=torch.float64)
    eps = torch.randn(6, 4, 5, 5, generator=g, dtype=torch.float64)
    abar = torch.rand(6, generator=g, dtype=torch.float64) * 0.98 + 0.01  # in (0.01, 0.99)
    a, s = abar.sqrt().view(6, 1, 1, 1), (1 - abar).sqrt().view(6, 1, 1, 1)
    return x0, eps, a, s


def test_q_sample_and_v_formula(batch):
    x0, eps, a, s = batch
    torch.testing.assert_close(P.q_sample(x0, eps, a, s), a * x0 + s * eps)
    v = P.v_from_x0_eps(x0, eps, a, s)
    abar = a**2
    torch.testing.assert_close(v, abar.sqrt() * eps - (1 - abar).sqrt() * x0)  # DECISIONS R2 get_v


def test_round_trips(batch):
    x0, eps, a, s = batch
    x_t = P.q_sample(x0, eps, a, s)
    v = P.v_from_x0_eps(x0, eps, a, s)
    torch.testing.assert_close(P.x0_from_eps(x_t, eps, a, s), x0)
    torch.testing.assert_close(P.eps_from_x0(x_t, x0, a, s), eps)
    torch.testing.assert_close(P.x0_from_v(x_t, v, a, s), x0)
    torch.testing.assert_close(P.eps_from_v(x_t, v, a, s), eps)


def test_matches_ldm_formulas(batch):
    # DECISIONS R2: ldm writes x0 = sqrt(1/abar) x_t - sqrt(1/abar - 1) eps and
    # eps = (sqrt(1/abar) x_t - x0) / sqrt(1/abar - 1).
    x0, eps, a, s = batch
    abar = a**2
    x_t = P.q_sample(x0, eps, a, s)
    torch.testing.assert_close(P.x0_from_eps(x_t, eps, a, s), (1 / abar).sqrt() * x_t - (1 / abar - 1).sqrt() * eps)
    torch.testing.assert_close(P.eps_from_x0(x_t, x0, a, s), ((1 / abar).sqrt() * x_t - x0) / (1 / abar - 1).sqrt())


def test_training_target_per_mode(batch):
    x0, eps, a, s = batch
    assert P.training_target("eps", x0, eps, a, s) is eps
    assert P.training_target("x0", x0, eps, a, s) is x0
    torch.testing.assert_close(P.training_target("v", x0, eps, a, s), a * eps - s * x0)


@pytest.mark.parametrize("mode", ["eps", "x0", "v"])
def test_split_prediction_recovers_truth_from_exact_output(batch, mode):
    x0, eps, a, s = batch
    x_t = P.q_sample(x0, eps, a, s)
    exact_output = P.training_target(mode, x0, eps, a, s)  # what a perfect model would output
    eps_hat, x0_hat = P.split_prediction(mode, exact_output, x_t, a, s)
    torch.testing.assert_close(eps_hat, eps)
    torch.testing.assert_close(x0_hat, x0)


def test_works_with_schedule_buffers_and_float_coefficients():
    sched = NoiseSchedule.from_betas(make_beta_schedule("linear", 1000, 0.00085, 0.012))
    bufs = sched.buffers()
    t = torch.tensor([0, 250, 999])
    x0, eps = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    a, s = extract(bufs["sqrt_alphas_cumprod"], t, 4), extract(bufs["sqrt_one_minus_alphas_cumprod"], t, 4)
    x_t = P.q_sample(x0, eps, a, s)
    torch.testing.assert_close(P.x0_from_v(x_t, P.v_from_x0_eps(x0, eps, a, s), a, s), x0, atol=1e-5, rtol=1e-5)
    # plain python floats, as the samplers pass them
    a1, s1 = float(a[1]), float(s[1])
    torch.testing.assert_close(P.split_prediction("eps", eps[1], x_t[1], a1, s1)[1], x0[1], atol=1e-5, rtol=1e-5)


def test_bad_mode_raises(batch):
    x0, eps, a, s = batch
    assert P.check_parameterization("v") == "v"
    for call in (
        lambda: P.check_parameterization("score"),
        lambda: P.training_target("epsilon", x0, eps, a, s),
        lambda: P.split_prediction("V", x0, x0, a, s),
    ):
        with pytest.raises(ValueError, match="parameterization"):
            call()
