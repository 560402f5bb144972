"""A topic: the stream publishers write to, fanned out to every channel.

nsqd runs a pump goroutine per topic that copies each message to every
channel.  Here the fan-out happens synchronously inside the publish call when
the topic has channels and no backlog, which costs no task switch per
message.  A topic with no channels (or paused) holds messages in its own
memory queue and backend; once it can deliver again ``drain()`` moves that
backlog to the channels in bounded steps (the daemon runs it in a task).

A channel that cannot store a batch (its disk is full) leaves the batch
*stalled* in the topic: channels that took it keep it, the others get it
when a later ``drain()`` retries, and nothing newer passes it meanwhile.  In
durable mode each channel's queue also records how far into the topic's
backlog it has copied (its ``mark``), so a batch copied before a crash is
not copied again after it.
"""

from __future__ import annotations

import time
from array import array
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .backend_queue import BackendError, BackendQueue
from .channel import Channel
from .guid import GuidFactory
from .log import get_logger
from .memory_queue import MemoryQueue
from .message import Message, MessageBatch, Messages, any_deferred, body_bytes, copy_messages, encode_messages
from .protocol import is_ephemeral

if TYPE_CHECKING:
    from .e2e import LatencyStream
    from .retention import RetentionLog

log = get_logger()


class TopicExiting(Exception):
    pass


class TopicFull(Exception):
    """A publish refused: the topic holds its --max-disk-bytes-per-topic on disk."""


# a full topic accepts publishes again once its bytes on disk are at most this part of its bound
DISK_LOW_WATER = 0.9


