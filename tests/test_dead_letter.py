"""Dead-letter topics (issue 14, feature 1), end to end against real pynsqd
subprocesses: server-side max attempts with our Reader and pynsq, the
origins kept beside the dead-letter topic, moving dead letters back, and
all of it across a SIGTERM restart and (``--sync-every=1``) kill -9."""

from __future__ import annotations

import collections
import json
import os
import random
import socket
import time

import trio

from helpers import RawClient, channel_stats, create_channel, run_pynsq, start_nsqd, wait_for
from test_faults import small_disk  # noqa: F401 - a fixture: a 20 MB tmpfs
from pynsqd.client import Message, Reader


def post(d, path: str) -> dict:
    status, body = d.http("POST", path)
    assert status == 200, (path, status, body)
    return json.loads(body) if body else {}


def topic_stats(d, topic: str) -> dict:
    return next(t for t in d.stats(topic)["topics"] if t["topic_name"] == topic)


def consume(d, topic: str, channel: str, answer: str = "FIN", rdy: int = 100, idle: float = 1.0, limit: int = 100000) -> list[tuple[int, bytes, bytes]]:
    """(attempts, id, body) of every message the channel delivers until none
    comes for ``idle`` s (or ``limit`` came); each answered with ``answer``
    (FIN, REQ, or HOLD: none)."""
    out = []
    with RawClient(d.tcp_port) as c:
        c.identify(heartbeat_interval=30000)
        assert c.sub(topic, channel).data == b"OK"
        c.cmd(b"RDY", str(rdy))
        while len(out) < limit:
            try:
                _, attempts, msg_id, body = c.read_message(timeout=idle)
            except TimeoutError:
                break
            out.append((attempts, msg_id, body))
            if answer == "FIN":
                c.cmd(b"FIN", msg_id)
            elif answer == "REQ":
                c.cmd(b"REQ", msg_id, "0")
            # else hold it: requeued when the connection closes
        c.cmd(b"NOP")
    return out


