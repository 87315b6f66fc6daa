"""Reading img2dataset/WebDataset tar shards: shard lists, rank/worker splitting, seeded streams, batching.

The pipeline is built on Python's ``tarfile`` and webdataset's ``gopen`` (local paths, ``file:``, ``pipe:``,
``http(s)://`` ...) rather than on ``wds.WebDataset``, for three reasons found in webdataset 1.0.2
(docs/DECISIONS.md R11): its node splitter reads the rank from the environment or ``torch.distributed`` inside
each worker, which silently fails with ``spawn``/``forkserver`` workers; ``resampled=True`` ignores the seed;
and its error handlers cannot tell a truncated tar from a corrupt image. Here the rank and world size are
plain attributes of :class:`ShardStream`, set in the training process and pickled into the workers.

Streams (seed words in ``ldm.data.rng``):

* **resampled** (training default): an infinite stream; each worker draws shards with replacement from the
  full list with a generator keyed by (seed, resume step, epoch, rank, worker), so ranks and workers differ
  and a restart with the same seed and step replays the same stream.
* **finite** (evaluation default): shards split by rank, then by worker (``urls[rank::world][worker::workers]``),
  read in order, so one pass over all ranks and workers delivers every good sample exactly once.

Left out: webdataset's caching (``cache_dir``) and ``select_files``; every member of a sample is read.
"""

from __future__ import annotations

import logging
import re
import tarfile
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset
from webdataset.gopen import gopen
from webdataset.shardlists import expand_urls

from ldm.data.decode import SampleProcessor, collate
from ldm.data.rng import Stream, make_rng, split_id, stable_hash
from ldm.data.stats import BadDataError, BadDataMonitor, SharedCounts
from ldm.util import ConfigError

log = logging.getLogger(__name__)
_MEMBER = re.compile(r"^((?:.*/)?[^./][^/]*?)\.([^/]*)$")  # key = path up to the first dot of the file name
_SHUFFLE_INITIAL = 100  # samples buffered before the shuffle buffer starts yielding (webdataset's default)


def expand_shards(shards: str | Sequence[str], tar_base: str | None = None, where: str = "shards") -> list[str]:
    """Expand brace patterns (``{00000..00099}``) of one pattern or a list of them into a flat URL list.

    With ``tar_base`` set, each pattern is joined to it with ``/`` (ldm's ``tar_base`` + ``shards``).
    Nothing is opened: building a pipeline never touches the network or the shards.
    """
    patterns = [shards] if isinstance(shards, str) else list(shards)
    if not patterns or not all(isinstance(p, str) for p in patterns):
        raise ConfigError(f"'{where}' must be a brace pattern or a non-empty list of them, got {shards!r}")
    urls: list[str] = []
    for pattern in patterns:
        pattern = pattern.strip()  # COMPAT: the SD2 yaml's validation URL ends in "- " (trailing space)
        if tar_base:
            pattern = f"{tar_base.rstrip('/')}/{pattern.lstrip('/')}"
        urls.extend(u.strip() for u in expand_urls(pattern))
    if not urls:
        raise ConfigError(f"'{where}' expanded to no shard URLs")
    return urls


def shard_name(url: str) -> str:
    """The tar file name in a URL or ``pipe:`` command: ``pipe:aws s3 cp s3://b/p/00001.tar -`` -> ``00001.tar``."""
    tokens = [t for t in url.split() if ".tar" in t] or [url]
    return tokens[-1].rstrip("/").rsplit("/", 1)[-1]


class _CountingReader:
    """A read-only stream wrapper that counts the bytes it delivered."""

    def __init__(self, raw: Any) -> None:
        self.raw, self.count = raw, 0

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.count += len(data)
        return data


def read_shard(url: str, mon: BadDataMonitor) -> Iterator[dict[str, Any]]:
    """Yield raw samples ``{"__key__", "__url__", <ext>: bytes, ...}`` of one tar, counting read failures.

    A shard that cannot be opened counts as ``read_error``. A tar that breaks after some members counts as
    ``truncated_tar``: every sample completed before the break is kept; a sample cut inside a member's data
    is dropped, and one cut between members is passed on (the sample checks then count what it lacks).
    """
    try:
        stream = gopen(url)
    except Exception as e:  # missing file, bad scheme, failing pipe command
        mon.skip("read_error", url, f"{type(e).__name__}: {e}")
        return
    mon.shard_opened()
    group: dict[str, Any] | None = None
    members, in_member = 0, False
    reader = _CountingReader(stream)
    try:
        with tarfile.open(fileobj=reader, mode="r|*") as tar:
            for info in tar:
                match = _MEMBER.match(info.name) if info.isfile() else None
                if match is None:
                    continue
                key, ext = match.group(1), match.group(2).lower()
                if group is not None and (group["__key__"] != key or ext in group):
                    yield group  # complete: the next key has started
                    group = None
                in_member = True
                data = tar.extractfile(info).read()
                if len(data) != info.size:
                    raise tarfile.ReadError(f"member {info.name} has {len(data)} of {info.size} bytes")
                in_member, members = False, members + 1
                group = group if group is not None else {"__key__": key, "__url__": url}
                group[ext] = data
            # tarfile ends silently when the data stops inside a header; a complete archive has a full
            # zero block where iteration stopped.
            cut_in_header = reader.count < tar.offset + tarfile.BLOCKSIZE
    except (tarfile.TarError, OSError, EOFError, ValueError) as e:
        mon.skip("truncated_tar" if members else "read_error", url, f"after {members} members: {e}")
        if in_member:  # the sample being assembled lost part of a member
            group = None
    else:
        if cut_in_header:
            mon.skip("truncated_tar", url, f"after {members} members: the archive ends inside a header")
    finally:
        try:
            stream.close()
        except OSError as e:  # a pipe: command that exited non-zero after the data was read
            log.warning("closing %s: %s", url, e)
    if group is not None:
        yield group


