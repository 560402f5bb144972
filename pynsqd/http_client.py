"""A small async HTTP/1.1 client on h11 + anyio, for the daemons' outgoing
requests (nsqd asking nsqlookupd for channels, the auth server) and the
client library's lookupd polling, so it runs on trio and on asyncio.

:func:`http_request`: one request per connection (``Connection: close``),
no pool -- these requests are rare and go to many different hosts.
:class:`ConnectionPool`: keep-alive connections, for a program making many
requests to the same few endpoints (the nsq_to_http tool).  Timeouts are cancel scopes:
``connect_timeout`` bounds the TCP (and TLS) connect, ``timeout`` the whole
request.  Every failure to get a complete response -- refused, reset, timed
out, malformed -- is an :class:`HTTPClientError`; a response with any status
is returned, not raised.

    status, headers, body = await http_get("http://127.0.0.1:4161/channels?topic=t", timeout=5)
"""

from __future__ import annotations

import json
import ssl
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import anyio
import anyio.abc
import h11
from anyio.streams.tls import TLSStream

from . import __version__

RECEIVE_SIZE = 65536
DEFAULT_TIMEOUT = 5.0
DEFAULT_CONNECT_TIMEOUT = 2.0
DEFAULT_MAX_BODY = 64 * 1024 * 1024
USER_AGENT = f"pynsqd/{__version__}"


class HTTPClientError(Exception):
    """No (complete) response: connect failure, reset, bad HTTP, body too big."""


class HTTPTimeout(HTTPClientError):
    """The connect or the whole request took longer than allowed."""


class _NoAnswer(HTTPClientError):
    """The connection ended before any byte of an answer (on a kept
    connection: the server had closed it, the request can be sent again)."""


