"""MPUB batches (pynsqd.message.MessageBatch) and the in-memory queue of
single messages and batch views (pynsqd.memory_queue): a random sequence of
operations checked against a plain list of (id, body)."""

from __future__ import annotations

import hypothesis.strategies as st
from hypothesis import given, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from pynsqd.guid import GuidFactory
from pynsqd.memory_queue import MemoryQueue
from pynsqd.message import Message, MessageBatch, body_bytes, encode_messages
from pynsqd.protocol import encode_mpub_body, scan_mpub_body

FACTORY_NODE = 3


def make_batch(bodies: list[bytes], factory: GuidFactory, timestamp: int = 123) -> MessageBatch:
    body = encode_mpub_body(bodies)
    count, size, starts = scan_mpub_body(body, 1 << 20, 1 << 24)
    return MessageBatch(body, count, size, starts, timestamp, factory.reserve(count))


BODIES = st.one_of(
    # all of one size (no offsets kept) or of any sizes
    st.tuples(st.integers(1, 30), st.integers(1, 12)).map(lambda t: [b"%0*d" % (t[0], i) for i in range(t[1])]),
    st.lists(st.binary(min_size=1, max_size=30), min_size=1, max_size=12),
)


@settings(max_examples=200, deadline=None)
@given(BODIES, st.integers(0, 14), st.integers(0, 14))
def test_batch_views_make_the_messages_and_records_a_list_would(bodies, lo, hi):
    factory = GuidFactory(FACTORY_NODE)
    batch = make_batch(bodies, factory)
    ids = [m.id for m in batch]
    assert len(set(ids)) == len(bodies) and ids == sorted(ids)
    assert [m.body for m in batch] == bodies
    assert all(m.timestamp == 123 and m.attempts == 0 and not m.deferred for m in batch)
    view = batch[lo:hi]
    listed = list(batch)[lo:hi]
    assert len(view) == len(listed)
    assert [(m.id, m.body) for m in view] == [(m.id, m.body) for m in listed]
    assert [view.message(view.lo + i).id for i in range(len(view))] == [m.id for m in listed]
    assert encode_messages(view) == [m.encode() for m in listed]
    assert body_bytes(view) == body_bytes(listed)
    # a view of a view
    assert [m.body for m in view[1:]] == [m.body for m in listed[1:]]


class MemoryQueueMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.queue = MemoryQueue()
        self.model: list[tuple[bytes, bytes]] = []
        self.factory = GuidFactory(FACTORY_NODE)
        self.next = 0

    @rule(n=st.integers(1, 4))
    def put_singles(self, n: int) -> None:
        msgs = [Message(b"s%015d" % (self.next + i), b"single-%d" % (self.next + i)) for i in range(n)]
        self.next += n
        self.queue.put(msgs)
        self.model += [(m.id, m.body) for m in msgs]

    @rule(bodies=BODIES, cut=st.tuples(st.integers(0, 12), st.integers(0, 12)))
    def put_batch(self, bodies: list[bytes], cut: tuple[int, int]) -> None:
        batch = make_batch(bodies, self.factory)[cut[0] : cut[1]]
        self.queue.put(batch)
        self.model += [(m.id, m.body) for m in batch]

    @rule()
    def append(self) -> None:
        msg = Message(b"a%015d" % self.next, b"appended")
        self.next += 1
        self.queue.append(msg)
        self.model.append((msg.id, msg.body))

    @rule()
    def popleft(self) -> None:
        if self.model:
            msg = self.queue.popleft()
            assert (msg.id, msg.body) == self.model.pop(0)

    @rule(n=st.integers(0, 20))
    def pop_many(self, n: int) -> None:
        got = self.queue.pop_many(n)
        assert [(m.id, m.body) for m in got] == self.model[:n]
        del self.model[:n]

    @rule(n=st.integers(1, 20))
    def take(self, n: int) -> None:
        if not self.model:
            return
        run = self.queue.take(n)
        assert 0 < len(run) <= n
        assert [(m.id, m.body) for m in run] == self.model[: len(run)]
        del self.model[: len(run)]

    @rule()
    def take_all_and_put_back(self) -> None:
        runs = self.queue.take_all()
        assert [(m.id, m.body) for run in runs for m in run] == self.model
        assert not self.queue
        for run in runs:
            self.queue.put(run)

    @invariant()
    def same_messages(self) -> None:
        assert len(self.queue) == len(self.model)
        assert bool(self.queue) == bool(self.model)
        assert [(m.id, m.body) for m in self.queue] == self.model


TestMemoryQueueModel = MemoryQueueMachine.TestCase
TestMemoryQueueModel.settings = settings(max_examples=200, stateful_step_count=30, deadline=None)
