"""The sans-IO wire codec (pynsqd.protocol): round trips, arbitrary stream
splits, error paths with NSQ's exact codes."""

from __future__ import annotations

import json
import random
import re
import struct

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from pynsqd.protocol import (
    FRAME_TYPE_ERROR,
    FRAME_TYPE_MESSAGE,
    FRAME_TYPE_RESPONSE,
    LOOKUPD_BODY_COMMANDS,
    MAX_LINE_LENGTH,
    MSG_HEADER_LENGTH,
    NSQD_BODY_COMMANDS,
    FIN_RUN,
    Command,
    CommandParser,
    Frame,
    FrameDecoder,
    ProtocolError,
    V1ResponseDecoder,
    append_message_frame,
    decode_message,
    decode_mpub_body,
    encode_command,
    encode_error,
    encode_frame,
    encode_message,
    encode_message_frame,
    encode_mpub_body,
    encode_response,
    encode_v1_response,
    is_ephemeral,
    is_valid_channel_name,
    is_valid_topic_name,
    parse_base10,
    scan_mpub_body,
)

FAST = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SPLIT = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)

BIG = 64 * 1024  # above this a pending block takes the chunk-collecting path

# ---------------------------------------------------------------- strategies

int64s = st.integers(-(2**63), 2**63 - 1)
uint16s = st.integers(0, 2**16 - 1)
msg_ids = st.binary(min_size=16, max_size=16)
small_bodies = st.binary(max_size=300)
# large bodies are built from a seed: drawing 100 KiB byte by byte is slow
large_bodies = st.builds(
    lambda n, seed: random.Random(seed).randbytes(n), st.integers(BIG + 1, BIG + 40_000), st.integers(0, 2**32)
)

NAME_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-"
names = st.text(alphabet=NAME_CHARS, min_size=1, max_size=64)
# one command parameter: anything without the separators (space, newline)
# and not ending in \r (which the parser trims)
tokens = st.binary(max_size=20).map(lambda b: b.replace(b" ", b"_").replace(b"\n", b"_").replace(b"\r", b"_"))
hex_ids = st.binary(min_size=8, max_size=8).map(lambda b: b.hex().encode())


@st.composite
def frames(draw, bodies=small_bodies):
    """-> (encoded bytes, expected Frame, message tuple or None)."""
    kind = draw(st.sampled_from(["response", "error", "message", "message-append"]))
    body = draw(bodies)
    if kind == "response":
        return encode_response(body), Frame(FRAME_TYPE_RESPONSE, body), None
    if kind == "error":
        return encode_frame(FRAME_TYPE_ERROR, body), Frame(FRAME_TYPE_ERROR, body), None
    ts, attempts, mid = draw(int64s), draw(uint16s), draw(msg_ids)
    if kind == "message":
        data = encode_message_frame(ts, attempts, mid, body)
    else:
        out: list[bytes] = []
        size = append_message_frame(out, ts, attempts, mid, body)
        data = b"".join(out)
        assert size == len(data)
    return data, Frame(FRAME_TYPE_MESSAGE, encode_message(ts, attempts, mid, body)), (ts, attempts, mid, body)


@st.composite
def nsqd_commands(draw, bodies=small_bodies):
    """-> (encoded bytes, expected Command) for every nsqd command."""
    verb = draw(
        st.sampled_from(["IDENTIFY", "AUTH", "SUB", "PUB", "MPUB", "DPUB", "RDY", "FIN", "REQ", "TOUCH", "CLS", "NOP"])
    )
    if verb == "IDENTIFY":
        body = json.dumps(
            {"client_id": draw(st.text(max_size=10)), "feature_negotiation": draw(st.booleans()), "heartbeat_interval": draw(st.integers(-1, 60000))}
        ).encode()
        return encode_command(b"IDENTIFY", body=body), Command(b"IDENTIFY", [], body)
    if verb == "AUTH":
        body = draw(bodies)
        return encode_command(b"AUTH", body=body), Command(b"AUTH", [], body)
    if verb == "SUB":
        topic, channel = draw(names), draw(names)
        return encode_command(b"SUB", topic, channel), Command(b"SUB", [topic.encode(), channel.encode()])
    if verb == "PUB":
        topic, body = draw(names), draw(bodies)
        return encode_command(b"PUB", topic, body=body), Command(b"PUB", [topic.encode()], body)
    if verb == "MPUB":
        topic = draw(names)
        body = encode_mpub_body(draw(st.lists(st.binary(min_size=1, max_size=40), min_size=1, max_size=5)))
        if draw(st.booleans()):
            body = encode_mpub_body([draw(bodies) or b"x"])
        return encode_command(b"MPUB", topic.encode(), body=body), Command(b"MPUB", [topic.encode()], body)
    if verb == "DPUB":
        topic, ms, body = draw(names), draw(st.integers(0, 3_600_000)), draw(bodies)
        return encode_command(b"DPUB", topic, str(ms), body=body), Command(b"DPUB", [topic.encode(), str(ms).encode()], body)
    if verb == "RDY":
        n = str(draw(st.integers(0, 2500))).encode()
        return encode_command(b"RDY", n), Command(b"RDY", [n])
    if verb in ("FIN", "TOUCH"):
        mid = draw(hex_ids)
        return encode_command(verb.encode(), mid), Command(verb.encode(), [mid])
    if verb == "REQ":
        mid, ms = draw(hex_ids), str(draw(st.integers(0, 10**6))).encode()
        return encode_command(b"REQ", mid, ms), Command(b"REQ", [mid, ms])
    return encode_command(verb.encode()), Command(verb.encode(), [])


