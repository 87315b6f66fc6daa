"""Reading and writing checkpoints safely, and initialising a model from one with the surgery made explicit.

Reading. Every checkpoint this project reads -- init weights, ``-r`` resumes (through Lightning's ``CheckpointIO``
plugin, :func:`atomic_checkpoint_io`), sampling, evaluation and export -- goes through :func:`load_checkpoint_file`:

* ``.safetensors`` holds tensors only;
* anything else goes through :func:`safe_torch_load`, which passes ``weights_only=True`` to ``torch.load``
  explicitly. torch consults ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` at every call, but only when the caller left
  ``weights_only`` unset; an explicit ``True`` is never overridden (``torch/serialization.py``, ``load``). So no
  environment variable can make this loader unpickle arbitrary objects (tests/test_checkpoint_safety.py sets it);
* a file that is empty, truncated or not a checkpoint, or that holds pickled Python objects, becomes one
  :class:`CheckpointError` line naming the file (never a traceback, never torch's advice to unpickle unsafely).

Loading into a model (:func:`load_into`) is strict: a missing or unexpected tensor is an error that gives the
count and the first keys, except for prefixes the caller names as allowed. :func:`widen_input_channels` is the
inpainting 4 -> 9 input-conv surgery (DECISIONS D4).

Writing lives in :mod:`ldm.atomic` (temp file or folder, fsync, rename; one line on a full disk or a read-only
location); :func:`atomic_checkpoint_io` routes Lightning's saves through it. Temp files orphaned by a kill during a
save match :data:`TEMP_GLOB` and are removed when a run is resumed.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import pickle
import re
import struct
import sys
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

#: temp files of :func:`ldm.atomic.atomic_torch_save`: ``.<target name>.<random>.tmp`` beside the target
TEMP_GLOB = ".*.tmp"
_TEMP_NAME = re.compile(r"^\..+\.(ckpt|safetensors|pt|pth|bin)\.[A-Za-z0-9_]+\.tmp$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as asked: unreadable file, wrong architecture, impossible shapes."""