class HTTPResponse(NamedTuple):
    status: int
    # names lowercased; repeated headers joined with ", "
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def _split_url(url: str) -> tuple[str, str, int, str, str]:
    """-> (scheme, host, port, Host header value, request target)."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise ValueError(f"unsupported URL (http:// or https:// only): {url!r}")
    host = parts.hostname
    if not host:
        raise ValueError(f"URL without host: {url!r}")
    try:
        port = parts.port or (443 if scheme == "https" else 80)
    except ValueError:
        raise ValueError(f"invalid port in URL {url!r}") from None
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    return scheme, host, port, parts.netloc.rsplit("@", 1)[-1], target


async def _connect(scheme: str, host: str, port: int, connect_timeout: float, ssl_context: ssl.SSLContext | None) -> anyio.abc.ByteStream:
    with anyio.move_on_after(connect_timeout) as scope:
        tcp = await anyio.connect_tcp(host, port)
        if scheme != "https":
            return tcp
        try:
            return await TLSStream.wrap(tcp, hostname=host, ssl_context=ssl_context or ssl.create_default_context(), standard_compatible=False)
        except BaseException:
            await anyio.aclose_forcefully(tcp)
            raise
    assert scope.cancelled_caught
    raise HTTPTimeout(f"connect to {host}:{port} timed out after {connect_timeout}s")


def _request_headers(host_header: str, method: str, body: bytes, headers: dict[str, str] | list[tuple[str, str]] | None, *, close: bool) -> list[tuple[str, str]]:
    extra = list(headers.items()) if isinstance(headers, dict) else list(headers or [])
    names = {k.lower() for k, _ in extra}
    req_headers = [("Host", host_header)]
    if "user-agent" not in names:
        req_headers.append(("User-Agent", USER_AGENT))
    req_headers += extra
    if body or method.upper() in ("POST", "PUT", "PATCH"):
        req_headers.append(("Content-Length", str(len(body))))
    if close:
        req_headers.append(("Connection", "close"))
    return req_headers


async def _open(scheme: str, host: str, port: int, connect_timeout: float, ssl_context: ssl.SSLContext | None) -> anyio.abc.ByteStream:
    try:
        return await _connect(scheme, host, port, connect_timeout, ssl_context)
    except (OSError, anyio.BrokenResourceError) as exc:
        cause = exc.__cause__ if isinstance(exc.__cause__, OSError) else exc  # anyio: "All connection attempts failed"
        raise HTTPClientError(f"connect to {host}:{port} failed - {cause}") from exc


async def http_request(
    method: str,
    url: str,
    body: bytes = b"",
    *,
    headers: dict[str, str] | list[tuple[str, str]] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    max_body: int = DEFAULT_MAX_BODY,
    ssl_context: ssl.SSLContext | None = None,
) -> HTTPResponse:
    """Send one request and read the whole response."""
    scheme, host, port, host_header, target = _split_url(url)
    req_headers = _request_headers(host_header, method, body, headers, close=True)
    with anyio.move_on_after(timeout) as scope:
        stream = await _open(scheme, host, port, min(connect_timeout, timeout), ssl_context)
        try:
            return await _exchange_checked(stream, h11.Connection(h11.CLIENT), method, url, target, req_headers, body, max_body)
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(1):
                await stream.aclose()
    assert scope.cancelled_caught
    raise HTTPTimeout(f"{method} {url} timed out after {timeout}s")


async def _exchange_checked(
    stream: anyio.abc.ByteStream, conn: h11.Connection, method: str, url: str, target: str, headers: list[tuple[str, str]], body: bytes, max_body: int
) -> HTTPResponse:
    """:func:`_exchange` with every failure as an HTTPClientError."""
    try:
        return await _exchange(stream, conn, method, target, headers, body, max_body)
    except (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
        raise HTTPClientError(f"{method} {url} failed - {exc!r}") from exc
    except h11.ProtocolError as exc:
        raise HTTPClientError(f"{method} {url}: bad HTTP response - {exc}") from exc


async def _exchange(
    stream: anyio.abc.ByteStream, conn: h11.Connection, method: str, target: str, headers: list[tuple[str, str]], body: bytes, max_body: int
) -> HTTPResponse:
    out = conn.send(h11.Request(method=method.upper(), target=target, headers=headers))
    if body:
        out += conn.send(h11.Data(data=body))
    out += conn.send(h11.EndOfMessage())
    try:
        await stream.send(out)
    except (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
        raise _NoAnswer(f"connection lost before an answer - {exc!r}") from exc

    response: h11.Response | None = None
    chunks: list[bytes] = []
    size = 0
    received = False
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            try:
                data = await stream.receive(RECEIVE_SIZE)
            except anyio.EndOfStream:
                data = b""
            except (OSError, anyio.BrokenResourceError) as exc:
                if not received:
                    raise _NoAnswer(f"connection lost before an answer - {exc!r}") from exc
                raise
            if not data and not received:
                raise _NoAnswer("connection closed before an answer")
            received = True
            conn.receive_data(data)
            continue
        if isinstance(event, h11.InformationalResponse):
            continue
        if isinstance(event, h11.Response):
            response = event
        elif isinstance(event, h11.Data):
            size += len(event.data)
            if size > max_body:
                raise HTTPClientError(f"response body larger than {max_body} bytes")
            chunks.append(bytes(event.data))
        elif isinstance(event, h11.EndOfMessage):
            break
        elif isinstance(event, h11.ConnectionClosed):
            raise HTTPClientError("connection closed before the response was complete")
    assert response is not None
    got: dict[str, str] = {}
    for name, value in response.headers:
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        got[key] = f"{got[key]}, {text}" if key in got else text
    return HTTPResponse(response.status_code, got, b"".join(chunks))


class _PooledConnection:
    __slots__ = ("stream", "h11")

    def __init__(self, stream: anyio.abc.ByteStream) -> None:
        self.stream = stream
        self.h11 = h11.Connection(h11.CLIENT)


class ConnectionPool:
    """Keep-alive HTTP/1.1 connections, kept per (scheme, host, port).

    A request takes an idle connection or opens one, and gives it back when
    both sides are done and neither asked to close.  A kept connection the
    server closed meanwhile shows on the next request, which is then sent
    once more on a fresh connection (no byte of an answer came back; Go's
    net/http retries the same way).  ``timeout`` bounds each request,
    connect included.  Close with :meth:`aclose` (or ``async with``).
    """

    def __init__(
        self,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        max_idle_per_host: int = 100,
        max_body: int = DEFAULT_MAX_BODY,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.max_idle_per_host = max_idle_per_host
        self.max_body = max_body
        self.ssl_context = ssl_context
        self._idle: dict[tuple[str, str, int], list[_PooledConnection]] = {}

    async def request(
        self, method: str, url: str, body: bytes = b"", *, headers: dict[str, str] | list[tuple[str, str]] | None = None
    ) -> HTTPResponse:
        scheme, host, port, host_header, target = _split_url(url)
        key = (scheme, host, port)
        req_headers = _request_headers(host_header, method, body, headers, close=False)
        with anyio.move_on_after(self.timeout) as scope:
            while True:
                idle = self._idle.get(key)
                reused = bool(idle)
                conn = idle.pop() if idle else _PooledConnection(await _open(scheme, host, port, min(self.connect_timeout, self.timeout), self.ssl_context))
                try:
                    response = await _exchange_checked(conn.stream, conn.h11, method, url, target, req_headers, body, self.max_body)
                except _NoAnswer:
                    await self._discard(conn)
                    if reused:
                        continue  # a kept connection the server had closed: send it again
                    raise
                except BaseException:
                    await self._discard(conn)
                    raise
                await self._release(key, conn)
                return response
        assert scope.cancelled_caught
        raise HTTPTimeout(f"{method} {url} timed out after {self.timeout}s")

    async def _release(self, key: tuple[str, str, int], conn: _PooledConnection) -> None:
        idle = self._idle.setdefault(key, [])
        if conn.h11.our_state is h11.DONE and conn.h11.their_state is h11.DONE and len(idle) < self.max_idle_per_host:
            conn.h11.start_next_cycle()
            idle.append(conn)
        else:  # the server asked to close (or too many idle ones)
            await self._discard(conn)

    async def _discard(self, conn: _PooledConnection) -> None:
        with anyio.CancelScope(shield=True):
            await anyio.aclose_forcefully(conn.stream)

    async def aclose(self) -> None:
        idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                await self._discard(conn)

    async def __aenter__(self) -> ConnectionPool:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


async def http_get(url: str, **kwargs: Any) -> HTTPResponse:
    return await http_request("GET", url, **kwargs)


async def http_post(url: str, body: bytes = b"", **kwargs: Any) -> HTTPResponse:
    return await http_request("POST", url, body, **kwargs)


async def http_put(url: str, body: bytes = b"", **kwargs: Any) -> HTTPResponse:
    return await http_request("PUT", url, body, **kwargs)