@st.composite
def lookupd_commands(draw):
    verb = draw(st.sampled_from(["IDENTIFY", "REGISTER", "UNREGISTER", "PING"]))
    if verb == "IDENTIFY":
        body = json.dumps(
            {"version": "1.3.0", "tcp_port": draw(st.integers(1, 65535)), "http_port": 4151, "hostname": draw(names), "broadcast_address": draw(names)}
        ).encode()
        return encode_command(b"IDENTIFY", body=body), Command(b"IDENTIFY", [], body)
    if verb == "PING":
        return encode_command(b"PING"), Command(b"PING", [])
    params = [draw(names).encode()]
    if draw(st.booleans()):
        params.append(draw(names).encode())
    return encode_command(verb.encode(), *params), Command(verb.encode(), params)


def _with_big(draw, items_strategy, big_strategy):
    """A list of small items with 0..2 big ones (> 64 KiB) mixed in."""
    items = draw(st.lists(items_strategy, min_size=1, max_size=25))
    for _ in range(draw(st.sampled_from([0, 1, 1, 2]))):
        items.insert(draw(st.integers(0, len(items))), draw(big_strategy))
    return items


def draw_cuts(draw, stream: bytes, parts: list[bytes]) -> list[bytes]:
    """Split ``stream`` (the concatenation of ``parts``) at points hypothesis
    chooses: anywhere, just after an item boundary (inside a size prefix /
    frame header), inside every large item, and a run of 1-byte pieces."""
    n = len(stream)
    boundaries = _boundaries(parts)
    cuts = set(draw(st.lists(st.integers(0, n), max_size=40)))
    for b in draw(st.lists(st.sampled_from(boundaries), max_size=10)):
        cuts.add(min(n, b + draw(st.integers(0, 9))))
    for b, part in zip(boundaries, parts):
        if len(part) > BIG:
            cuts.update(draw(st.lists(st.integers(b, b + len(part)), min_size=1, max_size=3)))
    if draw(st.sampled_from([True, True, False])):
        start = draw(st.integers(0, n))
        cuts.update(range(start, min(n, start + draw(st.integers(1, 64)))))
    points = [0, *sorted(c for c in cuts if 0 < c < n), n]
    pieces = [stream[a:b] for a, b in zip(points, points[1:])]
    # empty pieces are legal input too
    if draw(st.booleans()):
        pieces.insert(draw(st.integers(0, len(pieces))), b"")
    return pieces


def _boundaries(parts: list[bytes]) -> list[int]:
    out, pos = [], 0
    for p in parts:
        out.append(pos)
        pos += len(p)
    return out


# ---------------------------------------------------------------- frames


@FAST
@given(frames())
def test_frame_round_trip(item):
    data, expected, message = item
    (size,) = struct.unpack(">i", data[:4])
    assert size == len(data) - 4
    assert FrameDecoder().frames(data) == [expected]
    if message is not None:
        assert decode_message(expected.data) == message


@FAST
@given(st.lists(frames(), min_size=1, max_size=10))
def test_append_message_frame_appends_to_existing_buffer(items):
    out = [b"prefix"]
    for _, _, message in items:
        if message is not None:
            append_message_frame(out, *message)
    expected = b"prefix" + b"".join(encode_message_frame(*m) for _, _, m in items if m is not None)
    assert b"".join(out) == expected


@FAST
@given(st.text(alphabet="E_ABCDEFGHIJKLMNOPQRSTUVWXYZ", min_size=1, max_size=20), st.text(max_size=50))
def test_error_frame(code, description):
    err = ProtocolError(code, description)
    expected = f"{code} {description}" if description else code
    assert err.frame_data() == expected.encode()
    assert FrameDecoder().frames(encode_error(err)) == [Frame(FRAME_TYPE_ERROR, expected.encode())]


