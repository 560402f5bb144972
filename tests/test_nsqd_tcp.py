"""TCP protocol V2 against a real pynsqd subprocess: delivery semantics and
every error the protocol defines, driven with raw sockets."""

from __future__ import annotations

import json
import socket
import struct
import threading
import time

import pytest
import trio

from helpers import RawClient, wait_for
from pynsqd.protocol import FRAME_TYPE_ERROR, FRAME_TYPE_RESPONSE, encode_command, encode_mpub_body


def subscriber(nsqd, topic: str, channel: str, rdy: int = 10, **identify) -> RawClient:
    c = RawClient(nsqd.tcp_port)
    identify.setdefault("feature_negotiation", True)
    identify.setdefault("output_buffer_timeout", 25)
    c.identify(**identify)
    assert c.sub(topic, channel).data == b"OK"
    c.cmd(b"RDY", str(rdy))
    return c


def channel_stats(nsqd, topic: str, channel: str) -> dict:
    for t in nsqd.stats(topic)["topics"]:
        if t["topic_name"] == topic:
            for c in t["channels"]:
                if c["channel_name"] == channel:
                    return c
    return {}


def topic_names(nsqd) -> set[str]:
    return {t["topic_name"] for t in nsqd.stats()["topics"]}


def assert_still_serving(nsqd, topic: str) -> None:
    with RawClient(nsqd.tcp_port) as c:
        assert c.pub(topic + "_alive", b"ping").data == b"OK"


# ------------------------------------------------------------ delivery


def test_pub_and_consume_on_two_channels(nsqd, unique):
    a = subscriber(nsqd, unique, "a")
    b = subscriber(nsqd, unique, "b")
    with RawClient(nsqd.tcp_port) as p:
        assert p.pub(unique, b"one").data == b"OK"
        assert p.mpub(unique, [b"two", b"three"]).data == b"OK"
    for c in (a, b):
        got = []
        for _ in range(3):
            ts, attempts, msg_id, body = c.read_message()
            assert attempts == 1 and len(msg_id) == 16
            c.cmd(b"FIN", msg_id)
            got.append(body)
        assert got == [b"one", b"two", b"three"]
    wait_for(lambda: channel_stats(nsqd, unique, "a").get("in_flight_count") == 0)
    st = channel_stats(nsqd, unique, "b")
    assert st["message_count"] == 3 and st["depth"] == 0
    a.close(), b.close()


def test_topic_without_channels_keeps_messages_for_first_channel(nsqd, unique):
    with RawClient(nsqd.tcp_port) as p:
        p.mpub(unique, [b"m%d" % i for i in range(5)])
    wait_for(lambda: any(t["topic_name"] == unique and t["depth"] == 5 for t in nsqd.stats(unique)["topics"]))
    c = subscriber(nsqd, unique, "first")
    bodies = [c.read_message()[3] for _ in range(5)]
    assert bodies == [b"m%d" % i for i in range(5)]
    c.close()


def test_competing_consumers_each_message_once(nsqd, unique):
    consumers = [subscriber(nsqd, unique, "work", rdy=5) for _ in range(3)]
    n = 300
    with RawClient(nsqd.tcp_port) as p:
        p.mpub(unique, [b"%d" % i for i in range(n)])
    seen: list[bytes] = []
    per_consumer = [0, 0, 0]
    # each consumer FINs as it goes; read round-robin until all arrived
    deadline = time.monotonic() + 20
    while len(seen) < n and time.monotonic() < deadline:
        for i, c in enumerate(consumers):
            try:
                _, _, msg_id, body = c.read_message(timeout=0.05)
            except (socket.timeout, TimeoutError):
                continue
            seen.append(body)
            per_consumer[i] += 1
            c.cmd(b"FIN", msg_id)
    assert sorted(seen) == sorted(b"%d" % i for i in range(n))
    assert len(set(seen)) == n
    assert all(count > 0 for count in per_consumer), per_consumer
    for c in consumers:
        c.close()


def test_req_redelivers_with_attempts_2(nsqd, unique):
    c = subscriber(nsqd, unique, "ch")
    with RawClient(nsqd.tcp_port) as p:
        p.pub(unique, b"again")
    _, attempts, msg_id, body = c.read_message()
    assert attempts == 1
    c.cmd(b"REQ", msg_id, "0")
    _, attempts, msg_id2, body2 = c.read_message()
    assert (attempts, msg_id2, body2) == (2, msg_id, b"again")
    c.cmd(b"FIN", msg_id)
    st = wait_for(lambda: (s := channel_stats(nsqd, unique, "ch")) and s["in_flight_count"] == 0 and s)
    assert st["requeue_count"] == 1
    client = st["clients"][0]
    assert (client["message_count"], client["finish_count"], client["requeue_count"]) == (2, 1, 1)
    c.close()


