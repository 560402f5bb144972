"""TLS: the IDENTIFY ``tls_v1`` upgrade, ``--tls-required`` on TCP and HTTP,
client certificate policies, ``--tls-min-version``, the HTTPS listener --
against real pynsqd subprocesses, with our raw client, our client (on trio and asyncio) and
the official pynsq client.  Certificates come from a throwaway trustme CA."""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import anyio
import pytest

from pynsqd.client import Message, Reader, Writer
from helpers import Certs, Daemon, RawClient, identify_and_upgrade, on_both_backends, read_frame_exact, start_nsqd, wait_for
from pynsqd.protocol import FRAME_TYPE_ERROR

DRIVER = str(Path(__file__).parent / "pynsq_driver.py")


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return Certs(str(tmp_path_factory.mktemp("certs")))


def start_tls_nsqd(tmp_path_factory: pytest.TempPathFactory, certs: Certs, *extra: str) -> Daemon:
    d = start_nsqd(str(tmp_path_factory.mktemp("nsqd")), *certs.nsqd_flags(), *extra)
    d.wait_listening(("TCP", "HTTP", "HTTPS"))
    return d


@pytest.fixture(scope="module")
def tls_nsqd(tmp_path_factory, certs):
    d = start_tls_nsqd(tmp_path_factory, certs)
    yield d
    d.stop()


def https(d: Daemon, certs: Certs, method: str, path: str, body: bytes | None = None, context: ssl.SSLContext | None = None) -> tuple[int, bytes, dict]:
    req = urllib.request.Request(f"https://127.0.0.1:{d.port('HTTPS')}{path}", data=body, method=method)
    try:
        with urllib.request.urlopen(req, timeout=10, context=context or certs.client_context()) as resp:
            return resp.status, resp.read(), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers)


def plain_http(d: Daemon, path: str) -> tuple[int, bytes, dict]:
    req = urllib.request.Request(f"http://127.0.0.1:{d.http_port}{path}")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read(), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers)


def client_stats(d: Daemon, topic: str) -> list[dict]:
    return [cl for t in d.stats(topic)["topics"] for ch in t["channels"] for cl in ch["clients"]]


def expect_closed_with(c: RawClient, data: bytes) -> None:
    frame = c.read_frame()
    assert (frame.frame_type, frame.data) == (FRAME_TYPE_ERROR, data)
    assert c.closed_by_server()


def handshake_refused(d: Daemon, context: ssl.SSLContext) -> bool:
    """True if nsqd ends the connection during or right after the TLS handshake."""
    c = RawClient(d.tcp_port)
    try:
        c.cmd(b"IDENTIFY", body=json.dumps({"feature_negotiation": True, "tls_v1": True}).encode())
        assert json.loads(read_frame_exact(c.sock).data)["tls_v1"] is True
        # TLS 1.3 reports a refused client certificate after the handshake:
        # the refusal shows on the first read either way
        c.sock = context.wrap_socket(c.sock, server_hostname="127.0.0.1")
        read_frame_exact(c.sock)
    except (ssl.SSLError, ConnectionError, OSError):
        return True
    finally:
        c.close()
    return False


# ---------------------------------------------------------------- upgrade


def test_identify_tls_upgrade_then_ok_over_tls(tls_nsqd, certs, unique):
    c = RawClient(tls_nsqd.tcp_port)
    reply = identify_and_upgrade(c, certs.client_context(), tls_v1=True, client_id="tls-raw")
    assert reply["tls_v1"] is True and reply["snappy"] is False and reply["deflate"] is False
    assert isinstance(c.sock, ssl.SSLSocket)
    assert c.pub(unique, b"secret message").data == b"OK"
    assert c.sub(unique, "ch").data == b"OK"
    c.cmd(b"RDY", "1")
    _, attempts, msg_id, body = c.read_message()
    assert (attempts, body) == (1, b"secret message")
    c.cmd(b"FIN", msg_id)
    (st,) = client_stats(tls_nsqd, unique)
    assert st["tls"] is True and st["client_id"] == "tls-raw"
    assert st["tls_version"] in ("TLS1.2", "TLS1.3")
    assert st["tls_cipher_suite"].startswith("TLS_")
    assert st["tls_negotiated_protocol"] == ""
    c.close()


def test_tls_v1_false_or_not_asked_stays_plain(tls_nsqd, unique):
    c = RawClient(tls_nsqd.tcp_port)
    reply = c.identify(feature_negotiation=True)
    assert json.loads(reply.data)["tls_v1"] is False
    assert c.sub(unique, "plain").data == b"OK"
    (st,) = client_stats(tls_nsqd, unique)
    assert st["tls"] is False and st["tls_version"] == "" and st["tls_cipher_suite"] == ""
    c.close()


