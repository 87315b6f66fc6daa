"""The evaluation protocol: every checkpoint at every guidance scale on every mask preset, on the same held-out
images, masks, captions and seeds; every sample scored; results gathered across processes and summarised.

Samples are PNG files keyed by everything that determines them, so a killed evaluation continues where it stopped
and a finished one can be re-scored (say, with CLIP weights added) without sampling again::

    samples/RUN/scale_S/PRESET/KEY_seedN.png

``RUN`` is the first 16 hex digits of the SHA-256 of the checkpoint file's SHA-256, the model config, the EMA
choice and the sampler settings (``samples/RUN/run.json`` spells them out); ``S`` is the guidance scale, ``KEY``
the image, ``N`` its sampling seed, fixed by ``(seed, preset, image index)`` and shared by all checkpoints and
scales. ``inputs/KEY.png`` and ``masks/KEY_PRESET.png`` hold the set as evaluated; a later run into the same
folder with different images or masks stops with an error instead of mixing the two. Files are written
atomically (temporary name, then rename), so a killed run never leaves a truncated sample behind.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf
from PIL import Image
from tqdm import tqdm

from ldm.data.masks import binarize_mask
from ldm.data.rng import stable_hash
from ldm.defaults import GUIDANCE_SCALE
from ldm.eval.data import EvalImage, SkipLog
from ldm.eval.feature_metrics import (
    LPIPS,
    ClipScore,
    InceptionFeatures,
    TorchvisionInceptionFeatures,
    file_sha256,
    frechet_distance,
)
from ldm.eval.metrics import region_metrics
from ldm.eval.shard import Shard
from ldm.image_io import load_mask, load_rgb
from ldm.inference import SamplingOptions, inpaint, load_model, schedule_length
from ldm.models.diffusion.sampling import get_sampler
from ldm.util import load_config

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class CheckpointSpec:
    """One checkpoint to evaluate.

    Args:
        name: label used in tables, plots and grids.
        config: model yaml.
        ckpt: weights file.
        use_ema: True / False / None (EMA when present).
    """

    name: str
    config: str
    ckpt: str
    use_ema: bool | None = None


@dataclass(frozen=True)
class Protocol:
    """The sampling settings shared by every checkpoint.

    Args:
        scales: classifier-free guidance scales (the model card: 1.5, 2, 3, 4, 5, 6, 7, 8).
        sampler: "ddim" or "dpm".
        steps: sampler steps (the model card: 50).
        eta: DDIM eta.
        precision: "fp32", "bf16" or "fp16".
        paste_back: score outputs with the known pixels pasted back.
        seed: seeds masks and sampling.
    """

    scales: tuple[float, ...] = (GUIDANCE_SCALE,)
    sampler: str = "ddim"
    steps: int = 50
    eta: float = 0.0
    precision: str = "fp32"
    paste_back: bool = False
    seed: int = 0

    def options(self, scale: float) -> SamplingOptions:
        return SamplingOptions(self.sampler, self.steps, scale, self.eta, self.precision, self.paste_back)

    def sampling(self) -> dict[str, Any]:
        """What decides a sample besides checkpoint, scale, image, mask and seed."""
        return {k: v for k, v in asdict(self).items() if k not in ("scales", "seed")}


@dataclass
class FeatureMetrics:
    """Optional networks (None = metric skipped).

    Args:
        inception: standard FID feature extractor -> ``fid`` (``fid_<dims>d`` for other feature sizes).
        inception_tv: torchvision Inception-v3, the labelled non-standard option -> ``fid_torchvision``.
        lpips: LPIPS network -> ``lpips`` (output against ground truth).
        clip: CLIP scorer -> ``clip_score`` (output against caption; images without caption are skipped).
    """

    inception: InceptionFeatures | None = None
    inception_tv: TorchvisionInceptionFeatures | None = None
    lpips: LPIPS | None = None
    clip: ClipScore | None = None

    def features(self, image: np.ndarray) -> dict[str, np.ndarray]:
        """FID features of one image, per FID column."""
        nets = ((self.inception, self.inception and self.inception.column), (self.inception_tv, "fid_torchvision"))
        return {name: net(image[None])[0] for net, name in nets if net is not None}

    def score(self, out: np.ndarray, target: np.ndarray, mask: np.ndarray, caption: str) -> dict[str, float]:
        scores = region_metrics(out, target, mask)
        if self.lpips is not None:
            scores["lpips"] = float(self.lpips(out[None], target[None])[0])
        if self.clip is not None:
            scores["clip_score"] = float(self.clip(out[None], [caption])[0]) if caption else float("nan")
        return scores


# ------------------------------------------------------------------------------------------------ keys, files
def sample_seed(seed: int, mode: str, index: int) -> int:
    """The sampling seed of image ``index`` under preset ``mode`` (the same for every checkpoint and scale)."""
    return int(np.random.SeedSequence([seed, stable_hash(mode), index]).generate_state(1)[0])


def sample_path(out_dir: Path, run: str, scale: float, mode: str, key: str, seed: int) -> Path:
    return out_dir / "samples" / run / f"scale_{scale:g}" / mode / f"{key}_seed{seed}.png"


def atomic_png(image: np.ndarray, path: Path) -> None:
    """Write ``path`` so that it either holds the whole PNG or does not exist."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    arr = image if image.dtype == np.uint8 else (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
    Image.fromarray(arr).save(tmp, format="PNG")
    os.replace(tmp, path)