def test_req_with_delay_is_deferred(nsqd, unique):
    c = subscriber(nsqd, unique, "ch")
    with RawClient(nsqd.tcp_port) as p:
        p.pub(unique, b"later")
    _, _, msg_id, _ = c.read_message()
    start = time.monotonic()
    c.cmd(b"REQ", msg_id, "700")
    wait_for(lambda: channel_stats(nsqd, unique, "ch").get("deferred_count") == 1)
    _, attempts, _, body = c.read_message(timeout=10)
    assert time.monotonic() - start >= 0.65
    assert (attempts, body) == (2, b"later")
    c.close()


def test_in_flight_timeout_redelivers(nsqd, unique):
    c = subscriber(nsqd, unique, "ch", msg_timeout=1000)
    with RawClient(nsqd.tcp_port) as p:
        p.pub(unique, b"slow")
    start = time.monotonic()
    _, attempts, msg_id, _ = c.read_message()
    assert attempts == 1
    _, attempts, msg_id2, _ = c.read_message(timeout=10)
    assert attempts == 2 and msg_id2 == msg_id
    assert time.monotonic() - start >= 0.9
    c.cmd(b"FIN", msg_id)
    st = wait_for(lambda: (s := channel_stats(nsqd, unique, "ch")) and s["in_flight_count"] == 0 and s)
    assert st["timeout_count"] == 1
    c.close()


def test_dpub_delay_is_honoured(nsqd, unique):
    c = subscriber(nsqd, unique, "ch")
    with RawClient(nsqd.tcp_port) as p:
        start = time.monotonic()
        p.cmd(b"DPUB", unique, "800", body=b"deferred")
        assert p.read_response().data == b"OK"
        p.pub(unique, b"now")
    assert c.read_message()[3] == b"now"
    _, attempts, _, body = c.read_message(timeout=10)
    assert body == b"deferred" and attempts == 1
    assert time.monotonic() - start >= 0.75
    c.close()


def test_touch_extends_the_timeout(nsqd, unique):
    c = subscriber(nsqd, unique, "ch", msg_timeout=1000)
    with RawClient(nsqd.tcp_port) as p:
        p.pub(unique, b"touchy")
    start = time.monotonic()
    _, _, msg_id, _ = c.read_message()
    # touch every 0.4 s for 2.4 s: without the touches it would time out at 1 s
    while time.monotonic() - start < 2.4:
        time.sleep(0.4)  # the client's own pacing, not synchronisation
        c.cmd(b"TOUCH", msg_id)
    st = channel_stats(nsqd, unique, "ch")
    assert st["timeout_count"] == 0 and st["in_flight_count"] == 1
    c.cmd(b"FIN", msg_id)
    wait_for(lambda: channel_stats(nsqd, unique, "ch").get("in_flight_count") == 0)
    assert channel_stats(nsqd, unique, "ch")["timeout_count"] == 0
    c.close()


def test_touch_of_unknown_id_is_not_fatal(nsqd, unique):
    c = subscriber(nsqd, unique, "ch")
    c.cmd(b"TOUCH", b"0123456789abcdef")
    frame = c.read_response()
    assert frame.frame_type == FRAME_TYPE_ERROR
    assert frame.data == b"E_TOUCH_FAILED TOUCH 0123456789abcdef failed ID not in flight"
    c.cmd(b"REQ", b"0123456789abcdef", "0")
    assert c.read_response().data.startswith(b"E_REQ_FAILED REQ 0123456789abcdef failed")
    c.cmd(b"NOP")
    with RawClient(nsqd.tcp_port) as p:
        p.pub(unique, b"still here")
    assert c.read_message()[3] == b"still here"
    c.close()


def test_ephemeral_channel_and_topic_are_removed_with_their_last_client(nsqd, unique):
    topic = unique + "#ephemeral"
    c = subscriber(nsqd, topic, "ch#ephemeral")
    with RawClient(nsqd.tcp_port) as p:
        p.pub(topic, b"x")
    assert c.read_message()[3] == b"x"
    assert topic in topic_names(nsqd)
    c.close()
    wait_for(lambda: topic not in topic_names(nsqd), message="ephemeral topic removed")


