"""Prometheus ``/metrics`` and the ``/debug`` endpoints: the exposition parsed
by prometheus_client's own parser, unit-level and against a daemon."""

from __future__ import annotations

import json

import pytest
from prometheus_client.parser import text_string_to_metric_families

from helpers import RawClient, start_nsqd, wait_for
from pynsqd.metrics import FAMILIES, escape_label, render_metrics


def families(text: str) -> dict[str, object]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


WEIRD = 'we"ird\\name\nline'


def stats_with(topic_name: str, channel_name: str) -> list[dict]:
    e2e = {"count": 4, "percentiles": [{"quantile": 0.99, "value": 2_500_000}, {"quantile": 0.5, "value": 1_000_000}]}
    return [
        {
            "topic_name": topic_name,
            "depth": 3,
            "backend_depth": 1,
            "message_count": 10,
            "message_bytes": 1000,
            "paused": True,
            "e2e_processing_latency": e2e,
            # a retaining topic (issue 14) and a channel being replayed
            "retention": {"time": 3600 * 10**9, "bytes": 0, "disk_bytes": 2300, "messages": 10, "files": 1,
                          "oldest_timestamp": 1_700_000_000 * 10**9, "newest_timestamp": 1_700_000_001 * 10**9},
            "channels": [
                {
                    "channel_name": channel_name,
                    "depth": 2,
                    "backend_depth": 0,
                    "in_flight_count": 4,
                    "deferred_count": 1,
                    "message_count": 9,
                    "requeue_count": 5,
                    "timeout_count": 6,
                    "client_count": 2,
                    "clients": [],
                    "paused": False,
                    "e2e_processing_latency": e2e,
                    "replay": {"since": 0, "replayed": 7, "done": False},
                }
            ],
        }
    ]


def test_render_parses_with_help_types_and_escaped_labels() -> None:
    stats = stats_with(WEIRD, "ch")
    # the opt-in features' fields, present where they are on (issue 14)
    stats[0].update(disk_bytes=2600, max_disk_bytes=4096, disk_full=False)
    stats[0]["channels"][0].update(max_attempts=5, dead_letter_topic="x.dead", dead_letter_count=7)
    text = render_metrics(stats, version="1.3.0", healthy=True, clients=3, rss_bytes=12345, start_time=1700000000.0)
    fams = families(text)
    # one HELP and one TYPE per family, before its samples
    for name, (typ, help_text) in FAMILIES.items():
        assert text.count(f"# TYPE {name} {typ}\n") == 1, name
        assert text.count(f"# HELP {name} ") == 1, name
    # prometheus_client drops the _total suffix from counter family names
    assert fams["nsqd_topic_messages"].type == "counter"
    assert fams["nsqd_channel_requeued"].type == "counter"
    assert fams["nsqd_channel_depth"].type == "gauge"
    assert fams["nsqd_channel_depth"].documentation == FAMILIES["nsqd_channel_depth"][1]
    got = samples(text)
    t = (("topic", WEIRD),)
    tc = (("channel", "ch"), ("topic", WEIRD))
    assert got[("nsqd_topic_depth", t)] == 3
    assert got[("nsqd_topic_backend_depth", t)] == 1
    assert got[("nsqd_topic_messages_total", t)] == 10
    assert got[("nsqd_topic_message_bytes_total", t)] == 1000
    assert got[("nsqd_topic_paused", t)] == 1
    assert got[("nsqd_channel_in_flight", tc)] == 4
    assert got[("nsqd_channel_deferred", tc)] == 1
    assert got[("nsqd_channel_messages_total", tc)] == 9
    assert got[("nsqd_channel_requeued_total", tc)] == 5
    assert got[("nsqd_channel_timed_out_total", tc)] == 6
    assert got[("nsqd_channel_clients", tc)] == 2
    assert got[("nsqd_channel_paused", tc)] == 0
    assert got[("nsqd_channel_e2e_processing_latency_seconds", (("channel", "ch"), ("quantile", "0.99"), ("topic", WEIRD)))] == pytest.approx(0.0025)
    assert got[("nsqd_topic_e2e_processing_latency_seconds", (("quantile", "0.5"), ("topic", WEIRD)))] == pytest.approx(0.001)
    assert got[("nsqd_channel_e2e_processing_latency_samples", tc)] == 4
    assert (got[("nsqd_topic_disk_bytes", t)], got[("nsqd_topic_max_disk_bytes", t)], got[("nsqd_topic_disk_full", t)]) == (2600, 4096, 0)
    assert got[("nsqd_channel_dead_lettered_total", tc)] == 7
    assert got[("nsqd_info", (("version", "1.3.0"),))] == 1
    assert got[("nsqd_topic_retained_messages", t)] == 10 and got[("nsqd_topic_retained_bytes", t)] == 2300
    assert got[("nsqd_topic_retained_oldest_timestamp_seconds", t)] == 1_700_000_000
    assert got[("nsqd_channel_replayed_total", tc)] == 7
    assert got[("nsqd_healthy", ())] == 1
    assert got[("nsqd_clients", ())] == 3
    assert got[("process_resident_memory_bytes", ())] == 12345
    assert got[("process_start_time_seconds", ())] == 1700000000.0


