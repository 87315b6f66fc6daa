"""Reading tar shards member by member, with the byte offset of every member, so a reader can stop anywhere
and restart there later without reading (or decoding) what lies before.

Python's ``tarfile`` in stream mode (what webdataset reads shards with) does not fit, for three reasons:

* it stops without a word at a corrupt header in the middle of an archive, so a single flipped byte drops the
  rest of the shard; here a header that fails its checksum is counted and reading resynchronises at the next
  valid header (headers sit on 512-byte block boundaries);
* once the input is compressed (``.tar.gz``, ``.tgz``, ``.tar.bz2``, ``.tar.xz``) it cannot tell a complete
  archive from one truncated at a member boundary;
* resuming needs each sample's offset in the *uncompressed* tar and a way to move there without reading the data
  in between: a seek for local uncompressed shards, a read-and-discard otherwise (bounded by the shard size).

Single headers are still parsed by ``tarfile.TarInfo.frombuf`` (checksum, ustar name prefix, base-256 sizes);
GNU long names and the ``path``/``size`` records of pax headers are handled here.
"""

from __future__ import annotations

import bz2
import gzip
import io
import logging
import lzma
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from webdataset.gopen import gopen

log = logging.getLogger(__name__)

BLOCK = tarfile.BLOCKSIZE
_ZERO = bytes(BLOCK)
_SKIP_CHUNK = 1 << 20
#: exceptions that mean "the bytes of this shard are unreadable from here on"
READ_ERRORS = (OSError, EOFError, ValueError, zlib.error, lzma.LZMAError)
_EXTENDED = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.SOLARIS_XHDTYPE,
             tarfile.XGLTYPE)
_MAGIC = ((b"\x1f\x8b", lambda f: gzip.GzipFile(fileobj=f, mode="rb")), (b"BZh", bz2.BZ2File),
          (b"\xfd7zXZ\x00", lzma.LZMAFile))


class _Prepend:
    """A read-only stream that returns ``head`` and then the rest of ``raw`` (a magic-number peek undone)."""

    def __init__(self, head: bytes, raw: Any) -> None:
        self.head, self.raw = head, raw

    def read(self, size: int = -1) -> bytes:
        if not self.head:
            return self.raw.read(size)
        if size < 0:
            out, self.head = self.head + self.raw.read(), b""
            return out
        out, self.head = self.head[:size], self.head[size:]
        return out if len(out) == size else out + self.raw.read(size - len(out))

    def readable(self) -> bool:
        return True


class ShardFile:
    """The uncompressed bytes of one shard, read forward, with ``pos`` counting them.

    ``gopen`` opens the URL (local paths, ``file:``, ``pipe:``, ``http(s)://`` ...); gzip, bzip2 and xz are
    recognised by their magic number, as ``tarfile``'s ``r|*`` mode does. Only local uncompressed files can
    seek; everything else skips forward by reading and discarding.
    """

    def __init__(self, url: str) -> None:
        self.url, self.pos, self.closed_early = url, 0, False
        self.raw = self.stream = gopen(url)
        try:
            self.seekable = isinstance(self.raw, io.BufferedReader) and self.raw.seekable()
            head = self.raw.peek(6)[:6] if self.seekable else self.raw.read(6)
            opener = next((cls for magic, cls in _MAGIC if head.startswith(magic)), None)
            source = self.raw if self.seekable else _Prepend(head, self.raw)
            self.stream = self.raw if opener is None else opener(source)
        except BaseException:
            self.closed_early = True
            self.close()
            raise
        self._head = b"" if self.seekable or opener is not None else head  # a plain stream: hand the peek back
        self.compressed = opener is not None
        self.seekable = self.seekable and opener is None

    def read(self, size: int) -> bytes:
        """Up to ``size`` bytes; fewer only at the end of the data."""
        parts, left = [], size
        if self._head:
            parts.append(self._head[:size])
            self._head = self._head[size:]
            left -= len(parts[0])
        while left > 0:
            chunk = self.stream.read(left)
            if not chunk:
                break
            parts.append(chunk)
            left -= len(chunk)
        data = b"".join(parts)
        self.pos += len(data)
        return data

    def skip(self, size: int) -> None:
        """Move ``size`` bytes forward (past the end is allowed: the next read then returns nothing)."""
        if size <= 0:
            return
        if self.seekable:
            self.stream.seek(size, io.SEEK_CUR)
            self.pos += size
            return
        while size > 0:
            got = len(self.read(min(size, _SKIP_CHUNK)))
            if not got:
                return
            size -= got

    def seek(self, pos: int) -> None:
        """Jump to byte ``pos`` (local uncompressed shards only)."""
        if not self.seekable:
            raise io.UnsupportedOperation(f"{self.url}: only local uncompressed shards can seek")
        self.stream.seek(pos)
        self.pos = pos

    def close(self) -> None:
        for f in dict.fromkeys((self.stream, self.raw)):  # the decompressor (if any), then the source
            try:
                f.close()
            except OSError as e:  # a pipe: command that exits non-zero (also when we stopped reading early)
                (log.debug if self.closed_early else log.warning)("closing %s: %s", self.url, e)


