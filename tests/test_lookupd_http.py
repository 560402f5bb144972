"""pynsqlookupd as a real process: fake nsqds register over TCP, the HTTP API
answers as nsqlookupd 1.3.0 does."""

from __future__ import annotations

import http.client
import itertools
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from helpers import wait_for

from pynsqd.protocol import MAGIC_V1, V1ResponseDecoder, encode_command

LISTENING = re.compile(r"(TCP|HTTP): listening on (\S+):(\d+)")
START_TIMEOUT = 20.0
_names = itertools.count()


def unique(prefix: str) -> str:
    return f"{prefix}_{next(_names)}"


class LookupdProcess:
    """``python -m pynsqlookupd`` on free ports; stderr drained by a thread."""

    def __init__(self, *args: str, default_addresses: bool = True) -> None:
        argv = [sys.executable, "-m", "pynsqlookupd"]
        if default_addresses:
            argv += ["--tcp-address=127.0.0.1:0", "--http-address=127.0.0.1:0"]
        argv += list(args)
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.ports: dict[str, int] = {}
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()
        with self._changed:
            ok = self._changed.wait_for(lambda: len(self.ports) == 2 or self.proc.poll() is not None, START_TIMEOUT)
        if not ok or len(self.ports) != 2:
            self.proc.kill()
            raise AssertionError("pynsqlookupd did not start:\n" + "".join(self.lines))
        self.tcp_port = self.ports["TCP"]
        self.http_port = self.ports["HTTP"]

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._changed:
                self.lines.append(line)
                m = LISTENING.search(line)
                if m:
                    self.ports[m.group(1)] = int(m.group(3))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def request(self, method: str, path: str) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=10)
        try:
            conn.request(method, path)
            resp = conn.getresponse()
            return resp.status, dict(resp.getheaders()), resp.read()
        finally:
            conn.close()

    def get(self, path: str) -> Any:
        status, _, body = self.request("GET", path)
        assert status == 200, (path, status, body)
        return json.loads(body)

    def post(self, path: str) -> tuple[int, bytes]:
        status, _, body = self.request("POST", path)
        return status, body

    def lookup_nodes(self, topic: str) -> set[str] | None:
        status, _, body = self.request("GET", f"/lookup?topic={topic}")
        if status == 404:
            return None
        return {f"{p['broadcast_address']}:{p['http_port']}" for p in json.loads(body)["producers"]}

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=10)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self._reader.join(timeout=5)


class FakeNsqd:
    """Speaks the lookupd side of nsqd over a raw socket."""

    _ports = itertools.count(20000)

    def __init__(self, lookupd: LookupdProcess, *, broadcast_address: str | None = None) -> None:
        self.http_port = next(self._ports)
        self.tcp_port = self.http_port + 1
        self.broadcast_address = broadcast_address or unique("nsqd-host")
        self.sock = socket.create_connection(("127.0.0.1", lookupd.tcp_port), timeout=10)
        self.sock.sendall(MAGIC_V1)
        self.decoder = V1ResponseDecoder()

    @property
    def node(self) -> str:
        return f"{self.broadcast_address}:{self.http_port}"

    def read_response(self) -> bytes:
        while (r := self.decoder.next_response()) is None:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError
            self.decoder.receive_data(data)
        return r

    def command(self, name: bytes, *params: str, body: bytes | None = None) -> bytes:
        self.sock.sendall(encode_command(name, *params, body=body))
        return self.read_response()

    def identify(self) -> dict[str, Any]:
        body = json.dumps({
            "version": "1.3.0", "tcp_port": self.tcp_port, "http_port": self.http_port,
            "hostname": "fake-box", "broadcast_address": self.broadcast_address,
        }).encode()
        return json.loads(self.command(b"IDENTIFY", body=body))

    def register(self, topic: str, channel: str | None = None) -> None:
        assert self.command(b"REGISTER", topic, *([channel] if channel else [])) == b"OK"

    def unregister(self, topic: str, channel: str | None = None) -> None:
        assert self.command(b"UNREGISTER", topic, *([channel] if channel else [])) == b"OK"

    def ping(self) -> None:
        assert self.command(b"PING") == b"OK"

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def lookupd() -> Iterator[LookupdProcess]:
    proc = LookupdProcess()
    yield proc
    assert proc.stop() == 0, "".join(proc.lines)


