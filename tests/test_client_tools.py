"""The console scripts: pynsq_to_nsq, pynsq_tail, pynsq_stat against a real pynsqd."""

from __future__ import annotations

import subprocess
import sys

from pynsqd.client.tools.stat import ChannelSample, header, row, sum_channel
from pynsqd.client.tools.to_nsq import split_records

TOOL = [sys.executable, "-c", "import sys; from pynsqd.client.tools.{0} import main; sys.exit(main())"]


def tool(name: str, *args: str, stdin: bytes = b"", timeout: float = 30) -> subprocess.CompletedProcess:
    cmd = [TOOL[0], TOOL[1], TOOL[2].format(name), *args]
    return subprocess.run(cmd, input=stdin, capture_output=True, timeout=timeout)


def test_split_records():
    assert split_records(b"a\nb\n\nc", b"\n") == ([b"a", b"b"], b"c")
    assert split_records(b"x,y,", b",") == ([b"x", b"y"], b"")


def test_stat_sums_channels_over_nsqds_and_formats_rates():
    doc = {"topics": [{"topic_name": "t", "channels": [{"channel_name": "c", "depth": 5, "backend_depth": 2, "in_flight_count": 1,
                                                         "deferred_count": 0, "message_count": 10, "requeue_count": 1,
                                                         "timeout_count": 0, "client_count": 2},
                                                        {"channel_name": "other", "depth": 100}]}]}
    s = sum_channel([doc, doc], "t", "c")
    assert s == ChannelSample(depth=10, backend_depth=4, in_flight=2, deferred=0, requeued=2, timed_out=0, messages=20, clients=4, nsqds=2)
    prev = ChannelSample(depth=0, messages=0)
    line = row(s, prev, 2.0)
    # 20 arrived in 2 s, 10 of them still queued: 10/s in, 5/s out
    assert line.split()[:2] == ["10", "5"]
    assert "ingress" in header()


def test_to_nsq_then_tail_then_stat(nsqd, unique):
    nsqd.http("POST", f"/topic/create?topic={unique}")
    assert nsqd.http("POST", f"/channel/create?topic={unique}&channel=keep")[0] == 200
    lines = b"".join(f"line {i}\n".encode() for i in range(30)) + b"\nno newline"
    p = tool("to_nsq", f"--topic={unique}", f"--nsqd-tcp-address={nsqd.tcp_address}", stdin=lines)
    assert p.returncode == 0, p.stderr
    topic = [t for t in nsqd.stats(unique)["topics"] if t["topic_name"] == unique][0]
    assert topic["message_count"] == 31

    p = tool("stat", f"--topic={unique}", "--channel=keep", f"--nsqd-http-address={nsqd.http_address}", "--count=2", "--status-every=100ms")
    assert p.returncode == 0, p.stderr
    out = p.stdout.decode().splitlines()
    assert "ingress" in out[1] and len(out) == 4
    assert out[2].split()[3:5] == ["31", "31"]  # total depth, in memory

    p = tool("tail", f"--topic={unique}", "--channel=keep", f"--nsqd-tcp-address={nsqd.tcp_address}", "-n", "5")
    assert p.returncode == 0, p.stderr
    assert p.stdout.decode().splitlines() == [f"line {i}" for i in range(5)]
    c = [c for c in nsqd.stats(unique)["topics"][0]["channels"] if c["channel_name"] == "keep"][0]
    # exactly 5 taken; any extra that arrived was handed straight back
    assert c["depth"] == 26 and c["in_flight_count"] == 0

    p = tool("tail", f"--topic={unique}", "--channel=keep", f"--nsqd-tcp-address={nsqd.tcp_address}", "-n", "26", "--print-topic")
    assert p.returncode == 0, p.stderr
    shown = p.stdout.decode().splitlines()
    assert sorted(shown) == sorted([f"{unique} | line {i}" for i in range(5, 30)] + [f"{unique} | no newline"])


def test_tools_flags(nsqd):
    p = tool("tail", "--help")
    assert p.returncode == 0 and b"-lookupd-http-address" in p.stderr and b"-n int" in p.stderr
    p = tool("tail", "--bogus")
    assert p.returncode == 2 and b"flag provided but not defined: -bogus" in p.stderr
    p = tool("to_nsq", "--topic=x")
    assert p.returncode == 1 and b"--nsqd-tcp-address required" in p.stderr
    p = tool("stat", "--version")
    assert p.returncode == 0 and p.stdout.startswith(b"pynsq_stat v1.3.0-compatible")
    p = tool("tail", "--topic=x", f"--nsqd-tcp-address={nsqd.tcp_address}", "--consumer-opt=nonsense,1")
    assert p.returncode == 1 and b"unknown option" in p.stderr
