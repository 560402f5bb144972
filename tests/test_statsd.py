"""statsd: nsqd's metric names and types, counters as deltas, packets up to
the size asked for -- the line builder directly, then a daemon pushing to a
real UDP socket."""

from __future__ import annotations

import socket
import time

import pytest

from helpers import RawClient, start_nsqd
from pynsqd.statsd import StatsdReport, host_key, make_prefix, pack, percentile_suffix


def topic(name: str, *channels: dict, **fields) -> dict:
    t = {
        "topic_name": name,
        "channels": list(channels),
        "depth": 0,
        "backend_depth": 0,
        "message_count": 0,
        "message_bytes": 0,
        "paused": False,
        "e2e_processing_latency": {"count": 0, "percentiles": None},
    }
    t.update(fields)
    return t


def channel(name: str, **fields) -> dict:
    c = {
        "channel_name": name,
        "depth": 0,
        "backend_depth": 0,
        "in_flight_count": 0,
        "deferred_count": 0,
        "message_count": 0,
        "requeue_count": 0,
        "timeout_count": 0,
        "client_count": 0,
        "clients": [],
        "paused": False,
        "e2e_processing_latency": {"count": 0, "percentiles": None},
    }
    c.update(fields)
    return c


def parse(lines: list[str]) -> dict[str, tuple[int, str]]:
    out = {}
    for line in lines:
        assert line.endswith("\n")
        stat, rest = line[:-1].rsplit(":", 1)
        value, kind = rest.split("|")
        out[stat] = (int(value), kind)
    return out


def test_host_key_and_prefix_as_nsqd() -> None:
    assert host_key("nsq-1.example.com:4151") == "nsq-1_example_com_4151"
    assert make_prefix("nsq.%s", "nsq-1.example.com", 4151) == "nsq.nsq-1_example_com_4151."
    assert make_prefix("nsq.%s.", "10.0.0.1", 4151) == "nsq.10_0_0_1_4151."
    assert make_prefix("nsq", "h", 1) == "nsq."
    assert make_prefix("", "h", 1) == ""
    assert make_prefix("x.%s", "::1", 4151) == "x.[__1]_4151."  # Go's JoinHostPort brackets IPv6


def test_percentile_suffix_is_go_percent_0f() -> None:
    assert [percentile_suffix(q) for q in (0.99, 0.5, 1.0, 0.999, 0.95)] == ["99", "50", "100", "100", "95"]


def test_report_names_types_and_deltas() -> None:
    report = StatsdReport("nsq.h_4151.")
    e2e = {"count": 3, "percentiles": [{"quantile": 0.99, "value": 2_500_000}, {"quantile": 0.5, "value": 1_000}]}
    first = parse(
        report.lines(
            [
                topic(
                    "t",
                    channel("c", depth=4, backend_depth=1, in_flight_count=2, deferred_count=1, message_count=10,
                            requeue_count=3, timeout_count=1, client_count=2, e2e_processing_latency=e2e),
                    depth=5, backend_depth=2, message_count=10, message_bytes=100, e2e_processing_latency=e2e,
                )
            ],
            {"heap_objects": 7, "heap_in_use_bytes": 1024, "gc_total_runs": 4},
        )
    )
    p = "nsq.h_4151."
    assert first == {
        f"{p}topic.t.message_count": (10, "c"),
        f"{p}topic.t.message_bytes": (100, "c"),
        f"{p}topic.t.depth": (5, "g"),
        f"{p}topic.t.backend_depth": (2, "g"),
        f"{p}topic.t.e2e_processing_latency_99": (2_500_000, "g"),
        f"{p}topic.t.e2e_processing_latency_50": (1_000, "g"),
        f"{p}topic.t.channel.c.message_count": (10, "c"),
        f"{p}topic.t.channel.c.depth": (4, "g"),
        f"{p}topic.t.channel.c.backend_depth": (1, "g"),
        f"{p}topic.t.channel.c.in_flight_count": (2, "g"),
        f"{p}topic.t.channel.c.deferred_count": (1, "g"),
        f"{p}topic.t.channel.c.requeue_count": (3, "c"),
        f"{p}topic.t.channel.c.timeout_count": (1, "c"),
        f"{p}topic.t.channel.c.clients": (2, "g"),
        f"{p}topic.t.channel.c.e2e_processing_latency_99": (2_500_000, "g"),
        f"{p}topic.t.channel.c.e2e_processing_latency_50": (1_000, "g"),
        f"{p}mem.heap_objects": (7, "g"),
        f"{p}mem.heap_idle_bytes": (0, "g"),
        f"{p}mem.heap_in_use_bytes": (1024, "g"),
        f"{p}mem.heap_released_bytes": (0, "g"),
        f"{p}mem.gc_pause_usec_100": (0, "g"),
        f"{p}mem.gc_pause_usec_99": (0, "g"),
        f"{p}mem.gc_pause_usec_95": (0, "g"),
        f"{p}mem.next_gc_bytes": (0, "g"),
        f"{p}mem.gc_runs": (4, "c"),
    }
    # counters are the change since the previous push, gauges the current value
    second = parse(
        report.lines(
            [topic("t", channel("c", message_count=15, requeue_count=3, timeout_count=1), depth=1, message_count=15, message_bytes=150)],
            {"gc_total_runs": 6},
        )
    )
    assert second[f"{p}topic.t.message_count"] == (5, "c")
    assert second[f"{p}topic.t.message_bytes"] == (50, "c")
    assert second[f"{p}topic.t.depth"] == (1, "g")
    assert second[f"{p}topic.t.channel.c.message_count"] == (5, "c")
    assert second[f"{p}topic.t.channel.c.requeue_count"] == (0, "c")
    assert second[f"{p}mem.gc_runs"] == (2, "c")
    # percentiles None (no e2e tracking): no latency lines
    assert not any("e2e" in k for k in second)
    # a deleted and re-created topic starts its counters again from its new total
    third = parse(report.lines([topic("t", message_count=2, message_bytes=20)]))
    assert third[f"{p}topic.t.message_count"] == (2, "c")
    assert not any(k.startswith(f"{p}mem.") for k in third)


