"""One training process per run directory: the ``run.lock`` file.

Two jobs writing one run directory (a ``-r`` started while the run is still alive, a requeue racing a job that has
not finished) resume from each other's ``last.ckpt``, overwrite each other's checkpoints and interleave their logs.
Global rank 0 therefore holds ``<run dir>/run.lock`` while it trains: a small JSON file naming the host, the
process id and its start time, the boot id of the host and the launcher's job id (SLURM, torchelastic). It is
created atomically (hard link of a complete temp file, or ``O_EXCL`` where links are not supported), so exactly one
of two racing processes gets it, and removed when the process ends.

A lock found at start is taken over, with a WARNING naming its holder, when its holder is certainly gone:

* same host (same boot): the process id is no longer running, or now belongs to a process started later;
* same launcher job (``SLURM_JOB_ID``, or torchelastic's ``TORCHELASTIC_RUN_ID``) with a higher restart count:
  SLURM and torchelastic start an incarnation only after the previous one has ended.

Any other lock -- a live process, or a process on another host that cannot be checked -- stops the start with one
line and exit code 2. ``--break-lock`` takes it over anyway: only for a holder you know is dead (a node that
crashed), never to run two jobs on one directory.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import socket
import uuid
from pathlib import Path
from typing import Any

from ldm.util import ConfigError

log = logging.getLogger(__name__)

LOCK_NAME = "run.lock"
#: environment variables that name a process's place in a multi-process launch; global rank 0 has 0 in each set one
RANK_VARIABLES = ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK")


class RunDirLocked(ConfigError):
    """Another live (or uncheckable) process holds the run directory."""


def is_launch_rank_zero() -> bool:
    """Whether this process is global rank 0, from the launcher's environment (before any process group exists).

    torchrun sets ``RANK``; ``srun`` sets ``SLURM_PROCID``; Lightning's own launcher starts the other local ranks
    with ``LOCAL_RANK``/``NODE_RANK``. A process without any of them is a single-process run (rank 0).
    """
    for name in RANK_VARIABLES:
        value = os.environ.get(name, "").strip()
        if value and value != "0":
            return False
    return True


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _process_start(pid: int) -> str | None:
    """The start time of ``pid`` in clock ticks since boot (``/proc/<pid>/stat`` field 22), None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # fields after the command name; field 22 overall


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _launch() -> dict[str, str | None]:
    """The launcher's job id and restart count: ``(SLURM_JOB_ID, SLURM_RESTART_COUNT)``, else torchelastic's."""
    slurm = os.environ.get("SLURM_ARRAY_JOB_ID") and f"{os.environ['SLURM_ARRAY_JOB_ID']}_" \
        f"{os.environ.get('SLURM_ARRAY_TASK_ID', '')}" or os.environ.get("SLURM_JOB_ID")
    if slurm:
        return {"job": f"slurm:{slurm}", "restart": os.environ.get("SLURM_RESTART_COUNT", "0")}
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if run_id and run_id != "none":  # torchrun's default id for static launches names nothing
        return {"job": f"torchelastic:{run_id}", "restart": os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")}
    return {"job": None, "restart": None}


def _describe(info: dict[str, Any]) -> str:
    job = f", job {info['job']} (restart {info.get('restart')})" if info.get("job") else ""
    return f"pid {info.get('pid')} on {info.get('host')}, started {info.get('started')}{job}"


def _gone(info: dict[str, Any], mine: dict[str, Any]) -> str | None:
    """Why the holder of ``info`` is certainly not running any more, or None when it may be."""
    if info.get("job") and info.get("job") == mine.get("job"):
        try:
            if int(mine["restart"]) > int(info.get("restart", -1)):
                return f"this is restart {mine['restart']} of the same launcher job"
        except (TypeError, ValueError):
            pass
    if info.get("host") != mine["host"]:
        return None
    if info.get("boot_id") and mine.get("boot_id") and info["boot_id"] != mine["boot_id"]:
        return "the host has rebooted since"
    pid = info.get("pid")
    if not isinstance(pid, int):
        return None
    if not _alive(pid):
        return f"process {pid} is no longer running"
    started = _process_start(pid)
    if info.get("pid_start") and started and started != info["pid_start"]:
        return f"process id {pid} now belongs to another process"
    return None


class RunLock:
    """The lock of one run directory, held by this process (see the module docstring).

    Args:
        logdir: the run directory (created if missing).
        break_lock: take over a lock whose holder may be alive (``--break-lock``).
    """

    def __init__(self, logdir: Path, break_lock: bool = False) -> None:
        self.path = Path(logdir) / LOCK_NAME
        self.info: dict[str, Any] = {
            "host": socket.gethostname(), "pid": os.getpid(), "pid_start": _process_start(os.getpid()),
            "boot_id": _boot_id(), "started": datetime.datetime.now().isoformat(timespec="seconds"),
            "token": uuid.uuid4().hex, **_launch()}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a holder that releases between our attempts: try again
            if self._create():
                return
            found = self._read()
            if found is None:
                continue
            reason = _gone(found, self.info)
            if reason is None and not break_lock:
                raise RunDirLocked(
                    f"{self.path}: the run directory is in use by {_describe(found)}. Wait for that job to end (or "
                    "stop it); if you are sure it is dead (its node crashed), start again with --break-lock.")
            log.warning("%s: taking over the lock of %s: %s", self.path, _describe(found),
                        reason or "--break-lock given")
            self._remove_if(found)
        raise RunDirLocked(f"{self.path}: could not take the lock (other processes keep taking it); is another job "
                           "starting on this run directory?")

    def _create(self) -> bool:
        tmp = self.path.with_name(f".{LOCK_NAME}.{self.info['token']}")
        tmp.write_text(json.dumps(self.info, indent=1) + "\n")
        try:
            os.link(tmp, self.path)  # atomic and complete: a reader never sees a half-written lock
            return True
        except FileExistsError:
            return False
        except OSError:  # no hard links on this file system: exclusive create, then write
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as f:
                f.write(tmp.read_text())
            return True
        finally:
            tmp.unlink(missing_ok=True)

    def _read(self) -> dict[str, Any] | None:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        try:
            info = json.loads(text)
        except json.JSONDecodeError:
            info = None
        return info if isinstance(info, dict) else {"host": "?", "pid": None, "started": "?"}

    def _remove_if(self, expected: dict[str, Any]) -> None:
        """Remove the lock file if it still holds ``expected``: rename it away first, so that of two processes
        taking over the same stale lock only one removes it, and a lock created meanwhile is put back."""
        aside = self.path.with_name(f".{LOCK_NAME}.stale.{self.info['token']}")
        try:
            self.path.rename(aside)
        except FileNotFoundError:
            return
        try:
            if json.loads(aside.read_text() or "null") != expected and expected.get("host") != "?":
                os.link(aside, self.path)  # someone else's fresh lock: restore it (fails if yet another exists)
        except (OSError, json.JSONDecodeError):
            pass
        finally:
            aside.unlink(missing_ok=True)

    def release(self) -> None:
        """Remove the lock if it is still ours (idempotent)."""
        found = self._read()
        if found is not None and found.get("token") == self.info["token"]:
            self.path.unlink(missing_ok=True)
