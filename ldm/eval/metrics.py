"""Inpainting metrics that need no downloaded weights: PSNR, SSIM and L1 inside the hole and outside it.

All functions take ``H x W x 3`` uint8 images (what is written to disk, so a PNG re-read gives the same numbers) and
an ``H x W`` mask with 1 = hole. Values are computed on [0, 1] intensities:

* ``psnr_*`` = 10 log10(1 / MSE) over the region's pixels and channels, capped at :data:`PSNR_CAP` dB when the
  region is reproduced exactly;
* ``ssim_*`` = mean of the SSIM map (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03,
  population statistics, as ``skimage.metrics.structural_similarity(gaussian_weights=True)``) over the region's
  pixels; the map covers pixels at least 5 px from the border;
* ``l1_*`` = mean absolute difference; ``l1_known`` is the mean change of the known region (0 with paste-back);
* ``known_changed`` = fraction of known pixels whose largest channel change exceeds 2/255 (beyond rounding);
* ``hole_fraction`` = mask coverage.

:func:`frechet_distance` is the FID formula on Gaussian statistics (features come from
:mod:`ldm.eval.feature_metrics`). A region without pixels gives NaN. Left out: masked FID variants (U-IDS etc.).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ldm.data.masks import is_hole

PSNR_CAP = 100.0
SSIM_SIGMA, SSIM_RADIUS, SSIM_K1, SSIM_K2 = 1.5, 5, 0.01, 0.03
CHANGE_THRESHOLD = 2.0 / 255.0

__all__ = ["frechet_distance", "gaussian_stats", "psnr", "region_metrics", "ssim_map"]


def _unit(x: np.ndarray) -> np.ndarray:
    if x.dtype != np.uint8 or x.ndim != 3 or x.shape[2] != 3:
        raise ValueError(f"expected an H x W x 3 uint8 image, got {x.dtype} {x.shape}")
    return x.astype(np.float64) / 255.0


def psnr(mse: float) -> float:
    """PSNR in dB of a mean squared error on [0, 1] intensities (capped at :data:`PSNR_CAP`; NaN stays NaN)."""
    if math.isnan(mse):
        return float("nan")
    return PSNR_CAP if mse <= 10 ** (-PSNR_CAP / 10) else float(10.0 * math.log10(1.0 / mse))


def ssim_map(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """SSIM map of two ``H x W x 3`` float images in [0, 1], averaged over channels: ``(H-10) x (W-10)``."""
    if min(a.shape[:2]) <= 2 * SSIM_RADIUS:
        raise ValueError(f"SSIM needs images larger than {2 * SSIM_RADIUS + 1} px, got {a.shape[:2]}")
    x = torch.from_numpy(np.stack([a, b])).permute(0, 3, 1, 2).double()  # 2 x 3 x H x W
    r = torch.arange(-SSIM_RADIUS, SSIM_RADIUS + 1, dtype=torch.float64)
    g = torch.exp(-(r**2) / (2 * SSIM_SIGMA**2))
    g = g / g.sum()
    window = (g[:, None] * g[None, :]).expand(3, 1, -1, -1)  # 3 x 1 x 11 x 11, one per channel

    def blur(t: torch.Tensor) -> torch.Tensor:  # "valid" Gaussian mean: no border handling to argue about
        return F.conv2d(t, window, groups=3)

    mu = blur(x)
    mu_a, mu_b = mu[0], mu[1]
    var_a = blur(x[:1] ** 2)[0] - mu_a**2
    var_b = blur(x[1:] ** 2)[0] - mu_b**2
    cov = blur(x[:1] * x[1:])[0] - mu_a * mu_b
    c1, c2 = SSIM_K1**2, SSIM_K2**2  # data range 1
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.mean(0).numpy()  # channel mean, (H-10) x (W-10)


def _region_mean(values: np.ndarray, region: np.ndarray) -> float:
    return float(values[region].mean()) if region.any() else float("nan")


def region_metrics(pred: np.ndarray, target: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """All pixel metrics of one prediction against its ground truth, inside the hole and in the known region."""
    p, t = _unit(pred), _unit(target)
    if p.shape != t.shape or mask.shape != p.shape[:2]:
        raise ValueError(f"shape mismatch: pred {p.shape}, target {t.shape}, mask {mask.shape}")
    hole = is_hole(np.asarray(mask))
    known = ~hole
    sq, ab = ((p - t) ** 2).mean(-1), np.abs(p - t).mean(-1)  # per pixel, channel mean
    smap = ssim_map(p, t)
    inner = (slice(SSIM_RADIUS, -SSIM_RADIUS), slice(SSIM_RADIUS, -SSIM_RADIUS))  # pixels the SSIM map covers
    changed = np.abs(p - t).max(-1) > CHANGE_THRESHOLD
    return {
        "psnr": psnr(float(sq.mean())),
        "psnr_hole": psnr(_region_mean(sq, hole)),
        "psnr_known": psnr(_region_mean(sq, known)),
        "ssim": float(smap.mean()),
        "ssim_hole": _region_mean(smap, hole[inner]),
        "ssim_known": _region_mean(smap, known[inner]),
        "l1_hole": _region_mean(ab, hole),
        "l1_known": _region_mean(ab, known),
        "known_changed": _region_mean(changed.astype(np.float64), known),
        "hole_fraction": float(hole.mean()),
    }


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of ``N x D`` features, in float64."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need an N x D feature array with N >= 2, got shape {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^1/2)  (Heusel et al. 2017, FID).

    tr((S1 S2)^1/2) is computed as the sum of square roots of the eigenvalues of the symmetric PSD matrix
    S1^1/2 S2 S1^1/2, which avoids a non-symmetric matrix square root and its complex round-off.
    """
    w, v = np.linalg.eigh(sigma1)
    root1 = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T  # S1^1/2
    inner = root1 @ sigma2 @ root1
    ev = np.linalg.eigvalsh((inner + inner.T) / 2.0)
    tr_covmean = float(np.sqrt(np.clip(ev, 0.0, None)).sum())
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)
