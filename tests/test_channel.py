"""The channel and topic cores, sans-IO: a random sequence of operations
checked against a simple model of where every message must be."""

from __future__ import annotations

import hypothesis.strategies as st
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from pynsqd.backend_queue import DummyBackendQueue
from pynsqd.channel import Channel, ChannelError
from pynsqd.client_v2 import STATE_SUBSCRIBED, ClientV2
from pynsqd.message import Message, MessageBatch
from pynsqd.options import Options
from pynsqd.protocol import FrameDecoder, decode_message, encode_mpub_body, scan_mpub_body
from pynsqd.topic import Topic

OPTIONS = Options()


class ListBackend:
    """An in-memory stand-in for the disk queue (same interface)."""

    def __init__(self) -> None:
        self.items: list[bytes] = []

    def put(self, data: bytes) -> None:
        self.items.append(data)

    def put_many(self, items: list[bytes]) -> None:
        self.items.extend(items)

    def get(self) -> bytes | None:
        return self.items.pop(0) if self.items else None

    def depth(self) -> int:
        return len(self.items)

    def empty(self) -> None:
        self.items.clear()

    def sync(self) -> None:
        pass

    def close(self) -> None:
        pass

    def delete(self) -> None:
        self.items.clear()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_client(n: int, msg_timeout: float = 10.0) -> ClientV2:
    c = ClientV2(n, f"127.0.0.1:{1000 + n}", OPTIONS)
    c.state = STATE_SUBSCRIBED
    c.msg_timeout = msg_timeout
    return c


def delivered(client: ClientV2, decoder: FrameDecoder) -> list[tuple[int, bytes, bytes]]:
    """Messages written to the client's output since last time: (attempts, id, body)."""
    data = client.take_output()
    out = []
    for frame in decoder.frames(data):
        if frame.frame_type == 2:
            _, attempts, msg_id, body = decode_message(frame.data)
            out.append((attempts, msg_id, body))
    return out


class ChannelMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self.backend = ListBackend()
        self.channel = Channel("t", "c", backend=self.backend, mem_queue_size=3, max_msg_timeout=30.0, clock=self.clock)
        self.clients: dict[int, tuple[ClientV2, FrameDecoder]] = {}
        self.next_client = 1
        self.next_msg = 0
        # model: where each message body is
        self.queued: set[bytes] = set()  # waiting (memory, backend or deferred)
        self.held: dict[bytes, tuple[int, bytes]] = {}  # body -> (client id, msg id)
        self.finished: set[bytes] = set()
        self.attempts: dict[bytes, int] = {}
        self.all_bodies: set[bytes] = set()

    def collect(self) -> None:
        for cid, (client, decoder) in self.clients.items():
            for attempts, msg_id, body in delivered(client, decoder):
                assert body in self.queued, (body, "delivered but not queued")
                self.queued.discard(body)
                self.held[body] = (cid, msg_id)
                self.attempts[body] = self.attempts.get(body, 0) + 1
                assert attempts == self.attempts[body]

    @rule(n=st.integers(1, 5))
    def put(self, n: int) -> None:
        msgs = []
        for _ in range(n):
            body = b"m%d" % self.next_msg
            msgs.append(Message(b"%016x" % self.next_msg, body))
            self.queued.add(body)
            self.all_bodies.add(body)
            self.next_msg += 1
        self.channel.put_messages(msgs)
        self.collect()

    @rule(n=st.integers(1, 6), uniform=st.booleans())
    def put_batch(self, n: int, uniform: bool) -> None:
        # an MPUB: ids from a block far from the single messages' ones
        bodies = [(b"m%d" % (self.next_msg + i)).ljust(8 if uniform else 0, b".") for i in range(n)]
        body = encode_mpub_body(bodies)
        count, size, starts = scan_mpub_body(body, 1 << 20, 1 << 20)
        self.channel.put_messages(MessageBatch(body, count, size, starts, 1, (1 << 40, self.next_msg)))
        for b in bodies:
            self.queued.add(b)
            self.all_bodies.add(b)
        self.next_msg += n
        self.collect()

    @rule(delay=st.sampled_from([0.5, 2.0]))
    def put_deferred(self, delay: float) -> None:
        body = b"m%d" % self.next_msg
        self.channel.put_messages([Message(b"%016x" % self.next_msg, body, deferred=delay)])
        self.queued.add(body)
        self.all_bodies.add(body)
        self.next_msg += 1
        self.collect()

    @rule(timeout=st.sampled_from([1.0, 5.0]))
    def subscribe(self, timeout: float) -> None:
        client = make_client(self.next_client, timeout)
        self.clients[self.next_client] = (client, FrameDecoder())
        self.next_client += 1
        self.channel.add_client(client)
        self.collect()

    @precondition(lambda self: self.clients)
    @rule(data=st.data(), rdy=st.integers(0, 4))
    def set_rdy(self, data: st.DataObject, rdy: int) -> None:
        cid = data.draw(st.sampled_from(sorted(self.clients)))
        client = self.clients[cid][0]
        client.ready_count = rdy
        self.channel.client_ready_changed(client)
        self.collect()

    @precondition(lambda self: self.held)
    @rule(data=st.data(), action=st.sampled_from(["fin", "req0", "req", "touch"]))
    def respond(self, data: st.DataObject, action: str) -> None:
        body = data.draw(st.sampled_from(sorted(self.held)))
        cid, msg_id = self.held[body]
        client = self.clients[cid][0]
        if action == "fin":
            self.channel.finish(client, msg_id)
            del self.held[body]
            self.finished.add(body)
        elif action in ("req0", "req"):
            self.channel.requeue(client, msg_id, 0.0 if action == "req0" else 1.5)
            del self.held[body]
            self.queued.add(body)
        else:
            self.channel.touch(client, msg_id)
        self.collect()

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def fin_run(self, data: st.DataObject) -> None:
        # a buffer of FINs from one client, as protocol V2 hands them over:
        # its own messages, others' and unknown ids mixed in
        cid = data.draw(st.sampled_from(sorted({c for c, _ in self.held.values()})))
        client = self.clients[cid][0]
        picks = data.draw(st.lists(st.sampled_from(sorted(self.held)), min_size=1, max_size=8, unique=True))
        ids = [self.held[b][1] for b in picks]
        if data.draw(st.booleans()):
            ids.insert(data.draw(st.integers(0, len(ids))), b"ffffffffffffffff")
        start = 0
        failed = []
        while start < len(ids):
            start = self.channel.finish_many(client, ids, start)
            if start < len(ids):
                try:
                    self.channel.finish(client, ids[start])
                except ChannelError:
                    failed.append(ids[start])
                else:
                    raise AssertionError("finish_many stopped at an id finish() takes")
                start += 1
        for body in picks:
            owner, msg_id = self.held[body]
            if owner == cid:
                del self.held[body]
                self.finished.add(body)
            else:
                assert msg_id in failed
        self.collect()

    @precondition(lambda self: self.held and len(self.clients) > 1)
    @rule(data=st.data())
    def fin_not_owned(self, data: st.DataObject) -> None:
        body = data.draw(st.sampled_from(sorted(self.held)))
        cid, msg_id = self.held[body]
        other = next(c for i, (c, _) in self.clients.items() if i != cid)
        try:
            self.channel.finish(other, msg_id)
        except ChannelError as exc:
            assert str(exc) == "client does not own message"
        else:
            raise AssertionError("FIN by a non-owner succeeded")

    @rule(seconds=st.sampled_from([0.3, 1.1, 2.5, 6.0]))
    def advance(self, seconds: float) -> None:
        self.clock.now += seconds
        # messages past their deadline go back to the queue (and may be
        # redelivered at once)
        for body, (_, msg_id) in list(self.held.items()):
            if self.channel.in_flight[msg_id].deadline <= self.clock.now:
                del self.held[body]
                self.queued.add(body)
        self.channel.process_timeouts(self.clock.now)
        self.collect()

    @precondition(lambda self: self.clients)
    @rule(data=st.data())
    def disconnect(self, data: st.DataObject) -> None:
        cid = data.draw(st.sampled_from(sorted(self.clients)))
        client, decoder = self.clients.pop(cid)
        delivered(client, decoder)  # whatever was buffered never reached the client
        for body, (owner, _) in list(self.held.items()):
            if owner == cid:
                del self.held[body]
                self.queued.add(body)
        self.channel.remove_client(client)
        self.collect()

    @invariant()
    def accounting(self) -> None:
        ch = self.channel
        assert len(ch.in_flight) == len(self.held)
        assert ch.depth() + len(ch.deferred) == len(self.queued)
        assert self.queued.isdisjoint(self.held) and self.queued.isdisjoint(self.finished)
        for client, _ in self.clients.values():
            assert client.in_flight_count == sum(1 for o, _ in self.held.values() if o == client.id)
            assert client.in_flight_count <= max(client.ready_count, client.in_flight_count)

    @invariant()
    def nobody_ready_starves(self) -> None:
        # a ready client never sits idle while messages wait (deferred ones aside)
        if self.channel.depth() > 0:
            assert not any(c.can_receive() for c, _ in self.clients.values())

    def teardown(self) -> None:
        # drain everything: every message is eventually finished exactly once
        for cid, (c, d) in list(self.clients.items()):
            delivered(c, d)
            self.channel.remove_client(c)
        client = make_client(999)
        decoder = FrameDecoder()
        client.ready_count = 1000
        self.channel.add_client(client)
        seen = set()
        for _ in range(3):
            # finish what arrived, then release deferred and timed-out messages
            for _, msg_id, body in delivered(client, decoder):
                seen.add(body)
                self.channel.finish(client, msg_id)
            self.clock.now += 100
            self.channel.process_timeouts(self.clock.now)
        assert seen | self.finished == self.all_bodies
        assert seen.isdisjoint(self.finished)

