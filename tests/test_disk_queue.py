"""DiskQueue: go-diskqueue file format, roll-over, sync ordering, recovery, write errors."""

from __future__ import annotations

import errno
import itertools
import os
import re
import struct
import threading
from collections import deque
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test

from pynsqd.backend_queue import BackendError
from pynsqd.disk_queue import DiskQueue, list_data_files
from pynsqd.protocol import encode_message

NAME = "topic:chan"  # channel queues are named <topic>:<channel>, kept as is in the file names


class RecordingLogger:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict]] = []

    def _add(self, level: str, event: str, **kw: object) -> None:
        self.events.append((level, event, kw))

    def debug(self, event: str, **kw: object) -> None:
        self._add("debug", event, **kw)

    def info(self, event: str, **kw: object) -> None:
        self._add("info", event, **kw)

    def warning(self, event: str, **kw: object) -> None:
        self._add("warning", event, **kw)

    def error(self, event: str, **kw: object) -> None:
        self._add("error", event, **kw)

    def levels(self, level: str) -> list[str]:
        return [e for lv, e, _ in self.events if lv == level]


def make(path: Path, name: str = NAME, *, max_bytes: int = 1024, sync_every: int = 100, **kw: object) -> DiskQueue:
    kw.setdefault("logger", RecordingLogger())
    kw.setdefault("min_msg_size", 4)
    kw.setdefault("max_msg_size", 1000)
    return DiskQueue(name, str(path), max_bytes_per_file=max_bytes, sync_every=sync_every, **kw)  # type: ignore[arg-type]


def recs(lo: int, hi: int, size: int = 20) -> list[bytes]:
    return [f"rec-{i:06d}".encode().ljust(size, b".") for i in range(lo, hi)]


def drain(q: DiskQueue) -> list[bytes]:
    out = []
    while (data := q.get()) is not None:
        out.append(data)
    return out


# hand-written readers/writers that follow the documented go-diskqueue format, not our code


def dat_name(path: Path, num: int, name: str = NAME) -> Path:
    return path / f"{name}.diskqueue.{num:06d}.dat"


def meta_name(path: Path, name: str = NAME) -> Path:
    return path / f"{name}.diskqueue.meta.dat"


def parse_dat(raw: bytes) -> list[bytes]:
    out, pos = [], 0
    while pos < len(raw):
        (n,) = struct.unpack_from(">i", raw, pos)
        assert 0 <= n and pos + 4 + n <= len(raw), "record runs past the end of the file"
        out.append(raw[pos + 4 : pos + 4 + n])
        pos += 4 + n
    return out


def build_dat(records: list[bytes], tail: bytes = b"") -> bytes:
    return b"".join(struct.pack(">i", len(r)) + r for r in records) + tail


def parse_meta(raw: bytes) -> tuple[int, ...]:
    m = re.fullmatch(rb"(-?\d+)\n(\d+),(\d+)\n(\d+),(\d+)\n", raw)
    assert m, raw
    return tuple(int(x) for x in m.groups())


def data_files(path: Path, name: str = NAME) -> list[str]:
    meta = meta_name(path, name).name
    return sorted(p.name for p in path.iterdir() if p.name.startswith(name + ".diskqueue.") and p.name != meta)


# ---------------------------------------------------------------- format


def test_files_and_metadata_follow_go_diskqueue_format(tmp_path: Path) -> None:
    q = make(tmp_path, max_bytes=100)
    q.put_many(recs(0, 6))  # 24 bytes each: 4 per file (96 <= 100), the 5th rolls
    assert q.get() == recs(0, 1)[0]
    q.sync()
    assert data_files(tmp_path) == [dat_name(tmp_path, 0).name, dat_name(tmp_path, 1).name]
    assert parse_dat(dat_name(tmp_path, 0).read_bytes()) == recs(0, 4)
    assert parse_dat(dat_name(tmp_path, 1).read_bytes()) == recs(4, 6)
    assert meta_name(tmp_path).read_bytes() == b"5\n0,24\n1,48\n"
    assert parse_meta(meta_name(tmp_path).read_bytes()) == (5, 0, 24, 1, 48)
    q.close()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_reads_a_directory_written_by_go(tmp_path: Path) -> None:
    # what Go nsqd leaves after writing 7 messages over three files and reading two
    msgs = [encode_message(1_700_000_000_000_000_000 + i, 1, f"{i:016d}".encode(), b"body %d" % i) for i in range(7)]
    dat_name(tmp_path, 3).write_bytes(build_dat(msgs[0:3]))
    dat_name(tmp_path, 4).write_bytes(build_dat(msgs[3:5]))
    dat_name(tmp_path, 5).write_bytes(build_dat(msgs[5:7]))
    read_pos = 2 * (4 + len(msgs[0]))
    meta_name(tmp_path).write_bytes(b"5\n3,%d\n5,%d\n" % (read_pos, len(build_dat(msgs[5:7]))))
    log = RecordingLogger()
    q = make(tmp_path, min_msg_size=26, max_msg_size=1024 + 26, logger=log)
    assert q.depth() == 5
    assert not log.levels("warning") and not log.levels("error")
    q.put(msgs[0])
    assert drain(q) == msgs[2:7] + [msgs[0]]
    q.close()
    assert data_files(tmp_path) == [dat_name(tmp_path, 5).name]
    assert parse_meta(meta_name(tmp_path).read_bytes()) == (0, 5, 3 * (4 + len(msgs[0])), 5, 3 * (4 + len(msgs[0])))


