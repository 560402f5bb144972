"""Limits and load: every configured bound answered with nsqd's error code,
a stalled consumer that never delays anyone else, 1000 idle connections
beside live traffic, and running out of file descriptors as a logged,
recoverable condition -- against real pynsqd subprocesses."""

from __future__ import annotations

import json
import os
import resource
import socket
import struct
import time

import pytest

from helpers import RawClient, http_request, start_nsqd, wait_for
from pynsqd.protocol import FRAME_TYPE_ERROR, MAGIC_V2, FrameDecoder, encode_command, encode_mpub_body

LIMIT_FLAGS = (
    "--max-rdy-count=10",
    "--max-msg-size=1000",
    "--max-body-size=5000",
    "--max-output-buffer-size=1024",
    "--max-output-buffer-timeout=1s",
    "--min-output-buffer-timeout=50ms",
    "--max-heartbeat-interval=10s",
    "--max-msg-timeout=60s",
    "--max-req-timeout=10s",
    "--max-channel-consumers=2",
)


@pytest.fixture(scope="module")
def limited(tmp_path_factory):
    d = start_nsqd(str(tmp_path_factory.mktemp("nsqd")), *LIMIT_FLAGS)
    yield d
    d.stop()


def expect_fatal(c: RawClient, data: bytes) -> None:
    frame = c.read_response()
    assert (frame.frame_type, frame.data) == (FRAME_TYPE_ERROR, data)
    assert c.closed_by_server()


def still_serving(d, topic: str) -> None:
    with RawClient(d.tcp_port) as c:
        assert c.pub(topic, b"alive").data == b"OK"


# ---------------------------------------------------------------- configured bounds


def test_identify_reports_the_configured_maxima(limited):
    with RawClient(limited.tcp_port) as c:
        reply = json.loads(c.identify(feature_negotiation=True).data)
    assert reply["max_rdy_count"] == 10 and reply["max_msg_timeout"] == 60_000
    assert reply["output_buffer_size"] == 16384 and reply["output_buffer_timeout"] == 250


@pytest.mark.parametrize(
    "fields, error",
    [
        ({"heartbeat_interval": 999}, b"E_BAD_BODY IDENTIFY heartbeat interval (999) is invalid"),
        ({"heartbeat_interval": 10001}, b"E_BAD_BODY IDENTIFY heartbeat interval (10001) is invalid"),
        ({"heartbeat_interval": -2}, b"E_BAD_BODY IDENTIFY heartbeat interval (-2) is invalid"),
        ({"output_buffer_size": 63}, b"E_BAD_BODY IDENTIFY output buffer size (63) is invalid"),
        ({"output_buffer_size": 1025}, b"E_BAD_BODY IDENTIFY output buffer size (1025) is invalid"),
        ({"output_buffer_timeout": 49}, b"E_BAD_BODY IDENTIFY output buffer timeout (49) is invalid"),
        ({"output_buffer_timeout": 1001}, b"E_BAD_BODY IDENTIFY output buffer timeout (1001) is invalid"),
        ({"msg_timeout": 60001}, b"E_BAD_BODY IDENTIFY msg timeout (60001) is invalid"),
        ({"sample_rate": -1}, b"E_BAD_BODY IDENTIFY sample rate (-1) is invalid"),
        ({"heartbeat_interval": 1.5}, b"E_BAD_BODY IDENTIFY failed to decode JSON body"),
        ({"feature_negotiation": "yes"}, b"E_BAD_BODY IDENTIFY failed to decode JSON body"),
    ],
)
def test_identify_values_out_of_range(limited, unique, fields, error):
    c = RawClient(limited.tcp_port)
    c.cmd(b"IDENTIFY", body=json.dumps(fields).encode())
    expect_fatal(c, error)
    still_serving(limited, unique)


@pytest.mark.parametrize(
    "fields",
    [
        {"heartbeat_interval": 10000, "output_buffer_size": 1024, "output_buffer_timeout": 1000, "msg_timeout": 60000, "sample_rate": 99},
        {"heartbeat_interval": 1000, "output_buffer_size": 64, "output_buffer_timeout": 50, "msg_timeout": 1000, "sample_rate": 0},
        {"heartbeat_interval": -1, "output_buffer_size": -1, "output_buffer_timeout": -1},
    ],
)
def test_identify_values_at_the_bounds_are_accepted(limited, fields):
    with RawClient(limited.tcp_port) as c:
        reply = json.loads(c.identify(feature_negotiation=True, **fields).data)
    if fields["output_buffer_size"] > 0:
        assert reply["output_buffer_size"] == fields["output_buffer_size"]
        assert reply["output_buffer_timeout"] == fields["output_buffer_timeout"]
        assert reply["msg_timeout"] == fields["msg_timeout"]


