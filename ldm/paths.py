"""Where the scripts write: output folders that must be folders, and files that are never overwritten by accident.

Every check here is cheap (no file is read beyond a checkpoint's key list), so scripts run them before loading a
model, and a wrong path costs the user one line (``ValueError``) instead of a traceback after minutes of work.

* :func:`output_folder`: a folder to create or reuse; an existing *file* there (or on the way there) is an error.
* :func:`refuse_existing`: outputs that exist already are kept unless the user passed ``--overwrite``.
* :func:`export_file` / :func:`export_folder`: an export never overwrites its own input or a resumable training
  checkpoint (data that cannot be rebuilt), and replaces an earlier export only with ``--overwrite``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from ldm.checkpoint import CheckpointError

#: file types an official-layout export can be written as (``ldm.interop.ldm_format.save_ldm_checkpoint``)
EXPORT_SUFFIXES = (".safetensors", ".ckpt", ".pt")

__all__ = ["EXPORT_SUFFIXES", "export_file", "export_folder", "output_folder", "refuse_existing"]


def output_folder(path: str | Path, flag: str = "--out",
                  input_folders: Mapping[str, str | Path | None] | None = None) -> Path:
    """``path`` as a folder to write into (created later by the writer); ``ValueError`` when it, or a folder on
    the way to it, is an existing file, or when the nearest existing folder cannot be written (read-only file
    system, permissions): said here, before a model is loaded, not as a traceback at the first image.

    ``input_folders`` (flag -> folder; ``None`` values are skipped): folders whose files (not subfolders: both
    readers, ``find_pairs`` and ``ldm.eval.data.load_folder``, list a folder's own files) the run reads. The
    output may not be one of them, since the next run would read the outputs as inputs; a subfolder such as
    ``photos/out`` is never read, so it is allowed. Compared after resolving symlinks and relative paths.
    """
    path = Path(path)
    for in_flag, folder in (input_folders or {}).items():
        if folder is None or not Path(folder).is_dir():
            continue
        if path.resolve() == Path(folder).resolve():
            raise ValueError(f"{flag} {path} is {in_flag} {folder}: the outputs would be read as inputs by the next "
                             f"run; choose another folder (a subfolder of {folder} is fine)")
    for part in (path, *path.parents):
        if part.exists() and not part.is_dir():
            where = "" if part == path else f" ({part} is a file)"
            raise ValueError(f"{flag} {path} is not a folder{where}; pass a folder (it is created if missing)")
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):  # access() reports EROFS even as root
        raise ValueError(f"{flag} {path}: {existing} cannot be written (read-only file system or no permission); "
                         "choose another folder")
    return path


def refuse_existing(paths: Sequence[Path], overwrite: bool, what: str = "output") -> None:
    """``ValueError`` listing the first existing ``paths`` unless ``overwrite``."""
    existing = [p for p in paths if p.exists()]
    if existing and not overwrite:
        more = f" and {len(existing) - 3} more" if len(existing) > 3 else ""
        shown = ", ".join(str(p) for p in existing[:3]) + more
        raise ValueError(f"{len(existing)} {what} file(s) exist already ({shown}); pass --overwrite to replace them, "
                         "or choose another --out")


def _same(a: Path, b: Path) -> bool:
    return a.exists() and b.exists() and a.samefile(b)  # also through symlinks and hard links


def _is_training_checkpoint(path: Path) -> bool:
    """True for a resumable Lightning checkpoint (optimizer and loop state); never raises."""
    from ldm.resume import probe

    try:
        probe(path)
    except CheckpointError:
        return False
    return True


def export_file(out: str | Path, source: str | Path, overwrite: bool, flag: str = "--out") -> Path:
    """The file an export may write to.

    Raises:
        ValueError: ``out`` has another suffix than :data:`EXPORT_SUFFIXES`, is the input checkpoint, a folder,
            or a resumable training checkpoint (always refused: a training state cannot be rebuilt from an export),
            or another existing file without ``overwrite``.
    """
    out, source = Path(out), Path(source)
    if out.suffix not in EXPORT_SUFFIXES:
        raise ValueError(f"{flag} {out}: use a .safetensors or .ckpt file name")
    if _same(out, source):
        raise ValueError(f"{flag} {out} is the input checkpoint; an export never overwrites its input. Choose "
                         "another file name")
    output_folder(out.parent, f"{flag} {out}: its folder")
    if out.is_dir():
        raise ValueError(f"{flag} {out} is a folder; pass a file name ending in .safetensors or .ckpt")
    if out.exists():
        if out.suffix != ".safetensors" and _is_training_checkpoint(out):
            raise ValueError(f"{flag} {out} is a resumable training checkpoint; an export never replaces one "
                             "(it would lose the optimizer and loop state). Choose another file name")
        if not overwrite:
            raise ValueError(f"{flag} {out} exists already; pass --overwrite to replace it, or choose another name")
    return out


def export_folder(out: str | Path, source: str | Path, overwrite: bool, flag: str = "--diffusers") -> Path:
    """The folder a diffusers export may write to: not a file, not holding the input, and a non-empty existing
    folder only with ``overwrite`` and only when it is an earlier export (it is replaced whole)."""
    out, source = Path(out), Path(source)
    output_folder(out, flag)
    if out.is_dir():
        if source.exists() and out.resolve() in source.resolve().parents:
            raise ValueError(f"{flag} {out} holds the input checkpoint {source}; choose another folder")
        # a folder --overwrite may not replace is named as such first, so no message suggests a flag that fails
        if any(out.iterdir()) and not (out / "model_index.json").is_file():
            raise ValueError(f"{flag} {out} exists and is not a diffusers pipeline (no model_index.json); an export "
                             "replaces its folder whole, so choose a new or empty folder")
        if any(out.iterdir()) and not overwrite:
            raise ValueError(f"{flag} {out} holds an earlier diffusers export; pass --overwrite to replace it, or "
                             "choose another folder")
    return out