def _atomic_text(text: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


#: a file changed less than this long before it is hashed is hashed again next time (see checkpoint_sha256)
RECENT_CHANGE_NS = 2_000_000_000


def _file_key(st: os.stat_result) -> dict[str, int]:
    return {"dev": st.st_dev, "ino": st.st_ino, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "ctime_ns": st.st_ctime_ns}


def checkpoint_sha256(path: str | Path, cache_file: Path) -> str:
    """SHA-256 of a checkpoint, cached in ``cache_file`` under the file's identity and last change.

    The key is (device, inode, size, mtime, ctime). Size and mtime alone let a replaced checkpoint reuse the old
    one's samples: ``cp -p``, ``rsync -t`` or ``touch -d`` give a new file the old size and mtime. They cannot
    give it the old ctime: the kernel sets ctime on every write, rename onto the file and chmod, and no system
    call sets it back; a file renamed over the old one also has another inode. A file changed less than
    :data:`RECENT_CHANGE_NS` before hashing is not cached (a rewrite within the same clock tick would keep its
    ctime; git's "racy clean" rule), and one that changes while it is hashed is an error. Hashing is kept cached
    because it is the only read of a checkpoint when its samples exist (re-scoring): 8-9 s per 5 GB on one core of
    the CPU in docs/BENCHMARKS.md ("Checkpoint hashing"), more from a network file system.
    """
    p = Path(path).resolve()
    if not p.is_file():
        raise ValueError(f"--ckpt {path}: file not found")
    key = _file_key(p.stat())
    cache = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    hit = cache.get(str(p), {})
    if hit.get("key") == key:
        return hit["sha256"]
    log.info("hashing %s (%.2f GB) to key its samples", p, key["size"] / 1e9)
    started = time.time_ns()
    sha = file_sha256(p)
    if _file_key(p.stat()) != key:
        raise ValueError(f"--ckpt {path} changed while it was being hashed (is it still being written?); run again "
                         "once it is complete")
    if started - key["ctime_ns"] >= RECENT_CHANGE_NS:
        cache[str(p)] = {"key": key, "sha256": sha}
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        _atomic_text(json.dumps(cache, indent=1), cache_file)
    return sha


def run_identity(spec: CheckpointSpec, protocol: Protocol, ckpt_sha256: str) -> tuple[str, dict[str, Any]]:
    """(``RUN`` key, what it stands for) of a checkpoint under a protocol."""
    model = OmegaConf.to_container(load_config([spec.config]).model, resolve=True)
    model.get("params", {}).pop("ckpt_path", None)  # the training init file does not change sampling
    identity = {"checkpoint_sha256": ckpt_sha256, "model_config": model, "use_ema": spec.use_ema,
                **protocol.sampling()}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16], identity


