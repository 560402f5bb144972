"""Fuzzing over real sockets: hypothesis-made command streams, valid,
mutated and random, to pynsqd (TCP V2, plain and through snappy/deflate),
to pynsqlookupd (TCP V1), and random HTTP requests to both.

Every exchange must end (the daemon closes after our EOF, never hangs),
every byte the daemon sends must be a well-formed NSQ frame / V1 reply /
HTTP response (an error frame that closes the connection is the last
thing sent), no exception may reach the logs, and messages acknowledged
before the fuzzing must all be delivered afterwards.

The default run is bounded to stay within CI's budget; ``FUZZ_EXAMPLES=N``
runs N examples per test instead.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
import struct
import sys
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import Daemon, RawClient, start_nsqd, wait_for
from pynsqd.protocol import MAGIC_V2, encode_command, encode_mpub_body
from pynsqd.streams import CorruptStream, DeflateDecoder, SnappyDecoder

FUZZ_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "0"))
EXCHANGE_TIMEOUT = 10.0
NON_FATAL = {b"E_FIN_FAILED", b"E_REQ_FAILED", b"E_TOUCH_FAILED"}
ERROR_RE = re.compile(rb"^E_[A-Z_]+( .*)?$", re.S)


def fuzz_settings(default: int) -> settings:
    return settings(
        max_examples=FUZZ_EXAMPLES or default,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
    )


class Tally:
    """How much was thrown at the daemons (for the report)."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def add(self, kind: str, n: int = 1) -> None:
        self.counts[kind] += n


# ---------------------------------------------------------------- daemons


@pytest.fixture(scope="module")
def tally() -> Tally:
    return Tally()


class Kept(tuple):
    """(daemon, topic, bodies), with a repr short enough for failure reports."""

    def __repr__(self) -> str:
        return f"<nsqd :{self[0].tcp_port}, {len(self[2])} kept messages on {self[1]}>"


@pytest.fixture(scope="module")
def fuzz_nsqd(tmp_path_factory) -> Iterator[tuple[Daemon, str, set[bytes]]]:
    """A pynsqd holding messages acknowledged before any fuzzing."""
    d = start_nsqd(str(tmp_path_factory.mktemp("nsqd")), "--max-msg-size=65536", "--max-body-size=262144", "--msg-timeout=5s")
    keep = f"keep-{secrets.token_hex(8)}"
    assert d.http("POST", f"/topic/create?topic={keep}")[0] == 200
    assert d.http("POST", f"/channel/create?topic={keep}&channel=keep")[0] == 200
    kept = {b"tcp-%d" % i for i in range(100)} | {b"mpub-%d" % i for i in range(100)} | {b"http-%d" % i for i in range(20)}
    with RawClient(d.tcp_port) as c:
        for i in range(100):
            assert c.pub(keep, b"tcp-%d" % i).data == b"OK"
        assert c.mpub(keep, [b"mpub-%d" % i for i in range(100)]).data == b"OK"
    for i in range(20):
        assert d.http("POST", f"/pub?topic={keep}", b"http-%d" % i) == (200, b"OK")
    yield Kept((d, keep, kept))
    d.stop()


@pytest.fixture(scope="module")
def fuzz_lookupd() -> Iterator[Daemon]:
    d = Daemon([sys.executable, "-m", "pynsqlookupd", "--tcp-address=127.0.0.1:0", "--http-address=127.0.0.1:0", "--log-level=debug"])
    d.wait_listening()
    yield d
    d.stop()


def no_crash_in_logs(d: Daemon) -> None:
    bad = [line for line in list(d.lines) if "Traceback" in line or "connection failed" in line or "handler failed" in line]
    assert not bad, "\n".join(bad[:20])
    assert d.proc.poll() is None


# ---------------------------------------------------------------- one exchange


