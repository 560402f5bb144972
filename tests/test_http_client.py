"""pynsqd.http_client against our own HTTP server (pynsqd.http_server), in process."""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio

from pynsqd import http_client
from pynsqd.http_client import HTTPClientError, HTTPTimeout, http_get, http_post, http_put, http_request
from pynsqd.http_server import HTTPError, Request, Response, Router, respond, serve_http
from pynsqd.listener import open_listener


def _router() -> Router:
    r = Router()

    async def echo(req: Request) -> Response:
        return respond(
            {
                "method": req.method,
                "path": req.path,
                "query": req.query,
                "body": req.body.decode(),
                "headers": {k.decode().lower(): v.decode() for k, v in req.headers},
            }
        )

    async def big(req: Request) -> Response:
        return respond(b"x" * int(req.arg("n") or 0))

    async def slow(req: Request) -> Response:
        await trio.sleep_forever()
        raise AssertionError

    async def fail(req: Request) -> Response:
        raise HTTPError(400, "BAD_THING")

    r.add(("GET", "POST", "PUT"), "/echo", echo)
    r.add("GET", "/big", big)
    r.add("GET", "/slow", slow)
    r.add("GET", "/fail", fail)
    return r


@asynccontextmanager
async def server(address: str = "127.0.0.1:0") -> AsyncIterator[str]:
    listener, real, _ = await open_listener(address)
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_http, listener, _router())
        yield f"http://{real}"
        nursery.cancel_scope.cancel()


async def test_get_status_headers_body() -> None:
    async with server() as base:
        status, headers, body = await http_get(f"{base}/echo?topic=a%20b&x=1&x=2")
        assert status == 200
        assert headers["x-nsq-content-type"] == "nsq; version=1.0"
        assert headers["content-type"].startswith("application/json")
        data = json.loads(body)
        assert data["method"] == "GET" and data["path"] == "/echo"
        assert data["query"] == {"topic": ["a b"], "x": ["1", "2"]}
        assert data["headers"]["host"] == base.removeprefix("http://")
        assert data["headers"]["user-agent"].startswith("pynsqd/")
        assert data["headers"]["connection"] == "close"
        assert "content-length" not in data["headers"]


async def test_post_and_put_send_body_and_headers() -> None:
    async with server() as base:
        resp = await http_post(f"{base}/echo", b"hello\nworld", headers={"Accept": "application/vnd.nsq; version=1.0"})
        data = resp.json()
        assert (data["method"], data["body"]) == ("POST", "hello\nworld")
        assert data["headers"]["accept"] == "application/vnd.nsq; version=1.0"
        assert data["headers"]["content-length"] == "11"
        resp = await http_put(f"{base}/echo", json.dumps(["a"]).encode(), headers=[("User-Agent", "mine")])
        data = resp.json()
        assert (data["method"], data["body"], data["headers"]["user-agent"]) == ("PUT", '["a"]', "mine")
        # an empty POST still says Content-Length: 0
        assert (await http_post(f"{base}/echo")).json()["headers"]["content-length"] == "0"


async def test_error_statuses_are_returned_not_raised() -> None:
    async with server() as base:
        resp = await http_get(f"{base}/fail")
        assert (resp.status, resp.body) == (400, b'{"message":"BAD_THING"}')
        assert (await http_get(f"{base}/nope")).status == 404
        assert (await http_request("DELETE", f"{base}/echo")).status == 405


async def test_large_body_and_max_body() -> None:
    async with server() as base:
        resp = await http_get(f"{base}/big?n={3 * 1024 * 1024}")
        assert resp.status == 200 and resp.body == b"x" * (3 * 1024 * 1024)
        with pytest.raises(HTTPClientError, match="larger than"):
            await http_get(f"{base}/big?n=5000", max_body=4096)


async def test_request_timeout() -> None:
    async with server() as base:
        start = trio.current_time()
        with pytest.raises(HTTPTimeout):
            await http_get(f"{base}/slow", timeout=0.3)
        assert 0.25 < trio.current_time() - start < 3


async def test_connect_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    async def never(host: str, port: int, **kw: Any) -> Any:
        await trio.sleep_forever()
        raise AssertionError

    monkeypatch.setattr(http_client.anyio, "connect_tcp", never)
    start = trio.current_time()
    with pytest.raises(HTTPTimeout, match="connect"):
        await http_get("http://127.0.0.1:9/x", connect_timeout=0.2, timeout=5)
    assert trio.current_time() - start < 2


async def test_connection_refused() -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    with pytest.raises(HTTPClientError, match="connect"):
        await http_get(f"http://127.0.0.1:{port}/x")


async def test_truncated_response_is_an_error() -> None:
    async def handler(stream: trio.SocketStream) -> None:
        await stream.receive_some(65536)
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly a bit")
        await stream.aclose()

    listener, real, _ = await open_listener("127.0.0.1:0")
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, handler, [listener])
        with pytest.raises(HTTPClientError):
            await http_get(f"http://{real}/")
        nursery.cancel_scope.cancel()


async def test_garbage_response_is_an_error() -> None:
    async def handler(stream: trio.SocketStream) -> None:
        await stream.receive_some(65536)
        await stream.send_all(b"NOT HTTP AT ALL\r\n\r\n")
        await stream.aclose()

    listener, real, _ = await open_listener("127.0.0.1:0")
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, handler, [listener])
        with pytest.raises(HTTPClientError, match="bad HTTP"):
            await http_get(f"http://{real}/")
        nursery.cancel_scope.cancel()


async def test_ipv6_loopback() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        ctx = server("[::1]:0")
        base = await ctx.__aenter__()
    except OSError as exc:
        pytest.skip(f"no ::1 here: {exc}")
    try:
        resp = await http_get(f"{base}/echo")
        assert resp.status == 200 and resp.json()["headers"]["host"] == base.removeprefix("http://")
    finally:
        await ctx.__aexit__(None, None, None)


@pytest.mark.parametrize("url", ["127.0.0.1:4161/x", "ftp://h/x", "http:///x", "http://h:99999/"])
async def test_bad_urls(url: str) -> None:
    with pytest.raises(ValueError):
        await http_get(url)
