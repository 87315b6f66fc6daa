"""Evaluation outputs: one JSON per checkpoint, one table (Markdown + CSV), FID-vs-CLIP curves and labelled grids.

* ``comparison.md`` / ``comparison.csv``: one row per (mask preset, checkpoint, guidance scale), one column per
  metric present in any result. Under the Markdown table, a footer says how many held-out images were evaluated
  and how many were skipped while reading, by reason, naming the first of them (the results' ``input_skips``).
* ``curves/fid_vs_clip_PRESET.png``: FID against CLIP score, one line per checkpoint, each point labelled with its
  guidance scale -- the model card's plot, per mask preset.
* ``grids/KEY_PRESET.png``: one row per checkpoint, columns ``input | mask | masked input | s=S seed N ...``,
  read back from the PNGs the run wrote.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ldm.data.masks import is_hole
from ldm.eval.run import sample_path, sample_seed
from ldm.grids import labelled_grid
from ldm.image_io import load_mask, load_rgb, save_png

log = logging.getLogger(__name__)

#: preferred column order; other metrics follow alphabetically
COLUMNS = ("n", "n_requested", "fid", "lpips", "clip_score", "psnr_hole", "ssim_hole", "l1_hole", "psnr_known",
           "ssim_known", "l1_known", "known_changed", "psnr", "ssim", "hole_fraction", "fid_torchvision")
KEYS = ("mask", "checkpoint", "scale")


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


def table_rows(results: Sequence[dict[str, Any]]) -> tuple[list[str], list[dict[str, Any]]]:
    """(metric columns, rows ordered by preset, then checkpoint, then scale)."""
    rows = [{"mask": g["mask"], "checkpoint": r["name"], **g} for r in results for g in r["groups"]]
    masks = list(dict.fromkeys(row["mask"] for row in rows))
    rows.sort(key=lambda row: masks.index(row["mask"]))  # stable: checkpoint and scale order are kept
    present = {k for row in rows for k in row} - set(KEYS)
    return [c for c in COLUMNS if c in present] + sorted(present - set(COLUMNS)), rows


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return str(v) if isinstance(v, int) else f"{v:.4f}"


def write_tables(results: Sequence[dict[str, Any]], out_dir: Path) -> tuple[Path, Path]:
    """``comparison.md`` and ``comparison.csv``."""
    cols, rows = table_rows(results)
    out_dir.mkdir(parents=True, exist_ok=True)
    md = out_dir / "comparison.md"
    lines = ["| " + " | ".join([*KEYS, *cols]) + " |", "|" + "---|" * (len(KEYS) + len(cols))]
    lines += ["| " + " | ".join([row["mask"], row["checkpoint"], f"{row['scale']:g}", *(_fmt(row.get(c))
                                                                                       for c in cols)]) + " |"
              for row in rows]
    lines += ["", *skip_footer(results)]
    md.write_text("\n".join(lines) + "\n")
    csv_path = out_dir / "comparison.csv"
    with csv_path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*KEYS, *cols])
        writer.writerows([[row[k] for k in KEYS] + ["" if row.get(c) is None else row[c] for c in cols]
                          for row in rows])
    return md, csv_path


def skip_footer(results: Sequence[dict[str, Any]], max_named: int = 10) -> list[str]:
    """Markdown lines on what reading the held-out set skipped (every result holds the same ``input_skips``)."""
    skips = next((r["input_skips"] for r in results if r.get("input_skips") is not None), None)
    if skips is None:
        return []
    n = results[0].get("num_images", skips["read"])
    if not skips["skipped"]:
        return [f"Held-out set: {n} images evaluated; none skipped while reading."]
    reasons = ", ".join(f"{k} {v}" for k, v in skips["by_reason"].items())
    lines = [f"Held-out set: {n} images evaluated; **{skips['skipped']} skipped** while reading ({reasons}):", ""]
    for item in skips["listed"][:max_named]:
        detail = item["detail"].replace("|", "/").replace("`", "'")
        lines.append(f"- `{Path(item['source']).name}` {item['reason']}: {detail}")
    more = skips["skipped"] - min(max_named, len(skips["listed"]))
    if more:
        lines.append(f"- ... and {more} more (the first {len(skips['listed'])} are listed under input_skips in "
                     "each checkpoint's JSON)")
    return lines


def write_curves(results: Sequence[dict[str, Any]], out_dir: Path, fid: str = "fid") -> list[Path]:
    """One ``curves/fid_vs_clip_PRESET.png`` per preset, FID read from column ``fid`` (needs both FID and CLIP
    score; else logged and skipped)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    _, rows = table_rows(results)
    paths = []
    for mask in dict.fromkeys(row["mask"] for row in rows):
        points = [row for row in rows if row["mask"] == mask]
        if any(row.get(fid) is None or row.get("clip_score") is None for row in points):
            log.warning("no FID-vs-CLIP plot for %s: needs %s and clip_score (--inception, --clip-weights and "
                        "captions)", mask, fid)
            continue
        fig, ax = plt.subplots(figsize=(6, 4.5), dpi=120)
        for name in dict.fromkeys(row["checkpoint"] for row in points):
            line = sorted((row for row in points if row["checkpoint"] == name), key=lambda row: row["scale"])
            ax.plot([r["clip_score"] for r in line], [r[fid] for r in line], marker="o", label=name)
            for r in line:
                ax.annotate(f"{r['scale']:g}", (r["clip_score"], r[fid]), textcoords="offset points",
                            xytext=(4, 4), fontsize=8)
        ax.set(xlabel="CLIP score", ylabel=fid.replace("fid", "FID"),
               title=f"FID vs CLIP score over guidance scales ({mask})")
        ax.grid(alpha=0.3)
        ax.legend()
        path = out_dir / "curves" / f"fid_vs_clip_{mask}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths


def write_grids(results: Sequence[dict[str, Any]], keys: Sequence[str], modes: Sequence[str], out_dir: Path,
                seed: int) -> list[Path]:
    """``grids/KEY_PRESET.png`` for the images ``keys`` (in held-out order): a row per checkpoint, a column per
    scale, after the input, the mask and the masked input (shown in the first row)."""
    paths = []
    for index, key in enumerate(keys):
        image = load_rgb(out_dir / "inputs" / f"{key}.png")
        blank = np.full_like(image, 255)
        for mode in modes:
            mask = load_mask(out_dir / "masks" / f"{key}_{mode}.png")
            masked = np.where(is_hole(mask)[..., None], 127, image).astype(np.uint8)
            s = sample_seed(seed, mode, index)
            rows = [[*((image, mask, masked) if j == 0 else (blank,) * 3),
                     *(load_rgb(sample_path(out_dir, r["run"], scale, mode, key, s)) for scale in r["scales"])]
                    for j, r in enumerate(results)]
            headers = ["input", "mask", "masked input", *(f"s={x:g} seed {s}" for x in results[0]["scales"])]
            grid = labelled_grid(rows, headers=headers, row_labels=[r["name"] for r in results])
            paths.append(save_png(grid, out_dir / "grids" / f"{key}_{mode}.png"))
    return paths
