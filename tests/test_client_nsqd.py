"""The Reader and Writer against real pynsqd (and pynsqlookupd) subprocesses
over loopback, and against the official pynsq client -- every test on trio
and on asyncio."""

from __future__ import annotations

import json
import random
import sys
import time

import anyio
import anyio.to_thread
import pytest

from pynsqd.client import Message, NSQError, Reader, Writer
from helpers import Daemon, eventually, http_request, on_both_backends, run_driver, start_nsqd



def channel_stats(daemon: Daemon, topic: str, channel: str) -> dict | None:
    for t in daemon.stats(topic)["topics"]:
        if t["topic_name"] == topic:
            for c in t["channels"]:
                if c["channel_name"] == channel:
                    return c
    return None


def publish(daemon: Daemon, topic: str, bodies: list[bytes]) -> None:
    status, body = daemon.http("POST", f"/mpub?topic={topic}&binary=false", b"\n".join(bodies))
    assert status == 200, body


# ---------------------------------------------------------------- single nsqd


@on_both_backends
async def test_reader_backoff_is_visible_in_ready_count_then_recovers(nsqd, unique):
    failures = {"left": 2}

    async def handler(message: Message) -> None:
        if failures["left"] > 0:
            failures["left"] -= 1
            raise RuntimeError("transient")

    def ready_counts() -> list[int]:
        c = channel_stats(nsqd, unique, "bk")
        return [cl["ready_count"] for cl in c["clients"]] if c else []

    samples: list[int] = []

    async def sample() -> None:
        while True:
            samples.extend(ready_counts())
            await anyio.sleep(0.02)

    async with Reader(
        unique, "bk", handler, nsqd_tcp_addresses=[nsqd.tcp_address], max_in_flight=4,
        default_requeue_delay=0, backoff_multiplier=0.5,
    ) as reader:
        await eventually(lambda: ready_counts() == [4], message="RDY 4")
        async with anyio.create_task_group() as nursery:
            nursery.start_soon(sample)
            publish(nsqd, unique, [f"m{i}".encode() for i in range(12)])
            # a failure: RDY 0 for 2**1 * 0.5 = 1 s, then RDY 1, then back to 4
            await eventually(lambda: reader.stats().messages_finished == 12, timeout=20, message="all finished")
            await eventually(lambda: ready_counts() == [4], timeout=10, message="RDY back to 4")
            nursery.cancel_scope.cancel()
        assert reader.stats().messages_requeued == 2
    assert 0 in samples, samples  # RDY 0 seen by nsqd; RDY 4 again checked above
    c = channel_stats(nsqd, unique, "bk")
    assert c["depth"] == 0 and c["in_flight_count"] == 0 and c["requeue_count"] == 2


@on_both_backends
async def test_max_attempts_calls_the_give_up_hook_once_then_fins(nsqd, unique):
    publish(nsqd, unique, [b"poison", b"fine"])
    gave_up: list[bytes] = []

    async def on_give_up(message: Message) -> None:
        gave_up.append(message.body)

    async def handler(message: Message) -> None:
        if message.body == b"poison":
            raise ValueError("cannot process")

    async with Reader(
        unique, "ma", handler, nsqd_tcp_addresses=[nsqd.tcp_address], max_in_flight=2,
        max_attempts=3, default_requeue_delay=0, max_backoff_duration=0, on_give_up=on_give_up,
    ) as reader:
        await eventually(lambda: reader.stats().messages_finished == 2, message="poison given up")
    assert gave_up == [b"poison"]
    assert reader.stats().messages_requeued == 3
    c = channel_stats(nsqd, unique, "ma")
    assert c["depth"] == 0 and c["in_flight_count"] == 0 and c["requeue_count"] == 3