def on_main(shard: Shard, fn: Callable[[], Any]) -> Any:
    """``fn()`` on rank 0, its result (or its ValueError, re-raised) on every rank: no rank waits forever."""
    result: Any = None
    if shard.is_main:
        try:
            result = ("ok", fn())
        except ValueError as e:
            result = ("error", str(e))
    status, value = shard.broadcast(result)
    if status == "error":
        raise ValueError(value)
    return value


def write_inputs(images: Sequence[EvalImage], masks: dict[str, list[np.ndarray]], out_dir: Path) -> None:
    """Write the held-out set under ``inputs/`` and ``masks/``; files already there must hold the same pixels."""
    def put(arr: np.ndarray, path: Path, read: Callable[[Path], np.ndarray]) -> None:
        if not path.is_file():
            atomic_png(arr, path)
        elif not np.array_equal(read(path), arr):
            raise ValueError(f"{path} differs from this evaluation's: --out holds another held-out set (other "
                             "images, --size, --seed or masks); use a new --out folder")

    for im in images:
        put(im.image, out_dir / "inputs" / f"{im.key}.png", load_rgb)
    for mode, ms in masks.items():
        for im, m in zip(images, ms):
            put(binarize_mask(m), out_dir / "masks" / f"{im.key}_{mode}.png", lambda p: binarize_mask(load_mask(p)))


# --------------------------------------------------------------------------------------------------- scoring
def _mean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(kept)) if kept else None


def real_features(images: Sequence[EvalImage], feats: FeatureMetrics, shard: Shard) -> dict[str, np.ndarray]:
    """FID features of the ground-truth images, gathered in image order."""
    local = [(i, feats.features(images[i].image)) for i in shard.indices(len(images))]
    gathered = shard.gather(local)
    return {name: np.stack([g[name] for g in gathered]) for name in (gathered[0] if gathered else {})}


def summarise(rows: list[dict[str, Any]], fake: list[dict[str, np.ndarray]], real: dict[str, np.ndarray],
              ) -> dict[str, Any]:
    """Means of the per-sample metrics and the FIDs of one (checkpoint, scale, preset) group."""
    metrics = [k for k in rows[0] if k not in ("key", "scale", "mask", "seed")]
    summary: dict[str, Any] = {"n": len(rows), **{k: _mean([r.get(k) for r in rows]) for k in metrics}}
    for name, real_feats in real.items():
        if len(fake) >= 2 and len(real_feats) >= 2:
            summary[name] = frechet_distance(np.stack([f[name] for f in fake]), real_feats)
    return summary


