"""The diffusion training loss of ldm's ``LatentDiffusion.p_losses``, with ldm's log names.

    loss_simple_i = mean_{C,H,W} |pred_i - target_i|^p            (p = 2 for "l2", 1 for "l1")
    loss          = l_simple_weight * mean_i w_i (loss_simple_i / exp(logvar[t_i]) + logvar[t_i])
                    + original_elbo_weight * loss_vlb
    loss_vlb      = mean_i lvlb_weights[t_i] loss_simple_i

With SD's settings (``logvar`` all zero, ``l_simple_weight`` 1, ``original_elbo_weight`` 0, ``w_i`` = 1) the loss
is exactly the batch mean of ``loss_simple``. ``w_i`` is 1 unless Min-SNR-gamma weighting is switched on
(:func:`min_snr_weights`; off by default for parity with SD). Logged scalars are ``{prefix}/loss_simple``
(unweighted), ``{prefix}/loss`` and, only when ``original_elbo_weight`` is not 0, ``{prefix}/loss_vlb``, detached.
Left out: learned ``logvar`` (ldm's ``learn_logvar``; its ``loss_gamma``/``logvar`` logs) and other weightings.
"""

from __future__ import annotations

from typing import Literal

import torch

from ldm.models.diffusion.parameterization import check_parameterization

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


def min_snr_weights(alphas_cumprod_t: torch.Tensor, gamma: float, parameterization: str) -> torch.Tensor:
    """Min-SNR-gamma weights (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting
    Strategy", arXiv:2303.09556), per sample ``[B]`` from abar at each sample's timestep.

    The paper weights the x0 error by min(SNR, gamma), SNR = abar / (1 - abar). Expressed on the error the model
    is actually trained on: eps error is the x0 error times SNR, v error the x0 error times (SNR + 1), so the
    weights become min(SNR, gamma) / SNR (eps), min(SNR, gamma) / (SNR + 1) (v), min(SNR, gamma) (x0).
    """
    if gamma <= 0:
        raise ValueError(f"min_snr_gamma must be > 0, got {gamma}")
    mode = check_parameterization(parameterization)
    snr = alphas_cumprod_t / (1 - alphas_cumprod_t)
    clipped = snr.clamp(max=gamma)
    if mode == "eps":
        return clipped / snr
    if mode == "v":
        return clipped / (snr + 1)
    return clipped


def diffusion_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    t: torch.Tensor,
    *,
    lvlb_weights: torch.Tensor,
    loss_type: LossType = "l2",
    logvar: torch.Tensor | None = None,
    l_simple_weight: float = 1.0,
    original_elbo_weight: float = 0.0,
    min_snr_gamma: float | None = None,
    alphas_cumprod: torch.Tensor | None = None,
    parameterization: str = "eps",
    prefix: str = "train",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """ldm's training loss and its log dict.

    Args:
        pred: model output ``[B, C, H, W]``.
        target: ``parameterization.training_target`` for the same samples.
        t: integer timesteps ``[B]``.
        lvlb_weights: per-timestep ELBO weights ``[T]`` (``NoiseSchedule.lvlb_weights``).
        loss_type: "l2" (SD) or "l1".
        logvar: fixed per-timestep log-variance ``[T]`` (ldm's ``logvar``; None means all zero).
        l_simple_weight: weight of the simple loss (ldm default 1).
        original_elbo_weight: weight of ``loss_vlb`` (ldm default 0).
        min_snr_gamma: gamma of Min-SNR weighting; None (default) disables it.
        alphas_cumprod: abar table ``[T]``; required with ``min_snr_gamma``.
        parameterization: "eps", "x0" or "v" (decides the Min-SNR weight form).
        prefix: log-name prefix, "train" or "val".
    """
    loss_simple = per_sample_loss(pred, target, loss_type)  # [B]
    per_sample = loss_simple
    if logvar is not None:
        logvar_t = logvar.to(t.device)[t]  # [B]
        per_sample = per_sample / torch.exp(logvar_t) + logvar_t
    if min_snr_gamma is not None:
        if alphas_cumprod is None:
            raise ValueError("min_snr_gamma needs alphas_cumprod (the abar table of the schedule)")
        abar_t = alphas_cumprod.to(t.device)[t].to(per_sample.dtype)  # [B]
        per_sample = per_sample * min_snr_weights(abar_t, min_snr_gamma, parameterization)
    loss_vlb = (lvlb_weights.to(t.device)[t] * loss_simple).mean()
    loss = l_simple_weight * per_sample.mean() + original_elbo_weight * loss_vlb
    logs = {f"{prefix}/loss_simple": loss_simple.mean().detach()}
    if original_elbo_weight:  # with weight 0 it is not part of the loss (and equals loss_simple for v): not logged
        logs[f"{prefix}/loss_vlb"] = loss_vlb.detach()
    logs[f"{prefix}/loss"] = loss.detach()
    return loss, logs
