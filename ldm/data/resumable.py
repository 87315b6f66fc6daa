"""Loaders whose position can be saved as of the last batch the training step consumed, and restored exactly.

:class:`ResumableLoader` iterates a :class:`~ldm.data.webdata.ShardStream` through torchdata's
``StatefulDataLoader`` with ``snapshot_every_n_steps=1``: every worker sends the state of its stream along with
each batch, and the loader knows, for each batch it yields, every worker's state as of that worker's last
*yielded* batch. Batches that workers have prefetched are therefore neither lost nor replayed on resume.

Lightning's own handling of stateful loaders (it stores a loader's ``state_dict()`` in the fit loop's state)
does not fit, for two reasons, so this wrapper is deliberately *not* such a loader (it has no
``state_dict``/``load_state_dict``) and its state travels in the data module's ``state_dict`` instead:

1. Lightning takes the loader state when the checkpoint is written, but its fetcher has already pulled the next
   batch by then (it prefetches one batch to detect the end of the data), so a resumed stream would skip one
   batch. Here the state is that of the last batch the training step consumed: the data module counts them in
   ``on_before_batch_transfer`` and asks :meth:`ResumableLoader.snapshot` for that batch.
2. Only global rank 0 writes the checkpoint, and Lightning would restore rank 0's loader state on every rank.
   Here the data module gathers every rank's state into the checkpoint (:func:`gather_to_rank0`; a few kB per
   rank plus 12 bytes per buffered sample) and each rank restores its own.

A further Lightning issue is avoided on the way: Lightning-AI/pytorch-lightning#20550 (loader state silently not
restored when ``configure_optimizers`` reads ``trainer.estimated_stepping_batches``); the data module's
``load_state_dict`` runs before the model is set up.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Iterator
from typing import Any

import torch

from ldm.data.webdata import ShardStream

#: snapshots kept behind the newest yielded batch (Lightning's fetcher runs one batch ahead)
KEEP_SNAPSHOTS = 16


def _stateful_dataloader_cls():
    from torchdata.stateful_dataloader import StatefulDataLoader

    return StatefulDataLoader


class ResumableLoader:
    """Batches of a :class:`ShardStream` with a position that can be saved after any yielded batch.

    ``snapshot(n)`` is the position after the ``n``-th batch of the current pass (default: the last one
    yielded); ``restore(snapshot)`` makes the next pass continue from it. A snapshot holds the pass number and
    torchdata's loader state, whose per-worker parts are :meth:`ShardStream.state_dict` dicts.

    Args:
        dataset: The stream; it yields whole batches.
        num_workers: DataLoader worker processes (0: in the calling process).
        pin_memory: Pin batches in page-locked memory.
        generator: Generator for the workers' base seed (keeps torch's global RNG untouched).
        prefetch_factor: Batches prefetched per worker (ignored with ``num_workers`` 0).
        persistent_workers: Keep workers alive between passes (ignored with ``num_workers`` 0).
        multiprocessing_context: Worker start method; None = torch default.
    """

    def __init__(self, dataset: ShardStream, *, num_workers: int, pin_memory: bool = False,
                 generator: torch.Generator | None = None, prefetch_factor: int = 2,
                 persistent_workers: bool = False, multiprocessing_context: str | None = None) -> None:
        self.dataset, self.num_workers = dataset, num_workers
        extra: dict[str, Any] = {}
        if num_workers > 0:
            extra = dict(prefetch_factor=prefetch_factor, persistent_workers=persistent_workers,
                         multiprocessing_context=multiprocessing_context)
        with warnings.catch_warnings():
            # torchdata 0.11 calls torch.set_vital, which recent torch marks deprecated; nothing to act on
            warnings.filterwarnings("ignore", message=".*set_vital.*")
            self.loader = _stateful_dataloader_cls()(
                dataset, batch_size=None, shuffle=False, num_workers=num_workers, pin_memory=pin_memory,
                generator=generator, snapshot_every_n_steps=1, **extra)
        self._next_epoch = dataset.epoch
        self._pass_epoch: int | None = None
        self._snapshots: dict[int, dict[str, Any]] = {}
        self._pending: dict[str, Any] | None = None
        self._yielded = 0
        self._finished = False
        self.consumed = 0  # batches of this pass the consumer reported with mark_consumed

    def __iter__(self) -> Iterator[dict[str, Any]]:
        # A generator: nothing happens until the first next(). Lightning calls iter() once on any loader that is
        # not a torch DataLoader just to check that it is iterable; that must not start workers or a pass.
        start: dict[str, Any] = {"epoch": self._next_epoch, "loader": None}
        if self._pending is not None:
            start, self._pending = self._pending, None
        epoch = int(start["epoch"])
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*set_vital.*")
            if start["loader"] is not None:
                self.loader.load_state_dict(start["loader"])
            self.dataset.epoch = epoch  # what new workers (or the in-process stream) start from
            it = iter(self.loader)  # workers start (and receive their saved states) here
        self._pass_epoch, self._next_epoch = epoch, epoch + 1
        self._snapshots, self._yielded, self.consumed, self._finished = {0: start}, 0, 0, False
        for batch in it:
            self._yielded += 1
            self._snapshots[self._yielded] = {"epoch": epoch, "loader": self.loader.state_dict()}
            self._snapshots.pop(self._yielded - KEEP_SNAPSHOTS, None)
            yield batch
        self._finished = True

    def mark_consumed(self) -> None:
        """Report that the consumer has used one more batch of this pass (see :meth:`snapshot`)."""
        self.consumed += 1

    def snapshot(self, batches: int | None = None) -> dict[str, Any]:
        """The position after the ``batches``-th batch of the current pass (default: the last yielded)."""
        if self._pass_epoch is None:  # never iterated: what the next pass would start from
            return self._pending or {"epoch": self._next_epoch, "loader": None}
        n = self._yielded if batches is None else batches
        if self._finished and n == self._yielded:  # the pass is over: the next one starts fresh
            return {"epoch": self._pass_epoch + 1, "loader": None}
        if n not in self._snapshots:
            raise RuntimeError(f"no saved data position for batch {n} of this pass (batches {min(self._snapshots)}"
                               f"..{max(self._snapshots)} are kept)")
        return self._snapshots[n]

    def next_pass(self) -> dict[str, Any]:
        """The position at the start of the next pass (what an interrupted finished pass resumes to)."""
        return self._pending or {"epoch": self._next_epoch, "loader": None}

    def restore(self, snapshot: dict[str, Any]) -> None:
        """Continue from ``snapshot`` (from :meth:`snapshot` of a loader over the same stream layout)."""
        self._pending = snapshot
        self._next_epoch = int(snapshot["epoch"])


def stream_fingerprint(dataset: ShardStream, num_workers: int) -> dict[str, Any]:
    """What a saved stream position depends on: if any of it changes, the position cannot be continued."""
    return {"split": dataset.split, "seed": dataset.seed, "world_size": dataset.world_size,
            "num_workers": num_workers, "shuffle": dataset.shuffle, "resampled": dataset.resampled,
            "shards": len(dataset.urls),
            "shard_list_sha1": hashlib.sha1("\n".join(dataset.urls).encode()).hexdigest()[:16]}


def describe_change(saved: dict[str, Any], now: dict[str, Any]) -> str:
    """``"world_size 2 -> 4, num_workers 2 -> 1"``: the fingerprint fields that differ."""
    keys = sorted(set(saved) | set(now))
    return ", ".join(f"{k} {saved.get(k)} -> {now.get(k)}" for k in keys if saved.get(k) != now.get(k))


def gather_to_rank0(obj: Any) -> list[Any] | None:
    """``obj`` from every rank as a list indexed by rank, on rank 0; None on the other ranks; ``[obj]`` without a
    process group. A collective: every rank must call it (Lightning dumps checkpoints on every rank)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


__all__ = ["KEEP_SNAPSHOTS", "ResumableLoader", "describe_change", "gather_to_rank0", "stream_fingerprint"]
