"""Noise schedule, derived buffers, ``extract`` and the DDIM sub-schedule (ldm compatibility quirks pinned)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ldm.models.diffusion.schedule import (
    NoiseSchedule,
    ddim_coefficients,
    ddim_timesteps,
    extract,
    make_beta_schedule,
)

LDM_BUFFER_ORDER = [
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
]


@pytest.fixture(scope="module")
def sd() -> NoiseSchedule:
    return NoiseSchedule.from_betas(make_beta_schedule("linear", 1000, 0.00085, 0.012))


def test_sd_reference_numbers(sd):
    # DECISIONS R1 reference values for the SD schedule.
    assert sd.betas[0] == pytest.approx(0.00085, rel=1e-9)
    assert sd.betas[999] == pytest.approx(0.012, rel=1e-9)
    assert sd.alphas_cumprod[0] == pytest.approx(0.99915, rel=1e-6)
    assert sd.alphas_cumprod[499] == pytest.approx(0.27767, rel=2e-5)
    assert sd.alphas_cumprod[999] == pytest.approx(0.0046601, rel=2e-5)
    assert sd.sqrt_alphas_cumprod[999] == pytest.approx(0.068265, rel=2e-5)
    snr0 = sd.alphas_cumprod[0] / (1 - sd.alphas_cumprod[0])
    assert snr0 == pytest.approx(1175.5, rel=1e-4)


def test_beta_schedule_names():
    n, lo, hi = 10, 0.00085, 0.012
    linear = make_beta_schedule("linear", n, lo, hi)
    sqrt_linear = make_beta_schedule("sqrt_linear", n, lo, hi)
    # "linear" is linear in sqrt(beta); "sqrt_linear" is linear in beta: same end points, different inside.
    np.testing.assert_allclose(np.diff(np.sqrt(linear)), np.diff(np.sqrt(linear))[0], rtol=1e-9)
    np.testing.assert_allclose(np.diff(sqrt_linear), (hi - lo) / (n - 1), rtol=1e-9)
    assert linear[0] == pytest.approx(sqrt_linear[0]) and linear[-1] == pytest.approx(sqrt_linear[-1])
    assert np.all(linear[1:-1] < sqrt_linear[1:-1])
    np.testing.assert_allclose(make_beta_schedule("sqrt", n, lo, hi) ** 2, sqrt_linear, rtol=1e-12)
    assert linear.dtype == np.float64 and linear.shape == (n,)


def test_cosine_schedule_matches_closed_form_abar():
    n, s = 1000, 8e-3
    abar = np.cumprod(1 - make_beta_schedule("cosine", n, cosine_s=s))
    f = lambda t: math.cos((t / n + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    for t in (0, 100, 500, 900):  # before the 0.999 clip bites at the very end
        assert abar[t] == pytest.approx(f(t + 1) / f(0), rel=1e-9)
    assert make_beta_schedule("cosine", n, cosine_s=s).max() <= 0.999


def test_bad_schedule_name_raises():
    with pytest.raises(ValueError, match="beta_schedule"):
        make_beta_schedule("scaled_linear", 10)
    with pytest.raises(ValueError, match="timesteps"):
        make_beta_schedule("linear", 0)


def test_buffers_names_order_dtype(sd):
    buffers = sd.buffers()
    assert list(buffers) == LDM_BUFFER_ORDER
    for name, value in buffers.items():
        assert value.dtype == torch.float32 and value.shape == (1000,), name
        np.testing.assert_allclose(value.numpy(), getattr(sd, name).astype(np.float32), rtol=0, atol=0)
    assert sd.num_timesteps == 1000


def test_buffers_against_independent_numpy(sd):
    b = (np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2).astype(np.float64)
    abar = np.cumprod(1 - b)
    prev = np.concatenate([[1.0], abar[:-1]])
    expected = {
        "alphas_cumprod_prev": prev,
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1 - abar),
        "log_one_minus_alphas_cumprod": np.log(1 - abar),
        "sqrt_recip_alphas_cumprod": 1 / np.sqrt(abar),
        "sqrt_recipm1_alphas_cumprod": np.sqrt((1 - abar) / abar),
        "posterior_variance": b * (1 - prev) / (1 - abar),
        "posterior_mean_coef1": b * np.sqrt(prev) / (1 - abar),
        "posterior_mean_coef2": (1 - prev) * np.sqrt(1 - b) / (1 - abar),
    }
    for name, value in expected.items():
        np.testing.assert_allclose(getattr(sd, name), value, rtol=1e-10, err_msg=name)
    assert sd.posterior_variance[0] == 0.0
    assert sd.posterior_log_variance_clipped[0] == pytest.approx(math.log(1e-20))
    np.testing.assert_allclose(sd.posterior_log_variance_clipped[1:], np.log(expected["posterior_variance"][1:]))


def test_posterior_is_consistent_with_the_marginals(sd):
    # q(x_{t-1} | x_t, x0) = N(c1 x0 + c2 x_t, var~) must reproduce q(x_{t-1} | x0) = N(sqrt(abar') x0, 1 - abar').
    c1, c2, abar, prev = sd.posterior_mean_coef1, sd.posterior_mean_coef2, sd.alphas_cumprod, sd.alphas_cumprod_prev
    np.testing.assert_allclose(c1 + c2 * np.sqrt(abar), np.sqrt(prev), rtol=1e-10)
    np.testing.assert_allclose(c2**2 * (1 - abar) + sd.posterior_variance, 1 - prev, rtol=1e-9, atol=1e-15)


def test_v_posterior_interpolates_towards_beta():
    betas = make_beta_schedule("linear", 100, 1e-4, 2e-2)
    plain, mixed = NoiseSchedule.from_betas(betas), NoiseSchedule.from_betas(betas, v_posterior=0.25)
    np.testing.assert_allclose(mixed.posterior_variance, 0.75 * plain.posterior_variance + 0.25 * betas)
    with pytest.raises(ValueError, match="betas"):
        NoiseSchedule.from_betas(np.array([0.1, 1.5]))


def test_lvlb_weights(sd):
    b, abar, var = sd.betas, sd.alphas_cumprod, sd.posterior_variance
    eps = sd.lvlb_weights("eps").numpy()
    t = 5
    assert eps[t] == pytest.approx(b[t] ** 2 / (2 * var[t] * (1 - b[t]) * (1 - abar[t])), rel=1e-6)
    assert eps[0] == eps[1] and np.all(np.isfinite(eps))
    np.testing.assert_array_equal(sd.lvlb_weights("v").numpy(), np.ones(1000, dtype=np.float32))
    x0 = sd.lvlb_weights("x0").numpy()
    assert x0[300] == pytest.approx(0.5 * math.sqrt(abar[300]) / (2 - abar[300]), rel=1e-6)  # COMPAT value
    with pytest.raises(ValueError, match="parameterization"):
        sd.lvlb_weights("score")


def test_extract_gathers_and_broadcasts():
    values = torch.arange(10, dtype=torch.float32) * 0.5
    t = torch.tensor([0, 3, 9])
    out = extract(values, t, 4)
    assert out.shape == (3, 1, 1, 1)
    assert out.flatten().tolist() == [0.0, 1.5, 4.5]
    assert extract(values, t, 1).shape == (3,)


def test_extract_raises_on_wrong_rank():
    values, t = torch.ones(10), torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="values"):
        extract(values[None], t, 4)
    with pytest.raises(ValueError, match="t must"):
        extract(values, t[None], 4)
    with pytest.raises(ValueError, match="ndim"):
        extract(values, t, 0)


def test_ddim_timesteps_uniform_plus_one_offset():
    np.testing.assert_array_equal(ddim_timesteps(50, 1000), np.arange(1, 1000, 20))  # 1, 21, ..., 981
    ts45 = ddim_timesteps(45, 1000)
    assert len(ts45) == 46 and ts45[1] - ts45[0] == 22 and ts45[0] == 1 and ts45[-1] == 991
    np.testing.assert_array_equal(ddim_timesteps(1, 1000), [1])
    ts20 = ddim_timesteps(20, 1000)
    assert ts20.tolist() == list(range(1, 1000, 50))


def test_ddim_timesteps_quad_and_errors():
    quad = ddim_timesteps(10, 1000, "quad")
    expected = (np.linspace(0, math.sqrt(800), 10) ** 2).astype(int) + 1
    np.testing.assert_array_equal(quad, expected)
    assert quad[-1] == 801
    with pytest.raises(ValueError, match="beyond"):
        ddim_timesteps(3, 1000)  # 0, 333, 666, 999 -> +1 -> 1000: out of range (ldm crashes)
    for bad in (0, 1001):
        with pytest.raises(ValueError, match="ddim_num_steps"):
            ddim_timesteps(bad, 1000)
    with pytest.raises(ValueError, match="ddim_discretize"):
        ddim_timesteps(10, 1000, "cubic")


def test_ddim_coefficients_alphas_prev_quirk(sd):
    abar = torch.tensor(sd.alphas_cumprod, dtype=torch.float32)
    ts = ddim_timesteps(50, 1000)
    coef = ddim_coefficients(abar, ts, 0.0)
    abar64 = abar.double()
    torch.testing.assert_close(coef.alphas, abar64[torch.from_numpy(ts)])
    expected_prev = torch.cat([abar64[:1], abar64[torch.from_numpy(ts[:-1])]])  # DECISIONS R3
    torch.testing.assert_close(coef.alphas_prev, expected_prev)
    assert coef.alphas_prev[0] == abar64[0]  # lands on abar_0 = 0.99915, not 1
    assert float(coef.alphas_prev[0]) == pytest.approx(0.99915, rel=1e-6)
    assert torch.all(coef.sigmas == 0)


def test_ddim_sigma_formula_for_eta(sd):
    abar = torch.tensor(sd.alphas_cumprod)
    ts = ddim_timesteps(20, 1000)
    coef = ddim_coefficients(abar, ts, 0.5)
    k = 7
    a_t, a_prev = float(abar[ts[k]]), float(abar[ts[k - 1]])
    assert float(coef.sigmas[k]) == pytest.approx(0.5 * math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)))
    # eta = 1 over consecutive steps is DDPM ancestral sampling: sigma^2 is the posterior variance.
    full = ddim_coefficients(abar, np.arange(1, 1000), 1.0)
    np.testing.assert_allclose(full.sigmas.numpy() ** 2, sd.posterior_variance[1:], rtol=1e-8)
    with pytest.raises(ValueError, match="eta"):
        ddim_coefficients(abar, ts, 1.5)
    with pytest.raises(ValueError, match="ascending"):
        ddim_coefficients(abar, ts[::-1], 0.0)
