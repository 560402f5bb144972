"""DiskQueue tracked reads (``--sync-every=1`` durability): a record stays on
disk until acknowledged, so a crash gives back everything in flight."""

from __future__ import annotations

import os
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


def operations(max_size: int, **ranges: tuple[int, int]) -> st.SearchStrategy:
    """Lists of (name, argument) with each argument drawn from its name's range."""
    return st.lists(st.one_of(*(st.tuples(st.just(op), st.integers(*r)) for op, r in ranges.items())), max_size=max_size)


@settings(max_examples=60, deadline=None)
@given(ops=operations(60, put=(1, 6), get=(1, 4), ack=(0, 50), attempts=(0, 50), sync=(0, 0), crash=(0, 0)))
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


def record_with(i: int, attempts: int) -> bytes:
    return record(i, attempts)


def kill(q: DiskQueue) -> None:
    """kill -9: what was written stays (page cache), nothing buffered is flushed."""
    q._close_files()
    if q._journal is not None:
        q._journal.close()


@settings(max_examples=int(os.environ.get("MODEL_EXAMPLES", "80")), deadline=None)
@given(
    ops=operations(
        70, put=(1, 5), put_noted=(1, 3), get=(1, 4), ack=(0, 50), note=(0, 50), again=(0, 50), sync=(0, 0), kill=(0, 0), crash=(0, 0)
    )
)
def test_model_with_journal(tmp_path_factory, ops):
    """Acks behind an older unacknowledged record, notes and records stored
    again survive a sync + reopen exactly, and a kill -9 (no sync) gives back
    every unacknowledged record exactly once, with its note."""
    path = str(tmp_path_factory.mktemp("dq"))
    q = open_queue(path, max_bytes=300)
    written = 0
    unread: set[int] = set()
    held: dict[int, int] = {}  # index -> token
    attempts_of: dict[int, int] = {}
    note_now: dict[int, int] = {}  # the latest note of each record
    note_kept: dict[int, set[int]] = {}  # what a kill may give back: as of the last sync, or set since
    acked_unsynced: set[int] = set()

    def reopen(synced: bool) -> None:
        nonlocal q, unread, held
        if synced:
            q.sync()
            q.close()
        else:
            kill(q)
        q = open_queue(path, max_bytes=300)
        depth = q.depth()
        seen: dict[int, tuple[int, int, int]] = {}
        while (item := q.get_tracked()) is not None:
            data, token, note = item
            i = index(data)
            assert i not in seen, f"record {i} came back twice"
            seen[i] = (token, note, attempts(data))
            depth -= 1
            assert q.depth() == depth, "depth counts exactly the records still to be served"
        assert depth == 0, f"depth counted {depth} records never served"
        must = unread | set(held)
        assert must <= set(seen), must - set(seen)
        assert set(seen) <= must | (set() if synced else acked_unsynced)
        for i, (token, note, att) in seen.items():
            allowed = {note_now.get(i, 0)} if synced else note_kept.get(i, {0})
            assert note in allowed, (i, note, allowed)
            note_now[i] = note
            note_kept[i] = {note}
            if i in attempts_of:
                assert att == attempts_of[i]
        unread = set()
        held = {i: v[0] for i, v in seen.items()}
        acked_unsynced.clear()

    for op, arg in ops:
        if op in ("put", "put_noted"):
            batch = list(range(written, written + arg))
            written += arg
            notes = [1000 + i for i in batch] if op == "put_noted" else None
            q.put_many([record(i) for i in batch], notes=notes)
            unread.update(batch)
            for i in batch:
                attempts_of[i] = 0
                note_now[i] = notes[batch.index(i)] if notes else 0
                note_kept[i] = {note_now[i]}
        elif op == "get":
            for _ in range(arg):
                item = q.get_tracked()
                if item is None:
                    assert not unread
                    break
                data, token, note = item
                i = index(data)
                assert i in unread
                assert note == note_now[i]
                unread.discard(i)
                held[i] = token
        elif op == "ack" and held:
            i = sorted(held)[arg % len(held)]
            q.ack(held.pop(i))
            acked_unsynced.add(i)
        elif op == "note" and held:
            i = sorted(held)[arg % len(held)]
            q.set_note(held[i], 5000 + arg)
            note_now[i] = 5000 + arg
            note_kept[i].add(5000 + arg)
        elif op == "again" and held:
            i = sorted(held)[arg % len(held)]
            attempts_of[i] += 1
            note = 7000 + arg if arg % 2 else 0
            q.put_again([record_with(i, attempts_of[i])], [held.pop(i)], [note])
            unread.add(i)
            note_now[i] = note
            note_kept[i] = {note}  # written before the data
        elif op == "sync":
            q.sync()
            note_kept = {i: {n} for i, n in note_now.items()}
            acked_unsynced.clear()
        elif op == "kill":
            reopen(synced=False)
        elif op == "crash":
            reopen(synced=True)
        assert q.depth() == len(unread)
    q.close()


