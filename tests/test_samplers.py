"""DDIM and DPM-Solver++(2M): exactness with oracle models, accuracy against the closed-form probability-flow ODE
solution for Gaussian data, the ldm-style ``sample`` facades with a tiny model, dict conditioning and CFG, and the
sampler registry behind ``sample_latents`` (the one entry point of image logs, inference and evaluation).

Oracles. For data concentrated on one point x0* the best eps prediction at x_t is exactly
(x_t - sqrt(abar) x0*) / sqrt(1 - abar); both samplers must then reproduce the ODE solution exactly. For
Gaussian data x0 ~ N(mu, sd0^2) per dimension, x_t ~ N(sqrt(abar) mu, abar sd0^2 + 1 - abar), the optimal eps
is sqrt(1 - abar) (x_t - m_t) / var_t, and the probability-flow ODE keeps the standardised value (x_t - m_t) / sd_t,
so its solution between any two noise levels is known in closed form.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from ldm.models.diffusion import parameterization as P
from ldm.models.diffusion import sampling
from ldm.models.diffusion.ddim import DDIMSampler, ddim_sample
from ldm.models.diffusion.dpm_solver import DiscreteVPSchedule, DPMSolverSampler, dpm_solver_pp_2m
from ldm.models.diffusion.schedule import NoiseSchedule, ddim_timesteps, make_beta_schedule

N = 1000
ABAR64 = torch.tensor(NoiseSchedule.from_betas(make_beta_schedule("linear", N, 0.00085, 0.012)).alphas_cumprod)


def abar_at(t: torch.Tensor, abar: torch.Tensor = ABAR64) -> torch.Tensor:
    """abar at integer steps, or at fractional model times (log alpha linear between steps, as DPM-Solver)."""
    if not t.is_floating_point():
        return abar.to(t.device)[t].double()
    n = t.double() * (len(abar) / 1000.0)  # model time (t_c - 1/N) * 1000 -> fractional step index
    lo = n.floor().clamp(0, len(abar) - 2)
    w = n - lo
    log_a = 0.5 * abar.double().log()
    lo = lo.long()
    return torch.exp(2 * (log_a[lo] * (1 - w) + log_a[lo + 1] * w))


def delta_oracle(x0_star: torch.Tensor, mode: str):
    def model_fn(x, t):
        abar = abar_at(t).to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
        a, s = abar.sqrt(), (1 - abar).sqrt()
        eps = (x - a * x0_star) / s
        return P.training_target(mode, x0_star.expand_as(x), eps, a, s)

    return model_fn


def ode_solution_for_delta(x_T, x0_star, abar_start, abar_end):
    eps = (x_T - math.sqrt(abar_start) * x0_star) / math.sqrt(1 - abar_start)  # constant along the ODE path
    return math.sqrt(abar_end) * x0_star + math.sqrt(1 - abar_end) * eps


@pytest.mark.parametrize("mode", ["eps", "x0", "v"])
def test_ddim_with_oracle_recovers_x0(mode):
    g = torch.Generator().manual_seed(0)
    x0_star = torch.randn(1, 3, 4, 4, generator=g, dtype=torch.float64)
    x_T = torch.randn(5, 3, 4, 4, generator=g, dtype=torch.float64)
    ts = ddim_timesteps(50, N)
    preds = []
    out = ddim_sample(delta_oracle(x0_star, mode), x_T, ABAR64.float(), ts, 0.0, mode,
                      callback=lambda i, x, x0: preds.append(x0))
    assert len(preds) == 50
    torch.testing.assert_close(preds[-1], x0_star.expand_as(x_T), atol=1e-5, rtol=1e-5)
    # the final state sits at abar_0 (ldm's alphas_prev quirk), on the exact ODE path from x_T
    expected = ode_solution_for_delta(x_T, x0_star, float(ABAR64[ts[-1]]), float(ABAR64[0]))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["eps", "v"])
def test_ddim_matches_diffusers_ddim_scheduler(mode):
    """Parity with a real client: diffusers' DDIMScheduler configured as ldm (steps_offset=1, "leading" spacing,
    set_alpha_to_one=False) must visit the same timesteps and produce the same trajectory for any model."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(num_train_timesteps=N, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          steps_offset=1, set_alpha_to_one=False, clip_sample=False, timestep_spacing="leading",
                          prediction_type={"eps": "epsilon", "v": "v_prediction"}[mode])
    sched.set_timesteps(50)
    ts = ddim_timesteps(50, N)
    np.testing.assert_array_equal(sched.timesteps.numpy()[::-1], ts)

    def model_fn(x, t):  # an arbitrary smooth "network"
        return 0.3 * x + torch.sin(x + t.view(-1, 1, 1, 1) * 0.01)

    x_T = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(4))
    x = x_T
    for t in sched.timesteps:
        x = sched.step(model_fn(x, t.expand(2)), t, x, eta=0.0).prev_sample
    ours = ddim_sample(model_fn, x_T, sched.alphas_cumprod, ts, 0.0, mode)
    torch.testing.assert_close(ours, x, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mode", ["eps", "x0", "v"])
@pytest.mark.parametrize("skip_type", ["time_uniform", "logSNR"])
def test_dpm_solver_with_oracle_is_exact(mode, skip_type):
    g = torch.Generator().manual_seed(1)
    x0_star = torch.randn(1, 2, 3, 3, generator=g, dtype=torch.float64)
    x_T = torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64)
    preds = []
    out = dpm_solver_pp_2m(delta_oracle(x0_star, mode), x_T, ABAR64, 10, mode, skip_type=skip_type,
                           callback=lambda i, x, x0: preds.append(x0))
    assert len(preds) == 10
    torch.testing.assert_close(preds[-1], x0_star.expand_as(x_T), atol=1e-5, rtol=1e-5)
    expected = ode_solution_for_delta(x_T, x0_star, float(ABAR64[-1]), float(ABAR64[0]))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_dpm_time_grid_and_model_time():
    vp = DiscreteVPSchedule(ABAR64)
    ts = vp.time_steps(20, "time_uniform")
    assert ts[0] == 1.0 and ts[-1] == pytest.approx(1.0 / N) and len(ts) == 21
    assert vp.model_time(1.0) == pytest.approx(999.0) and vp.model_time(1.0 / N) == pytest.approx(0.0)
    torch.testing.assert_close(torch.exp(2 * vp.log_alpha(torch.tensor([1.0, 0.5, 1.0 / N], dtype=torch.float64))),
                               ABAR64[[999, 499, 0]])
    lam = vp.lambda_(vp.time_steps(20, "logSNR"))
    torch.testing.assert_close(lam.diff(), lam.diff()[:1].expand(20), rtol=1e-9, atol=1e-9)  # uniform in lambda


