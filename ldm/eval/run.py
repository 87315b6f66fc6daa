"""Evaluate inpainting checkpoints on a fixed held-out set with fixed seeded masks.

For each checkpoint, each mask preset and each image: inpaint with a seed fixed by (seed, preset, image index),
write the output PNG, and score it against the ground truth with :mod:`ldm.eval.metrics` (always) and the
optional feature metrics (when their weight files are given). The per-checkpoint result is a plain dict that
:mod:`ldm.eval.report` writes as JSON and tabulates.

Output layout under ``out_dir``: ``inputs/KEY.png``, ``masks/KEY_MODE.png``, ``samples/NAME/KEY_MODE.png``.
Left out: multi-GPU sharding of the evaluation set.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from ldm.data.rng import stable_hash
from ldm.eval.data import EvalImage
from ldm.eval.feature_metrics import LPIPS, ClipScore, InceptionFeatures
from ldm.eval.metrics import frechet_distance, gaussian_stats, region_metrics
from ldm.image_io import save_png
from ldm.inference import SamplingOptions, inpaint, load_model

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CheckpointSpec:
    """One checkpoint to evaluate.

    Args:
        name: label used in file names and tables.
        config: model yaml.
        ckpt: weights file.
        use_ema: True / False / None (EMA when present).
    """

    name: str
    config: str
    ckpt: str
    use_ema: bool | None = None


@dataclass
class FeatureMetrics:
    """Optional networks for FID / LPIPS / CLIP score (None = metric skipped).

    Args:
        inception: FID feature extractor.
        lpips: LPIPS network.
        clip: CLIP scorer.
    """

    inception: InceptionFeatures | None = None
    lpips: LPIPS | None = None
    clip: ClipScore | None = None
    _real: np.ndarray | None = field(default=None, repr=False)

    def real_stats(self, images: Sequence[EvalImage]) -> tuple[np.ndarray, np.ndarray]:
        """Inception statistics of the ground-truth set (computed once)."""
        if self._real is None:
            self._real = np.concatenate([self.inception(im.image[None]) for im in images])
        return gaussian_stats(self._real)


def sample_seed(seed: int, mode: str, index: int) -> int:
    """The sampling seed of image ``index`` under preset ``mode`` (identical for every checkpoint)."""
    return int(np.random.SeedSequence([seed, stable_hash(mode), index]).generate_state(1)[0])


def write_inputs(images: Sequence[EvalImage], masks: dict[str, list[np.ndarray]], out_dir: Path) -> None:
    for im in images:
        save_png(im.image, out_dir / "inputs" / f"{im.key}.png")
    for mode, ms in masks.items():
        for im, m in zip(images, ms):
            save_png(m, out_dir / "masks" / f"{im.key}_{mode}.png")


def _mean(rows: list[dict[str, float]], key: str) -> float | None:
    vals = [r[key] for r in rows if r.get(key) is not None and not math.isnan(r[key])]
    return float(np.mean(vals)) if vals else None


def _score_sample(out: np.ndarray, im: EvalImage, mask: np.ndarray, feats: FeatureMetrics) -> dict[str, float]:
    scores = region_metrics(out, im.image, mask)
    if feats.lpips is not None:
        scores["lpips"] = float(feats.lpips(out[None], im.image[None])[0])
    if feats.clip is not None and im.caption:
        scores["clip_score"] = float(feats.clip(out[None], [im.caption])[0])
    return scores


def evaluate_checkpoint(
    spec: CheckpointSpec,
    images: Sequence[EvalImage],
    masks: dict[str, list[np.ndarray]],
    options: SamplingOptions,
    out_dir: Path,
    seed: int = 0,
    device: str = "auto",
    feats: FeatureMetrics | None = None,
) -> dict[str, Any]:
    """Inpaint and score every (preset, image) pair with one checkpoint; returns the JSON-ready result."""
    feats = feats or FeatureMetrics()
    loaded = load_model(spec.config, spec.ckpt, use_ema=spec.use_ema, device=device)
    samples: list[dict[str, Any]] = []
    per_mode: dict[str, dict[str, Any]] = {}
    bar = tqdm(total=len(images) * len(masks), desc=f"eval {spec.name}", unit="img")
    for mode, mode_masks in masks.items():
        rows, fid_feats = [], []
        for i, (im, mask) in enumerate(zip(images, mode_masks)):
            out = inpaint(loaded.model, im.image, mask, im.caption, sample_seed(seed, mode, i), 1, options)[0]
            save_png(out, out_dir / "samples" / spec.name / f"{im.key}_{mode}.png")
            scores = _score_sample(out, im, mask, feats)
            rows.append(scores)
            samples.append({"key": im.key, "mode": mode, **scores})
            if feats.inception is not None:
                fid_feats.append(feats.inception(out[None]))
            bar.update(1)
        summary = {"n": len(rows), **{k: _mean(rows, k) for k in rows[0]}} if rows else {"n": 0}
        if feats.inception is not None and len(fid_feats) >= 2:
            summary["fid"] = frechet_distance(*gaussian_stats(np.concatenate(fid_feats)), *feats.real_stats(images))
        per_mode[mode] = summary
    bar.close()
    return {
        "name": spec.name,
        "checkpoint": spec.ckpt,
        "config": spec.config,
        "used_ema": loaded.used_ema,
        "parameterization": loaded.parameterization,
        "global_step": loaded.global_step,
        "sampling": asdict(options),
        "seed": seed,
        "num_images": len(images),
        "modes": per_mode,
        "samples": samples,
    }
