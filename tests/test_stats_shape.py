"""``/stats`` as nsqadmin and nsq_stat read it.

nsqadmin decodes ``/stats?format=json`` with Go's encoding/json into the
structs of nsq's ``internal/clusterinfo`` (TopicStats, ChannelStats,
ClientStats, quantile.E2eProcessingLatencyAggregate) and ``/info`` into a
small struct; nsqd's own reply also carries ``producers`` (ClientStats with
``pub_counts``) and ``memory``.  ``go_decode`` below applies Go's rules to our
JSON: an ``int64`` field takes only an integral JSON number (``1.0``, ``"1"``,
``true`` are errors), a ``string`` only a string, a ``bool`` only a boolean,
``null`` leaves the zero value, unknown keys are ignored.  Fields nsqd always
writes must also be present: a missing one would show as 0 in nsqadmin.
"""

from __future__ import annotations

import re
import time
from typing import Any

import attrs
import pytest

from helpers import RawClient, start_nsqd, wait_for

# ------------------------------------------------------------------ Go decoding


class GoDecodeError(AssertionError):
    pass


@attrs.frozen
class Int:
    bits: int = 64
    signed: bool = True

    def decode(self, v: Any, path: str) -> None:
        if type(v) is not int:  # bool is not a number for Go; 1.0 does not fit an int
            raise GoDecodeError(f"{path}: json: cannot unmarshal {json_kind(v)} into Go value of type {self.go_name()}")
        lo, hi = (-(1 << (self.bits - 1)), (1 << (self.bits - 1)) - 1) if self.signed else (0, (1 << self.bits) - 1)
        if not lo <= v <= hi:
            raise GoDecodeError(f"{path}: {v} overflows {self.go_name()}")

    def go_name(self) -> str:
        return f"{'' if self.signed else 'u'}int{self.bits}"


class Float64:
    def decode(self, v: Any, path: str) -> None:
        if type(v) not in (int, float):
            raise GoDecodeError(f"{path}: cannot unmarshal {json_kind(v)} into float64")


class String:
    def decode(self, v: Any, path: str) -> None:
        if type(v) is not str:
            raise GoDecodeError(f"{path}: cannot unmarshal {json_kind(v)} into string")


class Bool:
    def decode(self, v: Any, path: str) -> None:
        if type(v) is not bool:
            raise GoDecodeError(f"{path}: cannot unmarshal {json_kind(v)} into bool")


@attrs.frozen
class Slice:
    elem: Any

    def decode(self, v: Any, path: str) -> None:
        if v is None:
            return
        if type(v) is not list:
            raise GoDecodeError(f"{path}: cannot unmarshal {json_kind(v)} into a slice")
        for i, item in enumerate(v):
            go_decode(item, self.elem, f"{path}[{i}]")


@attrs.frozen
class Map:
    elem: Any

    def decode(self, v: Any, path: str) -> None:
        if v is None:
            return
        if type(v) is not dict:
            raise GoDecodeError(f"{path}: cannot unmarshal {json_kind(v)} into a map")
        for k, item in v.items():
            go_decode(item, self.elem, f"{path}.{k}")


@attrs.frozen
class Struct:
    """A Go struct: json tag -> type; ``required`` = tags nsqd always writes."""

    name: str
    fields: dict[str, Any]
    required: frozenset[str] = frozenset()

    def decode(self, v: Any, path: str) -> None:
        if v is None:
            return  # a nil pointer / zero struct
        if type(v) is not dict:
            raise GoDecodeError(f"{path}: cannot unmarshal {json_kind(v)} into Go value of type {self.name}")
        missing = self.required - v.keys()
        if missing:
            raise GoDecodeError(f"{path}: {self.name} fields missing: {sorted(missing)}")
        for tag, typ in self.fields.items():
            if tag in v:
                go_decode(v[tag], typ, f"{path}.{tag}")


def go_decode(v: Any, typ: Any, path: str = "$") -> None:
    typ.decode(v, path)


def json_kind(v: Any) -> str:
    return {bool: "bool", int: "number", float: "number " + repr(v), str: "string", list: "array", dict: "object", type(None): "null"}[type(v)]


INT, INT32, INT64, UINT64 = Int(64), Int(32), Int(64), Int(64, signed=False)

# internal/quantile.E2eProcessingLatencyAggregate
E2E_AGGREGATE = Struct(
    "E2eProcessingLatencyAggregate",
    {"count": INT, "percentiles": Slice(Map(Float64())), "topic": String(), "channel": String(), "host": String()},
    required=frozenset({"count", "percentiles"}),
)

