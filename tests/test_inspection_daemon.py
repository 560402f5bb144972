"""Inspecting queued messages without consuming them (issue 14, feature 3),
against real pynsqd subprocesses: a channel holding a million messages on
disk answers peeks and id lookups in bounded cost and ends up exactly as a
twin daemon that was never looked at; memory, disk, deferred and in-flight
messages as pynsq and our Reader then receive them; the same answers after a
SIGTERM restart and, in sync mode, a kill -9; and a data directory whose
daemon only ever looked stays Go nsqd's."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import signal
import time
from pathlib import Path

import anyio
import pytest

from helpers import (
    GO_NSQD_MISSING,
    RawClient,
    channel_stats,
    eventually,
    go_nsq_binary,
    on_both_backends,
    run_driver,
    start_go_nsqd,
    start_nsqd,
    wait_for,
)
from pynsqd.client import Reader
from pynsqd.disk_queue import DiskQueue
from pynsqd.guid import GuidFactory
from pynsqd.protocol import MESSAGE_RECORD_PREFIX
from test_faults import confirm, subscriber

MILLION = 1_000_000


def peek(d, topic: str, channel: str | None = None, **args: object) -> dict:
    q = "&".join(f"{k}={v}" for k, v in {"topic": topic, **({"channel": channel} if channel else {}), **args}.items())
    return d.json(f"/{'channel' if channel else 'topic'}/peek?{q}")


def find(d, topic: str, msg_id: bytes | str, channel: str | None = None) -> dict:
    ident = msg_id.decode() if isinstance(msg_id, bytes) else msg_id
    return d.json(f"/message/find?topic={topic}&id={ident}" + (f"&channel={channel}" if channel else ""))


def read_in_order(d, topic: str, channel: str, count: int) -> list[tuple[int, bytes, bytes]]:
    """(attempts, id, body) of the next ``count`` deliveries, in order, each FINed."""
    c = subscriber(d, topic, channel, rdy=min(count, 500))
    out = []
    try:
        while len(out) < count:
            _, attempts, msg_id, body = c.read_message(timeout=20)
            out.append((attempts, msg_id, body))
            c.cmd(b"FIN", msg_id)
            if len(out) == count:
                c.cmd(b"RDY", "0")
        confirm(c)
    finally:
        c.close()
    return out


def dpub_and_hold(d, topic: str, channel: str, body: bytes, hold: int) -> tuple[RawClient, list]:
    """One message deferred ten minutes, then ``hold`` messages kept in flight by a consumer."""
    with RawClient(d.tcp_port) as p:
        p.cmd(b"DPUB", topic, "600000", body=body)
        assert p.read_response().data == b"OK"
    holder = subscriber(d, topic, channel, rdy=hold)
    held = [holder.read_message() for _ in range(hold)]
    holder.cmd(b"RDY", "0")
    confirm(holder)
    return holder, held


def tree(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir()) if p.is_file()}


# ---------------------------------------------------------------- a million messages on disk


@pytest.fixture(scope="module")
def million(tmp_path_factory):
    """A data directory whose channel holds 1,000,000 tiny messages on disk,
    written with the project's own DiskQueue (seconds, not minutes of MPUB)."""
    path = tmp_path_factory.mktemp("million")
    (path / "nsqd.dat").write_text(json.dumps({"topics": [{"name": "big", "paused": False, "channels": [{"name": "c", "paused": False}]}], "version": "1.3.0"}))
    q = DiskQueue("big:c", str(path), max_bytes_per_file=104857600, min_msg_size=26, max_msg_size=1048576 + 26, sync_every=1 << 30)
    guid = GuidFactory(7)
    ts = time.time_ns()
    prefix = MESSAGE_RECORD_PREFIX.pack(ts, 0)
    ids: list[bytes] = []
    for start in range(0, MILLION, 50_000):
        batch = guid.new_ids(50_000)
        ids += batch
        q.put_many([prefix + i + b"%06d" % (start + n) for n, i in enumerate(batch)])
    q.close()
    return path, ids


