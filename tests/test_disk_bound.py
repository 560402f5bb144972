"""Bounded disk per topic, with back-pressure (issue 14, feature 2), end to
end against real pynsqd subprocesses: publishes over TCP (raw and pynsq)
and HTTP refused at the bound with exact counts, accepted again below the
low-water mark, nothing accepted lost; other topics unaffected; the bound
across kill -9 (``--sync-every=1``) and SIGTERM restarts."""

from __future__ import annotations

import json

import pytest

from helpers import RawClient, channel_stats, create_channel, drain, run_pynsq, start_nsqd
from pynsqd.client import PublishError, SyncWriter
from pynsqd.protocol import FRAME_TYPE_ERROR, encode_mpub_body

BODY = 100
RECORD = 4 + 26 + BODY  # on disk: length prefix, timestamp/attempts/id, body


def body(prefix: str, i: int) -> bytes:
    return f"{prefix}{i:06d}".encode().ljust(BODY, b".")


def pub_until_refused(d, topic: str, prefix: str, limit: int = 10000) -> tuple[list[bytes], bytes]:
    """PUB one at a time until nsqd refuses: (accepted bodies, the error frame)."""
    accepted = []
    with RawClient(d.tcp_port) as p:
        for i in range(limit):
            frame = p.pub(topic, body(prefix, i))
            if frame.frame_type == FRAME_TYPE_ERROR:
                assert p.closed_by_server(), "E_PUB_FAILED closes the connection, as in nsqd"
                return accepted, frame.data
            assert frame.data == b"OK", frame
            accepted.append(body(prefix, i))
    raise AssertionError(f"{limit} publishes to {topic} all accepted")


def refused(d, topic: str) -> list[bytes]:
    """Every kind of publish to ``topic`` is refused: the error texts."""
    out = []
    with RawClient(d.tcp_port) as p:
        out.append(p.mpub(topic, [b"x" * BODY, b"y" * BODY]).data)
    with RawClient(d.tcp_port) as p:
        p.cmd(b"DPUB", topic, "1000", body=b"z" * BODY)
        out.append(p.read_response().data)
    with RawClient(d.tcp_port) as p:
        out.append(p.pub(topic, b"w" * BODY).data)
    for path, data in ((f"/pub?topic={topic}", b"v" * BODY), (f"/mpub?topic={topic}&binary=true", encode_mpub_body([b"u" * BODY]))):
        status, reply = d.http("POST", path, data)
        assert (status, json.loads(reply)) == (503, {"message": "TOPIC_FULL"})
    return out


def take(d, topic: str, channel: str, n: int) -> list[bytes]:
    """FIN exactly ``n`` messages of the channel (RDY 1: none read ahead)."""
    out = []
    with RawClient(d.tcp_port) as c:
        c.identify(heartbeat_interval=30000)
        assert c.sub(topic, channel).data == b"OK"
        c.cmd(b"RDY", "1")
        for i in range(n):
            _, _, msg_id, data = c.read_message()
            out.append(data)
            if i == n - 1:
                c.cmd(b"RDY", "0")  # before the last FIN opens the window again
            c.cmd(b"FIN", msg_id)
        c.cmd(b"NOP")
    return out


def topic_entry(d, topic: str) -> dict:
    return next(t for t in d.stats(topic)["topics"] if t["topic_name"] == topic)