def exchange(port: int, payload: bytes, *, then: bytes = b"") -> tuple[bytes, bool]:
    """Send ``payload``, half-close, read until the daemon closes.  Returns
    (everything received, whether the connection ended with a reset)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=EXCHANGE_TIMEOUT)
    received = bytearray()
    reset = False
    try:
        try:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
        except OSError:  # it already answered and closed (EPIPE, ECONNRESET, ENOTCONN)
            reset = True
        deadline = time.monotonic() + EXCHANGE_TIMEOUT
        while True:
            if time.monotonic() > deadline:
                raise AssertionError(f"daemon did not close the connection within {EXCHANGE_TIMEOUT}s: {payload[:200]!r}")
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                reset = True
                break
            except socket.timeout:
                raise AssertionError(f"daemon hung on {payload[:200]!r}") from None
            if not chunk:
                break
            received += chunk
    finally:
        s.close()
    return bytes(received), reset


# ---------------------------------------------------------------- reply checks


def check_v2_stream(data: bytes, reset: bool) -> int:
    """Every byte nsqd sent is a valid frame; layers switch where IDENTIFY
    said so; a fatal error is the last frame.  Returns the frame count."""
    frames = 0
    buf = data
    pos = 0
    while True:
        if len(buf) - pos < 8:
            assert reset or pos == len(buf), f"trailing bytes {buf[pos:][:50]!r}"
            return frames
        size, ftype = struct.unpack_from(">ii", buf, pos)
        assert 4 <= size <= 16 * 1024 * 1024, f"bad frame size {size}"
        if len(buf) - pos - 4 < size:
            assert reset, f"truncated frame of {size} bytes"
            return frames
        body = buf[pos + 8 : pos + 4 + size]
        pos += 4 + size
        frames += 1
        assert ftype in (0, 1, 2), f"bad frame type {ftype}"
        if ftype == 1:
            assert ERROR_RE.match(body), body
            if body.split(b" ", 1)[0] not in NON_FATAL:
                assert pos == len(buf), f"frames after fatal {body!r}"
        elif ftype == 2:
            assert len(body) >= 26, body
        elif body not in (b"OK", b"_heartbeat_", b"CLOSE_WAIT"):
            reply = json.loads(body)
            assert isinstance(reply, dict), body
            layer = "snappy" if reply.get("snappy") else "deflate" if reply.get("deflate") else None
            assert not reply.get("tls_v1")
            if layer is not None:
                # the rest of the stream comes through the negotiated codec
                decoder = SnappyDecoder() if layer == "snappy" else DeflateDecoder()
                decoder.feed(buf[pos:])
                parts = []
                try:
                    while chunk := decoder.read():
                        parts.append(chunk)
                except CorruptStream:
                    assert reset, f"bad {layer} data from nsqd"
                buf, pos = b"".join(parts), 0
                assert buf.startswith(b"\x00\x00\x00\x06\x00\x00\x00\x00OK") or reset or not buf


def check_v1_stream(data: bytes, reset: bool) -> int:
    frames = 0
    pos = 0
    while True:
        if len(data) - pos < 4:
            assert reset or pos == len(data), f"trailing bytes {data[pos:][:50]!r}"
            return frames
        (size,) = struct.unpack_from(">i", data, pos)
        assert 0 <= size <= 16 * 1024 * 1024, size
        if len(data) - pos - 4 < size:
            assert reset
            return frames
        body = data[pos + 4 : pos + 4 + size]
        pos += 4 + size
        frames += 1
        if body.startswith(b"E_"):
            assert ERROR_RE.match(body), body
            assert pos == len(data), "replies after a (fatal) V1 error"
        elif body != b"OK":
            assert isinstance(json.loads(body), dict), body


STATUS_LINE = re.compile(rb"HTTP/1\.1 (\d{3}) [^\r\n]*\r\n")


def check_http_stream(data: bytes, reset: bool, head: bool) -> list[int]:
    """Parse the responses (nsqd's always carry Content-Length)."""
    statuses = []
    pos = 0
    while pos < len(data):
        m = STATUS_LINE.match(data, pos)
        assert m, f"not an HTTP status line: {data[pos:pos + 80]!r}"
        end = data.find(b"\r\n\r\n", m.end() - 2)
        if end < 0:
            assert reset
            break
        headers = {}
        for line in data[m.end() : end].split(b"\r\n"):
            if line:
                name, sep, value = line.partition(b":")
                assert sep and name and b" " not in name, line
                headers[name.strip().lower()] = value.strip()
        length = int(headers[b"content-length"])
        status = int(m.group(1))
        # a HEAD request (always alone) has no body, unless h11 could not parse
        # it: then it is answered 400 as a GET would be
        unparsed = status == 400 and len(data) - (end + 4) == length
        pos = end + 4 + (length if not head or unparsed else 0)
        assert pos <= len(data) or reset
        statuses.append(int(m.group(1)))
    return statuses


# ---------------------------------------------------------------- strategies

NAMES = st.sampled_from(
    ["fz", "fz2", "fz.a-b_c", "fz#ephemeral", "ch", "ch#ephemeral", "", "bad!", "a" * 64, "a" * 65, "ü", "%", "x y"]
) | st.text(alphabet="abcz09._-#!%/ ", max_size=70)
NUMBERS = st.integers(-5, 5000).map(str) | st.sampled_from(["", "abc", "99999999999999999999", "-0", "+1", "1e3", "0x10"])
MSG_IDS = st.binary(min_size=16, max_size=16) | st.just(b"0123456789abcdef") | st.binary(max_size=20)
BODIES = st.binary(max_size=300) | st.sampled_from([b"", b"x" * 70_000])

IDENTIFY_FIELDS = st.fixed_dictionaries(
    {},
    optional={
        "feature_negotiation": st.booleans(),
        "client_id": st.text(max_size=20),
        "hostname": st.text(max_size=20) | st.integers(),
        "user_agent": st.text(max_size=20),
        "heartbeat_interval": st.integers(-3, 70_000) | st.sampled_from([1000, 0, -1]),
        "output_buffer_size": st.integers(-3, 70_000) | st.just(64),
        "output_buffer_timeout": st.integers(-3, 40_000) | st.just(25),
        "tls_v1": st.booleans(),
        "snappy": st.booleans(),
        "deflate": st.booleans(),
        "deflate_level": st.integers(-2, 12),
        "sample_rate": st.integers(-2, 101),
        "msg_timeout": st.integers(-1, 1_000_000),
    },
)
IDENTIFY_BODY = IDENTIFY_FIELDS.map(lambda d: json.dumps(d).encode()) | st.binary(max_size=60) | st.sampled_from([b"null", b"[]", b"{}", b'{"heartbeat_interval": 1.5}'])


def _cmd(name: bytes, *params: Any, body: bytes | None = None) -> bytes:
    return encode_command(name, *[p if isinstance(p, bytes) else str(p).encode() for p in params], body=body)


V2_COMMAND = st.one_of(
    st.builds(lambda b: _cmd(b"IDENTIFY", body=b), IDENTIFY_BODY),
    st.builds(lambda t, c: _cmd(b"SUB", t, c), NAMES, NAMES),
    st.builds(lambda t, b: _cmd(b"PUB", t, body=b), NAMES, BODIES),
    st.builds(lambda t, bs: _cmd(b"MPUB", t, body=encode_mpub_body(bs)), NAMES, st.lists(st.binary(max_size=50), max_size=5)),
    st.builds(lambda t, b: _cmd(b"MPUB", t, body=b), NAMES, st.binary(max_size=40)),
    st.builds(lambda t, n, b: _cmd(b"DPUB", t, n, body=b), NAMES, NUMBERS, BODIES),
    st.builds(lambda n: _cmd(b"RDY", n), NUMBERS),
    st.builds(lambda i: _cmd(b"FIN", i), MSG_IDS),
    st.builds(lambda i, n: _cmd(b"REQ", i, n), MSG_IDS, NUMBERS),
    st.builds(lambda i: _cmd(b"TOUCH", i), MSG_IDS),
    st.just(_cmd(b"CLS")),
    st.just(_cmd(b"NOP")),
    st.builds(lambda b: _cmd(b"AUTH", body=b), st.binary(max_size=30)),
    st.builds(lambda p: _cmd(b"AUTH", p), st.text(max_size=5)),
    st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"") + b"\n"),  # a random line
    st.binary(max_size=64),  # random bytes
)

