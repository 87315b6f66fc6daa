"""Samples of one tar shard: shard URL lists, members grouped into samples, duplicate keys, resume offsets.

Built on :mod:`ldm.data.tarstream` (byte level). A sample is what webdataset calls one: consecutive members that
share a key (the path up to the first dot of the file name) and have distinct extensions. Every raw sample
carries its position, ``(shard index, byte offset)`` under :data:`POS_KEY`, so a stream can save where it is
and read exactly that sample back later (:func:`read_groups`).
"""

from __future__ import annotations

import glob
import logging
import re
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from webdataset.shardlists import expand_urls

from ldm.data.stats import BadDataMonitor
from ldm.data.tarstream import READ_ERRORS, ShardFile, TarScanner
from ldm.util import ConfigError

log = logging.getLogger(__name__)
_MEMBER = re.compile(r"^((?:.*/)?[^./][^/]*?)\.([^/]*)$")  # key = path up to the first dot of the file name
POS_KEY = "__pos__"  # (shard index, byte offset) of a raw sample; never reaches a batch


def is_local(url: str) -> bool:
    """True for a file path; False for ``pipe:`` commands and ``scheme://`` URLs."""
    return not url.startswith("pipe:") and "://" not in url


def _glob(url: str, where: str) -> list[str]:
    """A local URL with ``*``, ``?`` or ``[...]`` as the sorted files it matches (the URL itself if it exists)."""
    if not is_local(url) or not glob.has_magic(url) or Path(url).exists():
        return [url]
    matches = sorted(glob.glob(url))
    if not matches:
        raise ConfigError(f"'{where}': the glob '{url}' matches no files; check the folder, or give a brace "
                          "pattern ('/path/{00000..00009}.tar') or a list")
    return matches


def expand_shards(shards: str | Sequence[str], tar_base: str | None = None, where: str = "shards") -> list[str]:
    """Expand brace patterns (``{00000..00099}``) and local globs (``/data/*.tar``) into a flat URL list.

    With ``tar_base`` set, each pattern is joined to it with ``/`` (ldm's ``tar_base`` + ``shards``). A glob is
    expanded to its matches in sorted order, so every rank and every resume sees the same list while the folder
    does not change; one that matches nothing is a :class:`ConfigError`. Remote and ``pipe:`` URLs are never
    globbed, and nothing is opened: building a pipeline never touches the network or the shards.
    """
    patterns = [shards] if isinstance(shards, str) else list(shards)
    if not patterns or not all(isinstance(p, str) for p in patterns):
        raise ConfigError(f"'{where}' must be a brace pattern or a non-empty list of them, got {shards!r}")
    urls: list[str] = []
    for pattern in patterns:
        pattern = pattern.strip()  # COMPAT: the SD2 yaml's validation URL ends in "- " (trailing space)
        if tar_base:
            pattern = f"{tar_base.rstrip('/')}/{pattern.lstrip('/')}"
        for url in expand_urls(pattern):
            urls.extend(_glob(url.strip(), where))
    if not urls:
        raise ConfigError(f"'{where}' expanded to no shard URLs")
    return urls


def check_local_shards(urls: Sequence[str], pattern: Any, key: str) -> None:
    """Fail fast when none of the *local* shard files in ``urls`` exist (remote and ``pipe:`` URLs are not checked).

    All missing is a :class:`ConfigError` naming ``key`` and the ``pattern``; some missing is a warning (those
    shards are then counted as ``read_error`` and skipped, as LAION downloads miss a few).
    """
    local = [u for u in urls if is_local(u)]
    missing = [u for u in local if not Path(u).is_file()]
    if local and len(missing) == len(local):
        raise ConfigError(f"{key}: none of the {len(local)} local shard files of {pattern!r} exist (first: "
                          f"{missing[0]}). Check the path or override {key}=...")
    if missing:
        log.warning("%s: %d of %d shard files are missing (first: %s); they will be skipped", key, len(missing),
                    len(local), missing[0])


def shard_name(url: str) -> str:
    """The tar file name in a URL or ``pipe:`` command: ``pipe:aws s3 cp s3://b/p/00001.tar -`` -> ``00001.tar``."""
    tokens = [t for t in url.split() if ".tar" in t or ".tgz" in t] or [url]
    return tokens[-1].rstrip("/").rsplit("/", 1)[-1]


def _split_member(name: str) -> tuple[str, str] | None:
    match = _MEMBER.match(name)
    return None if match is None else (match.group(1), match.group(2).lower())