def test_report_excludes_ephemeral_when_asked() -> None:
    stats = [topic("e#ephemeral", channel("c")), topic("t", channel("c"), channel("tail#ephemeral"))]
    kept = parse(StatsdReport("", exclude_ephemeral=True).lines(stats))
    assert not any("ephemeral" in k for k in kept)
    assert "topic.t.channel.c.depth" in kept
    everything = parse(StatsdReport("").lines(stats))
    assert "topic.e#ephemeral.depth" in everything and "topic.t.channel.tail#ephemeral.depth" in everything


def test_pack_never_splits_a_line_and_respects_the_size() -> None:
    lines = [f"nsq.h.topic.t{i}.depth:{i}|g\n" for i in range(100)]
    for size in (30, 64, 508, 1432):
        packets = pack(lines, size)
        assert b"".join(packets).decode() == "".join(lines)
        for packet in packets:
            assert len(packet) <= size
            assert packet.endswith(b"\n")
        # packets are filled: the next line would not have fitted
        for packet, nxt in zip(packets, packets[1:]):
            assert len(packet) + len(nxt.split(b"\n", 1)[0]) + 1 > size
    # a line longer than a packet goes alone, as Go's bufio writes it through
    long = "x" * 100 + ":1|g\n"
    assert pack(["a:1|g\n", long, "b:1|g\n"], 50) == [b"a:1|g\n", long.encode(), b"b:1|g\n"]
    assert pack([], 508) == []


@pytest.fixture
def udp_listener():
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(0.5)
    yield sock
    sock.close()


def receive_until(sock: socket.socket, predicate, timeout: float = 20.0) -> list[bytes]:
    """Datagrams until ``predicate(all so far)`` holds."""
    got: list[bytes] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            got.append(sock.recv(65536))
        except socket.timeout:
            continue
        if predicate(got):
            return got
    raise AssertionError(f"statsd datagrams never satisfied the condition; got {got[-10:]}")


def lines_of(packets: list[bytes]) -> list[tuple[str, int, str]]:
    out = []
    for packet in packets:
        for line in packet.decode().splitlines():
            stat, rest = line.rsplit(":", 1)
            value, kind = rest.split("|")
            out.append((stat, int(value), kind))
    return out


def test_daemon_pushes_nsqd_metrics_over_udp(tmp_path, udp_listener) -> None:
    port = udp_listener.getsockname()[1]
    d = start_nsqd(
        str(tmp_path),
        f"--statsd-address=127.0.0.1:{port}",
        "--statsd-interval=100ms",
        "--statsd-udp-packet-size=200",
        "--statsd-exclude-ephemeral",
        "--broadcast-address=nsq.test.local",
        "--e2e-processing-latency-percentile=0.99",
    )
    try:
        prefix = f"nsq.nsq_test_local_{d.http_port}."
        with RawClient(d.tcp_port) as c:
            c.identify(feature_negotiation=True, output_buffer_timeout=25)
            c.sub("stats", "workers")
            assert c.mpub("stats", [b"x" * 10] * 7).data == b"OK"
            c.cmd(b"RDY", "7")
            for _ in range(7):
                c.cmd(b"FIN", c.read_message()[2])
            with RawClient(d.tcp_port) as e:
                assert e.pub("hidden#ephemeral", b"y").data == b"OK"

                # counters are deltas: summed over the pushes they give the totals
                def totals_reached(packets: list[bytes]) -> bool:
                    sums: dict[str, int] = {}
                    for stat, value, kind in lines_of(packets):
                        if kind == "c":
                            sums[stat] = sums.get(stat, 0) + value
                    return (
                        sums.get(f"{prefix}topic.stats.message_count") == 7
                        and sums.get(f"{prefix}topic.stats.channel.workers.message_count") == 7
                        and any(s == f"{prefix}topic.stats.channel.workers.e2e_processing_latency_99" and v > 0 for s, v, _ in lines_of(packets))
                        # the memory lines close a push
                        and f"{prefix}mem.gc_runs" in sums
                    )

                packets = receive_until(udp_listener, totals_reached)
        for packet in packets:
            assert len(packet) <= 200
        seen = lines_of(packets)
        kinds = {stat[len(prefix):]: kind for stat, _, kind in seen}
        assert all(stat.startswith(prefix) for stat, _, _ in seen)
        assert kinds["topic.stats.message_bytes"] == "c"
        assert kinds["topic.stats.depth"] == "g"
        assert kinds["topic.stats.backend_depth"] == "g"
        assert kinds["topic.stats.channel.workers.in_flight_count"] == "g"
        assert kinds["topic.stats.channel.workers.clients"] == "g"
        assert kinds["topic.stats.channel.workers.requeue_count"] == "c"
        assert kinds["topic.stats.channel.workers.timeout_count"] == "c"
        assert kinds["mem.heap_in_use_bytes"] == "g"
        assert kinds["mem.gc_runs"] == "c"
        assert sum(v for s, v, _ in seen if s == f"{prefix}topic.stats.message_bytes") == 70
        assert not any("ephemeral" in stat for stat, _, _ in seen)
        assert any("STATSD: pushing stats" in line for line in d.lines)
    finally:
        d.stop()
