"""Looking at queued messages without consuming them (nsqio/nsq #375, #1412,
#1482): the next messages of a channel or a topic in the order they will be
delivered, and where one message id is.

Everything here reads: no message is taken, moved or counted, no attempt,
read position, depth or sync state changes.  Memory queues are walked from
their head (a batch lends the messages asked for, made for the look); disk
queues are read through descriptors of their own from the read position on
(:meth:`DiskQueue.peek`), so the cost is the records shown, not the queue's
depth.  Finding an id in a disk queue uses the queue's id index
(:meth:`DiskQueue.find_id`), which the HTTP handler extends in a worker
thread first.
"""

from __future__ import annotations

import base64
import heapq
import re
import time
from collections.abc import Iterable, Iterator
from itertools import islice
from typing import TYPE_CHECKING, Any

from .disk_queue import ReadCost
from .message import Message, MessageBatch
from .protocol import MESSAGE_RECORD_PREFIX

if TYPE_CHECKING:
    from .channel import Channel
    from .client_v2 import ClientV2
    from .topic import Topic

MAX_COUNT = 1000
DEFAULT_COUNT = 10
MAX_BODY_LIMIT = 65536
DEFAULT_BODY_LIMIT = 1024
# deferred records (sync mode, or read back after a restart) a peek passes
# over on disk while looking for queued ones, at most
DISK_DEFERRED_SCAN = 10_000

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def preview(body: bytes) -> str:
    """A printable rendering of (the start of) a body: UTF-8 where it is,
    ``\\xNN`` for other bytes and control characters."""
    text = body.decode("utf-8", "backslashreplace")
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def render(msg_id: bytes, timestamp: int, attempts: int, body: bytes, body_size: int, body_limit: int, **extra: Any) -> dict[str, Any]:
    shown = body[:body_limit]
    out = {
        "id": msg_id.decode("ascii", "replace"),
        "timestamp": timestamp,
        "attempts": attempts,
        "body_size": body_size,
        "body": base64.b64encode(shown).decode(),
        "body_preview": preview(shown),
        "body_truncated": body_size > len(shown),
    }
    out.update(extra)
    return out


def _render_message(msg: Message, body_limit: int, **extra: Any) -> dict[str, Any]:
    return render(msg.id, msg.timestamp, msg.attempts, msg.body, len(msg.body), body_limit, **extra)


def _dead_letter(channel: Channel, attempts: int) -> dict[str, Any]:
    """A message already delivered the channel's max attempts times is never
    delivered again: when the channel reaches it (a deferred one: when its
    move is tried again) it goes to the dead-letter topic, which the entry names."""
    limit = channel.max_attempts
    return {"dead_letter_topic": channel.dead_letter_topic} if limit and attempts >= limit else {}


def _record_attempts(data: bytes) -> int:
    return MESSAGE_RECORD_PREFIX.unpack_from(data)[1]  # type: ignore[no-any-return]


def _render_record(data: bytes, size: int, body_limit: int, **extra: Any) -> dict[str, Any]:
    """A disk record's payload (possibly only its head) as :func:`render` shows it."""
    timestamp, attempts = MESSAGE_RECORD_PREFIX.unpack_from(data)
    return render(data[10:26], timestamp, attempts, data[26:], size - 26, body_limit, **extra)


def client_info(client: ClientV2 | None) -> dict[str, Any] | None:
    if client is None:
        return None
    return {
        "client_id": client.client_id,
        "hostname": client.hostname,
        "remote_address": client.remote_address,
        "user_agent": client.user_agent,
    }


class _Clock:
    """Channel (monotonic) times as unix nanoseconds."""

    def __init__(self, channel: Channel) -> None:
        self.mono = channel._clock()
        self.wall = time.time_ns()

    def wall_of(self, t: float) -> int:
        return self.wall + int((t - self.mono) * 1e9)


