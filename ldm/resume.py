"""Choosing the checkpoint a ``-r`` resume starts from, and tidying the run directory for the resumed attempt.

* ``-r <run dir>``: the candidates are ``checkpoints/last.ckpt``, SLURM's ``hpc_ckpt_<n>.ckpt`` in the run dir
  and the periodic full-state ``checkpoints/*.ckpt``. Each is probed -- read with ``weights_only=True`` and its
  tensors memory-mapped, so a multi-GB file costs milliseconds -- and ranked by the global step it records, then by
  its recorded save time (``provenance.saved_at``; the file time for older files). File times alone would be
  wrong after ``cp -r``, ``rsync`` without ``-t`` or an object-store sync, which give every copy the time of the
  copy. The best-ranked candidate whose bytes match its checksums (:mod:`ldm.integrity`) wins; a skipped file is
  logged at WARNING with its step and the reason, and when none can restore the run one
  :class:`~ldm.checkpoint.CheckpointError` line lists them all.
* ``-r <file>``: that file must be a complete, undamaged training checkpoint. A weights-only snapshot
  (``trainstep_checkpoints/``) has no optimizer or loop state; the error says how to start a new run from it.
* :func:`supersede`: a resume from step S makes every checkpoint of the run recording a step above S the record of
  an abandoned attempt (a damaged newer file was skipped, or an older file was chosen on purpose). Those files are
  moved to ``checkpoints/superseded/<time>/``, never overwritten by the new attempt's saves of the same steps and
  never picked by a later ``-r`` over the new attempt's files.
* :func:`remove_orphans` deletes the temp files that a kill during a save leaves behind (``.last.ckpt.*.tmp``,
  each as large as a checkpoint), logging each one.

Only global rank 0 verifies checksums and changes files; the file every rank restores is rank 0's choice
(:func:`ldm.checkpoint.rank_zero_choice`).
"""

from __future__ import annotations

import logging
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ldm.checkpoint import CheckpointError, load_checkpoint_file, orphan_temp_files, verify_file
from ldm.runlock import RunLock

log = logging.getLogger(__name__)

#: keys that make a Lightning checkpoint a complete training state (weights-only saves lack the middle two)
FULL_STATE_KEYS = ("state_dict", "optimizer_states", "lr_schedulers", "loops", "global_step")
#: where :func:`supersede` moves the files of an abandoned attempt (inside ``checkpoints/``)
SUPERSEDED = "superseded"


class WeightsOnlyCheckpoint(CheckpointError):
    """A weights-only snapshot was given where a resumable training checkpoint is needed."""


@dataclass(frozen=True)
class Candidate:
    """A full-state checkpoint file and what it records.

    Args:
        path: the file.
        step: its global step.
        saved_at: its recorded save time (``provenance.saved_at``), else its modification time.
    """

    path: Path
    step: int
    saved_at: float

    @property
    def rank(self) -> tuple[int, float, str]:
        return self.step, self.saved_at, self.path.name


def _saved_at(obj: Mapping[str, Any], path: Path) -> float:
    prov = obj.get("provenance")
    value = prov.get("saved_at") if isinstance(prov, Mapping) else None
    return float(value) if isinstance(value, (int, float)) else path.stat().st_mtime