# --------------------------------------------------------------- Gaussian data: exact probability-flow ODE
MU, SD0 = 0.7, 0.5


def gaussian_oracle(x, t):
    abar = abar_at(t).to(x.dtype).view(-1, 1)
    m, var = abar.sqrt() * MU, abar * SD0**2 + 1 - abar
    return (1 - abar).sqrt() * (x - m) / var  # E[eps | x_t]


def gaussian_ode_solution(x_T, abar_start, abar_end):
    def stats(abar):
        return math.sqrt(abar) * MU, math.sqrt(abar * SD0**2 + 1 - abar)

    (m0, s0), (m1, s1) = stats(abar_start), stats(abar_end)
    return m1 + s1 * (x_T - m0) / s0


def _dpm_error(steps: int, x_T: torch.Tensor) -> float:
    exact = gaussian_ode_solution(x_T, float(ABAR64[-1]), float(ABAR64[0]))
    dpm = dpm_solver_pp_2m(gaussian_oracle, x_T, ABAR64, steps, "eps", skip_type="logSNR")
    return float((dpm - exact).abs().max())


def test_dpm_solver_beats_ddim_on_gaussian_data():
    """Same problem for both: start from the same x_T at abar_999 (DPM's t = 1), end at abar_0 (DPM's t = 1/N;
    DDIM's last step lands on abar_0 by ldm's alphas_prev rule), 20 model calls each, and DDIM visits DPM's
    logSNR time grid rounded to integer timesteps. Both are compared with the exact ODE solution."""
    x_T = torch.randn(2048, 1, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    grid = DiscreteVPSchedule(ABAR64).time_steps(20, "logSNR")  # 1 .. 1/N
    ts = np.round(grid.numpy() * N - 1).astype(np.int64)[::-1][1:]  # ascending; the final 0 is abar_prev
    assert len(np.unique(ts)) == 20 and ts[0] > 0 and ts[-1] == N - 1
    exact = gaussian_ode_solution(x_T, float(ABAR64[-1]), float(ABAR64[0]))
    ddim_err = float((ddim_sample(gaussian_oracle, x_T, ABAR64, ts, 0.0, "eps") - exact).abs().max())
    dpm_err = _dpm_error(20, x_T)
    assert dpm_err < 0.2 * ddim_err
    assert dpm_err < 0.02  # data sd is 0.5: small in absolute terms
    # second order: doubling the steps divides the error by about 4
    assert _dpm_error(40, x_T) < 0.35 * dpm_err


# --------------------------------------------------------------------- ldm facades with a tiny model
class TinyOracleModel(nn.Module):
    """Duck-typed LatentDiffusion stand-in: exact for data on one point that depends on the conditioning.

    The point is ``c_concat[0] + proj(mean text embedding)``; the output is eps, x0 or v for it.
    """

    def __init__(self, parameterization: str, channels: int = 4, emb_dim: int = 8) -> None:
        super().__init__()
        self.parameterization = parameterization
        self.num_timesteps = N
        self.proj = nn.Linear(emb_dim, channels)
        self.register_buffer("alphas_cumprod", ABAR64.float())

    @property
    def device(self) -> torch.device:
        return self.alphas_cumprod.device

    def target(self, cond: dict) -> torch.Tensor:
        shift = self.proj(cond["c_crossattn"][0].mean(dim=1))  # [B, C]
        return cond["c_concat"][0] + shift[:, :, None, None]

    def apply_model(self, x, t, cond):
        return delta_oracle(self.target(cond), self.parameterization)(x, t).float()


def _conds(b: int, h: int = 4):
    g = torch.Generator().manual_seed(5)
    concat = torch.randn(b, 4, h, h, generator=g)
    cond = {"c_concat": [concat], "c_crossattn": [torch.randn(b, 6, 8, generator=g)]}
    uncond = {"c_concat": [concat], "c_crossattn": [torch.zeros(b, 6, 8)]}
    return cond, uncond


@pytest.mark.parametrize("sampler_cls", [DDIMSampler, DPMSolverSampler])
@pytest.mark.parametrize("mode", ["eps", "v"])
def test_sampler_facade_cfg_dict_conditioning(sampler_cls, mode):
    torch.manual_seed(0)
    model = TinyOracleModel(mode)
    cond, uncond = _conds(3)
    scale = 4.0
    x_T = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(7))
    samples, inter = sampler_cls(model).sample(
        S=20, batch_size=3, shape=(4, 4, 4), conditioning=cond, unconditional_conditioning=uncond,
        unconditional_guidance_scale=scale, x_T=x_T, verbose=False,
    )
    with torch.no_grad():
        x0_u, x0_c = model.target(uncond), model.target(cond)
    x0_guided = x0_u + scale * (x0_c - x0_u)  # guidance on eps or v = guidance on the data point
    torch.testing.assert_close(inter["pred_x0"][-1], x0_guided, atol=1e-4, rtol=1e-4)
    start = ddim_timesteps(20, N)[-1] if sampler_cls is DDIMSampler else N - 1
    expected = ode_solution_for_delta(x_T.double(), x0_guided.double(), float(ABAR64[start]), float(ABAR64[0]))
    torch.testing.assert_close(samples, expected.float(), atol=1e-4, rtol=1e-4)
    assert inter["x_inter"][0] is x_T and inter["x_inter"][-1] is samples


