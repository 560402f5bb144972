"""ProtocolV2's publish path, sans-IO: PUBs to a topic the publisher used
before take a quick path (pynsqd.protocol.CommandParser.take_body_command);
whatever a publisher sends, that path answers exactly as the general one."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pynsqd.nsqd import NSQD
from pynsqd.options import Options
from pynsqd.protocol import FrameDecoder, encode_command, encode_mpub_body
from pynsqd.protocol_v2 import Close, ProtocolV2

MAX_MSG_SIZE = 64


@contextmanager
def publisher(quick: bool, mem_queue_size: int = 10_000) -> Iterator[tuple[NSQD, ProtocolV2]]:
    with tempfile.TemporaryDirectory() as tmp:
        nsqd = NSQD(Options(data_path=tmp, mem_queue_size=mem_queue_size, max_msg_size=MAX_MSG_SIZE, lookupd_tcp_addresses=[]))
        proto = ProtocolV2(nsqd, nsqd.new_client("127.0.0.1:1"))
        proto._quick_pub = quick
        try:
            yield nsqd, proto
        finally:
            for topic in nsqd.topics.values():
                topic.backend.close()


def feed(proto: ProtocolV2, chunks: list[bytes]) -> tuple[list[tuple[int, bytes]], bool]:
    """Every reply frame, and whether the connection was to be closed."""
    client = proto.client
    closed = False
    for chunk in chunks:
        proto.receive_data(chunk)
        action = proto.process()
        if isinstance(action, Close):
            closed = True
            break
        assert action is None
    return [(f.frame_type, f.data) for f in FrameDecoder().frames(client.take_output())], closed


def topic_bodies(nsqd: NSQD) -> dict[str, list[bytes]]:
    out = {}
    for name, topic in nsqd.topics.items():
        out[name] = [m.body for m in topic.take_backlog(10**6)]
    return out


_COMMANDS = st.one_of(
    st.builds(lambda t, b: encode_command(b"PUB", t, body=b), st.sampled_from(["t", "u"]), st.binary(min_size=1, max_size=MAX_MSG_SIZE)),
    st.builds(lambda b: encode_command(b"PUB", "t", body=b), st.binary(min_size=MAX_MSG_SIZE + 1, max_size=MAX_MSG_SIZE + 5)),
    st.builds(lambda bs: encode_command(b"MPUB", "t", body=encode_mpub_body(bs)), st.lists(st.binary(min_size=1, max_size=8), min_size=1, max_size=3)),
    st.sampled_from([b"PUB t\r\n\x00\x00\x00\x01r", b"PUB t extra\n\x00\x00\x00\x01e", b"PUB bad!name\n\x00\x00\x00\x01x",
                     b"PUB t\n\x00\x00\x00\x00", b"PUB t\n\xff\xff\xff\xff", b"PUB\n", b"NOP\n", b"FIN 0123456789abcdef\n",
                     b"DPUB t 10\n\x00\x00\x00\x01d", b"BOGUS\n"]),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(_COMMANDS, min_size=1, max_size=25), st.data(), st.sampled_from([10_000, 0, 3]))
def test_quick_pubs_answer_and_queue_as_the_general_path(commands, data, mem_queue_size):
    stream = b"".join(commands)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=5)))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)])]
    results = []
    for quick in (True, False):
        with publisher(quick, mem_queue_size) as (nsqd, proto):
            frames, closed = feed(proto, chunks)
            results.append((frames, closed, topic_bodies(nsqd), dict(proto.client.pub_counts)))
    assert results[0] == results[1]


def test_a_publishers_pubs_take_the_quick_path_once_the_topic_is_checked():
    with publisher(True) as (nsqd, proto):
        parser = proto.parser
        taken = []
        real = parser.take_body_command

        def counting(*args):
            pub = real(*args)
            taken.append(pub is not None)
            return pub

        parser.take_body_command = counting  # type: ignore[method-assign]
        pubs = [encode_command(b"PUB", "t", body=b"%d" % i) for i in range(3)]
        assert feed(proto, [b"".join(pubs)]) == ([(0, b"OK")] * 3, False)
        assert taken == [False, True, True]  # the first one checks the name
        assert feed(proto, [encode_command(b"PUB", "t", body=b"x" * MAX_MSG_SIZE)]) == ([(0, b"OK")], False)
        assert feed(proto, [encode_command(b"PUB", "t", body=b"x" * (MAX_MSG_SIZE + 1))]) == (
            [(1, b"E_BAD_MESSAGE PUB message too big 65 > 64")], True)
        assert nsqd.topics["t"].message_count == 4


def test_a_quick_pub_into_the_disk_queue_reads_back():
    with publisher(True, mem_queue_size=0) as (nsqd, proto):
        bodies = [b"m%d" % i for i in range(50)]
        frames, _ = feed(proto, [encode_command(b"PUB", "d", body=b) for b in bodies])
        assert frames == [(0, b"OK")] * 50
        topic = nsqd.topics["d"]
        assert topic.backend.depth() == 50
        assert [m.body for m in topic.take_backlog(100)] == bodies
