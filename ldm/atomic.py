"""Writing files so that a crash, a kill or a full disk never leaves a partial one where a reader looks.

* :func:`atomic_file` writes a temp file beside the target (``.<name>.<random>.tmp``, created with the permissions
  a plain ``open()`` gives a new file: 0666 minus the umask), fsyncs it and renames it over the target.
  :func:`atomic_torch_save` (training checkpoints through :func:`ldm.checkpoint.atomic_checkpoint_io`,
  ``.ckpt`` exports) and :func:`atomic_safetensors_save` (``.safetensors`` exports) go through it.
* :func:`atomic_directory` does the same for a folder (the diffusers export): a sibling temp folder, renamed into
  place when complete.
* A failed write becomes one line naming the file: :class:`DiskFullError` (ENOSPC/EDQUOT, with the free space
  and a ``hint`` that fits the caller: a training run says "resume with -r", an export does not) or
  :class:`WriteError` (read-only file system, permissions). The temp file is removed; the old target is intact.

Temp files orphaned by a SIGKILL during a save match :data:`ldm.checkpoint.TEMP_GLOB`; a resume removes them.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from ldm.checkpoint import CheckpointError

#: the end of the full-disk message of a training save (an export or other writer passes its own ``hint``)
TRAINING_HINT = "Free space there (README: checkpoint retention and sizes) and resume with -r."


class DiskFullError(CheckpointError):
    """A checkpoint or export could not be written because its file system is full (or over quota)."""


class WriteError(CheckpointError):
    """A checkpoint or export could not be written (read-only or unwritable location, I/O error)."""


def _os_errno(e: BaseException | None) -> int | None:
    """The errno of the first OSError in ``e``'s chain; also read from the text of errors that only quote it
    (torch's zip writer re-raises ENOSPC as RuntimeError 'unexpected pos' with the OSError in ``__context__``;
    safetensors' Rust writer raises ``SafetensorError('... (os error 28)')``)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno is not None:
            return e.errno
        quoted = re.search(r"os error (\d+)", str(e))
        if quoted:
            return int(quoted.group(1))
        e = e.__cause__ or e.__context__
    return None


def _disk_full(e: BaseException) -> bool:
    """True when ``e`` or an exception in its chain is ENOSPC/EDQUOT."""
    return _os_errno(e) in (errno.ENOSPC, errno.EDQUOT)


def write_error(e: BaseException, path: Path, existed: bool, hint: str) -> CheckpointError | None:
    """The one-line error for a failed write of ``path`` (None when ``e`` is not an I/O failure)."""
    kept = f"the previous {path.name} is intact" if existed else "nothing was written there"
    if _disk_full(e):
        st = os.statvfs(path.parent) if path.parent.is_dir() else None
        free = f"{st.f_bavail * st.f_frsize / 2**30:.2f} GiB free" if st else "free space unknown"
        return DiskFullError(f"no space left on device while writing {path.name} in {path.parent} ({free}); "
                             f"{kept}. {hint}".rstrip())
    code = _os_errno(e)
    if code is None:
        return None
    return WriteError(f"cannot write {path}: {os.strerror(code)} ({errno.errorcode.get(code, code)}); {kept}.")


def _temp_name(path: Path, suffix: str = ".tmp") -> Path:
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}{suffix}")


def default_file_mode() -> int:
    """The permissions ``open(path, "w")`` gives a new file: 0666 minus the process umask."""
    try:  # Linux >= 4.7 reports the umask without changing it
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: read it by setting it (and put it straight back)
    os.umask(mask)
    return 0o666 & ~mask


def _new_file(path: Path) -> tuple[int, Path]:
    """Create a temp file beside ``path`` with the permissions ``open(path, "w")`` gives a new file: 0666 minus the
    umask, applied by the kernel. (``tempfile.mkstemp`` and safetensors' writer create 0600, which made the
    checkpoints and exports of a shared run unreadable to teammates whatever their umask.) The file replaced gets
    these permissions too, not its own: a ``chmod`` of ``last.ckpt`` lasts until the next save."""
    while True:
        tmp = _temp_name(path)
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:  # 32 random bits collided; draw again
            continue