def test_protocol_error_defaults():
    err = ProtocolError("E_FIN_FAILED", "FIN 0123 failed ID not in flight", fatal=False)
    assert (err.code, err.description, err.fatal) == ("E_FIN_FAILED", "FIN 0123 failed ID not in flight", False)
    assert err.frame_data() == b"E_FIN_FAILED FIN 0123 failed ID not in flight"
    assert ProtocolError("E_INVALID").fatal is True
    assert ProtocolError("E_INVALID").frame_data() == b"E_INVALID"


def test_frame_wire_layout():
    assert encode_response(b"OK") == b"\x00\x00\x00\x06\x00\x00\x00\x00OK"
    assert encode_frame(FRAME_TYPE_ERROR, b"E_X") == b"\x00\x00\x00\x07\x00\x00\x00\x01E_X"
    frame = encode_message_frame(1, 2, b"0123456789abcdef", b"hi")
    assert frame == struct.pack(">iiqH", 4 + 26 + 2, 2, 1, 2) + b"0123456789abcdef" + b"hi"


@FAST
@given(st.binary(max_size=300))
def test_v1_response_round_trip(data):
    encoded = encode_v1_response(data)
    assert encoded == struct.pack(">i", len(data)) + data
    dec = V1ResponseDecoder()
    dec.receive_data(encoded)
    assert dec.next_response() == data
    assert dec.next_response() is None


@FAST
@given(int64s, uint16s, msg_ids, st.binary(max_size=500))
def test_message_round_trip(ts, attempts, mid, body):
    data = encode_message(ts, attempts, mid, body)
    assert len(data) == MSG_HEADER_LENGTH + len(body)
    assert decode_message(data) == (ts, attempts, mid, body)


@pytest.mark.parametrize("n", [0, 1, 25])
def test_decode_message_too_short(n):
    with pytest.raises(ValueError):
        decode_message(b"x" * n)


def test_decode_message_minimum_is_26_bytes():
    assert decode_message(bytes(26)) == (0, 0, bytes(16), b"")


def test_frame_decoder_bad_sizes():
    for size in (-1, 0, 3):
        with pytest.raises(ProtocolError) as exc:
            FrameDecoder().frames(struct.pack(">ii", size, 0))
        assert exc.value.code == "E_BAD_FRAME"
    # the size is checked before the body arrives
    with pytest.raises(ProtocolError) as exc:
        FrameDecoder(max_frame_size=100).frames(struct.pack(">ii", 101, 0))
    assert exc.value.code == "E_BAD_FRAME"
    assert FrameDecoder(max_frame_size=100).frames(struct.pack(">ii", 100, 0)) == []
    # size 4: a frame with empty data
    assert FrameDecoder().frames(struct.pack(">ii", 4, 0)) == [Frame(0, b"")]


def test_v1_decoder_bad_sizes():
    dec = V1ResponseDecoder()
    dec.receive_data(struct.pack(">i", -1))
    with pytest.raises(ProtocolError) as exc:
        dec.next_response()
    assert exc.value.code == "E_BAD_FRAME"
    dec = V1ResponseDecoder(max_size=10)
    dec.receive_data(struct.pack(">i", 11))
    with pytest.raises(ProtocolError):
        dec.next_response()


# ---------------------------------------------------------------- split streams


def _frames_whole(stream: bytes) -> list[Frame]:
    return FrameDecoder().frames(stream)


@SPLIT
@given(st.data())
def test_frame_stream_split_anywhere(data):
    items = _with_big(data.draw, frames(), frames(large_bodies))
    parts = [d for d, _, _ in items]
    expected = [f for _, f, _ in items]
    stream = b"".join(parts)
    assert _frames_whole(stream) == expected
    pieces = draw_cuts(data.draw, stream, parts)
    assert b"".join(pieces) == stream

    # drained after every piece, as a connection does
    dec = FrameDecoder()
    got = []
    for piece in pieces:
        got += dec.frames(piece)
    assert got == expected
    assert dec.next_frame() is None

    # all pieces fed first, drained once
    dec = FrameDecoder()
    for piece in pieces:
        dec.receive_data(piece)
    assert dec.frames() == expected


@SPLIT
@given(st.data())
def test_v1_stream_split_anywhere(data):
    items = _with_big(data.draw, st.binary(max_size=200), large_bodies)
    parts = [encode_v1_response(d) for d in items]
    stream = b"".join(parts)
    pieces = draw_cuts(data.draw, stream, parts)
    dec = V1ResponseDecoder()
    got = []
    for piece in pieces:
        dec.receive_data(piece)
        while (r := dec.next_response()) is not None:
            got.append(r)
    assert got == items