def test_no_tls_offered_without_a_certificate(nsqd, unique):
    c = RawClient(nsqd.tcp_port)
    reply = json.loads(c.identify(feature_negotiation=True, tls_v1=True).data)
    assert reply["tls_v1"] is False
    assert c.pub(unique, b"plain").data == b"OK"  # still talking in clear
    c.close()


def test_failed_handshake_closes_only_that_connection(tls_nsqd, certs, unique):
    c = RawClient(tls_nsqd.tcp_port)
    c.cmd(b"IDENTIFY", body=json.dumps({"feature_negotiation": True, "tls_v1": True}).encode())
    assert json.loads(read_frame_exact(c.sock).data)["tls_v1"] is True
    c.send(b"this is no ClientHello\n" * 4)
    assert c.closed_by_server()
    wait_for(lambda: any("connection upgrade failed" in line for line in tls_nsqd.lines), message="upgrade failure logged")
    # an untrusting client gives up on the server's certificate: also contained
    assert handshake_refused(tls_nsqd, ssl.create_default_context())
    c = RawClient(tls_nsqd.tcp_port)
    identify_and_upgrade(c, certs.client_context(), tls_v1=True)
    assert c.pub(unique, b"still fine").data == b"OK"
    c.close()


def test_client_hello_sent_with_identify_is_not_lost(tls_nsqd, certs, unique):
    """Bytes that arrive in the same read as IDENTIFY belong to the TLS layer."""
    ctx = certs.client_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    hello = outgoing.read()
    sock = socket.create_connection(("127.0.0.1", tls_nsqd.tcp_port), timeout=10)
    from pynsqd.protocol import encode_command

    sock.sendall(b"  V2" + encode_command(b"IDENTIFY", body=b'{"feature_negotiation":true,"tls_v1":true}') + hello)
    assert json.loads(read_frame_exact(sock).data)["tls_v1"] is True

    def pump() -> None:
        data = outgoing.read()
        if data:
            sock.sendall(data)

    while True:
        try:
            tls.do_handshake()
            break
        except ssl.SSLWantReadError:
            pump()
            incoming.write(sock.recv(65536))
    pump()
    buf = b""
    while len(buf) < 10:
        try:
            buf += tls.read(65536)
        except ssl.SSLWantReadError:
            incoming.write(sock.recv(65536))
    assert buf == b"\x00\x00\x00\x06\x00\x00\x00\x00OK"
    sock.close()


# ---------------------------------------------------------------- --tls-required


@pytest.fixture(scope="module")
def required_nsqd(tmp_path_factory, certs):
    d = start_tls_nsqd(tmp_path_factory, certs, "--tls-required=true")
    yield d
    d.stop()


@pytest.mark.parametrize("command", [b"PUB", b"SUB", b"AUTH", b"NOP"])
def test_tls_required_refuses_plain_commands(required_nsqd, unique, command):
    c = RawClient(required_nsqd.tcp_port)
    from pynsqd.protocol import encode_command

    if command == b"PUB":
        c.send(encode_command(b"PUB", unique, body=b"x"))
    elif command == b"SUB":
        c.identify(feature_negotiation=True)  # IDENTIFY is always allowed
        c.send(encode_command(b"SUB", unique, "ch"))
    elif command == b"AUTH":
        c.send(encode_command(b"AUTH", body=b"s"))
    else:
        c.send(encode_command(b"NOP"))
    expect_closed_with(c, b"E_INVALID cannot " + command + b" in current state (TLS required)")


def test_tls_required_serves_tls_clients(required_nsqd, certs, unique):
    c = RawClient(required_nsqd.tcp_port)
    identify_and_upgrade(c, certs.client_context(), tls_v1=True)
    assert c.pub(unique, b"over tls").data == b"OK"
    c.close()


def test_tls_required_plain_http_answers_403_with_the_https_port(required_nsqd, certs, unique):
    for path in ("/ping", f"/pub?topic={unique}", "/no/such/path"):
        status, body, headers = plain_http(required_nsqd, path)
        assert status == 403
        assert body == b'{"message": "TLS_REQUIRED", "https_port": %d}' % required_nsqd.port("HTTPS")
        assert headers["X-NSQ-Content-Type"] == "nsq; version=1.0"
    # the same API over HTTPS
    assert https(required_nsqd, certs, "GET", "/ping")[:2] == (200, b"OK")
    assert https(required_nsqd, certs, "POST", f"/pub?topic={unique}", b"via https")[:2] == (200, b"OK")
    status, body, _ = https(required_nsqd, certs, "GET", f"/stats?format=json&topic={unique}")
    assert status == 200 and json.loads(body)["topics"][0]["message_count"] == 1
    status, body, _ = https(required_nsqd, certs, "GET", "/config/tls_required")
    assert (status, json.loads(body)) == (200, 2)


