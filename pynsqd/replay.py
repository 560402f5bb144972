"""A channel rewound to a point in time, or created from the oldest retained
message: its topic's retained messages (``retention.py``) published since
then are given to it again, original ids and timestamps kept, at least once.

The replay covers the log up to where it ended when the rewind was asked
for; what is published afterwards reaches the channel as usual.  It is fed
to the channel a step at a time, while the channel holds fewer than
``window`` messages, so a replay of a long history never copies it all into
the channel's queue.  Its cursor lives beside the queue,
``<topic>:<channel>.pynsqd-replay.json`` (Go ignores it), rewritten after
each step once the step is in the channel's queue (in ``--sync-every=1``,
after the group commit that made it durable): a restart -- SIGTERM, or kill
-9 in sync mode -- resumes from there, a step given again at worst.

A replayed message can meet the channel's own copy (still queued, or in
flight when the rewind came): the channel then guards its deliveries (see
``Channel.guard_duplicates``) until it is drained after the replay, which is
when the cursor file goes.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

import trio

from .backend_queue import BackendError
from .channel import ChannelExiting
from .fsutil import unlink_quiet, write_atomically
from .guid import block_id
from .log import get_logger
from .message import MessageBatch, Messages

if TYPE_CHECKING:
    from .channel import Channel
    from .nsqd import NSQD
    from .retention import Position, RetentionLog
    from .topic import Topic

STEP = 1000
WINDOW = 10_000
# how often a channel that is behind, or finished but not yet drained, is looked at again
IDLE_POLL = 0.02
DRAINED_POLL = 1.0

log = get_logger()


class Replay:
    """One channel's replay: from where, up to where, how far it got."""

    __slots__ = ("since", "next", "end", "lo", "hi", "replayed", "skipped", "path", "done", "dropped_max", "pins", "source")

    def __init__(self, since: int, start: Position, end: Position, path: str, ids: tuple[bytes, bytes] = (b"", b"")) -> None:
        self.since = since
        self.next = start
        self.end = end
        # the ids of the log from ``start`` to ``end``: a message of the topic
        # with an id in there (ids grow with time) published since ``since``
        # is one the replay gives
        self.lo, self.hi = ids
        self.replayed = 0
        self.skipped = 0
        self.path = path
        self.done = start >= end
        # the largest id left out of the topic's backlog because the replay
        # gives it: the log keeps its file until the replay has read it
        self.dropped_max = b""
        self.pins: dict[object, int] | None = None
        # the log read once the topic stopped retaining (retention turned off,
        # or a restart without it): only what the replay owes the channel --
        # what it left out of the backlog -- is still given (Retention._drop, _retire_for)
        self.source: RetentionLog | None = None

    @property
    def owes(self) -> bool:
        """It left messages out of the topic's backlog that it has not given yet."""
        return bool(self.dropped_max) and not self.done

    def keep(self, msgs: Messages) -> Messages:
        """What of a batch from the topic's held backlog the channel still
        needs: those the replay will give (or gave) are left out, so a
        channel created from the oldest message on a topic holding a backlog
        gets each message once."""
        lo, hi, since = self.lo, self.hi, self.since
        if not hi:
            return msgs
        if type(msgs) is MessageBatch:
            if not len(msgs) or msgs.timestamp < since:
                return msgs
            first = block_id(msgs.id_base, msgs.id_first, msgs.lo)
            last = block_id(msgs.id_base, msgs.id_first, msgs.hi - 1)
            if last < lo or first > hi:
                return msgs
        kept = []
        dropped = b""
        for m in msgs:
            if lo <= m.id <= hi and m.timestamp >= since:
                dropped = max(dropped, m.id)
            else:
                kept.append(m)
        if dropped:
            self.dropped_max = max(self.dropped_max, dropped)
            if self.pins is not None and not self.done:
                self.pins[self] = self.next[0]
        return kept

    def stats(self) -> dict[str, Any]:
        return {"since": self.since, "replayed": self.replayed, "done": self.done}

    def dump(self) -> bytes:
        return json.dumps(
            {
                "version": 1, "since": self.since, "next": list(self.next), "end": list(self.end),
                "ids": [self.lo.decode(), self.hi.decode()], "dropped_max": self.dropped_max.decode(),
                "replayed": self.replayed, "done": self.done,
            }
        ).encode()

    @classmethod
    def load(cls, path: str) -> Replay | None:
        try:
            with open(path, "rb") as fh:
                data = json.load(fh)
            lo, hi = data.get("ids") or ("", "")
            ids = (str(lo).encode(), str(hi).encode())
            replay = cls(int(data["since"]), _position(data["next"]), _position(data["end"]), path, ids)
            replay.replayed = int(data.get("replayed", 0))
            replay.dropped_max = str(data.get("dropped_max", "")).encode()
            replay.done = bool(data.get("done")) or replay.done
            return replay
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.error("ignoring unreadable replay cursor", file=path, error=str(exc))
            return None

    def merged(self, other: Replay) -> Replay:
        """A rewind while this replay runs: the union of both (nothing either
        promised is dropped), up to the newer end."""
        ids = (min(self.lo or other.lo, other.lo or self.lo), max(self.hi, other.hi))
        out = Replay(min(self.since, other.since), min(self.next, other.next), max(self.end, other.end), self.path, ids)
        out.replayed = self.replayed
        out.dropped_max = self.dropped_max
        return out

    def save(self) -> None:
        write_atomically(self.path, self.dump())