@pytest.fixture
def nsqd_factory(lookupd: LookupdProcess) -> Iterator[Callable[[], FakeNsqd]]:
    made: list[FakeNsqd] = []

    def make() -> FakeNsqd:
        fake = FakeNsqd(lookupd)
        fake.identify()
        made.append(fake)
        return fake

    yield make
    for fake in made:
        fake.close()


# ---------------------------------------------------------------- basics


def test_ping_and_info(lookupd: LookupdProcess) -> None:
    status, headers, body = lookupd.request("GET", "/ping")
    assert (status, body) == (200, b"OK")
    status, headers, body = lookupd.request("GET", "/info")
    assert status == 200
    assert json.loads(body) == {"version": "1.3.0"}
    assert headers["X-NSQ-Content-Type"] == "nsq; version=1.0"
    assert headers["Content-Type"].startswith("application/json")


def test_wrong_method_and_unknown_path(lookupd: LookupdProcess) -> None:
    for method, path in [("POST", "/lookup?topic=x"), ("POST", "/topics"), ("GET", "/topic/create?topic=x"),
                         ("PUT", "/nodes"), ("GET", "/channel/delete")]:
        status, _, body = lookupd.request(method, path)
        assert (status, json.loads(body)) == (405, {"message":"METHOD_NOT_ALLOWED"}), (method, path)
    status, _, body = lookupd.request("GET", "/nope")
    assert (status, json.loads(body)) == (404, {"message":"NOT_FOUND"})


def test_lookup_errors(lookupd: LookupdProcess) -> None:
    status, _, body = lookupd.request("GET", f"/lookup?topic={unique('unknown')}")
    assert (status, json.loads(body)) == (404, {"message":"TOPIC_NOT_FOUND"})
    status, _, body = lookupd.request("GET", "/lookup")
    assert (status, json.loads(body)) == (400, {"message":"MISSING_ARG_TOPIC"})
    status, _, body = lookupd.request("GET", "/channels")
    assert (status, json.loads(body)) == (400, {"message":"MISSING_ARG_TOPIC"})


def test_bad_protocol_magic(lookupd: LookupdProcess) -> None:
    with socket.create_connection(("127.0.0.1", lookupd.tcp_port), timeout=10) as sock:
        sock.sendall(b"  V2")
        data = b""
        while chunk := sock.recv(100):
            data += chunk
    assert data == b"\x00\x00\x00\x0eE_BAD_PROTOCOL"


def test_tcp_errors_close_the_connection(lookupd: LookupdProcess) -> None:
    fake = FakeNsqd(lookupd)
    try:
        assert fake.command(b"REGISTER", "t") == b"E_INVALID client must IDENTIFY"
        assert fake.sock.recv(10) == b""
    finally:
        fake.close()


# ---------------------------------------------------------------- registrations


def test_identify_reply(lookupd: LookupdProcess) -> None:
    fake = FakeNsqd(lookupd)
    try:
        info = fake.identify()
    finally:
        fake.close()
    assert sorted(info) == ["broadcast_address", "hostname", "http_port", "tcp_port", "version"]
    assert (info["tcp_port"], info["http_port"], info["version"]) == (lookupd.tcp_port, lookupd.http_port, "1.3.0")


def test_register_lookup_topics_channels_nodes(lookupd: LookupdProcess, nsqd_factory: Callable[[], FakeNsqd]) -> None:
    topic = unique("orders")
    a, b = nsqd_factory(), nsqd_factory()
    a.register(topic, "billing")
    a.register(topic, "audit")
    b.register(topic, "billing")
    b.register(unique("other"))

    data = lookupd.get(f"/lookup?topic={topic}")
    assert sorted(data) == ["channels", "producers"]
    assert sorted(data["channels"]) == ["audit", "billing"]
    producers = sorted(data["producers"], key=lambda p: p["http_port"])
    assert [list(p) for p in producers] == [
        ["remote_address", "hostname", "broadcast_address", "tcp_port", "http_port", "version"]
    ] * 2
    assert producers[0]["broadcast_address"] == a.broadcast_address
    assert (producers[0]["tcp_port"], producers[0]["http_port"]) == (a.tcp_port, a.http_port)
    assert producers[0]["hostname"] == "fake-box" and producers[0]["version"] == "1.3.0"
    assert producers[0]["remote_address"] == "127.0.0.1:%d" % a.sock.getsockname()[1]

    assert topic in lookupd.get("/topics")["topics"]
    assert sorted(lookupd.get(f"/channels?topic={topic}")["channels"]) == ["audit", "billing"]
    assert lookupd.get(f"/channels?topic={unique('none')}") == {"channels": []}

    nodes = {n["broadcast_address"]: n for n in lookupd.get("/nodes")["producers"]}
    node_a = nodes[a.broadcast_address]
    assert list(node_a) == [
        "remote_address", "hostname", "broadcast_address", "tcp_port", "http_port", "version", "tombstones", "topics",
    ]
    assert (node_a["topics"], node_a["tombstones"]) == ([topic], [False])
    assert len(nodes[b.broadcast_address]["topics"]) == 2