class _Lookahead:
    """An iterator whose next item can be looked at before it is taken."""

    _END = object()

    def __init__(self, it: Iterator[Any]) -> None:
        self._it = it
        self._next: Any = self._END

    def has(self) -> bool:
        if self._next is self._END:
            self._next = next(self._it, self._END)
        return self._next is not self._END

    def take(self) -> Any:
        self.has()
        item, self._next = self._next, self._END
        return item


def _disk(backend: Any, cost: ReadCost, body_limit: int) -> _Lookahead:
    peek = getattr(backend, "peek", None)
    # 26 bytes of header, then as much of the body as is shown
    return _Lookahead(peek(cost, 26 + body_limit) if peek is not None else iter(()))


# ---------------------------------------------------------------- channels


def peek_channel(channel: Channel, count: int, body_limit: int, *, deferred: bool, in_flight: bool) -> dict[str, Any]:
    """The next ``count`` queued messages of a channel in delivery order
    (memory and disk taken in turns, as the channel takes them), and on
    request the deferred ones by due time and the in-flight ones by deadline."""
    clock = _Clock(channel)
    cost = ReadCost()
    queued, on_disk_deferred, more = _channel_queue(channel, count, body_limit, clock, cost)
    out: dict[str, Any] = {
        "topic_name": channel.topic_name,
        "channel_name": channel.name,
        "depth": channel.depth(),
        "in_flight_count": len(channel.in_flight),
        "deferred_count": len(channel.deferred),
        "queued": queued,
        "more": more,
    }
    if deferred:
        out["deferred"] = _deferred(channel, count, body_limit, clock, on_disk_deferred)
    if in_flight:
        out["in_flight"] = _in_flight(channel, count, body_limit, clock)
    out["examined"] = cost.as_dict()
    return out


def _channel_queue(
    channel: Channel, count: int, body_limit: int, clock: _Clock, cost: ReadCost
) -> tuple[list[dict[str, Any]], list[tuple[int, dict[str, Any]]], bool]:
    """Walk memory and disk as ``Channel._pop`` does: in turns while both
    have messages, a disk record that is not yet due (a journal note, or a
    due time saved at shutdown) taking its turn without being delivered.
    Returns (queued, [(due, deferred record)] met on disk, more left)."""
    mem = _Lookahead(channel.memory.peek(count))
    disk = _disk(channel.backend, cost, body_limit)
    pending = channel.pending_deferrals
    turn = channel._backend_turn
    queued: list[dict[str, Any]] = []
    deferred: list[tuple[int, dict[str, Any]]] = []
    passed = 0
    while len(queued) < count and passed <= DISK_DEFERRED_SCAN:
        if disk.has() and (not mem.has() or turn):
            turn = False
            _, data, size, note = disk.take()
            # as Channel._pop: a spent message is moved before its due time is looked at
            spent = _dead_letter(channel, _record_attempts(data))
            due = 0 if spent else note or (pending.get(data[10:26], 0) if pending else 0)
            if due > clock.wall:
                passed += 1
                deferred.append((due, _render_record(data, size, body_limit, state="deferred", due=due, where="disk")))
                continue
            queued.append(_render_record(data, size, body_limit, state="queued", where="disk", **spent))
        elif mem.has():
            turn = True
            msg = mem.take()
            queued.append(_render_message(msg, body_limit, state="queued", where="memory", **_dead_letter(channel, msg.attempts)))
        else:
            break
    return queued, deferred, mem.has() or disk.has()


def _heap_smallest(heap: list[tuple[float, int, Message]], valid: Any, limit: int) -> Iterator[tuple[float, int, Message]]:
    """A heap's live entries in order, without popping it (a walk of its tree)."""
    if not heap:
        return
    frontier = [(heap[0], 0)]
    seen = 0
    while frontier and seen < limit:
        entry, i = heapq.heappop(frontier)
        seen += 1
        if valid(entry):
            yield entry
        for child in (2 * i + 1, 2 * i + 2):
            if child < len(heap):
                heapq.heappush(frontier, (heap[child], child))


