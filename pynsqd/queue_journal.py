"""pynsqd's journal beside a disk queue (``--sync-every=1`` mode).

go-diskqueue's metadata holds one read position, so on its own it cannot say
that a record *after* an older unfinished one was finished, when a deferred
record is due, or how far a topic's backlog was already copied into a channel.
The journal keeps those facts in a file of its own that Go ignores
(``<queue>.pynsqd-journal.<generation>``), appended to in the same group commit
as the queue's data, so the records themselves stay in Go's format.

Every fact names a record by its position key (``file << 40 | offset``) *and*
its message id, so a fact about a record that was never written (a crash or a
full disk between the journal write and the data write) cannot attach to
another record later written at the same place.

Entries (``[u16 n][n bytes: kind + fields][u32 crc32]``, big-endian):

- ``ACK key id``: the record was finished (it may lie after the read position).
- ``NOTE key id value``: a number kept for the record: a channel's due time
  (unix ns) or a topic's publish-time delay (ns); the latest one counts.
- ``REQUEUE old id new``: the record at ``old`` was stored again at ``new``;
  the old one counts as finished if the new one is on disk with that id.
- ``INTENT first id0 last id1 mark``: a batch copied from the topic is about
  to be written from ``first`` to ``last``; written before the data.
- ``MARK mark``: batches from the topic up to ``mark`` (a topic position key)
  are in this queue.
- ``SKIP lo hi``: the records in [lo, hi) are the remains of a batch a crash
  cut short: not served (the topic still has them).

Compaction starts a new generation holding only the live facts; the old one
is deleted after the next sync has made the new one and the metadata durable,
and a reader takes the union of every generation present, in order.
"""

from __future__ import annotations

import os
import struct
import zlib
from typing import Any

ACK = 1
NOTE = 2
REQUEUE = 3
INTENT = 4
MARK = 5
SKIP = 6

_HEAD = struct.Struct(">H")
_CRC = struct.Struct(">I")
_BODIES = {
    ACK: struct.Struct(">q16s"),
    NOTE: struct.Struct(">q16sq"),
    REQUEUE: struct.Struct(">q16sq"),
    INTENT: struct.Struct(">q16sq16sq"),
    MARK: struct.Struct(">q"),
    SKIP: struct.Struct(">qq"),
}

POS_BITS = 40


def key(num: int, pos: int) -> int:
    """The position key of a record: file number and offset in one sortable int."""
    return (num << POS_BITS) | pos


def split_key(k: int) -> tuple[int, int]:
    return k >> POS_BITS, k & ((1 << POS_BITS) - 1)


def entry(kind: int, *fields: Any) -> bytes:
    body = bytes((kind,)) + _BODIES[kind].pack(*fields)
    return _HEAD.pack(len(body)) + body + _CRC.pack(zlib.crc32(body))


def decode(data: bytes) -> tuple[list[tuple[Any, ...]], int]:
    """(entries as (kind, *fields), length of the intact prefix)."""
    out: list[tuple[Any, ...]] = []
    pos = 0
    n = len(data)
    while pos + 2 <= n:
        (size,) = _HEAD.unpack_from(data, pos)
        end = pos + 2 + size + 4
        if size < 1 or end > n:
            break
        body = data[pos + 2 : pos + 2 + size]
        if _CRC.unpack_from(data, end - 4)[0] != zlib.crc32(body):
            break
        layout = _BODIES.get(body[0])
        if layout is None or layout.size != size - 1:
            break
        out.append((body[0], *layout.unpack_from(body, 1)))
        pos = end
    return out, pos


class QueueJournal:
    """The journal files of one queue; appends are buffered until ``flush()``
    (or written at once with ``write_now()`` where order against the data matters)."""

    def __init__(self, data_path: str, name: str, log: Any) -> None:
        self.data_path = data_path
        self._prefix = f"{name}.pynsqd-journal."
        self._log = log
        self._fd: int | None = None
        self._gen = 0
        self.size = 0  # bytes in the current generation
        self._buf = bytearray()
        self._retired: list[int] = []  # older generations: deleted after the next sync
        self._unsynced = False
        self._new_file = False

    def _path(self, gen: int) -> str:
        return os.path.join(self.data_path, f"{self._prefix}{gen}")

    def generations(self) -> list[int]:
        gens = []
        try:
            names = os.listdir(self.data_path)
        except OSError:
            return []
        for fn in names:
            if fn.startswith(self._prefix):
                tail = fn[len(self._prefix) :]
                if tail.isascii() and tail.isdigit():
                    gens.append(int(tail))
        return sorted(gens)

    def load(self) -> list[tuple[Any, ...]]:
        """Every intact entry of every generation, oldest first.  Appending
        continues in a new generation (the caller writes a snapshot into it)."""
        entries: list[tuple[Any, ...]] = []
        gens = self.generations()
        for gen in gens:
            with open(self._path(gen), "rb") as fh:
                data = fh.read()
            got, good = decode(data)
            if good != len(data):
                self._log.warning(
                    "journal ends in a torn entry, ignoring the rest", file=self._path(gen), pos=good, size=len(data)
                )
            entries.extend(got)
        self._retired = gens
        self._gen = (gens[-1] + 1) if gens else 0
        return entries

    @property
    def exists(self) -> bool:
        return self._fd is not None or bool(self._retired)

    def append(self, data: bytes) -> None:
        self._buf += data

    @property
    def pending(self) -> bool:
        return bool(self._buf)

    def _open(self) -> int:
        if self._fd is None:
            self._fd = os.open(self._path(self._gen), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            self.size = 0
            self._new_file = True
        return self._fd

    def write_now(self, data: bytes = b"") -> None:
        """Write the buffer and ``data`` (raises OSError; then nothing of it counts)."""
        if not self._buf and not data:
            return
        out = bytes(self._buf) + data
        fd = self._open()
        try:
            n = os.pwrite(fd, out, self.size)
            if n != len(out):
                raise OSError(28, "short write to the journal")
        except OSError:
            try:
                os.ftruncate(fd, self.size)  # a torn entry would hide every later one
            except OSError:
                pass
            raise
        self.size += len(out)
        self._buf.clear()
        self._unsynced = True

    def start_generation(self, snapshot: bytes) -> None:
        """Continue in a new file holding ``snapshot`` (the live facts); the
        current files go once the next sync has completed."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            self._retired.append(self._gen)
            self._gen += 1
        self._buf = bytearray(snapshot)  # kept for the next flush if this write fails
        self.write_now()

    def prepare_sync(self) -> tuple[int | None, list[int], bool]:
        """Flush the buffer; (a dup of the fd to fsync or None, generations
        to delete after the metadata, whether a file was created)."""
        self.write_now()
        fd = os.dup(self._fd) if self._fd is not None and self._unsynced else None
        self._unsynced = False
        new_file, self._new_file = self._new_file, False
        retired, self._retired = self._retired, []
        return fd, retired, new_file

    def retire_failed(self, gens: list[int]) -> None:
        """A sync failed: its generations are still needed until the next one."""
        self._retired.extend(gens)

    def remove(self, gens: list[int]) -> None:
        for gen in gens:
            try:
                os.unlink(self._path(gen))
            except FileNotFoundError:
                pass
            except OSError as e:
                self._log.error("cannot remove an old journal", file=self._path(gen), error=str(e))

    def close(self) -> None:
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = None

    def delete(self) -> None:
        """Remove every generation (the queue is deleted or emptied)."""
        self.close()
        self._buf.clear()
        self.remove(self.generations())
        self._retired = []
        self._gen += 1
        self.size = 0