def test_rdy_above_max_rdy_count(limited, unique):
    c = RawClient(limited.tcp_port)
    c.identify(feature_negotiation=True)
    assert c.sub(unique, "ch").data == b"OK"
    c.cmd(b"RDY", "10")  # the maximum is fine
    c.cmd(b"RDY", "11")
    expect_fatal(c, b"E_INVALID RDY count 11 out of range 0-10")


def test_max_channel_consumers_per_channel(limited, unique):
    subs = []
    for _ in range(2):
        c = RawClient(limited.tcp_port)
        c.identify(feature_negotiation=True)
        assert c.sub(unique, "ch").data == b"OK"
        subs.append(c)
    third = RawClient(limited.tcp_port)
    third.identify(feature_negotiation=True)
    third.cmd(b"SUB", unique, "ch")
    expect_fatal(third, f"E_SUB_FAILED SUB failed consumers for {unique}:ch exceeds limit of 2".encode())
    other = RawClient(limited.tcp_port)  # the limit is per channel
    other.identify(feature_negotiation=True)
    assert other.sub(unique, "other").data == b"OK"
    subs[0].close()  # a slot frees up when a consumer leaves

    def resubscribed() -> bool:
        c = RawClient(limited.tcp_port)
        c.identify(feature_negotiation=True)
        if c.sub(unique, "ch").data == b"OK":
            subs.append(c)
            return True
        c.close()
        return False

    wait_for(resubscribed, message="a free consumer slot")
    for c in subs[1:] + [other]:
        c.close()


@pytest.mark.parametrize(
    "command, error",
    [
        (encode_command(b"PUB", "t", body=b"x" * 1001), b"E_BAD_MESSAGE PUB message too big 1001 > 1000"),
        (encode_command(b"DPUB", "t", "100", body=b"x" * 1001), b"E_BAD_MESSAGE DPUB message too big 1001 > 1000"),
        (encode_command(b"DPUB", "t", "10001", body=b"x"), b"E_INVALID DPUB timeout 10001 out of range 0-10000"),
        (encode_command(b"MPUB", "t", body=encode_mpub_body([b"x" * 1001])), b"E_BAD_MESSAGE MPUB message too big 1001 > 1000"),
        (encode_command(b"MPUB", "t") + struct.pack(">i", 5001), b"E_BAD_BODY MPUB body too big 5001 > 5000"),
        (encode_command(b"MPUB", "t", body=struct.pack(">i", 1000)), b"E_BAD_BODY MPUB invalid message count 1000"),
        (encode_command(b"IDENTIFY") + struct.pack(">i", 5001), b"E_BAD_BODY IDENTIFY body too big 5001 > 5000"),
        (encode_command(b"AUTH") + struct.pack(">i", 5001), b"E_BAD_BODY AUTH body too big 5001 > 5000"),
        (encode_command(b"PUB", "t") + struct.pack(">i", -1), b"E_BAD_MESSAGE PUB invalid message body size -1"),
        (b"PUB " + b"x" * 70_000, b"E_INVALID command line longer than 16384 bytes"),
    ],
)
def test_size_limits(limited, unique, command, error):
    c = RawClient(limited.tcp_port)
    c.send(command)
    expect_fatal(c, error)
    still_serving(limited, unique)


def test_at_the_size_limits_is_fine(limited, unique):
    with RawClient(limited.tcp_port) as c:
        assert c.pub(unique, b"x" * 1000).data == b"OK"
        assert c.mpub(unique, [b"y" * 1000] * 4).data == b"OK"  # 4 + 4 * 1004 <= 5000


@pytest.mark.parametrize(
    "name, valid",
    [("a" * 64, True), ("a" * 65, False), ("a" * 54 + "#ephemeral", True), ("a" * 55 + "#ephemeral", False),
     ("", False), ("with/slash", False), ("ünïcode", False), ("a.b-c_d", True), ("#ephemeral", False)],
)
def test_name_rules_over_tcp_and_http(limited, name, valid):
    c = RawClient(limited.tcp_port)
    c.identify(feature_negotiation=True)
    c.cmd(b"SUB", "t", name or "")
    if valid:
        assert c.read_response().data == b"OK"
        c.close()
    else:
        shown = json.dumps(name, ensure_ascii=False).encode()
        expect_fatal(c, b"E_BAD_CHANNEL SUB channel name " + shown + b" is not valid")
    status, body = limited.http("POST", "/topic/create?topic=" + __import__("urllib.parse").parse.quote(name))
    assert (status == 200) == valid, body
    if not valid:
        assert json.loads(body) == {"message":"INVALID_TOPIC"}