def test_disconnect_removes_registrations(lookupd: LookupdProcess, nsqd_factory: Callable[[], FakeNsqd]) -> None:
    topic = unique("gone")
    a, b = nsqd_factory(), nsqd_factory()
    a.register(topic, "ch")
    b.register(topic)
    assert lookupd.lookup_nodes(topic) == {a.node, b.node}
    a.close()
    wait_for(lambda: lookupd.lookup_nodes(topic) == {b.node})
    # the channel key outlives its producer, as in Go
    assert lookupd.get(f"/channels?topic={topic}") == {"channels": ["ch"]}
    assert a.broadcast_address not in {n["broadcast_address"] for n in lookupd.get("/nodes")["producers"]}
    b.close()
    # no stale producers, but the topic is still known: /lookup answers 200
    wait_for(lambda: lookupd.lookup_nodes(topic) == set())
    assert lookupd.get(f"/lookup?topic={topic}") == {"channels": ["ch"], "producers": []}
    assert topic in lookupd.get("/topics")["topics"]
    nodes = {n["broadcast_address"] for n in lookupd.get("/nodes")["producers"]}
    assert not nodes & {a.broadcast_address, b.broadcast_address}


def test_unregister_over_tcp(lookupd: LookupdProcess, nsqd_factory: Callable[[], FakeNsqd]) -> None:
    topic = unique("unreg")
    a = nsqd_factory()
    a.register(topic, "x")
    a.register(topic, "y")
    a.unregister(topic, "x")
    assert lookupd.get(f"/channels?topic={topic}") == {"channels": ["x", "y"]}
    a.unregister(topic)  # takes its registration of channel y along
    assert lookupd.lookup_nodes(topic) == set()
    assert lookupd.get("/debug").get(f"channel:{topic}:y") is None
    # ephemeral keys go with their last UNREGISTER
    eph = unique("eph") + "#ephemeral"
    a.register(eph, "c#ephemeral")
    a.unregister(eph, "c#ephemeral")
    a.unregister(eph)
    assert lookupd.lookup_nodes(eph) is None
    assert lookupd.get(f"/channels?topic={eph}") == {"channels": []}


# ---------------------------------------------------------------- admin


def test_topic_and_channel_admin(lookupd: LookupdProcess, nsqd_factory: Callable[[], FakeNsqd]) -> None:
    topic = unique("admin")
    assert lookupd.post(f"/topic/create?topic={topic}") == (200, b"")
    assert lookupd.get(f"/lookup?topic={topic}") == {"channels": [], "producers": []}
    assert lookupd.post(f"/channel/create?topic={topic}&channel=ch") == (200, b"")
    assert lookupd.get(f"/channels?topic={topic}") == {"channels": ["ch"]}

    # a producer comes and goes; what was created by hand stays
    a = nsqd_factory()
    a.register(topic, "ch")
    assert lookupd.lookup_nodes(topic) == {a.node}
    a.close()
    wait_for(lambda: lookupd.lookup_nodes(topic) == set())
    assert lookupd.get(f"/channels?topic={topic}") == {"channels": ["ch"]}

    assert lookupd.post(f"/channel/delete?topic={topic}&channel=ch") == (200, b"")
    assert lookupd.post(f"/channel/delete?topic={topic}&channel=ch") == (404, b'{"message":"CHANNEL_NOT_FOUND"}')
    assert lookupd.post(f"/channel/create?topic={topic}&channel=ch2") == (200, b"")
    assert lookupd.post(f"/topic/delete?topic={topic}") == (200, b"")
    assert lookupd.lookup_nodes(topic) is None
    assert lookupd.get(f"/channels?topic={topic}") == {"channels": []}
    # deleting again is not an error
    assert lookupd.post(f"/topic/delete?topic={topic}") == (200, b"")