def test_ephemeral_channel_of_a_normal_topic(nsqd, unique):
    c1 = subscriber(nsqd, unique, "e#ephemeral")
    c2 = subscriber(nsqd, unique, "durable")
    c1.close()
    wait_for(lambda: not channel_stats(nsqd, unique, "e#ephemeral"))
    assert channel_stats(nsqd, unique, "durable")
    assert unique in topic_names(nsqd)
    c2.close()


def test_pause_holds_delivery(nsqd, unique):
    c = subscriber(nsqd, unique, "ch")
    assert nsqd.http("POST", f"/channel/pause?topic={unique}&channel=ch")[0] == 200
    with RawClient(nsqd.tcp_port) as p:
        p.pub(unique, b"held")
    with pytest.raises((socket.timeout, TimeoutError)):
        c.read_message(timeout=0.6)
    assert channel_stats(nsqd, unique, "ch")["paused"] is True
    assert channel_stats(nsqd, unique, "ch")["depth"] == 1
    assert nsqd.http("POST", f"/channel/unpause?topic={unique}&channel=ch")[0] == 200
    assert c.read_message(timeout=10)[3] == b"held"
    # topic pause: messages stay in the topic
    assert nsqd.http("POST", f"/topic/pause?topic={unique}")[0] == 200
    with RawClient(nsqd.tcp_port) as p:
        p.pub(unique, b"topic-held")
    wait_for(lambda: any(t["topic_name"] == unique and t["depth"] == 1 and t["paused"] for t in nsqd.stats(unique)["topics"]))
    assert nsqd.http("POST", f"/topic/unpause?topic={unique}")[0] == 200
    assert c.read_message(timeout=10)[3] == b"topic-held"
    c.close()


def test_rdy_window_limits_in_flight(nsqd, unique):
    c = subscriber(nsqd, unique, "ch", rdy=2)
    with RawClient(nsqd.tcp_port) as p:
        p.mpub(unique, [b"a", b"b", b"c", b"d"])
    m1, m2 = c.read_message(), c.read_message()
    st = wait_for(lambda: (s := channel_stats(nsqd, unique, "ch")) and s["in_flight_count"] == 2 and s)
    assert st["depth"] == 2 and st["clients"][0]["ready_count"] == 2
    with pytest.raises((socket.timeout, TimeoutError)):
        c.read_message(timeout=0.4)
    c.cmd(b"FIN", m1[2])
    m3 = c.read_message()
    assert m3[3] == b"c"
    c.cmd(b"RDY", "0")
    c.cmd(b"FIN", m2[2])
    c.cmd(b"FIN", m3[2])
    with pytest.raises((socket.timeout, TimeoutError)):
        c.read_message(timeout=0.4)
    c.cmd(b"RDY", "1")
    assert c.read_message()[3] == b"d"
    c.close()


def test_cls_answers_close_wait(nsqd, unique):
    c = subscriber(nsqd, unique, "ch")
    c.cmd(b"CLS")
    assert c.read_response().data == b"CLOSE_WAIT"
    c.cmd(b"RDY", "5")  # ignored after CLS
    c.cmd(b"NOP")
    with RawClient(nsqd.tcp_port) as p:
        p.pub(unique, b"not for a closing client")
    with pytest.raises((socket.timeout, TimeoutError)):
        c.read_message(timeout=0.4)
    c.close()


def test_disconnect_requeues_in_flight_at_once(nsqd, unique):
    c1 = subscriber(nsqd, unique, "ch", msg_timeout=60000)
    with RawClient(nsqd.tcp_port) as p:
        p.pub(unique, b"orphan")
    assert c1.read_message()[3] == b"orphan"
    c1.close()
    c2 = subscriber(nsqd, unique, "ch")
    _, attempts, _, body = c2.read_message(timeout=5)
    assert body == b"orphan" and attempts == 2
    c2.close()


def test_heartbeats_and_missed_heartbeats_disconnect(nsqd, unique):
    c = RawClient(nsqd.tcp_port)
    c.identify(feature_negotiation=True, heartbeat_interval=1000)
    assert c.sub(unique, "hb").data == b"OK"
    frame = c.read_frame(timeout=5)
    assert frame == (FRAME_TYPE_RESPONSE, b"_heartbeat_")
    # never answer: nsqd closes after two missed heartbeats
    assert c.closed_by_server(timeout=10)
    c.close()