def test_peek_and_find_on_a_million_messages_on_disk_are_bounded_and_change_nothing(million, tmp_path):
    src, ids = million
    looked, twin = tmp_path / "looked", tmp_path / "twin"
    shutil.copytree(src, looked)
    shutil.copytree(src, twin)
    a = start_nsqd(str(looked), "--log-level=info")
    b = start_nsqd(str(twin), "--log-level=info")
    try:
        for d in (a, b):
            wait_for(lambda d=d: channel_stats(d, "big", "c")["depth"] == MILLION, message="the million loaded")
        before = tree(looked)

        t0 = time.monotonic()
        seen = peek(a, "big", "c", count=1000, body_limit=3, include_deferred="true", include_in_flight="true")
        peek_time = time.monotonic() - t0
        assert [m["id"].encode() for m in seen["queued"]] == ids[:1000]
        assert seen["queued"][5]["body_preview"] == "000" and seen["queued"][5]["body_truncated"] is True
        assert seen["depth"] == MILLION and seen["more"] is True and seen["deferred"] == [] and seen["in_flight"] == []
        # bounded: the records shown (and one looked ahead at), never the queue
        assert seen["examined"]["records"] <= 1001 and seen["examined"]["bytes"] <= 1001 * 32 + 65536

        t0 = time.monotonic()
        first = find(a, "big", ids[987_654], "c")  # builds the queue's id index (a worker thread)
        first_time = time.monotonic() - t0
        (hit,) = first["channels"]
        assert (hit["state"], hit["where"], base64.b64decode(hit["body"])) == ("queued", "disk", b"987654")
        again = find(a, "big", ids[123_456], "c")
        assert again["channels"][0]["state"] == "queued"
        # once indexed: one block of at most 4096 records read per lookup
        assert again["examined"]["records"] <= 4096 and again["examined"]["index_blocks"] <= MILLION // 4096 + 1
        assert find(a, "big", "0000000000000001", "c")["channels"][0]["state"] == "not_found"
        # generous wall-clock ceilings (a loaded 2-core machine); the counts above are the real bound
        assert peek_time < 5 and first_time < 30

        # nothing changed: files, stats, and what is delivered next
        assert tree(looked) == before == tree(twin)
        keys = ("depth", "backend_depth", "in_flight_count", "deferred_count", "message_count", "requeue_count", "timeout_count")
        sa, sb = channel_stats(a, "big", "c"), channel_stats(b, "big", "c")
        assert {k: sa[k] for k in keys} == {k: sb[k] for k in keys}
        got_a, got_b = read_in_order(a, "big", "c", 2000), read_in_order(b, "big", "c", 2000)
        assert got_a == got_b
        assert [(m["attempts"] + 1, m["id"].encode()) for m in seen["queued"]] == [(x, i) for x, i, _ in got_a[:1000]]
    finally:
        a.stop()
        b.stop()


# ---------------------------------------------------------------- memory, disk, deferred, in flight