def inspect(path: Path) -> Candidate:
    """Probe a full-state training checkpoint (memory-mapped: milliseconds, whatever its size).

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
    return Candidate(path, int(obj["global_step"]), _saved_at(obj, path))


def probe(path: Path) -> int:
    """The global step of a complete training checkpoint at ``path`` (see :func:`inspect`)."""
    return inspect(path).step


def recorded_step(path: Path) -> tuple[int, float, bool] | None:
    """``(global step, save time, full state?)`` of any Lightning checkpoint, full-state or weights-only (memory-
    mapped); None when the file is unreadable or records no step."""
    try:
        obj = load_checkpoint_file(path, mmap=True)
    except CheckpointError:
        return None
    step = obj.get("global_step")
    if not isinstance(step, int):
        return None
    return step, _saved_at(obj, path), all(k in obj for k in FULL_STATE_KEYS)


def candidate_files(logdir: Path) -> list[Path]:
    """Full-state checkpoint files of a run directory (``last.ckpt``, periodic files, ``hpc_ckpt_*``)."""
    ckptdir = logdir / "checkpoints"
    found = {*logdir.glob("hpc_ckpt_*.ckpt"), *ckptdir.glob("*.ckpt")}
    return sorted(p for p in found if p.is_file())


def pick(logdir: Path, verify: bool = True) -> tuple[Path, int]:
    """The checkpoint of ``logdir`` with the highest recorded step that restores a training run, and its step.

    Args:
        logdir: the run directory.
        verify: check the chosen file's checksums, falling back to the next candidate when they fail (rank 0 does;
            the other ranks restore rank 0's choice).
    """
    skipped: list[str] = []
    ranked: list[Candidate] = []
    for path in candidate_files(logdir):
        try:
            ranked.append(inspect(path))
        except CheckpointError as e:
            log.warning("resume: skipping %s: %s", path, e)
            skipped.append(f"{path.name}: {e}")
    ranked.sort(key=lambda c: c.rank, reverse=True)
    higher: list[str] = []
    for cand in ranked:
        if verify:
            try:
                verify_file(cand.path)
            except CheckpointError as e:
                log.warning("resume: skipping %s (step %d): %s", cand.path, cand.step, e)
                skipped.append(f"{cand.path.name} (step {cand.step}): {e}")
                higher.append(f"{cand.path.name} (step {cand.step})")
                continue
        if skipped:
            log.warning("resume: using %s (step %d) after skipping %d file(s)%s", cand.path, cand.step, len(skipped),
                        f"; damaged, ranked above it: {', '.join(higher)}" if higher else "")
        bad = set(higher)
        others = ", ".join(f"{c.path.name} (step {c.step})" for c in ranked
                           if c is not cand and f"{c.path.name} (step {c.step})" not in bad)
        log.info("resume: chose %s: step %d, the highest global step recorded in the run's checkpoints (file times "
                 "are not used)%s", cand.path, cand.step, f"; the others: {others}" if others else "")
        return cand.path, cand.step
    if not skipped:
        raise CheckpointError(f"--resume {logdir}: no checkpoints/last.ckpt, checkpoints/*.ckpt or hpc_ckpt_*.ckpt "
                              "in that directory; pass a checkpoint file instead")
    raise CheckpointError(f"--resume {logdir}: no checkpoint there can restore the run ({'; '.join(skipped)})")


def resume_from(logdir: Path, path: Path, configs: Sequence[Path], stamp: str, owner: bool,
                break_lock: bool) -> tuple[Path, int, RunLock | None]:
    """The checkpoint (and its step) that ``-r <path>`` continues the run ``logdir`` from.

    The owner (global rank 0 of a training launch) first takes the run lock (:mod:`ldm.runlock`; released again
    if anything below fails), removes temp files of interrupted saves, verifies checksums and moves the abandoned
    attempt's newer checkpoints aside (:func:`supersede`); other ranks only read, and restore rank 0's choice.
    """
    lock = RunLock(logdir, break_lock) if owner else None
    try:
        if owner:
            remove_orphans(logdir)
        if path.is_file():
            ckpt, step = path, check_file(path, configs, verify=owner)
        else:
            ckpt, step = pick(logdir, verify=owner)
        if owner:
            supersede(logdir, ckpt, step, stamp)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return ckpt, step, lock

def check_file(path: Path, configs: Sequence[Path], verify: bool = True) -> int:
    """The global step of the training checkpoint ``path``; a weights-only snapshot gets a how-to message."""
    try:
        step = probe(path)
    except WeightsOnlyCheckpoint as e:
        base = " ".join(shlex.quote(str(c)) for c in configs) or "<your config.yaml>"
        raise WeightsOnlyCheckpoint(
            f"--resume {path}: {str(e).split(': ', 1)[-1]}, so it cannot continue a run. To start a new run from its "
            f"weights: python main.py --base {base} --train model.params.ckpt_path={shlex.quote(str(path))}"
        ) from None
    if verify:
        verify_file(path)
    return step


def supersede(logdir: Path, resume_ckpt: Path, step: int, stamp: str) -> list[Path]:
    """Move every checkpoint of the run recording a step above ``step`` (except ``resume_ckpt``) to
    ``checkpoints/superseded/<stamp>/``; returns the new paths. Unreadable files stay where they are."""
    ckptdir = logdir / "checkpoints"
    files = [*candidate_files(logdir), *sorted((ckptdir / "trainstep_checkpoints").glob("*.ckpt"))]
    dest_root = ckptdir / SUPERSEDED / stamp
    moved, size = [], 0
    for path in files:
        if path.resolve() == resume_ckpt.resolve():
            continue
        record = recorded_step(path)
        if record is None or record[0] <= step:
            continue
        rel = path.relative_to(ckptdir) if ckptdir in path.parents else Path(path.name)
        dest = dest_root / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        size += path.stat().st_size
        path.rename(dest)
        moved.append(dest)
    if moved:
        log.warning("resume: the run continues from step %d; %d checkpoint(s) of the abandoned attempt beyond it "
                    "(%s; %.2f GiB) were moved to %s so that no save of this attempt overwrites them and no later -r "
                    "picks them. Delete that directory when you no longer need them.", step, len(moved),
                    ", ".join(str(p.relative_to(dest_root)) for p in moved[:6]) + (" ..." if len(moved) > 6 else ""),
                    size / 2**30, dest_root)
    return moved


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
