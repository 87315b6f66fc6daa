"""The diffusion training loss of ldm's ``LatentDiffusion.p_losses``, built once as an object, with ldm's log names.

    loss_simple_i = mean_{C,H,W} |pred_i - target_i|^p            (p = 2 for "l2", 1 for "l1")
    loss          = l_simple_weight * mean_i w[t_i] (loss_simple_i / exp(logvar[t_i]) + logvar[t_i])
                    + original_elbo_weight * loss_vlb
    loss_vlb      = mean_i lvlb_weights[t_i] loss_simple_i

With SD's settings (``logvar`` all zero, ``l_simple_weight`` 1, ``original_elbo_weight`` 0, ``w`` = 1) the loss is
exactly the batch mean of ``loss_simple``. ``w`` is 1 unless Min-SNR-gamma weighting is switched on (off by
default for parity with SD). The per-timestep tables ``w`` and ``lvlb_weights`` depend on the parameterization
and come from :mod:`ldm.models.diffusion.parameterization`; :class:`DiffusionLoss` computes them once per
schedule (as sgm's ``StandardDiffusionLoss`` holds its weighting), so a training step passes only
``(pred, target, t)``. Logged scalars are ``{prefix}/loss_simple`` (unweighted), ``{prefix}/loss`` and, only
when ``original_elbo_weight`` is not 0, ``{prefix}/loss_vlb``, detached.
Left out: learned ``logvar`` (ldm's ``learn_logvar``; its ``loss_gamma``/``logvar`` logs) and other weightings.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from ldm.models.diffusion import parameterization as P
from ldm.models.diffusion.schedule import NoiseSchedule

LossType = Literal["l1", "l2"]


def per_sample_loss(pred: torch.Tensor, target: torch.Tensor, loss_type: LossType = "l2") -> torch.Tensor:
    """Squared ("l2") or absolute ("l1") error averaged over all non-batch dims: ``[B, ...] -> [B]``."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} shapes differ")
    if loss_type == "l2":
        err = (pred - target) ** 2
    elif loss_type == "l1":
        err = (pred - target).abs()
    else:
        raise ValueError(f"loss_type={loss_type!r} is unknown; use 'l1' or 'l2'")
    return err.flatten(1).mean(dim=1)  # [B]


class DiffusionLoss(nn.Module):
    """ldm's training loss and its log dict; the per-timestep tables are non-persistent buffers (they follow
    the model's device and are not saved: they are recomputed from the schedule).

    Args:
        parameterization: what the model predicts, "eps", "x0" or "v" (decides both weight tables).
        loss_type: "l2" (SD) or "l1".
        l_simple_weight: weight of the simple loss (ldm default 1).
        original_elbo_weight: weight of ``loss_vlb`` (ldm default 0).
        logvar_init: fixed per-timestep log-variance (ldm's ``logvar``; 0 = plain loss).
        min_snr_gamma: gamma of Min-SNR weighting; None (default) disables it.
    """

    def __init__(self, parameterization: str = "eps", loss_type: LossType = "l2", l_simple_weight: float = 1.0,
                 original_elbo_weight: float = 0.0, logvar_init: float = 0.0,
                 min_snr_gamma: float | None = None) -> None:
        super().__init__()
        if loss_type not in ("l1", "l2"):
            raise ValueError(f"loss_type={loss_type!r}: expected 'l1' or 'l2'")
        if min_snr_gamma is not None and min_snr_gamma <= 0:
            raise ValueError(f"min_snr_gamma must be > 0, got {min_snr_gamma}")
        self.parameterization = P.check_parameterization(parameterization)
        self.loss_type, self.l_simple_weight = loss_type, float(l_simple_weight)
        self.original_elbo_weight, self.logvar_init = float(original_elbo_weight), float(logvar_init)
        self.min_snr_gamma = min_snr_gamma
        for name in ("logvar", "lvlb_weights", "timestep_weights"):  # [T] each, set by set_schedule
            self.register_buffer(name, None, persistent=False)

    def set_schedule(self, schedule: NoiseSchedule) -> None:
        """(Re)build the per-timestep tables ``[T]`` for ``schedule``; called whenever the model's schedule is set."""
        T = schedule.num_timesteps
        self.register_buffer("logvar", torch.full((T,), self.logvar_init), persistent=False)
        self.register_buffer("lvlb_weights", schedule.lvlb_weights(self.parameterization), persistent=False)
        weights = None
        if self.min_snr_gamma is not None:
            table = P.min_snr_weights(self.parameterization, schedule.alphas_cumprod, self.min_snr_gamma)
            weights = torch.tensor(table, dtype=torch.float32)
        self.register_buffer("timestep_weights", weights, persistent=False)

    def forward(self, pred: torch.Tensor, target: torch.Tensor, t: torch.Tensor,
                prefix: str = "train") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss of ``pred`` against ``target`` (``parameterization.training_target``) at integer timesteps ``t``
        ``[B]``, and its log dict under ``prefix`` ("train" or "val")."""
        if self.lvlb_weights is None:
            raise RuntimeError("DiffusionLoss.set_schedule must be called before the loss is used")
        loss_simple = per_sample_loss(pred, target, self.loss_type)  # [B]
        logvar_t = self.logvar[t]  # [B]
        per_sample = loss_simple / torch.exp(logvar_t) + logvar_t
        if self.timestep_weights is not None:
            per_sample = per_sample * self.timestep_weights[t].to(per_sample.dtype)
        loss_vlb = (self.lvlb_weights[t] * loss_simple).mean()
        loss = self.l_simple_weight * per_sample.mean() + self.original_elbo_weight * loss_vlb
        logs = {f"{prefix}/loss_simple": loss_simple.mean().detach()}
        if self.original_elbo_weight:  # with weight 0 it is not in the loss (and equals loss_simple for v)
            logs[f"{prefix}/loss_vlb"] = loss_vlb.detach()
        logs[f"{prefix}/loss"] = loss.detach()
        return loss, logs
