"""The sampling front door: samplers by name, one signature for all of them, and :func:`sample_latents`.

Every sampler is a function with the same signature (the convention of k-diffusion's ``sampling.py``)::

    sampler(model_fn, x_T, alphas_cumprod, steps, parameterization, *,
            eta=0.0, generator=None, callback=None, verbose=False) -> x_0

``model_fn(x, t)`` is the (already guided) network, ``alphas_cumprod`` the trained abar table ``[T]`` and
``parameterization`` what the network predicts ("eps", "x0" or "v"); ``callback(i, x, pred_x0)`` runs after
each step. The functions below are thin entries over the pure algorithms (:func:`~ldm.models.diffusion.ddim.
ddim_sample`, :func:`~ldm.models.diffusion.dpm_solver.dpm_solver_pp_2m`); each docstring names its algorithm.

:data:`SAMPLERS` maps a name to a :class:`Sampler`, which applies the shared eta rule
(:func:`~ldm.models.diffusion.sampling_utils.check_eta`) before running. Training image logs
(:mod:`~ldm.models.diffusion.visualize`), ``ldm.inference.inpaint`` (``scripts/inpaint.py``) and the evaluation
(``scripts/evaluate.py``) all sample through :func:`sample_latents`. ldm's ``DDIMSampler`` / ``DPMSolverSampler``
classes stay as adapters for code written against ldm.

Adding a sampler: write one function with the signature above in this module (or import its algorithm here),
decorate it with :func:`register_sampler`, and test it; every caller then accepts its name.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from ldm.models.diffusion.ddim import ddim_sample
from ldm.models.diffusion.dpm_solver import dpm_solver_pp_2m
from ldm.models.diffusion.guidance import ModelFn, guided_model_fn
from ldm.models.diffusion.sampling_utils import StepCallback, check_conditioning_batch, check_eta
from ldm.models.diffusion.schedule import ddim_timesteps

log = logging.getLogger(__name__)


class SamplerFn(Protocol):
    """The one signature every sampler function has (see the module docstring)."""

    def __call__(self, model_fn: ModelFn, x_T: torch.Tensor, alphas_cumprod: torch.Tensor, steps: int,
                 parameterization: str, *, eta: float = 0.0, generator: torch.Generator | None = None,
                 callback: StepCallback | None = None, verbose: bool = False) -> torch.Tensor: ...


@dataclass(frozen=True)
class Sampler:
    """A registered sampler: its function, its display label and whether it takes eta > 0.

    Args:
        name: registry key ("ddim", "dpm").
        fn: the sampler function (signature in the module docstring).
        label: human-readable name for logs and tables.
        stochastic: True if the sampler draws fresh noise per step with ``eta > 0``; False for ODE solvers.
    """

    name: str
    fn: SamplerFn
    label: str
    stochastic: bool
    step_count: StepCount | None = None

    def check(self, eta: float) -> None:
        """Raise unless ``eta`` is valid for this sampler (the eta rule of ``sampling_utils.check_eta``)."""
        check_eta(self.label, eta, self.stochastic)

    def steps_run(self, steps: int, num_train_steps: int) -> int:
        """The number of steps (model evaluations per sample, before guidance doubling) that ``steps`` requested
        steps really take on a ``num_train_steps`` schedule; ``ValueError`` if the sampler cannot take them."""
        if not 1 <= steps <= num_train_steps:
            raise ValueError(f"steps must be between 1 and {num_train_steps} (the training schedule), got {steps}")
        return steps if self.step_count is None else self.step_count(steps, num_train_steps)

    def __call__(self, model_fn: ModelFn, x_T: torch.Tensor, alphas_cumprod: torch.Tensor, steps: int,
                 parameterization: str, *, eta: float = 0.0, generator: torch.Generator | None = None,
                 callback: StepCallback | None = None, verbose: bool = False) -> torch.Tensor:
        self.check(eta)
        return self.fn(model_fn, x_T, alphas_cumprod, steps, parameterization, eta=eta, generator=generator,
                       callback=callback, verbose=verbose)


#: ``(requested steps, schedule length) -> steps really run``; raises ValueError for counts the sampler refuses
StepCount = Callable[[int, int], int]

#: name -> sampler; filled by :func:`register_sampler` below.
SAMPLERS: dict[str, Sampler] = {}


def register_sampler(name: str, *, label: str, stochastic: bool,
                     step_count: StepCount | None = None) -> Callable[[SamplerFn], SamplerFn]:
    """Decorator adding a sampler function to :data:`SAMPLERS` under ``name``.

    ``step_count``: for samplers whose step grid does not take every count as asked (see :data:`StepCount`);
    None means every count from 1 to the schedule length runs as asked.
    """

    def add(fn: SamplerFn) -> SamplerFn:
        if name in SAMPLERS:
            raise ValueError(f"a sampler named {name!r} is already registered")
        SAMPLERS[name] = Sampler(name, fn, label, stochastic, step_count)
        return fn

    return add


def get_sampler(name: str) -> Sampler:
    """The registered sampler ``name``; an unknown name raises ``ValueError`` listing the known ones."""
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ValueError(f"sampler {name!r} is unknown; use one of {', '.join(SAMPLERS)}") from None


def check_steps(sampler: str, steps: int, num_train_steps: int) -> int:
    """Validate a step count before any model is loaded and return the steps ``sampler`` really runs.

    Every script that samples (inpainting, evaluation) calls this once with the schedule length of its config
    (``ldm.inference.schedule_length``). A count the sampler's grid cannot take (DDIM: 3, 9, 27, ... of 1000)
    raises ``ValueError`` naming the nearest counts that work; a count that runs differently (DDIM: 45 -> 46) is
    logged once as a warning, and callers record the returned count.
    """
    chosen = get_sampler(sampler)
    try:
        run = chosen.steps_run(steps, num_train_steps)
    except ValueError as e:
        below = next((s for s in range(min(steps, num_train_steps + 1) - 1, 0, -1)
                      if _runs(chosen, s, num_train_steps)), None)
        above = next((s for s in range(max(steps, 0) + 1, num_train_steps + 1) if _runs(chosen, s, num_train_steps)),
                     None)
        ok = [s for s in (below, above) if s is not None]
        hint = f"; the nearest counts that work: {' or '.join(map(str, ok))}" if ok else ""
        raise ValueError(f"--steps {steps} does not work with the {chosen.label} sampler: {e}{hint}") from None
    if run != steps:
        log.warning("%s: --steps %d runs %d steps (%s); outputs record %d", chosen.label, steps, run,
                    _GRID_NOTES[chosen.name](steps, num_train_steps) if chosen.name in _GRID_NOTES else "its grid", run)
    return run


def _runs(sampler: Sampler, steps: int, num_train_steps: int) -> bool:
    try:
        sampler.steps_run(steps, num_train_steps)
    except ValueError:
        return False
    return True


def ddim_step_count(steps: int, num_train_steps: int) -> int:
    """DDIM's steps on ldm's uniform grid: stride ``T // steps``, so ``ceil(T / stride)`` steps (45 of 1000 -> 46);
    counts whose last timestep passes the schedule after ldm's +1 offset raise (``schedule.ddim_timesteps``)."""
    return len(ddim_timesteps(steps, num_train_steps))