def _deferred(channel: Channel, count: int, body_limit: int, clock: _Clock, on_disk: list[tuple[int, dict[str, Any]]]) -> list[dict[str, Any]]:
    deferred = channel.deferred

    def live(entry: tuple[float, int, Message]) -> bool:
        due, _, msg = entry
        return deferred.get(msg.id) is msg and msg.due == due

    in_memory = [
        (
            clock.wall_of(due),
            _render_message(msg, body_limit, state="deferred", due=clock.wall_of(due), where="memory", **_dead_letter(channel, msg.attempts)),
        )
        for due, _, msg in islice(_heap_smallest(channel._deferred_heap, live, 4 * count + 1000), count)
    ]
    merged = heapq.merge(in_memory, sorted(on_disk, key=lambda e: e[0]), key=lambda e: e[0])
    return [item for _, item in islice(merged, count)]


def _in_flight(channel: Channel, count: int, body_limit: int, clock: _Clock) -> list[dict[str, Any]]:
    in_flight = channel.in_flight

    def live(entry: tuple[float, int, Message]) -> bool:
        deadline, _, msg = entry
        return in_flight.get(msg.id) is msg and msg.flight is None and msg.deadline == deadline

    # each timeout group is in deadline order; the rare capped TOUCH is in a heap
    runs: list[Iterable[tuple[float, int, Message]]] = [
        ((m.deadline, 0, m) for m in flight.values()) for flight in channel._flights.values()
    ]
    runs.append(_heap_smallest(channel._irregular, live, 4 * count + 1000))
    out = []
    for deadline, _, msg in islice(heapq.merge(*runs, key=lambda e: e[0]), count):
        out.append(
            _render_message(
                msg, body_limit, state="in_flight", where="memory",
                delivered_at=clock.wall_of(msg.delivered_at), deadline=clock.wall_of(deadline), client=client_info(msg.client),
            )
        )
    return out


def find_in_channel(channel: Channel, msg_id: bytes, body_limit: int, cost: ReadCost) -> dict[str, Any]:
    """Where ``msg_id`` is in a channel: in flight (to which client), deferred
    (until when), queued (memory or disk), or not here."""
    clock = _Clock(channel)
    msg = channel.in_flight.get(msg_id)
    if msg is not None:
        return _render_message(
            msg, body_limit, state="in_flight", where="memory",
            delivered_at=clock.wall_of(msg.delivered_at), deadline=clock.wall_of(msg.deadline), client=client_info(msg.client),
        )
    msg = channel.deferred.get(msg_id)
    if msg is not None:
        return _render_message(msg, body_limit, state="deferred", where="memory", due=clock.wall_of(msg.due), **_dead_letter(channel, msg.attempts))
    found = channel.memory.find(msg_id)
    if found is not None:
        ahead, msg = found
        return _render_message(msg, body_limit, state="queued", where="memory", ahead_in_memory=ahead, **_dead_letter(channel, msg.attempts))
    return _find_on_disk(channel.backend, msg_id, body_limit, cost, clock.wall, channel.pending_deferrals, channel=channel)


def _find_on_disk(
    backend: Any, msg_id: bytes, body_limit: int, cost: ReadCost, now: int, pending: dict[bytes, Any], channel: Channel | None
) -> dict[str, Any]:
    find = getattr(backend, "find_id", None)
    hit = find(msg_id, cost, 26 + body_limit) if find is not None else None
    if hit is None:
        return {"state": "not_found"}
    _, data, size, note = hit
    if channel is not None:
        spent = _dead_letter(channel, _record_attempts(data))
        due = 0 if spent else note or pending.get(msg_id, 0)
        if due > now:
            return _render_record(data, size, body_limit, state="deferred", where="disk", due=due)
        return _render_record(data, size, body_limit, state="queued", where="disk", **spent)
    defer_ms = note // 1_000_000 if note else int(pending.get(msg_id, 0.0) * 1000)
    return _render_record(data, size, body_limit, state="queued", where="disk", **({"defer": defer_ms} if defer_ms else {}))


