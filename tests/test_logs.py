"""Logs: ``--log-format=json`` gives one JSON object per stderr line with
stable keys, and ``PUT /config/log_level`` changes what is logged."""

from __future__ import annotations

import json
import re
import socket
import sys
from typing import Any

import pytest

from helpers import Daemon, RawClient, http_request, wait_for

LISTENING = re.compile(r"(TCP|HTTP): listening on (\S+)$")


def start_json_nsqd(data_path: str) -> tuple[Daemon, dict[str, int]]:
    d = Daemon([
        sys.executable, "-m", "pynsqd", "--tcp-address=127.0.0.1:0", "--http-address=127.0.0.1:0",
        f"--data-path={data_path}", "--log-format=json", "--log-level=info",
    ])

    def ports() -> dict[str, int] | None:
        if d.proc.poll() is not None:
            raise AssertionError("daemon exited:\n" + "\n".join(d.lines))
        found = {}
        for line in list(d.lines):
            m = LISTENING.search(json.loads(line)["event"])
            if m:
                found[m.group(1)] = int(m.group(2).rsplit(":", 1)[1])
        return found if len(found) == 2 else None

    return d, wait_for(ports, message="listening events")


def events(d: Daemon) -> list[dict[str, Any]]:
    return [json.loads(line) for line in list(d.lines)]


def local_address(c: RawClient) -> str:
    host, port = c.sock.getsockname()[:2]
    return f"{host}:{port}"


@pytest.fixture
def json_nsqd(tmp_path):
    d, ports = start_json_nsqd(str(tmp_path))
    yield d, ports
    d.stop()


def test_json_logs_one_object_per_line_with_stable_keys(json_nsqd) -> None:
    d, ports = json_nsqd
    http = f"http://127.0.0.1:{ports['HTTP']}"
    with RawClient(ports["TCP"]) as c:
        consumer = local_address(c)
        c.identify(feature_negotiation=True, output_buffer_timeout=25)
        c.sub("logged", "ch")
        c.cmd(b"RDY", "1")
        assert c.pub("logged", b"hello").data == b"OK"
        c.cmd(b"FIN", c.read_message()[2])
        # a protocol error: logged with the client, the connection closed
        c.cmd(b"BOGUS")
        assert c.closed_by_server()
    bad = socket.create_connection(("127.0.0.1", ports["TCP"]))
    bad_address = "%s:%d" % bad.getsockname()[:2]
    bad.sendall(b"  V9")
    assert bad.recv(100).endswith(b"E_BAD_PROTOCOL")
    bad.close()
    assert http_request("POST", f"{http}/channel/create?topic=logged&channel=other")[0] == 200
    assert http_request("POST", f"{http}/channel/delete?topic=logged&channel=other")[0] == 200
    wait_for(lambda: any(e["event"] == "TCP: client closed" and e.get("client") == consumer for e in events(d)), message="close event")
    assert d.stop() == 0

    # every line, including start-up and shut-down, is one JSON object
    parsed = [json.loads(line) for line in d.lines]
    assert parsed and len(parsed) == len(d.lines)
    for e in parsed:
        assert {"ts", "level", "app", "event"} <= e.keys(), e
        assert e["app"] == "nsqd" and e["level"] in {"debug", "info", "warning", "error", "fatal"}

    def one(event: str, **keys: str) -> dict[str, Any]:
        found = [e for e in parsed if e["event"] == event and all(e.get(k) == v for k, v in keys.items())]
        assert found, (event, keys, parsed)
        return found[0]

    # connection open/close and errors carry the client's remote address as `client`
    one("TCP: new client", client=consumer)
    one("TCP: client closed", client=consumer)
    err = one("client error", client=consumer)
    assert err["level"] == "error" and "BOGUS" in err["error"]
    one("client bad protocol magic", client=bad_address)
    # topics and channels carry `topic` / `channel`
    one("TOPIC: created", topic="logged")
    one("new channel", topic="logged", channel="ch")
    one("new channel", topic="logged", channel="other")
    one("deleting channel", topic="logged", channel="other")
    one("signal received, shutting down", signal="SIGTERM")


def test_put_config_log_level_changes_what_is_logged(json_nsqd) -> None:
    d, ports = json_nsqd
    http = f"http://127.0.0.1:{ports['HTTP']}"
    assert http_request("PUT", f"{http}/config/log_level", b"error")[0] == 200
    with RawClient(ports["TCP"]) as quiet:
        quiet_address = local_address(quiet)
        assert quiet.pub("levels", b"x").data == b"OK"  # the server has seen this connection
    assert http_request("GET", f"{http}/config/log_level") == (200, b"error")
    assert http_request("PUT", f"{http}/config/log_level", b"loud")[0] == 400
    assert http_request("PUT", f"{http}/config/log_level", b"info")[0] == 200
    with RawClient(ports["TCP"]) as loud:
        loud_address = local_address(loud)
        assert loud.pub("levels", b"y").data == b"OK"
        wait_for(lambda: any(e.get("client") == loud_address for e in events(d)), message="the info-level connection event")
    logged = events(d)
    # lines are written in order: had the first connection been logged, it would be here by now
    assert not any(e["event"] == "TCP: new client" and e.get("client") == quiet_address for e in logged)
    assert any(e["event"] == "TCP: new client" and e.get("client") == loud_address for e in logged)
    assert any(e["event"] == "log level changed" and e.get("level") == "info" for e in logged)
    # topic creation at level error was not logged either
    assert not any(e["event"] == "TOPIC: created" and e.get("topic") == "levels" for e in logged)
