"""Pictures of the CPU demo (``scripts/demo.py``): loss curves a person can read, and labelled image grids.

* :func:`plot_stage` -- one stage's training loss (raw and smoothed) with the loss on fixed batches (fixed
  images, masks, timesteps and noise, logged by :class:`ldm.fixed_batch.FixedBatchLoss`) and their step-0 levels
  as dashed lines, so that a person can see whether the weights got better, free of the batch-to-batch noise.
* :func:`method_grid` / :func:`paste_back_grid` -- rows of photos, columns of methods (or of raw and pasted-back
  output), every column and row labelled (:func:`ldm.grids.labelled_grid`).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from demo_report import sample_png  # sibling module in scripts/
from PIL import Image

from ldm.grids import labelled_grid
from ldm.image_io import load_mask, load_rgb, save_png

FIXED_PREFIX = "fixed_batch/"
#: grid cells are the 64 px demo images enlarged this many times
ZOOM = 2


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


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average with edge padding (same length as ``values``)."""
    if len(values) < window or window < 2:
        return values
    kernel = np.ones(window) / window
    return np.convolve(np.pad(values, (window // 2, window - 1 - window // 2), mode="edge"), kernel, "valid")


def plot_stage(csv_path: str | Path, train_key: str, ylabel: str, title: str, out_png: str | Path) -> Path:
    """Two panels from a run's metrics.csv. Left: the training loss (raw, faint; moving average, bold) and the
    loss on the fixed held-in batch; right: the loss on the fixed held-out batch (``fixed_batch/heldout``), which
    lives on another scale. Each fixed-batch curve has its step-0 value as a dashed line.

    The y axes are linear from 0, so the distance from a dashed line reads as the change since step 0; raw
    training losses above the top of the axis are clipped (the moving average and fixed-batch losses never are).
    """
    import matplotlib

    matplotlib.use("Agg")  # no display on CPU boxes and CI
    import matplotlib.pyplot as plt

    series = read_metrics_csv(csv_path)
    fixed = {k[len(FIXED_PREFIX):]: v for k, v in series.items() if k.startswith(FIXED_PREFIX)}
    if train_key not in series and not fixed:
        raise ValueError(f"{csv_path}: no column {train_key} and no fixed-batch loss; columns: {sorted(series)}")
    panels = [("photos trained on", [n for n in fixed if n != "heldout"], True)]
    if "heldout" in fixed:
        panels.append(("held-out photos (never trained on)", ["heldout"], False))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.8), dpi=110, squeeze=False)
    for ax, (panel_title, names, with_train) in zip(axes[0], panels):
        top, last_step = 0.0, 1
        if with_train and train_key in series:  # absent when the run was shorter than the logging interval
            steps, values = (np.asarray(v) for v in zip(*series[train_key]))
            smoothed = smooth(values, max(5, len(values) // 8))
            ax.plot(steps, values, color="tab:blue", alpha=0.25, linewidth=1, label=f"{train_key} (each batch)")
            ax.plot(steps, smoothed, color="tab:blue", linewidth=2, label=f"{train_key}, moving average")
            top, last_step = float(smoothed.max()), int(steps.max())
        for name, colour in zip(names, ("tab:orange", "tab:green", "tab:red", "tab:purple")):
            f_steps, f_values = (np.asarray(v) for v in zip(*fixed[name]))
            ax.plot(f_steps, f_values, "o-", color=colour, markersize=3, linewidth=1.5,
                    label=f"fixed {name} batch ({f_values[0]:.3g} -> {f_values[-1]:.3g})")
            ax.axhline(f_values[0], color=colour, linestyle="--", linewidth=1, alpha=0.8, label="its step-0 value")
            top, last_step = max(top, float(f_values.max())), max(last_step, int(f_steps.max()))
        ax.set_ylim(0, top * 1.15 if top > 0 else 1)
        ax.set_xlim(0, last_step)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel)
        ax.set_title(panel_title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower left")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png)
    plt.close(fig)
    return out_png


def comparison_grid(
    rows: Sequence[Sequence[np.ndarray]], headers: Sequence[str], row_labels: Sequence[str], out_png: str | Path,
    zoom: int = ZOOM,
) -> Path:
    """Write a labelled grid (one row per photo, one column per image kind) to ``out_png``, every cell enlarged
    ``zoom`` times (nearest neighbour: the pixels are the model's, only bigger)."""
    big = [[np.repeat(np.repeat(np.asarray(c), zoom, 0), zoom, 1) for c in row] for row in rows]
    return save_png(labelled_grid(big, headers=headers, row_labels=row_labels), out_png)


#: columns of the method grid: (header, sample folder under evaluate.py's samples/, or a special cell)
METHOD_COLUMNS = (
    ("input", "input"), ("mask", "mask"), ("fine-tuned", "finetuned"), ("+ paste-back", "paste_back"),
    ("step 0 (base)", "step0"), ("untrained UNet", "untrained_unet"), ("OpenCV Telea", "opencv_telea"),
)
SPLIT_LABELS = {"heldin": "held-in", "heldout": "HELD-OUT"}


def method_grid(eval_dirs: Mapping[str, str | Path], mode: str, out_png: str | Path) -> Path:
    """One row per photo of each split (evaluate.py output folders with each method's ``NAME.json``), one column
    per method, for mask ``mode``.

    The paste-back column is the fine-tuned output with the known pixels copied from the input, which is what
    ``scripts/inpaint.py --paste-back`` does.
    """
    rows, labels = [], []
    methods = [name for _, name in METHOD_COLUMNS if name not in ("input", "mask", "paste_back")]
    for split, eval_dir in eval_dirs.items():
        eval_dir = Path(eval_dir)
        results = {m: json.loads((eval_dir / f"{m}.json").read_text()) for m in methods}
        for image_path in sorted((eval_dir / "inputs").glob("*.png")):
            key = image_path.stem
            cells = {"input": load_rgb(image_path), "mask": load_mask(eval_dir / "masks" / f"{key}_{mode}.png")}
            for m in methods:
                cells[m] = load_rgb(sample_png(eval_dir, results[m], key, mode))
            cells["paste_back"] = np.where((cells["mask"] < 0.5)[..., None], cells["input"], cells["finetuned"])
            rows.append([cells[name] for _, name in METHOD_COLUMNS])
            labels.append(f"{key} ({SPLIT_LABELS.get(split, split)})")
    return comparison_grid(rows, [h for h, _ in METHOD_COLUMNS], labels, out_png)


def inpaint_outputs(folder: str | Path, seed: int) -> dict[str, Path]:
    """``image stem -> first sample of seed`` among the PNGs ``scripts/inpaint.py`` wrote to ``folder``, found by
    what each records as PNG text (its input image, seed and sample index), not by parsing file names."""
    found = {}
    for path in sorted(Path(folder).glob("*.png")):
        with Image.open(path) as png:
            text = dict(getattr(png, "text", {}))
        if text.get("seed") == str(seed) and text.get("sample") == "0" and "image" in text:
            found[Path(text["image"]).stem] = path
    return found


def paste_back_grid(folder: str | Path, samples: str | Path, seed: int, out_png: str | Path) -> Path:
    """input | mask | ``inpaint.py`` output | ``inpaint.py --paste-back`` output, one row per image of ``folder``
    (``samples/raw`` and ``samples/paste_back`` hold the two runs' outputs: :func:`inpaint_outputs`)."""
    folder, samples = Path(folder), Path(samples)
    outputs = {kind: inpaint_outputs(samples / kind, seed) for kind in ("raw", "paste_back")}
    rows, labels = [], []
    for image_path in sorted(p for p in folder.glob("*.png") if not p.stem.endswith("_mask")):
        name = image_path.stem
        rows.append([load_rgb(image_path), load_mask(folder / f"{name}_mask.png"),
                     *(load_rgb(outputs[kind][name]) for kind in ("raw", "paste_back"))])
        labels.append(name)
    return comparison_grid(rows, ["input", "mask", "inpaint.py", "--paste-back"], labels, out_png)


__all__ = ["comparison_grid", "inpaint_outputs", "method_grid", "paste_back_grid", "plot_stage", "read_metrics_csv",
           "smooth"]