def test_empty_queue_name_is_kept_verbatim(tmp_path: Path) -> None:
    q = make(tmp_path, name="a.b-c_d:ch#ephemeral-not")
    q.put(b"xxxx")
    q.close()
    assert (tmp_path / "a.b-c_d:ch#ephemeral-not.diskqueue.000000.dat").exists()
    assert (tmp_path / "a.b-c_d:ch#ephemeral-not.diskqueue.meta.dat").exists()


def test_other_queues_files_are_left_alone(tmp_path: Path) -> None:
    other = make(tmp_path, name="topic")
    other.put(b"other")
    other.close()
    q = make(tmp_path, name="topic.diskqueue.000001")  # a legal topic name sharing the prefix
    assert q.depth() == 0
    q.put(b"mine")
    q.delete()
    assert make(tmp_path, name="topic").get() == b"other"


# ---------------------------------------------------------------- roll-over and deletion


def test_roll_over_condition(tmp_path: Path) -> None:
    q = make(tmp_path, max_bytes=100)
    q.put_many([b"a" * 46, b"b" * 46])  # 50 + 50 == max: still one file
    q.put(b"c" * 26)  # 100 + 30 > max: rolls
    q.put(b"d" * 200)  # bigger than a file: rolls, gets a file of its own
    q.put(b"e" * 26)  # writePos 204 > 0: rolls again
    q.sync()
    sizes = [os.path.getsize(dat_name(tmp_path, i)) for i in range(4)]
    assert sizes == [100, 30, 204, 30]
    assert drain(q) == [b"a" * 46, b"b" * 46, b"c" * 26, b"d" * 200, b"e" * 26]
    q.put_many([b"f" * 16, b"g" * 46, b"h" * 46, b"i" * 26])  # split: 30 + 50 + 50 > 100 rolls once
    q.sync()
    assert [os.path.getsize(dat_name(tmp_path, i)) for i in (3, 4)] == [30 + 20 + 50, 50 + 30]
    q.close()
    # an oversized record into an empty file stays in that file
    q = make(tmp_path / "x" if (tmp_path / "x").mkdir() is None else tmp_path, max_bytes=100)
    q.put(b"z" * 300)
    q.put(b"y" * 10)
    q.sync()
    assert os.path.getsize(dat_name(tmp_path / "x", 0)) == 304
    assert os.path.getsize(dat_name(tmp_path / "x", 1)) == 14


def test_put_many_spanning_files_writes_one_call_per_file(tmp_path: Path) -> None:
    q = make(tmp_path, max_bytes=100)
    calls = []
    real = q._pwrite

    def counting(fd: int, data: bytes, pos: int) -> int:
        calls.append((len(data), pos))
        return real(fd, data, pos)

    q._pwrite = counting
    q.put_many(recs(0, 3))
    assert calls == [(72, 0)]
    q.put_many(recs(3, 12))  # 24 more bytes fit in file 0, then 4 per file
    assert calls[1:] == [(24, 72), (96, 0), (96, 0)]
    assert drain(q) == recs(0, 12)


def test_read_files_are_deleted_only_after_the_metadata_moved_past_them(tmp_path: Path) -> None:
    q = make(tmp_path, max_bytes=100)
    q.put_many(recs(0, 10))  # files 0, 1, 2
    assert drain(q)[:5] == recs(0, 5)
    assert q.sync_due  # read past a file: Go syncs then too
    # still referenced by the durable metadata (none yet): kept
    assert len(data_files(tmp_path)) == 3
    q.sync()
    assert data_files(tmp_path) == [dat_name(tmp_path, 2).name]
    assert parse_meta(meta_name(tmp_path).read_bytes()) == (0, 2, 48, 2, 48)


def test_crash_before_sync_redelivers_instead_of_losing(tmp_path: Path) -> None:
    q = make(tmp_path, max_bytes=100)
    q.put_many(recs(0, 10))
    q.sync()
    assert drain(q) == recs(0, 10)
    q._close_files()  # crash: the reads never reached the metadata
    q = make(tmp_path, max_bytes=100)
    assert q.depth() == 10
    assert drain(q) == recs(0, 10)


def test_crash_between_metadata_and_deletion(tmp_path: Path) -> None:
    q = make(tmp_path, max_bytes=100)
    q.put_many(recs(0, 10))
    assert len(drain(q)) == 10
    saved = dat_name(tmp_path, 1).read_bytes()
    q.sync()
    q._close_files()
    # files are unlinked oldest first: the crash came after file 0 went, before file 1 did
    dat_name(tmp_path, 1).write_bytes(saved)
    log = RecordingLogger()
    q = make(tmp_path, max_bytes=100, logger=log)
    assert q.depth() == 0 and q.get() is None
    assert data_files(tmp_path) == [dat_name(tmp_path, 2).name]
    assert "diskqueue removing already read file" in log.levels("warning")