@pytest.mark.parametrize(
    "path, status, message",
    [
        ("/topic/create", 400, "MISSING_ARG_TOPIC"),
        ("/topic/create?topic=bad!", 400, "INVALID_ARG_TOPIC"),
        ("/topic/delete", 400, "MISSING_ARG_TOPIC"),
        ("/channel/create?channel=c", 400, "MISSING_ARG_TOPIC"),
        ("/channel/create?topic=bad!&channel=c", 400, "INVALID_ARG_TOPIC"),
        ("/channel/create?topic=t", 400, "MISSING_ARG_CHANNEL"),
        ("/channel/create?topic=t&channel=", 400, "INVALID_ARG_CHANNEL"),
        ("/channel/delete?topic=t&channel=bad!", 400, "INVALID_ARG_CHANNEL"),
        ("/channel/delete?topic=nope_t&channel=nope", 404, "CHANNEL_NOT_FOUND"),
        ("/topic/tombstone?node=h:1", 400, "MISSING_ARG_TOPIC"),
        ("/topic/tombstone?topic=t", 400, "MISSING_ARG_NODE"),
    ],
)
def test_admin_errors(lookupd: LookupdProcess, path: str, status: int, message: str) -> None:
    got_status, body = lookupd.post(path)
    assert (got_status, json.loads(body)) == (status, {"message": message})


def test_debug(lookupd: LookupdProcess, nsqd_factory: Callable[[], FakeNsqd]) -> None:
    topic = unique("dbg")
    a = nsqd_factory()
    a.register(topic, "c")
    data = lookupd.get("/debug")
    entries = data[f"channel:{topic}:c"]
    assert len(entries) == 1
    entry = entries[0]
    assert sorted(entry) == sorted(
        ["id", "hostname", "broadcast_address", "tcp_port", "http_port", "version", "last_update", "tombstoned", "tombstoned_at"]
    )
    assert entry["broadcast_address"] == a.broadcast_address and entry["tombstoned"] is False
    assert abs(entry["last_update"] / 1e9 - time.time()) < 60
    assert f"topic:{topic}:" in data and "client::" in data


