"""A FIFO of byte records on disk, in go-diskqueue's format (Go nsqd 1.3.0).

Layout, shared with Go so either daemon can take over the other's data dir::

    <data_path>/<name>.diskqueue.000000.dat   records: [int32 BE length][payload]
    <data_path>/<name>.diskqueue.meta.dat     "%d\\n%d,%d\\n%d,%d\\n" =
        depth, readFileNum,readPos, writeFileNum,writePos

A record goes to a fresh file when ``writePos > 0`` and it would take the file
past ``max_bytes_per_file`` (a record larger than that gets a file of its own).
A file is read to the end of its records, then deleted.

Durability (group commit): put/get never fsync.  The owner calls ``sync()``,
or ``prepare_sync()`` on the event loop and runs the returned closure in a
worker thread, when ``sync_due`` (after a batch of commands, before replying)
or ``dirty`` (periodic tick).  The closure fsyncs the data written before it
was prepared, then atomically replaces the metadata with the positions of that
moment, and only then deletes the files those positions have moved past: a
crash at any step leaves either the old metadata and every file it names, or
the new one.

Tracked reads (``track_acks=True``, pynsqd's ``--sync-every=1`` mode): a
record read with ``get_tracked()`` stays on disk until it is ``ack()``-ed:
the persisted read position is that of the oldest unacknowledged record, so
after a crash every message that was in flight comes back (with the attempts
``set_attempts()`` wrote into its record in place).  What the metadata cannot
hold goes into the queue's journal (``queue_journal.py``), made durable by
the same sync: acknowledgements after an older unacknowledged record (those
records are skipped after a crash), a number kept per record (``notes``: due
times), records stored again (``put_again()``), and how far a topic's backlog
was copied into this queue (``mark``, with a crash in the middle of a copy
detected and its remains skipped).  A token is the record's position key.
``depth()`` leaves out the unread records the journal says will be passed
over, so it counts exactly what will be served; the metadata's depth stays
go-diskqueue's count of every record after its read position (Go serves them).

Recovery treats the metadata as a hint checked against the files: at start
every unread file is scanned, so depth, the write position and a torn or
corrupt tail are taken from the records themselves.  Good records before a
corrupt spot are served, new writes go to a fresh file, and a corrupt file is
renamed ``.bad`` once it has been read (never appended to, never renamed in a
loop).  The read position is believed only where the metadata agrees with
the files (its window between read and write position holds ``depth``
records, and the read position lies within its file's records); then files
before it are leftovers of a crash between metadata and unlink, and go.
Otherwise no file it says was read is deleted: the records its depth still
counts as unread are served (the last ones before its read position, never
more), and the rest are kept in ``.bad`` files, with one ERROR line saying how
many of each.  A shortfall explained by damage (records lost, not
misplaced) and a depth larger than everything on disk only recount; where a
file of its window is gone, its positions are followed but the records
before its read position are kept, not deleted.  Every data file of the
queue is found from a directory listing (one for all queues at start-up),
never by probing numbers, so no file beyond a gap is orphaned.
"""

from __future__ import annotations

import errno
import os
import random
import re
import struct
import threading
from collections import deque
from itertools import chain
from collections.abc import Iterator
from typing import Any, Callable, NamedTuple

from . import queue_journal as qj
from .backend_queue import BackendError, SyncNotifier
from .fsutil import fsync_dir, fsync_files
from .fsutil import unlink_quiet as _unlink_quiet
from .log import get_logger

_LEN = struct.Struct(">i")  # signed like Go's int32: a negative length is corruption
_ATTEMPTS = struct.Struct(">H")
_READ_CHUNK = 64 * 1024  # per pread while serving get(); freed once consumed
_SCAN_CHUNK = 1024 * 1024  # per pread while scanning at start
_JOURNAL_COMPACT_MIN = 1 << 20  # journal bytes before compaction is considered
_JOURNAL_SPENT_MIN = 64 << 10  # ... or once the read position has passed every fact
_META_RE = re.compile(rb"\s*(-?\d+)\s*\n\s*(-?\d+)\s*,\s*(-?\d+)\s*\n\s*(-?\d+)\s*,\s*(-?\d+)\s*\n?\s*\Z")

_Meta = tuple[int, int, int, int, int]  # depth, read file, read pos, write file, write pos