@pytest.mark.parametrize("sampler_cls", [DDIMSampler, DPMSolverSampler])
def test_same_generator_seed_same_samples(sampler_cls):
    model = TinyOracleModel("eps")
    cond, uncond = _conds(2)
    kwargs = {"eta": 0.5} if sampler_cls is DDIMSampler else {}

    def run(seed):
        return sampler_cls(model).sample(S=10, batch_size=2, shape=(4, 4, 4), conditioning=cond,
                                         unconditional_conditioning=uncond, unconditional_guidance_scale=3.0,
                                         generator=torch.Generator().manual_seed(seed), verbose=False, **kwargs)[0]

    a, b, c = run(11), run(11), run(12)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c)


def test_ddim_eta_noise_and_intermediates():
    model = TinyOracleModel("eps")
    cond, _ = _conds(2)
    x_T = torch.randn(2, 4, 4, 4)
    sampler = DDIMSampler(model)
    det, inter = sampler.sample(S=20, batch_size=2, shape=(4, 4, 4), conditioning=cond, x_T=x_T, verbose=False,
                                log_every_t=5)
    # x_T, then steps with index 19 (first), 15, 10, 5, 0 (ldm counts the logging index down)
    assert len(inter["x_inter"]) == 6 and len(inter["pred_x0"]) == 6
    noisy, _ = sampler.sample(S=20, batch_size=2, shape=(4, 4, 4), conditioning=cond, x_T=x_T, verbose=False,
                              eta=1.0, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(det, noisy)
    assert sampler.ddim_sigmas.shape == (20,) and float(sampler.ddim_sigmas.min()) > 0
    dropped, _ = sampler.sample(S=20, batch_size=2, shape=(4, 4, 4), conditioning=cond, x_T=x_T, verbose=False,
                                eta=1.0, noise_dropout=0.5, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(dropped).all() and not torch.allclose(dropped, noisy)


def test_ddim_ucg_schedule():
    model = TinyOracleModel("v")
    cond, uncond = _conds(2)
    x_T = torch.randn(2, 4, 4, 4)
    kw = {"S": 10, "batch_size": 2, "shape": (4, 4, 4), "conditioning": cond, "unconditional_conditioning": uncond,
          "x_T": x_T, "verbose": False}
    sampler = DDIMSampler(model)
    constant, _ = sampler.sample(unconditional_guidance_scale=3.0, **kw)
    scheduled, _ = sampler.sample(ucg_schedule=[3.0] * 10, **kw)
    torch.testing.assert_close(constant, scheduled)
    varied, _ = sampler.sample(ucg_schedule=[1.0] * 9 + [6.0], **kw)
    assert not torch.allclose(constant, varied)
    with pytest.raises(ValueError, match="ucg_schedule"):
        sampler.sample(ucg_schedule=[3.0] * 9, **kw)


def test_ddim_mask_blends_known_latent():
    # ldm's legacy inpainting path: where mask == 1 the input is q_sample(x0) at every step.
    x_known = torch.full((64, 1, 2, 2), 5.0)
    mask = torch.zeros(1, 1, 2, 2)
    mask[..., 0] = 1.0  # left column known
    inputs = []

    def model_fn(x, t):
        inputs.append((x.clone(), int(t[0])))
        return delta_oracle(torch.zeros(1, 1, 2, 2), "eps")(x, t)

    ddim_sample(model_fn, torch.randn(64, 1, 2, 2), ABAR64.float(), ddim_timesteps(10, N), 0.0, "eps",
                torch.Generator().manual_seed(0), mask=mask, x0=x_known)
    x_last, t_last = inputs[-1]
    known, free = x_last[..., 0], x_last[..., 1]
    a, s = math.sqrt(float(ABAR64[t_last])), math.sqrt(1 - float(ABAR64[t_last]))
    assert t_last == 1
    assert abs(float(known.mean()) - 5.0 * a) < 5 * s / math.sqrt(known.numel())
    assert float(known.std()) == pytest.approx(s, rel=0.2)
    assert float(free.abs().max()) < 1.0  # the free part follows the model (data at 0), not the known latent
    with pytest.raises(ValueError, match="together"):
        ddim_sample(model_fn, torch.randn(1, 1, 2, 2), ABAR64, ddim_timesteps(10, N), 0.0, "eps", mask=mask)


def test_unsupported_options_raise():
    model = TinyOracleModel("eps")
    cond, _ = _conds(2)
    base = {"S": 5, "batch_size": 2, "shape": (4, 4, 4), "conditioning": cond, "verbose": False}
    for kwargs in ({"quantize_x0": True}, {"dynamic_threshold": 0.9}, {"score_corrector": object()}):
        with pytest.raises(ValueError, match="not supported"):
            DDIMSampler(model).sample(**base, **kwargs)
    for kwargs in ({"eta": 0.5}, {"mask": torch.ones(1)}, {"temperature": 0.5}, {"ucg_schedule": [1.0] * 5}):
        with pytest.raises(ValueError, match="not supported"):
            DPMSolverSampler(model).sample(**base, **kwargs)
    with pytest.raises(ValueError, match="batch"):
        DDIMSampler(model).sample(**{**base, "batch_size": 3})
    with pytest.raises(ValueError, match="x_T"):
        DPMSolverSampler(model).sample(**base, x_T=torch.zeros(2, 4, 8, 8))
    with pytest.raises(ValueError, match="schedule"):
        DDIMSampler(model, schedule="cosine")


# ------------------------------------------------------------------------------- registry and sample_latents
@pytest.mark.parametrize("name", list(sampling.SAMPLERS))
def test_every_registered_sampler_honours_the_contract(name):
    """One signature for all: ``steps`` model evaluations reported through ``callback``, the oracle's data point
    as the last x0 prediction, and the deterministic path (eta = 0) ending on the exact ODE solution at abar_0."""
    g = torch.Generator().manual_seed(8)
    x0_star = torch.randn(1, 2, 3, 3, generator=g, dtype=torch.float64)
    x_T = torch.randn(3, 2, 3, 3, generator=g, dtype=torch.float64)
    calls, preds = [], []

    def model_fn(x, t):
        calls.append(t)
        return delta_oracle(x0_star, "v")(x, t)

    out = sampling.get_sampler(name)(model_fn, x_T, ABAR64, 10, "v", eta=0.0, generator=None,
                                     callback=lambda i, x, x0: preds.append(x0), verbose=False)
    assert len(calls) == len(preds) == 10
    torch.testing.assert_close(preds[-1], x0_star.expand_as(x_T), atol=1e-5, rtol=1e-5)
    eps = (x_T - x0_star * ABAR64[int(calls[0][0])].sqrt()) / (1 - ABAR64[int(calls[0][0])]).sqrt()
    torch.testing.assert_close(out, ABAR64[0].sqrt() * x0_star + (1 - ABAR64[0]).sqrt() * eps, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name, adapter, kwargs", [
    ("ddim", DDIMSampler, {"eta": 0.5}),
    ("dpm", DPMSolverSampler, {}),
])
def test_sample_latents_equals_the_ldm_adapters(name, adapter, kwargs):
    model = TinyOracleModel("v")
    cond, uncond = _conds(2)
    x_T = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(9))
    ours = sampling.sample_latents(model, cond, x_T, sampler=name, steps=10, scale=3.0, uncond=uncond,
                                   generator=torch.Generator().manual_seed(1), **kwargs)
    theirs, _ = adapter(model).sample(S=10, batch_size=2, shape=(4, 4, 4), conditioning=cond, x_T=x_T,
                                      unconditional_conditioning=uncond, unconditional_guidance_scale=3.0,
                                      generator=torch.Generator().manual_seed(1), verbose=False, **kwargs)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_eta_rule_and_names_are_checked_in_one_place():
    from ldm.inference import SAMPLERS, SamplingOptions

    assert SAMPLERS == tuple(sampling.SAMPLERS) == ("ddim", "dpm")
    model = TinyOracleModel("eps")
    cond, _ = _conds(2)
    x_T = torch.zeros(2, 4, 4, 4)
    for call in (lambda: sampling.sample_latents(model, cond, x_T, sampler="dpm", steps=2, eta=0.3),
                 lambda: SamplingOptions(sampler="dpm", eta=0.3),
                 lambda: DPMSolverSampler(model).sample(S=2, batch_size=2, shape=(4, 4, 4), conditioning=cond,
                                                        eta=0.3, verbose=False)):
        with pytest.raises(ValueError, match="eta=0.3 is not supported: the solver is deterministic"):
            call()
    with pytest.raises(ValueError, match=r"outside \[0, 1\]"):
        SamplingOptions(sampler="ddim", eta=1.5)
    with pytest.raises(ValueError, match="sampler 'plms' is unknown; use one of ddim, dpm"):
        sampling.sample_latents(model, cond, x_T, sampler="plms")
    with pytest.raises(ValueError, match="batch"):
        sampling.sample_latents(model, cond, torch.zeros(3, 4, 4, 4))


