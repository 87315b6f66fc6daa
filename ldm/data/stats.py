"""Counting what the data pipeline skipped, and stopping when too much of it is broken.

Two kinds of skips are kept apart:

* **bad data** (``BAD_REASONS``): unreadable, truncated or corrupt shards, repeated keys, corrupt images,
  samples missing their image, caption or json, unparsable json, and json without a field a filter needs.
  These count towards ``max_bad_fraction``; crossing it raises :class:`BadDataError` naming the shard.
* **filtered by policy** (``FILTER_REASONS``): well-formed samples that the configured thresholds reject
  (too small, too large, extreme aspect ratio, punsafe, watermark, aesthetic, caption word list). They never stop a run.

Counts live in a small int64 tensor in shared memory, one row per DataLoader worker (each worker writes only
its own row), so the training process can read live totals with :meth:`SharedCounts.totals` while workers
run, under ``fork``, ``spawn`` and ``forkserver`` alike. Counts are per process (rank); sum across ranks with
a collective if a global figure is needed.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict

import torch

log = logging.getLogger(__name__)

BAD_REASONS: tuple[str, ...] = (
    "read_error",  # the shard could not be opened or read (missing file, failing pipe: command)
    "truncated_tar",  # the tar ended without an end-of-archive block, or broke while reading; earlier samples kept
    "corrupt_header",  # a run of invalid tar header blocks (bad checksum); reading resumed at the next valid one
    "duplicate_key",  # a sample whose key already occurred in the same tar; the first occurrence is kept
    "corrupt_image",  # the image bytes do not decode
    "missing_image",
    "missing_caption",  # no .txt member, or an empty caption
    "bad_caption",  # a .txt member that is not UTF-8
    "missing_json",
    "bad_json",  # a .json member that does not parse to an object
    "missing_size",  # json lacks original_width/original_height while min_size is set
    "missing_punsafe",
    "missing_watermark",
    "missing_aesthetic",
    "missing_latents",  # a split that uses precomputed latents (ldm.data.latents): the sample has none
    "bad_latents",  # its latent_moments.npy does not load, or does not fit the image
)
FILTER_REASONS: tuple[str, ...] = (
    "too_small",  # json size or stored image below min_size
    "too_large",  # stored image, or a planned resize of it, above max_pixels (ldm.data.rgb.ImageLimits)
    "extreme_aspect",  # long side / short side above max_aspect_ratio
    "filtered_punsafe",
    "filtered_watermark",
    "filtered_aesthetic",
    "filtered_words",
)
COUNTERS: tuple[str, ...] = ("ok", "shards", *BAD_REASONS, *FILTER_REASONS)
_INDEX = {name: i for i, name in enumerate(COUNTERS)}


class BadDataError(RuntimeError):
    """Too large a fraction of the data read so far was bad; the message names the shard to inspect."""


class SharedCounts:
    """Per-worker skip counters in shared memory.

    Args:
        num_slots: Number of rows, one per DataLoader worker (1 when loading in the main process).
    """

    def __init__(self, num_slots: int) -> None:
        self.table = torch.zeros(max(1, num_slots), len(COUNTERS), dtype=torch.int64).share_memory_()

    def row(self, slot: int):
        """The numpy view of one worker's row (writes go straight to shared memory)."""
        return self.table[slot].numpy()

    def totals(self) -> dict[str, int]:
        """Counts summed over workers, by counter name."""
        return dict(zip(COUNTERS, self.table.sum(0).tolist()))


class BadDataMonitor:
    """Counts one worker's records and raises :class:`BadDataError` past ``max_bad_fraction``.

    A record is one sample that reached a verdict (delivered, bad or filtered), or one shard-level failure.

    Args:
        row: The worker's counter row from :meth:`SharedCounts.row`.
        max_bad_fraction: Largest tolerated fraction of bad records.
        min_records: Number of records to see before the fraction is checked (avoids tripping on one early
            broken shard).
        where: Text naming the worker in messages, e.g. ``"rank 0 worker 1"``.
    """

    def __init__(self, row, max_bad_fraction: float, min_records: int, where: str) -> None:
        self.row = row
        self.max_bad_fraction = max_bad_fraction
        self.min_records = min_records
        self.where = where
        self.records = 0
        self.bad = 0
        self.per_shard: defaultdict[str, Counter] = defaultdict(Counter)
        self._warned: set[str] = set()

    def ok(self) -> None:
        self.records += 1
        self.row[0] += 1

    def shard_opened(self) -> None:
        self.row[1] += 1

    def skip(self, reason: str, url: str, detail: str = "") -> None:
        """Count one skipped record; bad reasons also update the bad fraction and may raise."""
        self.records += 1
        self.row[_INDEX[reason]] += 1
        if reason not in self._warned:  # one warning per reason per worker; the rest at debug level
            self._warned.add(reason)
            log.warning("%s: skipping (%s) in %s %s (further '%s' skips are logged at debug level)",
                        self.where, reason, url, detail, reason)
        else:
            log.debug("%s: skipping (%s) in %s %s", self.where, reason, url, detail)
        if reason in FILTER_REASONS:
            return
        self.bad += 1
        self.per_shard[url][reason] += 1
        self._check(url)

    def _check(self, url: str) -> None:
        if self.records < self.min_records or self.bad <= self.max_bad_fraction * self.records:
            return
        worst = sorted(self.per_shard.items(), key=lambda kv: -sum(kv[1].values()))[:3]
        worst_txt = "; ".join(f"{u}: {dict(c)}" for u, c in worst)
        raise BadDataError(
            f"{self.where}: {self.bad} of {self.records} records were bad "
            f"({self.bad / self.records:.1%} > max_bad_fraction {self.max_bad_fraction:.1%}). "
            f"Last bad shard: {url} ({dict(self.per_shard[url])}). Worst shards: {worst_txt}. "
            "Inspect or remove these shards, or raise max_bad_fraction."
        )

    def counts(self) -> dict[str, int]:
        """This worker's non-zero counts by name (saved with a stream position)."""
        return {name: int(v) for name, v in zip(COUNTERS, self.row.tolist()) if v}

    def restore(self, counts: dict[str, int], records: int, bad: int) -> None:
        """Continue counting from a saved :meth:`counts` (names this version does not know are dropped)."""
        self.row[:] = 0
        for name, value in counts.items():
            if name in _INDEX:
                self.row[_INDEX[name]] = value
        self.records, self.bad = records, bad

    def summary(self) -> str:
        return f"{self.where}: {self.counts()}"


__all__ = ["BAD_REASONS", "COUNTERS", "FILTER_REASONS", "BadDataError", "BadDataMonitor", "SharedCounts"]
