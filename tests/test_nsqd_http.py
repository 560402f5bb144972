"""nsqd's HTTP API against a real pynsqd subprocess."""

from __future__ import annotations

import json
import socket
import struct

from helpers import RawClient, wait_for


def topic_stats(nsqd, topic: str) -> dict:
    for t in nsqd.stats(topic)["topics"]:
        if t["topic_name"] == topic:
            return t
    return {}


def raw_http(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request)
        chunks = []
        while True:
            data = s.recv(65536)
            if not data:
                break
            chunks.append(data)
    return b"".join(chunks)


def test_ping_and_info(nsqd):
    assert nsqd.http("GET", "/ping") == (200, b"OK")
    info = nsqd.json("/info")
    assert info["version"] == "1.3.0"
    assert info["tcp_port"] == nsqd.tcp_port and info["http_port"] == nsqd.http_port
    assert info["max_heartbeat_interval"] == 60_000_000_000
    assert info["max_output_buffer_size"] == 65536
    assert info["max_output_buffer_timeout"] == 30_000_000_000
    assert info["max_deflate_level"] == 6
    assert set(info) >= {"broadcast_address", "hostname", "start_time", "topology_zone", "topology_region"}


def test_pub_and_defer(nsqd, unique):
    assert nsqd.http("POST", f"/pub?topic={unique}", b"hello") == (200, b"OK")
    assert nsqd.http("POST", f"/pub?topic={unique}&defer=500", b"later") == (200, b"OK")
    c = RawClient(nsqd.tcp_port)
    c.identify(feature_negotiation=True, output_buffer_timeout=25)
    c.sub(unique, "ch")
    c.cmd(b"RDY", "5")
    assert c.read_message()[3] == b"hello"
    assert c.read_message(timeout=10)[3] == b"later"
    c.close()


def test_pub_errors(nsqd, unique):
    assert nsqd.http("POST", f"/pub?topic={unique}", b"") == (400, b'{"message":"MSG_EMPTY"}')
    assert nsqd.http("POST", "/pub", b"x") == (400, b'{"message":"MISSING_ARG_TOPIC"}')
    assert nsqd.http("POST", "/pub?topic=bad$", b"x") == (400, b'{"message":"INVALID_TOPIC"}')
    assert nsqd.http("POST", f"/pub?topic={unique}&defer=abc", b"x") == (400, b'{"message":"INVALID_DEFER"}')
    assert nsqd.http("POST", f"/pub?topic={unique}&defer=-1", b"x") == (400, b'{"message":"INVALID_DEFER"}')
    assert nsqd.http("POST", f"/pub?topic={unique}&defer=3600001", b"x") == (400, b'{"message":"INVALID_DEFER"}')
    assert nsqd.http("POST", f"/pub?topic={unique}", b"x" * 1048577) == (413, b'{"message":"MSG_TOO_BIG"}')
    assert nsqd.http("GET", f"/pub?topic={unique}") == (405, b'{"message":"METHOD_NOT_ALLOWED"}')
    assert nsqd.http("GET", "/nope") == (404, b'{"message":"NOT_FOUND"}')
    assert topic_stats(nsqd, unique)["message_count"] == 0


def test_mpub_text_and_binary(nsqd, unique):
    assert nsqd.http("POST", f"/mpub?topic={unique}", b"a\nb\n\nc\n") == (200, b"OK")
    body = struct.pack(">i", 2) + struct.pack(">i", 3) + b"d\ne" + struct.pack(">i", 1) + b"f"
    assert nsqd.http("POST", f"/mpub?topic={unique}&binary=true", body) == (200, b"OK")
    assert topic_stats(nsqd, unique)["message_count"] == 5
    bad = struct.pack(">i", 2) + struct.pack(">i", 1) + b"x" + struct.pack(">i", 0)
    assert nsqd.http("POST", f"/mpub?topic={unique}&binary=true", bad)[0] == 413
    assert nsqd.http("POST", f"/mpub?topic={unique}", b"x" * 1048577 + b"\ny") == (413, b'{"message":"MSG_TOO_BIG"}')
    assert nsqd.http("POST", f"/mpub?topic={unique}", b"x\n" * 2621441) == (413, b'{"message":"BODY_TOO_BIG"}')
    assert topic_stats(nsqd, unique)["message_count"] == 5
    c = RawClient(nsqd.tcp_port)
    c.identify(feature_negotiation=True, output_buffer_timeout=25)
    c.sub(unique, "ch")
    c.cmd(b"RDY", "10")
    assert [c.read_message()[3] for _ in range(5)] == [b"a", b"b", b"c", b"d\ne", b"f"]
    c.close()