async def test_poison_messages_are_dead_lettered_after_max_attempts_and_moved_back(tmp_path):
    d = start_nsqd(str(tmp_path), "--max-attempts=3")  # the daemon-wide default
    try:
        create_channel(d, "jobs", "work")
        create_channel(d, "jobs", "audit")
        # a channel turns the default off for itself: 0 = redeliver forever, as nsqd
        assert post(d, "/channel/settings?topic=jobs&channel=audit&max_attempts=0")["max_attempts"] == 0
        # the dead-letter topic is an ordinary topic, with ordinary channels
        create_channel(d, "jobs.dead", "inspect")
        create_channel(d, "jobs.dead", "retry")
        for prefix in ("ok-", "poison-"):
            events = run_pynsq("write", "jobs", "10", "--nsqd", d.tcp_address, "--prefix", prefix)
            assert events[-1] == {"event": "done", "acked": 10, "errors": 0}

        deliveries: collections.Counter[bytes] = collections.Counter()
        gave_up: list[bytes] = []
        failing = True

        async def handler(message: Message) -> None:
            deliveries[message.body] += 1
            if failing and message.body.startswith(b"poison-"):
                raise ValueError("cannot process")

        # the Reader keeps its default max_attempts (5): the channel's 3 come first
        options = dict(nsqd_tcp_addresses=[d.tcp_address], max_in_flight=5, default_requeue_delay=0, max_backoff_duration=0, on_give_up=gave_up.append)
        async with Reader("jobs", "work", handler, **options) as reader:
            with trio.fail_after(60):  # a condition polled, with a deadline
                while not (channel_stats(d, "jobs", "work")["dead_letter_count"] == 10 and reader.stats().messages_finished == 10):
                    await trio.sleep(0.05)
        poison = {b"poison-%d" % i for i in range(10)}
        assert {body: n for body, n in deliveries.items() if body in poison} == {body: 3 for body in poison}
        assert gave_up == []  # never delivered a 4th time, so the client never gave up
        work = channel_stats(d, "jobs", "work")
        assert (work["max_attempts"], work["dead_letter_topic"], work["dead_letter_count"]) == (3, "jobs.dead", 10)
        assert (work["depth"], work["in_flight_count"], work["requeue_count"]) == (0, 0, 30)
        audit = channel_stats(d, "jobs", "audit")
        assert audit["depth"] == 20 and "max_attempts" not in audit and "dead_letter_count" not in audit

        # pynsq consumes the dead letters unchanged: same bodies, fresh attempts
        events = await trio.to_thread.run_sync(lambda: run_pynsq("read", "jobs.dead", "inspect", "10", "--nsqd", d.tcp_address))
        got = [e for e in events if e["event"] == "message"]
        assert sorted(e["body"] for e in got) == sorted(b.decode() for b in poison)
        assert {e["attempts"] for e in got} == {1}
        for e in got:  # what the move lost, found by the dead letter's id
            origin = d.json(f"/dead_letter/message?topic=jobs.dead&id={e['id']}")
            assert (origin["topic"], origin["channel"], origin["attempts"]) == ("jobs", "work", 3)
            assert len(origin["message_id"]) == 16 and origin["message_id"] != e["id"]
            assert origin["timestamp"] <= origin["dead_lettered_at"] <= time.time_ns()
        assert d.http("GET", "/dead_letter/message?topic=jobs.dead&id=0000000000000000") == (404, b'{"message":"MESSAGE_NOT_FOUND"}')

        # back into the channel they came from (not the topic: audit has its copies)
        assert post(d, "/dead_letter/requeue?topic=jobs.dead&channel=retry") == {"moved": 10, "kept": 0}
        failing = False
        deliveries.clear()
        async with Reader("jobs", "work", handler, **options) as reader:
            with trio.fail_after(60):
                while reader.stats().messages_finished < 10:
                    await trio.sleep(0.05)
        assert deliveries == {body: 1 for body in poison}
        assert channel_stats(d, "jobs", "work")["dead_letter_count"] == 10
        assert channel_stats(d, "jobs", "audit")["depth"] == 20
        assert channel_stats(d, "jobs.dead", "retry")["depth"] == 0
        # every channel of the dead-letter topic is done with them: their origins go
        assert d.json("/dead_letter/messages?topic=jobs.dead")["count"] == 0
    finally:
        d.stop()


def test_dead_letter_settings_and_origins_survive_a_sigterm_restart(tmp_path):
    d = start_nsqd(str(tmp_path))
    try:
        create_channel(d, "t", "c")
        assert post(d, "/channel/settings?topic=t&channel=c&max_attempts=2&dead_letter_topic=failed")["dead_letter_topic"] == "failed"
        with RawClient(d.tcp_port) as p:
            assert p.mpub("t", [b"a%d" % i for i in range(3)]).data == b"OK"
        assert len(consume(d, "t", "c", "REQ", limit=6)) == 6  # twice each: dead letters
        wait_for(lambda: channel_stats(d, "t", "c")["dead_letter_count"] == 3)
        with RawClient(d.tcp_port) as p:
            assert p.mpub("t", [b"b%d" % i for i in range(3)]).data == b"OK"
        assert len(consume(d, "t", "c", "HOLD", rdy=3, limit=3)) == 3  # once each, back in the queue
        origins = d.json("/dead_letter/messages?topic=failed")["messages"]
        assert len(origins) == 3
    finally:
        assert d.stop() == 0
    meta = json.load(open(tmp_path / "nsqd.dat"))
    entry = next(t for t in meta["topics"] if t["name"] == "t")["channels"][0]
    assert entry == {"name": "c", "paused": False, "max_attempts": 2, "dead_letter_topic": "failed"}

    d = start_nsqd(str(tmp_path))
    try:
        c = channel_stats(d, "t", "c")
        assert (c["max_attempts"], c["dead_letter_topic"], c["depth"]) == (2, "failed", 3)
        assert d.json("/dead_letter/messages?topic=failed")["messages"] == origins
        # lowered to 1: the b's, delivered once before the restart, are moved
        # when read back from disk, never delivered again
        post(d, "/channel/settings?topic=t&channel=c&max_attempts=1")
        assert consume(d, "t", "c", idle=0.5) == []
        wait_for(lambda: topic_stats(d, "failed")["depth"] == 6)
        # onto the topic this time: every channel of it, a new one included
        create_channel(d, "t", "new")
        assert post(d, "/dead_letter/requeue?topic=failed&to=topic") == {"moved": 6, "kept": 0}
        assert channel_stats(d, "t", "new")["depth"] == 6
        back = consume(d, "t", "c")
        assert sorted(body for _, _, body in back) == [b"a0", b"a1", b"a2", b"b0", b"b1", b"b2"]
        assert {attempts for attempts, _, _ in back} == {1}
        assert channel_stats(d, "t", "c")["dead_letter_count"] == 3
        # back to the daemon's default (off): the key leaves nsqd.dat
        assert post(d, "/channel/settings?topic=t&channel=c&max_attempts=default&dead_letter_topic=default")["settings"] == {}
        assert "max_attempts" not in channel_stats(d, "t", "c")
    finally:
        d.stop()
    meta = json.load(open(tmp_path / "nsqd.dat"))
    assert next(t for t in meta["topics"] if t["name"] == "t")["channels"] == [{"name": "c", "paused": False}, {"name": "new", "paused": False}]


