"""Retention and replay (issue 14, feature 4) against real pynsqd
subprocesses: a channel rewound to a point in time gets exactly what was
published since then, with the original ids and timestamps; a new channel
starts from the oldest retained message, also on a topic holding a
backlog; expiry deletes whole files and never touches the rest; settings,
retained messages and an unfinished replay survive SIGTERM and, in sync
mode, kill -9; Go nsqd still reads the queues of a retaining deployment."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from collections import Counter
from pathlib import Path

import anyio
import pytest

from helpers import (
    GO_NSQD_MISSING,
    drain,
    RawClient,
    channel_stats,
    eventually,
    go_nsq_binary,
    mpub_http,
    on_both_backends,
    run_driver,
    start_go_nsqd,
    start_nsqd,
    wait_for,
)
from pynsqd.client import Reader, Writer
from test_faults import consume_all



def post(d, path: str, expect: int = 200) -> bytes:
    status, body = d.http("POST", path)
    assert status == expect, (path, status, body)
    return body


def retention(d, topic: str) -> dict:
    return d.json(f"/topic/retention?topic={topic}")


def pynsq_read(d, topic: str, channel: str, count: int) -> list[dict]:
    events = run_driver("read", topic, channel, str(count), "--nsqd", d.tcp_address, "--max-in-flight", "50", timeout=90)
    return [e for e in events if e["event"] == "message"]


def nothing_left(d, topic: str, channel: str) -> bool:
    c = channel_stats(d, topic, channel)
    return c["depth"] == 0 and c["in_flight_count"] == 0 and c["deferred_count"] == 0 and "replay" not in c


@on_both_backends
async def test_rewind_and_a_channel_from_the_oldest_message(tmp_path):
    d = start_nsqd(str(tmp_path), "--retention-time=1h", "--mem-queue-size=100", "--log-level=info")
    try:
        post(d, "/topic/create?topic=ev")
        post(d, "/channel/create?topic=ev&channel=work")
        async with Writer([d.tcp_address]) as w:
            for i in range(0, 300, 50):
                await w.mpub("ev", [b"a-%d" % n for n in range(i, i + 50)])
            since = time.time_ns()  # the daemon stamps later publishes after this (same clock)
            for n in range(300):
                await w.pub("ev", b"b-%d" % n)
        first: dict[bytes, tuple[bytes, int]] = {}

        async def take(message) -> None:  # noqa: ANN001
            first[message.body] = (message.id, message.timestamp)

        async with Reader("ev", "work", take, nsqd_tcp_addresses=[d.tcp_address], max_in_flight=100):
            await eventually(lambda: len(first) == 600, message="600 consumed")
        await eventually(lambda: nothing_left(d, "ev", "work"), message="work drained")

        # rewound: exactly the 300 published since then, original ids and timestamps
        post(d, f"/channel/rewind?topic=ev&channel=work&since={since}")
        again: list[tuple[bytes, bytes, int, int]] = []

        async def retake(message) -> None:  # noqa: ANN001
            again.append((message.body, message.id, message.timestamp, message.attempts))

        async with Reader("ev", "work", retake, nsqd_tcp_addresses=[d.tcp_address], max_in_flight=100):
            await eventually(lambda: len(again) >= 300 and nothing_left(d, "ev", "work"), message="rewind delivered")
        assert sorted(b for b, *_ in again) == sorted(b"b-%d" % n for n in range(300))
        assert all(first[b] == (i, ts) and a == 1 for b, i, ts, a in again)

        # a new channel from the oldest retained message: all 600 (pynsq), then what comes next
        post(d, "/channel/create?topic=ev&channel=fresh&since=oldest")
        got = await anyio.to_thread.run_sync(lambda: pynsq_read(d, "ev", "fresh", 600))
        assert Counter(e["body"] for e in got) == Counter([f"a-{n}" for n in range(300)] + [f"b-{n}" for n in range(300)])
        async with Writer([d.tcp_address]) as w:
            await w.pub("ev", b"c-0")
        await eventually(lambda: channel_stats(d, "ev", "fresh")["depth"] == 1, message="the new message")
        stats = retention(d, "ev")
        assert stats["enabled"] and stats["source"] == "default" and stats["messages"] == 601
        status, metrics = d.http("GET", "/metrics")
        assert b'nsqd_topic_retained_messages{topic="ev"} 601' in metrics
    finally:
        d.stop()


def test_rewinding_needs_retention_and_a_valid_time(tmp_path):
    d = start_nsqd(str(tmp_path), "--log-level=info")
    try:
        post(d, "/topic/create?topic=plain")
        post(d, "/channel/create?topic=plain&channel=c")
        assert json.loads(post(d, "/channel/rewind?topic=plain&channel=c&since=oldest", 400)) == {"message": "RETENTION_NOT_ENABLED"}
        assert json.loads(post(d, "/channel/create?topic=plain&channel=n&since=oldest", 400)) == {"message": "RETENTION_NOT_ENABLED"}
        assert json.loads(post(d, "/channel/rewind?topic=plain&channel=nope&since=1h", 404)) == {"message": "CHANNEL_NOT_FOUND"}
        assert json.loads(post(d, "/topic/retention?topic=nope&time=1h", 404)) == {"message": "TOPIC_NOT_FOUND"}
        assert retention(d, "plain") == {"topic_name": "plain", "enabled": False, "source": "default", "time": 0, "bytes": 0}
        post(d, "/topic/retention?topic=plain&time=90m")
        assert json.loads(post(d, "/channel/rewind?topic=plain&channel=c&since=yesterday", 400)) == {"message": "INVALID_ARG_SINCE"}
        assert json.loads(post(d, "/topic/retention?topic=plain&time=soon", 400)) == {"message": "INVALID_ARG_TIME"}
        # /stats grows a retention entry only where it is on
        topics = {t["topic_name"]: t for t in d.stats()["topics"]}
        assert topics["plain"]["retention"]["time"] == 5400 * 10**9
        post(d, "/topic/create?topic=other")
        assert "retention" not in {t["topic_name"]: t for t in d.stats()["topics"]}["other"]
    finally:
        d.stop()


def test_a_channel_from_the_oldest_message_of_a_topic_holding_a_backlog_gets_each_once(tmp_path):
    """The topic kept everything for want of a channel (memory and disk):
    the first channel, created from the oldest message, gets the backlog
    once, not once from the topic and once from the replay."""
    d = start_nsqd(str(tmp_path), "--retention-bytes=100000000", "--mem-queue-size=50", "--log-level=info")
    try:
        post(d, "/topic/create?topic=held")
        bodies = [b"h-%d" % i for i in range(400)]
        with RawClient(d.tcp_port) as p:
            for i in range(0, 400, 100):
                assert p.mpub("held", bodies[i : i + 100]).data == b"OK"
        assert d.stats("held")["topics"][0]["depth"] == 400
        post(d, "/channel/create?topic=held&channel=first&since=oldest")
        got = consume_all(d, "held", "first", 400)
        assert sorted(m[3] for m in got) == sorted(bodies)
        wait_for(lambda: nothing_left(d, "held", "first"), message="nothing more")
        assert channel_stats(d, "held", "first")["message_count"] == 400
    finally:
        d.stop()


@pytest.mark.parametrize("how", ["retention_turned_off", "restart_without_the_flag"])
def test_retention_going_off_mid_replay_still_gives_what_the_replay_took_out_of_the_backlog(tmp_path, how):
    """A channel created from the oldest message of a topic holding a backlog
    gets the backlog from the replay (left out of the topic's hand-over), a
    window at a time.  Retention going off before the replay is through --
    turned off through the API, or a restart without ``--retention-time`` --
    must not lose the rest: those are published, acknowledged messages."""
    n = 12_000  # more than the replay's window (10,000): nobody consumes, so it stops there
    flags = ("--mem-queue-size=20000", "--log-level=info")
    d = start_nsqd(str(tmp_path), "--retention-time=1h", *flags)
    try:
        post(d, "/topic/create?topic=held")
        with RawClient(d.tcp_port) as p:
            for i in range(0, n, 2000):
                assert p.mpub("held", [b"h-%05d" % j for j in range(i, i + 2000)]).data == b"OK"
        post(d, "/channel/create?topic=held&channel=first&since=oldest")
        wait_for(lambda: channel_stats(d, "held", "first")["depth"] >= 10_000, message="the replay's window filled")
        assert channel_stats(d, "held", "first")["replay"]["done"] is False
        if how == "retention_turned_off":
            post(d, "/topic/retention?topic=held&time=0&bytes=0")
        else:
            assert d.stop() == 0
            d = start_nsqd(str(tmp_path), *flags)
        got = consume_all(d, "held", "first", n, timeout=30)
        assert sorted(m[3] for m in got) == [b"h-%05d" % i for i in range(n)]
        wait_for(lambda: nothing_left(d, "held", "first"), message="nothing more")
    finally:
        d.stop()
    if how == "retention_turned_off":
        assert not _files(tmp_path, "held")  # off through the API: the log goes, once given
    else:
        assert _files(tmp_path, "held")  # a forgotten flag deletes no history
    assert not list(tmp_path.glob("*.pynsqd-replay.json"))


def test_an_index_that_does_not_parse_or_adds_up_is_not_believed(tmp_path):
    """The log's index is a hint: an entry that does not parse, or says a
    sealed file holds nothing, means the files are scanned -- the daemon
    neither refuses to start nor deletes the file it got wrong."""
    flags = ("--log-level=info", "--max-bytes-per-file=100000")  # a file per MPUB
    d = start_nsqd(str(tmp_path), *flags)
    try:
        post(d, "/topic/create?topic=t")
        post(d, "/topic/retention?topic=t&time=1h")
        with RawClient(d.tcp_port) as p:
            for i in range(10):
                assert p.mpub("t", [b"%04d" % (i * 100 + j) + b"x" * 4000 for j in range(100)]).data == b"OK"
        kept = retention(d, "t")
        assert kept["files"] > 2
    finally:
        assert d.stop() == 0
    index = tmp_path / "t.pynsqd-retention.index"
    for lie in ("x", 0):
        entries = json.loads(index.read_text())
        entries["segments"][0]["count"] = lie
        index.write_text(json.dumps(entries))
        d = start_nsqd(str(tmp_path), *flags)
        try:
            assert {k: retention(d, "t")[k] for k in ("messages", "files", "disk_bytes")} == {k: kept[k] for k in ("messages", "files", "disk_bytes")}
        finally:
            assert d.stop() == 0


def test_a_replay_cursor_that_is_no_position_is_ignored_not_fatal(tmp_path):
    d = start_nsqd(str(tmp_path), "--retention-time=1h", "--log-level=info")
    try:
        post(d, "/topic/create?topic=t")
        post(d, "/channel/create?topic=t&channel=c")
        with RawClient(d.tcp_port) as p:
            assert p.mpub("t", [b"a", b"b", b"c"]).data == b"OK"
    finally:
        assert d.stop() == 0
    cursor = {"version": 1, "since": 0, "next": [0], "end": [0, 99], "ids": ["", ""], "dropped_max": "", "replayed": 0, "done": False}
    (tmp_path / "t:c.pynsqd-replay.json").write_text(json.dumps(cursor))
    d = start_nsqd(str(tmp_path), "--retention-time=1h", "--log-level=info")
    try:
        assert sorted(m[3] for m in consume_all(d, "t", "c", 3)) == [b"a", b"b", b"c"]
        assert d.proc.poll() is None and any("ignoring unreadable replay cursor" in line for line in d.lines)
    finally:
        assert d.stop() == 0


def _files(path: Path, topic: str) -> dict[str, str]:
    prefix = f"{topic}.pynsqd-retention."
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir()) if p.name.startswith(prefix) and p.name.endswith(".dat")}


def test_expiry_deletes_whole_files_oldest_first_and_never_rewrites(tmp_path):
    d = start_nsqd(str(tmp_path), "--log-level=info")
    try:
        post(d, "/topic/create?topic=sized")
        post(d, "/channel/create?topic=sized&channel=sink")  # so the topic holds no backlog of its own
        post(d, "/topic/retention?topic=sized&bytes=40000")  # files of 5000 bytes
        post(d, "/topic/create?topic=timed")
        post(d, "/topic/retention?topic=timed&time=2s")
        bodies = [b"%04d-" % i + b"x" * 95 for i in range(1000)]  # 130 bytes a record
        with RawClient(d.tcp_port) as p:
            for body in bodies:
                p.cmd(b"PUB", "sized", body=body)
            for _ in bodies:
                assert p.read_response().data == b"OK"
            assert p.mpub("timed", bodies[:50]).data == b"OK"
        written = _files(tmp_path, "sized")

        def expired() -> dict | None:
            st = retention(d, "sized")
            return st if st["disk_bytes"] <= 40000 + 5000 else None

        st = wait_for(expired, timeout=20, message="bytes bound kept")
        kept = _files(tmp_path, "sized")
        assert set(kept) < set(written) and all(kept[name] == written[name] for name in kept)  # untouched
        assert sorted(kept) == sorted(written)[-len(kept) :]  # the newest stay
        assert sum((tmp_path / n).stat().st_size for n in kept) == st["disk_bytes"]
        # the oldest retained message begins a file, and a replay gives exactly the rest
        post(d, "/channel/create?topic=sized&channel=all&since=oldest")
        got = consume_all(d, "sized", "all", st["messages"])
        assert [m[3] for m in got] == bodies[-st["messages"] :]
        assert int(got[0][3][:4]) % 38 == 0  # 38 records fit a 5000-byte file

        # the time bound: gone once older than 2 s (in whole files, within an eighth more and a tick)
        assert retention(d, "timed")["messages"] == 50
        wait_for(lambda: retention(d, "timed")["messages"] == 0, timeout=20, message="time bound kept")
        assert _files(tmp_path, "timed") == {}
    finally:
        d.stop()


def test_settings_retained_messages_and_an_unfinished_replay_survive_sigterm(tmp_path):
    n = 25_000  # more than a replay puts in a channel at once (10,000)
    d = start_nsqd(str(tmp_path), "--log-level=info")
    post(d, "/topic/create?topic=keep")
    post(d, "/topic/retention?topic=keep&time=24h&bytes=1000000000")
    post(d, "/channel/create?topic=keep&channel=live")
    bodies = [b"k-%05d" % i for i in range(n)]
    mpub_http(d, "keep", bodies, chunk=1000)
    post(d, "/channel/create?topic=keep&channel=late&since=oldest")
    wait_for(lambda: channel_stats(d, "keep", "late")["depth"] >= 10_000, message="replay under way")
    assert not channel_stats(d, "keep", "late")["replay"]["done"]
    assert d.stop() == 0
    meta = json.loads((tmp_path / "nsqd.dat").read_text())
    assert meta["topics"][0]["retention"] == {"time": 24 * 3600 * 10**9, "bytes": 1000000000}

    d = start_nsqd(str(tmp_path), "--log-level=info")
    try:
        st = retention(d, "keep")
        assert st["source"] == "topic" and st["messages"] == n
        got = consume_all(d, "keep", "late", n, timeout=120)
        assert sorted(m[3] for m in got) == bodies  # each once: the cursor was saved after the queue
        wait_for(lambda: nothing_left(d, "keep", "late"), message="replay finished and forgotten")
        assert not (tmp_path / "keep:late.pynsqd-replay.json").exists()
        assert channel_stats(d, "keep", "live")["depth"] == n
    finally:
        d.stop()


def test_sync_mode_kill_9_keeps_every_acknowledged_retained_message_and_the_replay(tmp_path):
    n = 15_000
    flags = ("--sync-every=1", "--retention-time=1h", "--log-level=info")
    d = start_nsqd(str(tmp_path), *flags)
    post(d, "/topic/create?topic=durable")
    post(d, "/channel/create?topic=durable&channel=work")
    bodies = [b"d-%05d" % i for i in range(n)]
    mpub_http(d, "durable", bodies, chunk=500)
    assert sorted(m[3] for m in consume_all(d, "durable", "work", n, timeout=120)) == bodies
    post(d, "/channel/rewind?topic=durable&channel=work&since=oldest")
    wait_for(lambda: channel_stats(d, "durable", "work")["depth"] >= 10_000, message="replay under way")
    d.kill()

    d = start_nsqd(str(tmp_path), *flags)
    try:
        assert retention(d, "durable")["messages"] == n
        got: list[bytes] = []
        while not nothing_left(d, "durable", "work"):
            got += drain(d, "durable", "work", timeout=120)
        assert set(got) == set(bodies)
        # at least once: at most the step being saved when the kill came is given twice
        assert len(got) - n <= 1000
        # and the whole history is still there for the next rewind
        post(d, "/channel/create?topic=durable&channel=audit&since=oldest")
        assert sorted(m[3] for m in consume_all(d, "durable", "audit", n, timeout=120)) == bodies
    finally:
        d.stop()


@pytest.mark.skipif(go_nsq_binary("nsqd") is None, reason=GO_NSQD_MISSING)
def test_go_nsqd_reads_the_queues_of_a_retaining_deployment(tmp_path):
    d = start_nsqd(str(tmp_path), "--retention-time=1h", "--mem-queue-size=10", "--log-level=info")
    post(d, "/topic/create?topic=g")
    post(d, "/channel/create?topic=g&channel=c")
    bodies = [b"g-%d" % i for i in range(200)]
    with RawClient(d.tcp_port) as p:
        assert p.mpub("g", bodies).data == b"OK"
    consume_all(d, "g", "c", 200)
    post(d, "/channel/rewind?topic=g&channel=c&since=oldest")
    wait_for(lambda: channel_stats(d, "g", "c")["depth"] == 200, message="replayed")
    post(d, "/topic/retention?topic=g&time=2h")
    assert d.stop() == 0
    assert any(name.startswith("g.pynsqd-retention.") for name in os.listdir(tmp_path))
    go = start_go_nsqd(str(tmp_path))
    try:
        got = consume_all(go, "g", "c", 200)
        assert sorted(m[3] for m in got) == sorted(bodies)
    finally:
        go.stop(signal.SIGTERM)


async def test_a_deleted_channels_cursor_write_never_spoils_the_cursor_of_a_channel_recreated_under_its_name(tmp_path, monkeypatch):
    """In-process, to hold the window open: a cursor write of channel c is in
    its worker thread when c is deleted and created again with a rewind of its
    own; the old write ends after the new one.  The file must be the new
    channel's cursor -- neither the old one's nor gone."""
    import threading

    import trio

    from pynsqd import replay as replay_mod
    from pynsqd.nsqd import NSQD
    from pynsqd.options import Options

    real = replay_mod.write_atomically
    started, release = threading.Event(), threading.Event()
    calls = []

    def slow_first(path: str, data: bytes) -> None:
        calls.append(data)
        if len(calls) == 1:
            started.set()
            release.wait(10)
        real(path, data)

    monkeypatch.setattr(replay_mod, "write_atomically", slow_first)
    nsqd = NSQD(Options(tcp_address="127.0.0.1:0", http_address="127.0.0.1:0", data_path=str(tmp_path), lookupd_tcp_addresses=[], retention_time=3600.0))
    async with trio.open_nursery() as nursery:
        await nursery.start(nsqd.run)
        topic = nsqd.get_topic("t")
        old = topic.get_channel("c")
        old.replay = nsqd.retention.rewind(topic, old, 0)
        old_saved = trio.Event()

        async def save_old() -> None:
            await replay_mod.save_cursor(nsqd, topic, old)
            old_saved.set()

        nursery.start_soon(save_old)
        assert await trio.to_thread.run_sync(started.wait, 10)
        topic.delete_existing_channel("c")
        new = topic.get_channel("c")
        assert new is not old
        new.replay = nsqd.retention.rewind(topic, new, 123)
        with trio.move_on_after(10) as waiting:
            async with trio.open_nursery() as saves:
                saves.start_soon(replay_mod.save_cursor, nsqd, topic, new)
                await trio.sleep(0.2)  # (not for synchronisation: gives the new write its chance to go first)
                release.set()
                await old_saved.wait()
        assert not waiting.cancelled_caught
        path = replay_mod.cursor_path(nsqd, topic, new)
        assert os.path.exists(path), "the recreated channel's cursor was unlinked by the old channel's write"
        assert replay_mod.Replay.load(path).since == 123
        nursery.cancel_scope.cancel()