def test_identify_reply_and_settings(nsqd, unique):
    c = RawClient(nsqd.tcp_port)
    frame = c.identify(
        feature_negotiation=True, client_id="cid", hostname="host.example", user_agent="test/1.0",
        heartbeat_interval=20000, output_buffer_size=1024, output_buffer_timeout=100, msg_timeout=5000, sample_rate=0,
    )
    reply = json.loads(frame.data)
    assert reply == {
        "max_rdy_count": 2500, "version": "1.3.0", "max_msg_timeout": 900000, "msg_timeout": 5000,
        "tls_v1": False, "deflate": False, "deflate_level": 0, "max_deflate_level": 6, "snappy": False,
        "sample_rate": 0, "auth_required": False, "output_buffer_size": 1024, "output_buffer_timeout": 100,
    }
    c.sub(unique, "ch")
    st = wait_for(lambda: (s := channel_stats(nsqd, unique, "ch")) and s["clients"] and s)
    client = st["clients"][0]
    assert (client["client_id"], client["hostname"], client["user_agent"], client["state"]) == ("cid", "host.example", "test/1.0", 3)
    c.close()
    c = RawClient(nsqd.tcp_port)
    assert c.identify(client_id="plain").data == b"OK"
    c.close()


def test_message_ids_are_unique_and_increasing(nsqd, unique):
    c = subscriber(nsqd, unique, "ch", rdy=100)
    with RawClient(nsqd.tcp_port) as p:
        p.mpub(unique, [b"%d" % i for i in range(50)])
    ids = []
    for _ in range(50):
        _, _, msg_id, _ = c.read_message()
        ids.append(msg_id)
        c.cmd(b"FIN", msg_id)
    assert ids == sorted(ids) and len(set(ids)) == 50
    assert all(int(i, 16) >= 0 for i in ids)
    c.close()


# ------------------------------------------------------------ bad input


def expect_fatal(c: RawClient, data: bytes) -> None:
    frame = c.read_response()
    assert frame.frame_type == FRAME_TYPE_ERROR, frame
    assert frame.data == data, frame.data
    assert c.closed_by_server()


def test_wrong_magic(nsqd, unique):
    c = RawClient(nsqd.tcp_port, magic=b"  V9")
    expect_fatal(c, b"E_BAD_PROTOCOL")
    assert_still_serving(nsqd, unique)


def test_unknown_command(nsqd, unique):
    c = RawClient(nsqd.tcp_port)
    c.cmd(b"WHAT", "x")
    expect_fatal(c, b"E_INVALID invalid command WHAT")
    assert_still_serving(nsqd, unique)