def test_http_size_limits(limited, unique):
    assert limited.http("POST", f"/pub?topic={unique}", b"x" * 1001) == (413, b'{"message":"MSG_TOO_BIG"}')
    assert limited.http("POST", f"/mpub?topic={unique}", b"x\n" * 2501) == (413, b'{"message":"BODY_TOO_BIG"}')
    assert limited.http("POST", f"/mpub?topic={unique}", b"x" * 1001 + b"\nshort")[0] == 413
    assert limited.http("POST", f"/pub?topic={unique}&defer=10001", b"x") == (400, b'{"message":"INVALID_DEFER"}')
    assert limited.http("POST", f"/pub?topic={unique}", b"x" * 1000) == (200, b"OK")


# ---------------------------------------------------------------- a stalled consumer


class StalledClient(RawClient):
    """A consumer with a tiny receive buffer that stops reading."""

    def __init__(self, port: int) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.settimeout(10)
        self.sock.connect(("127.0.0.1", port))
        self.decoder = FrameDecoder()
        self.pending = []
        self.sock.sendall(MAGIC_V2)


def channel_clients(d, topic: str, channel: str) -> list[dict]:
    for t in d.stats(topic)["topics"]:
        for c in t["channels"]:
            if c["channel_name"] == channel:
                return c["clients"]
    return []


def test_stalled_consumer_never_delays_the_others_and_is_dropped(tmp_path, unique):
    d = start_nsqd(str(tmp_path))
    try:
        assert d.http("POST", f"/topic/create?topic={unique}")[0] == 200
        for ch in ("ch", "other"):
            assert d.http("POST", f"/channel/create?topic={unique}&channel={ch}")[0] == 200
        stalled = StalledClient(d.tcp_port)
        stalled.identify(feature_negotiation=True, heartbeat_interval=4000, output_buffer_timeout=50, client_id="stalled")
        assert stalled.sub(unique, "ch").data == b"OK"
        stalled.cmd(b"RDY", "100")
        wait_for(lambda: [c["ready_count"] for c in channel_clients(d, unique, "ch")] == [100], message="stalled RDY 100")
        # 10 MB for a consumer that reads nothing: more than every socket buffer on the way
        big = b"z" * 100_000
        for _ in range(2):
            assert d.http("POST", f"/mpub?topic={unique}", b"\n".join([big] * 50)) == (200, b"OK")
        wait_for(lambda: [c["in_flight_count"] for c in channel_clients(d, unique, "ch")] == [100], message="100 in flight to it")

        # another channel gets every copy at once...
        other = RawClient(d.tcp_port)
        other.identify(feature_negotiation=True, output_buffer_timeout=50)
        assert other.sub(unique, "other").data == b"OK"
        other.cmd(b"RDY", "100")
        for _ in range(100):
            _, _, msg_id, body = other.read_message()
            assert body == big
            other.cmd(b"FIN", msg_id)
        # ...and a healthy consumer of the same channel gets new messages
        healthy = RawClient(d.tcp_port)
        healthy.identify(feature_negotiation=True, output_buffer_timeout=50, client_id="healthy")
        assert healthy.sub(unique, "ch").data == b"OK"
        healthy.cmd(b"RDY", "200")
        with RawClient(d.tcp_port) as p:
            assert p.mpub(unique, [b"fresh-%d" % i for i in range(10)]).data == b"OK"
        fresh = set()
        while len(fresh) < 10:
            _, attempts, msg_id, body = healthy.read_message()
            assert body.startswith(b"fresh-") and attempts == 1
            fresh.add(body)
            healthy.cmd(b"FIN", msg_id)
        # all of that while the stalled consumer was still connected
        assert "stalled" in [c["client_id"] for c in channel_clients(d, unique, "ch")]

        # the write deadline (its heartbeat interval) drops it; its messages come back
        wait_for(lambda: [c["client_id"] for c in channel_clients(d, unique, "ch")] == ["healthy"], timeout=20, message="stalled dropped")
        assert any("write timed out, closing slow client" in line for line in d.lines)
        requeued = 0
        while requeued < 100:
            _, attempts, msg_id, body = healthy.read_message()
            assert body == big and attempts == 2
            requeued += 1
            healthy.cmd(b"FIN", msg_id)
        wait_for(lambda: d.stats(unique)["topics"][0]["channels"][0]["in_flight_count"] == 0, message="all finished")
        (ch,) = [c for c in d.stats(unique)["topics"][0]["channels"] if c["channel_name"] == "ch"]
        assert ch["depth"] == 0 and ch["in_flight_count"] == 0 and ch["message_count"] == 110
        for c in (stalled, other, healthy):
            c.close()
    finally:
        d.stop()