# internal/clusterinfo.ClientStats (nsqd writes authed/auth_* only when set: omitempty)
CLIENT_STATS = Struct(
    "ClientStats",
    {
        "node": String(), "remote_address": String(), "name": String(), "version": String(), "client_id": String(),
        "hostname": String(), "user_agent": String(), "connect_ts": INT64, "connected": INT64,
        "in_flight_count": INT, "ready_count": INT, "finish_count": INT64, "requeue_count": INT64,
        "message_count": INT64, "sample_rate": INT32, "deflate": Bool(), "snappy": Bool(), "authed": Bool(),
        "auth_identity": String(), "auth_identity_url": String(), "tls": Bool(), "tls_cipher_suite": String(),
        "tls_version": String(), "tls_negotiated_protocol": String(), "tls_negotiated_protocol_is_mutual": Bool(),
        # nsqd's own, not read by nsqadmin
        "state": INT32,
        "pub_counts": Slice(Struct("PubCount", {"topic": String(), "count": UINT64}, frozenset({"topic", "count"}))),
    },
    required=frozenset({
        "remote_address", "version", "client_id", "hostname", "user_agent", "connect_ts", "in_flight_count",
        "ready_count", "finish_count", "requeue_count", "message_count", "sample_rate", "deflate", "snappy", "tls",
        "tls_cipher_suite", "tls_version", "tls_negotiated_protocol", "tls_negotiated_protocol_is_mutual", "state",
    }),
)

# internal/clusterinfo.ChannelStats
CHANNEL_STATS = Struct(
    "ChannelStats",
    {
        "node": String(), "hostname": String(), "topic_name": String(), "channel_name": String(), "depth": INT64,
        "memory_depth": INT64, "backend_depth": INT64, "in_flight_count": INT64, "deferred_count": INT64,
        "requeue_count": INT64, "timeout_count": INT64, "message_count": INT64, "nodes": Slice(None),
        "clients": Slice(CLIENT_STATS), "paused": Bool(), "e2e_processing_latency": E2E_AGGREGATE,
        "client_count": INT,  # nsqd's own
    },
    required=frozenset({
        "channel_name", "depth", "backend_depth", "in_flight_count", "deferred_count", "requeue_count",
        "timeout_count", "message_count", "clients", "paused", "e2e_processing_latency", "client_count",
    }),
)

# internal/clusterinfo.TopicStats
TOPIC_STATS = Struct(
    "TopicStats",
    {
        "node": String(), "hostname": String(), "topic_name": String(), "depth": INT64, "memory_depth": INT64,
        "backend_depth": INT64, "message_count": INT64, "nodes": Slice(None), "channels": Slice(CHANNEL_STATS),
        "paused": Bool(), "e2e_processing_latency": E2E_AGGREGATE,
        "message_bytes": UINT64,  # nsqd's own
    },
    required=frozenset({"topic_name", "depth", "backend_depth", "message_count", "message_bytes", "channels", "paused", "e2e_processing_latency"}),
)

MEM_STATS = Struct(
    "memStats",
    {k: UINT64 for k in ("heap_objects", "heap_idle_bytes", "heap_in_use_bytes", "heap_released_bytes", "gc_pause_usec_100",
                          "gc_pause_usec_99", "gc_pause_usec_95", "next_gc_bytes", "gc_total_runs")},
    required=frozenset({"heap_objects", "heap_idle_bytes", "heap_in_use_bytes", "heap_released_bytes", "gc_pause_usec_100",
                        "gc_pause_usec_99", "gc_pause_usec_95", "next_gc_bytes", "gc_total_runs"}),
)

# nsqd's /stats?format=json reply; nsqadmin's GetNSQDStats reads only "topics"
STATS_REPLY = Struct(
    "stats",
    {"version": String(), "health": String(), "start_time": INT64, "topics": Slice(TOPIC_STATS), "memory": MEM_STATS,
     "producers": Slice(CLIENT_STATS)},
    required=frozenset({"version", "health", "start_time", "topics", "producers"}),
)

# nsqadmin's GetNSQDProducers / GetNSQDTopicProducers read /info into this
INFO_REPLY = Struct(
    "infoRespType",
    {"version": String(), "broadcast_address": String(), "hostname": String(), "http_port": INT, "tcp_port": INT},
    required=frozenset({"version", "broadcast_address", "hostname", "http_port", "tcp_port"}),
)


def test_the_decoder_is_as_strict_as_go() -> None:
    go_decode({"count": 1, "percentiles": None}, E2E_AGGREGATE)
    for bad in ({"count": 1.0, "percentiles": None}, {"count": True, "percentiles": []}, {"count": "1", "percentiles": []},
                {"count": 1, "percentiles": [{"value": "1"}]}, {"count": 1}):
        with pytest.raises(GoDecodeError):
            go_decode(bad, E2E_AGGREGATE)
    with pytest.raises(GoDecodeError):
        go_decode({"ready_count": 1 << 70}, Struct("x", {"ready_count": INT}))
    with pytest.raises(GoDecodeError):
        go_decode({"tls": 0}, Struct("x", {"tls": Bool()}))