def test_tls_required_tcp_https_leaves_plain_http_open(tmp_path_factory, certs, unique):
    d = start_tls_nsqd(tmp_path_factory, certs, "--tls-required=tcp-https")
    try:
        assert plain_http(d, "/ping")[:2] == (200, b"OK")
        assert plain_http(d, "/config/tls_required")[:2] == (200, b"1")
        c = RawClient(d.tcp_port)
        from pynsqd.protocol import encode_command

        c.send(encode_command(b"PUB", unique, body=b"x"))
        expect_closed_with(c, b"E_INVALID cannot PUB in current state (TLS required)")
    finally:
        d.stop()


def test_https_listener_serves_the_api_and_logs_like_the_others(tls_nsqd, certs, unique):
    assert any(line.endswith(f"HTTPS: listening on {tls_nsqd.addresses['HTTPS']}") for line in tls_nsqd.lines)
    assert https(tls_nsqd, certs, "POST", f"/topic/create?topic={unique}")[0] == 200
    status, body, headers = https(tls_nsqd, certs, "GET", "/info")
    assert status == 200 and "tcp_port" in json.loads(body)
    # no TLS required: plain HTTP works as well
    assert plain_http(tls_nsqd, "/ping")[:2] == (200, b"OK")
    # a plain-text request to the HTTPS port does not disturb it
    s = socket.create_connection(("127.0.0.1", tls_nsqd.port("HTTPS")), timeout=10)
    s.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
    s.recv(1024)
    s.close()
    assert https(tls_nsqd, certs, "GET", "/ping")[:2] == (200, b"OK")


# ---------------------------------------------------------------- client certificates


def test_require_verify_client_certificates(tmp_path_factory, certs, unique):
    import trustme

    d = start_tls_nsqd(tmp_path_factory, certs, "--tls-client-auth-policy=require-verify", f"--tls-root-ca-file={certs.ca_file}")
    try:
        # a client certificate policy implies --tls-required (nsqd)
        assert plain_http(d, "/config/tls_required")[0] == 403
        assert https(d, certs, "GET", "/config/tls_required", context=certs.client_context(certs.client_cert("admin")))[:2] == (200, b"2")
        c = RawClient(d.tcp_port)
        from pynsqd.protocol import encode_command

        c.send(encode_command(b"PUB", unique, body=b"x"))
        expect_closed_with(c, b"E_INVALID cannot PUB in current state (TLS required)")

        assert handshake_refused(d, certs.client_context())  # no certificate
        stranger = certs.client_cert("stranger", ca=trustme.CA())
        assert handshake_refused(d, certs.client_context(stranger))  # unknown CA
        good = certs.client_context(certs.client_cert("alice"))
        assert not handshake_refused(d, good)
        c = RawClient(d.tcp_port)
        identify_and_upgrade(c, good, tls_v1=True)
        assert c.pub(unique, b"from alice").data == b"OK"
        c.close()
        # HTTPS asks for the certificate too
        with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
            https(d, certs, "GET", "/ping")
        assert https(d, certs, "GET", "/ping", context=good)[:2] == (200, b"OK")
    finally:
        d.stop()


def test_require_policy_wants_a_certificate(tmp_path_factory, certs, unique):
    d = start_tls_nsqd(tmp_path_factory, certs, "--tls-client-auth-policy=require", f"--tls-root-ca-file={certs.ca_file}")
    try:
        assert handshake_refused(d, certs.client_context())
        good = certs.client_context(certs.client_cert("bob"))
        c = RawClient(d.tcp_port)
        identify_and_upgrade(c, good, tls_v1=True)
        assert c.pub(unique, b"from bob").data == b"OK"
        c.close()
    finally:
        d.stop()


# ---------------------------------------------------------------- versions, config