# ---------------------------------------------------------------- many connections


def test_a_thousand_idle_connections_beside_live_traffic(tmp_path, unique):
    d = start_nsqd(str(tmp_path))
    idle: list[socket.socket] = []
    try:
        identify = MAGIC_V2 + encode_command(b"IDENTIFY", body=b'{"feature_negotiation":true}')
        sub = encode_command(b"SUB", unique, "idle") + encode_command(b"RDY", "0")
        for i in range(1000):
            s = socket.create_connection(("127.0.0.1", d.tcp_port), timeout=10)
            s.sendall(identify + (sub if i % 5 == 0 else b""))
            idle.append(s)
        wait_for(lambda: len(channel_clients(d, unique, "idle")) == 200, timeout=30, message="200 idle subscribers")
        consumer = RawClient(d.tcp_port)
        consumer.identify(feature_negotiation=True, output_buffer_timeout=50)
        assert consumer.sub(unique, "live").data == b"OK"
        consumer.cmd(b"RDY", "100")
        start = time.monotonic()
        with RawClient(d.tcp_port) as producer:
            for batch in range(20):
                assert producer.mpub(unique, [b"%d-%d" % (batch, i) for i in range(100)]).data == b"OK"
                assert producer.pub(unique, b"single-%d" % batch).data == b"OK"
        got = 0
        while got < 2020:
            _, _, msg_id, _ = consumer.read_message()
            consumer.cmd(b"FIN", msg_id)
            got += 1
        elapsed = time.monotonic() - start
        assert elapsed < 30, elapsed
        status, body = d.http("GET", "/ping")
        assert (status, body) == (200, b"OK")
        # nothing was delivered to the idle channel's RDY 0 consumers
        idle_stats = [c for c in d.stats(unique)["topics"][0]["channels"] if c["channel_name"] == "idle"][0]
        assert idle_stats["in_flight_count"] == 0 and idle_stats["depth"] == 2020
        consumer.close()
    finally:
        for s in idle:
            s.close()
    try:
        wait_for(lambda: not channel_clients(d, unique, "idle"), timeout=30, message="idle clients gone")
        still_serving(d, unique)
    finally:
        d.stop()


def test_running_out_of_file_descriptors_is_logged_and_recoverable(tmp_path, unique):
    d = start_nsqd(str(tmp_path))
    extra: list[socket.socket] = []
    try:
        assert d.http("POST", f"/topic/create?topic={unique}")[0] == 200
        assert d.http("POST", f"/channel/create?topic={unique}&channel=ch")[0] == 200
        survivor = RawClient(d.tcp_port)
        survivor.identify(feature_negotiation=True)
        assert survivor.pub(unique, b"before").data == b"OK"
        in_use = len(os.listdir(f"/proc/{d.proc.pid}/fd"))
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.prlimit(d.proc.pid, resource.RLIMIT_NOFILE, (in_use + 10, hard))
        # more connections than descriptors left: the kernel completes them,
        # nsqd's accept() fails with EMFILE
        for _ in range(40):
            s = socket.create_connection(("127.0.0.1", d.tcp_port), timeout=10)
            s.sendall(MAGIC_V2)
            extra.append(s)
        wait_for(lambda: any("TCP: accept failed, retrying" in line and "EMFILE" in line for line in d.lines), message="EMFILE logged")
        # the connections it has keep working meanwhile
        assert survivor.pub(unique, b"during").data == b"OK"
        assert d.proc.poll() is None
        for s in extra:
            s.close()
        extra.clear()
        wait_for(lambda: any("TCP: accepting connections again" in line for line in d.lines), timeout=20, message="recovery logged")
        still_serving(d, unique)
        assert d.http("GET", "/ping") == (200, b"OK")
        failures = [line for line in d.lines if "accept failed" in line]
        assert len(failures) < 40, "logged at most once a second, not per attempt"
        assert not any("Traceback" in line for line in d.lines)
        survivor.close()
    finally:
        for s in extra:
            s.close()
        d.stop()