# ---------------------------------------------------------------- topics


def peek_topic(topic: Topic, count: int, body_limit: int, drain_step: int) -> dict[str, Any]:
    """The next ``count`` messages a topic holds (no channel yet, paused, or
    a backlog being moved), in the order its drain hands them to the
    channels: a stalled batch first, then memory and disk in turns of up to
    ``drain_step`` messages."""
    cost = ReadCost()
    out: list[dict[str, Any]] = []
    for msgs, where in _topic_runs(topic, count, cost, body_limit, drain_step):
        out.extend(msgs[: count - len(out)])
        if len(out) >= count:
            break
    return {
        "topic_name": topic.name,
        "depth": topic.depth(),
        "queued": out,
        "more": topic.depth() > len(out),
        "examined": cost.as_dict(),
    }


def _topic_message(msg: Message, body_limit: int, where: str) -> dict[str, Any]:
    extra = {"defer": int(msg.deferred * 1000)} if msg.deferred else {}
    return _render_message(msg, body_limit, state="queued", where=where, **extra)


def _topic_runs(topic: Topic, count: int, cost: ReadCost, body_limit: int, step: int) -> Iterator[tuple[list[dict[str, Any]], str]]:
    """What successive ``drain()`` steps would move, as shown: each run is
    one take from one side (``Topic.drain`` alternates them, each call
    moving up to ``step`` messages), cut to what is still to be shown."""
    if topic._stall:
        stalled = topic._stall[0][1]
        msgs = stalled.messages(stalled.lo, min(stalled.hi, stalled.lo + count)) if isinstance(stalled, MessageBatch) else stalled[:count]
        yield [_topic_message(m, body_limit, "stalled") for m in msgs], "stalled"
    disk = _disk(topic.backend, cost, body_limit)
    pending = topic.pending_deferrals
    items = _Lookahead(iter(topic.memory._items))
    pos = topic.memory._pos  # taken from the head batch already
    turn = topic._drain_backend_turn
    moved = 0
    shown = 0
    while shown < count:
        if moved >= step:
            moved = 0  # the next drain() call
        turn = not turn
        want = min(step - moved, count - shown)
        run: list[dict[str, Any]] = []
        if disk.has() and (turn or not items.has()):
            while len(run) < want and disk.has():
                _, data, size, note = disk.take()
                defer = note // 1_000_000 if note else int(pending.get(data[10:26], 0.0) * 1000) if pending else 0
                run.append(_render_record(data, size, body_limit, state="queued", where="disk", **({"defer": defer} if defer else {})))
            moved += len(run)
        elif items.has():
            head = items._next
            if isinstance(head, MessageBatch):
                take = min(step - moved, len(head) - pos)
                msgs = head.messages(head.lo + pos, head.lo + pos + min(take, want))
                pos += take
                if pos >= len(head):
                    items.take()
                    pos = 0
            else:
                # a take is the run of single messages at the head
                msgs = []
                take = 0
                while take < step - moved and items.has() and isinstance(items._next, Message):
                    msg = items.take()
                    if len(msgs) < want:
                        msgs.append(msg)
                    take += 1
            run = [_topic_message(m, body_limit, "memory") for m in msgs]
            moved += take
        else:
            return
        shown += len(run)
        yield run, "run"


def find_in_topic(topic: Topic, msg_id: bytes, body_limit: int, cost: ReadCost) -> dict[str, Any]:
    """Where ``msg_id`` is in a topic's own queue (held for its channels)."""
    for channel, stalled in topic._stall[:1]:
        for m in stalled:
            if m.id == msg_id:
                return _topic_message(m, body_limit, "stalled")
    found = topic.memory.find(msg_id)
    if found is not None:
        ahead, msg = found
        return dict(_topic_message(msg, body_limit, "memory"), ahead_in_memory=ahead)
    return _find_on_disk(topic.backend, msg_id, body_limit, cost, time.time_ns(), topic.pending_deferrals, channel=None)