def test_tls_min_version_refuses_older_clients(tmp_path_factory, certs, unique):
    d = start_tls_nsqd(tmp_path_factory, certs, "--tls-min-version=tls1.3")
    try:
        assert plain_http(d, "/config/tls_min_version")[:2] == (200, b"772")
        assert handshake_refused(d, certs.client_context(maximum=ssl.TLSVersion.TLSv1_2))
        c = RawClient(d.tcp_port)
        identify_and_upgrade(c, certs.client_context(), tls_v1=True)
        assert c.pub(unique, b"tls13").data == b"OK"
        (st,) = [p for p in d.stats()["producers"]]
        assert st["tls_version"] == "TLS1.3"
        c.close()
    finally:
        d.stop()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_default_tls_min_version_is_tls12(tls_nsqd, certs):
    # nsqd 1.3.0 defaults to TLS 1.0 (769); pynsqd deliberately to TLS 1.2
    assert plain_http(tls_nsqd, "/config/tls_min_version")[:2] == (200, b"771")
    assert handshake_refused(tls_nsqd, _tls11_context(certs))


def _tls11_context(certs: Certs) -> ssl.SSLContext:
    ctx = certs.client_context(maximum=ssl.TLSVersion.TLSv1_1)
    ctx.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    return ctx


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--tls-cert=/nonexistent/cert.pem", "--tls-key=/nonexistent/key.pem"], "failed to build TLS config"),
        (["--tls-required"], "cannot require TLS client connections without TLS key and cert"),
        (["--tls-client-auth-policy=require"], "cannot require TLS client connections without TLS key and cert"),
    ],
)
def test_bad_tls_configuration_is_fatal(tmp_path, flags, message):
    proc = subprocess.run(
        [sys.executable, "-m", "pynsqd", "--tcp-address=127.0.0.1:0", "--http-address=127.0.0.1:0", "--https-address=127.0.0.1:0",
         f"--data-path={tmp_path}", *flags],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode in (1, 2)
    assert message in proc.stderr


# ---------------------------------------------------------------- real clients


def run_driver(*args: str, timeout: float = 60.0) -> list[dict]:
    proc = subprocess.run([sys.executable, DRIVER, *args], capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def test_pynsq_writer_and_reader_over_tls(required_nsqd, certs, unique):
    tls = ["--tls", "--tls-ca", certs.ca_file]
    events = run_driver("write", unique, "40", "--nsqd", required_nsqd.tcp_address, "--mpub", "5", *tls, "--timeout", "30")
    assert events[-1] == {"event": "done", "acked": 8, "errors": 0}
    events = run_driver("read", unique, "ch", "40", "--nsqd", required_nsqd.tcp_address, *tls, "--timeout", "30")
    bodies = sorted(e["body"] for e in events if e["event"] == "message")
    assert bodies == sorted(f"msg-{i}" for i in range(40))


@on_both_backends
async def test_our_writer_and_reader_over_tls_with_a_client_certificate(tmp_path_factory, certs, unique):
    d = start_tls_nsqd(tmp_path_factory, certs, "--tls-client-auth-policy=require-verify", f"--tls-root-ca-file={certs.ca_file}")
    try:
        ctx = certs.client_context(certs.client_cert("carol"))
        async with Writer([d.tcp_address], tls_v1=True, tls_context=ctx) as writer:
            await writer.mpub(unique, [f"m{i}".encode() for i in range(30)])
        got: list[bytes] = []
        all_in = anyio.Event()

        async def handler(message: Message) -> None:
            got.append(message.body)
            if len(got) == 30:
                all_in.set()

        async with Reader(unique, "ch", handler, nsqd_tcp_addresses=[d.tcp_address], tls_v1=True, tls_context=ctx, max_in_flight=10):
            with anyio.fail_after(20):
                await all_in.wait()
        assert sorted(got) == sorted(f"m{i}".encode() for i in range(30))
        # without a certificate our client is refused
        from pynsqd.client.conn import Connection, ConnectionClosed, ConnectionOptions

        conn = Connection(d.tcp_address, ConnectionOptions(tls_v1=True, tls_context=certs.client_context()))
        with pytest.raises((anyio.BrokenResourceError, ConnectionClosed, OSError)):
            await conn.connect()
    finally:
        d.stop()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_tls_min_version_tls10_lets_old_clients_in(tmp_path_factory, certs, unique):
    d = start_tls_nsqd(tmp_path_factory, certs, "--tls-min-version=tls1.0")
    try:
        assert plain_http(d, "/config/tls_min_version")[:2] == (200, b"769")  # nsqd's default value
        c = RawClient(d.tcp_port)
        identify_and_upgrade(c, _tls11_context(certs), tls_v1=True)
        assert c.pub(unique, b"old client").data == b"OK"
        (st,) = d.stats()["producers"]
        assert st["tls_version"] == "TLS1.1"
        c.close()
    finally:
        d.stop()