# ---------------------------------------------------------------- corruption


def test_torn_last_record_keeps_good_records_and_writes_to_a_fresh_file(tmp_path: Path) -> None:
    q = make(tmp_path, max_bytes=1000)
    q.put_many(recs(0, 5))
    q.close()
    path = dat_name(tmp_path, 0)
    with open(path, "r+b") as f:
        f.truncate(4 * 24 + 10)  # the 5th record is cut in the middle
    log = RecordingLogger()
    q = make(tmp_path, max_bytes=1000, logger=log)
    assert q.depth() == 4
    assert log.levels("error") == ["diskqueue corrupt data file, serving the records before the damage"]
    q.put_many(recs(100, 102))
    assert os.path.getsize(path) == 4 * 24 + 10  # nothing appended after the garbage
    assert dat_name(tmp_path, 1).exists()
    q.close()
    q = make(tmp_path, max_bytes=1000)
    assert q.depth() == 6
    assert drain(q) == recs(0, 4) + recs(100, 102)
    q.sync()
    assert data_files(tmp_path) == [path.name + ".bad", dat_name(tmp_path, 1).name]
    q.close()
    q = make(tmp_path, max_bytes=1000)  # no second rename, no loop
    assert q.depth() == 0
    assert data_files(tmp_path) == [path.name + ".bad", dat_name(tmp_path, 1).name]


def test_truncated_header(tmp_path: Path) -> None:
    dat_name(tmp_path, 0).write_bytes(build_dat(recs(0, 2), tail=b"\x00\x00"))
    q = make(tmp_path)
    assert drain(q) == recs(0, 2)
    q.put(b"next")
    assert drain(q) == [b"next"]


@pytest.mark.parametrize("bad_len", [0, 3, 1001, -1, 0x7FFFFFFF])
def test_garbage_length_in_a_middle_file(tmp_path: Path, bad_len: int) -> None:
    dat_name(tmp_path, 0).write_bytes(build_dat(recs(0, 3), tail=struct.pack(">i", bad_len) + b"junk" * 20))
    dat_name(tmp_path, 1).write_bytes(build_dat(recs(3, 6)))
    meta_name(tmp_path).write_bytes(b"6\n0,0\n1,72\n")
    q = make(tmp_path)
    assert q.depth() == 6
    q.put(b"later")
    assert drain(q) == recs(0, 6) + [b"later"]
    q.sync()
    assert data_files(tmp_path) == [dat_name(tmp_path, 0).name + ".bad", dat_name(tmp_path, 1).name]


def test_corruption_found_while_running(tmp_path: Path) -> None:
    q = make(tmp_path)
    q.put_many(recs(0, 4))
    with open(dat_name(tmp_path, 0), "r+b") as f:  # someone scribbles on the unread part
        f.seek(2 * 24)
        f.write(b"\xff\xff\xff\xff")
    assert drain(q) == recs(0, 2)
    assert q.depth() == 0
    q.put(b"after")  # into a new file, not after the garbage
    assert drain(q) == [b"after"]
    assert dat_name(tmp_path, 1).exists()


# ---------------------------------------------------------------- metadata out of step


def test_write_pos_beyond_file_size(tmp_path: Path) -> None:
    dat_name(tmp_path, 0).write_bytes(build_dat(recs(0, 3)))
    meta_name(tmp_path).write_bytes(b"9\n0,0\n0,5000\n")
    q = make(tmp_path)
    assert q.depth() == 3
    q.put(b"tail")
    assert drain(q) == recs(0, 3) + [b"tail"]
    assert parse_dat(dat_name(tmp_path, 0).read_bytes()) == recs(0, 3) + [b"tail"]  # no hole


def test_write_pos_behind_file_size_keeps_unsynced_records(tmp_path: Path) -> None:
    # the metadata was synced after 2 records, 2 more reached the file before a crash
    dat_name(tmp_path, 0).write_bytes(build_dat(recs(0, 4)))
    meta_name(tmp_path).write_bytes(b"2\n0,0\n0,48\n")
    q = make(tmp_path)
    assert q.depth() == 4
    q.put(b"tail")
    assert drain(q) == recs(0, 4) + [b"tail"]


def test_wrong_depth_is_recounted(tmp_path: Path) -> None:
    dat_name(tmp_path, 0).write_bytes(build_dat(recs(0, 3)))
    dat_name(tmp_path, 1).write_bytes(build_dat(recs(3, 5)))
    for depth in (b"99", b"4", b"-3"):
        meta_name(tmp_path).write_bytes(depth + b"\n0,24\n1,48\n")
        q = make(tmp_path)
        assert q.depth() == 4
        assert parse_meta(meta_name(tmp_path).read_bytes()) == (4, 0, 24, 1, 48)
        q._close_files()