class Topic:
    def __init__(
        self,
        name: str,
        *,
        backend: BackendQueue,
        mem_queue_size: int,
        node_id: int,
        make_channel: Callable[[Topic, str], Channel],
        on_backlog: Callable[[Topic], None] | None = None,
        on_channel_created: Callable[[Topic, Channel], None] | None = None,
        on_channel_deleted: Callable[[Topic, Channel], None] | None = None,
        on_empty_ephemeral: Callable[[Topic], None] | None = None,
    ) -> None:
        self.name = name
        self.ephemeral = is_ephemeral(name)
        self.backend = backend
        self.mem_queue_size = mem_queue_size
        self.guid = GuidFactory(node_id)
        self._make_channel = make_channel
        # the daemon starts a drain task when a backlog can be delivered
        self._on_backlog = on_backlog
        self._on_channel_created = on_channel_created
        self._on_channel_deleted = on_channel_deleted
        self._on_empty_ephemeral = on_empty_ephemeral

        self.channels: dict[str, Channel] = {}
        self.memory = MemoryQueue()
        # drain() alternates between the backend and memory so neither starves
        self._drain_backend_turn = False
        self.paused = False
        # while held (e.g. asking lookupd for the topic's channels) messages are
        # kept in the topic instead of going to the channels that exist so far
        self.holds = 0
        # a backend with tracked reads: drained records are acknowledged only
        # once the channels hold them durably (the daemon syncs, then acks)
        self.durable = bool(getattr(backend, "track_acks", False))
        self.drained_tokens: list[int] = []
        # a batch some channels could not take yet: [(channel, its copy)], the
        # batch's topic positions (durable mode) and its mark
        self._stall: list[tuple[Channel, Messages]] = []
        self._stall_positions: list[int] | None = None
        # id -> publish-time delay (s) of deferred messages stored on disk
        self.pending_deferrals: dict[bytes, float] = {}
        self.exiting = False
        self.message_count = 0
        self.message_bytes = 0
        # bytes on disk (this queue and its channels') past which publishes
        # are refused (0: unbounded, as nsqd); see check_disk_bound
        self.max_disk_bytes = 0
        self.disk_full = False
        # the log keeping what the topic accepts, when retention is on (retention.py)
        self.retention: RetentionLog | None = None
        # nsqd.dat extra keys of this topic's entry: settings made through the
        # HTTP API (settings.py) and retention (retention.py)
        self.settings: dict[str, object] = {}

    def __repr__(self) -> str:
        return f"Topic({self.name})"

    # ------------------------------------------------------------ ids

    def new_message(self, body: bytes, deferred: float = 0.0) -> Message:
        return Message(self.guid.new_id(), body, time.time_ns(), 0, deferred)

    def new_messages(self, bodies: list[bytes]) -> list[Message]:
        ts = time.time_ns()
        return [Message(i, b, ts) for i, b in zip(self.guid.new_ids(len(bodies)), bodies)]

    def new_batch(self, body: bytes, count: int, size: int, starts: array[int] | None) -> MessageBatch:
        """The messages of an MPUB body that :func:`protocol.scan_mpub_body` checked."""
        return MessageBatch(body, count, size, starts, time.time_ns(), self.guid.reserve(count))

    # ------------------------------------------------------------ publishing

    def depth(self) -> int:
        return len(self.memory) + self.backend.depth() + self.stalled_count()

    def stalled_count(self) -> int:
        """Messages not yet in every channel because a channel's disk was full."""
        return len(self._stall[0][1]) if self._stall else 0

    def has_backlog(self) -> bool:
        return bool(self.memory) or self.backend.depth() > 0 or bool(self._stall)

    def can_deliver(self) -> bool:
        return bool(self.channels) and not self.paused and not self.holds

    # ------------------------------------------------------------ bounded disk

    def disk_bytes(self) -> int:
        """What the bound counts: bytes of the records queued on disk, not yet
        read, in this topic's queue and its channels' (memory, in-flight and
        deferred messages are not counted)."""
        return self.backend.bytes_queued() + sum([c.backend.bytes_queued() for c in self.channels.values()])

    def disk_refuses(self) -> bool:
        """Whether publishes are refused now (the full state brought up to
        date).  The bound is checked before a publish, so one accepted publish
        may carry the topic past it; a full topic accepts again once at most
        DISK_LOW_WATER of the bound is on disk."""
        limit = self.max_disk_bytes
        used = self.disk_bytes()
        if self.disk_full:
            if used > limit * DISK_LOW_WATER:
                return True
            self.disk_full = False
            log.info("TOPIC: below its disk bound again, accepting publishes", topic=self.name, disk_bytes=used, max_disk_bytes=limit)
        elif used >= limit:
            self.disk_full = True
            log.warning("TOPIC: disk bound reached, refusing publishes", topic=self.name, disk_bytes=used, max_disk_bytes=limit)
            return True
        return False

    def check_disk_bound(self) -> None:
        """Before a publish (when max_disk_bytes is set): TopicFull if refused."""
        if self.disk_refuses():
            raise TopicFull(f"topic {self.name} is full ({self.disk_bytes()} bytes on disk, bound {self.max_disk_bytes})")

    def put_messages(self, msgs: Messages) -> None:
        """Accept published messages; raises TopicExiting or BackendError
        (in which case nothing was accepted)."""
        if self.exiting:
            raise TopicExiting(self.name)
        if not self.channels:
            self._store(msgs)  # kept until a channel comes
        elif not self.paused and not self.holds and not self.memory and self.backend.depth() == 0 and not self._stall:
            self._fan_out(msgs)
        else:
            self._store(msgs)
            if self.can_deliver() and self._on_backlog is not None:
                self._on_backlog(self)
        self.message_count += len(msgs)
        self.message_bytes += body_bytes(msgs)

    def retain(self, log: RetentionLog | None) -> None:
        """Keep (or stop keeping) everything the topic accepts in ``log``.  A
        topic without retention pays nothing: only a retaining instance has
        its ``put_messages`` replaced by :meth:`_put_retained`."""
        self.retention = log
        if log is None:
            self.__dict__.pop("put_messages", None)
        else:
            self.put_messages = self._put_retained  # type: ignore[method-assign]

    def _put_retained(self, msgs: Messages) -> None:
        """Into the log first (so a message is never delivered without being
        retained), taken back if the publish is refused after all."""
        log = self.retention
        if self.exiting or log is None:
            raise TopicExiting(self.name)
        before = log.append(msgs)
        try:
            Topic.put_messages(self, msgs)
        except BaseException:
            log.undo(before)
            raise

    def _store(self, msgs: Messages) -> None:
        mem = self.memory
        room = self.mem_queue_size - len(mem)
        if room >= len(msgs):
            mem.put(msgs)
            return
        spill = msgs[room:] if room > 0 else msgs
        # the backend write is the one step that can fail: do it first so a
        # failure leaves nothing half-accepted
        deferred = any_deferred(spill)
        if self.durable and deferred:
            # the record format has no room for the delay: the queue's journal keeps it
            notes = [int(m.deferred * 1e9) for m in spill]
            self.backend.put_many(encode_messages(spill), notes=notes)  # type: ignore[call-arg]
        elif not deferred and type(spill) is list and len(spill) == 1:
            self.backend.put(spill[0].encode())  # a PUB's record
        else:
            self.backend.put_many(encode_messages(spill))
            if deferred:
                for m in spill:
                    if m.deferred:
                        # the record format has no room for it: remember it beside
                        self.pending_deferrals[m.id] = m.deferred
        if room > 0:
            mem.put(msgs[:room])

    def _fan_out(self, msgs: Messages, positions: list[int] | None = None) -> None:
        """Give every channel its copy.  If a channel's disk is full the publish
        still stands (the topic keeps the batch for the channels that did not
        take it, see drain()) in default mode; in durable mode an OK means on
        disk, so the BackendError goes to the publisher — unless this is the
        backlog (``positions`` given), which stays in the topic's own queue."""
        channels = [c for c in self.channels.values() if not c.exiting]
        # copy before the first channel can deliver (and so change) the originals
        batches = [msgs] + [copy_messages(msgs) for _ in channels[1:]]
        try:
            self._deliver(list(zip(channels, batches)), positions)
        except BackendError:
            if self.durable and positions is None:
                self._stall = []
                raise
            if self._on_backlog is not None:
                self._on_backlog(self)  # the drain task retries

    def _deliver(self, pending: list[tuple[Channel, Messages]], positions: list[int] | None) -> None:
        """Put each channel's batch; on BackendError the batches not taken
        stay as the stall (and the error is raised)."""
        mark = positions[-1] if positions else None
        for i, (channel, batch) in enumerate(pending):
            if channel.exiting:
                continue
            if positions is not None:
                copied = getattr(channel.backend, "mark", -1)
                if copied >= positions[0]:
                    # copied before a crash: only what is newer than its mark
                    batch = [m for m, p in zip(batch, positions) if p > copied]  # type: ignore[arg-type]
            try:
                if batch:
                    channel.put_messages(batch, mark)
            except BackendError:
                self._stall = pending[i:]
                self._stall_positions = positions
                raise
        self._stall = []
        self._stall_positions = None

    def drain(self, limit: int = 1000) -> bool:
        """Move up to ``limit`` backlog messages to the channels.  Returns True
        while there is more to move; raises BackendError while a channel
        cannot take the stalled batch (call again later)."""
        if not self.can_deliver() or self.exiting:
            return False
        if self._stall:
            self._deliver(self._stall, self._stall_positions)
        moved = 0
        msgs: Messages
        while moved < limit and not self._stall and self.can_deliver():
            # from one side, then the other's turn
            self._drain_backend_turn = not self._drain_backend_turn
            if self.backend.depth() > 0 and (self._drain_backend_turn or not self.memory):
                msgs, positions = self._read_backend(limit - moved)
                if not msgs:
                    break
                self._fan_out(msgs, positions)
            elif self.memory:
                # a batch or the single messages at the head (durable topics
                # keep no memory: no positions, no marks)
                msgs = self.memory.take(limit - moved)
                self._fan_out(msgs)
            else:
                break
            moved += len(msgs)
        return self.has_backlog()

    def _read_backend(self, limit: int) -> tuple[list[Message], list[int] | None]:
        """Up to ``limit`` messages from the backend; in durable mode also the
        topic position of each (for the channels' marks)."""
        batch: list[Message] = []
        positions: list[int] | None = [] if self.durable else None
        while len(batch) < limit and self.backend.depth() > 0:
            item = self._get_backend()
            if item is None:
                break
            msg, token, note = item
            if token is not None:
                self.drained_tokens.append(token)
            if msg is None:
                continue
            if note:
                msg.deferred = note / 1e9
            elif self.pending_deferrals:
                msg.deferred = self.pending_deferrals.pop(msg.id, 0.0)
            if positions is not None and token is not None:
                positions.append(token)
            batch.append(msg)
        return batch, (positions or None)

    def _get_backend(self) -> tuple[Message | None, int | None, int] | None:
        """The backend's next record as (message, or None if it does not
        decode; its token and note in durable mode), None when empty."""
        backend = self.backend
        token = None
        note = 0
        if self.durable:
            item = backend.get_tracked()  # type: ignore[attr-defined]
            if item is None:
                return None
            data, token, note = item
        else:
            data = backend.get()
            if data is None:
                return None
        try:
            return Message.decode(data), token, note
        except ValueError:
            log.error("failed to decode message from backend", topic=self.name)
            return None, token, note

    @property
    def stalled(self) -> bool:
        return bool(self._stall)

    # ------------------------------------------------------------ moving messages out (dead-letter requeue)

    def take_backlog(self, limit: int) -> list[Message]:
        """Up to ``limit`` messages of the topic's own queue, to be moved
        elsewhere (call while held, so no drain runs meanwhile; in durable
        mode their records stay until acknowledged)."""
        out: list[Message] = []
        if self._stall:
            return out  # owed to channels already
        while len(out) < limit:
            if self.memory:
                out += self.memory.pop_many(limit - len(out))
                continue
            item = self._get_backend() if self.backend.depth() > 0 else None
            if item is None:
                break
            msg, token, _ = item
            if msg is None:
                if token is not None:
                    self.backend.ack(token)  # type: ignore[attr-defined]
                continue
            msg.token = token
            out.append(msg)
        return out

    def put_back(self, msgs: list[Message]) -> None:
        """Messages from ``take_backlog`` that stay: queued again at the tail."""
        if not msgs:
            return
        tokens = [m.token for m in msgs]
        if any(t is not None for t in tokens):
            # each record stored again in place of the one read (durable mode)
            self.backend.put_again([m.encode() for m in msgs], tokens)  # type: ignore[attr-defined]
        else:
            self._store(msgs)
        for m in msgs:
            m.token = None

    def settle_stall(self) -> None:
        """Shutdown: the channels still owed a stalled batch take it into memory
        (flushed with the rest).  Durable mode: the batch is still unacknowledged
        in the topic's queue and the channels' marks tell who has it."""
        stall, self._stall = self._stall, []
        self._stall_positions = None
        if self.durable:
            if stall:
                # not acknowledged: copied again after the restart, to the channels whose marks lack it
                self.drained_tokens = []
            return
        for channel, batch in stall:
            if not channel.exiting:
                channel.take_stalled(batch)

    # ------------------------------------------------------------ channels

    def get_channel(self, name: str) -> Channel:
        channel = self.channels.get(name)
        if channel is not None:
            return channel
        channel = self._make_channel(self, name)
        self.channels[name] = channel
        log.info("new channel", topic=self.name, channel=name)
        if self._on_channel_created is not None:
            self._on_channel_created(self, channel)
        if self.durable and getattr(channel.backend, "mark", -1) >= self.backend.end_key():  # type: ignore[attr-defined]
            # the mark names a topic position never written: not this topic's queue
            log.warning("channel copy mark ahead of the topic, ignored", topic=self.name, channel=name)
            channel.backend.reset_mark()  # type: ignore[attr-defined]
        if self.has_backlog() and self.can_deliver() and self._on_backlog is not None:
            self._on_backlog(self)
        return channel

    def get_existing_channel(self, name: str) -> Channel | None:
        return self.channels.get(name)

    def delete_existing_channel(self, name: str) -> bool:
        channel = self.channels.pop(name, None)
        if channel is None:
            return False
        log.info("deleting channel", topic=self.name, channel=name)
        channel.delete()
        if self._on_channel_deleted is not None:
            self._on_channel_deleted(self, channel)
        if self.ephemeral and not self.channels and self._on_empty_ephemeral is not None:
            self._on_empty_ephemeral(self)
        return True

    # ------------------------------------------------------------ admin

    def hold(self) -> None:
        self.holds += 1

    def release(self) -> None:
        self.holds -= 1
        if self.has_backlog() and self.can_deliver() and self._on_backlog is not None:
            self._on_backlog(self)

    def pause(self) -> None:
        self.paused = True

    def unpause(self) -> None:
        self.paused = False
        if self.has_backlog() and self.can_deliver() and self._on_backlog is not None:
            self._on_backlog(self)

    def empty(self) -> None:
        self.memory.clear()
        self._stall = []
        self._stall_positions = None
        self.backend.empty()

    def ack_drained(self) -> None:
        """The channels now hold the drained messages durably."""
        tokens, self.drained_tokens = self.drained_tokens, []
        for token in tokens:
            self.backend.ack(token)  # type: ignore[attr-defined]

    def flush_to_backend(self) -> dict[bytes, float]:
        """Shutdown (after the channels were flushed): the memory queue goes
        to the backend.  Returns the publish-time delays to keep beside the
        queue (id -> seconds)."""
        if self.drained_tokens:
            # durable mode, a drain's sync cut short: the channels are closed
            # (synced) already, so the records are theirs; a Go nsqd taking the
            # data dir over would copy them again otherwise
            self.ack_drained()
        records: list[bytes] = []
        for msgs in self.memory.take_all():
            records += encode_messages(msgs)
            if any_deferred(msgs):
                for m in msgs:
                    if m.deferred:
                        self.pending_deferrals[m.id] = m.deferred
        if records:
            self.backend.put_many(records)
        return dict(self.pending_deferrals)

    def delete(self) -> None:
        self.exiting = True
        for name in list(self.channels):
            channel = self.channels.pop(name)
            channel.delete()
            if self._on_channel_deleted is not None:
                self._on_channel_deleted(self, channel)
        self.memory.clear()
        self._stall = []
        self.backend.delete()

    def stats(self, channel_filter: str | None = None, include_clients: bool = True) -> dict[str, object]:
        channels = [
            c.stats(include_clients)
            for name, c in sorted(self.channels.items())
            if channel_filter is None or name == channel_filter
        ]
        out = {
            "topic_name": self.name,
            "channels": channels,
            "depth": self.depth(),
            "backend_depth": self.backend.depth(),
            "message_count": self.message_count,
            "message_bytes": self.message_bytes,
            "paused": self.paused,
            "e2e_processing_latency": _aggregate_e2e([c.e2e for c in self.channels.values()]),
        }
        if self.max_disk_bytes:
            # only where the bound is on: otherwise exactly nsqd's fields
            for entry in channels:
                entry["backend_bytes"] = self.channels[entry["channel_name"]].backend.bytes_queued()  # type: ignore[index]
            out["backend_bytes"] = self.backend.bytes_queued()
            out["disk_bytes"] = self.disk_bytes()
            out["max_disk_bytes"] = self.max_disk_bytes
            out["disk_full"] = self.disk_refuses()
        if self.retention is not None:
            out["retention"] = self.retention.stats()
        return out


def _aggregate_e2e(streams: list[LatencyStream | None]) -> dict[str, object]:
    live = [s for s in streams if s is not None]
    if not live:
        return {"count": 0, "percentiles": None}
    return live[0].merged_result(live)