def test_copy_mark_counts_only_what_reached_the_disk(tmp_path):
    """A batch copied from a topic: its mark holds once the whole batch is on
    disk (even if the crash came before the mark was flushed); a batch a crash
    cut short leaves the old mark and its remains are not served."""
    q = open_queue(str(tmp_path), max_bytes=10_000)
    q.put_many([record(i) for i in range(5)], mark=100)
    q.sync()
    q.put_many([record(i) for i in range(5, 10)], mark=200)
    kill(q)  # before any sync: the mark itself was only buffered
    q = open_queue(str(tmp_path), max_bytes=10_000)
    assert q.mark == 200
    assert [index(b) for b in drain(q)] == list(range(10))
    q.sync()
    q.put_many([record(i) for i in range(10, 20)], mark=300)
    kill(q)
    # the crash came in the middle of the last batch's write
    data = tmp_path / "t:c.diskqueue.000000.dat"
    data.write_bytes(data.read_bytes()[: -3 * len(record(19)) - 10])
    q = open_queue(str(tmp_path), max_bytes=10_000)
    assert q.mark == 200
    assert q.depth() == 0  # the remains are not counted either
    assert drain(q) == []  # the topic still has all of them: copied again
    q.put_many([record(i) for i in range(10, 20)], mark=300)
    assert [index(b) for b in drain(q)] == list(range(10, 20))
    q.close()
    q = open_queue(str(tmp_path), max_bytes=10_000)
    assert q.mark == 300
    q.close()


def test_journal_is_compacted_once_the_read_position_passes_its_facts(tmp_path):
    q = open_queue(str(tmp_path), max_bytes=1 << 20)
    n = 60_000
    q.put_many([record(i) for i in range(n)])
    items = [q.get_tracked() for _ in range(n)]
    for k, (_, token, _) in enumerate(items[1:], 1):
        q.ack(token)  # each behind the unfinished first one: a journal fact each
        if k % 5000 == 0:
            q.sync()
    q.sync()
    journal = q._journal
    assert journal is not None and journal.size > 1 << 20
    q.ack(items[0][1])  # the read position moves past every fact
    q.sync()
    q.sync()  # the old generation goes once the new one is durable
    files = [p for p in tmp_path.iterdir() if "journal" in p.name]
    assert sum(p.stat().st_size for p in files) < 1024, [(p.name, p.stat().st_size) for p in files]
    q.close()
    assert drain(open_queue(str(tmp_path), max_bytes=1 << 20)) == []


def test_the_two_halves_of_a_move_cut_short_by_a_crash(tmp_path):
    """What dead_letter.py's recovery relies on: the keys a batch will get,
    whether a record was let go, and discarding an unread one for good."""
    q = open_queue(str(tmp_path))
    q.put_many([record(i) for i in range(4)])
    batch = [record(i) for i in range(4, 8)]
    keys = q.next_keys(batch)
    q.put_many(batch)
    got = [q.get_tracked() for _ in range(8)]
    assert [token for _, token, _ in got[4:]] == keys
    q.ack(got[0][1])  # the read position moves past record 0
    q.ack(got[2][1])  # behind an unfinished one: in the journal
    q.sync()
    q2 = open_queue(str(tmp_path))  # after a crash, before anything is read
    ids = [data[10:26] for data, _, _ in got]
    assert q2.is_done(got[0][1], ids[0]) and q2.is_done(got[2][1], ids[2])
    assert not q2.is_done(got[1][1], ids[1]) and not q2.is_done(keys[0], ids[4])
    assert q2.unread_ids() == set(ids[1:])  # (record 2 is skipped when read, not before)
    assert q2.discard(keys[1], ids[5]) is True
    assert q2.discard(keys[2], b"0" * 16) is True  # not that message there: nothing to do
    assert q2.discard(got[0][1], ids[0]) is False  # read past already
    assert q2.depth() == 5  # records 2 (finished) and 5 (discarded) are not counted
    q2.sync()
    q3 = open_queue(str(tmp_path))  # the discard is durable
    assert q3.depth() == 5
    assert [index(b) for b in drain(q3)] == [1, 3, 4, 6, 7]
    q3.close()


def test_bytes_queued_counts_the_unread_records_across_files(tmp_path):
    q = open_queue(str(tmp_path), max_bytes=100)
    recs = [record(i) for i in range(10)]  # 38-39 bytes each: a file holds two
    q.put_many(recs)
    assert q.bytes_queued() == sum(4 + len(r) for r in recs)
    for i in range(5):
        q.get()
        assert q.bytes_queued() == sum(4 + len(r) for r in recs[i + 1 :])
    q.close()