@on_both_backends
async def test_peek_names_memory_disk_deferred_and_in_flight_messages_as_clients_then_get_them(tmp_path):
    d = start_nsqd(str(tmp_path), "--mem-queue-size=40", "--log-level=info")
    try:
        d.http("POST", "/topic/create?topic=mix")
        d.http("POST", "/channel/create?topic=mix&channel=c")
        events = await anyio.to_thread.run_sync(lambda: run_driver("write", "mix", "150", "--nsqd", d.tcp_address, "--mpub", "30", "--prefix", "py-"))
        assert events[-1] == {"event": "done", "acked": 5, "errors": 0}  # 5 MPUBs of 30
        holder, held = dpub_and_hold(d, "mix", "c", b"\x00later\xff", 3)

        seen = peek(d, "mix", "c", count=1000, include_deferred="true", include_in_flight="true")
        assert seen["depth"] == 147 and seen["in_flight_count"] == 3 and seen["deferred_count"] == 1
        assert {m["where"] for m in seen["queued"]} == {"memory", "disk"} and len(seen["queued"]) == 147
        assert [m["id"].encode() for m in seen["in_flight"]] == [h[2] for h in held]
        local = "%s:%d" % holder.sock.getsockname()
        assert all(m["client"]["remote_address"] == local and m["attempts"] == 1 for m in seen["in_flight"])
        (later,) = seen["deferred"]
        assert base64.b64decode(later["body"]) == b"\x00later\xff" and later["body_preview"] == "\\x00later\\xff"
        assert time.time_ns() + 500e9 < later["due"] < time.time_ns() + 601e9

        # where is each of them
        assert find(d, "mix", held[0][2])["channels"][0]["client"]["remote_address"] == local
        assert find(d, "mix", later["id"])["channels"][0]["state"] == "deferred"
        on_disk = next(m for m in seen["queued"] if m["where"] == "disk")
        assert find(d, "mix", on_disk["id"], "c")["channels"][0]["where"] == "disk"
        nowhere = find(d, "mix", "0123456789abcdef")
        assert nowhere["topic"] == {"state": "not_found"} and nowhere["channels"] == [{"channel_name": "c", "state": "not_found"}]

        for h in held:
            holder.cmd(b"FIN", h[2])
        confirm(holder)
        holder.close()
        # our Reader, one message at a time, gets the queue in the order the peek gave
        got: list[bytes] = []

        async def handler(message) -> None:  # noqa: ANN001
            got.append(message.id)

        async with Reader("mix", "c", handler, nsqd_tcp_addresses=[d.tcp_address], max_in_flight=1):
            await eventually(lambda: len(got) == 147, message="147 received")
        assert got == [m["id"].encode() for m in seen["queued"]]
    finally:
        d.stop()


# ---------------------------------------------------------------- across restarts


@pytest.mark.parametrize("how", ["sigterm", "kill9_sync"])
def test_peek_after_a_restart_shows_what_survived(tmp_path, how):
    flags = ["--log-level=info"] + (["--sync-every=1"] if how == "kill9_sync" else ["--mem-queue-size=20"])
    d = start_nsqd(str(tmp_path), *flags)
    d.http("POST", "/topic/create?topic=r")
    d.http("POST", "/channel/create?topic=r&channel=c")
    with RawClient(d.tcp_port) as p:
        assert p.mpub("r", [b"m%03d" % i for i in range(60)]).data == b"OK"
    holder, held = dpub_and_hold(d, "r", "c", b"deferred", 4)
    before = peek(d, "r", "c", count=100, include_deferred="true", include_in_flight="true")
    if how == "sigterm":
        assert d.stop() == 0
    else:
        d.kill()
    holder.close()
    d = start_nsqd(str(tmp_path), *flags)
    try:
        after = peek(d, "r", "c", count=100, include_deferred="true", include_in_flight="true")
        # the held messages are queued again, their attempt counted; the deferred one still waits, due as before
        queued_before = {m["id"]: m for m in before["queued"] + before["in_flight"]}
        assert {m["id"] for m in after["queued"]} == set(queued_before) and after["in_flight"] == []
        assert all(m["attempts"] == (1 if m["id"] in {h[2].decode() for h in held} else 0) for m in after["queued"])
        assert [(m["id"], m["body"]) for m in after["deferred"]] == [(m["id"], m["body"]) for m in before["deferred"]]
        assert abs(after["deferred"][0]["due"] - before["deferred"][0]["due"]) < 50_000_000
        # and what is delivered is what the peek said, in its order
        got = read_in_order(d, "r", "c", len(after["queued"]))
        assert [(a, i.decode()) for a, i, _ in got] == [(m["attempts"] + 1, m["id"]) for m in after["queued"]]
    finally:
        d.stop()