def test_step_counts_are_checked_from_the_schedule_length_alone(caplog):
    """check_steps (what scripts call before loading a model) agrees with what the samplers really run."""
    for steps in range(1, 1001):  # DDIM: every count is either the grid's length or the grid's own error
        try:
            expected = len(ddim_timesteps(steps, 1000))
        except ValueError:
            expected = None
        try:
            got = sampling.get_sampler("ddim").steps_run(steps, 1000)
        except ValueError:
            got = None
        assert got == expected, steps
    for steps, ok in ((3, "2 or 4"), (9, "8 or 10"), (27, "26 or 28"), (37, "35 or 38"), (111, "100 or 112"),
                      (251, "250 or 334"), (333, "250 or 334")):
        with pytest.raises(ValueError, match=f"--steps {steps} does not work with the DDIM sampler: .*gives timestep "
                                             f"1000.*nearest counts that work: {ok}$"):
            sampling.check_steps("ddim", steps, 1000)
    with caplog.at_level("WARNING"):
        assert sampling.check_steps("ddim", 45, 1000) == 46  # ldm's grid: stride 22, ceil(1000 / 22) steps
        assert sampling.check_steps("ddim", 50, 1000) == 50 and sampling.check_steps("dpm", 45, 1000) == 45
    assert [r.getMessage() for r in caplog.records] == [
        "DDIM: --steps 45 runs 46 steps (ldm's uniform DDIM grid: stride 1000 // 45 = 22, so ceil(1000 / 22) steps); "
        "outputs record 46"]
    with pytest.raises(ValueError, match="between 1 and 1000"):
        sampling.check_steps("dpm", 0, 1000)