def test_topic_and_channel_admin(nsqd, unique):
    assert nsqd.http("POST", f"/topic/create?topic={unique}") == (200, b"")
    assert nsqd.http("POST", "/topic/create") == (400, b'{"message":"MISSING_ARG_TOPIC"}')
    assert nsqd.http("POST", "/topic/create?topic=a$") == (400, b'{"message":"INVALID_TOPIC"}')
    assert nsqd.http("POST", f"/channel/create?topic={unique}&channel=c1") == (200, b"")
    assert nsqd.http("POST", f"/channel/create?topic={unique}") == (400, b'{"message":"MISSING_ARG_CHANNEL"}')
    assert nsqd.http("POST", f"/channel/create?topic={unique}&channel=b$") == (400, b'{"message":"INVALID_ARG_CHANNEL"}')
    assert nsqd.http("POST", "/channel/create?topic=b$&channel=x") == (400, b'{"message":"INVALID_ARG_TOPIC"}')
    assert nsqd.http("POST", "/channel/create?topic=missing-topic&channel=x") == (404, b'{"message":"TOPIC_NOT_FOUND"}')
    assert [c["channel_name"] for c in topic_stats(nsqd, unique)["channels"]] == ["c1"]
    # empty
    nsqd.http("POST", f"/mpub?topic={unique}", b"1\n2\n3")
    assert topic_stats(nsqd, unique)["channels"][0]["depth"] == 3
    assert nsqd.http("POST", f"/channel/empty?topic={unique}&channel=c1") == (200, b"")
    assert topic_stats(nsqd, unique)["channels"][0]["depth"] == 0
    assert nsqd.http("POST", f"/channel/empty?topic={unique}&channel=zz") == (404, b'{"message":"CHANNEL_NOT_FOUND"}')
    assert nsqd.http("POST", f"/topic/pause?topic={unique}") == (200, b"")
    nsqd.http("POST", f"/pub?topic={unique}", b"held")
    assert topic_stats(nsqd, unique)["depth"] == 1
    assert nsqd.http("POST", f"/topic/empty?topic={unique}") == (200, b"")
    assert topic_stats(nsqd, unique)["depth"] == 0
    assert nsqd.http("POST", f"/topic/unpause?topic={unique}") == (200, b"")
    assert nsqd.http("POST", "/topic/pause?topic=missing-topic") == (404, b'{"message":"TOPIC_NOT_FOUND"}')
    assert nsqd.http("POST", "/topic/empty?topic=missing-topic") == (404, b'{"message":"TOPIC_NOT_FOUND"}')
    # delete
    assert nsqd.http("POST", f"/channel/delete?topic={unique}&channel=c1") == (200, b"")
    assert nsqd.http("POST", f"/channel/delete?topic={unique}&channel=c1") == (404, b'{"message":"CHANNEL_NOT_FOUND"}')
    assert nsqd.http("POST", f"/topic/delete?topic={unique}") == (200, b"")
    assert nsqd.http("POST", f"/topic/delete?topic={unique}") == (404, b'{"message":"TOPIC_NOT_FOUND"}')
    assert topic_stats(nsqd, unique) == {}


def test_delete_channel_closes_its_consumers(nsqd, unique):
    c = RawClient(nsqd.tcp_port)
    c.identify(feature_negotiation=True)
    c.sub(unique, "ch")
    assert nsqd.http("POST", f"/channel/delete?topic={unique}&channel=ch") == (200, b"")
    assert c.closed_by_server()


