"""Data directories moved between Go nsqd 1.3.0 and pynsqd with the real
binary, both ways (issue 11, defect 6): queues spilled to disk on topics and
channels, messages in flight and deferred at SIGTERM, a paused topic and a
paused channel.  Every message is counted out of the other daemon, once.
The directory pynsqd leaves, its opt-in features (issue 14) off as by
default, has Go's shapes: nsqd.dat's keys and the file set."""

from __future__ import annotations

import json
import re
import signal
import time

import pytest

from helpers import GO_NSQD_MISSING, Daemon, RawClient, go_nsq_binary, start_go_nsqd, start_nsqd

pytestmark = pytest.mark.skipif(go_nsq_binary("nsqd") is None, reason=GO_NSQD_MISSING)

N = 1500  # spilled: far past --mem-queue-size
HELD = 400
DEFERRED = 50
FLAGS = ("--mem-queue-size=100", "--max-bytes-per-file=65536")


def start(kind: str, path: str) -> Daemon:
    return start_nsqd(path, "--log-level=info", *FLAGS) if kind == "pynsqd" else start_go_nsqd(path, *FLAGS)


def post(d: Daemon, path: str) -> None:
    status, body = d.http("POST", path)
    assert status == 200, (path, status, body)


def fill(d: Daemon) -> dict[tuple[str, str], set[bytes]]:
    """Leave every kind of backlog behind; returns what each channel must
    deliver after a restart."""
    post(d, "/topic/create?topic=spill")
    post(d, "/channel/create?topic=spill&channel=c")
    post(d, "/channel/create?topic=spill&channel=paused")
    post(d, "/channel/pause?topic=spill&channel=paused")
    post(d, "/topic/create?topic=held")
    post(d, "/channel/create?topic=held&channel=c")
    post(d, "/topic/pause?topic=held")
    spill = [b"spill-%d" % i for i in range(N)]
    held = [b"held-%d" % i for i in range(HELD)]
    later = [b"later-%d" % i for i in range(DEFERRED)]
    with RawClient(d.tcp_port) as p:
        # deferred an hour: they must survive as messages.  First, while the
        # topic's memory queue is empty: behind the spill, Go nsqd may put them
        # on the topic's disk, which keeps no deferral (they come at once)
        for body in later:
            p.cmd(b"DPUB", "spill", "3600000", body=body)
            assert p.read_response().data == b"OK"
        for i in range(0, N, 250):
            assert p.mpub("spill", spill[i : i + 250]).data == b"OK"
        assert p.mpub("held", held).data == b"OK"
    # a consumer holding messages in flight, some deferred by REQ, some FINed
    c = RawClient(d.tcp_port)
    c.identify(msg_timeout=300000)
    assert c.sub("spill", "c").data == b"OK"
    c.cmd(b"RDY", "60")
    got = [c.read_message() for _ in range(60)]
    c.cmd(b"RDY", "0")  # no more than these 60
    finished = {m[3] for m in got[:20]}
    for m in got[:20]:
        c.cmd(b"FIN", m[2])
    for m in got[20:30]:
        c.cmd(b"REQ", m[2], "3600000")
    c.cmd(b"NOP")
    deadline = time.monotonic() + 15
    while True:  # the FINs and REQs are in before the daemon stops
        ch = [x for t in d.stats("spill")["topics"] for x in t["channels"] if x["channel_name"] == "c"][0]
        if ch["in_flight_count"] == 30 and ch["deferred_count"] == DEFERRED + 10:
            break
        assert time.monotonic() < deadline, ch
        time.sleep(0.05)
    assert d.stop(signal.SIGTERM) == 0  # with the consumer still connected
    c.close()
    everything = set(spill) | set(later)
    return {("spill", "c"): everything - finished, ("spill", "paused"): everything, ("held", "c"): set(held)}


def count_out(d: Daemon, topic: str, channel: str, expected: set[bytes]) -> None:
    c = RawClient(d.tcp_port)
    c.identify(msg_timeout=60000)
    assert c.sub(topic, channel).data == b"OK"
    c.cmd(b"RDY", "500")
    seen: list[bytes] = []
    deadline = time.monotonic() + 60
    while len(seen) < len(expected):
        assert time.monotonic() < deadline, f"{topic}/{channel}: {len(seen)} of {len(expected)}"
        _, _, msg_id, body = c.read_message(timeout=max(0.1, deadline - time.monotonic()))
        seen.append(body)
        c.cmd(b"FIN", msg_id)
    assert len(set(seen)) == len(seen), "a message came out twice"
    assert set(seen) == expected
    c.close()


# what a deployment that never turned pynsqd's opt-in features on leaves in
# its data path (issue 14): Go's files, plus deferral times beside a queue
# (issue 11, read by pynsqd only)
GO_FILES = re.compile(r"^(nsqd\.dat|.+\.diskqueue\.(meta|\d{6})\.dat|.+\.pynsqd-deferred\.json)$")


def assert_nsqd_shapes(path) -> None:
    """nsqd.dat and the file set exactly as Go nsqd 1.3.0 writes them."""
    meta = json.loads((path / "nsqd.dat").read_bytes())
    assert set(meta) == {"topics", "version"}
    for t in meta["topics"]:
        assert set(t) == {"name", "paused", "channels"}, t
        for c in t["channels"]:
            assert set(c) == {"name", "paused"}, c
    strays = [f.name for f in path.iterdir() if not GO_FILES.match(f.name)]
    assert strays == []


@pytest.mark.parametrize("writer,reader", [("go-nsqd", "pynsqd"), ("pynsqd", "go-nsqd")])
def test_a_data_directory_moves_between_go_nsqd_and_pynsqd(tmp_path, writer, reader):
    w = start(writer, str(tmp_path))
    try:
        expected = fill(w)
    finally:
        w.kill()  # (stopped by fill: this only cleans up after a failure)
    # either daemon, the features off (pynsqd's defaults): the same shapes
    assert_nsqd_shapes(tmp_path)
    d = start(reader, str(tmp_path))
    try:
        topics = {t["topic_name"]: t for t in d.stats()["topics"]}
        assert topics["held"]["paused"] is True
        assert {c["channel_name"]: c["paused"] for c in topics["spill"]["channels"]} == {"c": False, "paused": True}
        assert sum(c["depth"] + c["deferred_count"] for c in topics["spill"]["channels"]) >= len(expected[("spill", "c")]) + len(expected[("spill", "paused")])
        post(d, "/channel/unpause?topic=spill&channel=paused")
        post(d, "/topic/unpause?topic=held")
        for (topic, channel), bodies in expected.items():
            count_out(d, topic, channel, bodies)
    finally:
        d.stop()
