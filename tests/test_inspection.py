"""Inspecting queued messages without consuming them (issue 14, feature 3),
sans-IO: a channel driven by random operations over a real disk queue (both
modes), where every peek must name exactly the messages delivered next and
change nothing; the topic's drain order; finding ids in memory, on disk and
in flight."""

from __future__ import annotations

import base64
import tempfile

import hypothesis.strategies as st
import pytest
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from pynsqd import inspection
from pynsqd.channel import Channel
from pynsqd.disk_queue import DiskQueue, ReadCost, index_ids
from pynsqd.message import Message, MessageBatch
from pynsqd.protocol import FrameDecoder, encode_mpub_body, scan_mpub_body
from pynsqd.topic import Topic
from test_channel import Clock, ListBackend, delivered, make_client


def disk_queue(path: str, name: str, durable: bool, file_bytes: int = 400) -> DiskQueue:
    return DiskQueue(
        name, path, max_bytes_per_file=file_bytes, min_msg_size=26, max_msg_size=1026,
        sync_every=1 if durable else 50, track_acks=durable,
    )


def state_of(channel: Channel) -> tuple:
    """Everything a peek must leave as it was."""
    b = channel.backend
    return (
        channel.depth(), len(channel.memory), channel.memory._pos, list(channel.memory._items), channel._backend_turn,
        dict(channel.in_flight), dict(channel.deferred), len(channel._deferred_heap), channel.message_count,
        b._rfn, b._rpos, b._wfn, b._wpos, b._depth, b._ops, b._force_sync, b._due_notified, b._rbuf, b._roff,
        dict(b._notes), dict(b._skip), b._skip_range, list(b._pending_delete), list(b._read_past), b._rfd,
    )