V1_COMMAND = st.one_of(
    st.just(b"PING\n"),
    st.builds(
        lambda d: _cmd(b"IDENTIFY", body=json.dumps(d).encode()),
        st.fixed_dictionaries(
            {},
            optional={
                "version": st.text(max_size=8), "tcp_port": st.integers(-1, 70000), "http_port": st.integers(-1, 70000),
                "hostname": st.text(max_size=10), "broadcast_address": st.sampled_from(["127.0.0.1", "", "::1"]) | st.text(max_size=10),
            },
        ),
    ),
    st.builds(lambda b: _cmd(b"IDENTIFY", body=b), st.binary(max_size=40)),
    st.builds(lambda t: _cmd(b"REGISTER", t), NAMES),
    st.builds(lambda t, c: _cmd(b"REGISTER", t, c), NAMES, NAMES),
    st.builds(lambda t: _cmd(b"UNREGISTER", t), NAMES),
    st.builds(lambda t, c: _cmd(b"UNREGISTER", t, c), NAMES, NAMES),
    st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"") + b"\n"),
    st.binary(max_size=64),
)


@st.composite
def mutated(draw: Any, data: bytes) -> bytes:
    """Flip, insert, delete, duplicate, truncate, or overwrite a size field."""
    out = bytearray(data)
    for _ in range(draw(st.integers(0, 3))):
        if not out:
            break
        pos = draw(st.integers(0, len(out) - 1))
        kind = draw(st.sampled_from(["flip", "insert", "delete", "size", "dup", "truncate"]))
        if kind == "flip":
            out[pos] ^= draw(st.integers(1, 255))
        elif kind == "insert":
            out[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del out[pos : pos + draw(st.integers(1, 16))]
        elif kind == "size":
            out[pos : pos + 4] = struct.pack(">i", draw(st.sampled_from([0, -1, 1, 4, 26, 65536, 5_000_000, 2**31 - 1, -(2**31)])))
        elif kind == "dup":
            out[pos:pos] = out[pos : pos + draw(st.integers(1, 64))]
        else:
            del out[pos:]
    return bytes(out)


@st.composite
def v2_session(draw: Any) -> tuple[bytes, int]:
    """(payload, number of frames): usually a proper start (magic, IDENTIFY,
    SUB, RDY) so the fuzz reaches the later states, then random commands."""
    frames: list[bytes] = []
    if draw(st.integers(0, 3)):
        frames.append(_cmd(b"IDENTIFY", body=b'{"feature_negotiation": true, "output_buffer_timeout": 25}'))
        if draw(st.booleans()):
            frames += [_cmd(b"SUB", "fz", draw(st.sampled_from(["ch", "ch#ephemeral", "ch2"]))), _cmd(b"RDY", 5)]
    frames += draw(st.lists(V2_COMMAND, min_size=1, max_size=12))
    payload = b"".join(frames)
    if draw(st.integers(0, 2)) == 0:
        payload = draw(mutated(payload))
    magic = draw(st.sampled_from([MAGIC_V2] * 12 + [b"  V1", b"", b"GET / HTTP/1.1\r\n", b"\x00\x00\x00\x00", b"  V"]))
    return magic + payload, len(frames)


# ---------------------------------------------------------------- TCP V2


@fuzz_settings(600)
@given(session=v2_session())
def test_fuzz_nsqd_tcp_v2(fuzz_nsqd, tally, session):
    d, _, _ = fuzz_nsqd
    payload, n = session
    data, reset = exchange(d.tcp_port, payload)
    tally.add("nsqd TCP frames", n)
    tally.add("nsqd TCP bytes", len(payload))
    check_v2_stream(data, reset)


@fuzz_settings(200)
@given(
    layer=st.sampled_from(["snappy", "deflate"]),
    frames=st.lists(V2_COMMAND, min_size=1, max_size=10),
    garbage=st.one_of(st.just(b""), st.binary(min_size=1, max_size=64)),
    mutate=st.booleans(),
    data=st.data(),
)
def test_fuzz_nsqd_compressed_sessions(fuzz_nsqd, tally, layer, frames, garbage, mutate, data):
    """Commands (and junk) through a negotiated snappy/deflate layer."""
    d, _, _ = fuzz_nsqd
    c = RawClient(d.tcp_port, timeout=EXCHANGE_TIMEOUT)
    try:
        from helpers import identify_and_upgrade

        identify_and_upgrade(c, **{layer: True}, output_buffer_timeout=25)
        # the session's codecs: their state continues the negotiated streams
        layered = c.sock
        wire = layered._encoder.encode(b"".join(frames))
        if mutate:
            wire = data.draw(mutated(wire))
        raw = layered._sock
        try:
            raw.sendall(wire + garbage)
            raw.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        decoder = layered._decoder
        received = bytearray()
        reset = False
        deadline = time.monotonic() + EXCHANGE_TIMEOUT
        while True:
            assert time.monotonic() < deadline, "daemon did not close the connection"
            try:
                chunk = raw.recv(65536)
            except ConnectionResetError:
                reset = True
                break
            if not chunk:
                break
            received += chunk
        decoder.feed(bytes(received))
        plain = b""
        try:
            while part := decoder.read():
                plain += part
        except CorruptStream:
            raise AssertionError(f"nsqd sent bad {layer} data") from None
        check_v2_stream(plain, reset or bool(received) and not plain)
        tally.add(f"nsqd {layer} frames", len(frames) + (1 if garbage else 0))
    finally:
        c.close()


# ---------------------------------------------------------------- TCP V1 (nsqlookupd)


@fuzz_settings(400)
@given(
    frames=st.lists(V1_COMMAND, min_size=1, max_size=10),
    identify_first=st.booleans(),
    mutate=st.integers(0, 2),
    magic=st.sampled_from([b"  V1"] * 8 + [b"  V2", b"", b"\xff\xff\xff\xff"]),
    data=st.data(),
)
def test_fuzz_lookupd_tcp_v1(fuzz_lookupd, tally, frames, identify_first, mutate, magic, data):
    if identify_first:
        body = {"version": "1.3.0", "tcp_port": 4150, "http_port": 4151, "hostname": "fz", "broadcast_address": "127.0.0.1"}
        frames = [_cmd(b"IDENTIFY", body=json.dumps(body).encode())] + frames
    payload = b"".join(frames)
    if mutate == 0:
        payload = data.draw(mutated(payload))
    received, reset = exchange(fuzz_lookupd.tcp_port, magic + payload)
    tally.add("lookupd TCP frames", len(frames))
    check_v1_stream(received, reset)


# ---------------------------------------------------------------- HTTP

NSQD_PATHS = [
    "/ping", "/info", "/pub", "/mpub", "/stats", "/topic/create", "/topic/delete", "/topic/empty", "/topic/pause",
    "/topic/unpause", "/channel/create", "/channel/delete", "/channel/empty", "/channel/pause", "/channel/unpause",
    "/config/msg_timeout", "/config/log_level", "/config/bogus", "/config/", "/metrics", "/debug/tasks",
]
LOOKUPD_PATHS = ["/ping", "/info", "/debug", "/lookup", "/topics", "/channels", "/nodes", "/topic/create", "/topic/delete",
                 "/channel/create", "/channel/delete", "/topic/tombstone", "/metrics"]
PARAMS = ["topic", "channel", "defer", "binary", "format", "include_clients", "include_mem", "node", "x"]
VALUES = NAMES | NUMBERS | st.sampled_from(["true", "false", "json", "text", "127.0.0.1:4151", ""])


@st.composite
def http_request_bytes(draw: Any, paths: list[str]) -> tuple[bytes, bool, bool]:
    """(request, is it HEAD, was it mutated)."""
    method = draw(st.sampled_from(["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH", "BREW"]))
    path = draw(st.sampled_from(paths) | st.text(alphabet="abcz/._-%?&=#", max_size=30).map(lambda s: "/" + s))
    query = draw(st.lists(st.tuples(st.sampled_from(PARAMS), VALUES), max_size=4))
    raw_query = draw(st.booleans())
    qs = "&".join(f"{k}={v if raw_query else quote(v, safe='')}" for k, v in query)
    target = path + ("?" + qs if qs else "")
    body = draw(st.binary(max_size=300) | st.lists(NAMES, max_size=5).map(lambda xs: "\n".join(xs).encode()) | st.just(b"x" * 70_000))
    if method == "PUT" and "/config/" in path:
        # changing the log level or the lookupd list is not this test's business
        target = "/config/bogus"
    chunked = draw(st.integers(0, 4)) == 0
    head = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1"]
    if chunked:
        head.append("Transfer-Encoding: chunked")
        payload = (b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)) if body else b"0\r\n\r\n"
    else:
        head.append(f"Content-Length: {len(body)}")
        payload = body
    head += [f"{k}: {v}" for k, v in draw(st.lists(st.tuples(st.sampled_from(["X-Fuzz", "Accept", "Connection"]), st.sampled_from(["close", "keep-alive", "*/*", ""])), max_size=2))]
    request = ("\r\n".join(head) + "\r\n\r\n").encode("utf-8", "surrogateescape") + payload
    is_head = method == "HEAD"
    if not is_head and draw(st.integers(0, 2)) == 0:
        return draw(mutated(request)), False, True
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=200)), False, True  # not HTTP at all
    return request, is_head, False


