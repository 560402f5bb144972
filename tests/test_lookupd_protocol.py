"""nsqlookupd's TCP protocol V1 state machine, driven directly with bytes."""

from __future__ import annotations

import json
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pynsqd.protocol import V1ResponseDecoder, encode_command
from pynsqlookupd.lookup_protocol_v1 import LookupProtocolV1, ServerInfo
from pynsqlookupd.registration_db import CHANNEL, CLIENT_REGISTRATION, TOPIC, Registration, RegistrationDB

REMOTE = "127.0.0.1:50123"
SERVER = ServerInfo(tcp_port=4160, http_port=4161, version="1.3.0", broadcast_address="lookup-host", hostname="lookup-box")
IDENTITY = {"version": "1.3.0", "tcp_port": 4150, "http_port": 4151, "hostname": "nsqd-box", "broadcast_address": "nsqd-host"}


def identify(fields: object = IDENTITY) -> bytes:
    body = fields if isinstance(fields, bytes) else json.dumps(fields).encode()
    return encode_command(b"IDENTIFY", body=body)


def replies(data: bytes) -> list[bytes]:
    decoder = V1ResponseDecoder()
    decoder.receive_data(data)
    out = []
    while (r := decoder.next_response()) is not None:
        out.append(r)
    return out


@pytest.fixture
def db() -> RegistrationDB:
    return RegistrationDB()


@pytest.fixture
def proto(db: RegistrationDB) -> LookupProtocolV1:
    return LookupProtocolV1(db, SERVER, remote_address=REMOTE)


def send(proto: LookupProtocolV1, data: bytes, now: float = 1000.0) -> list[bytes]:
    return replies(proto.receive_data(data, now))


def assert_fatal(proto: LookupProtocolV1, data: bytes, expected: bytes) -> None:
    out = send(proto, data)
    assert out[-1] == expected
    assert proto.closed
    # nothing more is processed once closed
    assert proto.receive_data(b"PING\n", 1.0) == b""


def state(db: RegistrationDB) -> dict[Registration, set[str]]:
    return {reg: {p.peer.id for p in producers} for reg, producers in db.items()}


# ---------------------------------------------------------------- commands


def test_ping_before_identify_is_ok(proto: LookupProtocolV1) -> None:
    assert send(proto, b"PING\n") == [b"OK"]
    assert not proto.closed


def test_identify_replies_with_server_info(proto: LookupProtocolV1, db: RegistrationDB) -> None:
    [reply] = send(proto, identify(), now=1234.5)
    # Go marshals a map: sorted keys, compact
    assert reply == (
        b'{"broadcast_address":"lookup-host","hostname":"lookup-box","http_port":4161,"tcp_port":4160,"version":"1.3.0"}'
    )
    peer = proto.peer
    assert peer is not None
    assert (peer.id, peer.remote_address, peer.broadcast_address, peer.hostname) == (REMOTE, REMOTE, "nsqd-host", "nsqd-box")
    assert (peer.tcp_port, peer.http_port, peer.version, peer.last_update) == (4150, 4151, "1.3.0", 1234.5)
    assert state(db) == {CLIENT_REGISTRATION: {REMOTE}}


def test_identify_ignores_unknown_keys_and_remote_address(proto: LookupProtocolV1) -> None:
    fields = dict(IDENTITY, remote_address="1.2.3.4:1", extra=[1, 2], HOSTNAME=None)
    send(proto, identify(fields))
    assert proto.peer is not None
    assert proto.peer.remote_address == REMOTE
    assert proto.peer.hostname == "nsqd-box"


def test_identify_keys_are_case_insensitive_like_go(proto: LookupProtocolV1) -> None:
    fields = {"Version": "1.3.0", "TCP_PORT": 4150, "http_port": 4151, "broadcast_address": "h"}
    [reply] = send(proto, identify(fields))
    assert reply.startswith(b"{")
    assert proto.peer is not None and proto.peer.tcp_port == 4150


def test_identify_hostname_is_optional(proto: LookupProtocolV1) -> None:
    fields = {k: v for k, v in IDENTITY.items() if k != "hostname"}
    [reply] = send(proto, identify(fields))
    assert reply.startswith(b"{")


@pytest.mark.parametrize("missing", ["version", "tcp_port", "http_port", "broadcast_address"])
def test_identify_missing_fields(proto: LookupProtocolV1, missing: str) -> None:
    fields = {k: v for k, v in IDENTITY.items() if k != missing}
    assert_fatal(proto, identify(fields), b"E_BAD_BODY IDENTIFY missing fields")


def test_identify_zero_port_is_missing(proto: LookupProtocolV1) -> None:
    assert_fatal(proto, identify(dict(IDENTITY, tcp_port=0)), b"E_BAD_BODY IDENTIFY missing fields")


def test_identify_null_body_is_missing_fields(proto: LookupProtocolV1) -> None:
    assert_fatal(proto, identify(b"null"), b"E_BAD_BODY IDENTIFY missing fields")


