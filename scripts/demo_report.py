"""The checks and reports of the CPU demo (``scripts/demo.py``): does the miniature mission really learn?

* :func:`start_from_base_check` -- the fine-tune starts from the base: at step 0 the 9-channel inpainting UNet
  (built from its config with ``ckpt_path`` = the base checkpoint, exactly as ``main.py`` builds it) gives the
  base UNet's output whatever the mask channels hold, and its diffusion loss on the first training batches is
  far below that of a randomly initialised 9-channel UNet on the same batches, timesteps and noise.
* :func:`untrained_unet_checkpoint` -- the fine-tuned checkpoint with its UNet (and EMA) replaced by a fresh
  seeded initialisation: the "same pipeline, untrained UNet" baseline that ``scripts/evaluate.py`` scores.
* :func:`mean_colour_scores` -- the "fill the hole with the mean colour of the known pixels" baseline, scored
  with the same metrics (:func:`ldm.eval.metrics.region_metrics`) on the images and masks evaluate.py wrote.
* :func:`learning_verdict` -- masked-region L1 of the fine-tuned model against both baselines.
* :func:`read_metrics_csv` / :func:`plot_losses` -- loss curves of a run's ``csv/version_0/metrics.csv``.

Left out: anything that trains or samples (the demo runs ``main.py`` and the scripts for that).
"""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from ldm.checkpoint import load_state_dict_file
from ldm.data.masks import is_hole
from ldm.eval.metrics import region_metrics
from ldm.image_io import load_mask, load_rgb
from ldm.interop.ldm_format import ema_key as ema_key_of
from ldm.models.diffusion.wrapper import DiffusionWrapper
from ldm.util import instantiate_from_config

log = logging.getLogger(__name__)

#: the learning criterion: the fine-tuned model's masked-region L1 must be at most this times each baseline's
LEARNING_FACTOR = 0.5
UNET_PREFIX, EMA_PREFIX = "model.", "model_ema."


# ------------------------------------------------------------------------------------------ loss curves
def read_metrics_csv(path: str | Path) -> dict[str, list[tuple[int, float]]]:
    """``{column: [(step, value), ...]}`` of a Lightning CSVLogger file, skipping empty cells."""
    series: dict[str, list[tuple[int, float]]] = {}
    with Path(path).open(newline="") as f:
        for row in csv.DictReader(f):
            step = int(float(row.get("step") or 0))
            for key, value in row.items():
                if key in ("step", "epoch") or value in (None, ""):
                    continue
                series.setdefault(key, []).append((step, float(value)))
    return series


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    if len(values) < window or window < 2:
        return values
    kernel = np.ones(window) / window
    return np.convolve(np.pad(values, (window // 2, window - 1 - window // 2), mode="edge"), kernel, "valid")


def plot_losses(
    csv_path: str | Path, keys: Sequence[str], out_png: str | Path, title: str, log_scale: bool = True
) -> Path:
    """Plot ``keys`` of a metrics.csv against the step (raw, and a moving average) into ``out_png``."""
    import matplotlib

    matplotlib.use("Agg")  # no display on CPU boxes and CI
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    series = read_metrics_csv(csv_path)
    missing = [k for k in keys if k not in series]
    if missing:
        raise ValueError(f"{csv_path}: no column(s) {missing}; columns: {sorted(series)}")
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    for key in keys:
        steps, values = (np.asarray(v) for v in zip(*series[key]))
        line = ax.plot(steps, values, alpha=0.3, linewidth=1)[0]
        ax.plot(steps, _smooth(values, 5), color=line.get_color(), linewidth=1.8, label=key)
    ax.set_xlabel("step")
    ax.set_title(title, fontsize=10)
    if log_scale:
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%.3g"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%.3g"))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png)
    plt.close(fig)
    return out_png


# ------------------------------------------------------------------------------- start-from-base check
@dataclass
class StartCheck:
    """Result of :func:`start_from_base_check`.

    Args:
        max_abs_diff: largest ``|inpaint UNet - base UNet|`` output difference over the batches (raw weights).
        base_output_scale: mean ``|base UNet output|``, to read ``max_abs_diff`` against.
        ema_widened_exactly: the inpainting EMA's first-layer weight is the base EMA's plus zero channels.
        loss_from_base: mean v-loss of the inpainting model at step 0 on the first training batches.
        loss_random_unet: the same loss for a randomly initialised 9-channel UNet. Its output conv starts at
            zero (SD's initialisation), so it predicts v = 0 and this loss is about E[v^2] = 1.
        batches: number of batches used.
    """

    max_abs_diff: float
    base_output_scale: float
    ema_widened_exactly: bool
    loss_from_base: float
    loss_random_unet: float
    batches: int

    @property
    def loss_ratio(self) -> float:
        return self.loss_from_base / self.loss_random_unet