def test_config(nsqd):
    assert nsqd.http("GET", "/config/mem_queue_size") == (200, b"10000")
    assert nsqd.http("GET", "/config/msg_timeout") == (200, b"10000000000")
    assert nsqd.http("GET", "/config/nsqlookupd_tcp_addresses") == (200, b"[]")
    assert nsqd.http("GET", "/config/nope") == (400, b'{"message":"INVALID_OPTION"}')
    assert nsqd.http("PUT", "/config/log_level", b"warn") == (200, b"warn")
    assert nsqd.http("PUT", "/config/log_level", b"loud") == (400, b'{"message":"INVALID_VALUE"}')
    assert nsqd.http("PUT", "/config/log_level", b"debug") == (200, b"debug")
    assert nsqd.http("PUT", "/config/mem_queue_size", b"5") == (400, b'{"message":"INVALID_OPTION"}')


def test_stats_shapes_and_filters(nsqd, unique):
    nsqd.http("POST", f"/topic/create?topic={unique}")
    nsqd.http("POST", f"/channel/create?topic={unique}&channel=x")
    nsqd.http("POST", f"/channel/create?topic={unique}&channel=y")
    nsqd.http("POST", f"/pub?topic={unique}", b"12345")
    full = nsqd.json(f"/stats?format=json&topic={unique}")
    assert set(full) == {"version", "health", "start_time", "topics", "memory", "producers"}
    (t,) = full["topics"]
    assert t["topic_name"] == unique and t["message_count"] == 1 and t["message_bytes"] == 5
    assert [c["channel_name"] for c in t["channels"]] == ["x", "y"]
    assert all(c["depth"] == 1 and c["message_count"] == 1 for c in t["channels"])
    only_y = nsqd.json(f"/stats?format=json&topic={unique}&channel=y")
    assert [c["channel_name"] for c in only_y["topics"][0]["channels"]] == ["y"]
    no_mem = nsqd.json(f"/stats?format=json&topic={unique}&include_mem=false")
    assert "memory" not in no_mem
    status, text = nsqd.http("GET", f"/stats?topic={unique}")
    assert status == 200 and f"[{unique}".encode() in text and b"Health: OK" in text


def test_keep_alive_and_headers(nsqd, unique):
    req = (
        f"POST /pub?topic={unique} HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\na"
        f"POST /pub?topic={unique} HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nConnection: close\r\n\r\nb"
    ).encode()
    resp = raw_http(nsqd.http_port, req)
    assert resp.count(b"HTTP/1.1 200") == 2
    assert b"X-NSQ-Content-Type: nsq; version=1.0" in resp
    wait_for(lambda: topic_stats(nsqd, unique).get("message_count") == 2)


def test_malformed_http_request(nsqd):
    resp = raw_http(nsqd.http_port, b"GARBAGE\r\n\r\n")
    assert resp.startswith(b"HTTP/1.1 400")
    assert nsqd.http("GET", "/ping") == (200, b"OK")


def test_stats_counts_match_what_happened(nsqd, unique):
    c = RawClient(nsqd.tcp_port)
    c.identify(feature_negotiation=True, output_buffer_timeout=25)
    c.sub(unique, "ch")
    c.cmd(b"RDY", "10")
    p = RawClient(nsqd.tcp_port)  # stays connected: /stats lists connected producers
    p.mpub(unique, [b"1", b"2", b"3", b"4"])
    msgs = [c.read_message() for _ in range(4)]
    c.cmd(b"FIN", msgs[0][2])
    c.cmd(b"FIN", msgs[1][2])
    c.cmd(b"REQ", msgs[2][2], "0")
    redelivered = c.read_message()
    c.cmd(b"FIN", redelivered[2])

    def settled():
        st = nsqd.stats(unique)
        t = [t for t in st["topics"] if t["topic_name"] == unique][0]
        ch = t["channels"][0]
        return ch["in_flight_count"] == 1 and ch["clients"][0]["finish_count"] == 3 and (st, t, ch)

    st, t, ch = wait_for(settled)
    assert (t["message_count"], t["depth"]) == (4, 0)
    assert (ch["message_count"], ch["requeue_count"], ch["depth"], ch["client_count"]) == (4, 1, 0, 1)
    client = ch["clients"][0]
    assert (client["message_count"], client["finish_count"], client["requeue_count"], client["in_flight_count"], client["ready_count"]) == (5, 3, 1, 1, 10)
    producers = [p for p in st["producers"] if any(pc["topic"] == unique for pc in p.get("pub_counts", []))]
    assert producers and producers[0]["pub_counts"] == [{"topic": unique, "count": 4}]
    json.dumps(st)
    c.close()
    p.close()