# ------------------------------------------------------------------ the daemon


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """One topic, two channels, three consumers and a producer, in a known state."""
    d = start_nsqd(str(tmp_path_factory.mktemp("nsqd")), "--e2e-processing-latency-percentile=0.99,0.5", "--msg-timeout=30s")
    clients: list[RawClient] = []
    try:
        assert d.http("POST", "/topic/create?topic=shape")[0] == 200
        assert d.http("POST", "/channel/create?topic=shape&channel=alpha")[0] == 200
        assert d.http("POST", "/channel/create?topic=shape&channel=beta")[0] == 200

        def consumer(client_id: str, channel: str, rdy: int, **identify: Any) -> RawClient:
            c = RawClient(d.tcp_port)
            clients.append(c)
            c.identify(client_id=client_id, hostname=f"{client_id}.example", user_agent=f"shape-test/{client_id}",
                       feature_negotiation=True, output_buffer_timeout=25, **identify)
            assert c.sub("shape", channel).data == b"OK"
            c.cmd(b"RDY", str(rdy))
            return c

        a1 = consumer("a1", "alpha", 2)
        consumer("a2", "alpha", 0, sample_rate=50)
        b1 = consumer("b1", "beta", 1)

        producer = RawClient(d.tcp_port)
        clients.append(producer)
        producer.identify(client_id="producer-1", hostname="producer.example", user_agent="shape-test/producer", feature_negotiation=True)
        for body in (b"one", b"two", b"three"):
            assert producer.pub("shape", body).data == b"OK"
        assert producer.pub("shape-other", b"x").data == b"OK"

        # alpha: a1 gets two, FINs one and REQs the other, then holds two in flight
        first, second = a1.read_message(), a1.read_message()
        a1.cmd(b"FIN", first[2])
        a1.cmd(b"REQ", second[2], "0")
        a1.read_message()
        a1.read_message()
        # beta: b1 holds one
        b1.read_message()

        def settled() -> dict | None:
            s = d.json("/stats?format=json&topic=shape")
            alpha = s["topics"][0]["channels"][0]
            return s if alpha["in_flight_count"] == 2 and alpha["e2e_processing_latency"]["count"] == 1 else None

        wait_for(settled, message="the channels to settle")
        yield d
    finally:
        for c in clients:
            c.close()
        d.stop()


def find(items: list[dict], key: str, value: str) -> dict:
    matches = [i for i in items if i[key] == value]
    assert len(matches) == 1, (key, value, items)
    return matches[0]


def test_stats_json_decodes_into_nsqadmins_structs(cluster) -> None:
    stats = cluster.json("/stats?format=json")
    go_decode(stats, STATS_REPLY)
    go_decode(cluster.json("/info"), INFO_REPLY)

    topic = find(stats["topics"], "topic_name", "shape")
    assert topic["depth"] == 0 and topic["backend_depth"] == 0  # all copied to the channels
    assert topic["message_count"] == 3 and topic["message_bytes"] == len(b"onetwothree")
    assert topic["paused"] is False
    assert [c["channel_name"] for c in topic["channels"]] == ["alpha", "beta"]

    alpha, beta = topic["channels"]
    assert (alpha["depth"], alpha["in_flight_count"], alpha["deferred_count"]) == (0, 2, 0)
    assert (alpha["message_count"], alpha["requeue_count"], alpha["timeout_count"], alpha["client_count"]) == (3, 1, 0, 2)
    assert (beta["depth"], beta["in_flight_count"], beta["message_count"], beta["client_count"]) == (2, 1, 3, 1)
    # nsqadmin computes memory_depth = depth - backend_depth
    assert all(c["depth"] - c["backend_depth"] >= 0 for c in topic["channels"])

    e2e = alpha["e2e_processing_latency"]
    assert e2e["count"] == 1 and [p["quantile"] for p in e2e["percentiles"]] == [0.99, 0.5]
    assert topic["e2e_processing_latency"]["count"] == 1  # beta has no FIN yet

    now = time.time()
    a1 = find(alpha["clients"], "client_id", "a1")
    assert a1["version"] == "V2" and a1["state"] == 3
    assert a1["hostname"] == "a1.example" and a1["user_agent"] == "shape-test/a1"
    assert (a1["ready_count"], a1["in_flight_count"], a1["message_count"], a1["finish_count"], a1["requeue_count"]) == (2, 2, 4, 1, 1)
    assert now - 60 < a1["connect_ts"] <= now + 1
    assert re.fullmatch(r"127\.0\.0\.1:\d+", a1["remote_address"])
    assert a1["tls"] is False and a1["snappy"] is False and a1["deflate"] is False
    a2 = find(alpha["clients"], "client_id", "a2")
    assert (a2["ready_count"], a2["in_flight_count"], a2["sample_rate"]) == (0, 0, 50)
    b1 = find(beta["clients"], "client_id", "b1")
    assert (b1["ready_count"], b1["in_flight_count"], b1["message_count"]) == (1, 1, 1)

    producer = find(stats["producers"], "client_id", "producer-1")
    assert producer["pub_counts"] == [{"topic": "shape", "count": 3}, {"topic": "shape-other", "count": 1}]
    assert producer["user_agent"] == "shape-test/producer"
    assert not any(c.get("pub_counts") for c in alpha["clients"] + beta["clients"])
    assert set(stats["memory"]) == set(MEM_STATS.required)
    assert stats["version"] == "1.3.0" and stats["health"] == "OK"


