"""Turning one raw shard sample (bytes per member) into a model-ready sample, or a counted skip.

Order, cheapest checks first: image/caption/json present -> caption is UTF-8 -> json parses -> metadata and
caption filters (json sizes are a pre-filter) -> image header: the stored size against ``min_size``,
``max_aspect_ratio`` and ``max_pixels`` (also the size of every planned resize) -> decode to 8-bit RGB by the
rule of ``ldm.data.rgb`` -> seeded resize/crop -> float H x W x 3 in [-1, 1] -> postprocess (e.g. ``AddMask``).
Every failure becomes one counted skip (``ldm.data.stats``), never an exception that reaches training.

Output sample keys: ``<image_key>`` (H x W x 3 float32 numpy array in [-1, 1]; uint8 in [0, 255] with the uint8
transport, see :func:`finalize_batch`), ``txt`` (str, stripped, never empty),
``json`` (dict; ``{}`` if the shard has none and no filter needs it), ``__key__``, ``__url__``, ``__seed__``
(seed words, dropped before collation), ``latent_moments`` (``2C x h x w`` float16, only for a split that uses
precomputed latents, ``ldm.data.latents``), plus whatever the postprocess adds.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from ldm.data import latents
from ldm.data.filters import MetadataFilter
from ldm.data.masks import masked_image
from ldm.data.rgb import ImageLimits, ImageRejected, open_rgb
from ldm.data.rng import SEED_KEY, Stream, make_rng
from ldm.data.stats import BadDataMonitor
from ldm.data.transforms import Crop, HorizontalFlip, ImageOp, Resize, TooSmall, check_rgb, to_float_hwc
from ldm.util import ConfigError

log = logging.getLogger(__name__)


def decode_image(data: bytes, draft_size: tuple[int, int] | None = None) -> Image.Image:
    """Decode image bytes to 8-bit RGB by the project's one rule (``ldm.data.rgb``); raises on any corruption.

    ``draft_size`` lets libjpeg decode at a reduced scale (1/2, 1/4, 1/8) that is still at least this big.
    """
    return open_rgb(data, plan=(lambda *_: [draft_size]) if draft_size else None, draft=draft_size is not None)


def resize_plan(ops: list[ImageOp], width: int, height: int) -> list[tuple[int, int]]:
    """The ``(width, height)`` outputs of the ``Resize`` ops of ``ops`` for a ``width x height`` input.

    Crops and flips are followed; the plan stops at a transform whose output size is unknown (``External``).
    """
    sizes = []
    for op in ops:
        if isinstance(op, Resize):
            width, height = op.output_size(width, height)
            sizes.append((width, height))
        elif isinstance(op, Crop):
            height, width = (op.size, op.size) if isinstance(op.size, int) else op.size
        elif not isinstance(op, HorizontalFlip):
            break
    return sizes


@dataclass
class SampleProcessor:
    """Decode, filter, transform and postprocess one raw sample.

    Args:
        image_key: Member extension holding the image (``jpg`` for img2dataset shards).
        metadata_filter: Thresholds on json fields and captions.
        image_ops: Seeded image operations (see ``ldm.data.transforms``).
        postprocess: Called on the finished sample (``AddMask``), or None.
        key_transforms: Callables applied to other decoded members by key (ldm's per-split ``transforms``).
        jpeg_draft: Let libjpeg downscale by a power of two before a leading ``Resize`` (faster on large
            originals; pixels differ slightly from a full-resolution resize).
        uint8_images: Keep the image as H x W x 3 uint8 (see :func:`finalize_batch`) instead of float [-1, 1].
        limits: Size limits checked on the stored image before decoding and before any resize
            (``ldm.data.rgb.ImageLimits``); the json sizes are only a cheaper pre-filter.
        require_caption: Count a sample without a caption as ``missing_caption`` (training); False delivers it
            with ``txt`` "" (evaluation).
        use_latents: Deliver the sample's precomputed VAE moments (``ldm.data.latents``) as ``latent_moments``;
            a sample without them is skipped as ``missing_latents``, one whose moments do not fit as ``bad_latents``.
        warn_unused_latents: Warn once per process when a sample carries moments that are not used.
    """

    image_key: str
    metadata_filter: MetadataFilter
    image_ops: list[ImageOp]
    postprocess: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    key_transforms: Mapping[str, Callable[[Any], Any]] = field(default_factory=dict)
    jpeg_draft: bool = False
    uint8_images: bool = False
    limits: ImageLimits = field(default_factory=ImageLimits)
    require_caption: bool = True
    use_latents: bool = False
    warn_unused_latents: bool = False

    def _plan(self, width: int, height: int) -> list[tuple[int, int]]:
        return resize_plan(self.image_ops, width, height)

    def _caption(self, data: bytes | None) -> tuple[str | None, str]:
        """(caption, "") or (None, skip reason: detail)."""
        if data is None:
            return ("", "") if not self.require_caption else (None, "missing_caption: no '.txt' member")
        try:
            caption = data.decode("utf-8").strip()
        except UnicodeDecodeError as e:
            return None, f"bad_caption: not UTF-8 ({e})"
        if not caption and self.require_caption:
            return None, "missing_caption: empty caption"
        return caption, ""

    def _parse_json(self, data: bytes | None) -> tuple[dict | None, str]:
        """(parsed json, "") or (None, skip reason: detail)."""
        if data is None:
            return (None, "missing_json") if self.metadata_filter.needs_json else ({}, "")
        try:
            meta = json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            return None, f"bad_json: {e}"
        return (meta, "") if isinstance(meta, dict) else (None, "bad_json: not a json object")

    def __call__(self, raw: Mapping[str, Any], seed_words: tuple[int, ...], mon: BadDataMonitor) -> dict | None:
        url, key = raw["__url__"], raw["__key__"]
        image_bytes = raw.get(self.image_key)
        if image_bytes is None:
            mon.skip("missing_image", url, f"{key}: no '.{self.image_key}' member")
            return None
        caption, problem = self._caption(raw.get("txt"))
        if caption is None:
            reason, _, detail = problem.partition(": ")
            mon.skip(reason, url, f"{key}: {detail}")
            return None
        meta, problem = self._parse_json(raw.get("json"))
        if meta is None:
            reason, _, detail = problem.partition(": ")
            mon.skip(reason, url, f"{key} {detail}")
            return None
        reason = self.metadata_filter.check(meta, caption)
        if reason is not None:
            mon.skip(reason, url, key)
            return None
        if self.use_latents and latents.MEMBER not in raw:  # checked before the costly decode
            mon.skip("missing_latents", url, f"{key}: no '.{latents.MEMBER}' member")
            return None
        if self.warn_unused_latents and latents.MEMBER in raw:
            latents.warn_unused(url)
        try:
            draft = self.jpeg_draft and bool(self.image_ops) and isinstance(self.image_ops[0], Resize)
            img = open_rgb(image_bytes, self.limits, self._plan, draft=draft)
        except ImageRejected as e:  # a size limit, read from the header: nothing was decoded
            mon.skip(e.reason, url, f"{key}: {e}")
            return None
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError ...
            mon.skip("corrupt_image", url, f"{key}: {type(e).__name__}: {e}")
            return None
        rng = make_rng(seed_words, Stream.CROP)
        try:
            for op in self.image_ops:
                img = op(img, rng)
        except TooSmall as e:
            mon.skip("too_small", url, f"{key}: {e}")
            return None
        img = check_rgb(img)  # a configured transform that returns a tensor or another mode is a config mistake
        sample: dict[str, Any] = {
            self.image_key: np.asarray(img) if self.uint8_images else to_float_hwc(img), "txt": caption, "json": meta,
            "__key__": key, "__url__": url, SEED_KEY: seed_words,
        }
        if self.use_latents:
            try:
                sample[latents.BATCH_KEY] = latents.read_moments(raw[latents.MEMBER], img.height, img.width)
            except Exception as e:  # np.load raises ValueError, OSError, EOFError ... on a damaged member
                mon.skip("bad_latents", url, f"{key}: {type(e).__name__}: {e}")
                return None
        for k, fn in self.key_transforms.items():
            if k in sample:
                sample[k] = fn(sample[k])
        if self.postprocess is not None:
            sample = self.postprocess(sample)
        return sample


def _stack(values: list[Any]) -> torch.Tensor:
    """Stack equal-shaped arrays/tensors; inside a DataLoader worker, straight into shared memory.

    Same trick as torch's ``default_collate`` (and the same storage call): the batch then crosses to the
    training process without the extra copy the worker's result queue would otherwise make.
    """
    first = values[0]
    is_numpy = isinstance(first, np.ndarray)
    out = None
    if torch.utils.data.get_worker_info() is not None:
        elem = torch.from_numpy(np.empty(0, first.dtype)) if is_numpy else first
        storage = elem._typed_storage()._new_shared(first.size * len(values) if is_numpy else first.numel()
                                                     * len(values), device=elem.device)
        out = elem.new(storage).resize_(len(values), *first.shape)
    if is_numpy:  # np.stack also takes read-only arrays (PIL's), which torch.from_numpy warns about
        if out is None:
            return torch.from_numpy(np.stack(values))  # B x ...
        np.stack(values, out=out.numpy())
        return out
    return torch.stack(values, 0, out=out)  # B x ...


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Batch samples like ldm's ``dict_collation_fn``: arrays/tensors stacked, numbers to tensors, rest listed.

    Keys missing from any sample are dropped; private keys (``__seed__``) are dropped, ``__key__`` and
    ``__url__`` are kept as lists.
    """
    keys = [k for k in samples[0] if all(k in s for s in samples) and k != SEED_KEY]
    batch: dict[str, Any] = {}
    for k in keys:
        values = [s[k] for s in samples]
        first = values[0]
        if isinstance(first, (np.ndarray, torch.Tensor)):
            if any(v.shape != first.shape for v in values):
                shapes = sorted({tuple(v.shape) for v in values})
                raise ConfigError(f"cannot batch '{k}': shapes differ {shapes}; the split's image_transforms must "
                                  "bring every image to one size: end them with a RandomCrop or CenterCrop")
            batch[k] = _stack(values)  # B x H x W x C for images and masks
        elif isinstance(first, (int, float)) and not isinstance(first, bool):
            batch[k] = torch.tensor(values)
        else:
            batch[k] = values
    return batch


def finalize_batch(batch: dict[str, Any], image_key: str = "jpg") -> dict[str, Any]:
    """Turn a uint8-transport batch into the model's float32 layout, in place, on the batch's device.

    ``image_key`` uint8 B x H x W x 3 -> float32 in [-1, 1] (the float32 operations of ``to_float_hwc``, so
    values are identical); ``mask`` uint8 -> float32 {0, 1}; ``masked_image`` from ``ldm.data.masks.masked_image``.
    A batch that is already float is returned unchanged.
    """
    image = batch.get(image_key)
    if not isinstance(image, torch.Tensor) or image.dtype != torch.uint8:
        return batch
    image = image.float().div_(255.0).mul_(2.0).sub_(1.0)  # B x H x W x 3
    batch[image_key] = image
    mask = batch.get("mask")
    if isinstance(mask, torch.Tensor) and mask.dtype == torch.uint8:
        mask = mask.float()  # B x H x W x 1, 1 = hole
        batch["mask"] = mask
        batch["masked_image"] = masked_image(image, mask)
    return batch


__all__ = ["SampleProcessor", "collate", "decode_image", "finalize_batch", "resize_plan"]
