"""snappy and deflate: the shared sans-IO codecs (pynsqd.streams) checked
against python-snappy and zlib, hostile input, and the IDENTIFY upgrades on
a real pynsqd with our raw client, our client (on trio and asyncio) and pynsq."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import cramjam
import anyio
import pytest
import snappy
from hypothesis import given, settings
from hypothesis import strategies as st

from pynsqd.client import Message, Reader, Writer
from helpers import Certs, RawClient, identify_and_upgrade, on_both_backends, read_frame_exact, start_nsqd
from pynsqd.protocol import FRAME_TYPE_ERROR, encode_command
from pynsqd.streams import (
    SNAPPY_IDENTIFIER,
    CorruptStream,
    DeflateDecoder,
    DeflateEncoder,
    SnappyDecoder,
    SnappyEncoder,
)

DRIVER = str(Path(__file__).parent / "pynsq_driver.py")

payloads = st.lists(st.binary(max_size=150_000) | st.sampled_from([b"", b"a" * 200_000, bytes(70_000)]), max_size=6)


def decode_all(decoder, data: bytes, cuts: list[int], max_bytes: int = 4096) -> bytes:
    """Feed ``data`` split at ``cuts`` and read it out in ``max_bytes`` steps."""
    out = []
    pos = 0
    for cut in sorted(set(c % (len(data) + 1) for c in cuts)) + [len(data)]:
        decoder.feed(data[pos:cut])
        pos = cut
        while chunk := decoder.read(max_bytes):
            assert len(chunk) <= max_bytes
            out.append(chunk)
    return b"".join(out)


# ---------------------------------------------------------------- codecs


@settings(max_examples=60, deadline=None)
@given(payloads, st.lists(st.integers(0, 1 << 20), max_size=8), st.integers(1, 9))
def test_deflate_round_trip_split_anywhere(messages, cuts, level):
    enc = DeflateEncoder(level)
    wire = b"".join(enc.encode(m) for m in messages)
    assert decode_all(DeflateDecoder(), wire, cuts) == b"".join(messages)
    # raw deflate, sync-flushed: what Go's compress/flate and zlib read
    assert zlib.decompressobj(-15).decompress(wire) == b"".join(messages)


@settings(max_examples=60, deadline=None)
@given(payloads, st.lists(st.integers(0, 1 << 20), max_size=8))
def test_snappy_round_trip_split_anywhere(messages, cuts):
    enc = SnappyEncoder()
    wire = b"".join(enc.encode(m) for m in messages)
    assert wire.count(SNAPPY_IDENTIFIER) <= 1 or b"sNaPpY" in b"".join(messages)
    assert decode_all(SnappyDecoder(), wire, cuts) == b"".join(messages)
    # python-snappy (pynsq's codec) reads our stream
    assert snappy.StreamDecompressor().decompress(wire) == b"".join(messages)


@settings(max_examples=30, deadline=None)
@given(payloads)
def test_snappy_reads_pynsqs_writes(messages):
    # pynsq starts a new framed stream per command: repeated identifiers
    wire = b"".join(snappy.StreamCompressor().compress(m) for m in messages if m)
    assert decode_all(SnappyDecoder(), wire, []) == b"".join(messages)


def test_deflate_reads_zlib_raw_streams():
    z = zlib.compressobj(9, zlib.DEFLATED, -15)
    wire = z.compress(b"hello " * 1000) + z.flush(zlib.Z_SYNC_FLUSH) + z.compress(b"world") + z.flush(zlib.Z_SYNC_FLUSH)
    assert decode_all(DeflateDecoder(), wire, [3, 50]) == b"hello " * 1000 + b"world"


def test_deflate_bomb_is_read_out_in_bounded_steps():
    bomb = zlib.compressobj(9, zlib.DEFLATED, -15)
    wire = bomb.compress(bytes(50 * 1024 * 1024)) + bomb.flush(zlib.Z_SYNC_FLUSH)
    assert len(wire) < 100_000
    dec = DeflateDecoder()
    dec.feed(wire)
    first = dec.read(65536)
    assert len(first) == 65536
    # the rest waits, compressed, until asked for
    assert len(dec._pending) < len(wire)


def test_deflate_end_of_stream_is_eof():
    z = zlib.compressobj(6, zlib.DEFLATED, -15)
    dec = DeflateDecoder()
    dec.feed(z.compress(b"last words") + z.flush() + b"trailing junk")
    assert dec.read() == b"last words"
    assert dec.finished and dec.read() == b""


@pytest.mark.parametrize(
    "wire, error",
    [
        (b"\x00\x08\x00\x00abcdefgh", "does not start with its identifier"),
        (b"\xff\x06\x00\x00sNaPpX", "bad snappy stream identifier"),
        (SNAPPY_IDENTIFIER + b"\x02\x01\x00\x00x", "unskippable snappy chunk type 0x02"),
        (SNAPPY_IDENTIFIER + b"\x00\xff\xff\xff", "too long"),
        (SNAPPY_IDENTIFIER + b"\x01\x02\x00\x00ab", "shorter than its checksum"),
    ],
)
def test_snappy_rejects_bad_framing(wire, error):
    dec = SnappyDecoder()
    dec.feed(wire)
    with pytest.raises(CorruptStream, match=error):
        dec.read()


def test_snappy_checks_the_crc_and_skips_padding():
    good = bytes(cramjam.snappy.compress(b"payload" * 10))
    padding = b"\xfe\x03\x00\x00xyz" + b"\x80\x01\x00\x00q"
    dec = SnappyDecoder()
    dec.feed(good[:10] + padding + good[10:])
    assert dec.read() == b"payload" * 10
    bad = bytearray(good)
    bad[14] ^= 0x55  # a checksum byte
    dec = SnappyDecoder()
    dec.feed(bytes(bad))
    with pytest.raises(CorruptStream, match="checksum"):
        dec.read()


def test_deflate_rejects_garbage():
    dec = DeflateDecoder()
    dec.feed(b"\xff" * 64)
    with pytest.raises(CorruptStream):
        dec.read()


# ---------------------------------------------------------------- nsqd: raw client


def client_stats(d, topic: str) -> list[dict]:
    return [cl for t in d.stats(topic)["topics"] for ch in t["channels"] for cl in ch["clients"]]


@pytest.mark.parametrize("fields", [{"snappy": True}, {"deflate": True}, {"deflate": True, "deflate_level": 1}])
def test_compressed_connection_round_trip(nsqd, unique, fields):
    c = RawClient(nsqd.tcp_port)
    reply = identify_and_upgrade(c, **fields)
    kind = "snappy" if fields.get("snappy") else "deflate"
    assert reply[kind] is True
    if kind == "deflate":
        assert reply["deflate_level"] == fields.get("deflate_level", 6) and reply["max_deflate_level"] == 6
    bodies = [b"x" * 5000, bytes(range(256)) * 40, b"small"]
    assert c.mpub(unique, bodies).data == b"OK"
    assert c.sub(unique, "ch").data == b"OK"
    c.cmd(b"RDY", "10")
    got = []
    for _ in bodies:
        _, _, msg_id, body = c.read_message()
        got.append(body)
        c.cmd(b"FIN", msg_id)
    assert got == bodies
    (st,) = client_stats(nsqd, unique)
    assert st[kind] is True and st["snappy" if kind == "deflate" else "deflate"] is False and st["tls"] is False
    c.close()


def test_snappy_and_deflate_together_is_identify_failed(nsqd, unique):
    c = RawClient(nsqd.tcp_port)
    c.cmd(b"IDENTIFY", body=json.dumps({"feature_negotiation": True, "snappy": True, "deflate": True}).encode())
    frame = c.read_frame()
    assert (frame.frame_type, frame.data) == (FRAME_TYPE_ERROR, b"E_IDENTIFY_FAILED cannot enable both deflate and snappy compression")
    assert c.closed_by_server()


def test_commands_sent_right_behind_identify_go_through_the_new_layer(nsqd, unique):
    """A client that does not wait for the upgrade's OK loses nothing."""
    c = RawClient(nsqd.tcp_port)
    enc = SnappyEncoder()
    c.send(encode_command(b"IDENTIFY", body=b'{"feature_negotiation":true,"snappy":true}') + enc.encode(encode_command(b"PUB", unique, body=b"early")))
    assert json.loads(read_frame_exact(c.sock).data)["snappy"] is True
    from helpers import CompressedSocket

    c.sock = CompressedSocket(c.sock, enc, SnappyDecoder())
    assert read_frame_exact(c.sock).data == b"OK"  # the upgrade
    assert read_frame_exact(c.sock).data == b"OK"  # the PUB
    c.close()
    assert [t["message_count"] for t in nsqd.stats(unique)["topics"]] == [1]


