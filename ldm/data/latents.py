"""Precomputed image latents (``scripts/precompute_latents.py``) in the training data path.

The script adds ``<key>.latent_moments.npy`` to every sample (the VAE posterior moments of the image after one
fixed resize and centre crop) and writes ``latent_moments.json`` next to the shards, recording that resize and
crop. A split's ``latent_moments`` key decides what the loader does with them:

* ``null`` (default, "auto"): use them when every local shard folder of the split holds a ``latent_moments.json``;
  encode online when none does.
* ``true``: use them; no ``latent_moments.json`` beside the shards is an error.
* a path: use them, checked against that ``latent_moments.json`` (shards that are URLs have no folder to look in).
* ``false``: ignore the member; the image is encoded online.

When they are used, the split's ``image_transforms`` must be the resize and crop the latents were computed with:
a random crop, a flip, any other transform, another size or interpolation, another ``image_key`` or
``jpeg_draft`` would pair the stored latent with other pixels than the masked image's (which is still encoded
online, from the pixels the loader made). Each is one :class:`ldm.util.ConfigError` at start-up naming the key.
Each sample then carries ``latent_moments`` (``2C x h x w`` float16, as stored; collated to ``B x 2C x h x w``),
which ``LatentDiffusion.get_input`` samples its posterior from instead of encoding the image. A sample without the
member (the script copies undecodable images without one) is skipped as ``missing_latents``, one whose member
does not load or does not fit its image as ``bad_latents``, so every batch of the split has the key.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ldm.data.transforms import Crop, HorizontalFlip, ImageOp, Resize
from ldm.util import ConfigError

log = logging.getLogger(__name__)

MEMBER = "latent_moments.npy"  # the shard member (``<key>.latent_moments.npy``)
BATCH_KEY = "latent_moments"  # the sample / batch key (``LatentDiffusion.latent_moments_key``'s default)
SIDECAR = "latent_moments.json"  # written next to the shards by scripts/precompute_latents.py
_warned_unused = False  # one warning per process when shards carry moments that a split does not use


def op_spec(op: ImageOp) -> dict[str, Any]:
    """A json-ready description of a deterministic resize or centre crop; ValueError for anything else."""
    if isinstance(op, Resize):
        size = op.size if isinstance(op.size, int) else list(op.size)
        return {"op": "resize", "size": size, "interpolation": int(op.interpolation), "max_size": op.max_size}
    if isinstance(op, Crop) and not op.random:
        return {"op": "center_crop", "size": op.size if isinstance(op.size, int) else list(op.size)}
    kind = ("a random crop (RandomCrop)" if isinstance(op, Crop) else "a random flip" if isinstance(op, HorizontalFlip)
            else f"an unchecked transform ({op!r})")
    raise ValueError(kind)


def _describe(specs: Sequence[dict[str, Any]]) -> str:
    return ", ".join(f"{s['op']}({s['size']}" + (f", interpolation={s['interpolation']}" if "interpolation" in s
                                                  else "") + ")" for s in specs) or "none"


def _load_sidecar(path: Path, key: str) -> dict[str, Any]:
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read {path}: {type(e).__name__}: {e}", key=key) from e
    if not isinstance(meta, dict) or meta.get("member") != MEMBER:
        raise ConfigError(f"{path} is not a latent_moments.json of scripts/precompute_latents.py", key=key)
    return meta


def check_sidecar(meta: dict[str, Any], path: Path, ops: Sequence[ImageOp], image_key: str, jpeg_draft: bool,
                  split: str) -> None:
    """Raise :class:`ConfigError` (naming the split key) when the split's pixels would differ from those the
    latents of ``path`` were computed from."""
    off = f"or set {split}.latent_moments: false to encode every image online"
    if meta.get("image_key", "jpg") != image_key:
        raise ConfigError(f"the latents of {path} were computed from the '{meta.get('image_key')}' member, this "
                          f"split reads '{image_key}'; use the same image_key, {off}", key=f"{split}.image_key")
    if jpeg_draft:
        raise ConfigError(f"JPEG draft decoding changes the pixels the precomputed latents of {path} were computed "
                          f"from; set jpeg_draft: false, {off}", key="jpeg_draft")
    specs = []
    for i, op in enumerate(ops):
        try:
            specs.append(op_spec(op))
        except ValueError as e:
            raise ConfigError(f"{e} would pair the precomputed latents of {path} (one fixed crop per image) with "
                              f"other pixels; use torchvision.transforms.CenterCrop, {off}",
                              key=f"{split}.image_transforms[{i}]") from None
    recorded = meta.get("ops")
    if recorded is None:  # written before the structured record existed: compare the printed transforms
        same = [repr(op) for op in ops] == meta.get("transforms")
        recorded_text = str(meta.get("transforms"))
    else:
        same = json.loads(json.dumps(specs)) == recorded
        recorded_text = _describe(recorded)
    if not same:
        raise ConfigError(f"the precomputed latents of {path} were computed with [{recorded_text}], this split "
                          f"makes [{_describe(specs)}]; use the same resize and centre crop (or recompute the "
                          f"latents), {off}", key=f"{split}.image_transforms")


def resolve(setting: bool | str | None, urls: Sequence[str], ops: Sequence[ImageOp], image_key: str,
            jpeg_draft: bool, split: str) -> list[Path] | None:
    """The checked ``latent_moments.json`` files a split uses, or None when it encodes online (see module doc)."""
    key = f"{split}.latent_moments"
    if setting is False:
        return None
    if isinstance(setting, str):
        sidecars = [Path(setting)]
        if not sidecars[0].is_file():
            raise ConfigError(f"{setting} does not exist (the latent_moments.json written next to the shards by "
                              "scripts/precompute_latents.py)", key=key)
    elif setting is None or setting is True:
        local = [u for u in urls if not u.startswith("pipe:") and "://" not in u]
        folders = list(dict.fromkeys(Path(u).parent for u in local))
        sidecars = [f / SIDECAR for f in folders if (f / SIDECAR).is_file()]
        without = [str(f) for f in folders if not (f / SIDECAR).is_file()] + [u for u in urls if u not in local][:1]
        if not sidecars:
            if setting is True:
                raise ConfigError(f"no {SIDECAR} beside the shards ({', '.join(without[:2])}); run "
                                  "scripts/precompute_latents.py, or give the file's path", key=key)
            return None
        if without:
            raise ConfigError(f"{sidecars[0].parent} has precomputed latents but {without[0]} has none; point the "
                              f"split at one kind of shards, or set latent_moments: false", key=key)
    else:
        raise ConfigError(f"expected null (auto), true, false or a path, got {setting!r}", key=key)
    for path in sidecars:
        check_sidecar(_load_sidecar(path, key), path, ops, image_key, jpeg_draft, split)
    return sidecars


def read_moments(data: Any, height: int, width: int) -> np.ndarray:
    """The stored ``2C x h x w`` moments of an ``height x width`` image; ValueError when they cannot be its own."""
    if not isinstance(data, bytes):
        raise ValueError("the member is not a file")
    arr = np.load(io.BytesIO(data), allow_pickle=False)
    if arr.dtype.kind != "f" or arr.ndim != 3 or arr.shape[0] % 2:
        raise ValueError(f"expected 2C x h x w floats, got {arr.dtype} {arr.shape}")
    h, w = arr.shape[1:]
    if height % h or width % w or height // h != width // w:
        raise ValueError(f"{arr.shape} moments do not belong to a {width}x{height} image")
    return arr


def warn_unused(url: str) -> None:
    """Say once per process that shards carry precomputed latents which this split does not use."""
    global _warned_unused
    if not _warned_unused:
        _warned_unused = True
        log.warning("%s carries precomputed latents (%s) but no %s was found beside it, so every image is "
                    "encoded online; set the split's latent_moments to that file's path to use them, or to false "
                    "to silence this", url, MEMBER, SIDECAR)


__all__ = ["BATCH_KEY", "MEMBER", "SIDECAR", "check_sidecar", "op_spec", "read_moments", "resolve", "warn_unused"]
