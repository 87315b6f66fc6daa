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
#: provenance key of exports: which UNet weights the file holds ("ema" or "raw"), since it has no model_ema.*
UNET_WEIGHTS_KEY = "unet_weights"
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
    "UNET_WEIGHTS_KEY",
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
    sd: Mapping[str, torch.Tensor], use_ema: bool | None = None, source: str = "checkpoint",
    stored: str | None = None,
) -> tuple[dict[str, torch.Tensor], bool | None]:
    """Return ``(state dict in the official inference layout, whether the UNet holds EMA weights)``.

    Args:
        sd: a full LatentDiffusion state dict, with or without ``model_ema.*``.
        use_ema: True = EMA weights, False = raw weights, None = EMA when available.
        source: name used in messages.
        stored: for a file without ``model_ema.*``, what its UNet weights are by its record (:data:`UNET_WEIGHTS_KEY`
            of an export: "ema" or "raw"); None when it does not say (e.g. the released SD2 files).

    Returns:
        The state dict, and True (EMA) / False (raw) / None (as stored, not recorded which).

    Raises:
        CheckpointError: weights asked for that the file does not hold, or an EMA copy that misses some UNet weights.
    """
    if not has_ema(sd):
        return dict(sd), _stored_weights(use_ema, source, stored)
    take_ema = True if use_ema is None else use_ema
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


def _stored_weights(use_ema: bool | None, source: str, stored: str | None) -> bool | None:
    """The UNet weights of a file without an EMA copy, checked against what was asked for."""
    if stored == "ema":
        if use_ema is False:
            raise CheckpointError(f"{source} holds only the EMA UNet weights (it records unet_weights: ema); the raw "
                                  "ones are in the training checkpoint it was exported from. Drop --no-ema.")
        log.info("%s: its UNet weights are the EMA weights already (an export of the EMA)", source)
        return True
    if stored == "raw":
        if use_ema:
            # either a training checkpoint of a run without EMA (use_ema: false) or an export made with --no-ema:
            # the message must not send the user to a training checkpoint that has no EMA either
            raise CheckpointError(f"{source} holds only the raw (non-EMA) UNet weights (it records unet_weights: raw)"
                                  " and no model_ema.* copy: its run trained without EMA (use_ema: false) or it was "
                                  "exported with --no-ema. Drop --ema, or pass a training checkpoint of a run with "
                                  "EMA (or an export of its EMA).")
        log.info("%s: using its raw (non-EMA) UNet weights (it has no EMA copy)", source)
        return False
    if use_ema:
        raise CheckpointError(f"{source} has no model_ema.* weights and does not record whether its UNet weights "
                              "are the EMA; drop --ema to use them as stored")
    log.info("%s: using the UNet weights as stored (no model_ema.* copy; the file does not record whether they "
             "are the EMA)", source)
    return None


def save_ldm_checkpoint(
    sd: Mapping[str, torch.Tensor],
    path: str | Path,
    parameterization: str,
    dtype: torch.dtype | None = None,
    global_step: int | None = None,
    provenance: Mapping[str, object] | None = None,
    ema: bool | None = None,
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
        ema: whether the UNet weights in ``sd`` are the EMA (True) or the raw weights (False); recorded as
            :data:`UNET_WEIGHTS_KEY` so loaders can say which they are. None: not recorded.

    The file is written atomically (a temp file renamed over ``path``): a crash leaves the old file or the new one.
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
    if ema is not None:
        record[UNET_WEIGHTS_KEY] = "ema" if ema else "raw"
    if global_step is not None:
        record["global_step"] = int(global_step)
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