@pytest.mark.parametrize(
    "body",
    [b"{not json", b"[]", b'"str"', b"", json.dumps(dict(IDENTITY, tcp_port="4150")).encode(),
     json.dumps(dict(IDENTITY, version=1)).encode(), json.dumps(dict(IDENTITY, http_port=4151.5)).encode(),
     json.dumps(dict(IDENTITY, tcp_port=True)).encode(), b"\xff\xfe"],
)
def test_identify_bad_json(proto: LookupProtocolV1, body: bytes) -> None:
    assert_fatal(proto, identify(body), b"E_BAD_BODY IDENTIFY failed to decode JSON body")


def test_identify_negative_body_size(proto: LookupProtocolV1) -> None:
    assert_fatal(proto, b"IDENTIFY\n" + struct.pack(">i", -5), b"E_BAD_BODY IDENTIFY invalid body size -5")


def test_identify_body_too_big(db: RegistrationDB) -> None:
    proto = LookupProtocolV1(db, SERVER, remote_address=REMOTE, max_identify_body=100)
    assert_fatal(proto, b"IDENTIFY\n" + struct.pack(">i", 101), b"E_BAD_BODY IDENTIFY body too big 101 > 100")


def test_identify_twice_fails_before_reading_body(proto: LookupProtocolV1) -> None:
    send(proto, identify())
    # Go refuses as soon as it sees the command line
    assert_fatal(proto, b"IDENTIFY\n", b"E_INVALID cannot IDENTIFY again")


@pytest.mark.parametrize("command", [b"REGISTER", b"UNREGISTER"])
def test_register_requires_identify(proto: LookupProtocolV1, command: bytes) -> None:
    assert_fatal(proto, command + b" topic\n", b"E_INVALID client must IDENTIFY")


@pytest.mark.parametrize("command", [b"REGISTER", b"UNREGISTER"])
def test_register_params(proto: LookupProtocolV1, command: bytes) -> None:
    send(proto, identify())
    name = command.decode()
    assert_fatal(proto, command + b"\n", f"E_INVALID {name} insufficient number of params".encode())


@pytest.mark.parametrize("command", [b"REGISTER", b"UNREGISTER"])
def test_register_bad_topic(proto: LookupProtocolV1, command: bytes) -> None:
    send(proto, identify())
    assert_fatal(proto, command + b" bad!topic\n", f"E_BAD_TOPIC {command.decode()} topic name 'bad!topic' is not valid".encode())


@pytest.mark.parametrize("command", [b"REGISTER", b"UNREGISTER"])
def test_register_bad_channel(proto: LookupProtocolV1, command: bytes) -> None:
    send(proto, identify())
    long_name = "c" * 65
    assert_fatal(
        proto, command + b" t " + long_name.encode() + b"\n",
        f"E_BAD_CHANNEL {command.decode()} channel name '{long_name}' is not valid".encode(),
    )


def test_invalid_command(proto: LookupProtocolV1) -> None:
    assert_fatal(proto, b"PING\nFOO bar\nPING\n", b"E_INVALID invalid command FOO")


def test_empty_line_is_invalid(proto: LookupProtocolV1) -> None:
    assert_fatal(proto, b"\n", b"E_INVALID invalid command ")


def test_register_and_unregister(proto: LookupProtocolV1, db: RegistrationDB) -> None:
    send(proto, identify())
    assert send(proto, b"REGISTER t c\nREGISTER t d\nREGISTER u\n") == [b"OK", b"OK", b"OK"]
    assert state(db) == {
        CLIENT_REGISTRATION: {REMOTE},
        Registration(CHANNEL, "t", "c"): {REMOTE},
        Registration(TOPIC, "t"): {REMOTE},
        Registration(CHANNEL, "t", "d"): {REMOTE},
        Registration(TOPIC, "u"): {REMOTE},
    }
    assert send(proto, b"UNREGISTER t c\n") == [b"OK"]
    # the key stays, without this producer (Go)
    assert db.channels("t") == ["c", "d"]
    assert db.find_producers(CHANNEL, "t", "c") == []
    # topic-only UNREGISTER takes this producer's channels of the topic with it
    assert send(proto, b"UNREGISTER t\n") == [b"OK"]
    assert state(db) == {
        CLIENT_REGISTRATION: {REMOTE},
        Registration(CHANNEL, "t", "c"): set(),
        Registration(TOPIC, "t"): set(),
        Registration(CHANNEL, "t", "d"): set(),
        Registration(TOPIC, "u"): {REMOTE},
    }
    # unregistering what is not there is fine
    assert send(proto, b"UNREGISTER nothing here\n") == [b"OK"]
    assert not proto.closed


