"""pynsq_to_http end to end: a real pynsqd, and small HTTP endpoints on
loopback (tests/http_sink.py, subprocesses) that write down every request
before they answer it.  100,000 messages relayed with the endpoint killed
and restarted in the middle; GET/POST templates, headers, modes, status
handling; the pool's response framing."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import Daemon, channel_stats, create_channel, mpub_http, tool_command, wait_for, wait_drained
from pynsqd.client.tools.relay import HostPool, TimerMetrics
from pynsqd.http_client import HTTPClientError, ResponseParser

SINK = str(Path(__file__).parent / "http_sink.py")
N = 100_000
# requeue fast and never give up: a test cannot wait go-nsq's 90 s × attempts
FAST_RETRY = ["--consumer-opt=default_requeue_delay,50ms", "--consumer-opt=backoff_multiplier,50ms", "--consumer-opt=max_attempts,0"]


class Sink:
    def __init__(self, out: Path, *args: str, port: int = 0) -> None:
        self.out = out
        self.args = args
        self.proc = subprocess.Popen([sys.executable, SINK, f"--port={port}", f"--out={out}", *args], stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.startswith("listening on "), line
        self.address = line.split()[-1]
        self.port = int(self.address.rsplit(":", 1)[1])

    def url(self, path: str = "/in") -> str:
        return f"http://{self.address}{path}"

    def records(self) -> list[list[bytes]]:
        if not self.out.exists():
            return []
        return [line.split(b"\t", 3) for line in self.out.read_bytes().splitlines()]

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()



def start_tool(*args: str) -> Daemon:
    return Daemon([*tool_command("nsq_to_http"), *args])


# ---------------------------------------------------------------- sans-IO pieces


RESPONSES = [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", 200, b"hello", True),
    (b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n3;x=1\r\nabc\r\n2\r\nde\r\n0\r\nTrailer: t\r\n\r\n", 201, b"abcde", True),
    (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n", 204, b"", True),
    (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok", 200, b"ok", False),
    (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", 200, b"ok", False),
    (b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok", 200, b"ok", True),
]


@pytest.mark.parametrize("raw, status, body, keep_alive", RESPONSES)
def test_response_parser_frames_answers(raw, status, body, keep_alive):
    parser = ResponseParser("POST")
    resp = parser.feed(raw)
    assert resp is not None and resp.status == status and resp.body == body and parser.keep_alive is keep_alive


def test_response_parser_until_close_and_errors():
    parser = ResponseParser()
    assert parser.feed(b"HTTP/1.1 200 OK\r\n\r\nall of it") is None
    resp = parser.feed(b"")
    assert resp is not None and resp.body == b"all of it" and not parser.keep_alive
    for bad in (b"HTTP/1.1 OK\r\n\r\n", b"SPDY 200 x\r\n\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"):
        with pytest.raises(HTTPClientError):
            ResponseParser().feed(bad)
    with pytest.raises(HTTPClientError, match="before the response was complete"):
        p = ResponseParser()
        p.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        p.feed(b"")


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(RESPONSES), st.lists(st.integers(min_value=1, max_value=40), max_size=30))
def test_response_parser_any_split(case, cuts):
    """However the bytes arrive, the same response comes out, once."""
    raw, status, body, keep_alive = case
    parser = ResponseParser("POST")
    got = []
    pos = 0
    for size in [*cuts, len(raw)]:
        if pos >= len(raw):
            break
        resp = parser.feed(raw[pos : pos + size])
        pos += size
        if resp is not None:
            got.append(resp)
    assert [(r.status, r.body) for r in got] == [(status, body)]
    assert parser.keep_alive is keep_alive


def test_hostpool_modes():
    pool = HostPool(["a", "b", "c"], "hostpool")
    assert [pool.get(0) for _ in range(6)] == ["a", "b", "c", "a", "b", "c"]
    pool.mark("b", False, now=0)
    assert {pool.get(1) for _ in range(6)} == {"a", "c"}  # left alone for 30 s...
    assert "b" in {pool.get(31) for _ in range(3)}  # ...then tried again
    pool.mark("a", False, 31)
    pool.mark("b", False, 31)
    pool.mark("c", False, 31)
    assert {pool.get(32) for _ in range(3)} == {"a", "b", "c"}  # all failed: all tried again
    rr = HostPool(["a", "b"], "round-robin")
    rr.mark("a", False, 0)
    assert [rr.get(0) for _ in range(4)] == ["a", "b", "a", "b"]  # Go's round-robin ignores failures
    greedy = HostPool(["slow", "fast"], "epsilon-greedy")
    greedy.mark("slow", True, 0, duration=0.5)
    greedy.mark("fast", True, 0, duration=0.01)
    picks = Counter(greedy.get(1) for _ in range(1000))
    assert picks["fast"] > picks["slow"] * 2
    assert TimerMetrics(2, "[x]:").status(0.001) is None
    t = TimerMetrics(2, "[x]:")
    t.status(0.001)
    assert t.status(0.003) == "[x]: finished 2 requests - 99th: 3.00ms - 95th: 3.00ms - avg: 2.00ms"


# ---------------------------------------------------------------- end to end


def test_100k_messages_posted_through_an_endpoint_restart(nsqd, unique, tmp_path):
    create_channel(nsqd, unique, "nsq_to_http")
    bodies = [b"m%06d" % i for i in range(N)]
    mpub_http(nsqd, unique, bodies)
    sink = Sink(tmp_path / "first.out")
    tool = start_tool(f"--topic={unique}", f"--nsqd-tcp-address={nsqd.tcp_address}", f"--post={sink.url()}", "--status-every=0", *FAST_RETRY)
    started = time.monotonic()
    try:
        wait_for(lambda: len(sink.records()) >= N // 3, timeout=90, interval=0.05, message="a third posted")
        sink.stop(signal.SIGKILL)  # the endpoint dies without warning...
        sink2 = Sink(tmp_path / "second.out", port=sink.port)  # ...and comes back on its port
        try:
            wait_drained(nsqd, unique, "nsq_to_http")
            elapsed = time.monotonic() - started
            assert tool.stop(signal.SIGTERM) == 0
        finally:
            sink2.stop()
    finally:
        tool.kill()
        sink.stop()
    got = Counter(r[3] for r in sink.records() + sink2.records())
    assert set(got) == set(bodies), f"{len(set(bodies) - set(got))} lost"
    # twice only if the endpoint wrote it down but died before answering
    duplicates = sum(got.values()) - N
    assert duplicates <= 100, duplicates
    failed = [line for line in tool.lines if "failed for message" in line]
    assert failed, "the restart was not noticed"
    print(f"\npynsq_to_http: {N} POSTs in {elapsed:.1f}s through an endpoint restart ({N / elapsed:,.0f}/s), "
          f"{len(failed)} failed attempts requeued, {duplicates} delivered twice")


def test_get_template_headers_and_modes(nsqd, unique, tmp_path):
    a, b = Sink(tmp_path / "a.out", f"--headers-out={tmp_path / 'a.headers'}"), Sink(tmp_path / "b.out")
    try:
        # GET: the message URL-escaped into the template; round-robin over both
        create_channel(nsqd, unique, "get")
        mpub_http(nsqd, unique, [b"a b&c/%d" % i for i in range(20)])
        tool = start_tool(f"--topic={unique}", "--channel=get", f"--nsqd-tcp-address={nsqd.tcp_address}", "--mode=round-robin",
                          f"--get={a.url('/g')}?data=%s", f"--get={b.url('/g')}?data=%s", "--header=X-Test: yes")
        try:
            wait_drained(nsqd, unique, "get")
        finally:
            assert tool.stop() == 0
        ra, rb = a.records(), b.records()
        assert len(ra) == len(rb) == 10
        assert sorted(r[3] for r in ra + rb) == sorted(b"data=a+b%%26c%%2F%d" % i for i in range(20))
        assert all(r[0] == b"GET" and r[1] == b"/g" for r in ra + rb)
        headers = (tmp_path / "a.headers").read_text()
        assert "x-test: yes" in headers and "user-agent: pynsq_to_http/" in headers

        # POST, multicast: every message to both, with the content type
        topic2 = unique + "_post"
        create_channel(nsqd, topic2, "nsq_to_http")
        mpub_http(nsqd, topic2, [b'{"n": %d}' % i for i in range(15)])
        tool = start_tool(f"--topic={topic2}", f"--nsqd-tcp-address={nsqd.tcp_address}", "--mode=multicast",
                          f"--post={a.url('/p')}", f"--post={b.url('/p')}", "--content-type=application/json")
        try:
            wait_drained(nsqd, topic2, "nsq_to_http")
        finally:
            assert tool.stop() == 0
        for sink in (a, b):
            posts = [r for r in sink.records() if r[0] == b"POST"]
            assert sorted(r[3] for r in posts) == sorted(b'{"n": %d}' % i for i in range(15))
            assert {r[2] for r in posts} == {b"application/json"}
    finally:
        a.stop()
        b.stop()


@pytest.mark.parametrize("sink_args, method, delivered", [
    (["--fail=5", "--fail-status=503"], "post", True),  # 5xx: requeued, delivered later
    (["--status=201"], "get", False),  # GET wants 200 exactly, as Go: never finished
    (["--status=201"], "post", True),  # POST takes any 2xx
])
def test_status_codes(nsqd, unique, tmp_path, sink_args, method, delivered):
    sink = Sink(tmp_path / "s.out", *sink_args)
    topic = unique
    create_channel(nsqd, topic, "nsq_to_http")
    mpub_http(nsqd, topic, [b"s%d" % i for i in range(10)])
    target = f"--post={sink.url()}" if method == "post" else f"--get={sink.url()}?d=%s"
    tool = start_tool(f"--topic={topic}", f"--nsqd-tcp-address={nsqd.tcp_address}", target, *FAST_RETRY)
    try:
        if delivered:
            wait_drained(nsqd, topic, "nsq_to_http")
            assert sorted(r[3] for r in sink.records()) == sorted(b"s%d" % i for i in range(10))
        else:
            wait_for(lambda: sum("got status code 201" in line for line in tool.lines) >= 10, message="refused answers")
            assert channel_stats(nsqd, topic, "nsq_to_http")["depth"] + channel_stats(nsqd, topic, "nsq_to_http")["in_flight_count"] \
                + channel_stats(nsqd, topic, "nsq_to_http")["deferred_count"] == 10
    finally:
        tool.stop()
        sink.stop()


@pytest.mark.parametrize("args, message", [
    (["--get=http://127.0.0.1:1/nothing"], "pynsq_to_http: invalid GET address - must be a printf string"),
    (["--post=http://x/", "--mode=bogus"], "pynsq_to_http: invalid --mode 'bogus' (round-robin, hostpool, epsilon-greedy or multicast)"),
    (["--post=http://x/", "--header=novalue"], "pynsq_to_http: --header value format should be 'key:value'"),
    (["--get=http://x/%s", "--content-type=text/plain"], "pynsq_to_http: --content-type only used with --post"),
    (["--post=http://x/", "--sample=2"], "pynsq_to_http: ERROR: --sample must be between 0.0 and 1.0"),
    ([], "pynsq_to_http: --get or --post required"),
])
def test_bad_settings(args, message):
    p = subprocess.run([*tool_command("nsq_to_http"), "--topic=t", "--nsqd-tcp-address=127.0.0.1:1", *args], capture_output=True, text=True, timeout=30)
    assert p.returncode == 1 and p.stderr.strip() == message