def test_retention_and_replay_families_appear_only_where_they_are_on() -> None:
    plain = stats_with("t", "c")
    del plain[0]["retention"], plain[0]["channels"][0]["replay"]
    text = render_metrics(plain, version="1.3.0", healthy=True, clients=0, rss_bytes=1, start_time=1.0)
    assert "retained" not in text and "replayed" not in text


def test_escaping_rules() -> None:
    assert escape_label('a"b\\c\nd') == 'a\\"b\\\\c\\nd'


def test_no_e2e_no_latency_samples_and_empty_daemon() -> None:
    stats = stats_with("t", "c")
    stats[0]["e2e_processing_latency"] = {"count": 0, "percentiles": None}
    stats[0]["channels"][0]["e2e_processing_latency"] = {"count": 0, "percentiles": None}
    text = render_metrics(stats, version="1.3.0", healthy=False, clients=0, rss_bytes=1, start_time=0.0)
    assert "e2e" not in text
    assert "_disk_" not in text and "dead_letter" not in text  # features off: none of their families
    assert samples(text)[("nsqd_healthy", ())] == 0
    empty = render_metrics([], version="1.3.0", healthy=True, clients=0, rss_bytes=1, start_time=0.0)
    assert samples(empty)[("nsqd_topics", ())] == 0
    assert "nsqd_topic_depth" not in empty  # no family header without samples


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    d = start_nsqd(str(tmp_path_factory.mktemp("nsqd")), "--e2e-processing-latency-percentile=0.99,0.5", "--msg-timeout=10s")
    yield d
    d.stop()


def test_metrics_endpoint_matches_stats(daemon) -> None:
    with RawClient(daemon.tcp_port) as c:
        c.identify(feature_negotiation=True, output_buffer_timeout=25)
        c.sub("prom", "one")
        assert c.mpub("prom", [b"abc"] * 5).data == b"OK"
        assert daemon.http("POST", "/channel/create?topic=prom&channel=two")[0] == 200
        c.cmd(b"RDY", "2")
        first = c.read_message()
        c.read_message()
        c.cmd(b"FIN", first[2])

        def one_finished() -> dict | None:
            t = daemon.stats("prom")["topics"][0]
            return t if t["channels"][0]["e2e_processing_latency"]["count"] == 1 else None

        topic = wait_for(one_finished, message="the FIN to be counted")
        status, body = daemon.http("GET", "/metrics")
        assert status == 200
        got = samples(body.decode())
        t = (("topic", "prom"),)
        one = (("channel", "one"), ("topic", "prom"))
        two = (("channel", "two"), ("topic", "prom"))
        assert got[("nsqd_topic_messages_total", t)] == 5
        assert got[("nsqd_topic_message_bytes_total", t)] == 15
        assert got[("nsqd_topic_depth", t)] == topic["depth"]
        assert got[("nsqd_topic_channels", t)] == 2
        # RDY 2: after the FIN the third message is in flight at once
        assert got[("nsqd_channel_in_flight", one)] == 2
        assert got[("nsqd_channel_depth", one)] == 2
        assert got[("nsqd_channel_depth", two)] == 0  # created after the MPUB
        assert got[("nsqd_channel_clients", one)] == 1
        assert got[("nsqd_channel_clients", two)] == 0
        assert got[("nsqd_channel_messages_total", one)] == 5
        assert got[("nsqd_channel_e2e_processing_latency_samples", one)] == 1
        assert got[("nsqd_channel_e2e_processing_latency_seconds", (("channel", "one"), ("quantile", "0.99"), ("topic", "prom")))] > 0
        assert got[("nsqd_topic_e2e_processing_latency_samples", t)] == 1
        assert got[("nsqd_clients", ())] >= 1
        assert got[("process_resident_memory_bytes", ())] > 1_000_000
        assert got[("nsqd_info", (("version", "1.3.0"),))] == 1


def test_metrics_content_type(daemon) -> None:
    import urllib.request

    with urllib.request.urlopen(f"http://{daemon.http_address}/metrics", timeout=10) as resp:
        assert resp.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"


def test_debug_tasks_and_stacks(daemon) -> None:
    with RawClient(daemon.tcp_port) as c:
        assert c.pub("dbg", b"x").data == b"OK"
        status, body = daemon.http("GET", "/debug/tasks")
        assert status == 200
        info = json.loads(body)
        assert info["tasks"] == sum(info["by_name"].values()) > 0
        # this connection's reader, writer and heartbeat tasks are there
        assert any("_read_loop" in name for name in info["by_name"])
        assert info["clients"] >= 1 and info["topics"] >= 1
        status, body = daemon.http("GET", "/debug/stacks")
        assert status == 200
        text = body.decode()
        assert "task " in text and "tcp.py" in text