@pytest.mark.parametrize("meta", [None, b"garbage", b"3\n5,0\n2,0\n", b""])
def test_missing_or_unusable_metadata_recovers_from_the_files(tmp_path: Path, meta: bytes | None) -> None:
    dat_name(tmp_path, 2).write_bytes(build_dat(recs(0, 3)))
    dat_name(tmp_path, 3).write_bytes(build_dat(recs(3, 5)))
    if meta is not None:
        meta_name(tmp_path).write_bytes(meta)
    log = RecordingLogger()
    q = make(tmp_path, logger=log)
    assert q.depth() == 5
    assert log.levels("warning")
    q.put(b"more")
    assert drain(q) == recs(0, 5) + [b"more"]
    assert parse_meta(meta_name(tmp_path).read_bytes())[1:4:2] == (2, 3)


def test_read_file_deleted_resumes_at_the_next_file(tmp_path: Path) -> None:
    dat_name(tmp_path, 4).write_bytes(build_dat(recs(0, 2)))
    dat_name(tmp_path, 5).write_bytes(build_dat(recs(2, 3)))
    meta_name(tmp_path).write_bytes(b"10\n3,48\n4,48\n")  # file 3 is gone, 5 came after the sync
    q = make(tmp_path)
    assert q.depth() == 3
    assert drain(q) == recs(0, 3)


def test_far_apart_file_numbers_in_metadata(tmp_path: Path) -> None:
    dat_name(tmp_path, 4999).write_bytes(build_dat(recs(0, 2)))  # already read
    dat_name(tmp_path, 5000).write_bytes(build_dat(recs(2, 4)))
    dat_name(tmp_path, 20000).write_bytes(build_dat(recs(4, 5)))
    meta_name(tmp_path).write_bytes(b"3\n5000,24\n20000,24\n")
    q = make(tmp_path)
    assert drain(q) == recs(3, 5)
    assert not dat_name(tmp_path, 4999).exists()


def test_read_pos_not_on_a_record_boundary_redelivers_rather_than_skips(tmp_path: Path) -> None:
    dat_name(tmp_path, 0).write_bytes(build_dat(recs(0, 3)))
    meta_name(tmp_path).write_bytes(b"2\n0,30\n0,72\n")
    q = make(tmp_path)
    assert drain(q) == recs(1, 3)


def bad_records(path: Path, name: str = NAME) -> list[bytes]:
    """The records kept in this queue's .bad files."""
    out = []
    for p in sorted(path.glob(f"{name}.diskqueue.*.bad")):
        out += parse_dat(p.read_bytes())
    return out


def recover(path: Path, files: dict[int, list[bytes]], meta: bytes, **kw: object) -> tuple[DiskQueue, RecordingLogger]:
    """Open a queue on hand-made data files and metadata."""
    for num, records in files.items():
        dat_name(path, num).write_bytes(build_dat(records))
    meta_name(path).write_bytes(meta)
    log = RecordingLogger()
    return make(path, logger=log, **kw), log


def overruled(log: RecordingLogger) -> dict:
    [kw] = [kw for lv, e, kw in log.events if lv == "error" and e.startswith("diskqueue metadata disagrees")]
    return kw


def test_read_pos_beyond_the_end_of_a_file_keeps_the_file(tmp_path: Path) -> None:
    # which of file 0's records were served cannot be known; its depth says
    # they were: they are kept aside (.bad, ERROR with the count), not deleted
    q, log = recover(tmp_path, {0: recs(0, 3), 1: recs(3, 4)}, b"1\n0,900\n1,24\n")
    assert drain(q) == recs(3, 4)
    q.sync()
    assert bad_records(tmp_path) == recs(0, 3)
    assert overruled(log)["kept"] == 3 and overruled(log)["served_again"] == 0


def test_read_pos_beyond_the_end_with_a_depth_counting_the_file_serves_it(tmp_path: Path) -> None:
    q, log = recover(tmp_path, {0: recs(0, 84), 1: recs(84, 100)}, b"100\n0,999999\n1,%d\n" % (16 * 24), max_bytes=84 * 24)
    assert q.depth() == 100
    assert drain(q) == recs(0, 100)
    q.sync()
    assert bad_records(tmp_path) == [] and overruled(log)["served_again"] == 84


def test_read_file_past_every_file_serves_what_the_depth_counts(tmp_path: Path) -> None:
    # the read file number is wrong (7): files 0-2 were never read, as the depth says
    q, log = recover(tmp_path, {i: recs(10 * i, 10 * i + 10) for i in range(3)}, b"30\n7,0\n7,0\n")
    assert q.depth() == 30
    q.put(b"new!")
    assert drain(q) == recs(0, 30) + [b"new!"]
    assert overruled(log)["served_again"] == 30 and overruled(log)["kept"] == 0


