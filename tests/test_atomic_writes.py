"""Writing files: exports are atomic and one line on a full disk, a read-only run directory is one line at start-up,
atomic writes get the permissions a plain open() would, and the evaluation hash cache sees a replaced checkpoint."""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
import subprocess
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

import main
from ldm.atomic import DiskFullError, WriteError, atomic_directory, atomic_safetensors_save, atomic_torch_save
from tests.helpers import CAN_MOUNT, REPO, build_tiny, limited_disk, mount_tmpfs, tiny_config

TINY = str(REPO / "configs/tiny/inpaint.yaml")


@pytest.fixture
def full_disk(tmp_path, monkeypatch):
    """A folder on a file system that holds 8 MiB (``tests.helpers.limited_disk``): the tiny diffusers export's
    configs and UNet fit, its VAE does not; every single-file export of the tiny model (17 MB) is too large."""
    yield from limited_disk(tmp_path / "disk", 8 * 2**20, monkeypatch)


@pytest.fixture
def read_only(tmp_path, monkeypatch):
    """A folder holding a run directory (``run/checkpoints``, ``run/csv/version_0``) that refuses new files.

    Root: a tmpfs mounted read-only (EROFS), where mounting is allowed; any other user: ``chmod 0555`` (EACCES).
    Root without mount rights (permissions do not bind root): creating a file there is made to fail with EROFS
    in ``tempfile``'s probe, the only writer that runs before the error.
    """
    ro = tmp_path / "ro"
    ro.mkdir()
    mounted = mount_tmpfs(ro, "size=1m")
    for sub in ("run/checkpoints", "run/csv/version_0"):
        (ro / sub).mkdir(parents=True)
    if mounted:
        subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
        yield ro
        subprocess.run(["umount", "-l", str(ro)], capture_output=True)
        return
    if os.geteuid() != 0:
        for d in (ro / "run/csv/version_0", ro / "run/csv", ro / "run/checkpoints", ro / "run", ro):
            d.chmod(0o555)
        yield ro
        for d in (ro, ro / "run", ro / "run/checkpoints", ro / "run/csv", ro / "run/csv/version_0"):
            d.chmod(0o755)
        return
    import tempfile

    real = tempfile.NamedTemporaryFile

    def refuse(*args, dir=None, **kwargs):
        if dir is not None and str(dir).startswith(str(ro)):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(dir))
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", refuse)
    real_access = os.access

    def access(path, mode, *args, **kwargs):  # what access(2) says of a read-only file system
        if mode & os.W_OK and str(path).startswith(str(ro)):
            return False
        return real_access(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)
    yield ro


@pytest.fixture(scope="module")
def official():
    """The tiny model's state dict in the official inference layout, and its model config."""
    from ldm.interop.ldm_format import select_weights

    sd, _ = select_weights(build_tiny().state_dict())
    return sd, OmegaConf.to_container(tiny_config().model, resolve=True)


# --------------------------------------------------------------------------------------------- full disk
@pytest.mark.parametrize("kind", ["x.safetensors", "x.ckpt", "diffusers"])
def test_export_on_a_full_disk_is_one_line_and_keeps_the_old_export(full_disk, official, kind):
    from ldm.interop.diffusers_export import export_diffusers
    from ldm.interop.ldm_format import save_ldm_checkpoint

    sd, model_cfg = official
    target = full_disk / kind
    if kind == "diffusers":
        target.mkdir()
        (target / "model_index.json").write_text('{"old": 1}')
    else:
        target.write_bytes(b"the previous export")
    before = sorted(p.relative_to(full_disk) for p in full_disk.rglob("*"))
    with pytest.raises(DiskFullError) as info:
        if kind == "diffusers":
            export_diffusers(sd, model_cfg, target)
        else:
            save_ldm_checkpoint(sd, target, "v")
    message = str(info.value)
    assert message.startswith(f"no space left on device while writing {target.name} in {full_disk} (")
    assert f"the previous {target.name} is intact" in message and "export to another location" in message
    assert "resume" not in message and "\n" not in message  # an export has nothing to resume
    # nothing half-written: no temp file or folder, no UNet without its VAE, the old export as it was
    assert sorted(p.relative_to(full_disk) for p in full_disk.rglob("*")) == before
    if kind == "diffusers":
        assert json.loads((target / "model_index.json").read_text()) == {"old": 1}
    else:
        assert target.read_bytes() == b"the previous export"


def test_a_training_save_on_a_full_disk_says_how_to_resume(full_disk):
    with pytest.raises(DiskFullError, match=r"nothing was written there\. Free space there .* "
                                            r"resume with -r\.$"):
        atomic_torch_save({"w": torch.zeros(4 * 2**20)}, full_disk / "last.ckpt")
    assert list(full_disk.iterdir()) == []


