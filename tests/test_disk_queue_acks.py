"""DiskQueue tracked reads (``--sync-every=1`` durability): a record stays on
disk until acknowledged, so a crash gives back everything in flight."""

from __future__ import annotations

import struct

import hypothesis.strategies as st
from hypothesis import given, settings

from pynsqd.disk_queue import DiskQueue


def open_queue(path: str, max_bytes: int = 200) -> DiskQueue:
    return DiskQueue("t:c", path, max_bytes_per_file=max_bytes, min_msg_size=26, max_msg_size=1000, sync_every=1, track_acks=True)


def record(i: int, attempts: int = 0) -> bytes:
    return struct.pack(">qH", i, attempts) + b"%016x" % i + b"body-%d" % i


def index(data: bytes) -> int:
    return struct.unpack_from(">q", data)[0]


def attempts(data: bytes) -> int:
    return struct.unpack_from(">H", data, 8)[0]


def drain(q: DiskQueue) -> list[bytes]:
    out = []
    while (item := q.get_tracked()) is not None:
        out.append(item[0])
        q.ack(item[1])
    return out


def test_unacked_records_survive_a_crash(tmp_path):
    q = open_queue(str(tmp_path))
    q.put_many([record(i) for i in range(20)])
    got = [q.get_tracked() for _ in range(12)]
    for data, token, _ in got[:5]:
        q.ack(token)
    q.set_attempts(got[5][1], 3)
    q.sync()
    # crash: the object is dropped without close(); a new daemon opens the dir
    q2 = open_queue(str(tmp_path))
    back = drain(q2)
    assert [index(b) for b in back] == list(range(5, 20))
    assert attempts(back[0]) == 3


def test_acked_files_are_deleted_after_sync(tmp_path):
    q = open_queue(str(tmp_path), max_bytes=100)
    q.put_many([record(i) for i in range(30)])
    items = [q.get_tracked() for _ in range(30)]
    q.sync()
    files_before = sorted(p.name for p in tmp_path.glob("*.dat") if "meta" not in p.name)
    assert len(files_before) > 3  # nothing acked: every file kept
    for _, token, _ in items:
        q.ack(token)
    q.sync()
    files_after = sorted(p.name for p in tmp_path.glob("*.dat") if "meta" not in p.name)
    assert len(files_after) <= 1
    q.close()


@settings(max_examples=60, deadline=None)
@given(
    ops=st.lists(
        st.one_of(
            st.tuples(st.just("put"), st.integers(1, 6)),
            st.tuples(st.just("get"), st.integers(1, 4)),
            st.tuples(st.just("ack"), st.integers(0, 50)),
            st.tuples(st.just("attempts"), st.integers(0, 50)),
            st.tuples(st.just("sync"), st.just(0)),
            st.tuples(st.just("crash"), st.just(0)),
        ),
        max_size=60,
    )
)
def test_model(tmp_path_factory, ops):
    path = str(tmp_path_factory.mktemp("dq"))
    q = open_queue(path)
    written = 0
    unread: list[int] = []  # indexes in write order
    held: dict[int, tuple[int, int]] = {}  # index -> (token, attempts set)
    acked: set[int] = set()
    for op, arg in ops:
        if op == "put":
            batch = list(range(written, written + arg))
            q.put_many([record(i) for i in batch])
            written += arg
            unread.extend(batch)
        elif op == "get":
            for _ in range(arg):
                item = q.get_tracked()
                if item is None:
                    assert not unread
                    break
                i = index(item[0])
                assert i == unread.pop(0)
                held[i] = (item[1], 0)
        elif op == "ack" and held:
            i = sorted(held)[arg % len(held)]
            q.ack(held.pop(i)[0])
            acked.add(i)
        elif op == "attempts" and held:
            i = sorted(held)[arg % len(held)]
            token, _ = held[i]
            q.set_attempts(token, arg + 1)
            held[i] = (token, arg + 1)
        elif op == "sync":
            q.sync()
        elif op == "crash":
            q.sync()
            q = open_queue(path)
            # everything unacknowledged comes back, in write order, with its attempts
            back = drain_tracked(q)
            idx = [index(b) for b in back]
            assert idx == sorted(idx)
            # and nothing acknowledged does, even behind an older unacknowledged one
            must = set(unread) | set(held)
            assert set(idx) == must
            for b in back:
                i = index(b)
                if i in held:
                    assert attempts(b) == held[i][1]
            # the new queue now holds those records, read and unacknowledged
            unread = []
            held = {}
            for b, token, _ in q._reread:
                held[index(b)] = (token, attempts(b))
            acked -= set(held)
    q.close()


def drain_tracked(q: DiskQueue) -> list[bytes]:
    out = []
    q._reread = []  # type: ignore[attr-defined]
    while (item := q.get_tracked()) is not None:
        out.append(item[0])
        q._reread.append(item)  # type: ignore[attr-defined]
    return out