def test_publishes_are_refused_at_the_bound_and_accepted_again_below_the_low_water_mark(tmp_path, caplog):
    d = start_nsqd(str(tmp_path), "--mem-queue-size=0", "--max-disk-bytes-per-topic=20000")
    try:
        create_channel(d, "full", "c")
        accepted, error = pub_until_refused(d, "full", "a")
        # checked before each publish: the one that crosses the bound is accepted
        assert len(accepted) == -(-20000 // RECORD) == 154
        assert error == b"E_PUB_FAILED PUB failed topic full is full (20020 bytes on disk, bound 20000)"
        assert [e.split(b" ")[0] for e in refused(d, "full")] == [b"E_MPUB_FAILED", b"E_DPUB_FAILED", b"E_PUB_FAILED"]
        events = run_pynsq("write", "full", "5", "--nsqd", d.tcp_address)
        assert events[-1]["acked"] == 0 and events[-1]["errors"] == 5
        # our Writer retries a refused publish until its publish_timeout
        writer = SyncWriter([d.tcp_address], publish_timeout=0.5)
        with pytest.raises(PublishError):
            writer.pub("full", b"s" * BODY)
        writer.close(timeout=0.1)  # (its last try may still be on the wire)
        assert any("E_PUB_FAILED PUB failed topic full is full" in r.getMessage() for r in caplog.records)
        assert d.http("GET", "/ping") == (200, b"OK")  # back-pressure, not ill health
        t = topic_entry(d, "full")
        assert (t["disk_bytes"], t["max_disk_bytes"], t["disk_full"], t["backend_bytes"]) == (154 * RECORD, 20000, True, 0)
        assert t["channels"][0]["backend_bytes"] == 154 * RECORD
        assert t["message_count"] == 154

        # other topics are unaffected; one with its own bound, one without any
        create_channel(d, "other", "c")
        assert json.loads(d.http("POST", "/topic/settings?topic=other&max_disk_bytes=1000")[1])["max_disk_bytes"] == 1000
        other, _ = pub_until_refused(d, "other", "o")
        assert len(other) == -(-1000 // RECORD) == 8
        create_channel(d, "free", "c")
        assert d.http("POST", "/topic/settings?topic=free&max_disk_bytes=0")[0] == 200
        assert run_pynsq("write", "free", "200", "--nsqd", d.tcp_address, "--mpub", "50")[-1] == {"event": "done", "acked": 4, "errors": 0}
        free = topic_entry(d, "free")
        assert "disk_bytes" not in free and "backend_bytes" not in free["channels"][0]  # only where on

        # consumers bring it down: refused until at most 90% of the bound is on disk
        first = take(d, "full", "c", 15)  # 18070 bytes left
        assert refused(d, "full")[2].startswith(b"E_PUB_FAILED")
        first += take(d, "full", "c", 1)  # 17940 <= 18000
        with RawClient(d.tcp_port) as p:
            assert p.pub("full", body("b", 0)).data == b"OK"
        events = run_pynsq("write", "full", "10", "--nsqd", d.tcp_address, "--prefix", "pynsq-")
        assert events[-1] == {"event": "done", "acked": 10, "errors": 0}
        with SyncWriter([d.tcp_address]) as writer:
            writer.mpub("full", [b"sync-%d" % i for i in range(3)])
        assert topic_entry(d, "full")["disk_full"] is False

        rest = drain(d, "full", "c")
        out = first + rest
        assert len(out) == len(set(out)) == 154 + 1 + 10 + 3  # nothing accepted lost, nothing twice
        assert set(out) == set(accepted) | {body("b", 0)} | {f"pynsq-{i}".encode() for i in range(10)} | {b"sync-%d" % i for i in range(3)}
    finally:
        d.stop()


def test_the_bound_holds_across_kill_9_and_sigterm_restarts(tmp_path):
    d = start_nsqd(str(tmp_path), "--sync-every=1")
    try:
        create_channel(d, "t", "c")
        assert d.http("POST", "/topic/settings?topic=t&max_disk_bytes=2000")[0] == 200
        accepted, _ = pub_until_refused(d, "t", "a")
        assert len(accepted) == 16
    finally:
        d.kill()

    d = start_nsqd(str(tmp_path), "--sync-every=1")
    try:
        t = topic_entry(d, "t")
        assert (t["max_disk_bytes"], t["disk_bytes"], t["disk_full"]) == (2000, 16 * RECORD, True)
        assert refused(d, "t")[2].startswith(b"E_PUB_FAILED")
        out = drain(d, "t", "c")
        assert sorted(out) == accepted  # every acknowledged publish, once
        with RawClient(d.tcp_port) as p:
            assert p.pub("t", body("b", 0)).data == b"OK"
    finally:
        assert d.stop() == 0
    entry = next(t for t in json.load(open(tmp_path / "nsqd.dat"))["topics"] if t["name"] == "t")
    assert entry == {"name": "t", "paused": False, "channels": [{"name": "c", "paused": False}], "max_disk_bytes": 2000}

    d = start_nsqd(str(tmp_path), "--sync-every=1")
    try:
        assert topic_entry(d, "t")["max_disk_bytes"] == 2000
        assert channel_stats(d, "t", "c")["depth"] == 1
        # back to the daemon's default (unbounded): the key leaves nsqd.dat, the fields /stats
        assert json.loads(d.http("POST", "/topic/settings?topic=t&max_disk_bytes=default")[1]) == {"max_disk_bytes": 0, "settings": {}}
        assert "disk_bytes" not in topic_entry(d, "t")
        assert d.http("POST", "/topic/settings?topic=t") == (400, b'{"message":"MISSING_ARG_MAX_DISK_BYTES"}')
        assert d.http("POST", "/topic/settings?topic=t&max_disk_bytes=-1") == (400, b'{"message":"INVALID_ARG_MAX_DISK_BYTES"}')
        assert d.http("POST", "/topic/settings?topic=nope&max_disk_bytes=1")[0] == 404
    finally:
        d.stop()
    entry = next(t for t in json.load(open(tmp_path / "nsqd.dat"))["topics"] if t["name"] == "t")
    assert entry == {"name": "t", "paused": False, "channels": [{"name": "c", "paused": False}]}