@settings(max_examples=40, deadline=None)
@given(st.lists(frames(), min_size=1, max_size=8))
def test_frame_stream_one_byte_at_a_time(items):
    stream = b"".join(d for d, _, _ in items)
    dec = FrameDecoder()
    got = []
    for i in range(len(stream)):
        got += dec.frames(stream[i : i + 1])
    assert got == [f for _, f, _ in items]


def test_large_frame_one_byte_at_a_time_then_more():
    """A > 64 KiB frame fed in 1-byte pieces, then another frame in the same
    piece as the big frame's last byte."""
    big = random.Random(1).randbytes(BIG * 2)
    stream = encode_response(big) + encode_response(b"after")
    dec = FrameDecoder()
    got = []
    split = len(encode_response(big)) - 1
    for i in range(0, 12):
        got += dec.frames(stream[i : i + 1])
    got += dec.frames(stream[12:split])
    got += dec.frames(stream[split:])
    assert got == [Frame(0, big), Frame(0, b"after")]


# ---------------------------------------------------------------- commands


@FAST
@given(nsqd_commands())
def test_nsqd_command_round_trip(item):
    data, expected = item
    assert CommandParser().commands(data) == [expected]


@FAST
@given(lookupd_commands())
def test_lookupd_command_round_trip(item):
    data, expected = item
    assert CommandParser(LOOKUPD_BODY_COMMANDS).commands(data) == [expected]


def test_command_sets():
    assert NSQD_BODY_COMMANDS == {b"IDENTIFY", b"AUTH", b"PUB", b"MPUB", b"DPUB"}
    assert LOOKUPD_BODY_COMMANDS == {b"IDENTIFY"}


@FAST
@given(st.binary(min_size=1, max_size=12).map(lambda b: b.replace(b" ", b"_").replace(b"\n", b"_")), st.lists(tokens, max_size=5))
def test_generic_command_round_trip(name, params):
    assume(name not in NSQD_BODY_COMMANDS)
    assume(not (not params and name.endswith(b"\r")))
    assert CommandParser().commands(encode_command(name, *params)) == [Command(name, params)]


def test_encode_command_layout():
    assert encode_command(b"NOP") == b"NOP\n"
    assert encode_command(b"SUB", "t", b"c") == b"SUB t c\n"
    assert encode_command(b"PUB", "t", body=b"hello") == b"PUB t\n\x00\x00\x00\x05hello"
    assert encode_command(b"IDENTIFY", body=b"") == b"IDENTIFY\n\x00\x00\x00\x00"


@SPLIT
@given(st.data())
def test_nsqd_command_stream_split_anywhere(data):
    big_pub = st.builds(
        lambda t, b: (encode_command(b"PUB", t, body=b), Command(b"PUB", [t.encode()], b)), names, large_bodies
    )
    big_mpub = st.builds(
        lambda t, b: (encode_command(b"MPUB", t, body=encode_mpub_body([b, b"x"])), Command(b"MPUB", [t.encode()], encode_mpub_body([b, b"x"]))),
        names,
        large_bodies,
    )
    items = _with_big(data.draw, nsqd_commands(), st.one_of(big_pub, big_mpub))
    parts = [d for d, _ in items]
    expected = [c for _, c in items]
    stream = b"".join(parts)
    assert CommandParser().commands(stream) == expected
    pieces = draw_cuts(data.draw, stream, parts)

    parser = CommandParser()
    got = []
    for piece in pieces:
        got += parser.commands(piece)
    assert got == expected
    assert parser.next_command() is None

    parser = CommandParser()
    for piece in pieces:
        parser.receive_data(piece)
    assert parser.commands() == expected


@SPLIT
@given(st.data())
def test_lookupd_command_stream_split_anywhere(data):
    items = data.draw(st.lists(lookupd_commands(), min_size=1, max_size=25))
    parts = [d for d, _ in items]
    stream = b"".join(parts)
    pieces = draw_cuts(data.draw, stream, parts)
    parser = CommandParser(LOOKUPD_BODY_COMMANDS)
    got = []
    for piece in pieces:
        got += parser.commands(piece)
    assert got == [c for _, c in items]


@settings(max_examples=40, deadline=None)
@given(st.lists(nsqd_commands(), min_size=1, max_size=8))
def test_command_stream_one_byte_at_a_time(items):
    stream = b"".join(d for d, _ in items)
    parser = CommandParser()
    got = []
    for i in range(len(stream)):
        got += parser.commands(stream[i : i + 1])
    assert got == [c for _, c in items]