class PeekMachine(RuleBasedStateMachine):
    """Messages in memory, on disk, deferred and in flight; a peek then a delivery of as many."""

    durable = False

    def __init__(self) -> None:
        super().__init__()
        self.tmp = tempfile.TemporaryDirectory()
        self.clock = Clock()
        self.backend = disk_queue(self.tmp.name, "t:c", self.durable)
        self.channel = Channel("t", "c", backend=self.backend, mem_queue_size=0 if self.durable else 3, max_msg_timeout=30.0, clock=self.clock)
        self.client = make_client(1, 5.0)
        self.decoder = FrameDecoder()
        self.channel.add_client(self.client)
        self.held: list[bytes] = []
        self.n = 0

    def teardown(self) -> None:
        self.backend.close()
        self.tmp.cleanup()

    def _ids(self, k: int) -> list[bytes]:
        out = [b"%016x" % (self.n + i) for i in range(k)]
        self.n += k
        return out

    @rule(k=st.integers(1, 4), size=st.sampled_from([0, 3, 40]))
    def put(self, k: int, size: int) -> None:
        self.channel.put_messages([Message(i, b"p" + i[-4:] + b"\x00\xff" * size, 1000 + self.n) for i in self._ids(k)])

    @rule(k=st.integers(1, 6))
    def put_batch(self, k: int) -> None:
        bodies = [b"b%d" % (self.n + i) for i in range(k)]
        body = encode_mpub_body(bodies)
        count, size, starts = scan_mpub_body(body, 1 << 20, 1 << 20)
        self.channel.put_messages(MessageBatch(body, count, size, starts, 7, (1 << 50, self.n)))
        self.n += k

    @rule(delay=st.sampled_from([0.5, 3.0]))
    def put_deferred(self, delay: float) -> None:
        self.channel.put_messages([Message(self._ids(1)[0], b"d", 5, deferred=delay)])

    @rule(k=st.integers(0, 5), body_limit=st.sampled_from([0, 2, 1024]))
    def peek_then_deliver(self, k: int, body_limit: int) -> None:
        before = state_of(self.channel)
        seen = inspection.peek_channel(self.channel, max(k, 1), body_limit, deferred=True, in_flight=True)
        assert state_of(self.channel) == before, "the peek changed the channel"
        # what is listed is what is there
        flying = self.channel.in_flight
        listed = seen["in_flight"]
        assert len(listed) == min(max(k, 1), len(flying)) and all(m["id"].encode() in flying for m in listed)
        deadlines = [m["deadline"] for m in listed]
        assert deadlines == sorted(deadlines)
        assert len(seen["deferred"]) <= max(k, 1) and [m["due"] for m in seen["deferred"]] == sorted(m["due"] for m in seen["deferred"])
        for m in seen["queued"]:
            body = base64.b64decode(m["body"])
            assert len(body) == min(body_limit, m["body_size"]) and m["body_truncated"] == (m["body_size"] > body_limit)
        self.client.ready_count = self.client.in_flight_count + k
        self.channel.client_ready_changed(self.client)
        self.client.ready_count = 0
        got = delivered(self.client, self.decoder)
        expect = seen["queued"][:k]
        assert [(a, i) for a, i, _ in got] == [(m["attempts"] + 1, m["id"].encode()) for m in expect]
        assert [b[:body_limit] for _, _, b in got] == [base64.b64decode(m["body"]) for m in expect]
        self.held += [i for _, i, _ in got]

    @rule(data=st.data(), action=st.sampled_from(["fin", "req", "req_later"]))
    def respond(self, data: st.DataObject, action: str) -> None:
        if not self.held:
            return
        msg_id = self.held.pop(data.draw(st.integers(0, len(self.held) - 1)))
        if msg_id not in self.channel.in_flight:
            return  # timed out meanwhile
        if action == "fin":
            self.channel.finish(self.client, msg_id)
        else:
            self.channel.requeue(self.client, msg_id, 0.0 if action == "req" else 1.0)

    @rule(seconds=st.sampled_from([0.6, 2.0, 6.0]))
    def advance(self, seconds: float) -> None:
        self.clock.now += seconds
        self.channel.process_timeouts(self.clock.now)

    @invariant()
    def every_message_is_found_where_it_is(self) -> None:
        ch = self.channel
        cost = ReadCost()
        for msg_id in list(ch.in_flight)[:3]:
            assert inspection.find_in_channel(ch, msg_id, 8, cost)["state"] == "in_flight"
        for msg_id in list(ch.deferred)[:3]:
            assert inspection.find_in_channel(ch, msg_id, 8, cost)["state"] == "deferred"
        for m in inspection.peek_channel(ch, 6, 8, deferred=False, in_flight=False)["queued"]:
            found = inspection.find_in_channel(ch, m["id"].encode(), 8, cost)
            assert (found["state"], found["where"], found["body"]) == ("queued", m["where"], m["body"])
        assert inspection.find_in_channel(ch, b"f" * 16, 8, cost) == {"state": "not_found"}


PeekMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
test_peek_names_the_next_deliveries = PeekMachine.TestCase


class DurablePeekMachine(PeekMachine):
    durable = True


DurablePeekMachine.TestCase.settings = settings(max_examples=40, stateful_step_count=30, deadline=None)
test_peek_names_the_next_deliveries_in_sync_mode = DurablePeekMachine.TestCase


def test_a_peek_shows_a_binary_body_safely_and_bounded():
    ch = Channel("t", "c", backend=ListBackend(), mem_queue_size=10, max_msg_timeout=30.0, clock=Clock())
    body = "héllo\n".encode() + bytes(range(256))
    ch.put_messages([Message(b"%016x" % 1, body, 5)])
    (m,) = inspection.peek_channel(ch, 5, 10, deferred=False, in_flight=False)["queued"]
    assert base64.b64decode(m["body"]) == body[:10] and m["body_size"] == len(body) and m["body_truncated"]
    assert m["body_preview"] == "héllo\\x0a\\x00\\x01\\x02"
    assert m["body_preview"].isprintable()