def test_moving_back_more_than_is_queued_counts_each_message_once_and_ends(tmp_path):
    """``n`` beyond what the dead-letter topic holds: the messages that stay
    (published there directly) go back to the tail of its queue, and are
    neither taken again and again nor counted once per lap."""
    d = start_nsqd(str(tmp_path), "--max-attempts=1")
    try:
        create_channel(d, "t", "c")
        with RawClient(d.tcp_port) as p:
            assert p.pub("t", b"poison").data == b"OK"
            assert p.mpub("t.dead", [b"direct-%d" % i for i in range(3)]).data == b"OK"
        assert len(consume(d, "t", "c", "REQ", limit=1)) == 1
        wait_for(lambda: topic_stats(d, "t.dead")["depth"] == 4)  # no channel yet: the topic's own queue
        assert post(d, "/dead_letter/requeue?topic=t.dead&n=100000") == {"moved": 1, "kept": 3}
        create_channel(d, "t.dead", "dl")
        wait_for(lambda: channel_stats(d, "t.dead", "dl")["depth"] == 3)
        assert post(d, f"/dead_letter/requeue?topic=t.dead&channel=dl&n={1 << 62}") == {"moved": 0, "kept": 3}
        assert sorted(body for _, _, body in consume(d, "t.dead", "dl", idle=0.5)) == [b"direct-0", b"direct-1", b"direct-2"]
        assert [body for _, _, body in consume(d, "t", "c", idle=0.5)] == [b"poison"]
    finally:
        d.stop()