def test_trailing_cr_is_trimmed():
    parser = CommandParser()
    assert parser.commands(b"RDY 10\r\nNOP\r\nFIN 0123456789abcdef\r\n") == [
        Command(b"RDY", [b"10"]),
        Command(b"NOP", []),
        Command(b"FIN", [b"0123456789abcdef"]),
    ]
    assert parser.commands(b"PUB topic\r\n\x00\x00\x00\x02hi") == [Command(b"PUB", [b"topic"], b"hi")]
    # only one \r, and only at the end
    assert parser.commands(b"X a\rb\r\r\n") == [Command(b"X", [b"a\rb\r"])]
    # the \r and \n arriving separately
    assert parser.commands(b"NOP\r") == []
    assert parser.commands(b"\n") == [Command(b"NOP", [])]
    # an empty line
    assert parser.commands(b"\r\n") == [Command(b"", [])]


def test_params_split_on_single_spaces():
    assert CommandParser().commands(b"REQ  id  5\n") == [Command(b"REQ", [b"", b"id", b"", b"5"])]


# ---------------------------------------------------------------- line length


def test_command_line_longer_than_max_is_invalid():
    # without its newline yet: detected as soon as the buffer passes the limit
    parser = CommandParser()
    parser.receive_data(b"X" * MAX_LINE_LENGTH)
    assert parser.next_command() is None
    parser.receive_data(b"X")
    with pytest.raises(ProtocolError) as exc:
        parser.next_command()
    assert exc.value.code == "E_INVALID"
    assert exc.value.fatal

    # with its newline, in one piece
    with pytest.raises(ProtocolError) as exc:
        CommandParser().commands(b"PUB " + b"t" * MAX_LINE_LENGTH + b"\n\x00\x00\x00\x01x")
    assert exc.value.code == "E_INVALID"


def test_command_line_at_max_is_accepted():
    line = b"X" * MAX_LINE_LENGTH
    assert CommandParser().commands(line + b"\nNOP\n") == [Command(line, []), Command(b"NOP", [])]


def test_custom_max_line_length():
    parser = CommandParser(max_line_length=10)
    assert parser.commands(b"0123456789\n") == [Command(b"0123456789", [])]
    with pytest.raises(ProtocolError) as exc:
        parser.commands(b"0123456789A\n")
    assert exc.value.code == "E_INVALID"


def test_long_body_is_not_a_long_line():
    body = b"\x01" * (MAX_LINE_LENGTH * 4)
    assert CommandParser().commands(encode_command(b"PUB", b"t", body=body)) == [Command(b"PUB", [b"t"], body)]


# ---------------------------------------------------------------- hooks


def test_on_header_runs_before_the_body_arrives():
    seen = []

    def on_header(name, params):
        seen.append((name, params))
        if params[0] == b"bad!":
            raise ProtocolError("E_BAD_TOPIC", f"{name.decode()} topic name {params[0]!r} is not valid")

    parser = CommandParser(on_header=on_header)
    # only the line: no size, no body
    parser.receive_data(b"PUB good\n")
    assert parser.next_command() is None
    assert seen == [(b"PUB", [b"good"])]
    parser.receive_data(b"\x00\x00\x00\x01x")
    assert parser.next_command() == Command(b"PUB", [b"good"], b"x")

    parser = CommandParser(on_header=on_header)
    with pytest.raises(ProtocolError) as exc:
        parser.commands(b"PUB bad!\n")  # the body never arrives
    assert exc.value.code == "E_BAD_TOPIC"

    # not called for commands without a body
    seen.clear()
    CommandParser(on_header=on_header).commands(b"SUB bad! c\nNOP\n")
    assert seen == []


def test_on_body_size_runs_before_the_body_is_buffered():
    calls = []

    def on_body_size(name, params, size):
        calls.append((name, params, size))
        if size > 1000:
            raise ProtocolError("E_BAD_MESSAGE", f"{name.decode()} message too big {size} > 1000")

    parser = CommandParser(on_body_size=on_body_size)
    parser.receive_data(b"PUB t\n\x00\x00\x00\x05he")
    assert parser.next_command() is None
    assert calls == [(b"PUB", [b"t"], 5)]
    parser.receive_data(b"llo")
    assert parser.next_command() == Command(b"PUB", [b"t"], b"hello")
    assert len(calls) == 1

    # 10 MB announced, none of it sent: the hook still fires
    parser = CommandParser(on_body_size=on_body_size)
    parser.receive_data(b"PUB t\n" + struct.pack(">i", 10_000_000))
    with pytest.raises(ProtocolError) as exc:
        parser.next_command()
    assert exc.value.code == "E_BAD_MESSAGE"
    assert exc.value.frame_data() == b"E_BAD_MESSAGE PUB message too big 10000000 > 1000"

    # the size prefix arriving a byte at a time
    calls.clear()
    parser = CommandParser(on_body_size=on_body_size)
    parser.receive_data(b"MPUB t\n")
    for b in struct.pack(">i", 2000)[:3]:
        parser.receive_data(bytes([b]))
        assert parser.next_command() is None
    assert calls == []
    parser.receive_data(b"\xd0")
    with pytest.raises(ProtocolError):
        parser.next_command()
    assert calls == [(b"MPUB", [b"t"], 2000)]