class DiskQueue(SyncNotifier):
    """go-diskqueue compatible ``BackendQueue``; see the module docstring.

    Not thread-safe except for the closure from ``prepare_sync()``, which may
    run in a worker thread while the owner keeps calling put/get.
    """

    def __init__(
        self,
        name: str,
        data_path: str,
        *,
        max_bytes_per_file: int,
        min_msg_size: int,
        max_msg_size: int,
        sync_every: int,
        logger: Any = None,
        on_sync_due: Callable[[DiskQueue], None] | None = None,
        track_acks: bool = False,
        data_files: list[int] | None = None,
    ) -> None:
        self.name = name
        # this queue's data file numbers, when the owner listed the directory
        # once for many queues (start-up); else recovery lists it itself
        self._listed = data_files
        self.data_path = data_path
        self._max_bytes = max_bytes_per_file
        self._min = min_msg_size
        self._max = max_msg_size
        self._sync_every = max(1, sync_every)
        self._log = logger if logger is not None else get_logger(queue=name)
        self._on_sync_due = on_sync_due
        self._base = f"{name}.diskqueue."
        self._meta_path = os.path.join(data_path, self._base + "meta.dat")
        # positions, as persisted
        self._depth = 0
        self._rfn = 0
        self._rpos = 0
        self._wfn = 0
        self._wpos = 0
        # completed files not yet fully read -> end of their good records
        self._ends: dict[int, int] = {}
        self._bad: set[int] = set()  # files with a corrupt tail: renamed .bad once read
        self._wfd: int | None = None
        self._rfd: int | None = None
        # read buffer: self._rbuf[self._roff:] are the file's bytes from self._rpos on
        self._rbuf = b""
        self._roff = 0
        # sync bookkeeping
        self._ops = 0  # records written + read since the last prepare_sync
        self._force_sync = False  # a file changed hands (roll, read past): sync soon, as Go does
        self._due_notified = False
        self._unsynced_files: list[int] = []  # rolled files, fsynced by the next sync
        self._pending_delete: list[tuple[int, bool]] = []  # (file, bad), read past: delete after the meta
        self._dir_dirty = False  # a file was created: fsync the directory on sync
        self._generation = 0  # bumped by empty()/delete(): in-flight syncs must not write their meta
        self._meta_lock = threading.Lock()  # orders a sync's meta rename against empty()/delete()
        self._write_failed = False
        self._sync_failed = False
        self._closed = False
        # tracked reads: [key, acked, id, note] in read order; the first is
        # the oldest unacknowledged record (acked ones are popped off the left)
        self.track_acks = track_acks
        self._tokens: dict[int, list[Any]] = {}
        self._outstanding: deque[list[Any]] = deque()
        # the journal (tracked reads only) and what it says about unread records
        self._journal: qj.QueueJournal | None = None
        self._journal_limit = _JOURNAL_COMPACT_MIN
        self._journal_top = -1  # the highest record key a journal fact names
        self._skip: dict[int, bytes] = {}  # key -> id: finished before a crash
        self._skip_range: tuple[int, int] | None = None  # remains of a copy a crash cut short
        # unread records that get_tracked() will pass over (finished before a
        # crash, remains of a cut-short copy): depth() does not count them
        self._skip_count = 0
        self._notes: dict[int, tuple[bytes, int]] = {}  # key -> (id, note)
        self.mark = -1  # topic position key up to which batches were copied here
        self._last_read = (0, 0)  # (file, pos) of the record get() returned last
        self._read_past: list[tuple[int, bool]] = []  # files read past, kept until committed past
        self._patch_fds: dict[int, int] = {}  # files whose attempts fields we rewrite
        self._patched_files: set[int] = set()
        # message id -> record: blocks of the unread records with their id range,
        # built on the first lookup (inspection), extended by later ones
        self._id_blocks: list[IdBlock] = []
        self._id_indexed: tuple[int, int] | None = None  # (file, pos) indexed up to
        # syscalls that tests replace to inject failures
        self._pwrite: Callable[[int, Any, int], int] = os.pwrite
        self._fsync: Callable[[int], None] = os.fsync
        try:
            self._recover()
            if track_acks:
                self._open_journal()
        except OSError as e:
            self._close_files()
            if self._journal is not None:
                self._journal.close()
            raise BackendError(f"diskqueue {name}: cannot open: {e}") from e

    # ------------------------------------------------------------------ state

    def depth(self) -> int:
        """The records that will still be served: those from the read position
        on, less the ones the journal says were finished before a crash (the
        metadata keeps go-diskqueue's count of every record, for Go)."""
        return max(0, self._depth - self._skip_count)

    @property
    def dirty(self) -> bool:
        """Something was written or read (or a sync failed) since the last sync."""
        return self._ops > 0 or self._force_sync or self._sync_failed

    @property
    def sync_due(self) -> bool:
        """``sync_every`` records went through, or a file was rolled or read past."""
        return self._ops >= self._sync_every or self._force_sync

    @property
    def healthy(self) -> bool:
        """False after a failed write (until one succeeds) or a failed sync (until one succeeds)."""
        return not (self._write_failed or self._sync_failed)

    def _file(self, num: int) -> str:
        return os.path.join(self.data_path, f"{self._base}{num:06d}.dat")

    # ------------------------------------------------------------------ writing

    def put(self, data: bytes) -> None:
        if self._closed:
            raise BackendError("diskqueue closed")
        n = len(data)
        if n < self._min or n > self._max:
            raise BackendError(f"invalid message write size ({n}) minMsgSize={self._min} maxMsgSize={self._max}")
        pos = self._wpos
        if pos > 0 and pos + 4 + n > self._max_bytes:
            self._write(self._split([data], [n]), 1)
            return
        record = _LEN.pack(n) + data
        fd = self._wfd
        if fd is None:  # the write file is still to be opened
            self._write([(self._wfn, pos, record)], 1)
            return
        # the usual case (a PUB's record into the open file): one pwrite
        try:
            self._write_all(fd, record, pos)
        except OSError as e:
            raise self._write_failure([(self._wfn, pos, record)], [fd], e) from e
        self._wpos = pos + 4 + n
        self._written(1)

    def put_many(self, items: list[bytes], notes: list[int] | None = None, mark: int | None = None) -> None:
        """Append ``items`` all or none.  With tracked reads, ``notes`` (one per
        item, 0 for none) are kept for ``get_tracked()``, and ``mark`` says the
        items are a batch copied from a topic up to that topic position key:
        the journal learns both before the data is written."""
        journaled = (notes is not None or mark is not None) and self._journal is not None
        if len(items) == 1 and not journaled:
            self.put(items[0])  # a PUB's: without the batch bookkeeping
            return
        lens = self._check_sizes(items)
        if not lens:
            return
        if journaled:
            self._put_journaled(items, lens, notes, mark, None)
            return
        self._put_lens(items, lens)

    def put_again(self, items: list[bytes], tokens: list[int | None], notes: list[int] | None = None) -> None:
        """Store records again at the tail (REQ, timeout, shutdown), each in
        place of the unacknowledged record read with its token (None: none).
        An old record counts as finished once its copy is on disk, so a crash
        in between leaves exactly one of the two.  ``notes`` as in put_many."""
        lens = self._check_sizes(items)
        if not lens:
            return
        if self._journal is None:
            self._put_lens(items, lens)
            for token in tokens:
                if token is not None:
                    self.ack(token)
            return
        self._put_journaled(items, lens, notes, None, tokens)

    def _check_sizes(self, items: list[bytes]) -> list[int]:
        if self._closed:
            raise BackendError("diskqueue closed")
        if not items:
            return []
        lens = list(map(len, items))
        lo, hi = min(lens), max(lens)
        if lo < self._min or hi > self._max:
            bad = lo if lo < self._min else hi
            raise BackendError(f"invalid message write size ({bad}) minMsgSize={self._min} maxMsgSize={self._max}")
        return lens

    def _put_lens(self, items: list[bytes], lens: list[int]) -> None:
        total = sum(lens) + 4 * len(lens)
        if self._wpos + total <= self._max_bytes:
            # common case, no roll: one bytes object, one write
            if lens.count(lens[0]) == len(lens):
                # every record of one size (a batch): its length prefix is the separator
                prefix = _LEN.pack(lens[0])
                data = prefix + prefix.join(items)
            else:
                data = b"".join(chain.from_iterable(zip(map(_LEN.pack, lens), items)))
            self._write([(self._wfn, self._wpos, data)], len(items))
        else:
            self._write(self._split(items, lens), len(items))

    def _put_journaled(
        self, items: list[bytes], lens: list[int], notes: list[int] | None, mark: int | None, replaced: list[int | None] | None
    ) -> None:
        """The journal first (facts checked against the data on recovery), then the data."""
        keys = self._keys(lens)
        entry = qj.entry
        facts = []
        if mark is not None:
            facts.append(entry(qj.INTENT, keys[0], items[0][10:26], keys[-1], items[-1][10:26], mark))
        if replaced is not None:
            tokens = self._tokens
            facts.extend(
                entry(qj.REQUEUE, t, tokens[t][2], k) for t, k in zip(replaced, keys) if t is not None and t in tokens
            )
        if notes is not None:
            facts.extend(entry(qj.NOTE, k, item[10:26], n) for k, item, n in zip(keys, items, notes) if n)
        self._journal_now(b"".join(facts), keys[-1])
        self._put_lens(items, lens)
        if notes is not None:
            for k, item, n in zip(keys, items, notes):
                if n:
                    self._notes[k] = (item[10:26], n)
        if mark is not None and mark > self.mark:
            self.mark = mark
            self._journal_add(entry(qj.MARK, mark))
        if replaced is not None:
            for t in replaced:
                if t is not None:
                    self._ack(t, journal=False)

    def reset_mark(self) -> None:
        """Forget how far a topic's backlog was copied here (it does not match the topic)."""
        self.mark = -1
        if self._journal is not None:
            self._journal_add(qj.entry(qj.MARK, -1))

    def _keys(self, lens: list[int]) -> list[int]:
        """Position keys the records of a batch will get (as ``_split`` cuts it)."""
        num, pos = self._wfn, self._wpos
        out = []
        for n in lens:
            size = 4 + n
            if pos > 0 and pos + size > self._max_bytes:
                num, pos = num + 1, 0
            out.append(qj.key(num, pos))
            pos += size
        return out

    def end_key(self) -> int:
        """The position key the next record will get (at least)."""
        return qj.key(self._wfn, self._wpos)

    def next_keys(self, items: list[bytes]) -> list[int]:
        """The position keys (tokens) ``put_many(items)`` will give its records."""
        return self._keys([len(i) for i in items])

    def bytes_queued(self) -> int:
        """Bytes on disk (length prefixes included) of the records not yet
        read: from the read position to the write position."""
        rfn, wfn = self._rfn, self._wfn
        if rfn == wfn:
            return max(0, self._wpos - self._rpos)
        ends = self._ends
        total = ends.get(rfn, 0) - self._rpos + self._wpos
        for num, end in ends.items():
            if rfn < num < wfn:
                total += end
        return total

    # ------------------------------------------------------------------ moves between queues (recovery)

    def is_done(self, token: int, msg_id: bytes) -> bool:
        """At start, before anything is read: was the record at ``token``
        finished (read past, or acknowledged in the journal)?"""
        if token < qj.key(self._rfn, self._rpos):
            return True
        return self._skip.get(token) == msg_id

    def discard(self, token: int, msg_id: bytes) -> bool:
        """At start: never serve the record at ``token`` if it is the message
        ``msg_id`` (the other half of a move a crash cut short; kept in the
        journal).  True if it will not be served (or is not there), False if
        it was read already or cannot be passed over (no journal)."""
        if token < qj.key(self._rfn, self._rpos):
            return False
        if self._id_at(token) != msg_id:
            return True
        if self._journal is None:
            return False
        if not self._will_skip(token, msg_id):
            self._skip_count += 1
        self._skip[token] = msg_id
        self._journal_add(qj.entry(qj.ACK, token, msg_id), token)
        return True

    def unread_ids(self) -> set[bytes]:
        """The message ids of every record not yet read (read from the files,
        without moving the read position)."""
        ids: set[bytes] = set()
        num, pos = self._rfn, self._rpos
        while True:
            end = self._wpos if num == self._wfn else self._ends.get(num)
            if end is not None and pos < end:
                try:
                    fd = os.open(self._file(num), os.O_RDONLY | os.O_CLOEXEC)
                except FileNotFoundError:
                    fd = -1
                if fd >= 0:
                    try:
                        while pos + 4 <= end:
                            head = os.pread(fd, 30, pos)
                            n = _LEN.unpack_from(head)[0] if len(head) >= 4 else 0
                            if len(head) < 30 or n < self._min or pos + 4 + n > end:
                                break
                            ids.add(head[14:30])
                            pos += 4 + n
                    finally:
                        os.close(fd)
            if num >= self._wfn:
                return ids
            num = min((n for n in self._ends if n > num), default=self._wfn)
            pos = 0

    def _split(self, items: list[bytes], lens: list[int]) -> list[tuple[int, int, bytes]]:
        """Cut a batch at file boundaries: [(file, offset, bytes)], one write per file."""
        segs: list[tuple[int, int, bytes]] = []
        num, pos, start = self._wfn, self._wpos, self._wpos
        parts: list[bytes] = []
        for data, n in zip(items, lens):
            size = 4 + n
            if pos > 0 and pos + size > self._max_bytes:
                segs.append((num, start, b"".join(parts)))  # may be empty: roll before anything was added
                num, pos, start, parts = num + 1, 0, 0, []
            parts.append(_LEN.pack(n))
            parts.append(data)
            pos += size
        segs.append((num, start, b"".join(parts)))
        return segs

    def _write(self, segs: list[tuple[int, int, bytes]], count: int) -> None:
        """Write the segments all or nothing, then commit positions and rolls."""
        fds: list[int | None] = []
        try:
            for num, start, data in segs:
                if not data:  # the batch rolls before its first record
                    fds.append(None)
                    continue
                if num == self._wfn:
                    if self._wfd is None:
                        self._wfd = os.open(self._file(num), os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
                        self._dir_dirty = self._dir_dirty or start == 0
                    fd = self._wfd
                else:
                    # nothing valid can be in a file past the write file: truncate leftovers
                    fd = os.open(self._file(num), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
                fds.append(fd)
                self._write_all(fd, data, start)
        except OSError as e:
            raise self._write_failure(segs, fds, e) from e
        for (num, start, data), fd in zip(segs, fds):
            if num != self._wfn:
                self._roll_writer()
                self._wfd = fd
                self._dir_dirty = True
            self._wpos = start + len(data)
        self._written(count)

    def _written(self, count: int) -> None:
        """``count`` records are in the files (positions already committed)."""
        self._depth += count
        self._ops += count
        self._write_failed = False
        if self._ops >= self._sync_every:
            self._notify_due()

    def _write_failure(self, segs: list[tuple[int, int, bytes]], fds: list[int | None], e: OSError) -> BackendError:
        """A write of ``segs`` failed: undo it; the error to raise."""
        self._undo(segs, fds)
        self._write_failed = True
        self._log.error("diskqueue write failed", queue=self.name, file=self._file(self._wfn), error=str(e))
        return BackendError(f"diskqueue {self.name}: write failed: {e}")

    def _write_all(self, fd: int, data: bytes, pos: int) -> None:
        # pwrite at our own offset: bytes of a failed write past _wpos get overwritten, never served
        n = self._pwrite(fd, data, pos)
        if n == len(data):
            return
        view = memoryview(data)
        done = n
        while done < len(data):
            n = self._pwrite(fd, view[done:], pos + done)
            if n <= 0:
                raise OSError(errno.EIO, "short write")
            done += n

    def _undo(self, segs: list[tuple[int, int, bytes]], fds: list[int | None]) -> None:
        """Take a failed batch back off the disk, so a restart cannot serve refused records."""
        for (num, start, _), fd in zip(segs, fds):
            if fd is None:
                continue
            try:
                if num == self._wfn:
                    os.ftruncate(fd, start)
                else:
                    os.close(fd)
                    os.unlink(self._file(num))
            except OSError as e:
                self._log.error("diskqueue cannot undo a failed write", queue=self.name, file=self._file(num), error=str(e))

    def _roll_writer(self) -> None:
        """The write file is complete: readers stop at its current end; writing moves to the next."""
        self._ends[self._wfn] = self._wpos
        if self._wfd is not None:
            os.close(self._wfd)
            self._wfd = None
        self._unsynced_files.append(self._wfn)
        self._wfn += 1
        self._wpos = 0
        self._force_sync = True
        self._notify_due()
        self._log.info("diskqueue rolled to a new file", queue=self.name, file=self._file(self._wfn))

    # ------------------------------------------------------------------ reading

    def get(self) -> bytes | None:
        buf = self._rbuf
        off = self._roff
        if off + 4 <= len(buf):
            n = _LEN.unpack_from(buf, off)[0]
            end = off + 4 + n
            if end <= len(buf) and self._min <= n <= self._max:
                self._roff = end
                self._last_read = (self._rfn, self._rpos)
                self._rpos += 4 + n
                self._depth -= 1
                self._ops += 1
                if self._ops == self._sync_every:
                    self._notify_due()
                if end == len(buf):
                    self._drained()
                return buf[off + 4 : end]
        return self._get_slow()

    def get_tracked(self) -> tuple[bytes, int, int] | None:
        """Like ``get()``, plus a token and the record's note (0 if none): the
        record stays durable until ``ack(token)``.  Records the journal says
        were finished (or are remains of a cut-short copy) are passed over."""
        while True:
            data = self.get()
            if data is None:
                return None
            rfn, rpos = self._last_read
            token = (rfn << qj.POS_BITS) | rpos
            msg_id = data[10:26]
            if (self._skip or self._skip_range is not None) and self._skipped(token, msg_id):
                self._skip_count -= 1
                continue
            note = 0
            if self._notes:
                kept = self._notes.pop(token, None)
                if kept is not None and kept[0] == msg_id:
                    note = kept[1]
            entry = [token, False, msg_id, note]
            self._tokens[token] = entry
            self._outstanding.append(entry)
            return data, token, note

    def _will_skip(self, token: int, msg_id: bytes) -> bool:
        """Would ``_skipped()`` pass over the record ``msg_id`` at ``token`` (without forgetting it)?"""
        done = self._skip.get(token)
        if done is not None:
            return done == msg_id
        span = self._skip_range
        return span is not None and span[0] <= token < span[1]

    def _skipped(self, token: int, msg_id: bytes) -> bool:
        done = self._skip.pop(token, None)
        if done is not None:
            return done == msg_id
        span = self._skip_range
        if span is not None:
            if token >= span[1]:
                self._skip_range = None
            elif token >= span[0]:
                return True
        return False

    def ack(self, token: int) -> None:
        """The record read with ``token`` is done with (finished, or stored again)."""
        self._ack(token, journal=True)

    def _ack(self, token: int, journal: bool) -> None:
        entry = self._tokens.pop(token, None)
        if entry is None:
            return
        entry[1] = True
        out = self._outstanding
        if out and out[0] is entry:
            while out and out[0][1]:
                out.popleft()
        elif journal and self._journal is not None:
            # behind an older unfinished record: the read position cannot say it
            self._journal.append(qj.entry(qj.ACK, token, entry[2]))
            if token > self._journal_top:
                self._journal_top = token
        self._ops += 1
        if self._ops == self._sync_every:
            self._notify_due()

    def set_note(self, token: int, note: int) -> None:
        """Keep ``note`` for an unacknowledged record (a due time): a crash gives it back."""
        entry = self._tokens.get(token)
        if entry is None or entry[3] == note:
            return
        entry[3] = note
        if self._journal is not None:
            self._journal_add(qj.entry(qj.NOTE, token, entry[2], note), token)

    def _journal_add(self, fact: bytes, top: int = -1) -> None:
        assert self._journal is not None
        self._journal.append(fact)
        if top > self._journal_top:
            self._journal_top = top
        self._ops += 1
        if self._ops >= self._sync_every:
            self._notify_due()

    def _journal_now(self, facts: bytes, top: int) -> None:
        """Write facts that must be on disk before the data they describe."""
        assert self._journal is not None
        if top > self._journal_top:
            self._journal_top = top
        try:
            self._journal.write_now(facts)
        except OSError as e:
            self._write_failed = True
            self._log.error("diskqueue journal write failed", queue=self.name, error=str(e))
            raise BackendError(f"diskqueue {self.name}: write failed: {e}") from e

    def set_attempts(self, token: int, attempts: int) -> None:
        """Rewrite the attempts field of an unacknowledged record in place, so
        that a message redelivered after a crash keeps its count."""
        entry = self._tokens.get(token)
        if entry is None:
            return
        num, pos = qj.split_key(token)
        try:
            if num == self._wfn and self._wfd is not None:
                fd = self._wfd
            else:
                fd = self._patch_fds.get(num)
                if fd is None:
                    fd = os.open(self._file(num), os.O_WRONLY | os.O_CLOEXEC)
                    self._patch_fds[num] = fd
            # record: [int32 len][int64 timestamp][uint16 attempts]...
            self._pwrite(fd, _ATTEMPTS.pack(min(attempts, 0xFFFF)), pos + 12)
            self._patched_files.add(num)
        except OSError as e:
            self._log.warning("diskqueue cannot update attempts", queue=self.name, file=self._file(num), error=str(e))

    def _committed(self) -> tuple[int, int, int]:
        """(file, pos, records from there to the read position) as persisted."""
        if self._outstanding:
            num, pos = qj.split_key(self._outstanding[0][0])
            return num, pos, len(self._outstanding)
        return self._rfn, self._rpos, 0

    def _drained(self) -> None:
        # release the chunk; step past a finished file now rather than on the next get()
        self._rbuf = b""
        self._roff = 0
        if self._rfn != self._wfn:
            if self._rpos >= self._ends.get(self._rfn, 0):
                self._advance_reader()
        elif self._rpos >= self._wpos:
            self._check_tail()

    def _get_slow(self) -> bytes | None:
        if self._closed:
            return None
        while True:
            if self._rfn != self._wfn and self._rpos >= self._ends.get(self._rfn, 0):
                self._advance_reader()
                continue
            end = self._wpos if self._rfn == self._wfn else self._ends[self._rfn]
            if self._rpos >= end:
                self._check_tail()
                return None
            status = self._fill(end)
            if status is True:
                return self.get()
            if status is False:
                return None
            # corruption was handled (skipped to the next file): try again

    def _fill(self, end: int) -> bool | None:
        """Buffer one whole record: True, None after skipping a corrupt file, False on an I/O error."""
        while True:
            buf, off = self._rbuf, self._roff
            have = len(buf) - off
            avail = end - self._rpos
            if have >= 4:
                n = _LEN.unpack_from(buf, off)[0]
                if n < self._min or n > self._max:
                    return self._skip_corrupt(f"invalid message read size ({n})")
                need = 4 + n
                if need > avail:
                    return self._skip_corrupt("record runs past the end of the file's data")
                if have >= need:
                    return True
            else:
                need = 4
                if avail < need:
                    return self._skip_corrupt("file ends inside a record header")
            try:
                if self._rfd is None:
                    self._rfd = os.open(self._file(self._rfn), os.O_RDONLY | os.O_CLOEXEC)
                data = os.pread(self._rfd, min(avail - have, max(_READ_CHUNK, need - have)), self._rpos + have)
            except FileNotFoundError:
                return self._skip_corrupt("file is missing")
            except OSError as e:
                self._log.error(
                    "diskqueue read failed", queue=self.name, file=self._file(self._rfn), pos=self._rpos, error=str(e)
                )
                return False
            if not data:
                return self._skip_corrupt("file is shorter than its records")
            self._rbuf = buf[off:] + data if have else data
            self._roff = 0

    def _skip_corrupt(self, reason: str) -> None:
        """Give up on the rest of the read file (someone changed it under us)."""
        num = self._rfn
        self._log.error(
            "diskqueue corrupt data, skipping the rest of the file",
            queue=self.name, file=self._file(num), pos=self._rpos, reason=reason,
        )
        if num == self._wfn:
            self._roll_writer()  # never append after garbage
        self._ends[num] = self._rpos
        self._bad.add(num)
        self._advance_reader()
        return None

    def _advance_reader(self) -> None:
        """Leave fully read files; they are deleted by the next sync, after its metadata."""
        while self._rfn != self._wfn and self._rpos >= self._ends.get(self._rfn, 0):
            done = self._rfn
            if self._rfd is not None:
                os.close(self._rfd)
                self._rfd = None
            self._rbuf = b""
            self._roff = 0
            self._ends.pop(done, None)
            if self.track_acks:
                self._read_past.append((done, done in self._bad))
            else:
                self._pending_delete.append((done, done in self._bad))
            self._bad.discard(done)
            self._rfn = min((n for n in self._ends if n > done), default=self._wfn)
            self._rpos = 0
            self._force_sync = True
            self._notify_due()
        if self._rfn == self._wfn and self._rpos >= self._wpos:
            self._check_tail()

    def _check_tail(self) -> None:
        self._skip_count = 0  # every record was read past (or lost to damage)
        if self._depth != 0:
            self._log.error("diskqueue depth wrong at the tail, resetting to 0", queue=self.name, depth=self._depth)
            self._depth = 0
            self._force_sync = True
            self._notify_due()

    # ------------------------------------------------------------------ inspection

    def _unread_spans(self) -> list[tuple[int, int, int]]:
        """(file, from, to) of the records from the read position on, in order."""
        rfn, rpos = self._rfn, self._rpos
        if rfn == self._wfn:
            return [(rfn, rpos, self._wpos)]
        spans = [(rfn, rpos, self._ends.get(rfn, rpos))]
        spans += [(n, 0, self._ends[n]) for n in sorted(self._ends) if n > rfn]
        spans.append((self._wfn, 0, self._wpos))
        return spans

    def _unread_fact(self, key: int, msg_id: bytes) -> int | None:
        """What the journal says of an unread record: None if it was finished
        before a crash (or is the remains of a cut-short copy), else its note."""
        if self._skip and self._skip.get(key) == msg_id:
            return None
        span = self._skip_range
        if span is not None and span[0] <= key < span[1]:
            return None
        kept = self._notes.get(key) if self._notes else None
        return kept[1] if kept is not None and kept[0] == msg_id else 0

    def peek(self, cost: ReadCost, head: int | None = None) -> Iterator[tuple[int, bytes, int, int]]:
        """(key, payload or its first ``head`` bytes, payload length, note) of
        each record from the read position on, in the order ``get_tracked()``
        serves them, through the queue's own descriptors-free reads: nothing of
        the queue changes (positions, buffers, sync state).  Consume it before
        the queue is used again; stop whenever enough was seen."""
        for num, start, end in self._unread_spans():
            for pos, n, data in read_records(self._file(num), start, end, self._min, self._max, head, cost):
                key = qj.key(num, pos)
                note = self._unread_fact(key, data[10:26])
                if note is not None:
                    yield key, data, n, note

    def id_index_plan(self) -> tuple[Any, list[tuple[str, int, int, int]]]:
        """(token, [(path, file, from, to)]): the unread records the id index
        does not cover yet (:func:`index_ids` builds their blocks, in any
        thread; :meth:`add_id_blocks` takes them if nothing changed the index
        or emptied the queue meanwhile)."""
        rfn, rpos = self._rfn, self._rpos
        done = self._id_indexed
        plan = []
        for num, start, end in self._unread_spans():
            if done is not None and (num, end) <= done:
                continue
            if done is not None and num == done[0]:
                start = max(start, done[1])
            if end > start:
                plan.append((self._file(num), num, start, end))
        self._id_blocks = [b for b in self._id_blocks if (b.num, b.end) > (rfn, rpos)]
        return (self._generation, done), plan

    def add_id_blocks(self, token: Any, plan: list[tuple[str, int, int, int]], blocks: list[IdBlock]) -> None:
        if token != (self._generation, self._id_indexed) or not plan:
            return  # emptied, or indexed by another lookup, meanwhile
        self._id_blocks += blocks
        self._id_indexed = (plan[-1][1], plan[-1][3])

    def id_index_behind(self) -> int:
        """Bytes written since the id index was last extended (unread part)."""
        return sum(end - start for _, _, start, end in self.id_index_plan()[1])

    def find_id(self, msg_id: bytes, cost: ReadCost, head: int = 26) -> tuple[int, bytes, int, int] | None:
        """(key, payload or its first ``head`` bytes, payload length, note) of
        the unread record holding ``msg_id``, or None.  Reads only the index
        blocks whose id range holds the id, and what the index does not cover
        yet."""
        rfn, rpos = self._rfn, self._rpos
        cost.blocks += len(self._id_blocks)
        candidates = [(self._file(b.num), b.num, b.start, b.end) for b in self._id_blocks if b.lo <= msg_id <= b.hi and (b.num, b.end) > (rfn, rpos)]
        for path, num, start, end in candidates + self.id_index_plan()[1]:
            for pos, n, data in read_records(path, start, end, self._min, self._max, max(head, 26), cost):
                if data[10:26] != msg_id or (num, pos) < (rfn, rpos):
                    continue
                key = qj.key(num, pos)
                note = self._unread_fact(key, msg_id)
                if note is not None:
                    return key, data, n, note
        return None

    # ------------------------------------------------------------------ sync

    def sync(self) -> None:
        """fsync what was written and persist the metadata, blocking; BackendError on failure."""
        self.prepare_sync()()

    def prepare_sync(self) -> Callable[[], None]:
        """Snapshot the positions now; the returned closure makes them durable.

        The closure may run in a worker thread while put/get go on; run them
        one at a time, in order.  It raises BackendError if an fsync or the
        metadata write fails (``healthy`` is then False until a sync succeeds).
        """
        if self._closed:
            return _noop
        rfn, rpos, unacked = self._committed()
        meta = f"{self._depth + unacked}\n{rfn},{rpos}\n{self._wfn},{self._wpos}\n".encode()
        if self._read_past:
            # files read past may go once no unacknowledged record is left in them
            keep = [(n, bad) for n, bad in self._read_past if n >= rfn]
            for num, bad in self._read_past:
                if num < rfn:
                    self._pending_delete.append((num, bad))
                    fd = self._patch_fds.pop(num, None)
                    if fd is not None:
                        os.close(fd)
            self._read_past = keep
        if self._patched_files:
            self._unsynced_files.extend(n for n in self._patched_files if n != self._wfn)
            self._patched_files.clear()
        journal = self._prepare_journal() if self._journal is not None else None
        wfd = os.dup(self._wfd) if self._wfd is not None else None
        files, self._unsynced_files = self._unsynced_files, []
        deletes, self._pending_delete = self._pending_delete, []
        dir_dirty, self._dir_dirty = self._dir_dirty, False
        gen = self._generation
        self._ops = 0
        self._force_sync = False
        self._due_notified = False

        def run() -> None:
            self._run_sync(meta, wfd, files, deletes, dir_dirty, gen, journal)

        return run

    def _run_sync(
        self,
        meta: bytes,
        wfd: int | None,
        files: list[int],
        deletes: list[tuple[int, bool]],
        dir_dirty: bool,
        gen: int,
        journal: tuple[int | None, list[int], bool, OSError | None] | None = None,
    ) -> None:
        # touches only its own fds, snapshot and the file system, plus a few flag writes
        jfd, retired, jerror = None, [], None
        if journal is not None:
            jfd, retired, new_journal, jerror = journal
            dir_dirty = dir_dirty or new_journal
        try:
            fsync_files([self._file(num) for num in files], [wfd, jfd], self._fsync)
            tmp = f"{self._meta_path}.{random.getrandbits(62)}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                try:
                    os.write(fd, meta)
                    self._fsync(fd)
                finally:
                    os.close(fd)
                with self._meta_lock:
                    if gen != self._generation:  # emptied or deleted since the snapshot
                        os.unlink(tmp)
                        return
                    os.replace(tmp, self._meta_path)
            except BaseException:
                _unlink_quiet(tmp)
                raise
            if dir_dirty:
                self._fsync_dir()
        except OSError as e:
            self._sync_failed = True
            self._pending_delete.extend(deletes)  # still needed; retried by the next sync
            if self._journal is not None:
                self._journal.retire_failed(retired)
            self._log.error("diskqueue sync failed", queue=self.name, error=str(e))
            raise BackendError(f"diskqueue {self.name}: sync failed: {e}") from e
        if self._journal is not None and retired:
            self._journal.remove(retired)  # the facts they held are in the current file or behind the metadata
        if jerror is not None:
            self._sync_failed = True
            raise BackendError(f"diskqueue {self.name}: journal write failed: {jerror}")
        self._sync_failed = False
        for num, bad in deletes:
            path = self._file(num)
            try:
                if bad:
                    os.replace(path, path + ".bad")
                    self._log.warning("diskqueue kept corrupt file", queue=self.name, file=path + ".bad")
                else:
                    os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError as e:
                self._log.error("diskqueue cannot remove a read file", queue=self.name, file=path, error=str(e))

    def _prepare_journal(self) -> tuple[int | None, list[int], bool, OSError | None]:
        """Compact when the journal is mostly dead facts, flush it (on the event loop, small writes)."""
        journal = self._journal
        assert journal is not None
        try:
            rfn, rpos, _ = self._committed()
            spent = self._journal_top < qj.key(rfn, rpos)  # every fact names a record behind the read position
            if journal.size > self._journal_limit or (spent and journal.size > _JOURNAL_SPENT_MIN):
                snapshot = self._journal_snapshot()
                if len(snapshot) <= journal.size // 2:
                    journal.start_generation(snapshot)
                    self._journal_limit = max(_JOURNAL_COMPACT_MIN, 2 * len(snapshot))
                else:
                    self._journal_limit = 2 * journal.size
            fd, retired, new_file = journal.prepare_sync()
            return fd, retired, new_file, None
        except OSError as e:
            self._log.error("diskqueue journal write failed", queue=self.name, error=str(e))
            return None, [], False, e

    def _journal_snapshot(self) -> bytes:
        """The live facts: everything the journal says about records from the read position on."""
        entry = qj.entry
        parts = [entry(qj.MARK, self.mark)] if self.mark >= 0 else []
        for key, acked, msg_id, note in self._outstanding:
            if acked:
                parts.append(entry(qj.ACK, key, msg_id))
            elif note:
                parts.append(entry(qj.NOTE, key, msg_id, note))
        parts.extend(entry(qj.ACK, k, msg_id) for k, msg_id in self._skip.items())
        parts.extend(entry(qj.NOTE, k, msg_id, note) for k, (msg_id, note) in self._notes.items())
        if self._skip_range is not None:
            parts.append(entry(qj.SKIP, *self._skip_range))
        return b"".join(parts)

    def _open_journal(self) -> None:
        """Read what the journal says about the records from the read position
        on; checks the facts that depend on whether data reached the disk."""
        journal = self._journal = qj.QueueJournal(self.data_path, self.name, self._log)
        facts = journal.load()
        if not facts and not journal.exists:
            return
        cursor = qj.key(self._rfn, self._rpos)
        end = qj.key(self._wfn, self._wpos)
        requeued = []
        intent = None
        for fact in facts:
            kind = fact[0]
            if kind == qj.ACK:
                if fact[1] >= cursor:
                    self._skip[fact[1]] = fact[2]
            elif kind == qj.NOTE:
                if fact[1] >= cursor:
                    if fact[3]:
                        self._notes[fact[1]] = (fact[2], fact[3])
                    else:
                        self._notes.pop(fact[1], None)
            elif kind == qj.REQUEUE:
                if fact[1] >= cursor:
                    requeued.append(fact)
            elif kind == qj.INTENT:
                intent = fact
            elif kind == qj.MARK:
                self.mark = fact[1]  # the latest: only reset_mark() lowers it
            elif kind == qj.SKIP:
                if fact[2] > cursor:
                    self._skip_range = (max(fact[1], cursor), fact[2])
        for _, old, msg_id, new in requeued:
            if old not in self._skip and self._id_at(new) == msg_id:
                self._skip[old] = msg_id
        if intent is not None and intent[5] > self.mark:
            _, first, first_id, last, last_id, mark = intent
            if self._id_at(last) == last_id:
                self.mark = mark
            elif first >= cursor and self._id_at(first) == first_id:
                # a crash cut this copy short: what reached the disk is not
                # served, the topic still holds all of it
                self._skip_range = (first, end)
                self._log.warning("diskqueue skipping the remains of an interrupted copy", queue=self.name)
        for k in [k for k in self._notes if k >= end]:
            del self._notes[k]  # about records that never reached the disk
        self._count_skipped()
        if self._skip or self._skip_range is not None:
            self._log.info("diskqueue journal: records finished before the crash are skipped", queue=self.name, count=self._skip_count)
        self._journal_top = max([-1, *self._skip, *self._notes, *(self._skip_range or ())])
        try:
            journal.start_generation(self._journal_snapshot())  # kept buffered if the disk is full
            self.sync()
        except (OSError, BackendError) as e:
            self._log.error("diskqueue cannot rewrite its journal yet", queue=self.name, error=str(e))

    def _count_skipped(self) -> None:
        """Count the unread records ``get_tracked()`` will pass over, so that
        depth() counts exactly what will be served.  A finished record's fact
        is kept only if that record is on disk (else it would be served
        anyway); a cut-short copy's remains are walked."""
        span = self._skip_range
        inside = (lambda k: span[0] <= k < span[1]) if span is not None else (lambda k: False)
        for k, msg_id in list(self._skip.items()):
            if not inside(k) and self._id_at(k) != msg_id:
                del self._skip[k]
        count = sum(1 for k in self._skip if not inside(k))
        if span is not None:
            lo_num, lo_pos = qj.split_key(span[0])
            cost = ReadCost()
            for num, start, end in self._unread_spans():
                if num < lo_num:
                    continue
                if num == lo_num:
                    start = max(start, lo_pos)
                for pos, _, data in read_records(self._file(num), start, end, self._min, self._max, 26, cost):
                    k = qj.key(num, pos)
                    if k >= span[1]:
                        break
                    count += self._will_skip(k, data[10:26])
                else:
                    continue
                break
        self._skip_count = count

    def _id_at(self, token: int) -> bytes | None:
        """The message id of the intact record at ``token`` (None if there is none)."""
        num, pos = qj.split_key(token)
        file_end = self._wpos if num == self._wfn else self._ends.get(num)
        if file_end is None or pos + 4 + self._min > file_end:
            return None
        try:
            fd = os.open(self._file(num), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            head = os.pread(fd, 4 + 26, pos)
        finally:
            os.close(fd)
        if len(head) < 30:
            return None
        n = _LEN.unpack_from(head)[0]
        if n < self._min or n > self._max or pos + 4 + n > file_end:
            return None
        return head[14:30]

    def _fsync_dir(self) -> None:
        # new files' directory entries must survive a crash as well as their data
        fsync_dir(self.data_path, self._fsync)

    # ------------------------------------------------------------------ lifecycle

    def empty(self) -> None:
        """Drop every record: delete the data files and the metadata (as Go does)."""
        if self._closed:
            raise BackendError("diskqueue closed")
        self._log.info("diskqueue emptying", queue=self.name)
        self._close_files()
        with self._meta_lock:
            self._generation += 1
            _unlink_quiet(self._meta_path)
        nums = self._list_files()
        for num in nums:
            try:
                os.unlink(self._file(num))
            except FileNotFoundError:
                pass
            except OSError as e:
                self._log.error("diskqueue cannot remove a data file", queue=self.name, file=self._file(num), error=str(e))
        self._id_blocks = []
        self._id_indexed = None
        # new numbers above every old one, so no late sync can touch a new file
        self._wfn = max([self._wfn, *nums]) + 1
        self._wpos = 0
        self._rfn = self._wfn
        self._rpos = 0
        self._depth = 0
        self._ends.clear()
        self._bad.clear()
        self._unsynced_files = []
        self._pending_delete = []
        self._tokens.clear()
        self._outstanding.clear()
        self._read_past = []
        self._patched_files.clear()
        self._ops = 0
        self._force_sync = False
        self._due_notified = False
        if self._journal is not None:
            # facts about dropped records go with them; the copy mark stays
            self._journal.delete()
            self._skip.clear()
            self._skip_range = None
            self._skip_count = 0
            self._notes.clear()
            if self.mark >= 0:
                self._journal.append(qj.entry(qj.MARK, self.mark))
                self._force_sync = True

    def close(self) -> None:
        """Sync and release the files; the records stay for the next start."""
        if self._closed:
            return
        try:
            self.sync()
        finally:
            self._close_files()
            if self._journal is not None:
                self._journal.close()
            self._closed = True

    def delete(self) -> None:
        """Close and remove every file of this queue (data, metadata, .bad)."""
        self._log.info("diskqueue deleting", queue=self.name)
        self._close_files()
        self._closed = True
        # a journal left by an earlier --sync-every=1 run goes too
        (self._journal or qj.QueueJournal(self.data_path, self.name, self._log)).delete()
        with self._meta_lock:
            self._generation += 1
            _unlink_quiet(self._meta_path)
        try:
            names = os.listdir(self.data_path)
        except OSError:
            names = []
        meta_tmp = self._base + "meta.dat."
        for fn in names:
            ours = self._parse_num(fn.removesuffix(".bad")) is not None or (fn.startswith(meta_tmp) and fn.endswith(".tmp"))
            if ours:
                _unlink_quiet(os.path.join(self.data_path, fn))

    def _close_files(self) -> None:
        for fd in self._patch_fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self._patch_fds.clear()
        for fd in (self._rfd, self._wfd):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._rfd = self._wfd = None
        self._rbuf = b""
        self._roff = 0

    # ------------------------------------------------------------------ recovery

    def _parse_num(self, fn: str) -> int | None:
        if not (fn.startswith(self._base) and fn.endswith(".dat")):
            return None
        mid = fn[len(self._base) : -4]
        if not (mid.isascii() and mid.isdigit()):
            return None
        num = int(mid)
        return num if f"{num:06d}" == mid else None

    def _list_files(self) -> list[int]:
        nums = []
        for fn in os.listdir(self.data_path):
            num = self._parse_num(fn)
            if num is not None:
                nums.append(num)
        return sorted(nums)

    def _read_meta(self) -> _Meta | None:
        try:
            with open(self._meta_path, "rb") as f:
                raw = f.read(4096)
        except FileNotFoundError:
            return None
        m = _META_RE.match(raw)
        meta = tuple(int(x) for x in m.groups()) if m else None
        if meta is None or min(meta[1:]) < 0 or meta[1] > meta[3]:
            self._log.warning(
                "diskqueue metadata unreadable, recovering from the data files",
                queue=self.name, meta=raw[:200].decode("latin-1"),
            )
            return None
        return meta  # type: ignore[return-value]

    def _discover(self, meta: _Meta | None) -> tuple[list[int], list[int]]:
        """Existing data files: (from the read file on, older ones already read).

        Every file counts, wherever it lies: probing numbers near the
        metadata's positions would miss a file beyond a gap, and wrong
        metadata would then orphan it."""
        nums = sorted(self._listed) if self._listed is not None else self._list_files()
        self._listed = None
        if meta is None:
            return nums, []
        return [n for n in nums if n >= meta[1]], [n for n in nums if n < meta[1]]

    def _recover(self) -> None:
        meta = self._read_meta()
        live, stale = self._discover(meta)
        scans: dict[int, _Scan] = {}
        for i, num in enumerate(live):
            want = meta[2] if meta is not None and i == 0 and num == meta[1] else 0
            scans[num] = self._scan(num, want, mark=meta[4] if meta is not None and num == meta[3] else -1)
        set_aside: list[int] = []  # whole files before the read position, kept as .bad
        start_prefix = 0  # records before the read position in its file, kept
        overruled = False
        if meta is not None:
            live, set_aside, start_prefix, overruled = self._check_meta(meta, live, scans)
            if overruled:
                stale = []  # the metadata is wrong: nothing it says was read is deleted
        for num in stale:
            # read past before a crash beat their deletion: the metadata no longer needs them
            self._log.warning("diskqueue removing already read file", queue=self.name, file=self._file(num))
            _unlink_quiet(self._file(num))
        if not live:
            self._rfn = self._wfn = max(meta[1], meta[3], *(n + 1 for n in set_aside)) if meta else 0
        for i, num in enumerate(live):
            sc = scans[num]
            if i == 0:
                if meta is None or overruled:
                    pass  # _check_meta said why
                elif num != meta[1]:
                    self._log.warning(
                        "diskqueue read file missing, resuming at the next one",
                        queue=self.name, missing=self._file(meta[1]), file=self._file(num),
                    )
                elif sc.start != meta[2]:
                    self._log.warning(
                        "diskqueue read position is not a record boundary",
                        queue=self.name, file=self._file(num), meta_pos=meta[2], pos=sc.start,
                    )
                self._rfn, self._rpos = num, sc.start
            self._depth += sc.records
            self._ends[num] = sc.good_end
            if sc.problem is not None:
                self._bad.add(num)
                self._log.error(
                    "diskqueue corrupt data file, serving the records before the damage",
                    queue=self.name, file=self._file(num), pos=sc.good_end, size=sc.size, reason=sc.problem,
                )
        if start_prefix:
            self._bad.add(live[0])  # its records before the read position stay, in .bad
        if live:
            last = live[-1]
            if last in self._bad:
                self._wfn, self._wpos = last + 1, 0  # never append after garbage
            else:
                self._wfn, self._wpos = last, self._ends.pop(last)
        state = (self._depth, self._rfn, self._rpos, self._wfn, self._wpos)
        if meta is not None and state != meta:
            self._log.warning(
                "diskqueue metadata out of step with the data files, repaired", queue=self.name, meta=meta, repaired=state
            )
        elif meta is None and live:
            self._log.warning(
                "diskqueue metadata missing, recovered from the data files", queue=self.name, depth=self._depth, files=len(live)
            )
        self._advance_reader()
        if (meta is not None and state != meta) or (meta is None and live) or stale or set_aside or self._pending_delete:
            self.sync()

    def _check_meta(self, meta: _Meta, live: list[int], scans: dict[int, _Scan]) -> tuple[list[int], list[int], int, bool]:
        """Check the metadata against the files: does its window (read to
        write position) hold ``depth`` records, is its read position inside
        its file?  Where it is wrong, the records before its read position
        that its depth counts as unread are served again (never more than
        the depth), and every record before the read position is kept
        (``.bad``) instead of deleted.

        Returns (files to serve, files set aside, records kept before the
        read position in the first file to serve, whether the metadata was
        overruled); ``scans`` gets the scans of the files to serve."""
        depth, rfn, rpos, wfn, wpos = meta
        first = live[0] if live else None
        # a read position past its file's records or inside one: which of
        # them were served is unknown
        misplaced = first is not None and first == rfn and rpos != scans[first].start
        # a file of its window gone (the read file, one before the write
        # file, the write file once written to): records are missing
        gone = any(n not in scans for n in range(rfn, wfn + 1 if wpos > 0 else wfn)) or (rpos > 0 and rfn not in scans)
        # gone or damaged: records are missing from the window, not behind
        # the read position
        lossy = gone
        window: int | None = None
        total = 0
        for num in live:
            sc = scans[num]
            if num >= wfn:
                if num == wfn and sc.at_mark is not None and sc.at_mark >= sc.before:
                    window = total + sc.at_mark - sc.before
                break  # files after the write file came after the metadata
            total += sc.records
            lossy = lossy or sc.problem is not None
        if wfn not in scans and wpos == 0:
            window = total  # the write file had no data yet
        if window is None and wfn in scans and scans[wfn].problem is not None:
            lossy = True  # the write position lies in or past damage
        # a write position that is nowhere in the files
        misplaced = misplaced or (window is None and not lossy)
        counted = sum(scans[n].records for n in live)
        shortfall = depth - (window if window is not None else counted)
        if not misplaced and not gone and (shortfall <= 0 or lossy):
            return live, [], 0, False  # consistent, behind the files (writes after its sync), or damaged
        earlier = [n for n in self._list_files() if first is None or n < first]
        if not misplaced and (shortfall <= 0 or lossy):
            # with a file of its window gone it cannot vouch for what lies
            # before its read position either: the positions are followed,
            # but those records are kept (.bad), not deleted
            prefix = scans[first].before if first is not None else 0
            kept = prefix + sum(self._scan(n, 0).records for n in earlier)
            if kept:
                self._log.error(
                    "diskqueue metadata names files that are gone: records before its read position kept aside",
                    queue=self.name, meta=meta, kept=kept,
                    kept_in=[self._file(n) + ".bad" for n in earlier] + ([self._file(first) + ".bad"] if prefix else []),
                )
            for num in earlier:
                self._set_aside(num)
            return live, earlier, prefix, True
        counts = {n: self._scan(n, 0).records for n in earlier}
        prefix = scans[first].before if first is not None else 0
        available = prefix + sum(counts.values())
        # serve the last ``shortfall`` records before the read position again
        # (none if the depth claims more than the whole disk holds: then the
        # depth is what is wrong)
        back = served = shortfall if 0 < shortfall <= available else 0
        to_serve = list(live)
        candidates = ([(first, prefix)] if first is not None else []) + [(n, counts[n]) for n in reversed(earlier)]
        for num, have in candidates:
            if num != first:
                to_serve.insert(0, num)
            if back <= have:
                scans[num] = self._scan(num, self._record_pos(num, have - back))
                break
            back -= have
            scans[num] = self._scan(num, 0)
        start = to_serve[0] if to_serve else None
        set_aside = [n for n in earlier if start is None or n < start]
        kept_in_start = scans[start].before if start is not None else 0
        kept = kept_in_start + sum(counts[n] for n in set_aside)
        if served or kept:
            self._log.error(
                "diskqueue metadata disagrees with the data files: records it counts as unread served again, "
                "records before its read position kept aside",
                queue=self.name, meta=meta, records_on_disk=counted + available, served_again=served, kept=kept,
                kept_in=[self._file(n) + ".bad" for n in set_aside] + ([self._file(start) + ".bad"] if start is not None and kept_in_start else []),
            )
        for num in set_aside:
            self._set_aside(num)
        return to_serve, set_aside, kept_in_start, True

    def _set_aside(self, num: int) -> None:
        """Rename a data file whose records will not be served to ``.bad``
        (a new name if an older ``.bad`` has it)."""
        path = self._file(num)
        target = path + ".bad"
        k = 1
        while os.path.exists(target):
            target = f"{path}.{k}.bad"
            k += 1
        os.replace(path, target)

    def _record_pos(self, num: int, index: int) -> int:
        """The byte position of record ``index`` (0-based) of a file."""
        return self._scan(num, 0, nth=index).at_nth

    def _scan(self, num: int, want: int, *, mark: int = -1, nth: int = -1) -> _Scan:
        """Walk a file's record headers.

        ``start`` is the last record boundary <= want, ``before`` the records
        before it and ``records`` those from there to ``good_end``, the end of
        the last intact record; ``problem`` says why the walk stopped short of
        the file's size (None when it did not).  ``at_mark``: the records
        before position ``mark`` if it is a boundary; ``at_nth``: the
        position of record ``nth``.
        """
        fd = os.open(self._file(num), os.O_RDONLY | os.O_CLOEXEC)
        try:
            size = os.fstat(fd).st_size
            lo, hi = self._min, self._max
            unpack = _LEN.unpack_from
            chunk = b""
            coff = 0
            pos = start = count = before = 0
            at_mark = at_nth = None
            problem = None
            while True:  # at each record boundary
                if pos <= want:
                    start, before = pos, count
                if pos == mark:
                    at_mark = count
                if count == nth:
                    at_nth = pos
                if pos >= size:
                    break
                if pos + 4 > size:
                    problem = "file ends inside a record header"
                    break
                rel = pos - coff
                if rel + 4 > len(chunk):
                    chunk = os.pread(fd, _SCAN_CHUNK, pos)
                    coff, rel = pos, 0
                    if len(chunk) < 4:
                        problem = "file is shorter than its size"
                        break
                n = unpack(chunk, rel)[0]
                if n < lo or n > hi:
                    problem = f"invalid message read size ({n})"
                    break
                if pos + 4 + n > size:
                    problem = "file ends inside a record"
                    break
                pos += 4 + n
                count += 1
            return _Scan(start, before, count - before, pos, size, problem, at_mark, at_nth if at_nth is not None else pos)
        finally:
            os.close(fd)


class _Scan(NamedTuple):
    start: int
    before: int
    records: int
    good_end: int
    size: int
    problem: str | None
    at_mark: int | None
    at_nth: int


class ReadCost:
    """What a look at a queue's files cost: records walked, bytes read, index blocks compared."""

    __slots__ = ("records", "bytes", "blocks")

    def __init__(self) -> None:
        self.records = 0
        self.bytes = 0
        self.blocks = 0

    def as_dict(self) -> dict[str, int]:
        return {"records": self.records, "bytes": self.bytes, "index_blocks": self.blocks}


def read_records(
    path: str, start: int, end: int, min_size: int, max_size: int, head: int | None, cost: ReadCost
) -> Iterator[tuple[int, int, bytes]]:
    """(position, payload length, payload -- or its first ``head`` bytes) of
    each record of a data file from ``start`` (a record boundary) to ``end``,
    through a descriptor of its own; stops at the first damaged record or a
    missing file.  Bounded reads: a chunk at a time, and a record larger than
    a chunk only as far as ``head``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        buf = b""
        boff = start  # file offset of buf[0]
        pos = start
        unpack = _LEN.unpack_from
        while pos + 4 <= end:
            rel = pos - boff
            if rel + 4 > len(buf):
                buf = os.pread(fd, min(_READ_CHUNK, end - pos), pos)
                boff, rel = pos, 0
                cost.bytes += len(buf)
                if len(buf) < 4:
                    return
            n = unpack(buf, rel)[0]
            if n < min_size or n > max_size or pos + 4 + n > end:
                return
            want = n if head is None else min(n, head)
            if rel + 4 + want <= len(buf):
                data = buf[rel + 4 : rel + 4 + want]
            elif want + 4 <= _READ_CHUNK:
                buf = os.pread(fd, min(_READ_CHUNK, end - pos), pos)
                boff = pos
                cost.bytes += len(buf)
                data = buf[4 : 4 + want]
            else:
                data = os.pread(fd, want, pos + 4)
                cost.bytes += len(data)
            if len(data) < want:
                return
            cost.records += 1
            yield pos, n, data
            pos += 4 + n
    finally:
        os.close(fd)


class IdBlock(NamedTuple):
    """Consecutive records of one data file and the smallest and largest message id among them."""

    num: int
    start: int
    end: int
    records: int
    lo: bytes
    hi: bytes


ID_BLOCK_RECORDS = 4096
ID_BLOCK_BYTES = 1 << 20


def index_ids(plan: list[tuple[str, int, int, int]], min_size: int, max_size: int) -> list[IdBlock]:
    """The id blocks of the spans of :meth:`DiskQueue.id_index_plan` (a header
    walk; safe in a worker thread: the files are only appended to)."""
    blocks: list[IdBlock] = []
    cost = ReadCost()
    for path, num, start, end in plan:
        first = start
        ids: list[bytes] = []
        last = start
        for pos, n, data in read_records(path, start, end, min_size, max_size, 26, cost):
            if ids and (len(ids) >= ID_BLOCK_RECORDS or pos - first >= ID_BLOCK_BYTES):
                blocks.append(IdBlock(num, first, pos, len(ids), min(ids), max(ids)))
                first, ids = pos, []
            ids.append(data[10:26])
            last = pos + 4 + n
        if ids:
            blocks.append(IdBlock(num, first, last, len(ids), min(ids), max(ids)))
    return blocks


def list_data_files(data_path: str) -> dict[str, list[int]]:
    """Every queue's data file numbers in a data directory, from one listing
    (what ``DiskQueue(data_files=...)`` takes at start-up)."""
    out: dict[str, list[int]] = {}
    for fn in os.listdir(data_path):
        if not fn.endswith(".dat"):
            continue
        name, sep, num = fn[:-4].rpartition(".diskqueue.")
        if sep and len(num) >= 6 and num.isascii() and num.isdigit() and f"{int(num):06d}" == num:
            out.setdefault(name, []).append(int(num))
    return out


def _noop() -> None:
    return None