def evaluate_checkpoint(
    spec: CheckpointSpec,
    images: Sequence[EvalImage],
    masks: dict[str, list[np.ndarray]],
    protocol: Protocol,
    out_dir: Path,
    shard: Shard | None = None,
    feats: FeatureMetrics | None = None,
    real: dict[str, np.ndarray] | None = None,
    requested: int | None = None,
) -> dict[str, Any] | None:
    """Sample (or reuse) and score every (scale, preset, image) of one checkpoint on this rank's images.

    Returns the JSON-ready result on rank 0 (None on the others): settings, one summary per (scale, preset)
    under ``groups`` and every sample's metrics under ``samples``. ``requested`` is the number of images the
    user asked for (recorded next to the number evaluated: ``n_requested`` per group, ``num_images_requested``).
    """
    if not images:
        raise ValueError("no held-out images to evaluate")
    shard, feats, real = shard or Shard(), feats or FeatureMetrics(), real or {}
    sha = on_main(shard, lambda: checkpoint_sha256(spec.ckpt, out_dir / "checkpoint_sha256.json"))
    run, identity = run_identity(spec, protocol, sha)
    loaded, counts = None, {"sampled": 0, "reused": 0}
    mine = shard.indices(len(images))
    groups, samples = [], []
    bar = tqdm(total=len(protocol.scales) * len(masks) * len(mine), desc=f"eval {spec.name}", unit="img",
               disable=not shard.is_main)
    for scale in protocol.scales:
        for mode, mode_masks in masks.items():
            local = []
            for i in mine:
                im, mask, seed = images[i], mode_masks[i], sample_seed(protocol.seed, mode, i)
                path = sample_path(out_dir, run, scale, mode, im.key, seed)
                if path.is_file():
                    out, counts["reused"] = load_rgb(path), counts["reused"] + 1
                else:
                    if loaded is None:
                        loaded = load_model(spec.config, spec.ckpt, use_ema=spec.use_ema, device=shard.device)
                    out = inpaint(loaded.model, im.image, mask, im.caption, seed, 1, protocol.options(scale))[0]
                    atomic_png(out, path)
                    counts["sampled"] += 1
                row = {"key": im.key, "scale": scale, "mask": mode, "seed": seed,
                       **feats.score(out, im.image, mask, im.caption)}
                local.append((i, (row, feats.features(out))))
                bar.update(1)
            gathered = shard.gather(local)
            if shard.is_main and gathered:
                rows = [row for row, _ in gathered]
                samples += rows
                summary = summarise(rows, [f for _, f in gathered], real)
                if requested is not None:
                    summary["n_requested"] = requested
                groups.append({"scale": scale, "mask": mode, **summary})
    bar.close()
    model_info = shard.gather([(shard.rank, None if loaded is None else
                                {"used_ema": loaded.used_ema, "parameterization": loaded.parameterization,
                                 "global_step": loaded.global_step})])
    totals = shard.gather([(shard.rank, counts)])
    if not shard.is_main:
        return None
    run_file = out_dir / "samples" / run / "run.json"
    known = json.loads(run_file.read_text()).get("model") if run_file.is_file() else None
    model = next((m for m in model_info if m is not None), known)
    _atomic_text(json.dumps({"name": spec.name, **identity, "model": model}, indent=2, default=str), run_file)
    sampled, reused = sum(c["sampled"] for c in totals), sum(c["reused"] for c in totals)
    log.info("%s: %d samples drawn, %d reused from %s", spec.name, sampled, reused, run_file.parent)
    return {
        "name": spec.name,
        "checkpoint": spec.ckpt,
        "checkpoint_sha256": sha,
        "config": spec.config,
        "run": run,
        **(model or {"used_ema": None, "parameterization": None, "global_step": None}),
        # besides the count asked for, the steps the sampler really runs (DDIM's grid: 45 asked -> 46)
        "sampling": {**protocol.sampling(), "steps_run": get_sampler(protocol.sampler).steps_run(
            protocol.steps, schedule_length(spec.config))},
        "scales": list(protocol.scales),
        "seed": protocol.seed,
        "num_images": len(images),
        "num_images_requested": requested,
        "fid_weights_sha256": feats.inception.sha256 if feats.inception is not None else None,
        "samples_drawn": sampled,
        "samples_reused": reused,
        "groups": groups,
        "samples": samples,
    }


@dataclass
class Evaluation:
    """Everything one ``scripts/evaluate.py`` run needs besides the checkpoints.

    Args:
        images: the held-out images.
        masks: preset -> one mask per image.
        protocol: sampling settings.
        out_dir: output folder.
        feats: optional feature metrics.
        shard: this process's share.
        requested: the number of images asked for (None: all); recorded next to the number evaluated.
        skips: what reading the held-out set skipped; its :meth:`SkipLog.report` goes into every result as
            ``input_skips`` (and under the tables), so the numbers say how many images were dropped and why.
    """

    images: Sequence[EvalImage]
    masks: dict[str, list[np.ndarray]]
    protocol: Protocol
    out_dir: Path
    feats: FeatureMetrics = field(default_factory=FeatureMetrics)
    shard: Shard = field(default_factory=Shard)
    skips: SkipLog | None = None
    requested: int | None = None

    def run(self, specs: Sequence[CheckpointSpec]) -> list[dict[str, Any]]:
        """Write (or check) the inputs, then evaluate every checkpoint; results on rank 0, [] elsewhere."""
        on_main(self.shard, lambda: write_inputs(self.images, self.masks, self.out_dir))
        real = real_features(self.images, self.feats, self.shard)
        results = [evaluate_checkpoint(spec, self.images, self.masks, self.protocol, self.out_dir, self.shard,
                                       self.feats, real, self.requested) for spec in specs]
        skips = (self.skips or SkipLog()).report()
        return [{**r, "input_skips": skips} for r in results if r is not None]