def _fuzz_http(port: int, request: tuple[bytes, bool, bool], tally: Tally, what: str) -> None:
    raw, head, was_mutated = request
    if raw.startswith(b"HEAD "):
        head = True
    data, reset = exchange(port, raw)
    statuses = check_http_stream(data, reset, head)
    tally.add(what)
    assert 500 not in statuses, data[:300]
    if not was_mutated and not reset:
        assert statuses, f"no response to a well-formed request {raw[:200]!r}"


@fuzz_settings(400)
@given(request=http_request_bytes(NSQD_PATHS))
def test_fuzz_nsqd_http(fuzz_nsqd, tally, request):
    _fuzz_http(fuzz_nsqd[0].http_port, request, tally, "nsqd HTTP requests")


@fuzz_settings(200)
@given(request=http_request_bytes(LOOKUPD_PATHS))
def test_fuzz_lookupd_http(fuzz_lookupd, tally, request):
    _fuzz_http(fuzz_lookupd.http_port, request, tally, "lookupd HTTP requests")


# ---------------------------------------------------------------- afterwards


def test_after_fuzzing_daemons_serve_and_nothing_acknowledged_was_lost(fuzz_nsqd, fuzz_lookupd, tally, record_property):
    d, keep, kept = fuzz_nsqd
    no_crash_in_logs(d)
    no_crash_in_logs(fuzz_lookupd)
    assert d.http("GET", "/ping") == (200, b"OK")
    assert fuzz_lookupd.http("GET", "/ping") == (200, b"OK")
    c = RawClient(d.tcp_port)
    c.identify(feature_negotiation=True, output_buffer_timeout=25)
    assert c.sub(keep, "keep").data == b"OK"
    c.cmd(b"RDY", "250")
    got = set()
    while len(got) < len(kept):
        _, _, msg_id, body = c.read_message(timeout=10)
        got.add(body)
        c.cmd(b"FIN", msg_id)
    assert got == kept
    wait_for(lambda: [ch["in_flight_count"] for t in d.stats(keep)["topics"] for ch in t["channels"]] == [0], message="all finished")
    (ch,) = [ch for t in d.stats(keep)["topics"] for ch in t["channels"]]
    assert ch["depth"] == 0 and ch["message_count"] == len(kept)
    c.close()
    summary = ", ".join(f"{k}: {v}" for k, v in sorted(tally.counts.items()))
    record_property("fuzzed", summary)
    print(f"\nfuzzed: {summary}")