def _fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (the rename itself is atomic either way)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some file systems do not open directories; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_file(path: str | Path, hint: str = "") -> Iterator[tuple[int, Path]]:
    """Write a file atomically: yields ``(fd, temp path)`` of a new temp file beside ``path``; the caller writes
    it (through the fd, or by opening the temp path; the permissions are already set). On success the temp file is
    fsynced and renamed over ``path``, so readers see the old file or the whole new one, never a partial one.

    Raises:
        DiskFullError: the file system is full (the temp file is removed, an existing ``path`` untouched).
        WriteError: any other I/O error (read-only file system, permissions), in one line naming ``path``.
    """
    path = Path(path)
    existed = path.exists()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = _new_file(path)
    except OSError as e:
        raise write_error(e, path, existed, hint) from None
    try:
        yield fd, tmp
        os.chmod(tmp, default_file_mode())  # a writer that made its own file (safetensors: 0600) gets open()'s mode
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        error = write_error(e, path, existed, hint)
        if error is not None:
            raise error from None
        raise
    finally:
        try:
            os.close(fd)
        except OSError:  # the caller closed it (os.fdopen owns it)
            pass


@contextmanager
def atomic_directory(path: str | Path, hint: str = "") -> Iterator[Path]:
    """Write a folder atomically: yields a new sibling temp folder (``.<name>.<random>.tmp``) for the caller to
    fill; on success every file in it is fsynced and it is renamed to ``path``. An existing ``path`` is first
    renamed aside and deleted after the swap, so ``path`` holds the old folder or the whole new one (a kill between
    the two renames leaves the old folder as ``.<name>.<random>.old`` beside it, never a half-written ``path``).

    Raises:
        DiskFullError / WriteError: as :func:`atomic_file`; the temp folder is removed, ``path`` left untouched.
    """
    path = Path(path)
    existed = path.exists()
    if existed and not path.is_dir():
        raise WriteError(f"{path} exists and is not a folder; choose another output folder")
    tmp = _temp_name(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir(0o777)  # the umask applies, as for a plain mkdir (mkdtemp would make it 0700)
    except OSError as e:
        raise write_error(e, path, existed, hint) from None
    try:
        yield tmp
        mode = default_file_mode()
        for f in sorted(tmp.rglob("*")):
            if f.is_file():
                os.chmod(f, mode)  # safetensors writes its files 0600
                with open(f, "rb+") as fh:
                    os.fsync(fh.fileno())
        old = _temp_name(path, ".old") if existed else None
        if old is not None:
            os.rename(path, old)
        try:
            os.rename(tmp, path)
        except BaseException:
            if old is not None:
                os.rename(old, path)
            raise
        _fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        error = write_error(e, path, existed, hint)
        if error is not None:
            raise error from None
        raise


def atomic_torch_save(obj: Any, path: str | Path, hint: str = TRAINING_HINT) -> None:
    """``torch.save`` through :func:`atomic_file`: a crash or kill at any point leaves either the old file or the new
    one, never a truncated file (a SIGKILL can leave a temp file; see :data:`TEMP_GLOB`). Unlike Lightning's default
    it streams to disk instead of building the whole checkpoint in memory first, which matters for a 1.3B-parameter
    model with optimizer and EMA state. ``hint`` ends the full-disk message (what to do in the caller's context).

    Raises:
        DiskFullError: the file system ran out of space (the old file is untouched, the temp file removed).
        WriteError: the file could not be written for another I/O reason.
    """
    with atomic_file(path, hint) as (fd, _tmp), os.fdopen(os.dup(fd), "wb") as f:
        torch.save(obj, f)
        f.flush()


def atomic_safetensors_save(tensors: Mapping[str, torch.Tensor], path: str | Path, metadata: Mapping[str, str],
                            hint: str = "") -> None:
    """``safetensors.torch.save_file`` through :func:`atomic_file` (same guarantees and errors)."""
    from safetensors.torch import save_file

    with atomic_file(path, hint) as (_fd, tmp):
        save_file(dict(tensors), str(tmp), metadata=dict(metadata))
