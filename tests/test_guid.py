"""Message ids (pynsqd.guid): nsqd's snowflake layout, uniqueness and order
under any clock, sequence overflow."""

from __future__ import annotations

import re
import time
from contextlib import contextmanager
from types import SimpleNamespace
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pynsqd import guid
from pynsqd.guid import TWEPOCH, GuidFactory, id_timestamp_ms

HEX16 = re.compile(rb"[0-9a-f]{16}")
NOW_NS = 1_700_000_000_000_000_000  # 2023-11-14


class FakeClock:
    def __init__(self, ns: int = NOW_NS) -> None:
        self.ns = ns

    def time_ns(self) -> int:
        return self.ns


@contextmanager
def fake_clock(ns: int = NOW_NS):
    clock = FakeClock(ns)
    # only guid's view of the time module is replaced
    with mock.patch.object(guid, "time", SimpleNamespace(time_ns=clock.time_ns)):
        yield clock


def fields(msg_id: bytes) -> tuple[int, int, int]:
    """-> (ts - epoch, node id, sequence)."""
    value = int(msg_id, 16)
    return value >> 22, (value >> 12) & 0x3FF, value & 0xFFF


def check_ids(ids: list[bytes], node_id: int) -> None:
    for i in ids:
        assert len(i) == 16 and HEX16.fullmatch(i), i
        assert fields(i)[1] == node_id
    # fixed-width lowercase hex: byte order is numeric order
    assert all(a < b for a, b in zip(ids, ids[1:]))
    assert [int(i, 16) for i in ids] == sorted({int(i, 16) for i in ids})


def test_layout_matches_nsqd():
    with fake_clock() as clock:
        f = GuidFactory(5)
        a = f.new_id()
        ts = clock.ns >> 20
        assert int(a, 16) == ((ts - TWEPOCH) << 22) | (5 << 12) | 0
        assert f.new_id() == b"%016x" % (((ts - TWEPOCH) << 22) | (5 << 12) | 1)
        assert id_timestamp_ms(a) == ts


@pytest.mark.parametrize("node_id", [0, 1, 512, 1023])
def test_node_id_bits_12_to_21(node_id):
    with fake_clock():
        f = GuidFactory(node_id)
        ids = [f.new_id(), *f.new_ids(3)]
    check_ids(ids, node_id)
    for i in ids:
        assert (int(i, 16) >> 12) & 0x3FF == node_id


@pytest.mark.parametrize("node_id", [-1, 1024, 5000])
def test_node_id_range(node_id):
    with pytest.raises(ValueError):
        GuidFactory(node_id)


def test_real_clock_ids_increase():
    f = GuidFactory(77)
    ids = []
    for _ in range(300):
        ids.append(f.new_id())
        ids += f.new_ids(7)
    check_ids(ids, 77)
    now_ts = time.time_ns() >> 20
    assert abs(id_timestamp_ms(ids[-1]) - now_ts) < 10_000


def test_sequence_overflow_new_id():
    with fake_clock():
        f = GuidFactory(3)
        ids = [f.new_id() for _ in range(3 * 4096 + 10)]
    check_ids(ids, 3)
    # the tick runs ahead of the (frozen) clock instead of repeating
    assert fields(ids[4095])[2] == 4095
    assert fields(ids[4096])[0] == fields(ids[4095])[0] + 1
    assert fields(ids[4096])[2] == 0


def test_sequence_overflow_new_ids():
    with fake_clock():
        f = GuidFactory(1023)
        ids = f.new_ids(10_000)
        ids += f.new_ids(5000)
        ids.append(f.new_id())
    assert len(ids) == 15_001
    check_ids(ids, 1023)


def test_new_ids_zero():
    with fake_clock():
        f = GuidFactory(1)
        assert f.new_ids(0) == []
        ids = [f.new_id(), *f.new_ids(0), f.new_id()]
    check_ids(ids, 1)


def test_new_ids_zero_does_not_push_the_tick_ahead():
    with fake_clock() as clock:
        f = GuidFactory(1)
        f.new_id()
        clock.ns += 1 << 20  # the next tick
        assert f.new_ids(0) == []
        assert fields(f.new_id()) == ((clock.ns >> 20) - TWEPOCH, 1, 0)