def test_sync_mode_kill_9_during_dead_lettering_and_moving_back_loses_and_duplicates_nothing(tmp_path):
    """Every message ends up exactly once in its channel or the dead-letter
    topic, whenever kill -9 lands (while messages are being moved there, then
    while they are being moved back)."""
    n = 300
    bodies = {b"m%03d" % i for i in range(n)}
    flags = ("--sync-every=1", "--max-attempts=1", "--log-level=info")
    rng = random.Random(os.environ.get("CRASH_SEED"))
    d = start_nsqd(str(tmp_path), *flags)
    try:
        create_channel(d, "t", "c")
        with RawClient(d.tcp_port) as p:
            for i in range(0, n, 100):
                assert p.mpub("t", sorted(bodies)[i : i + 100]).data == b"OK"
        # every delivery is REQ'd, so dead-lettered; killed part-way through
        with RawClient(d.tcp_port) as c:
            c.identify(heartbeat_interval=30000)
            assert c.sub("t", "c").data == b"OK"
            c.cmd(b"RDY", "50")
            for _ in range(rng.randrange(50, n)):
                c.cmd(b"REQ", c.read_message()[2], "0")
            time.sleep(rng.random() * 0.05)
            d.kill()
    finally:
        d.kill()
    logs = d.lines

    d = start_nsqd(str(tmp_path), *flags)
    try:
        post(d, "/channel/pause?topic=t&channel=c")  # what is moved back stays queued
        with socket.create_connection(("127.0.0.1", d.http_port)) as s:
            to = rng.choice([b"channel", b"topic"])  # into c, or onto t (then c)
            s.sendall(b"POST /dead_letter/requeue?topic=t.dead&to=%s HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n" % to)
            time.sleep(rng.random() * 0.03)
            d.kill()  # a move back, killed part-way (or not yet begun, or done)
    finally:
        d.kill()
    logs += d.lines

    d = start_nsqd(str(tmp_path), "--sync-every=1", "--log-level=info")  # no max attempts: count everything out
    try:
        post(d, "/channel/unpause?topic=t&channel=c")
        in_channel = [body for _, _, body in consume(d, "t", "c")]
        create_channel(d, "t.dead", "count")
        dead = [body for _, _, body in consume(d, "t.dead", "count")]
    finally:
        d.stop()
    everything = in_channel + dead
    seen = collections.Counter(everything)
    report = f"twice: {sorted(b for b, k in seen.items() if k > 1)}, lost: {sorted(bodies - set(seen))}, logs:\n" + "\n".join(
        line for line in logs + d.lines if "dead" in line or "crash" in line or "journal" in line
    )
    assert len(everything) == len(set(everything)), report
    assert set(everything) == bodies, report


def test_dead_letters_wait_in_their_channel_while_the_disk_is_full(small_disk):
    """A dead-letter topic that cannot take the messages (ENOSPC) leaves them
    in their channel, tried again until it can: none dropped, none twice."""
    data = small_disk / "data"
    data.mkdir()
    d = start_nsqd(str(data), "--mem-queue-size=0", "--max-attempts=1")
    try:
        create_channel(d, "t", "c")
        bodies = [b"%03d-" % i + b"x" * 996 for i in range(50)]
        with RawClient(d.tcp_port) as p:
            assert p.mpub("t", bodies).data == b"OK"
        filler = small_disk / "filler"
        with open(filler, "wb") as fh:  # every last block taken
            try:
                while True:
                    fh.write(b"\0" * 65536)
                    fh.flush()
            except OSError:
                pass
        assert len(consume(d, "t", "c", "REQ", rdy=50, limit=50)) == 50
        wait_for(lambda: d.http("GET", "/ping")[0] == 500, message="/ping NOK")
        wait_for(lambda: channel_stats(d, "t", "c")["deferred_count"] == 50, message="the messages back in their channel")
        # a look at the channel names them as waiting for their dead-letter topic, not for a delivery
        waiting = d.json("/channel/peek?topic=t&channel=c&count=100&include_deferred=true")["deferred"]
        assert len(waiting) == 50 and {m["dead_letter_topic"] for m in waiting} == {"t.dead"}
        assert channel_stats(d, "t", "c")["dead_letter_count"] == 0
        filler.unlink()
        wait_for(lambda: channel_stats(d, "t", "c")["dead_letter_count"] == 50, timeout=30, message="moved once there is room")
        c = channel_stats(d, "t", "c")
        assert (c["depth"], c["deferred_count"], c["in_flight_count"]) == (0, 0, 0)
        wait_for(lambda: d.http("GET", "/ping") == (200, b"OK"))
        create_channel(d, "t.dead", "count")
        dead = [body for _, _, body in consume(d, "t.dead", "count")]
        assert sorted(dead) == bodies
    finally:
        d.stop()


