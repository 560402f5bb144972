"""AUTH: pynsqd asking a real (loopback, stdlib) auth server, and checking
PUB/SUB against its answers -- two identities allowed and denied, the
errors nsqd sends, the query it makes, the ttl re-check, and real clients."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import anyio
import pytest

from pynsqd.client import Message, Reader, Writer
from helpers import Certs, RawClient, identify_and_upgrade, on_both_backends, start_nsqd, wait_for
from pynsqd.auth import AuthError, parse_auth_response
from pynsqd.protocol import FRAME_TYPE_ERROR, FRAME_TYPE_RESPONSE, encode_command

DRIVER = str(Path(__file__).parent / "pynsq_driver.py")

ALICE = {  # publishes and subscribes anywhere under orders.*
    "ttl": 3600,
    "identity": "alice",
    "identity_url": "https://example.test/alice",
    "authorizations": [{"topic": "^orders", "channels": [".*"], "permissions": ["publish", "subscribe"]}],
}
BOB = {  # may only read orders.* through the audit channel
    "ttl": 3600,
    "identity": "bob",
    "identity_url": "",
    "authorizations": [{"topic": "^orders", "channels": ["^audit$"], "permissions": ["subscribe"]}],
}


class AuthServer:
    """A small auth server: ``answers[secret]`` is (status, JSON body);
    ``requests`` records (method, path, params) of every query."""

    def __init__(self) -> None:
        self.answers: dict[str, tuple[int, Any]] = {}
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self, params: dict[str, list[str]]) -> None:
                flat = {k: v[0] for k, v in params.items()}
                server.requests.append((self.command, urlsplit(self.path).path, flat))
                status, body = server.answers.get(flat.get("secret", ""), (403, {"message":"NOT_AUTHORIZED"}))
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802
                self._answer(parse_qs(urlsplit(self.path).query, keep_blank_values=True))

            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("Content-Length") or 0)
                self._answer(parse_qs(self.rfile.read(length).decode(), keep_blank_values=True))

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.address = f"127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def queries_for(self, secret: str) -> list[dict[str, str]]:
        return [p for _, _, p in list(self.requests) if p.get("secret") == secret]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def authd():
    server = AuthServer()
    server.answers.update({"alice-secret": (200, ALICE), "bob-secret": (200, BOB)})
    yield server
    server.close()


@pytest.fixture(scope="module")
def auth_nsqd(tmp_path_factory, authd):
    d = start_nsqd(str(tmp_path_factory.mktemp("nsqd")), f"--auth-http-address={authd.address}")
    yield d
    d.stop()


def authed(d, secret: str, **identify: Any) -> tuple[RawClient, dict]:
    c = RawClient(d.tcp_port)
    reply = json.loads(c.identify(feature_negotiation=True, **identify).data)
    assert reply["auth_required"] is True
    c.cmd(b"AUTH", body=secret.encode())
    frame = c.read_response()
    assert frame.frame_type == FRAME_TYPE_RESPONSE, frame
    return c, json.loads(frame.data)


def expect_fatal(c: RawClient, data: bytes) -> None:
    frame = c.read_response()
    assert (frame.frame_type, frame.data) == (FRAME_TYPE_ERROR, data)
    assert c.closed_by_server()


# ---------------------------------------------------------------- two identities


def test_auth_reply_identity_and_stats(auth_nsqd):
    c, reply = authed(auth_nsqd, "alice-secret")
    assert reply == {"identity": "alice", "identity_url": "https://example.test/alice", "permission_count": 1}
    assert c.pub("orders.stats", b"x").data == b"OK"
    (producer,) = [p for p in auth_nsqd.stats("orders.stats")["producers"]]
    assert producer["authed"] is True and producer["auth_identity"] == "alice"
    assert producer["auth_identity_url"] == "https://example.test/alice"
    c.close()


def test_publish_allowed_for_alice_denied_for_bob(auth_nsqd, unique):
    topic = f"orders.{unique}"
    c, _ = authed(auth_nsqd, "alice-secret")
    assert c.pub(topic, b"one").data == b"OK"
    assert c.mpub(topic, [b"two", b"three"]).data == b"OK"
    c.cmd(b"DPUB", topic, "0", body=b"four")
    assert c.read_response().data == b"OK"
    c.cmd(b"PUB", f"invoices.{unique}", body=b"nope")
    expect_fatal(c, f'E_UNAUTHORIZED AUTH failed for PUB on "invoices.{unique}" ""'.encode())

    b, reply = authed(auth_nsqd, "bob-secret")
    assert reply["identity"] == "bob"
    b.cmd(b"PUB", topic, body=b"bob writes")
    expect_fatal(b, f'E_UNAUTHORIZED AUTH failed for PUB on "{topic}" ""'.encode())
    b, _ = authed(auth_nsqd, "bob-secret")
    b.cmd(b"MPUB", topic, body=b"\x00\x00\x00\x01\x00\x00\x00\x01x")
    expect_fatal(b, f'E_UNAUTHORIZED AUTH failed for MPUB on "{topic}" ""'.encode())
    [t] = [t for t in auth_nsqd.stats(topic)["topics"]]
    assert t["message_count"] == 4


def test_subscribe_allowed_and_denied_per_channel(auth_nsqd, unique):
    topic = f"orders.{unique}"
    p, _ = authed(auth_nsqd, "alice-secret")
    assert p.pub(topic, b"for everyone").data == b"OK"

    b, _ = authed(auth_nsqd, "bob-secret")
    assert b.sub(topic, "audit").data == b"OK"
    b.cmd(b"RDY", "1")
    assert b.read_message()[3] == b"for everyone"
    b.close()

    b, _ = authed(auth_nsqd, "bob-secret")
    b.cmd(b"SUB", topic, "billing")
    expect_fatal(b, f'E_UNAUTHORIZED AUTH failed for SUB on "{topic}" "billing"'.encode())

    a, _ = authed(auth_nsqd, "alice-secret")
    assert a.sub(topic, "billing").data == b"OK"
    a.close()
    b, _ = authed(auth_nsqd, "bob-secret")
    b.cmd(b"SUB", "payments", "audit")  # right channel, wrong topic
    expect_fatal(b, b'E_UNAUTHORIZED AUTH failed for SUB on "payments" "audit"')


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("command, name", [(encode_command(b"PUB", "orders.x", body=b"x"), b"PUB"), (encode_command(b"SUB", "orders.x", "ch"), b"SUB")])
def test_pub_and_sub_before_auth(auth_nsqd, command, name):
    c = RawClient(auth_nsqd.tcp_port)
    c.identify(feature_negotiation=True)
    c.send(command)
    expect_fatal(c, b"E_AUTH_FIRST AUTH required before " + name)


def test_unknown_secret_is_auth_failed_and_logged(auth_nsqd):
    c = RawClient(auth_nsqd.tcp_port)
    c.cmd(b"AUTH", body=b"who-am-i")
    expect_fatal(c, b"E_AUTH_FAILED AUTH failed")
    wait_for(lambda: any("AUTH failed" in line and "403" in line for line in auth_nsqd.lines), message="reason logged")


def test_auth_twice_and_auth_after_sub(auth_nsqd):
    c, _ = authed(auth_nsqd, "alice-secret")
    c.cmd(b"AUTH", body=b"alice-secret")
    expect_fatal(c, b"E_INVALID AUTH already set")
    c, _ = authed(auth_nsqd, "alice-secret")
    assert c.sub("orders.twice", "ch").data == b"OK"
    c.cmd(b"AUTH", body=b"alice-secret")
    expect_fatal(c, b"E_INVALID cannot AUTH in current state")


@pytest.mark.parametrize(
    "answer",
    [
        (200, {"ttl": 0, "identity": "x", "authorizations": ALICE["authorizations"]}),
        (200, {"ttl": 60, "authorizations": [{"topic": ".*", "channels": [".*"], "permissions": ["admin"]}]}),
        (200, {"ttl": 60, "authorizations": [{"topic": "(", "channels": [".*"], "permissions": ["publish"]}]}),
        (200, {"ttl": "60", "authorizations": ALICE["authorizations"]}),
        (200, b"{not json"),
        (500, {"message":"oops"}),
    ],
)
def test_bad_auth_server_answers_fail_closed(auth_nsqd, authd, unique, answer):
    authd.answers[unique] = answer
    c = RawClient(auth_nsqd.tcp_port)
    c.cmd(b"AUTH", body=unique.encode())
    expect_fatal(c, b"E_AUTH_FAILED AUTH failed")


def test_no_authorizations_is_unauthorized(auth_nsqd, authd, unique):
    authd.answers[unique] = (200, {"ttl": 60, "identity": "nobody", "authorizations": []})
    c = RawClient(auth_nsqd.tcp_port)
    c.cmd(b"AUTH", body=unique.encode())
    expect_fatal(c, b"E_UNAUTHORIZED AUTH no authorizations found")


def test_empty_auth_body(auth_nsqd):
    c = RawClient(auth_nsqd.tcp_port)
    c.send(b"AUTH\n\x00\x00\x00\x00")
    expect_fatal(c, b"E_BAD_BODY AUTH invalid body size 0")


# ---------------------------------------------------------------- the query


def test_query_parameters(auth_nsqd, authd, unique):
    authd.answers[unique] = (200, ALICE)
    c, _ = authed(auth_nsqd, unique)
    c.close()
    (query,) = authd.queries_for(unique)
    assert query == {"remote_ip": "127.0.0.1", "tls": "false", "secret": unique, "common_name": ""}
    method, path, _ = [r for r in authd.requests if r[2].get("secret") == unique][0]
    assert (method, path) == ("GET", "/auth")


def test_tls_client_certificate_common_name_is_sent(tmp_path, authd, unique):
    certs = Certs(str(tmp_path))
    authd.answers[unique] = (200, ALICE)
    d = start_nsqd(
        str(tmp_path), *certs.nsqd_flags(), f"--auth-http-address={authd.address}",
        "--tls-client-auth-policy=require-verify", f"--tls-root-ca-file={certs.ca_file}",
    )
    try:
        c = RawClient(d.tcp_port)
        reply = identify_and_upgrade(c, certs.client_context(certs.client_cert("dave")), tls_v1=True)
        assert reply["auth_required"] is True
        c.cmd(b"AUTH", body=unique.encode())
        assert json.loads(c.read_response().data)["identity"] == "alice"
        assert c.pub(f"orders.{unique}", b"tls+auth").data == b"OK"
        c.close()
        (query,) = authd.queries_for(unique)
        assert query["tls"] == "true" and query["common_name"] == "dave"
    finally:
        d.stop()


def test_addresses_tried_in_turn_full_url_and_post(tmp_path, authd, unique):
    import socket

    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
    dead_address = f"127.0.0.1:{dead.getsockname()[1]}"
    authd.answers[unique] = (200, BOB)
    d = start_nsqd(
        str(tmp_path), f"--auth-http-address={dead_address}", f"--auth-http-address=http://{authd.address}/custom/auth",
        "--auth-http-request-method=post",
    )
    try:
        for _ in range(4):  # nsqd starts from a random address: the dead one sometimes comes first
            c, reply = authed(d, unique)
            assert reply["identity"] == "bob"
            c.close()
        posted = [r for r in authd.requests if r[2].get("secret") == unique]
        assert len(posted) == 4 and all(r[:2] == ("POST", "/custom/auth") for r in posted)
        assert posted[0][2] == {"remote_ip": "127.0.0.1", "tls": "false", "secret": unique, "common_name": ""}
    finally:
        d.stop()
        dead.close()


async def test_query_tries_each_address_in_turn(authd, unique):
    import random
    import socket

    from pynsqd.auth import Auth
    from pynsqd.log import get_logger
    from pynsqd.options import Options

    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    authd.answers[unique] = (200, ALICE)
    addresses = [f"127.0.0.1:{dead.getsockname()[1]}", authd.address]
    try:
        for first in (0, 1):
            rng = random.Random()
            rng.randrange = lambda n, first=first: first  # type: ignore[method-assign]
            auth = Auth(Options(auth_http_addresses=addresses), get_logger(), rng=rng)
            state = await auth.query(remote_ip="10.0.0.1", tls=False, secret=unique, common_name="")
            assert state.identity == "alice"
        with pytest.raises(AuthError, match="failed to auth against"):
            await Auth(Options(auth_http_addresses=addresses[:1]), get_logger()).query(remote_ip="", tls=False, secret=unique, common_name="")
    finally:
        dead.close()
    assert [q["remote_ip"] for q in authd.queries_for(unique)] == ["10.0.0.1", "10.0.0.1"]


# ---------------------------------------------------------------- ttl


def test_expired_authorizations_are_checked_again(auth_nsqd, authd, unique):
    topic = f"orders.{unique}"
    authd.answers[unique] = (200, {**ALICE, "ttl": 1})
    c, _ = authed(auth_nsqd, unique)
    assert c.pub(topic, b"while allowed").data == b"OK"
    assert len(authd.queries_for(unique)) == 1  # cached: no query per PUB
    # revoked at the auth server: the next PUB after the ttl asks again and fails
    authd.answers[unique] = (200, {**BOB, "ttl": 1})

    def refused() -> bool:
        c.cmd(b"PUB", topic, body=b"maybe")
        return c.read_response().data != b"OK"

    wait_for(refused, timeout=10, interval=0.05, message="the ttl to expire")
    assert c.closed_by_server()
    assert len(authd.queries_for(unique)) == 2
    last = [line for line in auth_nsqd.lines if "E_UNAUTHORIZED" in line or "AUTH failed for PUB" in line]
    assert last, "the refusal is logged"


def test_expired_authorizations_with_the_auth_server_gone(auth_nsqd, authd, unique):
    authd.answers[unique] = (200, {**ALICE, "ttl": 1})
    c, _ = authed(auth_nsqd, unique)
    del authd.answers[unique]  # now answered 403

    def refused() -> bool:
        c.cmd(b"PUB", f"orders.{unique}", body=b"maybe")
        frame = c.read_response()
        if frame.data == b"OK":
            return False
        assert (frame.frame_type, frame.data) == (FRAME_TYPE_ERROR, b"E_AUTH_FAILED AUTH failed")
        return True

    wait_for(refused, timeout=10, interval=0.05, message="the ttl to expire")


def test_parse_auth_response_matches_go_regexes_anywhere():
    state = parse_auth_response(json.dumps(BOB).encode(), now=100.0, secret="s")
    assert state.expires == 3700.0 and not state.is_expired(3699.0) and state.is_expired(3700.0)
    assert state.is_allowed("orders", "audit") and state.is_allowed("orders.eu", "audit")
    assert not state.is_allowed("all-orders", "audit")  # ^ anchors
    assert not state.is_allowed("orders", "audit2") and not state.is_allowed("orders", "")
    alice = parse_auth_response(json.dumps(ALICE).encode(), now=0.0)
    assert alice.is_allowed("orders-x", "") and alice.is_allowed("orders", "any")
    with pytest.raises(AuthError, match="unknown permission"):
        parse_auth_response(b'{"ttl": 5, "authorizations": [{"topic": "x", "channels": [], "permissions": ["read"]}]}', now=0)


# ---------------------------------------------------------------- real clients


def run_driver(*args: str, timeout: float = 60.0) -> list[dict]:
    proc = subprocess.run([sys.executable, DRIVER, *args], capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def test_pynsq_with_auth_secret(auth_nsqd, unique):
    topic = f"orders.{unique}"
    events = run_driver("write", topic, "20", "--nsqd", auth_nsqd.tcp_address, "--auth-secret", "alice-secret", "--timeout", "30")
    assert events[-1] == {"event": "done", "acked": 20, "errors": 0}
    events = run_driver("read", topic, "audit", "20", "--nsqd", auth_nsqd.tcp_address, "--auth-secret", "bob-secret", "--timeout", "30")
    assert sorted(e["body"] for e in events if e["event"] == "message") == sorted(f"msg-{i}" for i in range(20))


@on_both_backends
async def test_our_client_with_auth_secret(auth_nsqd, unique):
    topic = f"orders.{unique}"
    async with Writer([auth_nsqd.tcp_address], auth_secret="alice-secret") as writer:
        await writer.mpub(topic, [b"a", b"b", b"c"])
    got: list[bytes] = []
    done = anyio.Event()

    async def handler(message: Message) -> None:
        got.append(message.body)
        if len(got) == 3:
            done.set()

    async with Reader(topic, "audit", handler, nsqd_tcp_addresses=[auth_nsqd.tcp_address], auth_secret="bob-secret"):
        with anyio.fail_after(20):
            await done.wait()
    assert sorted(got) == [b"a", b"b", b"c"]
    # bob may not publish: nsqd refuses, and says why
    from pynsqd.client import NSQError

    async with Writer([auth_nsqd.tcp_address], auth_secret="bob-secret", publish_timeout=5) as writer:
        with pytest.raises(NSQError) as info:
            await writer.pub(topic, b"bob")
    assert info.value.code == "E_UNAUTHORIZED"
