"""Sample streams over img2dataset/WebDataset tar shards, whose position can be saved and restored exactly.

Shards are read by ``ldm.data.shards`` (samples of one tar) on ``ldm.data.tarstream`` (bytes and headers)
rather than by ``wds.WebDataset``: in webdataset 1.0.2 the node splitter reads the rank inside each worker
(silently wrong with ``spawn``/``forkserver`` workers), ``resampled=True`` ignores the seed, its error handlers
cannot tell a truncated tar from a corrupt image (DECISIONS R11), and its pipeline has no position that could
be saved (DECISIONS D15). Here the rank and world size are constructor arguments of :class:`ShardStream`,
resolved in the training process and pickled into the workers.

Streams (seed words in ``ldm.data.rng``):

* **resampled** (training default): an infinite stream; each worker draws shards with replacement from the
  full list with a generator keyed by (seed, split, resume step, epoch, rank, worker), so ranks and workers
  differ.
* **finite** (evaluation default): shards split by rank, then by worker (``urls[rank::world][worker::workers]``),
  read in order, so one pass over all ranks and workers delivers every good sample exactly once.

Both are **resumable**. :meth:`ShardStream.state_dict` (called in each worker by torchdata's
``StatefulDataLoader``, see ``ldm.data.resumable``) gives a worker's position after the batch it just made, in a
few numbers: the shard-choice generator's state, the current shard and the byte offset of its next sample, each
buffered sample as (shard, tar block, key checksum), the shuffle generator's state, the sample counter and the
skip counts; 12 bytes per buffered sample plus a few hundred bytes. :meth:`ShardStream.load_state_dict` continues
from there without decoding anything already consumed: the current shard is re-entered by reading its headers only
(a seek per member for local uncompressed shards), and the shuffle buffer is refilled by reading back just the
buffered samples. A resume therefore costs at most a shard's headers plus a buffer's worth of samples, however far
the stream had run (docs/BENCHMARKS.md).

Left out: webdataset's caching (``cache_dir``) and ``select_files``; every member of a sample is read.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset

from ldm.data.decode import SampleProcessor, collate
from ldm.data.rng import Stream, make_rng, split_id, stable_hash
from ldm.data.shards import POS_KEY, ShardReader, expand_shards, key_checksum, read_groups, read_shard, shard_name
from ldm.data.stats import BadDataError, BadDataMonitor, SharedCounts
from ldm.data.tarstream import BLOCK

log = logging.getLogger(__name__)
_SHUFFLE_INITIAL = 100  # samples buffered before the shuffle buffer starts yielding (webdataset's default)
STATE_VERSION = 1


class ShuffleBuffer:
    """webdataset's approximate shuffle (a buffer that grows to ``size`` samples; each step adds one or two and
    takes out a random one), as an object whose position can be saved: the buffered samples' positions plus the
    generator's state. The positions live in an array kept in step with the buffer, so saving costs a copy of
    it (12 bytes per sample), not a pass over the samples: every batch a worker makes carries its state.

    Args:
        size: Buffer capacity; 0 or 1 passes samples through in order.
        rng: The seeded generator that picks which sample leaves.
    """

    def __init__(self, size: int, rng: np.random.Generator) -> None:
        self.size, self.rng = size, rng
        self.items: list[dict[str, Any]] = []
        self._pos = np.zeros((max(size, 1) + 1, 3), dtype=np.int64)  # shard, offset, key checksum per item
        self.exhausted = False

    def next(self, source: Callable[[], dict[str, Any] | None]) -> dict[str, Any] | None:
        """The next sample, drawing from ``source`` (None when it is exhausted); None at the end."""
        if self.size <= 1:
            return source()
        while not self.exhausted:
            item = source()
            if item is None:
                self.exhausted = True
                break
            self._push(item)
            if len(self.items) < self.size:  # grow by one extra sample per step until full
                extra = source()
                if extra is None:
                    self.exhausted = True
                else:
                    self._push(extra)
            if len(self.items) >= min(self.size, _SHUFFLE_INITIAL):
                return self._pop()
        return self._pop() if self.items else None

    def _push(self, item: dict[str, Any]) -> None:
        n = len(self.items)
        if n == len(self._pos):
            self._pos = np.concatenate([self._pos, np.zeros_like(self._pos)])
        self._pos[n] = (*item[POS_KEY], key_checksum(item["__key__"]))
        self.items.append(item)

    def _pop(self) -> dict[str, Any]:
        i, last = int(self.rng.integers(len(self.items))), len(self.items) - 1
        self.items[i], self.items[last] = self.items[last], self.items[i]
        self._pos[[i, last]] = self._pos[[last, i]]
        return self.items.pop()

    def positions(self) -> bytes:
        """(shard index, 512-byte block of the first header, key CRC-32) of every buffered sample, in buffer order,
        as little-endian uint32 triples: 12 bytes per sample (samples start on tar block boundaries, so a uint32
        block number covers 2 TiB shards). Plain bytes pickle inline through the worker queue and load with
        ``torch.load(weights_only=True)``."""
        pos = self._pos[: len(self.items)].copy()
        pos[:, 1] //= BLOCK
        return pos.astype("<u4").tobytes()

    def restore(self, items: list[dict[str, Any]]) -> None:
        self.items = []
        for item in items:
            self._push(item)


class StaleStateError(RuntimeError):
    """A saved stream position no longer matches the shards (a file changed or disappeared)."""


class _Pass:
    """One worker's pass over its stream, with a position that :meth:`state` saves and :meth:`restore` reloads."""

    def __init__(self, ds: ShardStream, worker: int, num_workers: int, epoch: int, where: str) -> None:
        self.ds, self.epoch, self.where = ds, epoch, where
        self.words = ds._words(worker, epoch)
        self.mon = BadDataMonitor(ds.counts.row(worker), ds.max_bad_fraction, ds.bad_check_min_samples, where)
        self.shard_rng = make_rng(self.words, Stream.SHARDS) if ds.resampled else None
        self.order = [] if ds.resampled else ds.finite_order(worker, num_workers, epoch)
        self.next_pos = 0  # finite streams: position in ``order``
        self.buffer = ShuffleBuffer(ds.shuffle, make_rng(self.words, Stream.SHUFFLE))
        self.reader: ShardReader | None = None
        self._groups: Iterator[dict[str, Any]] | None = None
        self.index = self.delivered = 0  # samples taken from the buffer / delivered in batches
        self.done = False

    def _next_shard(self) -> int | None:
        if self.shard_rng is not None:
            return int(self.shard_rng.integers(len(self.ds.urls)))
        if self.next_pos >= len(self.order):
            return None
        self.next_pos += 1
        return self.order[self.next_pos - 1]

    def _open(self, shard: int, start: int) -> None:
        self.reader = ShardReader(self.ds.urls[shard], self.mon, start, shard)
        self._groups = iter(self.reader)

    def _next_raw(self) -> dict[str, Any] | None:
        while True:
            if self._groups is None:
                shard = self._next_shard()
                if shard is None:
                    return None
                self._open(shard, 0)
            group = next(self._groups, None)
            if group is not None:
                return group
            self.reader = self._groups = None

    def state(self) -> dict[str, Any]:
        """This worker's position after the batch it just yielded (no partial batch exists at that point)."""
        reader = self.reader
        current = None if reader is None or reader.next_offset is None else [reader.index, reader.next_offset]
        return {
            "version": STATE_VERSION, "epoch": self.epoch, "done": self.done,
            "shard_rng": None if self.shard_rng is None else self.shard_rng.bit_generator.state,
            "next_pos": self.next_pos, "current": current,
            "buffer": self.buffer.positions(), "shuffle_rng": self.buffer.rng.bit_generator.state,
            "exhausted": self.buffer.exhausted, "index": self.index, "delivered": self.delivered,
            "counts": self.mon.counts(), "records": self.mon.records, "bad": self.mon.bad,
        }

    def restore(self, st: dict[str, Any]) -> None:
        """Continue from :meth:`state`: re-read the buffered samples, re-enter the current shard (headers only
        up to the saved offset), restore both generators and the counts. Nothing consumed is decoded again."""
        if st.get("version") != STATE_VERSION:
            raise StaleStateError(f"state version {st.get('version')} (this code reads {STATE_VERSION})")
        n = len(self.ds.urls)
        buf = st["buffer"]
        shards = np.frombuffer(buf, dtype="<u4")[0::3].tolist() + ([int(st["current"][0])] if st["current"] else [])
        if any(not 0 <= s < n for s in shards):
            raise StaleStateError(f"a saved shard index is outside the {n} shards of this run")
        if self.shard_rng is not None:
            self.shard_rng.bit_generator.state = st["shard_rng"]
        self.next_pos, self.done = int(st["next_pos"]), bool(st["done"])
        self.buffer.rng.bit_generator.state = st["shuffle_rng"]
        self.buffer.exhausted = bool(st["exhausted"])
        self.buffer.restore(self._reread(buf))
        if st["current"] is not None:
            self._open(int(st["current"][0]), int(st["current"][1]))
        self.index, self.delivered = int(st["index"]), int(st["delivered"])
        self.mon.restore(st["counts"], int(st["records"]), int(st["bad"]))

    def _reread(self, buf: bytes) -> list[dict[str, Any]]:
        pos = np.frombuffer(buf, dtype="<u4").reshape(-1, 3).astype(np.int64)
        shards, offsets, crcs = pos[:, 0].tolist(), (pos[:, 1] * BLOCK).tolist(), pos[:, 2].tolist()
        wanted: dict[int, list[int]] = {}
        for shard, offset in zip(shards, offsets):
            wanted.setdefault(shard, []).append(offset)
        groups: dict[tuple[int, int], dict[str, Any]] = {}
        for shard, in_shard in wanted.items():
            try:
                found = read_groups(self.ds.urls[shard], in_shard, shard)
            except Exception as e:
                raise StaleStateError(f"cannot re-read {self.ds.urls[shard]}: {type(e).__name__}: {e}") from e
            groups.update({(shard, off): g for off, g in found.items()})
        items = []
        for shard, offset, crc in zip(shards, offsets, crcs):
            group = groups.get((shard, offset))
            if group is None or key_checksum(group["__key__"]) != crc:
                raise StaleStateError(f"{self.ds.urls[shard]} holds no sample with the saved key at byte {offset}")
            items.append(dict(group))
        return items

    def batches(self) -> Iterator[dict[str, Any]]:
        ds, mon = self.ds, self.mon
        batch: list[dict[str, Any]] = []
        last_log = time.monotonic()
        while not self.done:
            item = self.buffer.next(self._next_raw)
            if item is None:
                break
            index, self.index = self.index, self.index + 1
            sample = ds.processor(item, ds._sample_words(self.words, index, item), mon)
            if sample is not None:
                mon.ok()
                self.delivered += 1
                batch.append(sample)
                if len(batch) == ds.batch_size:
                    out, batch = collate(batch), []  # emptied first: the state saved at the yield has no partial batch
                    yield out
            elif ds.resampled and not self.delivered and self.index >= ds.bad_check_min_samples:
                # An infinite stream that rejects everything would otherwise spin silently forever.
                raise BadDataError(f"{self.where}: none of the first {self.index} samples passed ({mon.summary()}); "
                                   "check image_key and the filters (min_size, p_unsafe_threshold, ...)")
            if time.monotonic() - last_log > ds.log_every_s:
                log.info("data %s", mon.summary())
                last_log = time.monotonic()
        self.done = True
        if batch and ds.partial:
            yield collate(batch)
        log.info("data pass done: %s", mon.summary())