def random_unet(unet_config: Mapping[str, Any], conditioning_key: str, seed: int) -> DiffusionWrapper:
    """A freshly initialised UNet (in its DiffusionWrapper), seeded so the baseline is reproducible."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return DiffusionWrapper(dict(unet_config), conditioning_key).eval()
    finally:
        torch.random.set_rng_state(state)


@torch.no_grad()
def start_from_base_check(
    inpaint_config: DictConfig,
    base_model: Any,
    base_ckpt: str | Path,
    batches: Sequence[Mapping[str, Any]],
    seed: int = 0,
) -> StartCheck:
    """Compare the step-0 inpainting model with the base and with a random 9-channel UNet.

    Args:
        inpaint_config: the fine-tune's config; its ``model.params.ckpt_path`` must be ``base_ckpt``.
        base_model: the base LatentDiffusion with its raw (non-EMA) weights loaded.
        base_ckpt: the base checkpoint, read again for its EMA weights.
        batches: training batches in the model layout (B,H,W,C images in [-1, 1], masks, captions).
        seed: seeds the timesteps, the noise and the random UNet.
    """
    inpaint = instantiate_from_config(inpaint_config.model).eval()  # the 4 -> 9 widening happens here
    rand = random_unet(inpaint_config.model.params.unet_config, inpaint.conditioning_key, seed)
    gen = torch.Generator().manual_seed(seed)
    diffs, scales, loss_inp, loss_rand = [], [], [], []
    for batch in batches:
        z, cond = inpaint.get_input(batch, inpaint.first_stage_key)
        t = torch.randint(0, inpaint.num_timesteps, (z.shape[0],), generator=gen)
        noise = torch.randn(z.shape, generator=gen)
        x_noisy = inpaint.q_sample(z, t, noise)
        target = inpaint.training_target(z, noise, t)  # the configured parameterization (v here)
        out_inp = inpaint.apply_model(x_noisy, t, cond)
        out_base = base_model.apply_model(x_noisy, t, cond["c_crossattn"][0])
        out_rand = rand(x_noisy, t, **cond)
        diffs.append(float((out_inp - out_base).abs().max()))
        scales.append(float(out_base.abs().mean()))
        loss_inp.append(float((out_inp - target).pow(2).mean()))
        loss_rand.append(float((out_rand - target).pow(2).mean()))
    return StartCheck(
        max_abs_diff=max(diffs),
        base_output_scale=float(np.mean(scales)),
        ema_widened_exactly=_ema_widened_exactly(inpaint, base_ckpt),
        loss_from_base=float(np.mean(loss_inp)),
        loss_random_unet=float(np.mean(loss_rand)),
        batches=len(batches),
    )


def _ema_widened_exactly(inpaint: Any, base_ckpt: str | Path) -> bool:
    """The EMA twin of the first UNet conv: base EMA channels copied, the extra channels exactly zero."""
    base_sd = load_state_dict_file(base_ckpt)
    ema_key = ema_key_of(UNET_PREFIX + "diffusion_model.input_blocks.0.0.weight")
    if not inpaint.use_ema or ema_key not in base_sd:
        return False
    widened = inpaint.state_dict()[ema_key]
    base = base_sd[ema_key]
    keep = base.shape[1]
    return bool(torch.equal(widened[:, :keep], base) and torch.count_nonzero(widened[:, keep:]) == 0)


def first_batches(data_config: DictConfig, count: int) -> list[dict[str, Any]]:
    """The first ``count`` training batches of a data config (the stream a fresh training run starts with)."""
    data = instantiate_from_config(data_config)
    batches = []
    for batch in data.train_dataloader():
        batches.append(data.finalize_batch(batch))
        if len(batches) == count:
            break
    return batches


# -------------------------------------------------------------------------------------------- baselines
def untrained_unet_checkpoint(
    finetuned_ckpt: str | Path,
    unet_config: Mapping[str, Any],
    conditioning_key: str,
    out: str | Path,
    seed: int = 0,
) -> Path:
    """Write the fine-tuned checkpoint with a freshly initialised UNet and no EMA (same VAE, text encoder,
    scale_factor and schedule): the "untrained inpainting UNet" baseline of the same pipeline."""
    sd = {k: v for k, v in load_state_dict_file(finetuned_ckpt).items() if not k.startswith(EMA_PREFIX)}
    fresh = random_unet(unet_config, conditioning_key, seed).state_dict()
    replaced = [k for k in sd if k.startswith(UNET_PREFIX)]
    if len(replaced) != len(fresh):
        raise ValueError(
            f"{finetuned_ckpt}: {len(replaced)} UNet tensors, but the config's UNet has {len(fresh)}"
        )
    sd.update({UNET_PREFIX + k: v for k, v in fresh.items()})
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": sd, "global_step": 0}, out)
    return out


def mean_colour_fill(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``image`` (H x W x 3 uint8) with the hole (``mask >= 0.5``) set to the known pixels' mean colour."""
    hole = is_hole(np.asarray(mask))
    out = image.copy()
    if hole.all():  # nothing known: mid grey, the model's own "no information" value
        out[:] = 127
        return out
    out[hole] = np.round(image[~hole].reshape(-1, 3).mean(0)).astype(np.uint8)
    return out