def test_default_body_size_check_rejects_negative():
    with pytest.raises(ProtocolError) as exc:
        CommandParser().commands(b"PUB t\n" + struct.pack(">i", -1))
    assert exc.value.code == "E_BAD_BODY"


# ---------------------------------------------------------------- MPUB


@FAST
@given(st.lists(st.binary(min_size=1, max_size=100), min_size=1, max_size=30))
def test_mpub_round_trip(bodies):
    encoded = encode_mpub_body(bodies)
    assert encoded[:4] == struct.pack(">i", len(bodies))
    assert decode_mpub_body(encoded, max_msg_size=100, max_body_size=len(encoded) + 100) == bodies


@FAST
@given(st.integers(1, 300), st.integers(1, 60), st.binary(min_size=1, max_size=1))
def test_mpub_of_equal_sizes_takes_the_strided_check(size, count, fill):
    bodies = [fill * size] * count
    encoded = encode_mpub_body(bodies)
    assert scan_mpub_body(encoded, 300, len(encoded))[:2] == (count, size)
    assert scan_mpub_body(encoded, 300, len(encoded))[2] is None  # no offsets kept
    assert decode_mpub_body(encoded, 300, len(encoded)) == bodies


@FAST
@given(st.lists(st.integers(1, 40), min_size=2, max_size=20), st.data())
def test_mpub_nearly_equal_sizes_are_checked_one_by_one(sizes, data):
    # one size prefix differs (in any of its bytes): same length overall is not enough
    sizes = [sizes[0]] * len(sizes)
    i = data.draw(st.integers(1, len(sizes) - 1))
    bodies = [b"x" * s for s in sizes]
    encoded = bytearray(encode_mpub_body(bodies))
    pos = 4 + i * (4 + sizes[0]) + data.draw(st.integers(0, 3))
    encoded[pos] ^= data.draw(st.integers(1, 255))
    encoded = bytes(encoded)
    try:
        got = decode_mpub_body(encoded, 1 << 20, 1 << 20)
    except ProtocolError as err:
        assert err.code in ("E_BAD_MESSAGE", "E_BAD_BODY")
    else:  # still well formed by chance (sizes swapped around): the split must be right
        assert encode_mpub_body(got) == encoded and got != bodies


def test_mpub_large_message_round_trip():
    bodies = [random.Random(3).randbytes(BIG + 10), b"x"]
    assert decode_mpub_body(encode_mpub_body(bodies), 1 << 20, 5 << 20) == bodies


def _mpub_error(body: bytes, max_msg_size: int = 10, max_body_size: int = 1000) -> ProtocolError:
    with pytest.raises(ProtocolError) as exc:
        decode_mpub_body(body, max_msg_size, max_body_size)
    assert exc.value.fatal
    return exc.value


def _i32(*values: int) -> bytes:
    return b"".join(struct.pack(">i", v) for v in values)


@pytest.mark.parametrize(
    "body, code, text",
    [
        (b"", "E_BAD_BODY", "MPUB failed to read message count"),
        (b"\x00\x00\x01", "E_BAD_BODY", "MPUB failed to read message count"),
        (_i32(0), "E_BAD_BODY", "MPUB invalid message count 0"),
        (_i32(-1), "E_BAD_BODY", "MPUB invalid message count -1"),
        (_i32(-(2**31)), "E_BAD_BODY", f"MPUB invalid message count {-(2**31)}"),
        # (1000 - 4) // 5 = 199 messages at most
        (_i32(200), "E_BAD_BODY", "MPUB invalid message count 200"),
        (_i32(1, 0), "E_BAD_MESSAGE", "MPUB invalid message(0) body size 0"),
        (_i32(2, 1) + b"a" + _i32(-5), "E_BAD_MESSAGE", "MPUB invalid message(1) body size -5"),
        (_i32(1, 11) + b"x" * 11, "E_BAD_MESSAGE", "MPUB message too big 11 > 10"),
        (_i32(1), "E_BAD_MESSAGE", "MPUB failed to read message(0) body size"),
        (_i32(2, 1) + b"a" + b"\x00\x00", "E_BAD_MESSAGE", "MPUB failed to read message(1) body size"),
        (_i32(1, 5) + b"abc", "E_BAD_MESSAGE", "MPUB failed to read message body"),
        (_i32(1, 1) + b"a" + b"xyz", "E_BAD_BODY", "MPUB body has 3 bytes beyond its 1 messages"),
    ],
)
def test_mpub_errors(body, code, text):
    err = _mpub_error(body)
    assert err.code == code
    assert err.description == text
    assert err.frame_data() == f"{code} {text}".encode()