def test_read_equals_write_past_the_last_file_with_a_depth_serves_the_records(tmp_path: Path) -> None:
    # read = write = last file + 1, depth 25 of the 30 records on disk: the
    # last 25 come out, the 5 before are kept aside; no data file deleted
    q, log = recover(tmp_path, {i: recs(10 * i, 10 * i + 10) for i in range(3)}, b"25\n3,0\n3,0\n")
    assert q.depth() == 25
    assert drain(q) == recs(5, 30)
    q.sync()
    assert bad_records(tmp_path) == recs(0, 10)  # file 0, once read past
    assert overruled(log)["served_again"] == 25 and overruled(log)["kept"] == 5
    q.close()
    assert make(tmp_path).depth() == 0  # and it stays that way


def test_consistent_metadata_still_deletes_the_crash_leftovers(tmp_path: Path) -> None:
    # read = write = last + 1 with depth 0 is the normal state after reading
    # everything; files just below it are leftovers of a crash before unlink
    q, log = recover(tmp_path, {i: recs(10 * i, 10 * i + 10) for i in range(2)}, b"0\n2,0\n2,0\n")
    assert q.depth() == 0 and drain(q) == []
    assert data_files(tmp_path) == [] and not log.levels("error")


def test_read_file_missing_keeps_the_files_before_it(tmp_path: Path) -> None:
    # read file 1 < write file 2, but file 1 is gone: file 0 cannot be told
    # to be a leftover of a crash before unlink, so it is kept, not deleted
    # (found by test_wrong_metadata_never_loses_a_record)
    q, log = recover(tmp_path, {0: recs(0, 1)}, b"0\n1,0\n2,0\n")
    assert q.depth() == 0 and drain(q) == []
    q.sync()
    assert bad_records(tmp_path) == recs(0, 1)
    assert any("files that are gone" in line for line in log.levels("error"))


def test_a_file_beyond_a_gap_is_found_whatever_the_metadata_says(tmp_path: Path) -> None:
    # metadata reset to an empty queue at file 0 while file 2 holds records:
    # probing numbers near the metadata would never reach it
    q, _ = recover(tmp_path, {2: recs(0, 3)}, b"0\n0,0\n0,0\n")
    assert drain(q) == recs(0, 3)


def test_one_listing_gives_every_queue_its_files(tmp_path: Path) -> None:
    for fn in ("t.diskqueue.000000.dat", "t.diskqueue.000007.dat", "t:c.diskqueue.000001.dat",
               "a.b.diskqueue.1234567.dat", "t.diskqueue.meta.dat", "t.diskqueue.000002.dat.bad",
               "t.diskqueue.12.dat", "t.pynsqd-journal.0"):
        (tmp_path / fn).write_bytes(b"")
    assert {k: sorted(v) for k, v in list_data_files(str(tmp_path)).items()} == {
        "t": [0, 7], "t:c": [1], "a.b": [1234567],
    }


def test_read_pos_ahead_of_the_depth_within_a_file(tmp_path: Path) -> None:
    # depth 6, but 2 records after the read position
    q, log = recover(tmp_path, {0: recs(0, 10)}, b"6\n0,%d\n0,240\n" % (8 * 24))
    assert drain(q) == recs(4, 10)
    q.sync()
    assert bad_records(tmp_path) == recs(0, 10)
    assert overruled(log)["served_again"] == 4 and overruled(log)["kept"] == 4


def test_depth_larger_than_everything_on_disk_serves_nothing_again(tmp_path: Path) -> None:
    q, log = recover(tmp_path, {0: recs(0, 3)}, b"50\n0,24\n0,72\n")
    assert drain(q) == recs(1, 3)
    q.sync()
    assert overruled(log)["served_again"] == 0 and bad_records(tmp_path) == recs(0, 3)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    total=st.integers(0, 40),
    read=st.data(),
    wrong=st.tuples(st.integers(-5, 60), st.integers(-1, 8), st.integers(-30, 500), st.integers(-1, 8), st.integers(-30, 500)),
    which=st.sets(st.sampled_from(range(5)), min_size=1),
)
def test_wrong_metadata_never_loses_a_record(tmp_path_factory: pytest.TempPathFactory, total: int, read: st.DataObject, wrong: tuple[int, ...], which: set[int]) -> None:
    """Whatever parseable values the metadata holds, every record not yet
    read comes out, or stays in a .bad file; none comes out twice."""
    path = tmp_path_factory.mktemp("dq")
    q = make(path, max_bytes=10 * 24)
    q.put_many(recs(0, total))
    k = read.draw(st.integers(0, total))
    assert [q.get() for _ in range(k)] == recs(0, k)
    q.close()
    true_meta = parse_meta(meta_name(path).read_bytes())
    meta = list(true_meta)
    for i in which:  # some values replaced by wrong ones
        meta[i] = max(0, wrong[i]) if i else wrong[i]
    meta_name(path).write_bytes(b"%d\n%d,%d\n%d,%d\n" % tuple(meta))
    follow = believable(path, tuple(meta))
    q = make(path, max_bytes=10 * 24)
    out = drain(q)
    q.sync()
    assert len(out) == len(set(out)), "a record came out twice"
    if follow is not None:
        # metadata that describes a state the queue could be in is followed
        # (the truth cannot be told from it): exactly what follows its read position
        assert out == follow and not bad_records(path)
        return
    kept = set(bad_records(path))
    missing = [r for r in recs(k, total) if r not in out and r not in kept]
    assert not missing, f"lost {missing} with metadata {meta} (true {true_meta})"


