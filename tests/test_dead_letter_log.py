"""The dead-letter log beside a dead-letter topic (pynsqd/dead_letter.py):
lines, pending moves, compaction, a failed append -- without a daemon."""

from __future__ import annotations

import os

import pytest

from pynsqd import dead_letter
from pynsqd.backend_queue import BackendError
from pynsqd.dead_letter import DeadLetterLog, Origin


def origin(i: int) -> Origin:
    return Origin(b"%016x" % (1000 + i), "orders", "billing", b"%016x" % i, 3, 1_000 + i, 2_000 + i)


def reopen(log: DeadLetterLog) -> DeadLetterLog:
    again = DeadLetterLog(os.path.dirname(log.path), log.topic)
    again.load()
    return again


def test_entries_and_pending_moves_read_back(tmp_path):
    log = DeadLetterLog(str(tmp_path), "orders.dead")
    for i in range(4):
        log.add(origin(i), (10 + i, 20 + i) if i < 3 else None)
    log.write_now()  # before the data they describe, as a move does
    log.moved_in(origin(0).id)
    log.moving_out(origin(1).id, "orders.dead", 21, "orders:billing", 99, b"f" * 16)
    log.drop(origin(2).id)
    log.sync()
    back = reopen(log)
    assert list(back.entries) == [origin(i).id for i in (0, 1, 3)]
    assert back.entries[origin(3).id] == origin(3)
    # findable by the id each had where it came from, as long as it is kept
    assert back.by_original_id(origin(3).message_id) == [origin(3)]
    assert back.by_original_id(origin(2).message_id) == []
    assert back.by_original == {origin(i).message_id: [origin(i).id] for i in (0, 1, 3)}
    assert back.moving_in == {origin(1).id: (11, 21)}
    assert back.moving_back == {origin(1).id: ("orders.dead", 21, "orders:billing", 99, b"f" * 16)}
    log.moved_out(origin(1).id)
    log.close()
    assert reopen(log).moving_back == {}


def test_a_mostly_spent_file_is_rewritten_across_two_rounds(tmp_path, monkeypatch):
    monkeypatch.setattr(dead_letter, "_COMPACT_SLACK", 4)
    log = DeadLetterLog(str(tmp_path), "d")
    for i in range(10):
        log.add(origin(i))
    for i in range(8):
        log.drop(origin(i).id)
    log.prepare_sync()()  # snapshot of the 2 live entries written to a new file, fsynced
    log.add(origin(10))  # written to the old file meanwhile...
    log.prepare_sync()()  # ... and carried over when the new one is put in place
    lines = (tmp_path / "d.pynsqd-dead-letters").read_bytes().splitlines()
    assert len(lines) == 3
    assert list(reopen(log).entries) == [origin(i).id for i in (8, 9, 10)]
    assert [p.name for p in tmp_path.iterdir()] == ["d.pynsqd-dead-letters"]
    log.close()


def test_a_failed_append_leaves_no_torn_line(tmp_path, monkeypatch):
    log = DeadLetterLog(str(tmp_path), "d")
    log.add(origin(0))
    log.write_now()
    real = os.pwrite

    def short(fd: int, data: bytes, pos: int) -> int:
        return real(fd, data[:5], pos)  # the disk fills part-way

    monkeypatch.setattr(os, "pwrite", short)
    log.add(origin(1))
    with pytest.raises(BackendError):
        log.write_now()
    monkeypatch.setattr(os, "pwrite", real)
    log.write_now()  # the same lines, whole
    log.close()
    assert list(reopen(log).entries) == [origin(0).id, origin(1).id]


def test_an_entry_done_with_is_kept_while_its_message_is_retained(tmp_path):
    retained = {origin(0).id, origin(1).id}
    log = DeadLetterLog(str(tmp_path), "d")
    log.retains = retained.__contains__
    for i in range(3):
        log.add(origin(i))
    for i in range(3):
        log.left("dl", [origin(i).id], ["dl"])  # every channel done with each
    assert list(log.entries) == [origin(0).id, origin(1).id] and log.spent == retained
    log.sync()
    back = reopen(log)  # over a restart, and a rewrite
    assert back.spent == retained
    back.rewrite_now()
    back = reopen(back)
    back.retains = retained.__contains__
    assert back.spent == retained
    retained.discard(origin(0).id)  # expired
    back.forget_spent()
    assert list(back.entries) == [origin(1).id] and back.by_original_id(origin(0).message_id) == []
    back.close()
    log.close()