@on_both_backends
async def test_graceful_stop_leaves_nothing_in_flight(nsqd, unique):
    publish(nsqd, unique, [f"s{i}".encode() for i in range(20)])
    started = anyio.Event()

    async def handler(message: Message) -> None:
        started.set()
        await anyio.sleep(0.3)

    reader = Reader(unique, "gs", handler, nsqd_tcp_addresses=[nsqd.tcp_address], max_in_flight=5)
    async with anyio.create_task_group() as nursery:
        await nursery.start(reader.run)
        await started.wait()
        await eventually(lambda: (channel_stats(nsqd, unique, "gs") or {}).get("in_flight_count") == 5, message="5 in flight")
        await reader.stop()
    c = channel_stats(nsqd, unique, "gs")
    assert c["in_flight_count"] == 0
    # nsqd notices the closed socket a moment later
    c = await eventually(lambda: (x := channel_stats(nsqd, unique, "gs")) and x["client_count"] == 0 and x, message="client gone")
    assert c["requeue_count"] == 0 and c["timeout_count"] == 0
    finished = reader.stats().messages_finished
    assert finished >= 5 and c["depth"] == 20 - finished


@on_both_backends
async def test_writer_pub_mpub_dpub_and_errors(nsqd, unique):
    async with Writer([nsqd.tcp_address]) as writer:
        await writer.pub(unique, b"one")
        await writer.mpub(unique, [b"two", b"three"])
        await writer.dpub(unique, 0.2, b"later")
        async with anyio.create_task_group() as nursery:  # pipelined on one connection
            for i in range(50):
                nursery.start_soon(writer.pub, unique, f"c{i}".encode())
        with pytest.raises(NSQError) as info:
            await writer.pub(unique, b"x" * (2 * 1024 * 1024))
        assert info.value.code == "E_BAD_MESSAGE"
        # nsqd closed that connection (E_BAD_MESSAGE is fatal): the writer redials
        await writer.pub(unique, b"after-error")
    t = [x for x in nsqd.stats(unique)["topics"] if x["topic_name"] == unique][0]
    assert t["message_count"] == 1 + 2 + 1 + 50 + 1


# ---------------------------------------------------------------- several nsqds, lookupd


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    lookupd = Daemon([sys.executable, "-m", "pynsqlookupd", "--tcp-address=127.0.0.1:0", "--http-address=127.0.0.1:0"])
    lookupd.wait_listening()
    nsqds = [
        start_nsqd(str(tmp_path_factory.mktemp(f"n{i}")), f"--lookupd-tcp-address=127.0.0.1:{lookupd.tcp_port}", "--broadcast-address=127.0.0.1")
        for i in range(3)
    ]
    yield lookupd, nsqds
    for d in nsqds:
        d.stop()
    lookupd.stop()


def lookup(lookupd: Daemon, topic: str) -> list[dict]:
    status, body = http_request("GET", f"http://127.0.0.1:{lookupd.http_port}/lookup?topic={topic}")
    return json.loads(body)["producers"] if status == 200 else []


@pytest.fixture
def registered(cluster, unique):
    """The topic on all three nsqds, visible in lookupd -- or a skip when
    nsqd's registration with lookupd does not work in this build."""
    lookupd, nsqds = cluster
    for d in nsqds:
        assert d.http("POST", f"/topic/create?topic={unique}")[0] == 200
    deadline = time.monotonic() + 5
    while len(lookup(lookupd, unique)) < 3:
        if time.monotonic() > deadline:
            pytest.fail("the nsqds did not register the topic with pynsqlookupd within 5 s")
        time.sleep(0.05)
    return lookupd, nsqds