def believable(path: Path, meta: tuple[int, ...]) -> list[bytes] | None:
    """The records after the read position if ``meta``'s positions are
    consistent with the files (record boundaries, no file missing between
    them) and its depth claims no more records than lie between them, else
    None."""
    depth, rfn, rpos, wfn, wpos = meta
    files = {}
    for p in path.iterdir():
        m = re.fullmatch(re.escape(NAME) + r"\.diskqueue\.(\d{6})\.dat", p.name)
        if m:
            files[int(m.group(1))] = parse_dat(p.read_bytes())

    def index(fn: int, pos: int) -> int | None:
        if fn not in files:
            return 0 if pos == 0 and not any(n >= fn for n in files) else None
        return pos // 24 if pos % 24 == 0 and pos // 24 <= len(files[fn]) else None

    ri, wi = index(rfn, rpos), index(wfn, wpos)
    if ri is None or wi is None or (rfn, rpos) > (wfn, wpos):
        return None
    if rfn == wfn:
        window = wi - ri
    else:
        if rfn not in files or any(n not in files for n in range(rfn + 1, wfn)):
            return None
        window = len(files[rfn]) - ri + sum(len(files[n]) for n in range(rfn + 1, wfn)) + wi
    after = files.get(rfn, [])[ri:] + [r for n in sorted(files) if n > rfn for r in files[n]]
    # a depth at most the window's records says nothing is missing: the positions are followed
    return after if depth <= window else None


# ---------------------------------------------------------------- write and sync errors


def test_bad_sizes_are_refused(tmp_path: Path) -> None:
    q = make(tmp_path, min_msg_size=4, max_msg_size=10)
    for data in (b"abc", b"x" * 11):
        with pytest.raises(BackendError):
            q.put(data)
    with pytest.raises(BackendError):
        q.put_many([b"good", b"x" * 11])
    assert q.depth() == 0 and q.healthy
    q.put_many([])
    assert q.depth() == 0