def test_the_original_id_of_a_dead_letter_is_found_where_it_went(tmp_path):
    """``/message/find`` asked for the id a channel knew a message by, after
    the channel dead-lettered it: where it went (topic, new id, when, attempts),
    not ``not_found``; ``/dead_letter/message`` takes that id too."""
    d = start_nsqd(str(tmp_path), "--max-attempts=1")
    try:
        create_channel(d, "t", "c")
        create_channel(d, "t", "other")
        with RawClient(d.tcp_port) as p:
            assert p.pub("t", b"poison").data == b"OK"
        [(_, original, _)] = consume(d, "t", "c", "REQ", limit=1)
        wait_for(lambda: channel_stats(d, "t", "c")["dead_letter_count"] == 1)
        [origin] = d.json("/dead_letter/messages?topic=t.dead")["messages"]
        assert origin["message_id"] == original.decode()
        where = {
            "state": "dead_lettered", "dead_letter_topic": "t.dead", "dead_letter_id": origin["id"],
            "dead_lettered_at": origin["dead_lettered_at"], "attempts": 1, "timestamp": origin["timestamp"],
        }
        found = d.json(f"/message/find?topic=t&channel=c&id={original.decode()}")
        assert found["channels"] == [{"channel_name": "c", **where}]
        # asked on every channel: the other one still holds its copy
        states = {c["channel_name"]: c["state"] for c in d.json(f"/message/find?topic=t&id={original.decode()}")["channels"]}
        assert states == {"c": "dead_lettered", "other": "queued"}
        assert d.json(f"/dead_letter/message?topic=t.dead&original_id={original.decode()}") == {"count": 1, "messages": [origin]}
        assert d.http("GET", "/dead_letter/message?topic=t.dead&original_id=0000000000000000") == (404, b'{"message":"MESSAGE_NOT_FOUND"}')
        assert d.http("GET", "/dead_letter/message?topic=t.dead&original_id=xyz")[0] == 400
        # moved back (under a new id): nothing is said about the old one any more
        assert post(d, "/dead_letter/requeue?topic=t.dead") == {"moved": 1, "kept": 0}
        assert d.json(f"/message/find?topic=t&channel=c&id={original.decode()}")["channels"][0]["state"] == "not_found"
    finally:
        d.stop()


def test_origins_of_a_retaining_dead_letter_topic_are_kept_while_a_rewind_can_bring_them_back(tmp_path):
    """Every channel of a dead-letter topic that retains finished its dead
    letters: their origins stay (over a restart too) as long as the messages
    are retained, so a rewound channel's copies still move back; they go when
    retention lets the messages go."""
    d = start_nsqd(str(tmp_path), "--max-attempts=1")
    try:
        create_channel(d, "t", "c")
        create_channel(d, "t.dead", "dl")
        post(d, "/topic/retention?topic=t.dead&time=1h")
        with RawClient(d.tcp_port) as p:
            assert p.mpub("t", [b"p%d" % i for i in range(3)]).data == b"OK"
        assert len(consume(d, "t", "c", "REQ", limit=3)) == 3
        wait_for(lambda: channel_stats(d, "t", "c")["dead_letter_count"] == 3)
        assert len(consume(d, "t.dead", "dl", limit=3)) == 3  # FIN: every channel of t.dead is done with them
        wait_for(lambda: channel_stats(d, "t.dead", "dl")["in_flight_count"] == 0)
        origins = d.json("/dead_letter/messages?topic=t.dead")["messages"]
        assert len(origins) == 3
    finally:
        assert d.stop() == 0
    d = start_nsqd(str(tmp_path), "--max-attempts=1")
    try:
        assert d.json("/dead_letter/messages?topic=t.dead")["messages"] == origins
        post(d, "/channel/rewind?topic=t.dead&channel=dl&since=oldest")
        wait_for(lambda: channel_stats(d, "t.dead", "dl")["depth"] == 3)
        assert post(d, "/dead_letter/requeue?topic=t.dead&channel=dl") == {"moved": 3, "kept": 0}
        assert sorted(body for _, _, body in consume(d, "t", "c")) == [b"p0", b"p1", b"p2"]
        # still retained (another rewind would bring them back): still known
        assert d.json("/dead_letter/messages?topic=t.dead")["count"] == 3
        post(d, "/topic/retention?topic=t.dead&time=0&bytes=0")  # the history goes, and with it the origins
        wait_for(lambda: d.json("/dead_letter/messages?topic=t.dead")["count"] == 0)
    finally:
        d.stop()