def shuffle_buffer(items: Iterator[Any], size: int, rng) -> Iterator[Any]:
    """Approximate shuffle with a buffer that grows to ``size`` items (webdataset's scheme, seeded)."""
    buf: list[Any] = []
    end = object()
    for item in items:
        buf.append(item)
        if len(buf) < size:  # grow by one extra item per step until full
            extra = next(items, end)
            if extra is not end:
                buf.append(extra)
        if len(buf) >= min(size, _SHUFFLE_INITIAL):
            i = int(rng.integers(len(buf)))
            buf[i], buf[-1] = buf[-1], buf[i]
            yield buf.pop()
    rng.shuffle(buf)
    yield from buf


class ShardStream(IterableDataset):
    """Batches from tar shards for one split; see the module docstring for the stream semantics.

    ``rank``, ``world_size`` and ``resume_step`` are set by the data module in the training process before
    the DataLoader starts its workers; ``epoch`` advances with every pass (see :class:`EpochDataLoader`).
    """

    def __init__(self, urls: list[str], processor: SampleProcessor, *, split: str, batch_size: int,
                 partial: bool, resampled: bool, shuffle: int, seed: int, counts: SharedCounts,
                 max_bad_fraction: float, bad_check_min_samples: int, log_every_s: float) -> None:
        super().__init__()
        self.urls, self.processor, self.split = urls, processor, split
        self.batch_size, self.partial, self.resampled, self.shuffle = batch_size, partial, resampled, shuffle
        self.seed, self.counts = seed, counts
        self.max_bad_fraction, self.bad_check_min_samples, self.log_every_s = (
            max_bad_fraction, bad_check_min_samples, log_every_s)
        self.rank, self.world_size, self.resume_step, self.epoch = 0, 1, 0, 0

    def worker_shards(self, worker: int, num_workers: int, epoch: int) -> Iterator[str]:
        """The shard URLs this (rank, worker) reads in pass ``epoch``."""
        if self.resampled:
            rng = make_rng(self._words(worker, epoch), Stream.SHARDS)
            while True:
                yield self.urls[int(rng.integers(len(self.urls)))]
        urls = list(self.urls)
        if self.shuffle > 0:  # same permutation on every rank, so the rank split stays a partition
            make_rng((self.seed, split_id(self.split), epoch), Stream.SHARDS).shuffle(urls)
        yield from urls[self.rank :: self.world_size][worker::num_workers]

    def _words(self, worker: int, epoch: int) -> tuple[int, ...]:
        return (self.seed, split_id(self.split), self.resume_step, epoch, self.rank, worker)

    def _sample_words(self, words: tuple[int, ...], index: int, raw: dict[str, Any]) -> tuple[int, ...]:
        if self.split == "train":
            return (*words, index)
        # Evaluation: keyed by the sample itself, so crops and masks do not depend on ranks or workers.
        return (self.seed, split_id(self.split), stable_hash(f"{shard_name(raw['__url__'])}/{raw['__key__']}"))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch, self.epoch = self.epoch, self.epoch + 1
        where = f"{self.split} rank {self.rank} worker {worker}"
        mon = BadDataMonitor(self.counts.row(worker), self.max_bad_fraction, self.bad_check_min_samples, where)
        words = self._words(worker, epoch)
        raw = (s for url in self.worker_shards(worker, num_workers, epoch) for s in read_shard(url, mon))
        if self.shuffle > 1:
            raw = shuffle_buffer(raw, self.shuffle, make_rng(words, Stream.SHUFFLE))
        batch: list[dict[str, Any]] = []
        last_log, delivered = time.monotonic(), 0
        for index, item in enumerate(raw):
            sample = self.processor(item, self._sample_words(words, index, item), mon)
            if sample is not None:
                mon.ok()
                delivered += 1
                batch.append(sample)
                if len(batch) == self.batch_size:
                    yield collate(batch)
                    batch = []
            elif self.resampled and not delivered and index + 1 >= self.bad_check_min_samples:
                # An infinite stream that rejects everything would otherwise spin silently forever.
                raise BadDataError(f"{where}: none of the first {index + 1} samples passed ({mon.summary()}); "
                                   "check image_key and the filters (min_size, p_unsafe_threshold, ...)")
            if time.monotonic() - last_log > self.log_every_s:
                log.info("data %s", mon.summary())
                last_log = time.monotonic()
        if batch and self.partial:
            yield collate(batch)
        log.info("data pass done: %s", mon.summary())


class EpochDataLoader(DataLoader):
    """A DataLoader that advances the dataset's ``epoch`` for each pass when workers are re-created.

    Persistent workers and in-process loading keep their own dataset copy, which advances itself.
    """

    def __iter__(self):
        it = super().__iter__()  # non-persistent workers are started (and the dataset copied) here
        if self.num_workers > 0 and not self.persistent_workers:
            self.dataset.epoch += 1
        return it


__all__ = ["EpochDataLoader", "ShardStream", "expand_shards", "read_shard", "shard_name", "shuffle_buffer"]