def test_write_error_is_refused_and_leaves_the_queue_consistent(tmp_path: Path) -> None:
    q = make(tmp_path)
    q.put_many(recs(0, 5))
    real = q._pwrite

    def enospc(fd: int, data: bytes, pos: int) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    q._pwrite = enospc
    with pytest.raises(BackendError, match="No space left"):
        q.put_many(recs(5, 10))
    assert not q.healthy and q.depth() == 5

    calls: list[int] = []

    def half_then_eio(fd: int, data: bytes, pos: int) -> int:
        if not calls:
            calls.append(1)
            return real(fd, bytes(data)[: len(data) // 2], pos)
        raise OSError(errno.EIO, "Input/output error")

    q._pwrite = half_then_eio
    with pytest.raises(BackendError):
        q.put(recs(10, 11)[0])
    assert os.path.getsize(dat_name(tmp_path, 0)) == 5 * 24  # the torn half was cut back off
    assert not q.healthy and q.depth() == 5
    assert q.get() == recs(0, 1)[0]

    q._pwrite = real
    q.put_many(recs(20, 22))
    assert q.healthy and q.depth() == 6
    q.close()
    q = make(tmp_path)  # nothing refused comes back, nothing acknowledged is lost
    assert drain(q) == recs(1, 5) + recs(20, 22)


def test_failed_batch_across_files_is_undone(tmp_path: Path) -> None:
    q = make(tmp_path, max_bytes=100)
    q.put_many(recs(0, 2))
    real = q._pwrite
    calls: list[int] = []

    def fail_second(fd: int, data: bytes, pos: int) -> int:
        calls.append(pos)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, pos)

    q._pwrite = fail_second
    with pytest.raises(BackendError):
        q.put_many(recs(2, 12))  # would go to files 0, 1, 2
    assert data_files(tmp_path) == [dat_name(tmp_path, 0).name]
    assert os.path.getsize(dat_name(tmp_path, 0)) == 48
    q._pwrite = real
    q.put_many(recs(2, 12))
    assert q.healthy
    assert drain(q) == recs(0, 12)


def test_open_failure_is_a_backend_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    q = make(tmp_path)
    real_open = os.open

    def no_create(path: str, flags: int, *a: int) -> int:
        if flags & os.O_CREAT and str(path).endswith(".dat"):
            raise OSError(errno.EDQUOT, "Disk quota exceeded")
        return real_open(path, flags, *a)

    monkeypatch.setattr(os, "open", no_create)
    with pytest.raises(BackendError, match="quota"):
        q.put(b"data")
    assert not q.healthy and q.depth() == 0
    monkeypatch.undo()
    q.put(b"data")
    assert q.healthy and drain(q) == [b"data"]


def test_sync_failure_is_reported_and_retried(tmp_path: Path) -> None:
    q = make(tmp_path, max_bytes=100)
    q.put_many(recs(0, 6))
    assert len(drain(q)) == 6

    def eio(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    q._fsync = eio
    with pytest.raises(BackendError):
        q.sync()
    assert not q.healthy and q.dirty
    assert dat_name(tmp_path, 0).exists()  # not deleted: the metadata did not move past it
    q._fsync = os.fsync
    q.sync()
    assert q.healthy and not q.dirty
    assert data_files(tmp_path) == [dat_name(tmp_path, 1).name]


# ---------------------------------------------------------------- sync protocol


def test_sync_flags_and_callback(tmp_path: Path) -> None:
    due: list[DiskQueue] = []
    q = make(tmp_path, sync_every=3, on_sync_due=due.append)
    assert not q.dirty and not q.sync_due
    q.put(b"aaaa")
    assert q.dirty and not q.sync_due and not due
    q.put_many([b"bbbb", b"cccc"])
    assert q.sync_due and due == [q]
    q.get()
    assert due == [q]  # told once per sync period
    q.sync()
    assert not q.dirty and not q.sync_due
    q.put(b"dddd")
    q.get()
    assert not q.sync_due
    q.get()  # the 3rd op: due again
    assert q.sync_due and due == [q, q]
    assert drain(q) == [b"dddd"]
    assert due == [q, q]


def test_prepare_sync_persists_the_positions_of_the_moment_it_was_called(tmp_path: Path) -> None:
    q = make(tmp_path, max_bytes=100)
    q.put_many(recs(0, 10))
    q.get()
    job = q.prepare_sync()
    q.put_many(recs(10, 14))
    assert drain(q)[:5] == recs(1, 6)  # reads past files 0 and 1
    job()
    assert parse_meta(meta_name(tmp_path).read_bytes()) == (9, 0, 24, 2, 48)
    assert len(data_files(tmp_path)) == 4  # read past after the snapshot: still kept
    q.sync()
    assert parse_meta(meta_name(tmp_path).read_bytes()) == (0, 3, 48, 3, 48)
    assert data_files(tmp_path) == [dat_name(tmp_path, 3).name]


def test_prepare_sync_closure_runs_in_a_thread_while_the_queue_is_used(tmp_path: Path) -> None:
    q = make(tmp_path, max_bytes=200)
    q.put_many(recs(0, 30))
    got = [q.get() for _ in range(12)]
    job = q.prepare_sync()
    snapshot = (18, q._rfn, q._rpos, q._wfn, q._wpos)
    assert not q.dirty
    # the loop goes on while the worker syncs
    t = threading.Thread(target=job)
    t.start()
    for i in range(30, 60):
        q.put(recs(i, i + 1)[0])
        got.append(q.get())
    t.join()
    assert parse_meta(meta_name(tmp_path).read_bytes()) == snapshot
    assert q.dirty
    assert got == recs(0, 42)
    # a crash now resumes from the snapshot: nothing read after it is lost
    q._close_files()
    q = make(tmp_path, max_bytes=200)
    assert drain(q) == recs(12, 60)


def test_late_sync_after_empty_does_not_resurrect_metadata(tmp_path: Path) -> None:
    q = make(tmp_path, max_bytes=100)
    q.put_many(recs(0, 10))
    drain(q)
    job = q.prepare_sync()
    q.empty()
    job()
    assert not meta_name(tmp_path).exists()
    assert data_files(tmp_path) == []
    q.put(b"new!")
    q._close_files()
    q = make(tmp_path, max_bytes=100)
    assert drain(q) == [b"new!"]


# ---------------------------------------------------------------- lifecycle


def test_close_and_reopen_keeps_records(tmp_path: Path) -> None:
    q = make(tmp_path, max_bytes=100)
    q.put_many(recs(0, 9))
    assert drain(q)[:3] == recs(0, 3)
    q.put_many(recs(9, 12))
    q.close()
    with pytest.raises(BackendError):
        q.put(b"late")
    q = make(tmp_path, max_bytes=100)
    assert q.depth() == 3
    q.put_many(recs(12, 14))
    q.close()
    q = make(tmp_path, max_bytes=100)
    assert drain(q) == recs(9, 14)


def test_empty_and_delete(tmp_path: Path) -> None:
    q = make(tmp_path, max_bytes=100)
    q.put_many(recs(0, 10))
    q.get()
    q.sync()
    q.empty()
    assert q.depth() == 0 and q.get() is None
    assert data_files(tmp_path) == [] and not meta_name(tmp_path).exists()
    q.put_many(recs(10, 12))
    q.close()
    q = make(tmp_path, max_bytes=100)
    assert drain(q) == recs(10, 12)
    (tmp_path / (dat_name(tmp_path, 0).name + ".bad")).write_bytes(b"x")
    q.delete()
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- stateful model test


class Quiet:
    def __getattr__(self, name: str):  # noqa: ANN204
        return lambda *a, **k: None


def _no_fsync(fd: int) -> None:
    # a process crash keeps the page cache: fsync changes nothing the model can see
    return None


class DiskQueueMachine(RuleBasedStateMachine):
    """Against a model: `log` holds what was written since the last empty(),
    `read` how many of those were read, `synced` the read count the durable
    metadata holds (where a crash resumes)."""

    base: Path
    counter: itertools.count

    def __init__(self) -> None:
        super().__init__()
        self.path = self.base / f"ex{next(self.counter)}"
        self.path.mkdir()
        self.q: DiskQueue | None = None

    def open(self) -> DiskQueue:
        q = DiskQueue("t:c", str(self.path), logger=Quiet(), **self.params)
        q._fsync = _no_fsync
        return q

    @initialize(max_bytes=st.integers(64, 300), sync_every=st.integers(1, 20))
    def start(self, max_bytes: int, sync_every: int) -> None:
        self.params = dict(max_bytes_per_file=max_bytes, min_msg_size=1, max_msg_size=100, sync_every=sync_every)
        self.log: list[bytes] = []
        self.read = 0
        self.synced = 0
        self.gen = 0
        self.pending: deque = deque()
        self.seq = 0
        self.q = self.open()

    def record(self, size: int) -> bytes:
        # unique content, so any loss, duplicate or reordering shows
        self.seq += 1
        return (self.seq.to_bytes(4, "big") + b"-" * 96)[:size] if size >= 4 else bytes([self.seq % 251 + 1]) * size

    def expect_next(self) -> bytes | None:
        return self.log[self.read] if self.read < len(self.log) else None

    @rule(size=st.integers(1, 100))
    def put(self, size: int) -> None:
        data = self.record(size)
        self.q.put(data)
        self.log.append(data)
        assert self.q.dirty

    @rule(sizes=st.lists(st.integers(1, 100), max_size=20))
    def put_many(self, sizes: list[int]) -> None:
        items = [self.record(n) for n in sizes]
        self.q.put_many(items)
        self.log.extend(items)

    @rule(data=st.one_of(st.just(b""), st.binary(min_size=101, max_size=110)))
    def put_bad(self, data: bytes) -> None:
        with pytest.raises(BackendError):
            self.q.put_many([b"ok", data])

    @rule(n=st.integers(1, 12))
    def get(self, n: int) -> None:
        for _ in range(n):
            want = self.expect_next()
            assert self.q.get() == want
            if want is None:
                break
            self.read += 1

    def run_pending(self) -> None:
        while self.pending:
            self.run_oldest()

    def run_oldest(self) -> None:
        job, read, gen, snapshot = self.pending.popleft()
        job()
        if gen == self.gen:
            self.synced = read
            assert parse_meta((self.path / "t:c.diskqueue.meta.dat").read_bytes()) == snapshot

    @rule(kind=st.sampled_from(["sync", "prepare", "run"]))
    def sync(self, kind: str) -> None:
        if kind == "sync":
            self.run_pending()  # closures run one at a time, in order
            self.q.sync()
            self.synced = self.read
            assert not self.q.dirty and not self.q.sync_due
        elif kind == "prepare" and len(self.pending) < 3:
            q = self.q
            snapshot = (q.depth(), q._rfn, q._rpos, q._wfn, q._wpos)
            self.pending.append((q.prepare_sync(), self.read, self.gen, snapshot))
        elif kind == "run" and self.pending:
            self.run_oldest()

    # rarer than the others: one rule for the three, so queues grow over many files
    @rule(kind=st.sampled_from(["close", "crash", "empty"]))
    def lifecycle(self, kind: str) -> None:
        if kind == "close":
            self.run_pending()
            self.q.close()
            self.synced = self.read
            self.q = self.open()
        elif kind == "crash":
            self.pending.clear()  # never ran
            self.q._close_files()
            self.read = self.synced  # reads after the last durable metadata come again
            self.q = self.open()
        else:
            self.q.empty()
            self.log, self.read, self.synced = [], 0, 0
            self.gen += 1

    @invariant()
    def depth_matches(self) -> None:
        if self.q is not None:
            assert self.q.depth() == len(self.log) - self.read
            assert self.q.bytes_queued() == sum(4 + len(r) for r in self.log[self.read :])
            assert self.q.healthy

    def teardown(self) -> None:
        q = self.q
        if q is None:
            return
        self.run_pending()
        assert drain(q) == self.log[self.read :]
        q.sync()
        wfn, wpos = q._wfn, q._wpos
        files = sorted(p.name for p in self.path.iterdir())
        allowed = {f"t:c.diskqueue.{wfn:06d}.dat", "t:c.diskqueue.meta.dat"}
        assert set(files) <= allowed, files
        assert parse_meta((self.path / "t:c.diskqueue.meta.dat").read_bytes()) == (0, wfn, wpos, wfn, wpos)
        q.close()


def test_stateful_against_a_model(tmp_path: Path) -> None:
    DiskQueueMachine.base = tmp_path
    DiskQueueMachine.counter = itertools.count()
    run_state_machine_as_test(
        DiskQueueMachine,
        settings=settings(max_examples=150, stateful_step_count=50, deadline=None, suppress_health_check=[HealthCheck.too_slow]),
    )