def _position(value: Any) -> Position:
    """A (file, offset) of a cursor file; ValueError (or TypeError) if it is not one."""
    num, off = value
    return int(num), int(off)


def cursor_path(nsqd: NSQD, topic: Topic, channel: Channel) -> str:
    return os.path.join(nsqd.data_path, f"{topic.name}:{channel.name}.pynsqd-replay.json")


async def save_cursor(nsqd: NSQD, topic: Topic, channel: Channel) -> None:
    """Write the channel's replay cursor as it is now (in a worker thread),
    one write at a time per file, so that the file never goes back to an
    older replay's state; a replay cancelled meanwhile takes its file along.

    The file is named after the channel, so it is written for whichever
    channel has that name when the write is made -- not necessarily
    ``channel``, which may have been deleted (and one of the same name
    created) meanwhile -- and again after a write during which that changed."""
    path = cursor_path(nsqd, topic, channel)
    async with nsqd.retention.cursor_lock(path):
        for _ in range(_CURSOR_ROUNDS):
            owner = _owner(nsqd, topic.name, channel.name)
            replay = owner.replay if owner is not None else None
            if replay is None:
                unlink_quiet(path)
                return
            await trio.to_thread.run_sync(write_atomically, path, replay.dump())
            if _owner(nsqd, topic.name, channel.name) is owner and owner.replay is replay:
                return
        unlink_quiet(path)  # (the name changed hands at every write: the next owner's save writes it)


# a cursor write is made again while its channel's name changes hands meanwhile, at most
_CURSOR_ROUNDS = 4


def _owner(nsqd: NSQD, topic_name: str, channel_name: str) -> Channel | None:
    """The live channel whose cursor file that name is."""
    topic = nsqd.topics.get(topic_name)
    channel = topic.channels.get(channel_name) if topic is not None and not topic.exiting else None
    return channel if channel is not None and not channel.exiting else None


def persistent(topic: Topic, channel: Channel) -> bool:
    return not (topic.ephemeral or channel.ephemeral)


async def run(nsqd: NSQD, topic: Topic, channel: Channel, replay: Replay) -> None:
    """Feed ``replay`` into ``channel`` until done, then wait for the channel
    to drain and forget the replay.  Ends early when the replay is replaced
    (another rewind), the channel or topic goes, or retention is turned off."""
    source = f"replay {topic.name}:{channel.name}"
    window = WINDOW if persistent(topic, channel) else max(1, min(WINDOW, channel.mem_queue_size))
    retry = 0.05
    try:
        while not replay.done:
            retained = replay.source or topic.retention
            if channel.replay is not replay or channel.exiting or retained is None:
                return
            if channel.depth() >= window and replay.source is None:
                # (what it owes goes at once, as the backlog would have)
                await trio.sleep(IDLE_POLL)
                continue
            msgs, nxt, skipped = retained.read(replay.next, replay.end, STEP, replay.since)
            if skipped:
                replay.skipped += skipped
                log.warning("replay: retained files expired before they were replayed", topic=topic.name, channel=channel.name, files=skipped)
            try:
                if msgs:
                    channel.put_replayed(msgs)
            except ChannelExiting:
                return
            except BackendError as exc:
                nsqd.set_unhealthy(source, str(exc))
                await trio.sleep(retry)
                retry = min(retry * 2, 1.0)
                continue
            retry = 0.05
            nsqd.set_healthy(source)
            replay.next = nxt
            replay.replayed += len(msgs)
            replay.done = nxt >= replay.end
            if replay in retained.pins:
                if replay.done or (msgs and msgs[-1].id >= replay.dropped_max):
                    del retained.pins[replay]  # past every message it left out of the backlog
                else:
                    retained.pins[replay] = replay.next[0]
            if replay.source is not None and replay not in retained.pins:
                # the topic no longer retains: what it owed is given, the rest of the history
                # is not -- so from now on nothing of the topic's backlog is left out for it
                replay.done = True
                replay.lo = replay.hi = b""
                nsqd.retention.release(topic, retained)
            if persistent(topic, channel):
                if nsqd.durable and getattr(channel.backend, "dirty", False):
                    nsqd._mark_sync_due(channel.backend)
                    await nsqd.sync_barrier()
                await save_cursor(nsqd, topic, channel)
            await trio.sleep(0)
        log.info("replay: done", topic=topic.name, channel=channel.name, replayed=replay.replayed)
        # copies of a message may still be queued twice: the guard stays
        # (also over a restart, through the cursor file) until the channel is drained
        while channel.replay is replay and not channel.exiting:
            if channel.depth() == 0 and not channel.in_flight and not channel.deferred:
                channel.replay = None
                unlink_quiet(replay.path)
                return
            await trio.sleep(DRAINED_POLL)
    finally:
        nsqd.set_healthy(source)
        if replay.pins is not None:
            replay.pins.pop(replay, None)
        if replay.source is not None:
            nsqd.retention.release(topic, replay.source)
