"""nsqd's lookupd registration (pynsqd/lookup.py): the sans-IO pieces, then
nsqd and nsqlookupd in process, talking over loopback."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from pynsqd.http_client import http_get, http_post, http_put
from pynsqd.listener import open_listener
from pynsqd.lookup import (
    PING,
    Backoff,
    Lookup,
    LookupdInfo,
    PeerQueue,
    channels_to_precreate,
    event_command,
    identify_body,
    identify_command,
    registration_commands,
    union_channels,
)
from pynsqd.nsqd import NSQD
from pynsqd.options import Options
from pynsqd.protocol import MAGIC_V1, CommandParser, LOOKUPD_BODY_COMMANDS, encode_v1_response
from pynsqlookupd import open_nsqlookupd
from pynsqlookupd.lookup_protocol_v1 import LookupProtocolV1, ServerInfo
from pynsqlookupd.nsqlookupd import NSQLookupd
from pynsqlookupd.registration_db import CHANNEL, CLIENT, TOPIC, Registration, RegistrationDB

# ---------------------------------------------------------------- sans-IO


class FakeTopic:
    def __init__(self, *channels: str) -> None:
        self.channels = {c: object() for c in channels}


def test_identify_body_is_what_nsqd_sends() -> None:
    body = identify_body(version="1.3.0", tcp_port=4150, http_port=4151, hostname="box", broadcast_address="10.0.0.1")
    assert body == (
        b'{"broadcast_address":"10.0.0.1","hostname":"box","http_port":4151,"tcp_port":4150,"version":"1.3.0"}'
    )
    cmd = identify_command(version="1.3.0", tcp_port=1, http_port=2, hostname="h", broadcast_address="b")
    assert cmd.startswith(b"IDENTIFY\n") and int.from_bytes(cmd[9:13], "big") == len(cmd) - 13


def test_identify_info_uses_broadcast_ports_or_the_real_ones(tmp_path: Path) -> None:
    nsqd = NSQD(Options(data_path=str(tmp_path), broadcast_address="10.1.2.3"))
    nsqd.tcp_port, nsqd.http_port = 4150, 4151
    assert nsqd.lookup.identify_info() == {
        "version": "1.3.0", "tcp_port": 4150, "http_port": 4151, "hostname": nsqd.hostname, "broadcast_address": "10.1.2.3",
    }
    nsqd.options.broadcast_tcp_port, nsqd.options.broadcast_http_port = 14150, 14151
    info = nsqd.lookup.identify_info()
    assert (info["tcp_port"], info["http_port"]) == (14150, 14151)


def test_registration_commands_cover_every_channel_or_bare_topic() -> None:
    topics = {
        "a": FakeTopic("c1", "c2#ephemeral"),
        "b": FakeTopic(),
        "e#ephemeral": FakeTopic(),
        "f#ephemeral": FakeTopic("x#ephemeral"),
    }
    assert registration_commands(topics) == [
        b"REGISTER a c1\n",
        b"REGISTER a c2#ephemeral\n",
        b"REGISTER b\n",
        b"REGISTER e#ephemeral\n",
        b"REGISTER f#ephemeral x#ephemeral\n",
    ]
    assert registration_commands({}) == []


def test_registration_commands_rebuild_the_same_lookupd_state() -> None:
    """What nsqd sends on connect, fed to the real lookupd state machine,
    registers exactly the topics and channels nsqd has."""
    topics = {"a": FakeTopic("c1", "c2"), "b": FakeTopic(), "e#ephemeral": FakeTopic("x#ephemeral")}
    db = RegistrationDB()
    server = ServerInfo(tcp_port=4160, http_port=4161, version="1.3.0", broadcast_address="lk", hostname="lk")
    proto = LookupProtocolV1(db, server, remote_address="127.0.0.1:5555")
    hello = identify_command(version="1.3.0", tcp_port=4150, http_port=4151, hostname="h", broadcast_address="10.0.0.9")
    out = proto.receive_data(hello + b"".join(registration_commands(topics)) + PING, now=1.0)
    assert not proto.closed
    assert db.topics() == ["a", "b", "e#ephemeral"]
    assert db.channels("a") == ["c1", "c2"] and db.channels("e#ephemeral") == ["x#ephemeral"]
    assert {p.peer.node for p in db.find_producers(TOPIC, "b", "")} == {"10.0.0.9:4151"}
    assert out.endswith(encode_v1_response(b"OK"))
    assert LookupdInfo.parse(server.identify_response()) == LookupdInfo(4160, 4161, "1.3.0", "lk", "lk")


def test_event_commands() -> None:
    assert event_command("topic_created", "t") == b"REGISTER t\n"
    assert event_command("topic_deleted", "t") == b"UNREGISTER t\n"
    assert event_command("channel_created", "t", "c") == b"REGISTER t c\n"
    assert event_command("channel_deleted", "t", "c#ephemeral") == b"UNREGISTER t c#ephemeral\n"
    assert event_command("topic_paused", "t") is None


def test_peer_queue() -> None:
    q = PeerQueue()
    assert not q.push(b"REGISTER a\n")  # nothing queued while disconnected
    assert len(q) == 0
    q.connect([b"REGISTER a\n", b"REGISTER b\n", b"REGISTER c\n"])
    assert q.push(b"UNREGISTER a\n")
    assert q.take(2) == [b"REGISTER a\n", b"REGISTER b\n"]
    assert q.take() == [b"REGISTER c\n", b"UNREGISTER a\n"]
    assert q.take() == []
    q.push(b"REGISTER z\n")
    q.disconnect()
    assert not q.connected and len(q) == 0
    # a reconnect starts from the full list, whatever was queued before
    q.connect([b"REGISTER y\n"])
    assert q.take() == [b"REGISTER y\n"]


def test_backoff() -> None:
    b = Backoff(0.1, 1.0, rand=lambda: 0.5)
    assert [round(b.next(), 3) for _ in range(6)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    b.reset()
    assert b.next() == pytest.approx(0.1)
    jittered = Backoff(1.0, 1.0, jitter=0.2, rand=lambda: 1.0)
    assert jittered.next() == pytest.approx(1.2)


def test_lookupd_info() -> None:
    info = LookupdInfo.parse(b'{"tcp_port":4160,"http_port":4161,"version":"1.3.0","broadcast_address":"lk","hostname":"h","x":1}')
    assert info.http_address == "lk:4161"
    assert LookupdInfo.parse(b'{"broadcast_address":"::1","http_port":1}').http_address == "[::1]:1"
    assert LookupdInfo.parse(b'{"http_port":4161}').http_address is None
    for bad in (b"OK", b"[1]", b'{"http_port":"4161"}', b'{"broadcast_address":5}', b'{"tcp_port":true}'):
        with pytest.raises(ValueError):
            LookupdInfo.parse(bad)


def test_union_and_precreate_filter() -> None:
    answers = [{"channels": ["b", "a"]}, {"channels": ["a", "c#ephemeral", 7]}, {"nope": 1}, [], None]
    assert union_channels(answers) == ["a", "b", "c#ephemeral"]
    assert channels_to_precreate(["a", "c#ephemeral", "bad name", ""]) == ["a"]


# ---------------------------------------------------------------- in process


async def wait_until(condition: Callable[[], Any], timeout: float = 15.0, what: str = "condition") -> Any:
    with trio.move_on_after(timeout):
        while not (value := condition()):
            await trio.sleep(0.01)
        return value
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@asynccontextmanager
async def running_nsqd(data_path: Path, lookupds: list[str], **options: Any) -> AsyncIterator[NSQD]:
    os.makedirs(data_path, exist_ok=True)
    opts = Options(
        tcp_address="127.0.0.1:0",
        http_address="127.0.0.1:0",
        data_path=str(data_path),
        broadcast_address="127.0.0.1",
        lookupd_tcp_addresses=list(lookupds),
        **options,
    )
    nsqd = NSQD(opts)
    nsqd.lookup.backoff_max = 0.3
    async with trio.open_nursery() as nursery:
        await nursery.start(nsqd.run)
        yield nsqd
        nursery.cancel_scope.cancel()


def lookupd_kwargs(tcp_port: int = 0, http_port: int = 0) -> dict[str, Any]:
    return {
        "tcp_address": f"127.0.0.1:{tcp_port}",
        "http_address": f"127.0.0.1:{http_port}",
        "broadcast_address": "127.0.0.1",
    }


def producers(lookupd: NSQLookupd, topic: str, channel: str = "") -> set[int]:
    """tcp ports of the producers lookupd has for a topic (or channel)."""
    if channel:
        found = lookupd.db.find_producers(CHANNEL, topic, channel)
    else:
        found = lookupd.db.find_producers(TOPIC, topic, "")
    return {p.peer.tcp_port for p in found}


def registered(lookupd: NSQLookupd, tcp_port: int) -> set[tuple[str, str]]:
    """(topic, channel) pairs a peer registered ("" for the topic itself)."""
    out = set()
    for p in lookupd.db.find_producers(CLIENT, "", ""):
        if p.peer.tcp_port == tcp_port:
            for reg in lookupd.db.lookup_registrations(p.peer.id):
                if reg.category in (TOPIC, CHANNEL):
                    out.add((reg.key, reg.subkey))
    return out


async def test_registers_topics_and_channels_and_unregisters_on_delete(tmp_path: Path) -> None:
    async with open_nsqlookupd(**lookupd_kwargs()) as lookupd:
        async with running_nsqd(tmp_path / "n", [lookupd.tcp_address]) as nsqd:
            port = nsqd.tcp_port
            await wait_until(lambda: nsqd.lookup.http_addresses() == [f"127.0.0.1:{lookupd.http_port}"], what="connect")
            topic = nsqd.get_topic("orders")
            topic.get_channel("billing")
            eph = nsqd.get_topic("clicks#ephemeral")
            eph.get_channel("tail#ephemeral")
            want = {("orders", ""), ("orders", "billing"), ("clicks#ephemeral", ""), ("clicks#ephemeral", "tail#ephemeral")}
            await wait_until(lambda: registered(lookupd, port) == want, what="registrations")

            # what a client sees over HTTP
            resp = await http_get(f"http://{lookupd.http_address}/lookup?topic=orders")
            data = resp.json()
            assert data["channels"] == ["billing"]
            [producer] = data["producers"]
            assert (producer["broadcast_address"], producer["tcp_port"], producer["http_port"]) == (
                "127.0.0.1", nsqd.tcp_port, nsqd.http_port,
            )
            assert producer["version"] == "1.3.0" and producer["hostname"] == nsqd.hostname

            # deletes over nsqd's HTTP API send UNREGISTER
            base = f"http://127.0.0.1:{nsqd.http_port}"
            assert (await http_post(f"{base}/channel/delete?topic=orders&channel=billing")).status == 200
            await wait_until(lambda: ("orders", "billing") not in registered(lookupd, port), what="channel unregister")
            assert producers(lookupd, "orders") == {port}
            assert (await http_post(f"{base}/topic/delete?topic=orders")).status == 200
            await wait_until(lambda: not producers(lookupd, "orders"), what="topic unregister")
            # the ephemeral channel goes with its topic when deleted
            assert nsqd.delete_existing_topic("clicks#ephemeral")
            await wait_until(lambda: registered(lookupd, port) == set(), what="ephemeral unregister")
            # Go's lookupd drops ephemeral keys on their last UNREGISTER, keeps the others
            assert lookupd.db.topics() == ["orders"]
        # nsqd gone: no stale producer
        await wait_until(lambda: not lookupd.db.find_producers(CLIENT, "", ""), what="disconnect cleanup")


async def test_reregisters_everything_after_lookupd_restart(tmp_path: Path) -> None:
    # find two free ports by running the lookupd once
    async with open_nsqlookupd(**lookupd_kwargs()) as probe:
        tcp_port, http_port = probe.tcp_port, probe.http_port
    address = f"127.0.0.1:{tcp_port}"
    async with running_nsqd(tmp_path / "n", [address]) as nsqd:
        port = nsqd.tcp_port
        # topics exist before any lookupd is reachable
        t = nsqd.get_topic("a")
        t.get_channel("c1")
        t.get_channel("c2")
        nsqd.get_topic("b")
        async with open_nsqlookupd(**lookupd_kwargs(tcp_port, http_port)) as lookupd:
            want = {("a", "c1"), ("a", "c2"), ("a", ""), ("b", "")}
            await wait_until(lambda: registered(lookupd, port) == want, what="first registration")
        # lookupd down: changes meanwhile are not lost
        nsqd.delete_existing_topic("b")
        nsqd.get_topic("d").get_channel("x")
        await wait_until(lambda: not nsqd.lookup.peers[address].connected, what="disconnect noticed")
        async with open_nsqlookupd(**lookupd_kwargs(tcp_port, http_port)) as lookupd:
            want = {("a", "c1"), ("a", "c2"), ("a", ""), ("d", "x"), ("d", "")}
            await wait_until(lambda: registered(lookupd, port) == want, what="re-registration")
            # and events flow on the new connection
            nsqd.get_topic("e")
            await wait_until(lambda: ("e", "") in registered(lookupd, port), what="event after reconnect")


async def test_put_config_adds_and_removes_lookupds(tmp_path: Path) -> None:
    async with open_nsqlookupd(**lookupd_kwargs()) as l1, open_nsqlookupd(**lookupd_kwargs()) as l2:
        async with running_nsqd(tmp_path / "n", [l1.tcp_address]) as nsqd:
            port = nsqd.tcp_port
            nsqd.get_topic("t").get_channel("c")
            await wait_until(lambda: registered(l1, port) == {("t", ""), ("t", "c")}, what="l1")
            assert registered(l2, port) == set()

            url = f"http://127.0.0.1:{nsqd.http_port}/config/nsqlookupd_tcp_addresses"
            resp = await http_put(url, json.dumps([l1.tcp_address, l2.tcp_address]).encode())
            assert (resp.status, resp.json()) == (200, [l1.tcp_address, l2.tcp_address])
            await wait_until(lambda: registered(l2, port) == {("t", ""), ("t", "c")}, what="l2 added")
            assert sorted(nsqd.lookup.peers) == sorted([l1.tcp_address, l2.tcp_address])

            resp = await http_put(url, json.dumps([l2.tcp_address]).encode())
            assert resp.status == 200
            assert (await http_get(url)).json() == [l2.tcp_address]
            await wait_until(lambda: not l1.db.find_producers(CLIENT, "", ""), what="l1 removed")
            assert list(nsqd.lookup.peers) == [l2.tcp_address]
            # only the remaining lookupd hears of new things
            nsqd.get_topic("u")
            await wait_until(lambda: ("u", "") in registered(l2, port), what="event to l2")
            assert producers(l1, "u") == set()


async def test_ping_keeps_the_producer_fresh(tmp_path: Path) -> None:
    async with open_nsqlookupd(**lookupd_kwargs()) as lookupd:
        opts = Options(
            tcp_address="127.0.0.1:0", http_address="127.0.0.1:0", data_path=str(tmp_path),
            broadcast_address="127.0.0.1", lookupd_tcp_addresses=[lookupd.tcp_address],
        )
        nsqd = NSQD(opts)
        nsqd.lookup.ping_interval = 0.2
        async with trio.open_nursery() as nursery:
            await nursery.start(nsqd.run)
            [peer] = await wait_until(lambda: lookupd.db.find_producers(CLIENT, "", ""), what="identify")
            first = peer.peer.last_update
            await wait_until(lambda: peer.peer.last_update > first + 0.3, what="PINGs")
            nursery.cancel_scope.cancel()


async def test_new_topic_gets_channels_from_lookupd_before_delivery(tmp_path: Path) -> None:
    """nsqio/nsq #1416: a topic new on nsqd B must deliver its first messages to
    the channels consumers use elsewhere (known to lookupd via nsqd A), not only
    to whatever channel happens to be created first on B."""
    async with open_nsqlookupd(**lookupd_kwargs()) as lookupd:
        async with running_nsqd(tmp_path / "a", [lookupd.tcp_address]) as a, \
                running_nsqd(tmp_path / "b", [lookupd.tcp_address]) as b:
            for name in ("orders", "events"):
                t = a.get_topic(name)
                t.get_channel("archive")
                t.get_channel("tail#ephemeral")
            await wait_until(lambda: lookupd.db.channels("events") == ["archive", "tail#ephemeral"], what="A's channels")
            await wait_until(lambda: b.lookup.http_addresses(), what="B connected")

            # in process, to control the interleaving: publish, then a consumer's channel appears at once
            topic = b.get_topic("orders")
            assert topic.holds == 1 and not topic.channels
            topic.put_messages([topic.new_message(b"first")])  # returns at once
            topic.get_channel("live")
            await wait_until(lambda: topic.holds == 0, what="release")
            assert sorted(topic.channels) == ["archive", "live"]  # ephemeral ones are not pre-created
            await wait_until(lambda: all(c.depth() == 1 for c in topic.channels.values()), what="delivery to both")

            # over the wire: an HTTP publish to a brand-new topic lands in the archive channel
            base = f"http://127.0.0.1:{b.http_port}"
            resp = await http_post(f"{base}/pub?topic=events", b"hello")
            assert (resp.status, resp.body) == (200, b"OK")

            def archive_depth() -> int:
                channel = b.topics["events"].channels.get("archive")
                return channel.depth() if channel is not None else 0

            await wait_until(lambda: archive_depth() == 1, what="message in B's archive channel")
            # B registered the pre-created channel itself
            await wait_until(lambda: b.tcp_port in producers(lookupd, "events", "archive"), what="B registers archive")


# ---------------------------------------------------------------- a fake lookupd


class FakeLookupd:
    """Speaks lookupd's TCP side and records what nsqd sends; its IDENTIFY
    reply points nsqd at an HTTP port that accepts but never answers."""

    def __init__(self) -> None:
        self.identify: dict[str, Any] | None = None
        self.commands: list[bytes] = []
        self.tcp_port = 0
        self.http_port = 0

    async def serve(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        tcp, _, self.tcp_port = await open_listener("127.0.0.1:0")
        http, _, self.http_port = await open_listener("127.0.0.1:0")
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, self._handle, [tcp])
            await nursery.start(trio.serve_listeners, self._black_hole, [http])
            task_status.started()

    async def _black_hole(self, stream: trio.SocketStream) -> None:
        await trio.sleep_forever()

    async def _handle(self, stream: trio.SocketStream) -> None:
        magic = b""
        while len(magic) < 4:
            magic += await stream.receive_some(4 - len(magic))
        assert magic == MAGIC_V1
        parser = CommandParser(LOOKUPD_BODY_COMMANDS)
        while data := await stream.receive_some(65536):
            for cmd in parser.commands(data):
                if cmd.name == b"IDENTIFY":
                    assert cmd.body is not None
                    self.identify = json.loads(cmd.body)
                    reply = json.dumps({"tcp_port": self.tcp_port, "http_port": self.http_port, "version": "1.3.0",
                                        "broadcast_address": "127.0.0.1", "hostname": "fake"}).encode()
                else:
                    self.commands.append(b" ".join([cmd.name, *cmd.params]))
                    reply = b"OK"
                await stream.send_all(encode_v1_response(reply))


async def test_identify_fields_and_failed_channel_query_releases_the_topic(tmp_path: Path) -> None:
    fake = FakeLookupd()
    async with trio.open_nursery() as nursery:
        await nursery.start(fake.serve)
        async with running_nsqd(
            tmp_path, [f"127.0.0.1:{fake.tcp_port}"], broadcast_tcp_port=24150, http_client_request_timeout=0.5,
        ) as nsqd:
            await wait_until(lambda: nsqd.lookup.http_addresses(), what="connect")
            assert fake.identify == {
                "broadcast_address": "127.0.0.1", "hostname": nsqd.hostname, "http_port": nsqd.http_port,
                "tcp_port": 24150, "version": "1.3.0",
            }
            topic = nsqd.get_topic("t")
            topic.put_messages([topic.new_message(b"m")])
            topic.get_channel("c")
            assert topic.holds == 1
            started = trio.current_time()
            await wait_until(lambda: topic.holds == 0, what="release after the timeout")
            assert 0.4 < trio.current_time() - started < 5
            await wait_until(lambda: topic.channels["c"].depth() == 1, what="delivery after the failed query")
            await wait_until(lambda: b"REGISTER t c" in fake.commands, what="commands")
            assert fake.commands[:2] == [b"REGISTER t", b"REGISTER t c"]
        nursery.cancel_scope.cancel()


async def test_unreachable_lookupd_does_not_hold_topics(tmp_path: Path) -> None:
    async with open_nsqlookupd(**lookupd_kwargs()) as probe:
        dead = probe.tcp_address
    async with running_nsqd(tmp_path, [dead]) as nsqd:
        await wait_until(lambda: dead in nsqd.lookup.peers, what="peer")
        topic = nsqd.get_topic("t")
        assert topic.holds == 0  # no connected lookupd: nobody to ask, deliver at once
        channel = topic.get_channel("c")
        topic.put_messages([topic.new_message(b"m")])
        assert channel.depth() == 1
        assert not nsqd.lookup.peers[dead].connected
