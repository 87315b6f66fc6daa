"""The official ldm checkpoint layout: choosing EMA or raw UNet weights, and writing plain exportable files.

* :func:`select_weights` turns a training state dict (possibly with ``model_ema.*``) into the *inference layout*
  of the released SD2 files: the chosen UNet weights under ``model.diffusion_model.*`` and no ``model_ema.*``.
  Sampling (:mod:`ldm.inference`) and export (``scripts/export.py``) both go through it, so "which weights"
  means the same thing everywhere.
* :func:`save_ldm_checkpoint` writes that state dict atomically (temp file, then rename; :mod:`ldm.atomic`) as
  ``.safetensors`` (with the parameterization and provenance in the metadata) or as a plain ``{"state_dict": ...}``
  ``.ckpt`` that ``torch.load(weights_only=True)`` reads, i.e. what the official scripts, ``diffusers``'
  ``from_single_file`` and :mod:`ldm.checkpoint` all accept. A reduced-precision export casts the network weights
  only; the noise schedule and ``scale_factor`` stay float32.
* :func:`read_parameterization` reads the recorded parameterization back (None when the file has none).

Left out: optimizer / Lightning state (use the training checkpoint for resuming), and fp16 pruning tricks beyond a
plain dtype cast.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import torch

from ldm import provenance as prov
from ldm.atomic import atomic_safetensors_save, atomic_torch_save
from ldm.checkpoint import CheckpointError
from ldm.compat import ema_buffer_name
from ldm.provenance import PARAMETERIZATION_KEY, PROVENANCE_KEY

log = logging.getLogger(__name__)

UNET_PREFIX = "model.diffusion_model."
EMA_PREFIX = "model_ema."
EMA_SCALARS = ("model_ema.decay", "model_ema.num_updates")
#: the end of an export's full-disk message
EXPORT_HINT = "Free space there or export to another location."
#: the networks (UNet, VAE, text encoder): the only tensors a reduced-precision export casts
NETWORK_PREFIXES = ("model.", "first_stage_model.", "cond_stage_model.")

__all__ = [
    "NETWORK_PREFIXES",
    "PARAMETERIZATION_KEY",
    "PROVENANCE_KEY",
    "ema_key",
    "has_ema",
    "read_parameterization",
    "save_ldm_checkpoint",
    "select_weights",
]


def ema_key(unet_key: str) -> str:
    """``model.diffusion_model.a.b`` -> ``model_ema.diffusion_modelab`` (COMPAT: LitEma's dot-free names)."""
    return EMA_PREFIX + ema_buffer_name(unet_key[len("model."):])


def has_ema(sd: Mapping[str, torch.Tensor]) -> bool:
    """True when the state dict holds EMA shadow tensors (not just LitEma's two scalars)."""
    return any(k.startswith(EMA_PREFIX) and k not in EMA_SCALARS for k in sd)


def select_weights(
    sd: Mapping[str, torch.Tensor], use_ema: bool | None = None, source: str = "checkpoint"
) -> tuple[dict[str, torch.Tensor], bool]:
    """Return ``(state dict in the official inference layout, whether EMA weights were used)``.

    Args:
        sd: a full LatentDiffusion state dict, with or without ``model_ema.*``.
        use_ema: True = EMA weights (error if absent), False = raw weights, None = EMA when present.
        source: name used in error messages.

    Raises:
        CheckpointError: EMA asked for but absent, or an EMA copy that misses some UNet weights.
    """
    ema_present = has_ema(sd)
    if use_ema and not ema_present:
        raise CheckpointError(f"{source} has no model_ema.* weights; use the raw weights (--no-ema)")
    take_ema = ema_present if use_ema is None else use_ema
    out = {k: v for k, v in sd.items() if not k.startswith(EMA_PREFIX)}
    if take_ema:
        unet_keys = [k for k in out if k.startswith(UNET_PREFIX)]
        missing = [k for k in unet_keys if ema_key(k) not in sd]
        if missing:
            raise CheckpointError(
                f"{source}: the EMA copy lacks {len(missing)} UNet tensors (e.g. {ema_key(missing[0])}); "
                "it does not match this UNet. Use the raw weights (--no-ema)."
            )
        for k in unet_keys:
            out[k] = sd[ema_key(k)]
    log.info("%s: using %s UNet weights", source, "EMA" if take_ema else "raw (non-EMA)")
    return out, take_ema


def save_ldm_checkpoint(
    sd: Mapping[str, torch.Tensor],
    path: str | Path,
    parameterization: str,
    dtype: torch.dtype | None = None,
    global_step: int | None = None,
    provenance: Mapping[str, object] | None = None,
) -> Path:
    """Write ``sd`` as ``.safetensors`` or a plain ``{"state_dict": ...}`` ``.ckpt`` (chosen by the suffix).

    Args:
        sd: state dict in the official layout (see :func:`select_weights`).
        path: output file; ``.safetensors`` or ``.ckpt``/``.pt``.
        parameterization: "eps", "v" or "x0"; stored so loaders need not guess.
        dtype: optional floating-point cast (e.g. ``torch.float16``) of the network weights (keys under
            :data:`NETWORK_PREFIXES`); the noise schedule and ``scale_factor`` stay float32, integers are kept.
        global_step: optional training step, stored as ldm's ``global_step``.
        provenance: the source checkpoint's record (:mod:`ldm.provenance`); its parameterization is replaced by
            ``parameterization``. None: a record with this parameterization and ``sd``'s scale factor.
    """
    path = Path(path)

    def cast(key: str, v: torch.Tensor) -> torch.Tensor:
        if dtype is not None and v.is_floating_point() and key.startswith(NETWORK_PREFIXES):
            v = v.to(dtype)
        return v.contiguous()

    tensors = {k: cast(k, v) for k, v in sd.items()}
    scale = float(sd["scale_factor"]) if "scale_factor" in sd else None
    record = dict(provenance or prov.record(parameterization, scale, None))
    record["parameterization"] = parameterization
    if path.suffix == ".safetensors":
        meta = {"format": "pt", **prov.to_metadata(record)}
        if global_step is not None:
            meta["global_step"] = str(global_step)
        atomic_safetensors_save(tensors, path, meta, hint=EXPORT_HINT)
    elif path.suffix in (".ckpt", ".pt"):
        obj: dict[str, object] = {"state_dict": tensors, PARAMETERIZATION_KEY: parameterization,
                                  PROVENANCE_KEY: record}
        if global_step is not None:
            obj["global_step"] = int(global_step)
        atomic_torch_save(obj, path, hint=EXPORT_HINT)
    else:
        raise ValueError(f"output file {path}: use a .safetensors or .ckpt suffix")
    log.info("wrote %d tensors (%s network weights, parameterization %s) to %s", len(tensors),
             str(dtype or "original"), parameterization, path)
    return path


def read_parameterization(path: str | Path, checkpoint: Mapping[str, object] | None = None) -> str | None:
    """The parameterization recorded in a checkpoint (safetensors metadata or ``.ckpt`` key), else None.

    ``checkpoint`` is the already loaded ``.ckpt`` dict, to avoid reading a multi-GB file twice.
    """
    return prov.read(path, checkpoint)["parameterization"]
