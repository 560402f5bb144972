"""The trio Reader and Writer against in-process fake nsqds over memory
streams, on trio's MockClock (autojump): backoff timings, RDY distribution
and rotation, graceful stop, reconnects -- deterministic, no real sleeping."""

from __future__ import annotations

import json
from collections import deque

import anyio
import anyio.abc
import pytest
import trio
import trio.testing

from pynsqd.client import Message, NSQError, PublishError, Reader, Writer
from pynsqd.protocol import (
    CLOSE_WAIT,
    MAGIC_V2,
    OK,
    CommandParser,
    ProtocolError,
    decode_mpub_body,
    encode_error,
    encode_message_frame,
    encode_response,
)


class AnyioStream(anyio.abc.ByteStream):
    """A trio memory stream as the anyio byte stream the client expects
    (these fakes run on trio's MockClock, so on trio only)."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner

    async def receive(self, max_bytes: int = 65536) -> bytes:
        try:
            data = await self.inner.receive_some(max_bytes)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise anyio.BrokenResourceError from exc
        if not data:
            raise anyio.EndOfStream
        return data

    async def send(self, item: bytes) -> None:
        try:
            await self.inner.send_all(item)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise anyio.BrokenResourceError from exc

    async def send_eof(self) -> None:
        await self.inner.aclose()

    async def aclose(self) -> None:
        await self.inner.aclose()


class Cluster:
    """Fake nsqds by address; tracks the total RDY every server sees."""

    def __init__(self) -> None:
        self.servers: dict[str, FakeNSQD] = {}
        self.max_total_rdy = 0
        self.nursery: trio.Nursery | None = None
        self.refuse: set[str] = set()
        self.dials: dict[str, int] = {}

    def add(self, address: str, bodies: list[bytes] = (), **kw) -> FakeNSQD:  # type: ignore[assignment]
        server = FakeNSQD(self, address, list(bodies), **kw)
        self.servers[address] = server
        return server

    def total_rdy(self) -> int:
        return sum(c.rdy for s in self.servers.values() for c in s.conns if not c.closed)

    def rdy_changed(self) -> None:
        self.max_total_rdy = max(self.max_total_rdy, self.total_rdy())

    async def open_stream(self, host: str, port: int) -> anyio.abc.ByteStream:
        address = f"{host}:{port}"
        self.dials[address] = self.dials.get(address, 0) + 1
        if address in self.refuse or address not in self.servers:
            raise ConnectionRefusedError(address)
        client, server = trio.testing.memory_stream_pair()
        assert self.nursery is not None
        self.nursery.start_soon(self.servers[address].serve, server)
        return AnyioStream(client)


class FakeConn:
    def __init__(self) -> None:
        self.rdy = 0
        self.in_flight: dict[bytes, tuple[bytes, int]] = {}
        self.closed = False
        self.stream: trio.abc.Stream | None = None


class FakeNSQD:
    """Just enough of nsqd: IDENTIFY, SUB, RDY window, FIN/REQ/TOUCH, CLS, PUB."""

    def __init__(self, cluster: Cluster, address: str, bodies: list[bytes], max_rdy: int = 2500, pub_error: str | None = None) -> None:
        self.cluster = cluster
        self.address = address
        self.max_rdy = max_rdy
        self.queue: deque[tuple[bytes, bytes, int]] = deque()
        self.next_id = 0
        for body in bodies:
            self.put(body)
        self.conns: list[FakeConn] = []
        self.rdy_log: list[tuple[float, int]] = []
        self.finished: list[bytes] = []
        self.requeued: list[tuple[bytes, int]] = []
        self.published: list[bytes] = []
        self.commands: list[bytes] = []
        self.pub_error = pub_error
        self.pub_delay = 0.0

    def put(self, body: bytes, attempts: int = 0, msg_id: bytes | None = None) -> None:
        if msg_id is None:
            msg_id = f"{self.next_id:016x}".encode()
            self.next_id += 1
        self.queue.append((msg_id, body, attempts))

    async def serve(self, stream: trio.abc.Stream) -> None:
        conn = FakeConn()
        conn.stream = stream
        self.conns.append(conn)
        parser = CommandParser()
        buf = b""
        while len(buf) < 4:
            data = await stream.receive_some()
            if not data:
                return
            buf += data
        assert buf[:4] == MAGIC_V2
        parser.receive_data(buf[4:])
        try:
            while True:
                out = bytearray()
                for cmd in parser.commands():
                    self.commands.append(cmd.name)
                    out += self.handle(conn, cmd)
                if conn.closed:
                    await stream.send_all(bytes(out))
                    return
                out += self.deliver(conn)
                if out:
                    await stream.send_all(bytes(out))
                data = await stream.receive_some()
                if not data:
                    return
                parser.receive_data(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            conn.closed = True
            # nsqd requeues what a vanished client had in flight
            for msg_id, (body, attempts) in conn.in_flight.items():
                self.queue.appendleft((msg_id, body, attempts))
            conn.in_flight.clear()
            self.cluster.rdy_changed()
            await trio.aclose_forcefully(stream)

    def handle(self, conn: FakeConn, cmd) -> bytes:  # noqa: ANN001
        name = cmd.name
        if name == b"IDENTIFY":
            return encode_response(json.dumps({"max_rdy_count": self.max_rdy, "version": "1.3.0", "tls_v1": False}).encode())
        if name == b"SUB":
            return encode_response(OK)
        if name == b"RDY":
            conn.rdy = int(cmd.params[0])
            assert conn.rdy <= self.max_rdy
            self.rdy_log.append((trio.current_time(), conn.rdy))
            self.cluster.rdy_changed()
            return b""
        if name == b"FIN":
            conn.in_flight.pop(cmd.params[0])
            self.finished.append(cmd.params[0])
            return b""
        if name == b"REQ":
            body, attempts = conn.in_flight.pop(cmd.params[0])
            self.requeued.append((cmd.params[0], int(cmd.params[1])))
            self.queue.appendleft((cmd.params[0], body, attempts))
            return b""
        if name in (b"NOP", b"TOUCH"):
            return b""
        if name == b"CLS":
            conn.rdy = 0
            self.cluster.rdy_changed()
            return encode_response(CLOSE_WAIT)
        if name in (b"PUB", b"MPUB", b"DPUB"):
            if self.pub_error:
                return encode_error(ProtocolError(self.pub_error, "nope", fatal=False))
            bodies = [cmd.body] if name != b"MPUB" else decode_mpub_body(cmd.body, 1 << 20, 5 << 20)
            self.published.extend(bodies)
            return encode_response(OK)
        raise AssertionError(name)

    def deliver(self, conn: FakeConn) -> bytes:
        out = bytearray()
        while self.queue and len(conn.in_flight) < conn.rdy:
            msg_id, body, attempts = self.queue.popleft()
            attempts += 1
            conn.in_flight[msg_id] = (body, attempts)
            out += encode_message_frame(0, attempts, msg_id, body)
        return bytes(out)

    def kick(self) -> None:
        """Deliver to idle connections (after a put from the test)."""
        for conn in self.conns:
            if not conn.closed and conn.stream is not None:
                data = self.deliver(conn)
                if data:
                    self.cluster.nursery.start_soon(conn.stream.send_all, data)  # type: ignore[union-attr]


# long heartbeats: the fakes send none, and the clock jumps
SIM = dict(heartbeat_interval=3600.0, default_requeue_delay=0.0)


async def wait_until(predicate, timeout: float = 600.0) -> None:  # noqa: ANN001
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.01)


# ---------------------------------------------------------------- backoff


async def test_backoff_timeline_on_virtual_time(autojump_clock):
    cluster = Cluster()
    server = cluster.add("10.0.0.1:4150", [f"m{i}".encode() for i in range(8)])
    done: list[bytes] = []

    async def handler(message: Message) -> None:
        if message.body == b"m0" and message.attempts <= 3:
            raise RuntimeError("boom")
        await trio.sleep(0.5)
        done.append(message.body)

    async with trio.open_nursery() as nursery:
        cluster.nursery = nursery
        t0 = trio.current_time()
        reader = Reader("t", "c", handler, nsqd_tcp_addresses=["10.0.0.1:4150"], max_in_flight=3, open_stream=cluster.open_stream, **SIM)
        await nursery.start(reader.run)
        await wait_until(lambda: len(done) == 8)
        await reader.stop()
        nursery.cancel_scope.cancel()

    log = [(round(t - t0, 6), n) for t, n in server.rdy_log]
    # full RDY; m0 fails: RDY 0 for 2 s; RDY 1 (test the water); fails again:
    # 4 s, then 8 s; m0 succeeds: level 2 -> 4 s; success: level 1 -> 2 s;
    # success at level 1: everyone back to full RDY
    assert log == [
        (0, 3),
        (0, 0),
        (2, 1),
        (2, 0),
        (6, 1),
        (6, 0),
        (14, 1),
        (14.5, 0),
        (18.5, 1),
        (19, 0),
        (21, 1),
        (21.5, 3),
    ]
    assert reader.stats().messages_requeued == 3
    assert reader.stats().messages_finished == 8
    assert cluster.max_total_rdy <= 3


async def test_full_jitter_backoff_stays_within_bounds(autojump_clock):
    import random

    cluster = Cluster()
    server = cluster.add("10.0.0.1:4150", [b"x"] * 3)
    fails = {"n": 0}

    async def handler(message: Message) -> None:
        if fails["n"] < 4:
            fails["n"] += 1
            raise RuntimeError("boom")

    async with trio.open_nursery() as nursery:
        cluster.nursery = nursery
        reader = Reader(
            "t", "c", handler, nsqd_tcp_addresses=["10.0.0.1:4150"], max_in_flight=1, open_stream=cluster.open_stream,
            backoff_strategy="full_jitter", max_backoff_duration=5.0, rng=random.Random(5), **SIM,
        )
        await nursery.start(reader.run)
        await wait_until(lambda: len(server.finished) == 3)
        await reader.stop()
        nursery.cancel_scope.cancel()
    zero_at = [t for t, n in server.rdy_log if n == 0]
    one_at = [t for t, n in server.rdy_log if n == 1][1:]
    pauses = [b - a for a, b in zip(zero_at, one_at)]
    # level k pauses are uniform in [0, 2**k) and never above the cap; the
    # four failures pause, and so do the successes on the way back down
    assert len(pauses) >= 4 and all(0 <= p <= 5.0 for p in pauses)
    assert pauses[0] < 2.0 and pauses[1] < 4.0


async def test_requeue_delay_is_default_times_attempts_capped_and_max_attempts_gives_up(autojump_clock):
    cluster = Cluster()
    server = cluster.add("10.0.0.1:4150", [b"poison"])
    gave_up: list[Message] = []

    async def handler(message: Message) -> None:
        raise RuntimeError("always")

    async with trio.open_nursery() as nursery:
        cluster.nursery = nursery
        reader = Reader(
            "t", "c", handler, nsqd_tcp_addresses=["10.0.0.1:4150"], max_in_flight=1, open_stream=cluster.open_stream,
            heartbeat_interval=3600.0, default_requeue_delay=10.0, max_requeue_delay=25.0, max_attempts=3,
            on_give_up=gave_up.append, max_backoff_duration=0.0,
        )
        await nursery.start(reader.run)
        await wait_until(lambda: len(server.finished) == 1)
        await reader.stop()
        nursery.cancel_scope.cancel()
    assert [ms for _, ms in server.requeued] == [10_000, 20_000, 25_000]
    assert len(gave_up) == 1 and gave_up[0].attempts == 4


# ---------------------------------------------------------------- RDY distribution


async def test_max_in_flight_one_with_three_nsqds_rotates_and_consumes_all(autojump_clock):
    cluster = Cluster()
    addresses = [f"10.0.0.{i}:4150" for i in (1, 2, 3)]
    for i, a in enumerate(addresses):
        cluster.add(a, [f"{i}-{j}".encode() for j in range(5)])
    seen: list[bytes] = []
    running = {"now": 0, "max": 0, "max_rdy": 0}

    async def handler(message: Message) -> None:
        running["now"] += 1
        running["max"] = max(running["max"], running["now"])
        await trio.sleep(0.1)
        running["now"] -= 1
        seen.append(message.body)

    async def watch_rdy(reader: Reader) -> None:
        while True:
            running["max_rdy"] = max(running["max_rdy"], reader.rdy.total_rdy)
            await trio.sleep(0.01)

    async with trio.open_nursery() as nursery:
        cluster.nursery = nursery
        reader = Reader(
            "t", "c", handler, nsqd_tcp_addresses=addresses, max_in_flight=1, open_stream=cluster.open_stream,
            low_rdy_idle_timeout=1.0, rdy_redistribute_interval=0.5, **SIM,
        )
        await nursery.start(reader.run)
        nursery.start_soon(watch_rdy, reader)
        await wait_until(lambda: len(seen) == 15, timeout=120)
        elapsed = trio.current_time()
        await reader.stop()
        nursery.cancel_scope.cancel()
    assert sorted(seen) == sorted(f"{i}-{j}".encode() for i in range(3) for j in range(5))
    # never above max_in_flight: the windows handed out, and the work done
    assert running["max_rdy"] == 1 and running["max"] == 1
    assert all(any(n == 1 for _, n in s.rdy_log) for s in cluster.servers.values())
    assert elapsed < 60


async def test_rdy_split_and_capped_by_max_rdy_count(autojump_clock):
    cluster = Cluster()
    cluster.add("10.0.0.1:4150", max_rdy=4)
    cluster.add("10.0.0.2:4150")

    async def handler(message: Message) -> None:
        pass

    async with trio.open_nursery() as nursery:
        cluster.nursery = nursery
        reader = Reader("t", "c", handler, nsqd_tcp_addresses=list(cluster.servers), max_in_flight=20, open_stream=cluster.open_stream, **SIM)
        await nursery.start(reader.run)
        await wait_until(lambda: len(reader.connections) == 2 and cluster.total_rdy() == 14)
        assert sorted(c.rdy for s in cluster.servers.values() for c in s.conns) == [4, 10]
        reader.set_max_in_flight(2)
        await wait_until(lambda: cluster.total_rdy() == 2)
        await reader.stop()
        nursery.cancel_scope.cancel()


# ---------------------------------------------------------------- lifecycle


async def test_graceful_stop_waits_for_handlers_then_fins(autojump_clock):
    cluster = Cluster()
    server = cluster.add("10.0.0.1:4150", [b"slow1", b"slow2"])
    started = trio.Event()

    async def handler(message: Message) -> None:
        started.set()
        await trio.sleep(5)

    async with trio.open_nursery() as nursery:
        cluster.nursery = nursery
        reader = Reader("t", "c", handler, nsqd_tcp_addresses=["10.0.0.1:4150"], max_in_flight=2, open_stream=cluster.open_stream, **SIM)
        await nursery.start(reader.run)
        await started.wait()
        t = trio.current_time()
        await reader.stop()
        assert trio.current_time() - t == pytest.approx(5, abs=0.1)
        nursery.cancel_scope.cancel()
    assert len(server.finished) == 2
    assert b"CLS" in server.commands
    assert server.conns[0].closed and not server.conns[0].in_flight


async def test_stop_timeout_requeues_stuck_messages(autojump_clock):
    cluster = Cluster()
    server = cluster.add("10.0.0.1:4150", [b"stuck"])
    started = trio.Event()

    async def handler(message: Message) -> None:
        started.set()
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        cluster.nursery = nursery
        reader = Reader(
            "t", "c", handler, nsqd_tcp_addresses=["10.0.0.1:4150"], open_stream=cluster.open_stream, stop_timeout=3.0, **SIM
        )
        await nursery.start(reader.run)
        await started.wait()
        await reader.stop()
        nursery.cancel_scope.cancel()
    assert [ms for _, ms in server.requeued] == [0]
    assert server.finished == []


async def test_reconnects_with_backoff_after_a_drop(autojump_clock):
    cluster = Cluster()
    server = cluster.add("10.0.0.1:4150", [b"a"])
    seen: list[bytes] = []

    async def handler(message: Message) -> None:
        seen.append(message.body)

    async with trio.open_nursery() as nursery:
        cluster.nursery = nursery
        reader = Reader(
            "t", "c", handler, nsqd_tcp_addresses=["10.0.0.1:4150"], open_stream=cluster.open_stream, reconnect_interval=1.0, **SIM
        )
        await nursery.start(reader.run)
        await wait_until(lambda: seen == [b"a"])
        # the server goes away and refuses for a while
        cluster.refuse.add("10.0.0.1:4150")
        await server.conns[0].stream.aclose()  # type: ignore[union-attr]
        await wait_until(lambda: not reader.connections)
        await trio.sleep(10)
        dials = cluster.dials["10.0.0.1:4150"]
        assert 3 <= dials <= 6  # 1 + retries at ~1, 2, 4 s (jittered)
        cluster.refuse.clear()
        server.put(b"b")
        await wait_until(lambda: seen == [b"a", b"b"], timeout=120)
        await reader.stop()
        nursery.cancel_scope.cancel()


async def test_message_manual_response_and_touch(autojump_clock):
    cluster = Cluster()
    server = cluster.add("10.0.0.1:4150", [b"later"])
    held: list[Message] = []

    async def handler(message: Message) -> None:
        message.disable_auto_response()
        held.append(message)

    async with trio.open_nursery() as nursery:
        cluster.nursery = nursery
        reader = Reader("t", "c", handler, nsqd_tcp_addresses=["10.0.0.1:4150"], open_stream=cluster.open_stream, **SIM)
        await nursery.start(reader.run)
        await wait_until(lambda: held)
        await trio.sleep(1)
        assert server.finished == [] and reader.in_flight == 1
        held[0].touch()
        held[0].finish()
        await wait_until(lambda: server.finished)
        assert b"TOUCH" in server.commands
        await reader.stop()
        nursery.cancel_scope.cancel()


# ---------------------------------------------------------------- writer


async def test_writer_pipelines_and_fails_over(autojump_clock):
    cluster = Cluster()
    a = cluster.add("10.0.0.1:4150")
    b = cluster.add("10.0.0.2:4150")
    async with trio.open_nursery() as nursery:
        cluster.nursery = nursery
        async with Writer(list(cluster.servers), open_stream=cluster.open_stream, heartbeat_interval=3600.0) as writer:
            await writer.wait_connected(2)
            async with trio.open_nursery() as pubs:
                for i in range(20):
                    pubs.start_soon(writer.pub, "t", f"p{i}".encode())
            await writer.mpub("t", [b"m1", b"m2"])
            await writer.dpub("t", 1.5, b"d")
            assert len(a.published) + len(b.published) == 23
            assert a.published and b.published  # both used
            # a dies: everything goes to b
            cluster.refuse.add("10.0.0.1:4150")
            await a.conns[0].stream.aclose()  # type: ignore[union-attr]
            before = len(b.published)
            for i in range(10):
                await writer.pub("t", b"after")
            assert len(b.published) == before + 10
        nursery.cancel_scope.cancel()


async def test_writer_raises_nsq_errors_and_times_out_without_nsqd(autojump_clock):
    cluster = Cluster()
    cluster.add("10.0.0.1:4150", pub_error="E_BAD_MESSAGE")
    async with trio.open_nursery() as nursery:
        cluster.nursery = nursery
        async with Writer(["10.0.0.1:4150"], open_stream=cluster.open_stream, heartbeat_interval=3600.0, publish_timeout=3.0) as writer:
            with pytest.raises(NSQError) as info:
                await writer.pub("t", b"x")
            assert info.value.code == "E_BAD_MESSAGE"
            with pytest.raises(NSQError):
                await writer.pub("bad topic!", b"x")
        async with Writer(["10.0.0.9:4150"], open_stream=cluster.open_stream, heartbeat_interval=3600.0, publish_timeout=3.0) as writer:
            t = trio.current_time()
            with pytest.raises(PublishError):
                await writer.pub("t", b"x")
            assert trio.current_time() - t == pytest.approx(3.0)
        nursery.cancel_scope.cancel()


# ---------------------------------------------------------------- stream layers


class UpgradingNSQD(FakeNSQD):
    """Agrees to deflate or snappy and wraps its side of the stream too."""

    def __init__(self, *args, kind: str, **kw) -> None:  # noqa: ANN002, ANN003
        super().__init__(*args, **kw)
        self.kind = kind
        self.identify_body: dict = {}

    async def serve(self, stream: trio.abc.Stream) -> None:
        from pynsqd.streams import DeflateStream, SnappyStream

        buf = b""
        while True:  # magic + IDENTIFY arrive in plain text
            buf += await stream.receive_some()
            parser = CommandParser()
            cmds = parser.commands(buf[4:])
            if cmds:
                break
        self.identify_body = json.loads(cmds[0].body)
        reply = {"max_rdy_count": 100, "tls_v1" if self.kind == "tls" else self.kind: True, "deflate_level": 3}
        await stream.send_all(encode_response(json.dumps(reply).encode()))
        if self.kind == "tls":
            wrapped: trio.abc.Stream = trio.SSLStream(stream, self.server_context, server_side=True)
            await wrapped.do_handshake()
        else:
            wrapped = SnappyStream(stream) if self.kind == "snappy" else DeflateStream(stream, 3)
        await wrapped.send_all(encode_response(OK))
        await super().serve(_Replay(wrapped))


class _Replay(trio.abc.Stream):
    """Prepend the magic the base FakeNSQD expects."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self.first = True

    async def receive_some(self, max_bytes=None):  # noqa: ANN001, ANN201
        if self.first:
            self.first = False
            return MAGIC_V2
        return await self.inner.receive_some(max_bytes)

    async def send_all(self, data) -> None:  # noqa: ANN001
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.inner.aclose()


