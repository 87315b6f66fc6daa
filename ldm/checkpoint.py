"""Reading checkpoints safely and initialising a model from one, with ldm's surgery made explicit.

* :func:`load_state_dict_file` reads ``.safetensors`` or ``.ckpt``/``.pt``/``.bin`` (``torch.load`` with
  ``weights_only=True``: no arbitrary code runs), with or without a ``state_dict`` wrapper.
* :func:`widen_input_channels` is the inpainting 4 -> 9 input-conv surgery (DECISIONS D4): the checkpoint's channels
  go first, the new channels are zero, anything else is a :class:`CheckpointError`.
* :func:`load_into` applies ignore prefixes and the surgery, loads non-strictly and reports missing and
  unexpected keys in one summary.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as asked: unreadable file, wrong architecture, impossible shapes."""


def load_checkpoint_file(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint file into a dict without unpickling arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path), device="cpu"))
        except Exception as e:  # safetensors raises its own error types for bad headers
            raise CheckpointError(f"{path} is not a readable .safetensors file ({e})") from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, IndexError, KeyError) as e:
        # weights_only unpickling of junk fails with a variety of low-level errors; all mean "not a checkpoint"
        raise CheckpointError(
            f"{path} is not a loadable checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:200]}). "
            "Expected a Lightning/ldm .ckpt, a plain {'state_dict': ...} file or a .safetensors file."
        ) from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a dict of tensors")
    return obj


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Return the tensor state dict of a checkpoint, unwrapping ``{"state_dict": ...}`` when present."""
    return state_dict_of(load_checkpoint_file(path), path)


def state_dict_of(obj: Mapping[str, Any], path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a loaded checkpoint object (``obj["state_dict"]`` when wrapped, else ``obj`` itself)."""
    sd = obj.get("state_dict", obj)
    if not isinstance(sd, Mapping):
        raise CheckpointError(f"{path}: 'state_dict' is a {type(sd).__name__}, not a mapping")
    tensors = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path} contains no tensors; is it a model checkpoint?")
    return tensors


def drop_prefixes(sd: dict[str, torch.Tensor], prefixes: Iterable[str]) -> dict[str, torch.Tensor]:
    prefixes = tuple(prefixes)
    if not prefixes:
        return sd
    dropped = [k for k in sd if k.startswith(prefixes)]
    if dropped:
        log.info("ignore_keys: dropping %d checkpoint tensors starting with %s", len(dropped), list(prefixes))
    return {k: v for k, v in sd.items() if not k.startswith(prefixes)}


def widen_input_channels(
    sd: dict[str, torch.Tensor],
    target_shapes: Mapping[str, torch.Size],
    keys: Iterable[str],
    keep_dims: int = 4,
) -> dict[str, torch.Tensor]:
    """Zero-pad dim 1 of each key in ``keys`` from the checkpoint's width to the model's (DECISIONS D4).

    Input channels ``[0, keep_dims)`` are copied, the rest are zero; the bias is never touched. A key whose
    checkpoint shape already equals the model's is left alone (resuming an inpainting checkpoint). Any other
    mismatch raises :class:`CheckpointError`.
    """
    out = dict(sd)
    for key in keys:
        if key not in sd or key not in target_shapes:
            continue
        src, want = sd[key], tuple(target_shapes[key])
        if tuple(src.shape) == want:
            continue
        widenable = (
            src.ndim == len(want)
            and src.ndim >= 2
            and src.shape[0] == want[0]
            and tuple(src.shape[2:]) == want[2:]
            and src.shape[1] == keep_dims
            and want[1] > keep_dims
        )
        if not widenable:
            raise CheckpointError(
                f"cannot widen '{key}': checkpoint shape {tuple(src.shape)}, model shape {want}. Only the input "
                f"dimension may grow, from keep_finetune_dims={keep_dims}. Is this checkpoint for this model?"
            )
        widened = torch.zeros(want, dtype=src.dtype)
        widened[:, :keep_dims] = src  # new channels (mask, masked-image latent) start at exactly zero
        out[key] = widened
        log.info("widened '%s' %s -> %s (new input channels zero)", key, tuple(src.shape), want)
    return out


def check_shapes(sd: Mapping[str, torch.Tensor], target_shapes: Mapping[str, torch.Size], path: str) -> None:
    """Raise one :class:`CheckpointError` listing every tensor whose shape differs from the model's."""
    bad = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(target_shapes[k])}"
        for k, v in sd.items()
        if k in target_shapes and tuple(v.shape) != tuple(target_shapes[k])
    ]
    if bad:
        more = f" (and {len(bad) - 8} more)" if len(bad) > 8 else ""
        raise CheckpointError(
            f"{path} does not fit this model's architecture; shape mismatches: " + "; ".join(bad[:8]) + more
        )


def load_into(
    module: torch.nn.Module,
    sd: dict[str, torch.Tensor],
    source: str,
    strict: bool = False,
) -> tuple[list[str], list[str]]:
    """Load ``sd`` into ``module`` and log one summary of missing/unexpected keys.

    Returns:
        (missing, unexpected) key lists.
    """
    target = module.state_dict()
    check_shapes(sd, {k: v.shape for k, v in target.items()}, source)
    result = module.load_state_dict(sd, strict=strict)
    missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    log.info(
        "loaded %d tensors from %s: %d missing, %d unexpected",
        len(sd) - len(unexpected), source, len(missing), len(unexpected),
    )
    for kind, keys in (("missing", missing), ("unexpected", unexpected)):
        if keys:
            shown = ", ".join(keys[:10]) + (f", ... (+{len(keys) - 10})" if len(keys) > 10 else "")
            log.warning("%s keys from %s: %s", kind, source, shown)
    return missing, unexpected


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temp file in the target directory, fsync, then ``os.replace``.

    A crash or kill at any point leaves either the old file or the new one, never a truncated file. Unlike
    Lightning's default it streams to disk instead of building the whole checkpoint in memory first, which
    matters for a 1.3B-parameter model with optimizer and EMA state.
    """
    import os
    import tempfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_checkpoint_io():
    """A Lightning ``CheckpointIO`` plugin whose saves go through :func:`atomic_torch_save`."""
    from pytorch_lightning.plugins.io import TorchCheckpointIO

    class AtomicCheckpointIO(TorchCheckpointIO):
        def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
            if storage_options is not None:
                raise TypeError("AtomicCheckpointIO does not take storage_options")
            atomic_torch_save(checkpoint, path)

    return AtomicCheckpointIO()