TestChannelModel = ChannelMachine.TestCase
TestChannelModel.settings = settings(max_examples=400, stateful_step_count=40, deadline=None)


# ------------------------------------------------------------ topic


def make_topic(mem: int = 3) -> tuple[Topic, list[Topic]]:
    backlog: list[Topic] = []
    clock = Clock()

    def make_channel(topic: Topic, name: str) -> Channel:
        return Channel(topic.name, name, backend=ListBackend(), mem_queue_size=mem, max_msg_timeout=30.0, clock=clock)

    topic = Topic("t", backend=ListBackend(), mem_queue_size=mem, node_id=1, make_channel=make_channel, on_backlog=backlog.append)
    return topic, backlog


def test_topic_holds_messages_until_first_channel_then_drains():
    topic, backlog = make_topic()
    topic.put_messages(topic.new_messages([b"%d" % i for i in range(10)]))
    assert topic.depth() == 10 and topic.backend.depth() == 7
    ch = topic.get_channel("c")
    assert backlog == [topic]
    while topic.drain(4):
        pass
    assert topic.depth() == 0 and ch.depth() == 10
    # afterwards publishing fans out directly
    topic.put_messages([topic.new_message(b"x")])
    assert ch.depth() == 11


def test_topic_fans_out_independent_copies():
    topic, _ = make_topic(mem=100)
    a, b = topic.get_channel("a"), topic.get_channel("b")
    topic.put_messages(topic.new_messages([b"1", b"2"]))
    ma, mb = list(a.memory), list(b.memory)
    assert [m.body for m in ma] == [m.body for m in mb] == [b"1", b"2"]
    assert all(x is not y for x, y in zip(ma, mb))
    assert [m.id for m in ma] == [m.id for m in mb]


def test_paused_and_held_topics_keep_messages():
    topic, backlog = make_topic(mem=100)
    ch = topic.get_channel("a")
    topic.pause()
    topic.put_messages([topic.new_message(b"p")])
    assert ch.depth() == 0 and topic.depth() == 1
    topic.unpause()
    assert backlog
    topic.drain()
    assert ch.depth() == 1
    topic.hold()
    topic.put_messages([topic.new_message(b"h")])
    assert ch.depth() == 1
    topic.release()
    topic.drain()
    assert ch.depth() == 2


def test_dummy_backend_drops_ephemeral_overflow():
    ch = Channel("t", "c#ephemeral", backend=DummyBackendQueue(), mem_queue_size=2, max_msg_timeout=30.0, clock=Clock())
    ch.put_messages([Message(b"%016x" % i, b"x") for i in range(5)])
    assert ch.depth() == 2