@on_both_backends
async def test_three_nsqds_via_lookupd_max_in_flight_one_consumes_everything(registered, unique):
    lookupd, nsqds = registered
    for i, d in enumerate(nsqds):
        publish(d, unique, [f"{i}-{j}".encode() for j in range(10)])
    seen: list[bytes] = []
    concurrent = {"now": 0, "max": 0}

    async def handler(message: Message) -> None:
        concurrent["now"] += 1
        concurrent["max"] = max(concurrent["max"], concurrent["now"])
        await anyio.sleep(0)
        concurrent["now"] -= 1
        seen.append(message.body)

    async with Reader(
        unique, "lk", handler, lookupd_http_addresses=[f"127.0.0.1:{lookupd.http_port}"], max_in_flight=1,
        lookupd_poll_interval=1.0, low_rdy_idle_timeout=0.3, rdy_redistribute_interval=0.1,
    ) as reader:
        await eventually(lambda: len(reader.connections) == 3, message="3 connections")
        await eventually(lambda: len(seen) == 30, timeout=40, message="30 messages")
        assert reader.rdy.total_rdy <= 1
        # one nsqd drops the topic: it leaves lookupd and the Reader lets it go
        assert nsqds[2].http("POST", f"/topic/delete?topic={unique}")[0] == 200
        await eventually(lambda: len(reader.connections) == 2 and len(reader._targets) == 2, timeout=15, message="vanished nsqd dropped")
    assert sorted(seen) == sorted(f"{i}-{j}".encode() for i in range(3) for j in range(10))
    assert concurrent["max"] == 1
    for d in nsqds[:2]:
        c = channel_stats(d, unique, "lk")
        assert c["depth"] == 0 and c["in_flight_count"] == 0


@on_both_backends
async def test_reader_finds_an_nsqd_that_appears_later(registered, unique, tmp_path):
    lookupd, nsqds = registered
    got: list[bytes] = []

    async def handler(message: Message) -> None:
        got.append(message.body)

    async with Reader(
        unique, "late", handler, lookupd_http_addresses=[f"http://127.0.0.1:{lookupd.http_port}"], max_in_flight=10,
        lookupd_poll_interval=0.5,
    ) as reader:
        await eventually(lambda: len(reader.connections) == 3, message="3 connections")
        late = start_nsqd(str(tmp_path), f"--lookupd-tcp-address=127.0.0.1:{lookupd.tcp_port}", "--broadcast-address=127.0.0.1")
        try:
            publish(late, unique, [b"from-the-new-one"])
            await eventually(lambda: got == [b"from-the-new-one"], timeout=15, message="message from the new nsqd")
            assert len(reader.connections) == 4
        finally:
            late.stop()
        await eventually(lambda: len(reader.connections) == 3, timeout=15, message="the stopped nsqd dropped")


