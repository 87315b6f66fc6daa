"""Evaluation outputs: one JSON per checkpoint, a side-by-side table (Markdown + CSV) and image grids.

The table has one row per (preset, checkpoint) and one column per metric present in any result, so
checkpoints are compared on the same masks next to each other. Grids show, per image and preset,
``input | mask | masked input | checkpoint 1 | checkpoint 2 | ...``, read back from the PNGs the run wrote.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ldm.data.masks import is_hole
from ldm.image_io import load_mask, load_rgb, make_grid, save_png

#: preferred column order; other metrics follow alphabetically
COLUMNS = ("n", "fid", "lpips", "clip_score", "psnr_hole", "ssim_hole", "l1_hole", "psnr_known", "ssim_known",
           "l1_known", "known_changed", "psnr", "ssim", "hole_fraction")


def _clean(x: Any) -> Any:
    """NaN/inf -> None so the JSON is strict (json.dumps would write the non-standard NaN)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_clean(v) for v in x]
    return x


def write_json(result: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_clean(result), indent=2, allow_nan=False) + "\n")
    return path


def _columns(results: Sequence[dict[str, Any]]) -> list[str]:
    present = {k for r in results for summary in r["modes"].values() for k in summary}
    return [c for c in COLUMNS if c in present] + sorted(present - set(COLUMNS))


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    return str(v) if isinstance(v, int) else f"{v:.4f}"


def write_tables(results: Sequence[dict[str, Any]], out_dir: Path) -> tuple[Path, Path]:
    """``comparison.md`` and ``comparison.csv``: rows (preset, checkpoint), columns = metrics."""
    cols = _columns(results)
    modes = list(dict.fromkeys(m for r in results for m in r["modes"]))
    rows = [[mode, r["name"], *(r["modes"][mode].get(c) for c in cols)]
            for mode in modes for r in results if mode in r["modes"]]
    out_dir.mkdir(parents=True, exist_ok=True)
    md = out_dir / "comparison.md"
    lines = ["| mask | checkpoint | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 2)]
    lines += ["| " + " | ".join([row[0], row[1], *(_fmt(v) for v in row[2:])]) + " |" for row in rows]
    md.write_text("\n".join(lines) + "\n")
    csv_path = out_dir / "comparison.csv"
    with csv_path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["mask", "checkpoint", *cols])
        writer.writerows([[*row[:2], *("" if v is None else v for v in row[2:])] for row in rows])
    return md, csv_path


def write_grids(names: Sequence[str], keys: Sequence[str], modes: Sequence[str], out_dir: Path) -> list[Path]:
    """One ``grids/KEY_MODE.png`` per image and preset from the files under ``inputs/``, ``masks/``, ``samples/``."""
    paths = []
    for key in keys:
        image = load_rgb(out_dir / "inputs" / f"{key}.png")
        for mode in modes:
            mask = load_mask(out_dir / "masks" / f"{key}_{mode}.png")
            masked = np.where(is_hole(mask)[..., None], 127, image).astype(np.uint8)
            outs = [load_rgb(out_dir / "samples" / name / f"{key}_{mode}.png") for name in names]
            paths.append(save_png(make_grid([[image, mask, masked, *outs]]), out_dir / "grids" / f"{key}_{mode}.png"))
    return paths