def test_peek_and_find_name_the_messages_a_channel_will_dead_letter_instead_of_delivering(tmp_path):
    """Max attempts and inspection together: messages already delivered the
    channel's max attempts times (held at their last attempt over a SIGTERM)
    are queued, but the channel moves them to its dead-letter topic rather
    than deliver them; a peek and a lookup say so, and what is delivered next
    is exactly the rest, in the peek's order."""
    d = start_nsqd(str(tmp_path), "--log-level=info")
    try:
        d.http("POST", "/topic/create?topic=t")
        d.http("POST", "/channel/create?topic=t&channel=c")
        assert d.http("POST", "/channel/settings?topic=t&channel=c&max_attempts=2")[0] == 200
        with RawClient(d.tcp_port) as p:
            assert p.mpub("t", [b"m%d" % i for i in range(4)]).data == b"OK"
        with subscriber(d, "t", "c", rdy=4) as first:
            [first.read_message() for _ in range(4)]  # attempt 1, requeued as the connection closes
            first.cmd(b"RDY", "0")
            confirm(first)
        wait_for(lambda: channel_stats(d, "t", "c")["in_flight_count"] == 0)
        holder = subscriber(d, "t", "c", rdy=2)
        held = [holder.read_message() for _ in range(2)]
        assert [a for _, a, _, _ in held] == [2, 2]  # their last attempt, in flight at the SIGTERM
    finally:
        assert d.stop() == 0
    holder.close()
    spent = {m[2].decode() for m in held}
    d = start_nsqd(str(tmp_path), "--log-level=info")
    try:
        queued = peek(d, "t", "c")["queued"]
        assert len(queued) == 4
        assert {m["id"] for m in queued if m.get("dead_letter_topic") == "t.dead"} == spent
        for msg_id in spent:
            assert find(d, "t", msg_id, "c")["channels"][0]["dead_letter_topic"] == "t.dead"
        delivered = [m for m in queued if "dead_letter_topic" not in m]
        got = read_in_order(d, "t", "c", len(delivered))
        assert [i.decode() for _, i, _ in got] == [m["id"] for m in delivered]
        wait_for(lambda: channel_stats(d, "t", "c")["dead_letter_count"] == 2)
        assert peek(d, "t", "c")["queued"] == []
    finally:
        d.stop()


# ---------------------------------------------------------------- Go nsqd


@pytest.mark.skipif(go_nsq_binary("nsqd") is None, reason=GO_NSQD_MISSING)
def test_a_data_directory_only_ever_inspected_is_go_nsqds(tmp_path):
    """Features off, the inspection calls used: nsqd.dat and the queue files
    are exactly Go's, nothing of pynsqd's own beside them, and Go nsqd 1.3.0
    delivers every message."""
    d = start_nsqd(str(tmp_path), "--mem-queue-size=10", "--log-level=info")
    d.http("POST", "/topic/create?topic=plain")
    d.http("POST", "/channel/create?topic=plain&channel=c")
    bodies = [b"plain-%d" % i for i in range(100)]
    with RawClient(d.tcp_port) as p:
        assert p.mpub("plain", bodies).data == b"OK"
    seen = peek(d, "plain", "c", count=100)
    assert find(d, "plain", seen["queued"][50]["id"])["channels"][0]["state"] == "queued"
    peek(d, "plain")
    assert d.stop() == 0
    assert json.loads((tmp_path / "nsqd.dat").read_text()) == {
        "topics": [{"name": "plain", "paused": False, "channels": [{"name": "c", "paused": False}]}], "version": "1.3.0",
    }
    assert sorted(os.listdir(tmp_path)) == [
        "nsqd.dat", "plain.diskqueue.meta.dat", "plain:c.diskqueue.000000.dat", "plain:c.diskqueue.meta.dat",
    ]
    go = start_go_nsqd(str(tmp_path))
    try:
        got = read_in_order(go, "plain", "c", 100)
        assert sorted(b for _, _, b in got) == sorted(bodies)
    finally:
        go.stop(signal.SIGTERM)