# ------------------------------------------------------------------------------------------- read-only
def test_read_only_run_directory_is_one_line_at_start_up(read_only, caplog):
    assert main.main(["-r", str(read_only / "run"), "--train"]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].startswith(f"cannot write to {read_only / 'run'} (")
    assert "the run directory must be writable" in errors[0]
    caplog.clear()
    assert main.main(["--base", TINY, "--train", "-l", str(read_only / "logs")]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].startswith(f"cannot write to {read_only} (") and "pass -l DIR" in errors[0]


def test_sampling_or_exporting_into_a_read_only_folder_is_one_line_before_loading(read_only, caplog, monkeypatch):
    from tests.helpers import load_script

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the output folder was checked")

    image, mask, ckpt = read_only.parent / "a.png", read_only.parent / "m.png", read_only.parent / "w.ckpt"
    Image.new("RGB", (32, 32)).save(image)
    Image.new("L", (32, 32), 255).save(mask)
    torch.save({"state_dict": {}}, ckpt)
    sample = ["--image", str(image), "--mask", str(mask), "--prompt", "", "--out", str(read_only / "out")]
    for name, extra in [("inpaint", sample), ("export", ["--out", str(read_only / "sub" / "x.safetensors")])]:
        script = load_script(name)
        monkeypatch.setattr(script, "load_model", no_loading)
        caplog.clear()
        assert script.main(["--config", TINY, "--ckpt", str(ckpt), *extra]) == 2, name
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1 and "cannot be written (read-only file system or no permission)" in errors[0], errors


@pytest.mark.skipif(not CAN_MOUNT and os.geteuid() == 0, reason="root without mount rights writes anywhere")
def test_an_export_into_a_read_only_folder_is_one_line(read_only):
    with pytest.raises(WriteError, match=rf"^cannot write {read_only / 'x.ckpt'}: .*; nothing was written there\.$"):
        atomic_torch_save({"w": torch.zeros(3)}, read_only / "x.ckpt")


# ------------------------------------------------------------------------------------------- permissions
def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_atomic_writes_get_the_permissions_of_a_plain_open(tmp_path, umask, file_mode, dir_mode):
    old = os.umask(umask)
    try:
        (tmp_path / "plain").write_text("x")
        assert _mode(tmp_path / "plain") == file_mode  # what open() gives: the reference
        (tmp_path / "last.ckpt").write_text("x")
        (tmp_path / "last.ckpt").chmod(0o600)  # replaced files get the default too (the old, 0600-written ones)
        atomic_torch_save({"w": torch.zeros(3)}, tmp_path / "last.ckpt")
        atomic_safetensors_save({"w": torch.zeros(3)}, tmp_path / "x.safetensors", {})
        with atomic_directory(tmp_path / "pipeline") as folder:
            (folder / "unet").mkdir()
            atomic_safetensors_save({"w": torch.zeros(3)}, folder / "unet" / "w.safetensors", {})
    finally:
        os.umask(old)
    assert _mode(tmp_path / "last.ckpt") == _mode(tmp_path / "x.safetensors") == file_mode
    assert _mode(tmp_path / "pipeline") == _mode(tmp_path / "pipeline" / "unet") == dir_mode
    assert _mode(tmp_path / "pipeline" / "unet" / "w.safetensors") == file_mode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "pipeline", "plain", "x.safetensors"]


# ------------------------------------------------------------------------------------ evaluation hash cache
def test_hash_cache_sees_a_checkpoint_replaced_with_the_same_size_and_mtime(tmp_path, monkeypatch):
    from ldm.eval import run as evalrun

    ckpt, cache = tmp_path / "a.ckpt", tmp_path / "out" / "checkpoint_sha256.json"
    ckpt.write_bytes(b"A" * 4096)
    assert evalrun.checkpoint_sha256(ckpt, cache) and not cache.exists()  # changed just now: not cached
    monkeypatch.setattr(evalrun, "RECENT_CHANGE_NS", 0)
    first = evalrun.checkpoint_sha256(ckpt, cache)
    assert json.loads(cache.read_text())[str(ckpt.resolve())]["sha256"] == first
    hashed = []
    monkeypatch.setattr(evalrun, "file_sha256", lambda p: hashed.append(p) or "cached?")
    assert evalrun.checkpoint_sha256(ckpt, cache) == first and hashed == []  # unchanged file: the cache answers
    monkeypatch.undo()
    monkeypatch.setattr(evalrun, "RECENT_CHANGE_NS", 0)
    st = ckpt.stat()
    for replace in ("in place", "renamed over"):
        time.sleep(0.02)  # past the file system's timestamp granularity
        content = (b"B" if replace == "in place" else b"C") * 4096
        if replace == "in place":  # cp over it, then touch -d: same inode, size and mtime
            ckpt.write_bytes(content)
        else:  # rsync -t: a new file with the old size and mtime renamed over it
            (tmp_path / "new").write_bytes(content)
            os.replace(tmp_path / "new", ckpt)
        os.utime(ckpt, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert (ckpt.stat().st_size, ckpt.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
        from ldm.eval.feature_metrics import file_sha256

        assert evalrun.checkpoint_sha256(ckpt, cache) == file_sha256(ckpt) != first, replace