@dataclass
class Member:
    """A regular file in the tar. ``offset`` is where its first header block starts (a GNU long-name or pax
    header when there is one), in bytes of the uncompressed archive; reading again from there gives it back."""

    name: str
    offset: int
    size: int


def _pax_records(data: bytes) -> dict[str, str]:
    """``path`` and ``size`` (and any other) records of a pax extended header: ``"<len> <key>=<value>\\n"``."""
    out, pos = {}, 0
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0:
            break
        try:
            length = int(data[pos:space])
        except ValueError:
            break
        if length <= 0:
            break
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        out[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


def _padded(size: int) -> int:
    return -(-size // BLOCK) * BLOCK


class TarScanner:
    """Iterate the regular-file members of a tar stream, lazily: a member's data is read only when asked for
    (:meth:`read`), otherwise skipped (a seek for local plain tars).

    After iteration ``status`` is ``"complete"`` (the data ended after an end-of-archive block) or
    ``"truncated"`` (it ended without one, inside a header, or inside a member's data). ``corrupt`` counts
    runs of blocks that are neither a valid header nor zeros (each run is one resynchronisation), and
    ``corrupt_at`` holds the offset where each run started.

    Args:
        src: The opened shard, positioned at a header boundary.
    """

    def __init__(self, src: ShardFile) -> None:
        self.src = src
        self.status = "reading"
        self.valid = 0  # valid headers and zero blocks seen: none at all means "not a tar archive"
        self.corrupt_at: list[int] = []
        self._unread = 0  # bytes (data + padding) of the current member still to skip
        self._data_left = 0

    def __iter__(self) -> Iterator[Member]:
        src = self.src
        long_name: str | None = None
        pax_size: int | None = None
        first: int | None = None  # offset of the first (extended) header of the member being assembled
        end_seen = resyncing = False
        while True:
            src.skip(self._unread)
            self._unread = self._data_left = 0
            at = src.pos
            block = src.read(BLOCK)
            if len(block) < BLOCK:  # the data ends here; a complete archive ended with a zero block first
                self.status = "complete" if end_seen and not any(block) else "truncated"
                return
            if block == _ZERO:
                self.valid += 1
                end_seen, resyncing, long_name, pax_size, first = True, False, None, None, None
                continue
            try:
                info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
            except (tarfile.HeaderError, ValueError):
                if not resyncing:
                    resyncing = True
                    self.corrupt_at.append(at)
                long_name, pax_size, first = None, None, None
                continue
            self.valid += 1
            end_seen = resyncing = False
            first = at if first is None else first
            size = info.size if pax_size is None else pax_size
            if info.type in _EXTENDED:  # describes the next member; its data is read here
                data = src.read(_padded(info.size))[: info.size]
                if info.type == tarfile.GNUTYPE_LONGNAME:
                    long_name = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                elif info.type in (tarfile.XHDTYPE, tarfile.SOLARIS_XHDTYPE):
                    records = _pax_records(data)
                    long_name = records.get("path", long_name)
                    pax_size = int(records["size"]) if records.get("size", "").isdigit() else None
                continue  # (GNU long link names and global pax headers are read past)
            name, offset = long_name or info.name, first
            long_name, pax_size, first = None, None, None
            self._unread, self._data_left = _padded(size), size
            if info.isreg():  # directories, links and devices have nothing to deliver
                yield Member(name, offset, size)

    def read(self, member: Member) -> bytes | None:
        """The data of the member just yielded, or None when the archive ends inside it (then truncated)."""
        data = self.src.read(self._data_left)
        if len(data) < member.size:
            self._unread = self._data_left = 0
            self.status = "truncated"
            return None
        self._unread -= len(data)
        self._data_left = 0
        return data

    @property
    def corrupt(self) -> int:
        return len(self.corrupt_at)


__all__ = ["BLOCK", "READ_ERRORS", "Member", "ShardFile", "TarScanner"]