class ShardReader:
    """The samples of one shard, from byte ``start`` on, with every failure counted on ``mon``.

    Members are grouped into samples as webdataset does: consecutive members with the same key and distinct
    extensions. A later group whose key already occurred in this tar is counted as ``duplicate_key`` and not
    delivered (the first occurrence wins). A shard that cannot be opened, or is not a tar, counts as
    ``read_error``; one that ends without an end-of-archive block, or fails while reading, as ``truncated_tar``
    (every sample before the break is kept; a sample that lost a member is passed on without it, and the sample
    checks count what it lacks); a run of corrupt header blocks as ``corrupt_header`` (reading resumes at the
    next valid header, so only the member whose header broke is lost).

    ``next_offset`` is where the first sample not yet delivered starts (None once the shard is exhausted), so
    ``ShardReader(url, mon, start=reader.next_offset)`` continues exactly there. Before ``start`` only headers
    are read (the keys, for the duplicate check) and nothing is counted again.

    Args:
        url: The shard URL.
        mon: The skip counter: a :class:`BadDataMonitor`, or anything with its ``skip(reason, url, detail)``
            and ``shard_opened()``.
        start: Byte offset (in the uncompressed tar) of the first sample to deliver.
        index: The shard's index in the stream's URL list, recorded with each sample for resuming.
    """

    def __init__(self, url: str, mon: BadDataMonitor, start: int = 0, index: int = -1) -> None:
        self.url, self.mon, self.start, self.index = url, mon, int(start), index
        self.next_offset: int | None = self.start

    def __iter__(self) -> Iterator[dict[str, Any]]:
        url, mon, start = self.url, self.mon, self.start
        try:
            src = ShardFile(url)
        except Exception as e:  # missing file, bad scheme, failing pipe command
            mon.skip("read_error", url, f"{type(e).__name__}: {e}")
            self.next_offset = None
            return
        if start == 0:
            mon.shard_opened()
        scanner = TarScanner(src)
        seen: set[str] = set()
        group: dict[str, Any] | None = None
        members, counted_corrupt, error = 0, 0, None
        try:
            for member in scanner:
                counted_corrupt = self._count_corrupt(scanner, counted_corrupt)
                parts = _split_member(member.name)
                if parts is None:
                    continue
                key, ext = parts
                if member.offset < start:  # fast-forward on resume: headers only
                    seen.add(key)
                    continue
                if group is not None and (group["__key__"] != key or ext in group):
                    self.next_offset = member.offset
                    if self._new(group, seen):
                        yield group
                    group = None
                if group is None:
                    group = {"__key__": key, "__url__": url, POS_KEY: (self.index, member.offset)}
                data = scanner.read(member)
                if data is None:  # the archive ends inside this member: the sample goes on without it
                    break
                group[ext] = data
                members += 1
        except READ_ERRORS as e:  # unreadable bytes (a failing pipe, a broken gzip stream ...)
            error = e
        finally:
            src.closed_early = error is None and scanner.status == "reading"
            src.close()
        self._count_corrupt(scanner, counted_corrupt)
        if error is not None:
            reason = "truncated_tar" if members or start else "read_error"
            mon.skip(reason, url, f"after {members} members: {type(error).__name__}: {error}")
        elif not scanner.valid:
            mon.skip("read_error", url, "not a tar archive (no valid header)")
        elif scanner.status == "truncated":
            mon.skip("truncated_tar", url, f"after {members} members: the archive ends without an end block")
        self.next_offset = None
        if group is not None and self._new(group, seen):
            yield group

    def _count_corrupt(self, scanner: TarScanner, counted: int) -> int:
        for at in scanner.corrupt_at[counted:]:
            if at >= self.start and scanner.valid:
                self.mon.skip("corrupt_header", self.url, f"invalid tar header at byte {at}; resynchronised")
        return len(scanner.corrupt_at)

    def _new(self, group: dict[str, Any], seen: set[str]) -> bool:
        key = group["__key__"]
        if key in seen:
            self.mon.skip("duplicate_key", self.url, f"{key}: a sample with this key came earlier in the tar")
            return False
        seen.add(key)
        return True


def read_shard(url: str, mon: BadDataMonitor) -> Iterator[dict[str, Any]]:
    """Every sample of one shard from its start, with failures counted on ``mon`` (:class:`ShardReader`)."""
    return iter(ShardReader(url, mon))


def read_groups(url: str, offsets: Sequence[int], index: int = -1) -> dict[int, dict[str, Any]]:
    """The samples that start at ``offsets`` in one shard, as :class:`ShardReader` delivered them, read
    without counting anything (to refill a shuffle buffer). Offsets that no longer hold a sample are missing
    from the result. A local uncompressed shard is read by seeking to each sample; any other in one forward
    pass from the first offset to the last."""
    wanted = set(int(o) for o in offsets)
    out: dict[int, dict[str, Any]] = {}
    if not wanted:
        return out
    src = ShardFile(url)
    try:
        if src.seekable:
            for offset in sorted(wanted):
                src.seek(offset)
                _collect(src, url, index, {offset}, out, first_only=True)
        else:
            src.skip(min(wanted))
            _collect(src, url, index, wanted, out, first_only=False)
    except READ_ERRORS as e:
        log.warning("re-reading buffered samples of %s: %s", url, e)
    finally:
        src.closed_early = True
        src.close()
    return out


def _collect(src: ShardFile, url: str, index: int, wanted: set[int], out: dict[int, dict[str, Any]],
             first_only: bool) -> None:
    """Group members from ``src``'s position on, keeping the groups that start at a ``wanted`` offset."""
    scanner = TarScanner(src)
    last, group = max(wanted), None
    for member in scanner:
        parts = _split_member(member.name)
        if parts is None:
            continue
        key, ext = parts
        if group is not None and (group["__key__"] != key or ext in group):
            out[group[POS_KEY][1]] = group
            group = None
            if first_only:
                return
        if group is None:
            if member.offset not in wanted:
                if member.offset > last or first_only:
                    return
                continue
            group = {"__key__": key, "__url__": url, POS_KEY: (index, member.offset)}
        data = scanner.read(member)
        if data is None:
            break
        group[ext] = data
    if group is not None:
        out[group[POS_KEY][1]] = group


def key_checksum(key: str) -> int:
    return zlib.crc32(key.encode("utf-8", "surrogateescape"))


__all__ = ["POS_KEY", "ShardReader", "expand_shards", "key_checksum", "read_groups", "read_shard", "shard_name"]