def test_metrics(lookupd: LookupdProcess, nsqd_factory: Callable[[], FakeNsqd]) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    topic = unique("metric")
    a, b = nsqd_factory(), nsqd_factory()
    a.register(topic, "c1")
    b.register(topic, "c2")
    status, headers, body = lookupd.request("GET", "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    assert families["nsqlookupd_producers"].samples[0].value >= 2
    assert families["nsqlookupd_topics"].samples[0].value >= 1
    assert families["nsqlookupd_channels"].samples[0].value >= 2
    per_topic = {s.labels["topic"]: s.value for s in families["nsqlookupd_topic_producers"].samples}
    assert per_topic[topic] == 2


# ---------------------------------------------------------------- timeouts


def test_tombstone_lifetime() -> None:
    proc = LookupdProcess("--tombstone-lifetime=1s")
    a = b = None
    try:
        a, b = FakeNsqd(proc), FakeNsqd(proc)
        topic = "tomb"
        for fake in (a, b):
            fake.identify()
            fake.register(topic, "ch")
            fake.register("other")
        assert proc.lookup_nodes(topic) == {a.node, b.node}
        started = time.monotonic()
        assert proc.post(f"/topic/tombstone?topic={topic}&node={a.node}") == (200, b"")
        assert proc.lookup_nodes(topic) == {b.node}
        # the tombstone is per topic
        assert proc.lookup_nodes("other") == {a.node, b.node}
        nodes = {n["broadcast_address"]: n for n in proc.get("/nodes")["producers"]}
        assert dict(zip(nodes[a.broadcast_address]["topics"], nodes[a.broadcast_address]["tombstones"])) == {
            topic: True, "other": False,
        }
        assert nodes[b.broadcast_address]["tombstones"] == [False, False]
        debug = {e["broadcast_address"]: e for e in proc.get("/debug")[f"topic:{topic}:"]}
        assert debug[a.broadcast_address]["tombstoned"] is True and debug[a.broadcast_address]["tombstoned_at"] > 0
        # still registered, so it comes back once the lifetime is over
        wait_for(lambda: proc.lookup_nodes(topic) == {a.node, b.node})
        assert time.monotonic() - started >= 0.9
        nodes = {n["broadcast_address"]: n for n in proc.get("/nodes")["producers"]}
        assert nodes[a.broadcast_address]["tombstones"] == [False, False]
    finally:
        for fake in (a, b):
            if fake is not None:
                fake.close()
        assert proc.stop() == 0


def test_inactive_producer_timeout() -> None:
    proc = LookupdProcess("--inactive-producer-timeout=2s")
    fake = FakeNsqd(proc)
    try:
        fake.identify()
        fake.register("idle", "ch")
        assert proc.lookup_nodes("idle") == {fake.node}
        # no PING: hidden from /lookup and /nodes, but still registered
        wait_for(lambda: proc.lookup_nodes("idle") == set())
        assert fake.broadcast_address not in {n["broadcast_address"] for n in proc.get("/nodes")["producers"]}
        assert proc.get("/channels?topic=idle") == {"channels": ["ch"]}
        fake.ping()
        assert proc.lookup_nodes("idle") == {fake.node}
        assert fake.broadcast_address in {n["broadcast_address"] for n in proc.get("/nodes")["producers"]}
    finally:
        fake.close()
        assert proc.stop() == 0


# ---------------------------------------------------------------- command line


def test_version_output() -> None:
    out = subprocess.run([sys.executable, "-m", "pynsqlookupd", "--version"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0
    assert re.fullmatch(r"nsqlookupd v1\.3\.0-compatible \(built w/pynsqd-\d+\.\d+\.\d+\)\n", out.stdout)


def test_bad_flag_exits_2() -> None:
    out = subprocess.run([sys.executable, "-m", "pynsqlookupd", "--no-such-flag"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 2
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and "flag provided but not defined: -no-such-flag" in lines[0]
    out = subprocess.run(
        [sys.executable, "-m", "pynsqlookupd", "--tombstone-lifetime=soon"], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 2 and len(out.stderr.splitlines()) == 1


def test_toml_config(tmp_path: Path) -> None:
    config = tmp_path / "nsqlookupd.cfg"
    config.write_text(
        'tcp_address = "127.0.0.1:0"\n'
        'http_address = "127.0.0.1:0"\n'
        'broadcast_address = "lookupd-from-toml"\n'
        'log_prefix = "[toml-lookupd] "\n'
        'tombstone_lifetime = "1s"\n'
    )
    proc = LookupdProcess(f"--config={config}", default_addresses=False)
    fake = FakeNsqd(proc)
    try:
        assert fake.identify()["broadcast_address"] == "lookupd-from-toml"
        assert all(line.startswith("[toml-lookupd] ") for line in proc.lines)
    finally:
        fake.close()
        # SIGINT is a clean shutdown too, not a KeyboardInterrupt traceback
        assert proc.stop(signal.SIGINT) == 0
    assert "Traceback" not in "".join(proc.lines)


# ---------------------------------------------------------------- in-process


async def test_in_process_daemon_cleans_up_on_disconnect_and_shutdown() -> None:
    import trio

    from pynsqlookupd import open_nsqlookupd
    from pynsqlookupd.registration_db import TOPIC

    async def wait_for(condition: Callable[[], bool]) -> None:
        with trio.fail_after(10):
            while not condition():
                await trio.sleep(0.01)

    async with open_nsqlookupd(tcp_address="127.0.0.1:0", http_address="127.0.0.1:0") as lookupd:
        assert lookupd.tcp_address == f"127.0.0.1:{lookupd.tcp_port}" and lookupd.tcp_port > 0
        body = json.dumps({"version": "1.3.0", "tcp_port": 1, "http_port": 2, "broadcast_address": "h"}).encode()
        streams = []
        for _ in range(2):
            stream = await trio.open_tcp_stream("127.0.0.1", lookupd.tcp_port)
            await stream.send_all(MAGIC_V1 + encode_command(b"IDENTIFY", body=body) + b"REGISTER inproc c\n")
            streams.append(stream)
        await wait_for(lambda: len(lookupd.db.find_producers(TOPIC, "inproc", "")) == 2)
        await streams[0].aclose()
        await wait_for(lambda: len(lookupd.db.find_producers(TOPIC, "inproc", "")) == 1)
        # leaving the block with a connection still open must not hang
    assert lookupd.db.find_producers(TOPIC, "inproc", "") == []
    assert lookupd.db.topics() == ["inproc"]
    await streams[1].aclose()