class ShardStream(IterableDataset):
    """Batches from tar shards for one split; see the module docstring for the stream semantics and its state.

    ``epoch`` is the pass number the next ``iter()`` uses; it advances with every pass (``ldm.data.resumable``
    keeps the training-process copy in step when workers are re-created).

    Args:
        urls: Shard URLs (see :func:`expand_shards`).
        processor: Turns a raw sample into a model sample or a counted skip.
        split: ``train``, ``validation`` or ``test`` (part of every seed).
        batch_size: Samples per batch.
        partial: Yield the last, smaller batch of a finite stream.
        resampled: Infinite stream drawing shards with replacement (else one pass over this rank's shards).
        shuffle: Shuffle buffer size in samples (0 or 1: none); finite streams also shuffle the shard order.
        seed: Seed of every random draw of the pipeline.
        counts: Shared per-worker skip counters.
        rank: This process's rank, resolved in the training process (workers cannot ask torch.distributed).
        world_size: Number of ranks.
        resume_step: The global step that seeds the stream: 0 for a new run and for an exact resume of it; a run
            resumed without a usable saved position is reseeded with its resume step.
        max_bad_fraction: Stop with ``BadDataError`` past this fraction of bad records per worker.
        bad_check_min_samples: Records a worker reads before ``max_bad_fraction`` is enforced.
        log_every_s: Seconds between each worker's log lines with its skip counts.
        fallback_step: Seed step used when a restored position does not match the shards any more (a shard
            changed or vanished); None means ``resume_step``.
    """

    def __init__(self, urls: list[str], processor: SampleProcessor, *, split: str, batch_size: int,
                 partial: bool, resampled: bool, shuffle: int, seed: int, counts: SharedCounts, rank: int,
                 world_size: int, resume_step: int, max_bad_fraction: float = 0.1,
                 bad_check_min_samples: int = 1000, log_every_s: float = 300.0,
                 fallback_step: int | None = None) -> None:
        super().__init__()
        if not 0 <= rank < world_size:
            raise ValueError(f"ShardStream: rank {rank} is not in [0, world_size={world_size})")
        self.urls, self.processor, self.split = urls, processor, split
        self.batch_size, self.partial, self.resampled, self.shuffle = batch_size, partial, resampled, shuffle
        self.seed, self.counts = seed, counts
        self.rank, self.world_size, self.resume_step = rank, world_size, int(resume_step)
        self.fallback_step = self.resume_step if fallback_step is None else int(fallback_step)
        self.max_bad_fraction, self.bad_check_min_samples, self.log_every_s = (
            max_bad_fraction, bad_check_min_samples, log_every_s)
        self.epoch = 0
        self._pending: dict[str, Any] | None = None
        self._live: _Pass | None = None

    def finite_order(self, worker: int, num_workers: int, epoch: int) -> list[int]:
        """Indices of the shards this (rank, worker) reads, in order, in pass ``epoch`` of a finite stream."""
        order = list(range(len(self.urls)))
        if self.shuffle > 0:  # same permutation on every rank, so the rank split stays a partition
            make_rng((self.seed, split_id(self.split), epoch), Stream.SHARDS).shuffle(order)
        return order[self.rank :: self.world_size][worker::num_workers]

    def _words(self, worker: int, epoch: int) -> tuple[int, ...]:
        return (self.seed, split_id(self.split), self.resume_step, epoch, self.rank, worker)

    def _sample_words(self, words: tuple[int, ...], index: int, raw: dict[str, Any]) -> tuple[int, ...]:
        if self.split == "train":
            return (*words, index)
        # Evaluation: keyed by the sample itself, so crops and masks do not depend on ranks or workers.
        return (self.seed, split_id(self.split), stable_hash(f"{shard_name(raw['__url__'])}/{raw['__key__']}"))

    def state_dict(self) -> dict[str, Any]:
        """The position of this worker's pass after its last batch (torchdata's ``Stateful`` protocol)."""
        if self._live is not None:
            return self._live.state()
        if self._pending is not None:
            return self._pending
        return {"version": STATE_VERSION, "fresh": True, "epoch": self.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Make the next ``iter()`` continue from ``state`` (from :meth:`state_dict` of the same worker)."""
        self._pending = state

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        state, self._pending = self._pending, None
        if state is not None and state.get("fresh"):
            self.epoch, state = int(state["epoch"]), None
        epoch = self.epoch if state is None else int(state["epoch"])
        self.epoch = epoch + 1
        where = f"{self.split} rank {self.rank} worker {worker}"
        live = _Pass(self, worker, num_workers, epoch, where)
        if state is not None:
            try:
                live.restore(state)
            except StaleStateError as e:
                log.warning("%s: the saved data position does not fit the shards (%s); continuing with a new stream "
                            "seeded by step %d, not sample-exact", where, e, self.fallback_step)
                self.resume_step = self.fallback_step
                live = _Pass(self, worker, num_workers, epoch, where)
        self._live = live
        yield from live.batches()
        self._live = None


__all__ = ["ShardReader", "ShardStream", "ShuffleBuffer", "StaleStateError", "expand_shards", "read_shard",
           "shard_name"]
