"""Per-topic retention (issue 14; nsqio/nsq #510 and its per-topic WAL, #625):
a topic's messages kept for a time and/or up to a size, whatever its
channels did with them, so that a channel can be rewound to a point in time
or a new one started from the oldest retained message (``replay.py``).

A retained topic appends every message it accepts to its log, beside the
queues, in files Go nsqd never opens::

    <topic>.pynsqd-retention.000000.dat   go-diskqueue records, in publish order
    <topic>.pynsqd-retention.index        JSON: per sealed file its record count,
                                          bytes, first/last timestamp, id range

The log is only appended to and shrinks by whole files, oldest first: a file
is deleted once its newest message is older than the retention time, or
while the log holds more than its byte bound.  Files are sealed at an eighth
of the byte bound (at most 16 MiB, or ``--max-bytes-per-file``) and, with a
time bound, once their first message is an eighth of it old, so a file
expires at most an eighth of the bound late.  Writes join the daemon's
group commit like the disk queues' (``--sync-every``; with
``--sync-every=1`` an append is fsynced before the publish is answered).  At
start the index is believed for sealed files whose size it gives; the file
being written (and any other the index does not vouch for) is scanned, and a
torn tail -- a write a crash cut short, never acknowledged -- is cut off.

The daemon's side -- policies (flags, per-topic settings in nsqd.dat), the
expiry tick, the HTTP calls -- is :class:`Retention` at the end.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs
import trio

from . import replay as replay_mod
from .backend_queue import BackendError, SyncNotifier
from .disk_queue import ReadCost, read_records
from .flags import parse_duration
from .fsutil import fsync_dir, fsync_files, unlink_quiet, write_atomically
from .log import get_logger
from .guid import block_id
from .message import Message, MessageBatch, Messages, disk_frames
from .protocol import MESSAGE_RECORD_PREFIX

if TYPE_CHECKING:
    from .channel import Channel
    from .nsqd import NSQD
    from .topic import Topic

SEGMENT_MAX = 16 << 20
SEGMENT_MIN = 4096
# how often the daemon deletes expired files
EXPIRY_INTERVAL = 1.0


@attrs.frozen
class Policy:
    """How much of a topic to keep: ``time`` seconds and/or ``bytes`` (0: no bound of that kind)."""

    time: float = 0.0
    bytes: int = 0

    @property
    def enabled(self) -> bool:
        return self.time > 0 or self.bytes > 0

    def as_json(self) -> dict[str, int]:
        return {"time": int(self.time * 1e9), "bytes": self.bytes}

    @classmethod
    def from_json(cls, data: Any) -> Policy:
        if not isinstance(data, dict):
            raise ValueError("retention: not an object")
        t, b = data.get("time", 0), data.get("bytes", 0)
        if not isinstance(t, int) or not isinstance(b, int) or t < 0 or b < 0:
            raise ValueError("retention: time and bytes must be non-negative integers")
        return cls(t / 1e9, b)


class Segment:
    """One file of the log: where it ends and what it holds."""

    __slots__ = ("num", "size", "count", "min_ts", "max_ts", "min_id", "max_id")

    def __init__(self, num: int) -> None:
        self.num = num
        self.size = 0
        self.count = 0
        self.min_ts = 0
        self.max_ts = 0
        self.min_id = b""
        self.max_id = b""

    def add(self, count: int, size: int, min_ts: int, max_ts: int, min_id: bytes, max_id: bytes) -> None:
        if not self.count:
            self.min_ts, self.max_ts, self.min_id, self.max_id = min_ts, max_ts, min_id, max_id
        else:
            self.min_ts = min(self.min_ts, min_ts)
            self.max_ts = max(self.max_ts, max_ts)
            self.min_id = min(self.min_id, min_id)
            self.max_id = max(self.max_id, max_id)
        self.count += count
        self.size += size

    def as_json(self) -> dict[str, Any]:
        return {
            "num": self.num, "size": self.size, "count": self.count, "min_ts": self.min_ts, "max_ts": self.max_ts,
            "min_id": self.min_id.decode("ascii", "replace"), "max_id": self.max_id.decode("ascii", "replace"),
        }


Position = tuple[int, int]  # (file number, offset)


class RetentionLog(SyncNotifier):
    """One topic's retained messages; see the module docstring.  Synchronous,
    like the disk queues; ``prepare_sync()``'s closure may run in a worker
    thread while appends go on."""

    def __init__(
        self,
        topic: str,
        data_path: str,
        policy: Policy,
        *,
        max_bytes_per_file: int,
        max_msg_size: int,
        sync_every: int,
        on_sync_due: Callable[[Any], None] | None = None,
    ) -> None:
        self.topic = topic
        self.data_path = data_path
        self._base = f"{topic}.pynsqd-retention."
        self._index_path = os.path.join(data_path, self._base + "index")
        self._max_file = max_bytes_per_file
        self._min = 26
        self._max = max_msg_size + 26
        self._sync_every = max(1, sync_every)
        self._on_sync_due = on_sync_due
        self._log = get_logger(topic=topic)
        self.set_policy(policy)
        self.segments: list[Segment] = []  # oldest first; the last is written to
        self._fd: int | None = None
        self._ops = 0
        self._due_notified = False
        self._unsynced: list[int] = []  # sealed files not fsynced yet
        self._index_dirty = False
        self._dir_dirty = False
        self._closed = False
        self._sync_failed = False
        # read by replays that must not lose what they still have to read: num -> holders
        self.pins: dict[object, int] = {}
        try:
            self._recover()
        except OSError as e:
            raise BackendError(f"retention log {topic}: cannot open: {e}") from e

    # ------------------------------------------------------------ sizes

    @property
    def segment_bytes(self) -> int:
        cap = min(self._max_file, SEGMENT_MAX)
        if self.policy.bytes:
            return max(SEGMENT_MIN, min(cap, self.policy.bytes // 8))
        return cap

    @property
    def disk_bytes(self) -> int:
        return sum(s.size for s in self.segments)

    @property
    def count(self) -> int:
        return sum(s.count for s in self.segments)

    def _file(self, num: int) -> str:
        return os.path.join(self.data_path, f"{self._base}{num:06d}.dat")

    @property
    def end(self) -> Position:
        """The position the next append will be at (at least)."""
        seg = self.segments[-1]
        return seg.num, seg.size

    @property
    def start(self) -> Position:
        return self.segments[0].num, 0

    # ------------------------------------------------------------ appending

    def append(self, msgs: Messages) -> Position:
        """Keep ``msgs``, all or none (BackendError).  Returns the end before
        them, for :meth:`undo`."""
        if self._closed:
            raise BackendError("retention log closed")
        data = disk_frames(msgs)
        count = len(msgs)
        if isinstance(msgs, MessageBatch):
            min_ts = max_ts = msgs.timestamp
            min_id = block_id(msgs.id_base, msgs.id_first, msgs.lo)
            max_id = block_id(msgs.id_base, msgs.id_first, msgs.hi - 1)
        elif count == 1:
            m = msgs[0]
            min_ts = max_ts = m.timestamp
            min_id = max_id = m.id
        else:
            stamps = [m.timestamp for m in msgs]
            ids = [m.id for m in msgs]
            min_ts, max_ts, min_id, max_id = min(stamps), max(stamps), min(ids), max(ids)
        seg = self.segments[-1]
        size = seg.size
        if size and (size + len(data) > self._segment_bytes or (self._roll_ns and max_ts - seg.min_ts > self._roll_ns)):
            self._seal()
            seg = self.segments[-1]
            size = 0
        try:
            if self._fd is None:
                self._fd = os.open(self._file(seg.num), os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
                self._dir_dirty = True
            if os.pwrite(self._fd, data, size) != len(data):
                _pwrite_all(self._fd, data, size)
        except OSError as e:
            self._truncate(seg, size)
            self._log.error("retention log write failed", file=self._file(seg.num), error=str(e))
            raise BackendError(f"retention log {self.topic}: write failed: {e}") from e
        seg.add(count, len(data), min_ts, max_ts, min_id, max_id)
        self._ops += count
        if self._ops >= self._sync_every:
            self._notify_due()
        return seg.num, size

    def undo(self, before: Position) -> None:
        """Take back the last append (the publish it belonged to was refused)."""
        seg = self.segments[-1]
        if seg.num != before[0] or seg.size <= before[1]:
            return
        removed = self._scan(seg.num, before[1], seg.size)
        seg.count -= removed.count
        self._truncate(seg, before[1])
        seg.size = before[1]
        if removed.count and seg.count:
            # the bounds may have widened: recompute them from the file
            stats = self._scan(seg.num, 0, seg.size)
            seg.min_ts, seg.max_ts, seg.min_id, seg.max_id = stats.min_ts, stats.max_ts, stats.min_id, stats.max_id

    def _truncate(self, seg: Segment, size: int) -> None:
        if self._fd is not None:
            try:
                os.ftruncate(self._fd, size)
            except OSError as e:
                self._log.error("retention log cannot undo a write", file=self._file(seg.num), error=str(e))

    def _seal(self) -> None:
        """The file being written is complete; the next append starts a new one."""
        seg = self.segments[-1]
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._unsynced.append(seg.num)
        self._index_dirty = True
        self.segments.append(Segment(seg.num + 1))
        self._notify_due()

    # ------------------------------------------------------------ expiry

    def set_policy(self, policy: Policy) -> None:
        self.policy = policy
        self._segment_bytes = self.segment_bytes
        # with a time bound, a file is closed once its first message is an eighth of it old
        self._roll_ns = int(policy.time * 1e9 / 8)

    def expire(self, now_ns: int) -> int:
        """Delete whole files that fell out of the policy, oldest first;
        returns how many.  A file a replay still has to read for messages
        its channel was given nowhere else is kept (see ``pins``)."""
        t, b = self.policy.time, self.policy.bytes
        cutoff = now_ns - int(t * 1e9) if t else None
        seg = self.segments[-1]
        if cutoff is not None and seg.count and seg.min_ts < now_ns - self._roll_ns:
            self._seal()  # a quiet topic's last file ages out too
        deleted = 0
        total = self.disk_bytes
        pinned = min(self.pins.values(), default=None)
        while len(self.segments) > 1:
            oldest = self.segments[0]
            if pinned is not None and oldest.num >= pinned:
                break
            if not ((cutoff is not None and oldest.max_ts < cutoff) or (b and total > b)):
                break
            try:
                os.unlink(self._file(oldest.num))
            except FileNotFoundError:
                pass
            except OSError as e:
                self._log.error("retention log cannot delete an expired file", file=self._file(oldest.num), error=str(e))
                break
            self.segments.pop(0)
            total -= oldest.size
            deleted += 1
            self._index_dirty = self._dir_dirty = True
        if deleted:
            self._log.info("retention: expired files deleted", files=deleted, bytes_kept=total)
            self._notify_due()
        return deleted

    # ------------------------------------------------------------ reading

    def position_at(self, since_ns: int) -> Position:
        """Where a replay of the messages published at or after ``since_ns``
        starts: the first file whose newest message is that recent."""
        for seg in self.segments:
            if seg.count and seg.max_ts >= since_ns:
                return seg.num, 0
        return self.end

    def read(self, pos: Position, end: Position, limit: int, since_ns: int) -> tuple[list[Message], Position, int]:
        """Up to ``limit`` messages published at or after ``since_ns`` from
        ``pos`` up to ``end``: (messages, the position after them -- ``end``
        once nothing is left --, files that expired before they were read)."""
        out: list[Message] = []
        num, off = pos
        first = self.segments[0].num
        skipped = max(0, first - num)
        if skipped:
            num, off = first, 0
        cost = ReadCost()
        for seg in self.segments:
            if seg.num < num:
                continue
            if seg.num > end[0]:
                break
            start = off if seg.num == num else 0
            stop = seg.size if seg.num < end[0] else min(seg.size, end[1])
            for p, n, data in read_records(self._file(seg.num), start, stop, self._min, self._max, None, cost):
                ts = MESSAGE_RECORD_PREFIX.unpack_from(data)[0]
                if ts >= since_ns:
                    out.append(Message(data[10:26], data[26:], ts, 0))
                    if len(out) >= limit:
                        return out, (seg.num, p + 4 + n), skipped
        return out, end, skipped

    def id_range(self, start: Position) -> tuple[bytes, bytes]:
        """The smallest and largest id retained from ``start`` on."""
        live = [s for s in self.segments if s.count and s.num >= start[0]]
        if not live:
            return b"", b""
        return min(s.min_id for s in live), max(s.max_id for s in live)

    def id_candidates(self, msg_id: bytes) -> list[tuple[str, int]]:
        """(path, size) of the files whose id range holds ``msg_id`` (for :func:`file_holds`)."""
        return [(self._file(s.num), s.size) for s in self.segments if s.count and s.min_id <= msg_id <= s.max_id]

    def stats(self) -> dict[str, Any]:
        live = [s for s in self.segments if s.count]
        return {
            **self.policy.as_json(),
            "disk_bytes": self.disk_bytes,
            "messages": self.count,
            "files": len(live),
            "oldest_timestamp": live[0].min_ts if live else 0,
            "newest_timestamp": live[-1].max_ts if live else 0,
        }

    # ------------------------------------------------------------ sync

    @property
    def dirty(self) -> bool:
        return self._ops > 0 or self._index_dirty or bool(self._unsynced) or self._sync_failed

    @property
    def healthy(self) -> bool:
        return not self._sync_failed

    def sync(self) -> None:
        self.prepare_sync()()

    def prepare_sync(self) -> Callable[[], None]:
        """Snapshot now; the closure fsyncs the appends made so far, then
        writes the index of the sealed files (tmp + fsync + rename)."""
        if self._closed:
            return _noop
        fd = os.dup(self._fd) if self._fd is not None and self._ops else None
        files, self._unsynced = self._unsynced, []
        index = None
        if self._index_dirty:
            self._index_dirty = False
            sealed = self.segments[:-1]
            index = json.dumps({"version": 1, "segments": [s.as_json() for s in sealed]}).encode()
        dir_dirty, self._dir_dirty = self._dir_dirty, False
        self._ops = 0
        self._due_notified = False

        def run() -> None:
            try:
                fsync_files([self._file(num) for num in files], [fd])
                if index is not None:
                    write_atomically(self._index_path, index)
                    dir_needed = True
                else:
                    dir_needed = dir_dirty
                if dir_needed:
                    fsync_dir(self.data_path)
            except OSError as e:
                self._sync_failed = True
                self._unsynced.extend(files)
                if index is not None:
                    self._index_dirty = True
                self._log.error("retention log sync failed", error=str(e))
                raise BackendError(f"retention log {self.topic}: sync failed: {e}") from e
            self._sync_failed = False

        return run

    def close(self) -> None:
        if self._closed:
            return
        try:
            self._index_dirty = True
            self.sync()
        finally:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            self._closed = True

    def detach(self) -> None:
        """Stop using the log, its files left as they are."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._closed = True

    def delete(self) -> None:
        """Remove every file of the log (retention turned off, topic deleted)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._closed = True
        for num in self._list():
            unlink_quiet(self._file(num))
        unlink_quiet(self._index_path)
        self.segments = [Segment(0)]

    # ------------------------------------------------------------ recovery

    def _list(self) -> list[int]:
        pattern = re.compile(re.escape(self._base) + r"(\d{6,})\.dat")
        nums = []
        for fn in os.listdir(self.data_path):
            m = pattern.fullmatch(fn)
            if m:
                nums.append(int(m.group(1)))
        return sorted(nums)

    def _recover(self) -> None:
        nums = self._list()
        known = self._read_index()
        for i, num in enumerate(nums):
            size = os.stat(self._file(num)).st_size
            last = i == len(nums) - 1
            seg = known.get(num)
            if seg is None or seg.size != size or last:
                seg = Segment(num)
                scan = self._scan(num, 0, size)
                seg.add(scan.count, scan.end, scan.min_ts, scan.max_ts, scan.min_id, scan.max_id)
                if scan.end < size:
                    self._log.warning("retention log file ends in a torn record, cut off", file=self._file(num), good=scan.end, size=size)
                    if last:
                        os.truncate(self._file(num), scan.end)
                self._index_dirty = True
            if not seg.count and not last:
                unlink_quiet(self._file(num))
                continue
            self.segments.append(seg)
        if not self.segments:
            self.segments.append(Segment(nums[-1] + 1 if nums else 0))
        elif self.segments[-1].size:
            self._fd = os.open(self._file(self.segments[-1].num), os.O_WRONLY | os.O_CLOEXEC)

    def _read_index(self) -> dict[int, Segment]:
        """The sealed files as the index describes them: all of it, or (unreadable,
        an entry that does not parse) none -- the files are then scanned."""
        known: dict[int, Segment] = {}
        try:
            with open(self._index_path, "rb") as fh:
                for entry in json.load(fh).get("segments", []):
                    seg = Segment(int(entry["num"]))
                    seg.size, seg.count = int(entry["size"]), int(entry["count"])
                    seg.min_ts, seg.max_ts = int(entry["min_ts"]), int(entry["max_ts"])
                    seg.min_id, seg.max_id = str(entry["min_id"]).encode(), str(entry["max_id"]).encode()
                    if seg.count <= 0 or seg.size <= 0:
                        raise ValueError(f"file {seg.num}: {seg.count} messages in {seg.size} bytes")  # a sealed file holds some
                    known[seg.num] = seg
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            self._log.warning("retention index unreadable, scanning the files", error=str(e))
            self._index_dirty = True
            return {}
        return known

    def _scan(self, num: int, start: int, end: int) -> _ScanResult:
        out = _ScanResult()
        pos = start
        for p, n, data in read_records(self._file(num), start, end, self._min, self._max, 26, ReadCost()):
            ts, _ = MESSAGE_RECORD_PREFIX.unpack_from(data)
            msg_id = data[10:26]
            if not out.count:
                out.min_ts = out.max_ts = ts
                out.min_id = out.max_id = msg_id
            else:
                out.min_ts, out.max_ts = min(out.min_ts, ts), max(out.max_ts, ts)
                out.min_id, out.max_id = min(out.min_id, msg_id), max(out.max_id, msg_id)
            out.count += 1
            pos = p + 4 + n
        out.end = pos
        return out


def file_holds(candidates: list[tuple[str, int]], msg_id: bytes, max_msg_size: int) -> bool:
    """Whether one of the files of :meth:`RetentionLog.id_candidates` holds
    ``msg_id`` (a header walk; safe in a worker thread)."""
    cost = ReadCost()
    for path, size in candidates:
        for _, _, data in read_records(path, 0, size, 26, max_msg_size + 26, 26, cost):
            if data[10:26] == msg_id:
                return True
    return False


def parse_since(text: str, now_ns: int) -> int:
    """A rewind's point in time as unix nanoseconds: ``oldest`` (0), unix
    nanoseconds as message timestamps are given, an RFC 3339 time, or a Go
    duration meaning that long ago (``90m``)."""
    text = text.strip()
    if text == "oldest":
        return 0
    if text.isdigit():
        return int(text)
    if text[:1].isdigit() and text[-1:].isalpha() and "-" not in text and ":" not in text:
        return max(0, now_ns - int(parse_duration(text) * 1e9))
    stamp = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    if stamp.tzinfo is None:
        raise ValueError("a time needs its offset (Z or +hh:mm)")
    return int(stamp.timestamp()) * 1_000_000_000 + stamp.microsecond * 1000


class Retention:
    """The daemon's side of retention: which topics retain (the flags'
    default, or a topic's own setting kept in nsqd.dat under ``retention``),
    their logs' lifetimes, the expiry tick, and channels' replays."""

    def __init__(self, nsqd: NSQD) -> None:
        self.nsqd = nsqd
        o = nsqd.options
        self.default = Policy(o.retention_time, o.retention_bytes)
        # one replay-cursor write at a time per file (so per channel name, whichever
        # channel has it): the locks no task holds or waits for are dropped
        self._cursor_locks: weakref.WeakValueDictionary[str, trio.Lock] = weakref.WeakValueDictionary()
        # logs of topics that stopped retaining, still read by replays that owe
        # their channels messages left out of the backlog: topic -> (log, delete it once they are through)
        self._retired: dict[str, tuple[RetentionLog, bool]] = {}

    def cursor_lock(self, path: str) -> trio.Lock:
        lock = self._cursor_locks.get(path)
        if lock is None:
            lock = self._cursor_locks[path] = trio.Lock()
        return lock

    def install(self) -> Retention:
        n = self.nsqd
        n.event_hooks.append(self.on_event)
        n.topic_metadata_loaders.append(self.load_topic)
        n.services.append(self.run)
        n.close_hooks.append(self.close)
        return self

    # ------------------------------------------------------------ policies

    def policy_of(self, topic: Topic) -> Policy:
        kept = topic.settings.get("retention")
        return Policy.from_json(kept) if kept is not None else self.default

    def apply(self, topic: Topic) -> None:
        """Open, reconfigure or delete the topic's log to match its policy."""
        if topic.ephemeral or topic.exiting:
            return
        policy = self.policy_of(topic)
        log = topic.retention
        if policy.enabled:
            if log is not None:
                log.set_policy(policy)
                return
            retired = self._retired.pop(topic.name, None)
            if retired is not None:
                # on again while replays still read it: the same log, and they replay in full again
                log = retired[0]
                log.set_policy(policy)
                for channel in topic.channels.values():
                    if channel.replay is not None:
                        channel.replay.source = None
            else:
                log = self._open(topic, policy)
                if log is None:
                    return
            topic.retain(log)
            self.nsqd.log.info("retention: on", topic=topic.name, time=policy.time, bytes=policy.bytes, retained=log.count)
        elif log is not None:
            self._drop(topic)
            self.nsqd.log.info("retention: off, retained messages deleted", topic=topic.name)

    def _open(self, topic: Topic, policy: Policy) -> RetentionLog | None:
        n, o = self.nsqd, self.nsqd.options
        try:
            return RetentionLog(
                topic.name, n.data_path, policy, max_bytes_per_file=o.max_bytes_per_file,
                max_msg_size=o.max_msg_size, sync_every=o.sync_every, on_sync_due=n._mark_sync_due,
            )
        except BackendError as exc:
            n.set_unhealthy(f"retention {topic.name}", str(exc))
            n.log.error("retention: cannot open the topic's log", topic=topic.name, error=str(exc))
            return None

    def _drop(self, topic: Topic) -> None:
        """Retention off: the log is deleted -- once the replays that left
        messages out of the topic's backlog have given them (the others stop)."""
        log = topic.retention
        topic.retain(None)
        owing = False
        for channel in topic.channels.values():
            replay = channel.replay
            if log is not None and replay is not None and replay in log.pins:
                replay.source = log
                owing = True
            else:
                self.cancel_replay(topic, channel)
        if log is not None:
            if owing:
                self._retired[topic.name] = (log, True)
            else:
                log.delete()
        self.nsqd.dead_letters.retention_shrunk(topic)

    def _retire_for(self, topic: Topic, replay: replay_mod.Replay) -> bool:
        """At start, a channel's replay that owes messages on a topic that no
        longer retains (restarted without the flag): its log is opened for it
        alone, and left as it is afterwards unless the topic's own setting is off."""
        retired = self._retired.get(topic.name)
        if retired is None:
            log = self._open(topic, Policy())
            if log is None:
                return False
            retired = self._retired[topic.name] = (log, "retention" in topic.settings)
        replay.source = retired[0]
        return True

    def release(self, topic: Topic, log: RetentionLog) -> None:
        """A replay of a topic that stopped retaining is through with ``log``:
        the last one deletes it (or leaves it, see ``_retire_for``)."""
        retired = self._retired.get(topic.name)
        if retired is None or retired[0] is not log or log.pins:
            return
        del self._retired[topic.name]
        if retired[1]:
            log.delete()
            self.nsqd.log.info("retention: off, the replays owed their channels are given, retained messages deleted", topic=topic.name)
        else:
            log.detach()

    def set(self, topic: Topic, policy: Policy | None) -> None:
        """A topic's own setting (None: back to the flags' default), kept in nsqd.dat."""
        if policy is None:
            topic.settings.pop("retention", None)
        else:
            topic.settings["retention"] = policy.as_json()
        self.apply(topic)
        self.nsqd.metadata_changed()

    def load_topic(self, topic: Topic) -> None:
        kept = topic.settings.get("retention")
        if kept is None:
            return
        try:
            Policy.from_json(kept)
        except ValueError as exc:
            self.nsqd.log.warning("ignoring an unreadable retention setting in nsqd.dat", topic=topic.name, error=str(exc))
            del topic.settings["retention"]
            return
        self.apply(topic)

    def on_event(self, event: str, topic: Topic, channel: Channel | None) -> None:
        if event == "topic_created":
            self.apply(topic)
        elif event == "topic_deleted":
            if topic.retention is not None:
                log = topic.retention
                topic.retain(None)
                log.delete()
            retired = self._retired.pop(topic.name, None)
            if retired is not None:
                retired[0].delete()
        elif event == "channel_created" and channel is not None:
            if replay_mod.persistent(topic, channel):
                path = replay_mod.cursor_path(self.nsqd, topic, channel)
                replay = replay_mod.Replay.load(path) if topic.retention is not None or os.path.exists(path) else None
                # without retention (a restart without the flag) only one that owes
                # its channel messages goes on; another waits for retention to be back
                if replay is not None and (topic.retention is not None or (replay.owes and self._retire_for(topic, replay))):
                    self.start_replay(topic, channel, replay)
        elif event == "channel_deleted" and channel is not None:
            channel.replay = None
            unlink_quiet(replay_mod.cursor_path(self.nsqd, topic, channel))

    # ------------------------------------------------------------ replays

    def rewind(self, topic: Topic, channel: Channel, since_ns: int) -> replay_mod.Replay:
        """The replay of ``topic``'s retained messages published at or after
        ``since_ns`` (0: all of them) into ``channel``, merged with one still
        running; the caller attaches it, saves it (``replay.save_cursor``)
        and starts it."""
        log = topic.retention
        assert log is not None
        start = log.position_at(since_ns) if since_ns > 0 else log.start
        replay = replay_mod.Replay(since_ns, start, log.end, replay_mod.cursor_path(self.nsqd, topic, channel), log.id_range(start))
        old = channel.replay
        if old is not None and not old.done:
            replay = old.merged(replay)
        return replay

    def cancel_replay(self, topic: Topic, channel: Channel) -> None:
        """The channel was emptied: its replay stops (its task sees it and ends)."""
        if channel.replay is not None:
            channel.replay = None
            unlink_quiet(replay_mod.cursor_path(self.nsqd, topic, channel))

    def attach(self, topic: Topic, channel: Channel, replay: replay_mod.Replay) -> None:
        """The channel takes ``replay`` as its own at once (what the topic
        drains into it from now on is checked against it); its feeding
        starts with :meth:`start_replay`."""
        channel.guard_duplicates()
        channel.skip_replayed()
        log = replay.source or topic.retention
        if log is not None:
            replay.pins = log.pins
            if replay.owes:
                replay.pins[replay] = replay.next[0]
        channel.replay = replay

    def start_replay(self, topic: Topic, channel: Channel, replay: replay_mod.Replay) -> None:
        if channel.replay is not replay:
            self.attach(topic, channel, replay)
        self.nsqd.start_soon(replay_mod.run, self.nsqd, topic, channel, replay)

    # ------------------------------------------------------------ running

    async def run(self) -> None:
        """Delete expired files, once a second."""
        while True:
            await trio.sleep(EXPIRY_INTERVAL)
            now = time.time_ns()
            for topic in list(self.nsqd.topics.values()):
                log = topic.retention
                if log is not None and log.expire(now):
                    self.nsqd.dead_letters.retention_shrunk(topic)

    def close(self) -> None:
        """Shutdown, after the channels were written to disk: the replays'
        cursors as far as they got, and every log synced."""
        for topic in self.nsqd.topics.values():
            for channel in topic.channels.values():
                replay = channel.replay
                if replay is not None and replay_mod.persistent(topic, channel):
                    try:
                        replay.save()
                    except OSError as exc:
                        self.nsqd.log.error("replay: cannot save the cursor", topic=topic.name, channel=channel.name, error=str(exc))
            if topic.retention is not None:
                try:
                    topic.retention.close()
                except BackendError as exc:
                    self.nsqd.log.error("retention: cannot sync the log", topic=topic.name, error=str(exc))
        for log, _ in self._retired.values():
            log.detach()  # the replays resume from their cursors


class _ScanResult:
    __slots__ = ("count", "end", "min_ts", "max_ts", "min_id", "max_id")

    def __init__(self) -> None:
        self.count = self.end = self.min_ts = self.max_ts = 0
        self.min_id = self.max_id = b""


def _pwrite_all(fd: int, data: bytes, pos: int) -> None:
    view = memoryview(data)
    done = 0
    while done < len(data):
        n = os.pwrite(fd, view[done:], pos + done)
        if n <= 0:
            raise OSError(5, "short write")
        done += n


def _noop() -> None:
    return None
