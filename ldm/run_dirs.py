"""Run directories: where a run lives, how ``-r`` finds and re-enters one, and what a resume records.

Layout of a run: ``<logdir>/<YYYY-mm-ddTHH-MM-SS>_<name>/`` with ``configs/`` (resolved project and
lightning yaml; each resume adds its own under ``configs/resumes/``), ``checkpoints/`` (``last.ckpt``, step
checkpoints, ``trainstep_checkpoints/`` weights-only snapshots), ``images/`` (ImageLogger grids), the
CSV/TensorBoard/wandb logs and ``run.lock`` while a process trains in it (DECISIONS R8).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ldm.callbacks.rundir import RESUMES
from ldm.resume import resume_from
from ldm.runlock import RunLock
from ldm.util import ConfigError, load_config

log = logging.getLogger(__name__)


@dataclass
class RunDirs:
    """Where a run lives and, for a resume, what it starts from.

    Args:
        logdir: run directory.
        ckptdir: checkpoint directory (``<logdir>/checkpoints``).
        cfgdir: config directory (``<logdir>/configs``).
        nowname: run name (the directory's name).
        resume_ckpt: the checkpoint a resume starts from (None for a new run).
        resume_configs: the run's saved yaml files (a resume merges them first).
        resume_step: global step of ``resume_ckpt``.
        inherited: changes to the run's config made by earlier resumes and inherited by this one (for the log).
        lock: the run-directory lock this process holds (global rank 0 of ``main.py``), else None.
    """

    logdir: Path
    ckptdir: Path
    cfgdir: Path
    nowname: str
    resume_ckpt: Path | None
    resume_configs: list[Path]
    resume_step: int | None = None
    inherited: list[str] = field(default_factory=list)
    lock: RunLock | None = None


def resolve_run_dirs(now: str, logroot: str, name: str | None, postfix: str, base: list[str],
                     resume: str | None, owner: bool = False, break_lock: bool = False,
                     check_config: Callable[[list[Path]], None] | None = None) -> RunDirs:
    """New run: ``<logroot>/<now>_<name or first config stem><postfix>``. Resume: a run dir (its checkpoint with the
    highest step that loads, see :mod:`ldm.resume`) or a checkpoint file.

    Args:
        owner: this process owns the run directory (global rank 0 of a training launch). On resume it takes the
            run lock (:mod:`ldm.runlock`) first, then verifies the resume checkpoint's checksums, removes temp files of
            interrupted saves and moves the abandoned attempt's newer checkpoints aside. Other ranks only read.
        break_lock: take over the run lock even when its holder may be alive (``--break-lock``).
        check_config: called with a resume's config files before the run is locked and its checkpoints are read
            and verified (minutes for full-size checkpoints), so a mistyped override is said at once.

    A new run's directory is locked by ``main.py`` right before training starts (nothing exists before).
    """
    if resume:
        path = Path(resume)
        if not path.exists():
            raise ConfigError(f"--resume {resume}: no such run directory or checkpoint")
        if path.is_file():
            # <logdir>/checkpoints/x.ckpt, <logdir>/checkpoints/trainstep_checkpoints/x.ckpt or <logdir>/hpc_ckpt_n
            logdir = next((p.parent for p in path.parents if p.name == "checkpoints"), path.parent)
        else:
            logdir = path
        configs, inherited = resume_configs(logdir / "configs")
        if check_config is not None:
            check_config(configs)
        check_writable(logdir)
        ckpt, step, lock = resume_from(logdir, path, configs, now, owner, break_lock)
        log.info("resuming %s from %s (step %d)", logdir, ckpt, step)
        return RunDirs(logdir, logdir / "checkpoints", logdir / "configs", logdir.name, ckpt, configs, step, inherited,
                       lock)
    stem = name or (Path(base[0]).stem if base else "run")
    nowname = f"{now}_{stem}{postfix}"
    logdir = Path(logroot) / nowname
    check_writable(logdir)
    return RunDirs(logdir, logdir / "checkpoints", logdir / "configs", nowname, None, [])


def resume_configs(cfgdir: Path) -> tuple[list[Path], list[str]]:
    """The yaml files a resume starts from, and the changes earlier resumes made to the run's config.

    ``configs/<start>-{project,lightning}.yaml`` are the run's config as it was started; no resume rewrites them.
    Each resume that trains records its resolved config in ``configs/resumes/<time>-{project,lightning}.yaml``
    (and the command line and changes in ``<time>-overrides.yaml``). A resume starts from the newest of those, so
    a change made on the command line of one resume (a longer ``max_steps``, a lower learning rate) survives a
    preemption whose requeue runs a plain ``-r``; what it inherits that way is listed in one log line. To go back
    to the run's own config, delete ``configs/resumes/`` (the records are then lost) or override the keys.
    """
    base = sorted(cfgdir.glob("*.yaml"))
    projects = sorted((cfgdir / RESUMES).glob("*-project.yaml"))
    if not projects:
        return base, []
    stamp = projects[-1].name[: -len("-project.yaml")]
    latest = [p for p in (projects[-1], cfgdir / RESUMES / f"{stamp}-lightning.yaml") if p.is_file()]
    return latest, config_changes(load_config(base), load_config(latest)) if base else []


#: keys that differ between a run's config and its resumes by construction (a resume never loads ckpt_path)
NOT_CHANGES = ("model.params.ckpt_path",)
_UNSET = object()


def _short(value: Any) -> str:
    text = "<unset>" if value is _UNSET else "{...}" if isinstance(value, dict) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _diff(a: Any, b: Any, key: str) -> Iterator[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(a.keys() | b.keys(), key=str):
            yield from _diff(a.get(k, _UNSET), b.get(k, _UNSET), f"{key}.{k}" if key else str(k))
    elif a != b and key not in NOT_CHANGES:
        yield f"{key}: {_short(a)} -> {_short(b)}"


def config_changes(before: DictConfig, after: DictConfig) -> list[str]:
    """``key: old -> new`` for every setting that differs (``<unset>`` for an added or deleted key, ``{...}`` for
    a section)."""
    return list(_diff(*(OmegaConf.to_container(c, resolve=False) for c in (before, after)), ""))


def resume_has_steps_left(dirs: RunDirs, lightning_cfg: DictConfig) -> bool:
    """Whether a resume has steps to train: False when the checkpoint already reached ``max_steps`` (logged).

    Lightning would rebuild everything, print "max_steps reached" and exit; a finished run resumed again (a
    requeued job, a re-run script) is not an error, so the caller exits 0 after one line saying so.

    Raises:
        ConfigError: ``max_steps`` below the checkpoint's step: a run cannot train back to an earlier step.
    """
    max_steps = OmegaConf.select(lightning_cfg, "trainer.max_steps", default=-1)
    if dirs.resume_step is None or max_steps is None or int(max_steps) < 0:
        return True
    max_steps, step = int(max_steps), dirs.resume_step
    if max_steps < step:
        raise ConfigError(f"lightning.trainer.max_steps={max_steps} is below the step of the resume checkpoint "
                          f"{dirs.resume_ckpt} ({step}): a run cannot train back to an earlier step. Pass "
                          f"lightning.trainer.max_steps=N with N > {step} to train further, or use an earlier "
                          "checkpoint's weights in a new run (model.params.ckpt_path=...).")
    if max_steps == step:
        log.warning("the run is complete: %s is at step %d = lightning.trainer.max_steps; nothing to train. To "
                    "train longer: python main.py -r %s --train lightning.trainer.max_steps=N (N > %d)",
                    dirs.resume_ckpt, step, dirs.logdir, step)
        return False
    return True


def probe_write(folder: Path) -> None:
    """Create and delete a temp file in ``folder``; the ``OSError`` of a folder that refuses new files (read-only
    file system, permissions, full disk). ``os.access`` would miss a full disk and some read-only mounts."""
    with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-probe-"):
        pass


def check_writable(logdir: Path) -> None:
    """Fail in one line, before anything is built, when the run directory cannot take new files.

    A resume writes into the run directory and its sub-folders (checkpoints, configs, CSV/TensorBoard version
    folders, images), so each existing one up to two levels down is probed by creating and deleting a temp file;
    for a new run, the nearest existing folder above it. Without this a read-only mount failed after the model was
    built, with a traceback from the CSV logger.

    Raises:
        ConfigError: a folder that refuses a new file (read-only file system, permissions, full disk).
    """
    if logdir.exists():
        folders = [logdir, *(d for d in logdir.glob("*") if d.is_dir()), *(d for d in logdir.glob("*/*") if d.is_dir())]
    else:
        folders = [next(p for p in logdir.parents if p.exists())]
    for folder in folders:
        try:
            probe_write(folder)
        except OSError as e:
            what = "the run directory" if logdir.exists() else f"the folder that would hold the run {logdir.name}"
            raise ConfigError(f"cannot write to {folder} ({e.strerror}): {what} must be writable (checkpoints, "
                              "configs and logs go there). Remount it read-write, fix its permissions, or "
                              f"{'copy the run elsewhere and resume the copy' if logdir.exists() else 'pass -l DIR'}"
                              ".") from None