def test_ephemeral_channel_unregister_removes_registration(db: RegistrationDB) -> None:
    a = LookupProtocolV1(db, SERVER, remote_address="127.0.0.1:1")
    b = LookupProtocolV1(db, SERVER, remote_address="127.0.0.1:2")
    db.create_channel("t", "c#ephemeral")
    for p in (a, b):
        send(p, identify() + b"REGISTER t c#ephemeral\n")
    send(a, b"UNREGISTER t c#ephemeral\n")
    assert db.channels("t") == ["c#ephemeral"]
    send(b, b"UNREGISTER t c#ephemeral\n")
    assert db.channels("t") == []


def test_line_whitespace_is_trimmed_like_go(proto: LookupProtocolV1, db: RegistrationDB) -> None:
    send(proto, identify())
    assert send(proto, b"REGISTER t c \r\n  PING\n") == [b"OK", b"OK"]
    assert db.channels("t") == ["c"]


def test_ping_refreshes_last_update(proto: LookupProtocolV1) -> None:
    send(proto, identify(), now=10.0)
    send(proto, b"PING\n", now=25.0)
    assert proto.peer is not None and proto.peer.last_update == 25.0


def test_connection_lost_removes_registrations(proto: LookupProtocolV1, db: RegistrationDB) -> None:
    other = LookupProtocolV1(db, SERVER, remote_address="127.0.0.1:9")
    send(other, identify() + b"REGISTER t\n")
    send(proto, identify() + b"REGISTER t c\nREGISTER u\n")
    removed = proto.connection_lost()
    assert set(removed) == {
        CLIENT_REGISTRATION, Registration(TOPIC, "t"), Registration(CHANNEL, "t", "c"), Registration(TOPIC, "u"),
    }
    # no stale producers; the keys stay (Go)
    assert state(db) == {
        CLIENT_REGISTRATION: {"127.0.0.1:9"},
        Registration(TOPIC, "t"): {"127.0.0.1:9"},
        Registration(CHANNEL, "t", "c"): set(),
        Registration(TOPIC, "u"): set(),
    }
    assert proto.closed


def test_connection_lost_before_identify(proto: LookupProtocolV1, db: RegistrationDB) -> None:
    assert proto.connection_lost() == []
    assert len(db) == 0


def test_commands_after_error_in_same_chunk_are_dropped(proto: LookupProtocolV1, db: RegistrationDB) -> None:
    out = send(proto, identify() + b"REGISTER bad!\nREGISTER t\n")
    assert len(out) == 2 and out[1].startswith(b"E_BAD_TOPIC")
    assert db.topics() == []


# ---------------------------------------------------------------- framing


SCRIPT = (
    b"PING\n"
    + identify()
    + b"REGISTER topic_a\nREGISTER topic_a chan_1\nREGISTER topic_b chan#ephemeral\r\n"
    + b"PING\nUNREGISTER topic_b chan#ephemeral\nUNREGISTER topic_a\nREGISTER topic_c x\n"
)


def run_split(data: bytes, cuts: list[int]) -> tuple[bytes, dict[Registration, set[str]], bool]:
    db = RegistrationDB()
    proto = LookupProtocolV1(db, SERVER, remote_address=REMOTE)
    out = b""
    prev = 0
    for cut in sorted(set(cuts)) + [len(data)]:
        out += proto.receive_data(data[prev:cut], 5.0)
        prev = cut
    return out, state(db), proto.closed


@settings(max_examples=200, deadline=None)
@given(
    tail=st.sampled_from([b"", b"REGISTER bad!name\nPING\n", b"IDENTIFY\n\x00\x00\x00\x02{}", b"NOPE\n"]),
    data=st.data(),
)
def test_random_splits_decode_identically(tail: bytes, data: st.DataObject) -> None:
    stream = SCRIPT + tail
    whole = run_split(stream, [])
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=20))
    assert run_split(stream, cuts) == whole
    assert run_split(stream, list(range(len(stream)))) == whole


def test_script_replies() -> None:
    out, db_state, closed = run_split(SCRIPT, [])
    rs = replies(out)
    assert rs[0] == b"OK" and rs[1].startswith(b"{") and rs[2:] == [b"OK"] * 7
    assert not closed
    assert db_state == {
        CLIENT_REGISTRATION: {REMOTE},
        Registration(TOPIC, "topic_a"): set(),
        Registration(CHANNEL, "topic_a", "chan_1"): set(),
        Registration(TOPIC, "topic_b"): {REMOTE},
        Registration(TOPIC, "topic_c"): {REMOTE},
        Registration(CHANNEL, "topic_c", "x"): {REMOTE},
    }


def test_identify_after_leading_whitespace_reads_its_body_like_go(proto: LookupProtocolV1, db: RegistrationDB) -> None:
    # Go trims the line before it looks at the command, so " IDENTIFY" is an
    # IDENTIFY with a body (found by the fuzzer: it used to crash the connection)
    assert send(proto, b" " + identify())[0].startswith(b"{")
    assert proto.peer is not None
    assert send(proto, b"REGISTER t\n") == [b"OK"]