def test_mpub_count_limit_boundary():
    # max_body_size 1000 -> (1000 - 4) // 5 == 199 messages of 1 byte
    ok = encode_mpub_body([b"x"] * 199)
    assert len(decode_mpub_body(ok, 10, 1000)) == 199


def test_mpub_validates_every_message_before_returning():
    bodies = [b"ok"] * 5 + [b"x" * 11]
    err = _mpub_error(encode_mpub_body(bodies))
    assert err.description == "MPUB message too big 11 > 10"


@FAST
@given(st.lists(st.binary(min_size=1, max_size=10), min_size=1, max_size=10), st.data())
def test_mpub_truncated_anywhere_is_an_error(bodies, data):
    encoded = encode_mpub_body(bodies)
    cut = data.draw(st.integers(0, len(encoded) - 1))
    err = _mpub_error(encoded[:cut])
    assert err.code in ("E_BAD_BODY", "E_BAD_MESSAGE")


# ---------------------------------------------------------------- names


_NAME_REFERENCE = re.compile(r"[.a-zA-Z0-9_-]+(#ephemeral)?", re.ASCII)


def _reference_valid(name: str) -> bool:
    return 1 <= len(name) <= 64 and _NAME_REFERENCE.fullmatch(name) is not None


@FAST
@given(st.one_of(names, names.map(lambda n: n[:54] + "#ephemeral"), st.text(max_size=70)))
def test_name_validation_matches_nsq(name):
    assert is_valid_topic_name(name) == _reference_valid(name)
    assert is_valid_channel_name(name) == _reference_valid(name)


@FAST
@given(st.text(alphabet=NAME_CHARS + "#ephemral \n\t/:é٣", max_size=70))
def test_name_validation_on_near_misses(name):
    assert is_valid_topic_name(name) == _reference_valid(name)


@pytest.mark.parametrize(
    "name, valid",
    [
        ("a", True),
        ("t" * 64, True),
        ("t" * 65, False),
        ("", False),
        ("a.b_c-D9", True),
        ("...", True),
        ("foo#ephemeral", True),
        ("f" * 54 + "#ephemeral", True),
        ("f" * 55 + "#ephemeral", False),
        ("#ephemeral", False),
        ("foo#ephemeral#ephemeral", False),
        ("foo#eph", False),
        ("foo bar", False),
        ("foo:bar", False),
        ("foo/bar", False),
        ("foo\n", False),  # Python's $ matches before a final newline; Go's does not
        ("foo#ephemeral\n", False),
        ("\nfoo", False),
        ("föo", False),
        ("foo٣", False),
    ],
)
def test_name_validation_examples(name, valid):
    assert is_valid_topic_name(name) is valid
    assert is_valid_channel_name(name) is valid


def test_is_ephemeral():
    assert is_ephemeral("foo#ephemeral")
    assert not is_ephemeral("foo")
    assert not is_ephemeral("#ephemeralfoo")


# ---------------------------------------------------------------- base 10


@FAST
@given(st.integers(0, 2**64))
def test_parse_base10_round_trip(n):
    assert parse_base10(str(n).encode()) == n
    assert parse_base10(b"000" + str(n).encode()) == n


def test_parse_base10_empty_is_zero():
    assert parse_base10(b"") == 0


@pytest.mark.parametrize(
    "data",
    [b"-1", b"+1", b" 1", b"1 ", b"1_000", b"0x10", b"1.5", b"1e3", b"abc", "١٢".encode(), "²".encode(), b"\x00"],
)
def test_parse_base10_rejects_non_digits(data):
    with pytest.raises(ValueError):
        parse_base10(data)


@FAST
@given(st.text(max_size=8))
def test_parse_base10_accepts_only_ascii_digits(text):
    data = text.encode()
    if data and all(0x30 <= c <= 0x39 for c in data):
        assert parse_base10(data) == int(text)
    elif data:
        with pytest.raises(ValueError):
            parse_base10(data)


# ---------------------------------------------------------------- FIN runs


