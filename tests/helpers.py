"""Small builders shared by tests: tiny models from configs/tiny and synthetic batches in the data layout."""

from __future__ import annotations

import errno
import io
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from ldm.data.masks import masked_image
from ldm.util import instantiate_from_config

REPO = Path(__file__).resolve().parents[1]


def load_script(name: str):
    """Import ``scripts/NAME.py`` under a private module name (script names like 'evaluate' are too generic)."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(f"_script_{name}", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses in the script look their module up here
    spec.loader.exec_module(module)
    return module


def tiny_config(name: str = "inpaint", **params: Any):
    cfg = OmegaConf.load(REPO / "configs" / "tiny" / f"{name}.yaml")
    for k, v in params.items():
        OmegaConf.update(cfg, f"model.params.{k}", v, force_add=True)
    return cfg


def build_tiny(name: str = "inpaint", **params: Any):
    cfg = tiny_config(name, **params)
    model = instantiate_from_config(cfg.model)
    model.learning_rate = float(cfg.model.base_learning_rate)
    return model


def synthetic_batch(b: int = 2, size: int = 64, seed: int = 0) -> dict[str, Any]:
    """A batch with the exact keys and layouts of the LAION pipeline (DECISIONS R7): B,H,W,C in [-1,1]."""
    g = torch.Generator().manual_seed(seed)
    img = torch.rand(b, size, size, 3, generator=g) * 2 - 1
    mask = torch.zeros(b, size, size, 1)
    mask[:, size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 1.0
    return {
        "jpg": img,
        "txt": [f"a photo number {i}" for i in range(b)],
        "mask": mask,
        "masked_image": masked_image(img, mask),
    }


class SignalAtStep:
    """A Lightning callback (config target ``tests.helpers.SignalAtStep``) that sends a real signal to its own
    process once ``global_step`` reaches ``step``: a deterministic stand-in for a scheduler's SIGTERM."""

    def __new__(cls, step: int, signal_name: str = "SIGTERM"):
        import os
        import signal

        import pytorch_lightning as pl

        class _Sender(pl.Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                if trainer.global_step == step and not getattr(self, "sent", False):
                    self.sent = True
                    os.kill(os.getpid(), getattr(signal, signal_name))

        return _Sender()


class RecordKeys:
    """Callback (config target ``tests.helpers.RecordKeys``) appending each training batch's ``__key__`` values
    to ``<out_dir>/rank<global_rank>.txt``, so a test can check which samples each rank read."""

    def __new__(cls, out_dir: str):
        import pytorch_lightning as pl

        class _Recorder(pl.Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                path = Path(out_dir) / f"rank{trainer.global_rank}.txt"
                path.parent.mkdir(parents=True, exist_ok=True)
                with open(path, "a") as f:
                    f.write("\n".join(str(k) for k in batch["__key__"]) + "\n")

        return _Recorder()


class PoisonAtStep:
    """Callback (config target ``tests.helpers.PoisonAtStep``) that turns one UNet weight into NaN when
    ``global_step`` reaches ``step``, so the next loss is non-finite."""

    def __new__(cls, step: int):
        import pytorch_lightning as pl

        class _Poison(pl.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                if trainer.global_step == step:
                    with torch.no_grad():
                        next(pl_module.model.parameters()).fill_(float("nan"))

        return _Poison()


class KillAtStep:
    """Callback (config target ``tests.helpers.KillAtStep``) that SIGKILLs its own process at the end of optimizer
    step ``step``: no handler, no cleanup, no flush -- what a node failure or the OOM killer does."""

    def __new__(cls, step: int):
        import os
        import signal

        import pytorch_lightning as pl

        class _Killer(pl.Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                if trainer.global_step == step:
                    os.kill(os.getpid(), signal.SIGKILL)

        return _Killer()


class ScaleGradsAtStep:
    """Callback (config target ``tests.helpers.ScaleGradsAtStep``) that multiplies every UNet gradient by
    ``factor`` after the backward pass of optimizer step ``step`` (``nan`` poisons them): an exploding or non-finite
    gradient with a perfectly finite loss."""

    def __new__(cls, step: int, factor: float):
        import pytorch_lightning as pl

        class _Scale(pl.Callback):
            def on_after_backward(self, trainer, pl_module):
                if trainer.global_step == step:
                    with torch.no_grad():
                        for p in pl_module.model.parameters():
                            if p.grad is not None:
                                p.grad.mul_(float(factor))

        return _Scale()


class KillBeforeStep:
    """Callback (config target ``tests.helpers.KillBeforeStep``) that SIGKILLs its own process when the batch after
    optimizer step ``step`` starts, i.e. right after a periodic checkpoint at ``step`` was written: no handler
    runs, nothing is saved, batches the DataLoader workers had prefetched are lost, as when a node dies."""

    def __new__(cls, step: int):
        import os
        import signal

        import pytorch_lightning as pl

        class _Killer(pl.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                if trainer.global_step == step:
                    os.kill(os.getpid(), signal.SIGKILL)

        return _Killer()


class SignalAtBatch:
    """Callback (config target ``tests.helpers.SignalAtBatch``) that sends a real signal to its own process at the
    end of this process's ``batch``-th training micro-batch (1-based): with gradient accumulation, a signal that
    lands inside an optimizer step, as most preemptions do."""

    def __new__(cls, batch: int, signal_name: str = "SIGTERM"):
        import os
        import signal

        import pytorch_lightning as pl

        class _Sender(pl.Callback):
            seen = 0

            def on_train_batch_end(self, trainer, pl_module, outputs, batch_, batch_idx):
                self.seen += 1
                if self.seen == batch:
                    os.kill(os.getpid(), getattr(signal, signal_name))

        return _Sender()


def damage(path, at: float = 0.5) -> None:
    """Flip one byte inside the tensor data of a torch zip file: the zip directory and the pickle stay intact."""
    import zipfile

    with zipfile.ZipFile(path) as zf:
        info = max((i for i in zf.infolist() if "/data/" in i.filename), key=lambda i: i.compress_size)
        with zf.open(info) as f:
            head = f.read(16)
    data = bytearray(path.read_bytes())
    start = data.index(head, info.header_offset)
    data[start + int(info.compress_size * at)] ^= 0x40
    path.write_bytes(bytes(data))


def record_saves(monkeypatch) -> list[tuple[str, int | None, int | None]]:
    """Record every checkpoint this process writes through ``ldm.atomic.atomic_torch_save`` as ``(file name,
    global step, processed micro-batches)``; the file is still written."""
    import ldm.atomic

    saves: list[tuple[str, int | None, int | None]] = []
    real = ldm.atomic.atomic_torch_save

    def recording(obj, path, *args, **kwargs):
        if isinstance(obj, dict) and "global_step" in obj:
            loops = obj.get("loops") or {}
            progress = loops.get("fit_loop", {}).get("epoch_loop.batch_progress", {}).get("total", {})
            saves.append((os.path.basename(str(path)), obj["global_step"], progress.get("processed")))
        return real(obj, path, *args, **kwargs)

    monkeypatch.setattr(ldm.atomic, "atomic_torch_save", recording)
    return saves


class RecordRunDir:
    """Callback (config target ``tests.helpers.RecordRunDir``) writing, when training starts, the run directory
    and checkpoint directory this rank uses to ``<out_dir>/rundir<global_rank>.txt``."""

    def __new__(cls, out_dir: str):
        import pytorch_lightning as pl

        class _Recorder(pl.Callback):
            def on_train_start(self, trainer, pl_module):
                setup = next(c for c in trainer.callbacks if type(c).__name__ == "SetupCallback")
                path = Path(out_dir) / f"rundir{trainer.global_rank}.txt"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(f"{setup.logdir}\n{trainer.checkpoint_callback.dirpath}\n")

        return _Recorder()


class FixedBatches(torch.utils.data.Dataset):
    """The same single batch, ``n`` times, already collated (DataLoader(batch_size=None))."""

    def __init__(self, batch, n):
        self.batch, self.n = batch, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.batch


#: root with ``mount`` can put a real tmpfs under a test's folder (the kernel's own ENOSPC / EROFS)
CAN_MOUNT = os.geteuid() == 0 and shutil.which("mount") is not None


def mount_tmpfs(target: Path, options: str) -> bool:
    """Mount a tmpfs with ``options`` on ``target``; False where this process may not mount."""
    if not CAN_MOUNT:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)],
                          capture_output=True).returncode == 0


def limited_disk(disk: Path, capacity: int, monkeypatch) -> Iterator[Path]:
    """Body of a fixture: ``disk``, a new folder on a file system that holds ``capacity`` bytes.

    Where this process may mount (root), it is a real tmpfs and the kernel returns ENOSPC. Elsewhere the fault is
    injected at the lowest level Python reaches: the file objects torch writes through (``os.fdopen``, also inside
    ``ldm.atomic``) and the bytes safetensors would write raise ENOSPC once the folder's files would exceed
    ``capacity``, with the error text safetensors' Rust writer gives (``... (os error 28)``).
    """
    disk.mkdir()
    if mount_tmpfs(disk, f"size={capacity}"):
        yield disk
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)
        return
    import safetensors.torch

    def used() -> int:
        return sum(p.stat().st_size for p in disk.rglob("*") if p.is_file())

    class Full(io.RawIOBase):
        def __init__(self, fd):
            self.f = real_fdopen(fd, "wb", buffering=0)

        def writable(self):
            return True

        def write(self, b):
            if used() + len(b) > capacity:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.f.write(b)

        def fileno(self):
            return self.f.fileno()

        def close(self):
            self.f.close()
            super().close()

    real_fdopen, real_save_file = os.fdopen, safetensors.torch.save_file

    def fdopen(fd, mode="r", *args, **kwargs):
        inside = os.readlink(f"/proc/self/fd/{fd}").startswith(str(disk))
        return io.BufferedWriter(Full(fd)) if inside else real_fdopen(fd, mode, *args, **kwargs)

    def save_file(tensors, filename, metadata=None):
        if not str(filename).startswith(str(disk)):
            return real_save_file(tensors, filename, metadata=metadata)
        data = safetensors.torch.save(tensors, metadata=metadata)
        if used() + len(data) > capacity:
            raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")
        Path(filename).write_bytes(data)

    monkeypatch.setattr(os, "fdopen", fdopen)
    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    yield disk