@pytest.mark.parametrize("kind", ["snappy", "deflate"])
def test_corrupt_compressed_stream_closes_only_that_connection(nsqd, unique, kind):
    c = RawClient(nsqd.tcp_port)
    identify_and_upgrade(c, **{kind: True})
    c.sock._sock.sendall(b"\x00\x10\x00\x00" + b"\xaa" * 64 if kind == "snappy" else b"\xff" * 64)
    assert c.closed_by_server()
    with RawClient(nsqd.tcp_port) as p:
        assert p.pub(unique, b"alive").data == b"OK"


def test_switches_and_max_deflate_level(tmp_path, unique):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    d = start_nsqd(str(tmp_path / "a"), "--snappy=false", "--max-deflate-level=3")
    try:
        c = RawClient(d.tcp_port)
        reply = json.loads(c.identify(feature_negotiation=True, snappy=True).data)
        assert reply["snappy"] is False  # offered nothing: the connection stays plain
        assert c.pub(unique, b"plain").data == b"OK"
        c.close()
        c = RawClient(d.tcp_port)
        reply = identify_and_upgrade(c, deflate=True, deflate_level=9)
        assert (reply["deflate"], reply["deflate_level"], reply["max_deflate_level"]) == (True, 3, 3)
        assert c.pub(unique, b"deflated").data == b"OK"
        c.close()
    finally:
        d.stop()
    d = start_nsqd(str(tmp_path / "b"), "--deflate=false")
    try:
        c = RawClient(d.tcp_port)
        reply = json.loads(c.identify(feature_negotiation=True, deflate=True, snappy=True).data)
        assert (reply["deflate"], reply["snappy"]) == (False, True)  # snappy alone: no conflict
        c.close()
    finally:
        d.stop()