@pytest.mark.parametrize("kind", ["deflate", "snappy", "tls"])
async def test_upgraded_connection_after_identify(autojump_clock, kind):
    import ssl

    import trustme

    ca = trustme.CA()
    cluster = Cluster()
    server = UpgradingNSQD(cluster, "10.0.0.1:4150", [b"x" * 5000, b"small"], kind=kind)
    server.server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("10.0.0.1").configure_cert(server.server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    cluster.servers[server.address] = server
    options = {"tls_v1": True, "tls_context": client_context} if kind == "tls" else {kind: True}
    seen: list[bytes] = []

    async def handler(message: Message) -> None:
        seen.append(message.body)

    async with trio.open_nursery() as nursery:
        cluster.nursery = nursery
        reader = Reader("t", "c", handler, nsqd_tcp_addresses=[server.address], open_stream=cluster.open_stream, **options, **SIM)
        await nursery.start(reader.run)
        await wait_until(lambda: len(server.finished) == 2)
        await reader.stop()
        nursery.cancel_scope.cancel()
    assert server.identify_body["tls_v1" if kind == "tls" else kind] is True
    assert seen == [b"x" * 5000, b"small"]


def test_stream_layers_round_trip_any_chunking():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from pynsqd.streams import DeflateStream, SnappyStream

    @settings(max_examples=60, deadline=None)
    @given(st.lists(st.binary(max_size=70000), max_size=5), st.sampled_from(["deflate", "snappy"]), st.integers(1, 5000))
    def check(messages, kind, max_bytes):
        async def main():
            a, b = trio.testing.memory_stream_pair()
            make = (lambda s: DeflateStream(s, 6)) if kind == "deflate" else SnappyStream
            left, right = make(a), make(b)
            got = bytearray()
            want = b"".join(messages)
            async with trio.open_nursery() as nursery:

                async def send():
                    for m in messages:
                        await left.send_all(m)

                nursery.start_soon(send)
                while len(got) < len(want):
                    got += await right.receive_some(max_bytes)
            assert bytes(got) == want

        trio.run(main)

    check()


async def test_concurrency_one_handles_in_arrival_order(autojump_clock):
    cluster = Cluster()
    cluster.add("10.0.0.1:4150", [f"{i}".encode() for i in range(20)])
    order: list[int] = []
    running = {"now": 0, "max": 0}

    async def handler(message: Message) -> None:
        running["now"] += 1
        running["max"] = max(running["max"], running["now"])
        await trio.sleep(0.1)
        order.append(int(message.body))
        running["now"] -= 1

    async with trio.open_nursery() as nursery:
        cluster.nursery = nursery
        reader = Reader(
            "t", "c", handler, nsqd_tcp_addresses=["10.0.0.1:4150"], max_in_flight=10, concurrency=1, open_stream=cluster.open_stream, **SIM
        )
        await nursery.start(reader.run)
        await wait_until(lambda: len(order) == 20)
        await reader.stop()
        nursery.cancel_scope.cancel()
    assert order == list(range(20)) and running["max"] == 1
