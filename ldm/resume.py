"""Choosing the checkpoint a ``-r`` resume starts from, and cleaning up after interrupted saves.

* ``-r <run dir>``: the candidates are ``checkpoints/last.ckpt``, SLURM's ``hpc_ckpt_<n>.ckpt`` in the run dir
  and the periodic full-state ``checkpoints/*.ckpt``. Newest first (modification time), each is probed -- read
  with ``weights_only=True`` and its tensors memory-mapped, so a multi-GB file costs milliseconds -- and the first
  complete training checkpoint wins. Every skipped file is logged with its reason; when none loads, one
  :class:`~ldm.checkpoint.CheckpointError` line lists them all.
* ``-r <file>``: that file must be a complete training checkpoint. A weights-only snapshot
  (``trainstep_checkpoints/``) has no optimizer or loop state; the error says how to start a new run from it.
* :func:`remove_orphans` deletes the temp files that a kill during a save leaves behind (``.last.ckpt.*.tmp``,
  each as large as a checkpoint), logging each one.
"""

from __future__ import annotations

import logging
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path

from ldm.checkpoint import CheckpointError, load_checkpoint_file, orphan_temp_files

log = logging.getLogger(__name__)

#: keys that make a Lightning checkpoint a complete training state (weights-only saves lack the middle two)
FULL_STATE_KEYS = ("state_dict", "optimizer_states", "lr_schedulers", "loops", "global_step")


class WeightsOnlyCheckpoint(CheckpointError):
    """A weights-only snapshot was given where a resumable training checkpoint is needed."""


def probe(path: Path) -> int:
    """The global step of a complete training checkpoint at ``path``.

    Raises:
        CheckpointError: unreadable, truncated or unsafe file, or not a Lightning training checkpoint.
        WeightsOnlyCheckpoint: a weights-only snapshot.
    """
    obj = load_checkpoint_file(path, mmap=path.suffix != ".safetensors")
    if not isinstance(obj.get("state_dict"), Mapping) or not isinstance(obj.get("global_step"), int):
        raise CheckpointError(f"{path} is not a Lightning training checkpoint (no state_dict / global_step)")
    missing = [k for k in FULL_STATE_KEYS if k not in obj]
    if "optimizer_states" in missing:
        raise WeightsOnlyCheckpoint(f"{path} is a weights-only snapshot (no optimizer or loop state)")
    if missing:
        raise CheckpointError(f"{path} lacks {missing}; it cannot restore a training run")
    return int(obj["global_step"])


def candidates(logdir: Path) -> list[Path]:
    """Full-state checkpoints of a run directory, newest first."""
    ckptdir = logdir / "checkpoints"
    found = {*logdir.glob("hpc_ckpt_*.ckpt"), *ckptdir.glob("*.ckpt")}
    return sorted((p for p in found if p.is_file()), key=lambda p: (p.stat().st_mtime, p.name), reverse=True)


def pick(logdir: Path) -> tuple[Path, int]:
    """The newest checkpoint of ``logdir`` that restores a training run, and its global step."""
    skipped: list[str] = []
    for path in candidates(logdir):
        try:
            step = probe(path)
        except CheckpointError as e:
            log.warning("resume: skipping %s: %s", path, e)
            skipped.append(f"{path.name}: {e}")
            continue
        if skipped:
            log.warning("resume: using %s (step %d) after skipping %d newer file(s)", path, step, len(skipped))
        return path, step
    if not skipped:
        raise CheckpointError(f"--resume {logdir}: no checkpoints/last.ckpt, checkpoints/*.ckpt or hpc_ckpt_*.ckpt "
                              "in that directory; pass a checkpoint file instead")
    raise CheckpointError(f"--resume {logdir}: no checkpoint there can restore the run ({'; '.join(skipped)})")


def check_file(path: Path, configs: Sequence[Path]) -> int:
    """The global step of the training checkpoint ``path``; a weights-only snapshot gets a how-to message."""
    try:
        return probe(path)
    except WeightsOnlyCheckpoint as e:
        base = " ".join(shlex.quote(str(c)) for c in configs) or "<your config.yaml>"
        raise WeightsOnlyCheckpoint(
            f"--resume {path}: {str(e).split(': ', 1)[-1]}, so it cannot continue a run. To start a new run from its "
            f"weights: python main.py --base {base} --train model.params.ckpt_path={shlex.quote(str(path))}"
        ) from None


def remove_orphans(logdir: Path) -> list[Path]:
    """Delete temp files of interrupted checkpoint saves in the run directory; returns what was removed."""
    ckptdir = logdir / "checkpoints"
    removed = []
    for tmp in orphan_temp_files([logdir, ckptdir, ckptdir / "trainstep_checkpoints"]):
        size = tmp.stat().st_size
        tmp.unlink(missing_ok=True)
        log.warning("removed %s (%.2f GiB), left by a checkpoint save that was interrupted", tmp, size / 2**30)
        removed.append(tmp)
    return removed
