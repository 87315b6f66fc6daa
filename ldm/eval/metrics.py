"""Inpainting pixel metrics inside the hole and in the known region (no weight files needed).

The per-image SSIM map and PSNR come from torchmetrics; what this module adds is the region split. Inputs are
``H x W x 3`` uint8 images (what is written to disk, so a PNG read back gives the same numbers) and an ``H x W``
mask with 1 = hole, binarised at 0.5. Values are computed in float64 on [0, 1] intensities:

* ``ssim_*``: torchmetrics' SSIM map (Wang et al. 2004: 11 x 11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03,
  reflection padding, so the map covers every pixel), averaged over channels, then over the region's pixels;
  ``ssim`` is the whole-image value (torchmetrics' own number).
* ``psnr_*``: torchmetrics' PSNR over the region's pixels and channels, capped at :data:`PSNR_CAP` dB where the
  region is reproduced exactly; ``psnr`` is the whole image.
* ``l1_*``: mean absolute difference; ``l1_known`` is the mean change of the known region (0 with paste-back).
* ``known_changed``: fraction of known pixels whose largest channel change exceeds 2/255 (beyond rounding).
* ``hole_fraction``: mask coverage.

A region without pixels gives NaN. Left out: masked FID variants (U-IDS and the like).
"""

from __future__ import annotations

import numpy as np
import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from ldm.data.masks import is_hole

PSNR_CAP = 100.0
CHANGE_THRESHOLD = 2.0 / 255.0

__all__ = ["PSNR_CAP", "region_metrics"]


def _unit(x: np.ndarray) -> torch.Tensor:
    """``H x W x 3`` uint8 -> ``3 x H x W`` float64 in [0, 1]."""
    if x.dtype != np.uint8 or x.ndim != 3 or x.shape[2] != 3:
        raise ValueError(f"expected an H x W x 3 uint8 image, got {x.dtype} {x.shape}")
    # contiguous: a cropped view and the same pixels read from a PNG must reduce in the same order (same bits)
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64) / 255.0).permute(2, 0, 1)


def _psnr(p: torch.Tensor, t: torch.Tensor) -> float:
    if p.numel() == 0:
        return float("nan")
    return min(float(peak_signal_noise_ratio(p, t, data_range=1.0)), PSNR_CAP)  # exact match: inf -> cap


def _mean(values: torch.Tensor) -> float:
    return float(values.mean()) if values.numel() else float("nan")


def region_metrics(pred: np.ndarray, target: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """All pixel metrics of one prediction against its ground truth, inside the hole and in the known region."""
    p, t = _unit(pred), _unit(target)
    if p.shape != t.shape or tuple(mask.shape) != tuple(p.shape[1:]):
        raise ValueError(f"shape mismatch: pred {pred.shape}, target {target.shape}, mask {mask.shape}")
    ssim, ssim_map = structural_similarity_index_measure(
        p[None], t[None], gaussian_kernel=True, sigma=1.5, kernel_size=11, data_range=1.0, k1=0.01, k2=0.03,
        return_full_image=True)
    ssim_map = ssim_map[0].mean(0)  # H x W, channel mean
    hole = torch.from_numpy(is_hole(np.asarray(mask)))
    diff = (p - t).abs()  # 3 x H x W
    out = {"psnr": _psnr(p, t), "ssim": float(ssim)}
    for name, region in (("hole", hole), ("known", ~hole)):
        out[f"psnr_{name}"] = _psnr(p[:, region], t[:, region])
        out[f"ssim_{name}"] = _mean(ssim_map[region])
        out[f"l1_{name}"] = _mean(diff[:, region])
    out["known_changed"] = _mean((diff.amax(0) > CHANGE_THRESHOLD)[~hole].double())
    out["hole_fraction"] = float(hole.double().mean())
    return out