def first_line(e: BaseException) -> str:
    """``TypeName: first line of the message`` (also for exceptions with an empty message)."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:200]}" if text else type(e).__name__


# ---------------------------------------------------------------------------------------------------- reading
def safe_torch_load(path: str | Path, mmap: bool = False) -> Any:
    """``torch.load`` that only rebuilds tensors and plain containers, whatever the environment says.

    ``mmap=True`` maps tensor storages instead of reading them: a multi-GB file is checked in milliseconds.
    """
    return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def _unsafe_global(message: str) -> str | None:
    """The global a refused pickle names, or None when there is none or it names nothing that exists.

    A file cut short or damaged inside its pickle can spell a global that no module has ("collections.OrderedDic"):
    that is damage, not a refused object, and is reported as such. Nothing is imported to decide: a module not
    loaded yet only has to be findable.
    """
    match = re.search(r"GLOBAL ([\w.]+)", message)
    if not match:
        return None
    module, _, attr = match.group(1).rpartition(".")
    if not module or not all(part.isidentifier() for part in match.group(1).split(".")):
        return None
    if module in sys.modules:
        return match.group(1) if hasattr(sys.modules[module], attr) else None
    try:
        return match.group(1) if importlib.util.find_spec(module.split(".")[0]) is not None else None
    except (ImportError, ValueError):
        return None


def verify_file(path: str | Path) -> bool:
    """Check a torch zip checkpoint's bytes against the CRC-32 of every record (:mod:`ldm.integrity`).

    Returns False for formats without checksums (legacy torch files, safetensors).

    Raises:
        CheckpointError: the file is damaged; the message names the record.
    """
    from ldm.integrity import IntegrityError, verify_zip

    try:
        return verify_zip(path)
    except IntegrityError as e:
        raise CheckpointError(f"{e}. Its tensors would load with wrong values; use another checkpoint or copy "
                              "this one again") from None


def check_checkpoint_path(path: str | Path) -> Path:
    """``path`` if it is a file; else a :class:`CheckpointError` that says what the path is and what to pass.

    Cheap (a few bytes and the zip directory at the end are read), so scripts call it before building a model
    or reading any image. A training run's folder names its ``checkpoints/last.ckpt``; a diffusers pipeline
    folder is recognised by its ``model_index.json``; an empty file, or one cut short (:func:`check_complete`),
    is an error here rather than after minutes of other work.
    """
    path = Path(path)
    if path.is_file():
        check_complete(path)
        return path
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} is not a regular file")
    for candidate in (path / "checkpoints" / "last.ckpt", path / "last.ckpt"):
        if candidate.is_file():
            raise CheckpointError(f"checkpoint {path} is a directory (a training run's?): pass a checkpoint file, "
                                  f"e.g. {candidate}")
    if (path / "model_index.json").is_file():
        raise CheckpointError(f"checkpoint {path} is a diffusers pipeline folder; this loader reads ldm-layout "
                              ".ckpt/.safetensors files: pass the .ckpt or .safetensors it was exported from")
    raise CheckpointError(f"checkpoint {path} is a directory; pass a .ckpt or .safetensors file")


def check_complete(path: Path) -> None:
    """:class:`CheckpointError` when ``path`` is visibly incomplete, judged from its ends, not its contents.

    * empty (0 bytes);
    * a torch zip checkpoint (it starts with a zip record) without the zip directory a finished save writes
      last: the save or the copy was cut short;
    * a ``.safetensors`` file shorter than its header says.

    The CRC check of every record (:func:`ldm.integrity.verify_zip`) runs when the file is loaded; this one
    only catches the common case of a file that stops early, at the cost of reading its two ends.
    """
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): an interrupted copy or download? Replace it.")
    with open(path, "rb") as f:
        head = f.read(8)
        if head[:4] == b"PK\x03\x04" and not zipfile.is_zipfile(f):
            raise CheckpointError(f"{path} is truncated: it starts like a torch checkpoint but ends before the zip "
                                  f"directory a finished save writes last ({size} bytes). Copy it again, or pick "
                                  "an earlier checkpoint of the run.")
        # safetensors: 8 bytes of header length, then the JSON header ("{..."), then the tensor data
        if path.suffix == ".safetensors" and len(head) == 8 and f.read(1) == b"{":
            import json

            header_len = int.from_bytes(head, "little")
            end = 8 + header_len
            if end <= size:
                f.seek(8)
                try:
                    header = json.loads(f.read(header_len))
                    end += max((v["data_offsets"][1] for v in header.values() if "data_offsets" in v), default=0)
                except (ValueError, TypeError, KeyError, IndexError, AttributeError):
                    return  # a damaged header, not a short file: the loader names the file and its error
            if end > size:
                raise CheckpointError(f"{path} is truncated: its header describes {end} bytes, the file has {size}. "
                                      "Copy it again.")


def load_checkpoint_file(path: str | Path, mmap: bool = False, verify: bool | None = None) -> dict[str, Any]:
    """Read a checkpoint file into a dict without unpickling arbitrary objects.

    Args:
        path: ``.ckpt``/``.pt``/``.pth``/``.bin`` (torch zip or legacy format) or ``.safetensors``.
        mmap: map tensor storages lazily (torch zip files only); used to probe resume candidates cheaply.
        verify: check every record's CRC-32 first (:func:`verify_file`; one extra read of the file, mostly from
            the page cache the load then uses). Default: when not ``mmap``.

    Raises:
        CheckpointError: missing, empty, truncated, damaged or foreign file, or one holding pickled Python objects.
    """
    path = check_checkpoint_path(path)
    if (not mmap if verify is None else verify) and path.suffix != ".safetensors":
        verify_file(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path), device="cpu"))
        except Exception as e:  # safetensors raises its own error types for bad headers
            raise CheckpointError(f"{path} is not a readable .safetensors file ({first_line(e)})") from e
    try:
        obj = safe_torch_load(path, mmap=mmap and zipfile.is_zipfile(path))  # mmap needs torch's zip format
    except pickle.UnpicklingError as e:
        name = _unsafe_global(str(e))
        if name is None:  # junk or a legacy pickle cut short, not a refused object
            raise CheckpointError(
                f"{path} is truncated or not a loadable checkpoint (its pickle data is invalid). Expected a "
                "Lightning/ldm .ckpt, a plain {'state_dict': ...} file or a .safetensors file."
            ) from None
        raise CheckpointError(
            f"{path} contains a pickled Python object ({name}) besides tensors and was not loaded: unpickling it "
            "could run arbitrary code. Use a checkpoint written by this project or a .safetensors file."
        ) from None
    except (RuntimeError, EOFError, ValueError, IndexError, KeyError, OSError, AttributeError, struct.error) as e:
        # junk, truncation and foreign formats fail with many low-level errors; all mean "not a checkpoint"
        raise CheckpointError(
            f"{path} is truncated or not a loadable checkpoint ({first_line(e)}). Expected a Lightning/ldm .ckpt, "
            "a plain {'state_dict': ...} file or a .safetensors file."
        ) from None
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


# -------------------------------------------------------------------------------------------- loading into
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
            + mismatch_hint(sd, target_shapes)
        )


def mismatch_hint(sd: Mapping[str, torch.Tensor], target_shapes: Mapping[str, Sequence[int]]) -> str:
    """" " + what the checkpoint looks like and what to do (:mod:`ldm.interop.layout`), or "" when unknown."""
    from ldm.interop.layout import explain_mismatch

    found = explain_mismatch({k: tuple(v.shape) for k, v in sd.items()}, target_shapes)
    return f". {found}" if found else ""


def _first_keys(keys: Sequence[str], n: int = 5) -> str:
    return ", ".join(keys[:n]) + (f", ... (+{len(keys) - n})" if len(keys) > n else "")


def load_into(
    module: torch.nn.Module,
    sd: dict[str, torch.Tensor],
    source: str,
    allow_missing: Iterable[str] = (),
    hint: str = "",
) -> tuple[list[str], list[str]]:
    """Load ``sd`` into ``module`` strictly, except for missing keys under the ``allow_missing`` prefixes.

    ``hint`` ends the error message (which setting allows a partial load for this caller).

    Returns:
        (missing, unexpected) key lists; ``missing`` holds only allowed keys, ``unexpected`` is empty.

    Raises:
        CheckpointError: a shape mismatch, an unexpected tensor, or a missing tensor outside ``allow_missing``
            (one line with the count and the first keys).
    """
    allowed = tuple(allow_missing)
    target = module.state_dict()
    check_shapes(sd, {k: v.shape for k, v in target.items()}, source)
    unexpected = [k for k in sd if k not in target]
    missing = [k for k in target if k not in sd]
    refused = [k for k in missing if not k.startswith(allowed)] if allowed else missing
    if unexpected or refused:
        parts = []
        if refused:
            parts.append(f"{len(refused)} model tensors missing from the checkpoint ({_first_keys(refused)})")
        if unexpected:
            parts.append(f"{len(unexpected)} checkpoint tensors the model does not have ({_first_keys(unexpected)})")
        why = mismatch_hint(sd, {k: tuple(v.shape) for k, v in target.items()})
        raise CheckpointError(
            f"{source} does not match the model: {'; '.join(parts)}"
            + (why or ". Is it the checkpoint for this config?" + (f" {hint}" if hint else ""))
        )
    module.load_state_dict(sd, strict=False)
    if missing:
        log.info("%s: %d model tensors not in the checkpoint keep their initial values (allowed prefixes %s)",
                 source, len(missing), list(allowed))
    log.info("loaded %d tensors from %s", len(sd), source)
    return missing, []


def non_finite_tensors(sd: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of floating-point tensors in ``sd`` holding a NaN or an infinity (one sync per device)."""
    by_device: dict[torch.device, list[str]] = {}
    for k, v in sd.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            by_device.setdefault(v.device, []).append(k)
    bad = []
    for names in by_device.values():  # one stacked reduction (and one sync) per device
        flags = torch.stack([sd[k].isfinite().all() for k in names]).tolist()
        bad += [k for k, ok in zip(names, flags) if not ok]
    return bad