# ------------------------------------------------------------------------------------------------- samplers
#: why a sampler runs another number of steps than asked: name -> (steps, schedule length) -> explanation
_GRID_NOTES: dict[str, Callable[[int, int], str]] = {
    "ddim": lambda s, t: f"ldm's uniform DDIM grid: stride {t} // {s} = {t // s}, so ceil({t} / {t // s}) steps",
}


@register_sampler("ddim", label="DDIM", stochastic=True, step_count=ddim_step_count)
def sample_ddim(model_fn: ModelFn, x_T: torch.Tensor, alphas_cumprod: torch.Tensor, steps: int,
                parameterization: str, *, eta: float = 0.0, generator: torch.Generator | None = None,
                callback: StepCallback | None = None, verbose: bool = False) -> torch.Tensor:
    """DDIM (Song et al. 2021, arXiv:2010.02502, eq. 12) on ldm's uniform grid (1, 21, ..., 981 for 50 of 1000
    steps), ending on abar_0. ``eta = 0`` is the deterministic ODE sampler, ``eta = 1`` DDPM-like ancestral noise
    drawn from ``generator``."""
    timesteps = ddim_timesteps(steps, int(alphas_cumprod.shape[0]))
    return ddim_sample(model_fn, x_T, alphas_cumprod, timesteps, eta, parameterization, generator,
                       callback=callback, verbose=verbose)


@register_sampler("dpm", label="DPM-Solver++(2M)", stochastic=False)
def sample_dpmpp_2m(model_fn: ModelFn, x_T: torch.Tensor, alphas_cumprod: torch.Tensor, steps: int,
                    parameterization: str, *, eta: float = 0.0, generator: torch.Generator | None = None,  # noqa: ARG001
                    callback: StepCallback | None = None, verbose: bool = False) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, arXiv:2211.01095, Algorithm 2): second-order multistep solver of the
    probability-flow ODE with SD2's settings (time-uniform steps from abar_{T-1} to abar_0, first-order last step
    below 15 steps). Deterministic: ``eta`` must be 0 and ``generator`` is not used."""
    return dpm_solver_pp_2m(model_fn, x_T, alphas_cumprod, steps, parameterization, callback=callback,
                            verbose=verbose)


# ------------------------------------------------------------------------------------------------ front door
@torch.no_grad()
def sample_latents(
    model: Any,
    cond: Any,
    x_T: torch.Tensor,
    *,
    sampler: str = "ddim",
    steps: int = 50,
    scale: float = 1.0,
    uncond: Any = None,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    verbose: bool = False,
) -> torch.Tensor:
    """Denoise ``x_T`` into latents with a registered sampler and classifier-free guidance.

    Args:
        model: the diffusion model, duck-typed: ``apply_model(x, t, cond)``, ``alphas_cumprod`` ``[T]`` and
            ``parameterization`` (``LatentDiffusion`` and its subclasses).
        cond: conditioning as ``apply_model`` takes it (the inpainting model's ``c_concat`` / ``c_crossattn``
            dict, or a text tensor).
        x_T: starting noise ``[B, C, h, w]`` (the caller draws it, so it decides seeding and device).
        sampler: a name in :data:`SAMPLERS`.
        steps: sampler steps (= model evaluations, doubled in batch size under guidance).
        scale: guidance scale; with 1 or without ``uncond`` the model runs once per step on ``cond`` only.
        uncond: the unconditional conditioning, same structure as ``cond`` (``model.null_conditioning(cond)``).
        eta: per-step noise of stochastic samplers (0 = deterministic); ODE solvers require 0.
        generator: source of the sampler's own noise (``eta > 0``).
        verbose: show a progress bar.
    """
    chosen = get_sampler(sampler)
    check_conditioning_batch(cond, x_T.shape[0])
    model_fn = guided_model_fn(model.apply_model, cond, uncond, scale)
    return chosen(model_fn, x_T, model.alphas_cumprod, steps, model.parameterization, eta=eta,
                  generator=generator, verbose=verbose)


__all__ = ["SAMPLERS", "Sampler", "StepCount", "check_steps", "ddim_step_count", "get_sampler", "register_sampler",
           "sample_ddim", "sample_dpmpp_2m", "sample_latents"]