@pytest.mark.parametrize(
    "command, expected",
    [
        (encode_command(b"PUB", "bad!topic", body=b"x"), b'E_BAD_TOPIC PUB topic name "bad!topic" is not valid'),
        (encode_command(b"PUB", "a" * 65, body=b"x"), b'E_BAD_TOPIC PUB topic name "' + b"a" * 65 + b'" is not valid'),
        (encode_command(b"MPUB", "bad$", body=encode_mpub_body([b"x"])), b'E_BAD_TOPIC MPUB topic name "bad$" is not valid'),
        (encode_command(b"DPUB", "bad$", "10", body=b"x"), b'E_BAD_TOPIC DPUB topic name "bad$" is not valid'),
        (encode_command(b"SUB", "bad$", "ch"), b'E_BAD_TOPIC SUB topic name "bad$" is not valid'),
        (encode_command(b"SUB", "good", "bad$"), b'E_BAD_CHANNEL SUB channel name "bad$" is not valid'),
        (encode_command(b"SUB", "good"), b"E_INVALID SUB insufficient number of parameters"),
        (encode_command(b"PUB"), b"E_INVALID PUB insufficient number of parameters"),
        (encode_command(b"DPUB", "good", "-5", body=b"x"), b"E_INVALID DPUB could not parse timeout -5"),
        (encode_command(b"DPUB", "good", "3600001", body=b"x"), b"E_INVALID DPUB timeout 3600001 out of range 0-3600000"),
        (encode_command(b"PUB", "good") + struct.pack(">i", 0), b"E_BAD_MESSAGE PUB invalid message body size 0"),
        (encode_command(b"PUB", "good") + struct.pack(">i", 1048577), b"E_BAD_MESSAGE PUB message too big 1048577 > 1048576"),
        (encode_command(b"MPUB", "good") + struct.pack(">i", 5242881), b"E_BAD_BODY MPUB body too big 5242881 > 5242880"),
        (encode_command(b"MPUB", "good", body=struct.pack(">i", 0)), b"E_BAD_BODY MPUB invalid message count 0"),
        (encode_command(b"RDY", "5"), b"E_INVALID cannot RDY in current state"),
        (encode_command(b"FIN", "0123456789abcdef"), b"E_INVALID cannot FIN in current state"),
        (encode_command(b"CLS"), b"E_INVALID cannot CLS in current state"),
        (encode_command(b"IDENTIFY", body=b"{not json"), b"E_BAD_BODY IDENTIFY failed to decode JSON body"),
        (encode_command(b"IDENTIFY", body=b'{"heartbeat_interval": "x"}'), b"E_BAD_BODY IDENTIFY failed to decode JSON body"),
        (encode_command(b"IDENTIFY", body=b'{"heartbeat_interval": 10}'), b"E_BAD_BODY IDENTIFY heartbeat interval (10) is invalid"),
        (encode_command(b"IDENTIFY", body=b'{"output_buffer_size": 10}'), b"E_BAD_BODY IDENTIFY output buffer size (10) is invalid"),
        (encode_command(b"IDENTIFY", body=b'{"sample_rate": 100}'), b"E_BAD_BODY IDENTIFY sample rate (100) is invalid"),
        (encode_command(b"IDENTIFY", body=b'{"msg_timeout": 999}'), b"E_BAD_BODY IDENTIFY msg timeout (999) is invalid"),
        (encode_command(b"IDENTIFY") + struct.pack(">i", 0), b"E_BAD_BODY IDENTIFY invalid body size 0"),
        (encode_command(b"AUTH", body=b"secret"), b"E_AUTH_DISABLED AUTH disabled"),
    ],
)
def test_fatal_errors(nsqd, unique, command, expected):
    c = RawClient(nsqd.tcp_port)
    c.send(command)
    expect_fatal(c, expected)
    assert_still_serving(nsqd, unique)


def test_sub_with_heartbeats_disabled(nsqd, unique):
    c = RawClient(nsqd.tcp_port)
    c.identify(heartbeat_interval=-1)
    c.cmd(b"SUB", unique, "ch")
    expect_fatal(c, b"E_INVALID cannot SUB with heartbeats disabled")


@pytest.mark.parametrize("count, expected", [("-1", b"E_INVALID RDY could not parse count -1"), ("2501", b"E_INVALID RDY count 2501 out of range 0-2500"), ("abc", b"E_INVALID RDY could not parse count abc")])
def test_bad_rdy(nsqd, unique, count, expected):
    c = subscriber(nsqd, unique, "ch", rdy=1)
    c.cmd(b"RDY", count)
    expect_fatal(c, expected)
    assert_still_serving(nsqd, unique)


def test_fin_of_unknown_id_is_not_fatal(nsqd, unique):
    c = subscriber(nsqd, unique, "ch")
    c.cmd(b"FIN", b"0123456789abcdef")
    frame = c.read_response()
    assert (frame.frame_type, frame.data) == (FRAME_TYPE_ERROR, b"E_FIN_FAILED FIN 0123456789abcdef failed ID not in flight")
    with RawClient(nsqd.tcp_port) as p:
        p.pub(unique, b"after")
    assert c.read_message()[3] == b"after"
    c.cmd(b"FIN", b"short")
    expect_fatal(c, b"E_INVALID Invalid Message ID")


def test_fin_of_another_clients_message(nsqd, unique):
    a = subscriber(nsqd, unique, "ch", rdy=1)
    b = subscriber(nsqd, unique, "ch", rdy=1)
    with RawClient(nsqd.tcp_port) as p:
        p.pub(unique, b"mine")
    # whichever got it, the other may not FIN it
    for owner, other in ((a, b), (b, a)):
        try:
            _, _, msg_id, _ = owner.read_message(timeout=1)
        except (socket.timeout, TimeoutError):
            continue
        other.cmd(b"FIN", msg_id)
        assert other.read_response().data == b"E_FIN_FAILED FIN " + msg_id + b" failed client does not own message"
        owner.cmd(b"FIN", msg_id)
        break
    else:
        raise AssertionError("message not delivered")
    a.close(), b.close()