_RUN_LINES = st.one_of(
    st.binary(min_size=16, max_size=16).filter(lambda b: b" " not in b and b"\n" not in b).map(lambda i: b"FIN " + i + b"\n"),
    st.sampled_from([b"FIN 0123456789abcdef\r\n", b"FIN 0123456789abcde\n", b"FIN 0123456789 abcdef\n",
                     b"FIN 0123456789abcdef0\n", b"NOP\n", b"RDY 10\n", b"FIN\n", b"FINX 0123456789abcdef\n",
                     b"REQ 0123456789abcdef 0\n", b"PUB t\n\x00\x00\x00\x03abc"]),
)


def parsed_in_pieces(stream: bytes, cuts: list[int], take) -> tuple[list[Command], CommandParser]:
    """Every command of ``stream`` fed cut at ``cuts``: first what ``take(parser)``
    takes (Commands; [] when it takes nothing), else what next_command gives."""
    parser = CommandParser()
    got: list[Command] = []
    for a, b in zip([0, *cuts], [*cuts, len(stream)]):
        parser.receive_data(stream[a:b])
        while True:
            taken = take(parser)
            if taken:
                got += taken
                continue
            cmd = parser.next_command()
            if cmd is None:
                break
            got.append(cmd)
    return got, parser


@FAST
@given(st.lists(_RUN_LINES, max_size=30), st.data())
def test_fin_runs_are_the_fin_commands_next_command_would_give(lines, data):
    stream = b"".join(lines)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=4)))
    got, _ = parsed_in_pieces(stream, cuts, lambda parser: [Command(b"FIN", [i]) for i in parser.take_run(FIN_RUN)])
    assert got == CommandParser().commands(stream)


# ---------------------------------------------------------------- PUBs taken whole


_KNOWN = frozenset({b"t", b"topic.b"})
_MAX_SIZE = 20
_PUB_LINES = st.one_of(
    # a PUB to a known topic of a size take_body_command accepts, or one it must leave
    st.builds(lambda t, b: encode_command(b"PUB", t, body=b), st.sampled_from(sorted(_KNOWN)), st.binary(min_size=1, max_size=_MAX_SIZE)),
    st.builds(lambda b: encode_command(b"PUB", b"t", body=b), st.binary(min_size=_MAX_SIZE + 1, max_size=_MAX_SIZE + 30)),
    st.sampled_from([b"PUB other\n\x00\x00\x00\x01x", b"PUB t\r\n\x00\x00\x00\x01x", b"PUB t x\n\x00\x00\x00\x01x",
                     b"PUB t\n\x00\x00\x00\x00", b"PUB \n\x00\x00\x00\x01x", b"PUBX t\n", b"NOP\n", b"DPUB t 5\n\x00\x00\x00\x01x",
                     b"MPUB t\n\x00\x00\x00\x09\x00\x00\x00\x01\x00\x00\x00\x01x", b"FIN 0123456789abcdef\n",
                     b"PUB topic.b\n\x00\x00\x00\x02" + b"\n" * 2]),
)


def take_pub(parser: CommandParser) -> list[Command]:
    had_input = parser.has_input()
    pub = parser.take_body_command(b"PUB ", _KNOWN, _MAX_SIZE)
    if pub is None:
        return []
    assert had_input and pub[0] in _KNOWN and 0 < len(pub[1]) <= _MAX_SIZE
    return [Command(b"PUB", [pub[0]], pub[1])]


@FAST
@given(st.lists(_PUB_LINES, max_size=30), st.data())
def test_pubs_taken_whole_are_the_commands_next_command_would_give(lines, data):
    stream = b"".join(lines)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=4)))
    got, parser = parsed_in_pieces(stream, cuts, take_pub)
    assert got == CommandParser().commands(stream)
    assert not parser.has_input()  # every command was whole: nothing left


def test_take_body_command_leaves_what_it_does_not_take():
    parser = CommandParser()
    parser.receive_data(b"PUB t\n\x00\x00\x00\x05abc")  # the body not all here
    assert parser.take_body_command(b"PUB ", _KNOWN, _MAX_SIZE) is None
    parser.receive_data(b"de")
    assert parser.take_body_command(b"PUB ", _KNOWN, _MAX_SIZE) == (b"t", b"abcde")
    assert not parser.has_input()
    parser.receive_data(b"PUB t\n\x00\x00\x00")  # the size not all here
    assert parser.take_body_command(b"PUB ", _KNOWN, _MAX_SIZE) is None and parser.has_input()
    parser.receive_data(b"\x02xy")
    assert parser.next_command() == Command(b"PUB", [b"t"], b"xy")


def test_has_input_is_false_while_a_large_body_is_collected():
    parser = CommandParser()
    parser.receive_data(encode_command(b"PUB", "t", body=b"x" * (BIG + 10))[: BIG // 2])
    assert parser.next_command() is None
    parser.receive_data(b"x" * 100)
    assert not parser.has_input()  # still collecting: nothing to parse yet