def test_clock_going_backwards():
    with fake_clock() as clock:
        f = GuidFactory(9)
        ids = [f.new_id()]
        clock.ns -= 10**12  # a 1000 s step back
        ids.append(f.new_id())
        ids += f.new_ids(5)
        clock.ns += 2 * 10**12
        ids.append(f.new_id())
    check_ids(ids, 9)
    assert fields(ids[-1])[0] == (clock.ns >> 20) - TWEPOCH


def test_factories_are_independent():
    """One factory per topic, as nsqd: the same clock gives the same ids."""
    with fake_clock():
        assert GuidFactory(4).new_id() == GuidFactory(4).new_id()


_ops = st.lists(
    st.one_of(
        st.tuples(st.just("id"), st.just(0)),
        st.tuples(st.just("ids"), st.integers(0, 50)),
        st.tuples(st.just("ids"), st.integers(4000, 9000)),  # crosses a sequence overflow
        # the clock moves: mostly forward by a fraction of a tick or a few ticks,
        # sometimes backwards
        st.tuples(st.just("clock"), st.integers(-(5 << 20), 5 << 20)),
        st.tuples(st.just("clock"), st.integers(0, 1 << 19)),
    ),
    min_size=1,
    max_size=40,
)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 1023), _ops)
def test_interleaved_ids_unique_and_increasing(node_id, ops):
    ids: list[bytes] = []
    with fake_clock() as clock:
        f = GuidFactory(node_id)
        for op, arg in ops:
            if op == "clock":
                clock.ns += arg
                continue
            before = len(ids)
            if op == "id":
                ids.append(f.new_id())
            else:
                batch = f.new_ids(arg)
                assert len(batch) == arg
                ids += batch
            if len(ids) > before:
                # once the clock has moved past the last tick issued, the next
                # id starts that tick afresh, as nsqd's do
                now_tick = (clock.ns >> 20) - TWEPOCH
                last_tick = fields(ids[before - 1])[0] if before else -1
                if now_tick > last_tick:
                    assert fields(ids[before])[0] == now_tick
                    assert fields(ids[before])[2] == 0
    check_ids(ids, node_id)


# ---------------------------------------------------------------- blocks (MPUB ids made on delivery)


@settings(max_examples=300, deadline=None)
@given(node=st.integers(0, 1023), ts=st.integers(0, 1 << 40), first=st.integers(0, 4095),
       lo=st.integers(0, 9000), n=st.integers(0, 9000))
def test_block_ids_are_block_id_one_by_one(node, ts, first, lo, n):
    base = (ts << 22) | (node << 12)
    assert guid.block_ids(base, first, lo, lo + n) == [guid.block_id(base, first, i) for i in range(lo, lo + n)]


def test_reserve_gives_the_ids_new_ids_would():
    with fake_clock() as clock:
        a, b = GuidFactory(7), GuidFactory(7)
        for count in (1, 5, 4096, 3, 9000, 1):
            base, first = a.reserve(count)
            assert guid.block_ids(base, first, 0, count) == b.new_ids(count)
            clock.ns += 1 << 19  # half a tick: sometimes the same tick, sometimes the next
        check_ids([a.new_id(), *guid.block_ids(*a.reserve(10), 0, 10)], 7)


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 1023), _ops)
def test_new_id_is_the_id_reserve_would_give(node_id, ops):
    """new_id is made without a block: the same ids as reserve(1), in any
    interleaving with blocks, under any clock."""
    with fake_clock() as clock:
        f, model = GuidFactory(node_id), GuidFactory(node_id)
        for op, arg in ops:
            if op == "clock":
                clock.ns += arg
            elif op == "id":
                assert f.new_id() == guid.block_id(*model.reserve(1), 0)
            elif arg:
                assert f.new_ids(arg) == model.new_ids(arg)
        for _ in range(4100):  # and across a sequence overflow with the clock frozen
            assert f.new_id() == guid.block_id(*model.reserve(1), 0)
