"""Dead-letter topics: server-side max attempts per channel (nsqio/nsq #1518, #974).

A channel with max attempts N (``--max-attempts``, or ``POST /channel/settings``)
never delivers a message more than N times.  When its N-th delivery comes back
-- ``REQ`` (with or without a delay), a timeout, its consumer gone -- or a
message already delivered N times is read back from disk (after a restart, or
N lowered), the message is moved to the channel's dead-letter topic
(``--dead-letter-topic``, ``%s.dead`` by default): body and publish timestamp
unchanged, attempts 0, a new id from that topic.  It is an ordinary topic, so
any NSQ client consumes it unchanged.

What the move cannot carry in the message stays findable beside the topic, in
``<dead-letter topic>.pynsqd-dead-letters`` (JSON lines; Go nsqd ignores the
file): per new id, the original topic, channel, message id, attempts, publish
time and when it was moved.  ``GET /dead_letter/message`` looks one up,
``POST /dead_letter/requeue`` moves the messages back into the channels they
came from.  An entry goes when its message is moved back, when every channel
of the dead-letter topic has finished it, or with the topic; at start, when
there are more entries than messages, those of messages no longer on disk go.
On a dead-letter topic that retains, an entry its message is done with stays
("spent") while the retention log holds the message -- a rewind can bring it
back -- and goes when retention lets the message go.

One task (:meth:`DeadLetters.run`) makes the moves, one at a time.  With
``--sync-every=1`` a move is atomic with respect to a crash, in three steps:

1. the destination is held (nothing of it delivered), the messages are written
   to it and the log notes the move with both records' positions; group commit;
2. the source records are acknowledged; group commit;
3. the destination is released (and the log says the move is done).

At start, a move the log still shows pending is decided by its source: if the
acknowledgement reached the disk the move stands, else the destination's copies
(never delivered) are discarded and the source serves the messages again.  So
after ``kill -9`` each message is in exactly one of the two places.  In the
default mode a move is as durable as any message there (memory until it spills,
everything written out at a clean shutdown).
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import attrs
import trio

from .backend_queue import BackendError
from .channel import Channel, ChannelExiting
from .fsutil import fsync_dir as _fsync_dir
from .fsutil import unlink_quiet as _unlink_quiet
from .fsutil import write_atomically
from .log import get_logger
from .message import Message
from .protocol import is_ephemeral, is_valid_topic_name
from .topic import Topic, TopicExiting

if TYPE_CHECKING:
    from .nsqd import NSQD

log = get_logger()

LOG_SUFFIX = ".pynsqd-dead-letters"
# a move the dead-letter topic could not take (its disk full) is tried again after
RETRY = 1.0
# messages moved back per step (each step: two group commits in durable mode)
REQUEUE_STEP = 1000
# the log file is rewritten once it holds this many lines more than twice the live entries
_COMPACT_SLACK = 1024


@attrs.define(slots=True)
class Origin:
    """Where a dead letter came from (keyed by its id in the dead-letter topic)."""

    id: bytes
    topic: str
    channel: str
    message_id: bytes
    attempts: int
    timestamp: int  # first publish, unix ns
    dead_lettered_at: int  # unix ns
    # channels of the dead-letter topic that are done with it (FIN, moved on)
    left: set[str] | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id.decode(),
            "topic": self.topic,
            "channel": self.channel,
            "message_id": self.message_id.decode(),
            "attempts": self.attempts,
            "timestamp": self.timestamp,
            "dead_lettered_at": self.dead_lettered_at,
        }

    def where(self, dead_letter_topic: str) -> dict[str, Any]:
        """Where the message went, for its original channel's ``/message/find``."""
        return {
            "dead_letter_topic": dead_letter_topic, "dead_letter_id": self.id.decode(),
            "dead_lettered_at": self.dead_lettered_at, "attempts": self.attempts, "timestamp": self.timestamp,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Origin:
        return cls(
            d["id"].encode(), str(d["topic"]), str(d["channel"]), d["message_id"].encode(),
            int(d["attempts"]), int(d["timestamp"]), int(d["dead_lettered_at"]),
        )


class DeadLetterLog:
    """The origins of one dead-letter topic's messages, and the moves in
    progress (durable mode), kept in a JSON-lines file beside its queue.

    Lines: an origin (``"move": [source key, destination key]`` while its
    move is pending), ``{"done": id}`` (that move committed), ``{"back": id,
    "from": queue, "to": queue, "move": [...], "to_id": id}`` (a move back pending),
    ``{"out": id}`` (that move committed), ``{"drop": id}`` (the entry is
    gone).  Lines are written on the event loop -- at once with
    :meth:`write_now` where a crash must find them before the data they
    describe, else with the next sync round, which fsyncs them in a worker
    thread.  A file mostly of spent lines is rewritten: the live entries go to
    a new file in one round (written and fsynced in the worker), which the next
    round puts in place with the lines written meanwhile.
    """

    def __init__(self, data_path: str, topic: str) -> None:
        self.topic = topic
        self.path = os.path.join(data_path, topic + LOG_SUFFIX)
        self.entries: dict[bytes, Origin] = {}
        # the same entries by the id the message had where it came from (the id a
        # channel's consumers knew it by), so that it stays findable by that id:
        # original id -> ids here (one per channel of the topic it came from)
        self.by_original: dict[bytes, list[bytes]] = {}
        # entries every channel is done with, kept while a rewind of the topic
        # can bring their message back (it is retained: ``retains``)
        self.spent: set[bytes] = set()
        self.retains: Callable[[bytes], bool] = _never
        # pending moves (durable mode): into the topic, id -> (source key, key here)
        self.moving_in: dict[bytes, tuple[int, int]] = {}
        # ... and back out of it: id -> (source queue, source key, destination queue, key there, id there)
        self.moving_back: dict[bytes, tuple[str, int, str, int, bytes]] = {}
        self._buf: list[bytes] = []
        self._lines = 0  # lines in the file
        self._size = 0  # its size as written (a failed write is cut back to it)
        self._fd: int | None = None
        self._unsynced = False
        self._dir_dirty = False
        # a rewrite: [tmp path, its fd once written and fsynced by the worker], and
        # the lines written to the old file since its snapshot
        self._rewrite: list[Any] | None = None
        self._since: list[bytes] = []
        self._gone = False

    # ------------------------------------------------------------ file

    def load(self) -> None:
        try:
            with open(self.path, "rb") as fh:
                raw = fh.read()
        except FileNotFoundError:
            return
        for line in raw.split(b"\n"):
            if not line:
                continue
            try:
                self._apply(json.loads(line))
            except (ValueError, KeyError, TypeError, AttributeError):
                log.warning("dead-letter log: skipping an unreadable line", file=self.path)
            self._lines += 1
        self._size = len(raw)

    def _apply(self, d: dict[str, Any]) -> None:
        if "drop" in d:
            key = d["drop"].encode()
            self.forget(key)
            self.moving_in.pop(key, None)
            self.moving_back.pop(key, None)
        elif "spent" in d and "id" not in d:
            key = d["spent"].encode()
            if key in self.entries:
                self.spent.add(key)
        elif "done" in d:
            self.moving_in.pop(d["done"].encode(), None)
        elif "back" in d:
            src_key, dst_key = d["move"]
            self.moving_back[d["back"].encode()] = (str(d["from"]), int(src_key), str(d["to"]), int(dst_key), d["to_id"].encode())
        elif "out" in d:
            self.moving_back.pop(d["out"].encode(), None)
        else:
            origin = Origin.from_json(d)
            self.forget(origin.id)
            self.entries[origin.id] = origin
            self.by_original.setdefault(origin.message_id, []).append(origin.id)
            if d.get("spent"):
                self.spent.add(origin.id)
            if "move" in d:
                src_key, dst_key = d["move"]
                self.moving_in[origin.id] = (int(src_key), int(dst_key))

    def _append(self, d: dict[str, Any]) -> None:
        self._apply(d)
        self._buf.append(json.dumps(d, separators=(",", ":")).encode() + b"\n")

    @property
    def dirty(self) -> bool:
        return bool(self._buf) or self._unsynced or self._rewrite is not None

    def write_now(self) -> None:
        """Write the lines so far (no fsync: the next sync round's); raises
        BackendError, and then nothing of them is in the file."""
        if not self._buf or self._gone:
            return
        data = b"".join(self._buf)
        try:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
                self._dir_dirty = self._dir_dirty or self._size == 0
            n = os.pwrite(self._fd, data, self._size)
            if n != len(data):
                raise OSError(28, "short write")
        except OSError as e:
            if self._fd is not None:
                try:
                    os.ftruncate(self._fd, self._size)  # a torn line would spoil the next
                except OSError:
                    pass
            raise BackendError(f"dead-letter log {self.path}: write failed: {e}") from e
        self._size += n
        self._lines += len(self._buf)
        if self._rewrite is not None:
            self._since.extend(self._buf)
        self._buf = []
        self._unsynced = True

    def prepare_sync(self) -> Callable[[], None]:
        """On the event loop: write what is buffered, put a finished rewrite in
        place or start one; the returned job (a worker thread) fsyncs."""
        if self._gone:
            return _noop
        try:
            self.write_now()
        except BackendError as exc:
            error = exc

            def failed() -> None:
                raise error

            return failed
        rewrite = self._rewrite
        if rewrite is not None and rewrite[1] is not None:
            self._swap(rewrite)
        fd = os.dup(self._fd) if self._fd is not None and self._unsynced else None
        self._unsynced = False
        dir_dirty, self._dir_dirty = self._dir_dirty, False
        if rewrite is None and self._lines > 2 * (len(self.entries) + len(self.moving_back)) + _COMPACT_SLACK:
            new = self._rewrite = [f"{self.path}.{random.getrandbits(62)}.tmp", None]
            self._since = []
            snapshot = self._snapshot()

            def job() -> None:
                self._fsync(fd, dir_dirty)
                self._write_new(new, snapshot)

            return job
        return lambda: self._fsync(fd, dir_dirty)

    def _snapshot(self) -> bytes:
        lines = []
        for origin in self.entries.values():
            d = origin.to_json()
            if origin.id in self.spent:
                d["spent"] = True
            moving = self.moving_in.get(origin.id)
            if moving is not None:
                d["move"] = list(moving)
            lines.append(d)
        for key, (src, src_key, dst, dst_key, to_id) in self.moving_back.items():
            lines.append({"back": key.decode(), "from": src, "to": dst, "move": [src_key, dst_key], "to_id": to_id.decode()})
        return b"".join(json.dumps(d, separators=(",", ":")).encode() + b"\n" for d in lines)

    def _fsync(self, fd: int | None, dir_dirty: bool) -> None:
        # a sync round's worker thread
        try:
            if fd is not None:
                os.fsync(fd)
            if dir_dirty:
                _fsync_dir(os.path.dirname(self.path) or ".")
        except OSError as e:
            self._unsynced = True
            self._dir_dirty = self._dir_dirty or dir_dirty
            raise BackendError(f"dead-letter log {self.path}: sync failed: {e}") from e
        finally:
            if fd is not None:
                os.close(fd)

    def _write_new(self, rewrite: list[Any], data: bytes) -> None:
        # a sync round's worker thread: the live entries into a new file
        tmp = rewrite[0]
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as e:
            self._rewrite = None
            raise BackendError(f"dead-letter log {self.path}: rewrite failed: {e}") from e
        try:
            if os.write(fd, data) != len(data):
                raise OSError(28, "short write")
            os.fsync(fd)
        except OSError as e:
            os.close(fd)
            _unlink_quiet(tmp)
            self._rewrite = None
            raise BackendError(f"dead-letter log {self.path}: rewrite failed: {e}") from e
        rewrite[1] = (fd, len(data), data.count(b"\n"))

    def _swap(self, rewrite: list[Any]) -> None:
        """On the event loop: the new file, with the lines written since its
        snapshot, replaces the old one."""
        tmp, (fd, size, lines) = rewrite
        self._rewrite = None
        since, self._since = b"".join(self._since), []
        try:
            if since and os.pwrite(fd, since, size) != len(since):
                raise OSError(28, "short write")
            os.replace(tmp, self.path)
        except OSError as e:
            os.close(fd)
            _unlink_quiet(tmp)
            log.error("dead-letter log: cannot put the rewritten file in place", file=self.path, error=str(e))
            return
        if self._fd is not None:
            os.close(self._fd)
        self._fd = fd
        self._size = size + len(since)
        self._lines = lines + since.count(b"\n")
        self._unsynced = True
        self._dir_dirty = True

    def sync(self) -> None:
        self.prepare_sync()()

    def rewrite_now(self) -> None:
        """At start, blocking: the file holds the live entries only."""
        self._buf = []
        data = self._snapshot()
        try:
            write_atomically(self.path, data)
        except OSError as e:
            log.error("cannot rewrite the dead-letter log", file=self.path, error=str(e))
            return
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._size = len(data)
        self._lines = data.count(b"\n")

    def close(self) -> None:
        try:
            self.sync()
            if self._rewrite is not None:
                self.sync()  # the new file in place
        finally:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def delete(self) -> None:
        """The dead-letter topic is deleted: its dead letters are gone."""
        self._gone = True
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        _unlink_quiet(self.path)

    # ------------------------------------------------------------ entries

    def forget(self, key: bytes) -> None:
        """The entry of dead letter ``key`` goes (from memory only: see :meth:`drop`)."""
        origin = self.entries.pop(key, None)
        if origin is None:
            return
        self.spent.discard(key)
        keys = self.by_original[origin.message_id]
        keys.remove(key)
        if not keys:
            del self.by_original[origin.message_id]

    def by_original_id(self, message_id: bytes) -> list[Origin]:
        """The dead letters that were message ``message_id`` where they came from."""
        return [self.entries[key] for key in self.by_original.get(message_id, ())]

    def add(self, origin: Origin, move: tuple[int, int] | None = None) -> None:
        d = origin.to_json()
        if move is not None:
            d["move"] = list(move)
        self._append(d)

    def moved_in(self, key: bytes) -> None:
        self._append({"done": key.decode()})

    def moving_out(self, key: bytes, source: str, src_key: int, dest: str, dst_key: int, to_id: bytes) -> None:
        self._append({"back": key.decode(), "from": source, "to": dest, "move": [src_key, dst_key], "to_id": to_id.decode()})

    def moved_out(self, key: bytes) -> None:
        if key in self.moving_back:
            self._append({"out": key.decode()})

    def drop(self, key: bytes) -> None:
        if key in self.entries or key in self.moving_back:
            self._append({"drop": key.decode()})

    def done_with(self, key: bytes) -> None:
        """No queue of the topic holds dead letter ``key`` any more: its entry
        goes, unless the topic retains the message (a rewind would bring it
        back, to be moved back again), then it stays until that ends."""
        if key not in self.entries or key in self.spent:
            return
        if self.retains(key):
            self._append({"spent": key.decode()})
        else:
            self.drop(key)

    def forget_spent(self) -> None:
        """The topic's retention let messages go: so do their spent entries."""
        for key in [k for k in self.spent if not self.retains(k)]:
            self.drop(key)

    def left(self, channel: str, keys: Iterable[bytes], channels: Iterable[str]) -> None:
        """``channel`` (of the dead-letter topic) is done with these messages;
        an entry goes once every channel the topic has now is (see :meth:`done_with`)."""
        entries = self.entries
        present = set(channels)
        for key in keys:
            origin = entries.get(key)
            if origin is None:
                continue
            if origin.left is None:
                origin.left = set()
            origin.left.add(channel)
            if present <= origin.left:
                self.done_with(key)

    def recheck(self, channels: Iterable[str]) -> None:
        """A channel of the topic went: entries every remaining one is done with go."""
        present = set(channels)
        if not present:
            return
        for key, origin in list(self.entries.items()):
            if origin.left is not None and present <= origin.left:
                self.done_with(key)


class DeadLetters:
    """The daemon's dead letters: channel settings applied, the logs of the
    dead-letter topics, and the task that moves messages (see the module)."""

    def __init__(self, nsqd: NSQD) -> None:
        self.nsqd = nsqd
        self.logs: dict[str, DeadLetterLog] = {}
        # (channel, its dead-letter topic then, messages) waiting for the mover
        self._waiting: list[tuple[Channel, str, list[Message]]] = []
        self._wake: trio.Event | None = None
        self._lock: trio.Lock | None = None
        self._running = False

    # ------------------------------------------------------------ settings

    def configure(self, topic: Topic, channel: Channel) -> None:
        """Apply the flags and the channel's settings (at creation, after a change)."""
        opts = self.nsqd.options
        max_attempts = int(channel.settings.get("max_attempts", opts.max_attempts))  # type: ignore[call-overload]
        target = str(channel.settings.get("dead_letter_topic") or opts.dead_letter_topic.replace("%s", topic.name))
        if max_attempts and (not is_valid_topic_name(target) or is_ephemeral(target) or target == topic.name):
            log.warning(
                "dead-letter topic name not usable, messages are redelivered without limit",
                topic=topic.name, channel=channel.name, dead_letter_topic=target,
            )
            max_attempts = 0
        channel.max_attempts = max_attempts
        channel.dead_letter_topic = target if max_attempts else ""
        channel.on_dead_letter = self._dead_letter if max_attempts else None
        dlq = self.logs.get(topic.name)
        channel.on_finished = self._finished if dlq is not None else None
        channel.sweep_max_attempts()

    # ------------------------------------------------------------ logs

    def topic_created(self, topic: Topic) -> None:
        """A topic with a log file from an earlier run is a dead-letter topic."""
        if topic.ephemeral:
            return
        dlq = self._new_log(topic.name)
        if os.path.exists(dlq.path):
            dlq.load()
            self.logs[topic.name] = dlq

    def _log_for(self, topic: Topic) -> DeadLetterLog:
        dlq = self.logs.get(topic.name)
        if dlq is None:
            dlq = self.logs[topic.name] = self._new_log(topic.name)
            for channel in topic.channels.values():
                channel.on_finished = self._finished
        return dlq

    def _new_log(self, name: str) -> DeadLetterLog:
        dlq = DeadLetterLog(self.nsqd.data_path, name)
        topics = self.nsqd.topics

        def retains(key: bytes) -> bool:
            topic = topics.get(name)
            log = topic.retention if topic is not None else None
            return log is not None and bool(log.id_candidates(key))

        dlq.retains = retains
        return dlq

    def retention_shrunk(self, topic: Topic) -> None:
        """The topic's retention deleted files (expiry, or turned off): the
        entries of its messages that are gone and done with go too."""
        dlq = self.logs.get(topic.name)
        if dlq is not None and dlq.spent:
            dlq.forget_spent()
            self._touched(dlq)

    def topic_deleted(self, topic: Topic) -> None:
        dlq = self.logs.pop(topic.name, None)
        if dlq is not None:
            dlq.delete()
        else:
            _unlink_quiet(os.path.join(self.nsqd.data_path, topic.name + LOG_SUFFIX))

    def channel_gone(self, topic: Topic, channel: Channel) -> None:
        dlq = self.logs.get(topic.name)
        if dlq is not None and not topic.exiting:
            dlq.recheck(topic.channels)
            self._touched(dlq)

    def channel_emptied(self, topic: Topic, channel: Channel) -> None:
        dlq = self.logs.get(topic.name)
        if dlq is not None and topic.depth() == 0:
            # nothing waits in the topic itself: the channel held none of them now
            dlq.left(channel.name, list(dlq.entries), topic.channels)
            self._touched(dlq)

    def _finished(self, channel: Channel, msgs: Sequence[Message]) -> None:
        topic = self.nsqd.topics.get(channel.topic_name)
        dlq = self.logs.get(channel.topic_name)
        if topic is not None and dlq is not None:
            dlq.left(channel.name, [m.id for m in msgs], topic.channels)
            self._touched(dlq)

    def _touched(self, dlq: DeadLetterLog) -> None:
        if dlq.dirty:
            self.nsqd.mark_sync_due(dlq)

    def lookup(self, topic: str, msg_id: bytes) -> Origin | None:
        dlq = self.logs.get(topic)
        return dlq.entries.get(msg_id) if dlq is not None else None

    def lookup_original(self, topic: str, channel: str, message_id: bytes) -> dict[str, Any] | None:
        """Where channel ``topic:channel`` dead-lettered its message
        ``message_id`` (the latest such move), if that is still known: a
        dictionary lookup in each dead-letter topic's log."""
        found = [
            (origin.dead_lettered_at, name, origin) for name, dlq in self.logs.items() for origin in dlq.by_original_id(message_id)
            if origin.topic == topic and origin.channel == channel
        ]
        if not found:
            return None
        _, name, origin = max(found, key=lambda f: f[0])
        return origin.where(name)

    # ------------------------------------------------------------ the mover

    def _dead_letter(self, channel: Channel, msgs: list[Message]) -> None:
        """A channel's messages that reached max attempts (sync, from its code)."""
        self._waiting.append((channel, channel.dead_letter_topic, msgs))
        if not self._running:
            self._running = self.nsqd.start_soon(self.run)
        elif self._wake is not None:
            self._wake.set()

    async def run(self) -> None:
        self._wake = trio.Event()
        while True:
            if not self._waiting:
                await self._wake.wait()
                self._wake = trio.Event()
                continue
            # shutdown stops here; what still waits stays in its channel (give_back)
            await trio.lowlevel.checkpoint()
            channel, target, _ = self._waiting[0]
            msgs = [m for c, t, batch in self._waiting if c is channel and t == target for m in batch]
            self._waiting = [w for w in self._waiting if w[0] is not channel or w[1] != target]
            # a move, once begun, completes: shutdown waits for it
            with trio.CancelScope(shield=True):
                async with self._move_lock():
                    await self._move_to_dead_letter_topic(channel, target, msgs)

    def _move_lock(self) -> trio.Lock:
        if self._lock is None:
            self._lock = trio.Lock()
        return self._lock

    async def _move_to_dead_letter_topic(self, channel: Channel, name: str, msgs: list[Message]) -> None:
        nsqd = self.nsqd
        if channel.exiting:
            return  # deleted meanwhile: its messages went with it
        dlq_topic = nsqd.get_topic(name)
        dlq = self._log_for(dlq_topic)
        ids = dlq_topic.guid.new_ids(len(msgs))
        moved = [Message(i, m.body, m.timestamp, 0) for i, m in zip(ids, msgs)]
        durable = channel.durable and dlq_topic.durable
        now = time.time_ns()
        origins = [Origin(new.id, channel.topic_name, channel.name, m.id, m.attempts, m.timestamp, now) for m, new in zip(msgs, moved)]
        health = f"dead letters {channel.topic_name}:{channel.name}"
        try:
            if durable:
                dlq_topic.hold()
                # the move is noted (with where both records are) before the
                # data is written: a crash finds it
                keys = dlq_topic.backend.next_keys([m.encode() for m in moved])  # type: ignore[attr-defined]
                for origin, m, key in zip(origins, msgs, keys):
                    dlq.add(origin, (m.token, key) if m.token is not None else None)
                dlq.write_now()
            dlq_topic.put_messages(moved)
        except (BackendError, TopicExiting) as exc:
            if durable:
                for origin in origins:
                    dlq.drop(origin.id)  # (its copy was never written)
                dlq_topic.release()
            nsqd.set_unhealthy(health, str(exc))
            log.error(
                "cannot move messages to the dead-letter topic, retrying",
                topic=channel.topic_name, channel=channel.name, dead_letter_topic=name, error=str(exc),
            )
            channel.dead_letter_failed(msgs, RETRY)
            return
        nsqd.set_healthy(health)
        if not durable:
            for origin in origins:
                dlq.add(origin)
        nsqd.mark_sync_due(dlq)
        if durable:
            try:
                await nsqd.sync_barrier()  # the dead letters and their origins on disk
                if not channel.exiting:
                    for m in msgs:
                        if m.token is not None:
                            channel.backend.ack(m.token)  # type: ignore[attr-defined]
                await nsqd.sync_barrier()  # ... and the channel's records let go
                for new in moved:
                    dlq.moved_in(new.id)
                nsqd.mark_sync_due(dlq)
            finally:
                dlq_topic.release()
        channel.dead_letter_count += len(msgs)
        source_log = self.logs.get(channel.topic_name)
        if source_log is not None:  # a dead-letter topic's own channel dead-lettered them
            source_topic = nsqd.topics.get(channel.topic_name)
            source_log.left(channel.name, [m.id for m in msgs], source_topic.channels if source_topic else ())
            self._touched(source_log)

    async def requeue(self, topic: Topic, channel: Channel | None, limit: int, to_topic: bool = False) -> tuple[int, int]:
        """``POST /dead_letter/requeue``: move up to ``limit`` messages queued
        in the dead-letter topic (its own queue, or one of its channels) back
        into the channels they came from (``to_topic``: their topics, so to
        every channel).  Returns (moved, kept): a message whose origin is
        unknown or whose channel (topic) no longer exists stays."""
        moved = kept = 0
        source: Topic | Channel = topic if channel is None else channel
        # what is queued now, each message once: those that stay go back to the
        # tail, where a later step would take them again
        depth = source.depth()
        remaining = min(limit, depth) if limit > 0 else depth
        if topic.name not in self.logs:  # no dead letters ever came here: nothing to take
            return 0, remaining
        seen: set[bytes] = set()  # the ids kept so far
        while remaining > 0 and not source.exiting:
            await trio.lowlevel.checkpoint()  # shutdown stops between steps
            with trio.CancelScope(shield=True):  # ... never inside one
                async with self._move_lock():
                    m, k = await self._move_back(topic, channel, min(remaining, REQUEUE_STEP), to_topic, seen)
            moved += m
            kept += k
            remaining -= m + k
            if m + k == 0:
                break
        return moved, kept

    async def _move_back(self, topic: Topic, channel: Channel | None, limit: int, to_topic: bool, seen: set[bytes]) -> tuple[int, int]:
        """One step of :meth:`requeue`: (moved, newly kept); a message kept by an
        earlier step (in ``seen``) is put back uncounted."""
        nsqd = self.nsqd
        dlq = self.logs.get(topic.name)
        if channel is None:
            topic.hold()  # no drain reads the topic's queue meanwhile
        try:
            source: Topic | Channel = topic if channel is None else channel
            msgs = source.take_queued(limit) if isinstance(source, Channel) else source.take_backlog(limit)
            keep: list[Message] = []
            groups: dict[Topic | Channel, list[tuple[Message, Origin]]] = {}
            for m in msgs:
                origin = dlq.entries.get(m.id) if dlq is not None else None
                dest = self._queue(origin.topic if to_topic else f"{origin.topic}:{origin.channel}") if origin is not None else None
                if dest is None:
                    keep.append(m)
                else:
                    groups.setdefault(dest, []).append((m, origin))  # type: ignore[arg-type]
            source_name = _queue_name(source)
            written: list[tuple[Topic | Channel, list[tuple[Message, Origin]], bool]] = []
            for dest, items in groups.items():
                dest_topic = dest if isinstance(dest, Topic) else nsqd.topics[dest.topic_name]
                ids = dest_topic.guid.new_ids(len(items))
                fresh = [Message(i, m.body, m.timestamp, 0) for i, (m, _) in zip(ids, items)]
                durable = dest.durable and source.durable and dlq is not None
                noted: list[bytes] = []
                try:
                    if durable:
                        assert dlq is not None
                        dest.hold()
                        # noted before the data is written, as a move in
                        keys = dest.backend.next_keys([m.encode() for m in fresh])  # type: ignore[attr-defined]
                        for (m, origin), key, new in zip(items, keys, fresh):
                            if m.token is not None:
                                dlq.moving_out(origin.id, source_name, m.token, _queue_name(dest), key, new.id)
                                noted.append(origin.id)
                        dlq.write_now()
                    dest.put_messages(fresh)
                except (BackendError, ChannelExiting, TopicExiting) as exc:
                    if durable:
                        dest.release()
                    if dlq is not None:
                        for key in noted:
                            dlq.moved_out(key)  # (its copy was never written)
                    log.error("cannot move dead letters back, kept", queue=_queue_name(dest), error=str(exc))
                    keep.extend(m for m, _ in items)
                    continue
                written.append((dest, items, durable))
            if keep:
                source.put_back(keep)
            if dlq is not None:
                nsqd.mark_sync_due(dlq)
            held = [dest for dest, _, durable in written if durable]
            try:
                if held:
                    await nsqd.sync_barrier()  # the messages where they go, the moves noted
                    for _, items, _ in written:
                        for m, _ in items:
                            if m.token is not None:
                                source.backend.ack(m.token)  # type: ignore[attr-defined]
                    await nsqd.sync_barrier()  # ... and let go here
            finally:
                for dest in held:
                    dest.release()
            done = [origin.id for _, items, _ in written for _, origin in items]
            if dlq is not None:
                for msg_id in done:
                    dlq.moved_out(msg_id)
                if channel is None:
                    for msg_id in done:
                        dlq.done_with(msg_id)
                else:  # the topic's other channels may still hold it
                    dlq.left(channel.name, done, topic.channels)
                self._touched(dlq)
            newly_kept = {m.id for m in keep} - seen
            seen |= newly_kept
            return len(done), len(newly_kept)
        finally:
            if channel is None:
                topic.release()

    def _origin_channel(self, origin: Origin) -> Channel | None:
        channel = self._queue(f"{origin.topic}:{origin.channel}")
        return channel if isinstance(channel, Channel) else None

    def _queue(self, name: str) -> Topic | Channel | None:
        """The live topic ``T`` or channel ``T:C`` (the names of their disk queues)."""
        topic_name, _, channel_name = name.partition(":")
        topic = self.nsqd.topics.get(topic_name)
        if topic is None or topic.exiting:
            return None
        if not channel_name:
            return topic
        channel = topic.channels.get(channel_name)
        return None if channel is None or channel.exiting else channel

    # ------------------------------------------------------------ start and stop

    def recover(self) -> None:
        """At start, after every topic and channel is loaded (before anything
        is read): decide the moves a crash cut short, forget the dead letters
        no longer on disk."""
        nsqd = self.nsqd
        for name, dlq in self.logs.items():
            topic = nsqd.topics.get(name)
            if topic is None:
                continue
            touched: set[Any] = set()
            stood = undone = 0
            for key, (src_key, dst_key) in list(dlq.moving_in.items()):
                origin = dlq.entries[key]
                source = self._origin_channel(origin)
                if source is None or _is_done(source.backend, src_key, origin.message_id):
                    stood += 1
                    continue  # the channel let it go: the move stands
                # never delivered from here (held): the channel has it still
                if not _discard(topic.backend, dst_key, key):
                    log.warning("dead letter left in both places after a crash", topic=origin.topic, channel=origin.channel, id=key.decode())
                touched.add(topic.backend)
                dlq.forget(key)
                undone += 1
            dlq.moving_in.clear()
            for key, (src_name, src_key, dst_name, dst_key, to_id) in list(dlq.moving_back.items()):
                source_queue = self._queue(src_name)
                if source_queue is None or _is_done(source_queue.backend, src_key, key):
                    if src_name == name:
                        dlq.done_with(key)  # moved back (from a channel: others may hold it still)
                    stood += 1
                    continue
                dest = self._queue(dst_name)
                if dest is not None:
                    if not _discard(dest.backend, dst_key, to_id):
                        log.warning("dead letter left in both places after a crash", queue=dst_name, id=key.decode())
                    touched.add(dest.backend)
                undone += 1
            dlq.moving_back.clear()
            if stood or undone:
                log.info("dead letters: moves a crash interrupted, completed or undone", topic=name, completed=stood, undone=undone)
            for backend in touched:
                backend.sync()
            queues = [topic.backend, *(c.backend for c in topic.channels.values())]
            if len(dlq.entries) - len(dlq.spent) > sum(b.depth() for b in queues):
                # more origins than messages: keep those of messages still on disk
                # (or retained)
                present: set[bytes] = set()
                for backend in queues:
                    if hasattr(backend, "unread_ids"):
                        present |= backend.unread_ids()
                for key in [k for k in dlq.entries if k not in present]:
                    dlq.done_with(key)
            dlq.rewrite_now()

    def give_back(self) -> None:
        """Shutdown: messages still waiting for the mover stay in their channels."""
        waiting, self._waiting = self._waiting, []
        for channel, _, msgs in waiting:
            if not channel.exiting:
                channel.take_back(msgs)

    def close(self) -> None:
        for name, dlq in self.logs.items():
            try:
                dlq.close()
            except BackendError as exc:
                log.error("cannot write the dead-letter log", topic=name, error=str(exc))


def _queue_name(queue: Topic | Channel) -> str:
    return queue.name if isinstance(queue, Topic) else f"{queue.topic_name}:{queue.name}"


def _is_done(backend: Any, key: int, msg_id: bytes) -> bool:
    check = getattr(backend, "is_done", None)
    return True if check is None else bool(check(key, msg_id))


def _discard(backend: Any, key: int, msg_id: bytes) -> bool:
    discard = getattr(backend, "discard", None)
    return False if discard is None else bool(discard(key, msg_id))


def _noop() -> None:
    return None


def _never(key: bytes) -> bool:
    return False