def test_topic_peek_follows_the_drain_order():
    """Memory (a batch and singles) and disk in the turns drain() takes, a
    step at a time, against what the channel then receives."""
    clock = Clock()

    def make_channel(topic: Topic, name: str) -> Channel:
        return Channel(topic.name, name, backend=ListBackend(), mem_queue_size=10_000, max_msg_timeout=30.0, clock=clock)

    with tempfile.TemporaryDirectory() as tmp:
        topic = Topic("t", backend=disk_queue(tmp, "t", False, 1 << 20), mem_queue_size=8, node_id=1, make_channel=make_channel)
        for i in range(3):
            topic.put_messages([topic.new_message(b"s%d" % i)])
        bodies = [b"b%d" % i for i in range(12)]
        body = encode_mpub_body(bodies)
        count, size, starts = scan_mpub_body(body, 1 << 20, 1 << 20)
        topic.put_messages(topic.new_batch(body, count, size, starts))
        topic.put_messages(topic.new_messages([b"t%d" % i for i in range(20)]))
        topic.put_messages([topic.new_message(b"late", deferred=2.0)])
        before = (topic.depth(), len(topic.memory), topic.memory._pos, topic._drain_backend_turn, topic.backend._rpos)
        seen = inspection.peek_topic(topic, 100, 64, drain_step=5)
        assert (topic.depth(), len(topic.memory), topic.memory._pos, topic._drain_backend_turn, topic.backend._rpos) == before
        ch = topic.get_channel("c")
        while topic.drain(5):
            pass
        assert len(seen["queued"]) == 36 and [m.body for m in ch.deferred.values()] == [b"late"]
        assert [base64.b64decode(m["body"]) for m in seen["queued"] if "defer" not in m] == [m.body for m in ch.memory]
        assert [m["defer"] for m in seen["queued"] if "defer" in m] == [2000]


def test_find_by_id_reads_only_the_blocks_that_can_hold_it(tmp_path):
    """100,000 records on disk: once indexed, a lookup reads one block."""
    q = disk_queue(str(tmp_path), "t:c", False, 1 << 30)
    ids = [b"%016x" % (0x100000 + i) for i in range(100_000)]
    q.put_many([b"\0" * 10 + i + b"x" for i in ids])
    for _ in range(10):
        q.get()  # read past some
    token, plan = q.id_index_plan()
    q.add_id_blocks(token, plan, index_ids(plan, 26, 1026))
    cost = ReadCost()
    key, data, size, note = q.find_id(ids[77_777], cost)
    assert data[10:26] == ids[77_777] and size == 27 and note == 0
    assert cost.records <= 4096 and cost.bytes <= 2 * 65536 + 4096 * 31
    assert q.find_id(ids[3], ReadCost()) is None  # already read
    assert q.find_id(b"0" * 16, ReadCost()) is None
    # written after the index: found in the tail the index does not cover yet
    q.put_many([b"\0" * 10 + b"%016x" % 0xFFFFFF + b"y"])
    assert q.find_id(b"%016x" % 0xFFFFFF, ReadCost(), 27)[1][26:] == b"y"
    q.close()


@pytest.mark.parametrize("count", [1, 7])
def test_memory_queue_peek_and_find_take_nothing(count):
    ch = Channel("t", "c", backend=ListBackend(), mem_queue_size=100, max_msg_timeout=30.0, clock=Clock())
    body = encode_mpub_body([b"x%d" % i for i in range(10)])
    n, size, starts = scan_mpub_body(body, 1 << 20, 1 << 20)
    batch = MessageBatch(body, n, size, starts, 7, (1 << 50, 4090))  # the ids cross a tick
    ch.put_messages([Message(b"%016x" % 1, b"single", 1)])
    ch.put_messages(batch)
    ch.memory.popleft()
    ch.memory.popleft()  # two taken: the head batch is part-read
    peeked = list(ch.memory.peek(count))
    assert [m.body for m in peeked] == [b"x%d" % i for i in range(1, 1 + count)]
    assert len(ch.memory) == 9
    ahead, msg = ch.memory.find(batch.message(5).id)
    assert (ahead, msg.body, msg.id) == (4, b"x5", batch.message(5).id)
    assert ch.memory.find(batch.message(0).id) is None  # taken already