def mean_colour_scores(eval_dir: str | Path, keys: Sequence[str], modes: Sequence[str]) -> dict[str, Any]:
    """Score the mean-colour fill on evaluate.py's ``inputs/KEY.png`` and ``masks/KEY_MODE.png``, laid out
    like an evaluate.py result (``modes`` -> per-preset means, ``samples`` -> per-image scores)."""
    eval_dir = Path(eval_dir)
    per_mode, samples = {}, []
    for mode in modes:
        rows = []
        for key in keys:
            image = load_rgb(eval_dir / "inputs" / f"{key}.png")
            mask = load_mask(eval_dir / "masks" / f"{key}_{mode}.png")
            scores = region_metrics(mean_colour_fill(image, mask), image, mask)
            rows.append(scores)
            samples.append({"key": key, "mode": mode, **scores})
        per_mode[mode] = {"n": len(rows), **{k: _nanmean([r[k] for r in rows]) for k in rows[0]}}
    return {"name": "mean_colour", "modes": per_mode, "samples": samples}


def _nanmean(values: Sequence[float]) -> float | None:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(vals)) if vals else None


def hole_l1(result: Mapping[str, Any]) -> float:
    """Mean masked-region L1 over every (image, preset) sample of an evaluate.py-style result."""
    values = [s["l1_hole"] for s in result["samples"] if s.get("l1_hole") is not None]
    if not values:
        raise ValueError(f"result '{result.get('name')}' has no l1_hole scores")
    return float(np.mean(values))


def learning_verdict(
    finetuned: Mapping[str, Any], baselines: Mapping[str, Mapping[str, Any]], factor: float = LEARNING_FACTOR
) -> dict[str, Any]:
    """``{"finetuned_l1_hole", "<baseline>_l1_hole", "ratio_vs_<baseline>", "passed"}``: passed when the
    fine-tuned model's masked-region L1 is at most ``factor`` times every baseline's."""
    ours = hole_l1(finetuned)
    out: dict[str, Any] = {"finetuned_l1_hole": ours, "factor": factor}
    passed = True
    for name, result in baselines.items():
        theirs = hole_l1(result)
        out[f"{name}_l1_hole"] = theirs
        out[f"ratio_vs_{name}"] = ours / theirs
        passed = passed and ours <= factor * theirs
    out["passed"] = passed
    return out


def start_check_dict(check: StartCheck) -> dict[str, Any]:
    """JSON-ready form of a :class:`StartCheck` (with the loss ratio)."""
    return {**asdict(check), "loss_ratio": check.loss_ratio}


__all__ = [
    "LEARNING_FACTOR",
    "StartCheck",
    "first_batches",
    "hole_l1",
    "learning_verdict",
    "mean_colour_fill",
    "mean_colour_scores",
    "plot_losses",
    "random_unet",
    "read_metrics_csv",
    "start_check_dict",
    "start_from_base_check",
    "untrained_unet_checkpoint",
]