@on_both_backends
async def test_a_reader_started_before_its_topic_exists_gets_the_first_message_within_seconds(cluster, unique, monkeypatch):
    from pynsqd.client import reader as reader_module

    lookupd, nsqds = cluster
    answered: list[str] = []
    real_query = reader_module.query_lookupd

    async def counting_query(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        producers = await real_query(*args, **kwargs)
        answered.append(args[0])
        return producers

    monkeypatch.setattr(reader_module, "query_lookupd", counting_query)
    got: list[bytes] = []

    async def handler(message: Message) -> None:
        got.append(message.body)

    # default poll interval (60 s) and jitter (0.3); this seed draws a long jitter (~17 s)
    async with Reader(unique, "fresh", handler, lookupd_http_addresses=[f"127.0.0.1:{lookupd.http_port}"], rng=random.Random(2)):
        await eventually(lambda: answered, message="lookupd asked (the topic does not exist yet)")
        publish(nsqds[0], unique, [b"first"])
        await eventually(lambda: got, timeout=8, message="the first message")
    assert got == [b"first"]


# ---------------------------------------------------------------- writer failover


@on_both_backends
async def test_writer_keeps_publishing_while_an_nsqd_is_killed_and_restarted(tmp_path):
    # mem-queue-size 0: every acknowledged message is on disk, so even the
    # SIGKILLed nsqd keeps what it acknowledged and we can count everything
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    a_dir.mkdir()
    b_dir.mkdir()
    a = start_nsqd(str(a_dir), "--mem-queue-size=0")
    b = start_nsqd(str(b_dir), "--mem-queue-size=0")
    a_tcp, a_http = a.tcp_address, a.http_address
    topic = "failover"
    published: list[bytes] = []
    errors: list[BaseException] = []
    total = 600
    try:
        async with Writer([a.tcp_address, b.tcp_address], reconnect_interval=0.1, publish_timeout=15.0) as writer:
            await writer.wait_connected(2)

            async def publisher(k: int) -> None:
                for i in range(k, total, 4):
                    body = f"f{i}".encode()
                    try:
                        await writer.pub(topic, body)
                        published.append(body)
                    except Exception as exc:  # noqa: BLE001 - counted, must stay empty
                        errors.append(exc)
                    await anyio.sleep(0.005)

            async def chaos() -> None:
                nonlocal a
                await eventually(lambda: len(published) > total // 4, message="some published")
                a.kill()
                await eventually(lambda: writer.connected == [b.tcp_address], message="writer noticed")
                outage_start = len(published)
                await eventually(lambda: len(published) > max(total // 2, outage_start + 50), message="published during the outage")
                a = start_nsqd(str(a_dir), "--mem-queue-size=0", f"--tcp-address={a_tcp}", f"--http-address={a_http}")
                await eventually(lambda: len(writer.connected) == 2, timeout=15, message="writer reconnected")

            async with anyio.create_task_group() as nursery:
                for k in range(4):
                    nursery.start_soon(publisher, k)
                nursery.start_soon(chaos)
        assert errors == []
        assert len(published) == total
        # everything acknowledged is somewhere; a retry after a lost answer may duplicate
        depth = 0
        for d in (a, b):
            ts = [t for t in d.stats(topic)["topics"] if t["topic_name"] == topic]
            depth += ts[0]["depth"] if ts else 0
        assert depth >= total
        got: set[bytes] = set()

        async def handler(message: Message) -> None:
            got.add(message.body)

        async with Reader(topic, "check", handler, nsqd_tcp_addresses=[a.tcp_address, b.tcp_address], max_in_flight=100):
            await eventually(lambda: len(got) == total, timeout=30, message="every message readable")
    finally:
        a.stop()
        b.stop()


# ---------------------------------------------------------------- pynsq on the other side


@on_both_backends
async def test_our_writer_to_a_pynsq_reader(nsqd, unique):
    nsqd.http("POST", f"/topic/create?topic={unique}")
    assert nsqd.http("POST", f"/channel/create?topic={unique}&channel=py")[0] == 200
    async with Writer([nsqd.tcp_address]) as writer:
        for i in range(20):
            await writer.pub(unique, f"p{i}".encode())
        await writer.mpub(unique, [f"m{i}".encode() for i in range(20)])
    events = await anyio.to_thread.run_sync(lambda: run_driver("read", unique, "py", "40", "--nsqd", nsqd.tcp_address, "--timeout", "30"))
    bodies = sorted(e["body"] for e in events if e["event"] == "message")
    assert bodies == sorted([f"p{i}" for i in range(20)] + [f"m{i}" for i in range(20)])


@on_both_backends
async def test_pynsq_writer_to_our_reader_with_a_failing_handler(nsqd, unique):
    nsqd.http("POST", f"/topic/create?topic={unique}")
    assert nsqd.http("POST", f"/channel/create?topic={unique}&channel=ours")[0] == 200
    events = await anyio.to_thread.run_sync(lambda: run_driver("write", unique, "30", "--nsqd", nsqd.tcp_address, "--prefix", "w-"))
    assert events[-1] == {"event": "done", "acked": 30, "errors": 0}
    got: dict[str, int] = {}

    async def handler(message: Message) -> None:
        if message.attempts == 1 and message.body.endswith(b"7"):
            raise RuntimeError("first try fails")
        got[message.body.decode()] = message.attempts

    async with Reader(
        unique, "ours", handler, nsqd_tcp_addresses=[nsqd.tcp_address], max_in_flight=8, default_requeue_delay=0, backoff_multiplier=0.05
    ) as reader:
        await eventually(lambda: len(got) == 30, message="30 handled")
    assert got["w-7"] == 2 and got["w-17"] == 2 and got["w-0"] == 1
    assert reader.stats().messages_requeued == 3