def test_mpub_with_one_bad_message_queues_nothing(nsqd, unique):
    nsqd.http("POST", f"/topic/create?topic={unique}")
    c = RawClient(nsqd.tcp_port)
    body = struct.pack(">i", 3) + struct.pack(">i", 2) + b"ok" + struct.pack(">i", 0) + struct.pack(">i", 2) + b"ok"
    c.send(encode_command(b"MPUB", unique, body=body))
    expect_fatal(c, b"E_BAD_MESSAGE MPUB invalid message(1) body size 0")
    topic = [t for t in nsqd.stats(unique)["topics"] if t["topic_name"] == unique][0]
    assert topic["depth"] == 0 and topic["message_count"] == 0
    c = RawClient(nsqd.tcp_port)
    body = encode_mpub_body([b"fine", b"x" * 1048577])
    c.send(encode_command(b"MPUB", unique, body=body))
    expect_fatal(c, b"E_BAD_MESSAGE MPUB message too big 1048577 > 1048576")
    topic = [t for t in nsqd.stats(unique)["topics"] if t["topic_name"] == unique][0]
    assert topic["message_count"] == 0


def test_client_disconnecting_mid_frame(nsqd, unique):
    c = RawClient(nsqd.tcp_port)
    c.send(encode_command(b"PUB", unique) + struct.pack(">i", 100) + b"only part of the body")
    c.close()
    c = RawClient(nsqd.tcp_port)
    c.send(b"PUB " + unique.encode())  # no newline
    c.close()
    with RawClient(nsqd.tcp_port) as p:
        assert p.pub(unique, b"whole").data == b"OK"
    consumer = subscriber(nsqd, unique, "ch")
    assert consumer.read_message()[3] == b"whole"
    consumer.close()


def test_pipelined_commands_in_one_write(nsqd, unique):
    with RawClient(nsqd.tcp_port) as p:
        data = b"".join(encode_command(b"PUB", unique, body=b"%d" % i) for i in range(100))
        p.send(data)
        for _ in range(100):
            assert p.read_response().data == b"OK"
    c = subscriber(nsqd, unique, "ch", rdy=100)
    assert [c.read_message()[3] for _ in range(100)] == [b"%d" % i for i in range(100)]
    c.close()


def test_a_publisher_that_always_has_more_does_not_starve_another(nsqd, unique):
    # the busy publisher's next PUBs are always there when the daemon reads:
    # the reader yields to the other connections by time, not by waiting
    busy = RawClient(nsqd.tcp_port)
    # (ephemeral: no disk, so no sync for the reader to wait for either)
    chunk = encode_command(b"PUB", unique + "#ephemeral", body=b"x") * 20_000
    stop = threading.Event()
    sent = []

    def flood() -> None:
        deadline = time.monotonic() + 30  # bounded: a starved PUB below times out first (10 s)
        try:
            while not stop.is_set() and time.monotonic() < deadline:
                busy.send(chunk)
                sent.append(20_000)
        except OSError:  # closed below
            pass

    flooder = threading.Thread(target=flood, daemon=True)
    flooder.start()
    try:
        wait_for(lambda: sum(sent) >= 100_000, message="the flood under way")
        with RawClient(nsqd.tcp_port) as other:
            assert other.pub(unique + "_other", b"y").data == b"OK"
        assert flooder.is_alive()  # answered while the flood went on
    finally:
        stop.set()
        # a reset: the daemon drops what is still unread instead of publishing it
        busy.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        busy.close()
        flooder.join()


def test_the_readers_count_of_runnable_tasks_is_trios():
    # the reader spins only while no other task is runnable; it reads trio's
    # run queue instead of building current_statistics() before each spin
    from pynsqd import tcp

    async def main() -> None:
        assert tcp._RUN_CONTEXT is not None and hasattr(tcp._RUN_CONTEXT.runner, "runq")  # the quick way still works
        async with trio.open_nursery() as nursery:
            for expected in range(4):
                assert tcp._tasks_runnable() == trio.lowlevel.current_statistics().tasks_runnable == expected
                nursery.start_soon(trio.sleep, 0)

    trio.run(main)


def test_max_channel_consumers(tmp_path, unique):
    from helpers import start_nsqd

    d = start_nsqd(str(tmp_path), "--max-channel-consumers=1")
    try:
        c1 = subscriber(d, unique, "ch")
        c2 = RawClient(d.tcp_port)
        c2.identify(feature_negotiation=True)
        c2.cmd(b"SUB", unique, "ch")
        expect_fatal(c2, f"E_SUB_FAILED SUB failed consumers for {unique}:ch exceeds limit of 1".encode())
        c1.close()
    finally:
        d.stop()