def test_tls_then_compression(tmp_path, unique):
    certs = Certs(str(tmp_path))
    d = start_nsqd(str(tmp_path), *certs.nsqd_flags())
    try:
        for kind in ("snappy", "deflate"):
            c = RawClient(d.tcp_port)
            reply = identify_and_upgrade(c, certs.client_context(), tls_v1=True, **{kind: True})
            assert reply["tls_v1"] and reply[kind]
            assert c.pub(unique, kind.encode()).data == b"OK"
            st = d.stats()["producers"]
            assert any(p["tls"] and p[kind] for p in st)
            c.close()
    finally:
        d.stop()


# ---------------------------------------------------------------- real clients


def run_driver(*args: str, timeout: float = 60.0) -> list[dict]:
    proc = subprocess.run([sys.executable, DRIVER, *args], capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


@pytest.mark.parametrize("flag", ["--snappy", "--deflate"])
def test_pynsq_writer_and_reader_compressed(nsqd, unique, flag):
    events = run_driver("write", unique, "60", "--nsqd", nsqd.tcp_address, "--mpub", "6", flag, "--timeout", "30")
    assert events[-1] == {"event": "done", "acked": 10, "errors": 0}
    proc = subprocess.Popen(
        [sys.executable, DRIVER, "read", unique, "ch", "60", "--nsqd", nsqd.tcp_address, flag, "--timeout", "30"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-3000:]
    bodies = sorted(json.loads(x)["body"] for x in out.splitlines() if '"message"' in x)
    assert bodies == sorted(f"msg-{i}" for i in range(60))


@pytest.mark.parametrize("kind", ["snappy", "deflate"])
@on_both_backends
async def test_our_writer_and_reader_compressed(nsqd, unique, kind):
    async with Writer([nsqd.tcp_address], **{kind: True}) as writer:
        await writer.mpub(unique, [f"m{i}".encode() * 100 for i in range(50)])
        await writer.pub(unique, b"last")
    got: list[bytes] = []
    done = anyio.Event()

    async def handler(message: Message) -> None:
        got.append(message.body)
        if len(got) == 51:
            done.set()

    async with Reader(unique, "ch", handler, nsqd_tcp_addresses=[nsqd.tcp_address], max_in_flight=20, **{kind: True}):
        with anyio.fail_after(20):
            await done.wait()
        clients = client_stats(nsqd, unique)
        assert clients and all(cl[kind] for cl in clients)
    assert sorted(got) == sorted([f"m{i}".encode() * 100 for i in range(50)] + [b"last"])