def test_filters_and_include_flags(cluster) -> None:
    by_topic = cluster.json("/stats?format=json&topic=shape")
    go_decode(by_topic, STATS_REPLY)
    assert [t["topic_name"] for t in by_topic["topics"]] == ["shape"]
    # producers narrowed to the topic, with only that topic's count
    assert [p["pub_counts"] for p in by_topic["producers"]] == [[{"topic": "shape", "count": 3}]]

    by_channel = cluster.json("/stats?format=json&topic=shape&channel=beta")
    assert [c["channel_name"] for c in by_channel["topics"][0]["channels"]] == ["beta"]

    lean = cluster.json("/stats?format=json&include_clients=false&include_mem=false")
    go_decode(lean, STATS_REPLY)
    assert "memory" not in lean
    assert lean["producers"] == []
    shape = find(lean["topics"], "topic_name", "shape")
    assert [c["clients"] for c in shape["channels"]] == [[], []]
    assert [c["client_count"] for c in shape["channels"]] == [2, 1]  # still counted

    assert cluster.json("/stats?format=json&topic=nope")["topics"] == []


def test_text_layout_is_nsqds_printstats(cluster) -> None:
    status, body = cluster.http("GET", "/stats?format=text&topic=shape")
    assert status == 200
    text = body.decode()
    lines = text.split("\n")
    assert lines[0].startswith("nsqd v1.3.0")
    assert re.fullmatch(r"start_time \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(Z|[+-]\d\d:\d\d)", lines[1])
    assert lines[2].startswith("uptime ")
    assert lines[3:6] == ["", "Health: OK", ""]
    assert lines[6] == "Memory:"
    assert [ln.split()[0] for ln in lines[7:16]] == sorted(MEM_STATS.required, key=list(MEM_STATS.fields).index)
    assert all(re.fullmatch(r"   \S+ *\t\d+", ln) for ln in lines[7:16])
    assert lines[16:18] == ["", "Topics:"]
    e2e = r"[0-9.]+(ns|us|ms|s), [0-9.]+(ns|us|ms|s)"
    assert re.fullmatch(rf"   \[shape {{10}}\] depth: 0     be-depth: 0     msgs: 3        e2e%: {e2e}", lines[18])
    assert re.fullmatch(
        rf"      \[alpha {{20}}\] depth: 0     be-depth: 0     inflt: 2    def: 0    re-q: 1     timeout: 0     msgs: 3        e2e%: {e2e}",
        lines[19],
    )
    clients = [ln for ln in lines if ln.startswith("        [V2 ")]
    assert any(
        re.fullmatch(r"        \[V2 a1 {19}\] state: 3 inflt: 2    rdy: 2    fin: 1        re-q: 1        msgs: 4        connected: \d+(m\d+)?s", ln)
        for ln in clients
    ), clients
    beta = lines.index(next(ln for ln in lines if ln.startswith("      [beta")))
    assert re.fullmatch(r"      \[beta {21}\] depth: 2     be-depth: 0     inflt: 1    def: 0    re-q: 0     timeout: 0     msgs: 3        e2e%: 0\.0ns, 0\.0ns", lines[beta])
    tail = lines[lines.index("Producers:") - 1 :]
    assert tail[:2] == ["", "Producers:"]
    assert re.fullmatch(r"   \[V2 producer-1 {11}\] msgs: 3        connected: \d+(m\d+)?s", tail[2])
    assert tail[3:] == ["      [shape          ] msgs: 3       ", ""]


def test_text_layout_without_topics_or_memory(tmp_path) -> None:
    d = start_nsqd(str(tmp_path))
    try:
        status, body = d.http("GET", "/stats?include_mem=false")
        assert status == 200
        lines = body.decode().split("\n")
        assert lines[3:] == ["", "Health: OK", "", "Topics: None", "", "Producers: None", ""]
    finally:
        d.stop()