# ---------------------------------------------------------------------------------------------------- writing
def orphan_temp_files(directories: Iterable[str | Path]) -> list[Path]:
    """Temp files left in ``directories`` by saves that were killed (SIGKILL, node loss) before their rename."""
    found = []
    for d in directories:
        d = Path(d)
        if d.is_dir():
            found += [p for p in d.glob(TEMP_GLOB) if p.is_file() and _TEMP_NAME.match(p.name)]
    return sorted(found)


def atomic_checkpoint_io():
    """The Lightning ``CheckpointIO`` plugin of every run: atomic saves, and loads through
    :func:`load_checkpoint_file`, so a ``-r`` resume never unpickles arbitrary objects either.

    It also remembers, on the rank that writes, which global step each file it wrote holds (``saved``), so that
    callbacks can avoid writing the same state twice (:mod:`ldm.callbacks.checkpoints`). With several processes,
    the file every rank restores is the one global rank 0 chose (broadcast when Lightning loads it): rank 0 alone
    verified the candidates' checksums, and all ranks must start from the same state.
    """
    from pytorch_lightning.plugins.io import TorchCheckpointIO

    from ldm.atomic import atomic_torch_save

    class AtomicCheckpointIO(TorchCheckpointIO):
        def __init__(self) -> None:
            super().__init__()
            self.saved: dict[str, int | None] = {}

        def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
            if storage_options is not None:
                raise TypeError("AtomicCheckpointIO does not take storage_options")
            atomic_torch_save(checkpoint, path)
            self.saved[os.path.abspath(path)] = checkpoint.get("global_step")

        def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict:
            # map_location: tensors are always loaded on the CPU (Lightning's default); weights_only=False requests
            # are refused by design: a resume needs tensors and plain containers only. The choice of file was
            # verified (checksums included) by ldm.resume on rank 0, so it is not read twice here.
            del map_location, weights_only
            return load_checkpoint_file(rank_zero_choice(path), verify=False)

    return AtomicCheckpointIO()


def rank_zero_choice(path: Any) -> Any:
    """``path`` as global rank 0 has it (every rank calls this together while Lightning restores a checkpoint)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return path
    chosen = [str(path)]
    dist.broadcast_object_list(chosen, src=0)
    if chosen[0] != str(path):
        log.warning("rank %d: restoring %s, the checkpoint rank 0 chose (this process had chosen %s)",
                    dist.get_rank(), chosen[0], path)
    return chosen[0]
