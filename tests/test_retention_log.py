"""The retention log (issue 14, feature 4), sans-IO: random appends, expiry,
restarts and torn tails checked against a model of what must be kept; a
replay's backlog filter."""

from __future__ import annotations

import os
import tempfile

import hypothesis.strategies as st
import pytest
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from pynsqd.message import Message, MessageBatch
from pynsqd.protocol import encode_mpub_body, scan_mpub_body
from pynsqd.replay import Replay
from pynsqd.retention import Policy, RetentionLog, parse_since

SEC = 1_000_000_000


def open_log(path: str, policy: Policy) -> RetentionLog:
    return RetentionLog("t", path, policy, max_bytes_per_file=1 << 20, max_msg_size=4096, sync_every=10)


class LogMachine(RuleBasedStateMachine):
    """What is kept is always a suffix of what was appended, in order; the
    bounds hold after each expiry; nothing the policy still covers is gone."""

    def __init__(self) -> None:
        super().__init__()
        self.tmp = tempfile.TemporaryDirectory()
        self.policy = Policy(0.0, 0)
        self.log: RetentionLog = None  # type: ignore[assignment]
        self.appended: list[tuple[bytes, int, bytes]] = []  # (id, ts, body)
        self.first_kept = 0  # index in appended of the oldest retained
        self.now = 1000 * SEC
        self.n = 0
        self.biggest = 0

    @initialize(time=st.sampled_from([0, 5, 40]), size=st.sampled_from([0, 3000, 20000]))
    def start(self, time: int, size: int) -> None:
        self.policy = Policy(float(time or (0 if size else 40)), size)
        self.log = open_log(self.tmp.name, self.policy)

    @rule(time=st.sampled_from([0, 5, 40]), size=st.sampled_from([0, 3000, 20000]))
    def configure(self, time: int, size: int) -> None:
        self.policy = Policy(float(time or (0 if size else 40)), size)
        self.log.set_policy(self.policy)

    @rule(k=st.integers(1, 30), size=st.sampled_from([0, 10, 300]), batch=st.booleans())
    def append(self, k: int, size: int, batch: bool) -> None:
        bodies = [b"%d-" % (self.n + i) + b"z" * size for i in range(k)]
        if batch:
            buf = encode_mpub_body(bodies)
            count, each, starts = scan_mpub_body(buf, 1 << 20, 1 << 20)
            msgs = MessageBatch(buf, count, each, starts, self.now, (1 << 44, self.n))
            ids = [m.id for m in msgs]
        else:
            ids = [b"%016x" % ((1 << 44) + self.n + i) for i in range(k)]
            msgs = [Message(i, b, self.now) for i, b in zip(ids, bodies)]
        self.log.append(msgs)
        self.appended += [(i, self.now, b) for i, b in zip(ids, bodies)]
        self.biggest = max(self.biggest, sum(30 + len(b) for b in bodies))
        self.n += k

    @rule(seconds=st.sampled_from([0.5, 2, 7, 30]))
    def expire(self, seconds: float) -> None:
        self.now += int(seconds * SEC)
        self.log.expire(self.now)
        kept = self._read_all()
        assert kept == self.appended[len(self.appended) - len(kept) :], "not a suffix"
        first = len(self.appended) - len(kept)
        assert first >= self.first_kept
        gone, self.first_kept = self.appended[self.first_kept : first], first
        if self.policy.time and not self.policy.bytes:
            # kept at least the retention time
            cutoff = self.now - int(self.policy.time * SEC)
            assert all(ts < cutoff for _, ts, _ in gone)
        if self.policy.bytes:
            assert self.log.disk_bytes <= self.policy.bytes + self.log.segment_bytes + self.biggest
        if self.policy.time:
            # whole files only: every file but the newest holds a message the policy still covers
            cutoff = self.now - int(self.policy.time * SEC)
            assert all(s.max_ts >= cutoff for s in self.log.segments[:-1]) or self.policy.bytes

    @rule(torn=st.booleans())
    def restart(self, torn: bool) -> None:
        self.log.close()
        if torn and self.log.segments[-1].size:
            # a write a crash cut short: never acknowledged, cut off at start
            with open(self.log._file(self.log.segments[-1].num), "ab") as fh:
                fh.write(b"\0\0\0\x40partial")
        self.log = open_log(self.tmp.name, self.policy)

    @rule(back=st.sampled_from([0, 1, 3, 60]))
    def replay_since(self, back: int) -> None:
        since = self.now - back * SEC
        log = self.log
        pos, got = log.position_at(since), []
        while True:
            msgs, pos, _ = log.read(pos, log.end, 7, since)
            got += [(m.id, m.timestamp, m.body) for m in msgs]
            if pos >= log.end:
                break
        assert got == [m for m in self._read_all() if m[1] >= since]

    def _read_all(self) -> list[tuple[bytes, int, bytes]]:
        msgs, pos, _ = self.log.read(self.log.start, self.log.end, 1 << 30, 0)
        return [(m.id, m.timestamp, m.body) for m in msgs]

    @invariant()
    def files_match_the_books(self) -> None:
        if self.log is None:
            return
        on_disk = sum(
            os.path.getsize(os.path.join(self.tmp.name, f)) for f in os.listdir(self.tmp.name) if f.endswith(".dat")
        )
        assert on_disk == self.log.disk_bytes
        assert self.log.count == len(self._read_all())

    def teardown(self) -> None:
        if self.log is not None:
            self.log.close()
        self.tmp.cleanup()


LogMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=25, deadline=None)
test_retention_log_keeps_a_bounded_suffix = LogMachine.TestCase


def test_a_refused_publish_is_taken_back(tmp_path):
    log = open_log(str(tmp_path), Policy(60.0, 0))
    log.append([Message(b"%016x" % 1, b"kept", 5)])
    before = log.append([Message(b"%016x" % 2, b"refused", 6)])
    log.undo(before)
    msgs, _, _ = log.read(log.start, log.end, 10, 0)
    assert [m.body for m in msgs] == [b"kept"] and log.count == 1
    assert log.segments[-1].max_id == b"%016x" % 1
    log.close()


def test_expired_files_are_deleted_whole_and_the_rest_left_untouched(tmp_path):
    log = open_log(str(tmp_path), Policy(0.0, 8 * 4096))
    for i in range(400):
        log.append([Message(b"%016x" % i, b"x" * 200, i)])
    log.sync()
    sealed = {s.num: open(log._file(s.num), "rb").read() for s in log.segments[:-1]}
    log.expire(10**18)
    assert log.disk_bytes <= 8 * 4096 + log.segment_bytes
    for s in log.segments[:-1]:
        assert open(log._file(s.num), "rb").read() == sealed[s.num]  # never rewritten
    assert sorted(int(f.split(".")[-2]) for f in os.listdir(tmp_path) if f.endswith(".dat")) == [s.num for s in log.segments]
    log.close()


def test_a_replay_leaves_out_of_the_backlog_what_it_gives():
    replay = Replay(100, (0, 0), (3, 0), "/nonexistent", (b"%016x" % 10, b"%016x" % 20))
    msgs = [Message(b"%016x" % i, b"", ts) for i, ts in ((5, 200), (10, 200), (15, 50), (20, 200), (21, 200))]
    kept = replay.keep(msgs)
    # older than the log range, published before ``since``, newer than the rewind: kept
    assert [int(m.id, 16) for m in kept] == [5, 15, 21]
    assert replay.dropped_max == b"%016x" % 20
    buf = encode_mpub_body([b"a", b"b"])
    count, size, starts = scan_mpub_body(buf, 1 << 20, 1 << 20)
    outside = MessageBatch(buf, count, size, starts, 500, (0x100 << 22, 0))
    assert replay.keep(outside) is outside


@pytest.mark.parametrize(
    "text, expect",
    [("oldest", 0), ("1796167660570846042", 1796167660570846042), ("2026-01-01T00:00:00Z", 1767225600 * SEC), ("1h", 1000 * SEC - 3600 * SEC)],
)
def test_since_accepts_nanoseconds_times_and_durations(text, expect):
    assert parse_since(text, 1000 * SEC) == max(0, expect)


@pytest.mark.parametrize("text", ["", "yesterday", "2026-01-01T00:00:00", "-5"])
def test_since_refuses_what_it_cannot_place(text):
    with pytest.raises(ValueError):
        parse_since(text, 1000 * SEC)