def test_a_new_sampler_is_one_registration(monkeypatch):
    """Registering a function is all it takes for sample_latents (hence inference, evaluation and image logs)."""
    monkeypatch.setattr(sampling, "SAMPLERS", dict(sampling.SAMPLERS))

    @sampling.register_sampler("x0-jump", label="one-step x0", stochastic=False)
    def x0_jump(model_fn, x_T, alphas_cumprod, steps, parameterization, *, eta=0.0, generator=None,
                callback=None, verbose=False):
        """Jump to the model's x0 prediction at the last timestep (a toy)."""
        t = torch.full((x_T.shape[0],), len(alphas_cumprod) - 1, dtype=torch.long)
        a = float(alphas_cumprod[-1]) ** 0.5
        return P.split_prediction(parameterization, model_fn(x_T, t), x_T, a, (1 - a * a) ** 0.5)[1]

    model = TinyOracleModel("v")
    cond, _ = _conds(2)
    out = sampling.sample_latents(model, cond, torch.randn(2, 4, 4, 4), sampler="x0-jump", steps=1)
    torch.testing.assert_close(out, model.target(cond), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="already registered"):
        sampling.register_sampler("ddim", label="DDIM", stochastic=True)(x0_jump)


def test_ldm_adapters_share_one_signature():
    """DPMSolverSampler.sample repeats DDIMSampler.sample's ldm signature (plus its own options): guard the copy."""
    import inspect

    ddim = list(inspect.signature(DDIMSampler.sample).parameters.values())
    dpm = list(inspect.signature(DPMSolverSampler.sample).parameters.values())
    assert [(p.name, p.default) for p in dpm[: len(ddim)]] == [(p.name, p.default) for p in ddim]
