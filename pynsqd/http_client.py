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
            return await _exchange(stream, method, target, req_headers, body, max_body)
        except (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
            raise HTTPClientError(f"{method} {url} failed - {exc!r}") from exc
        except h11.ProtocolError as exc:
            raise HTTPClientError(f"{method} {url}: bad HTTP response - {exc}") from exc
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(1):
                await stream.aclose()
    assert scope.cancelled_caught
    raise HTTPTimeout(f"{method} {url} timed out after {timeout}s")


async def _exchange(
    stream: anyio.abc.ByteStream, method: str, target: str, headers: list[tuple[str, str]], body: bytes, max_body: int
) -> HTTPResponse:
    conn = h11.Connection(h11.CLIENT)
    out = conn.send(h11.Request(method=method.upper(), target=target, headers=headers))
    if body:
        out += conn.send(h11.Data(data=body))
    out += conn.send(h11.EndOfMessage())
    await stream.send(out)

    response: h11.Response | None = None
    chunks: list[bytes] = []
    size = 0
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            try:
                data = await stream.receive(RECEIVE_SIZE)
            except anyio.EndOfStream:
                data = b""
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


class ResponseParser:
    """One HTTP/1.x response, framed from bytes (sans-IO): the keep-alive
    pool's hot path, where h11's generality costs half of each request.

    :meth:`feed` takes what arrived (``b""`` for end of stream) and returns
    the complete :class:`HTTPResponse`, or ``None`` while more is needed.
    Framing as RFC 9112 says: no body for HEAD, 1xx, 204 and 304; chunked;
    Content-Length; else until the server closes.  ``1xx`` interim answers
    are skipped.  Afterwards :attr:`keep_alive` tells whether the connection
    can carry another request.  Anything malformed raises HTTPClientError.
    """

    def __init__(self, method: str = "GET", max_body: int = DEFAULT_MAX_BODY) -> None:
        self.head_only = method.upper() == "HEAD"
        self.max_body = max_body
        self.buf = bytearray()
        self.status = 0
        self.headers: dict[str, str] = {}
        self.keep_alive = False
        self.received_any = False
        self._state = "head"  # head, length, chunk_size, chunk_data, trailer, until_close, done
        self._remaining = 0
        self._body = bytearray()

    def feed(self, data: bytes) -> HTTPResponse | None:
        eof = not data
        if data:
            self.received_any = True
            self.buf += data
        while True:
            state = self._state
            if state == "head":
                end = self.buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(self.buf) > 65536:
                        raise HTTPClientError("bad HTTP response - header section too long")
                    return self._eof() if eof else None
                self._parse_head(bytes(self.buf[:end]))
                del self.buf[: end + 4]
            elif state == "length":
                take = min(self._remaining, len(self.buf))
                self._append(self.buf[:take])
                del self.buf[:take]
                self._remaining -= take
                if self._remaining:
                    return self._eof() if eof else None
                self._state = "done"
            elif state == "chunk_size":
                end = self.buf.find(b"\r\n")
                if end < 0:
                    return self._eof() if eof else None
                size_text = bytes(self.buf[:end]).split(b";", 1)[0].strip()
                if not size_text or size_text.strip(b"0123456789abcdefABCDEF"):
                    raise HTTPClientError(f"bad HTTP response - chunk size {size_text[:20]!r}")
                self._remaining = int(size_text, 16)
                del self.buf[: end + 2]
                self._state = "chunk_data" if self._remaining else "trailer"
            elif state == "chunk_data":
                if len(self.buf) < self._remaining + 2:
                    return self._eof() if eof else None
                if self.buf[self._remaining : self._remaining + 2] != b"\r\n":
                    raise HTTPClientError("bad HTTP response - chunk not followed by CRLF")
                self._append(self.buf[: self._remaining])
                del self.buf[: self._remaining + 2]
                self._state = "chunk_size"
            elif state == "trailer":
                end = self.buf.find(b"\r\n")
                if end < 0:
                    return self._eof() if eof else None
                del self.buf[: end + 2]
                if end == 0:
                    self._state = "done"
            elif state == "until_close":
                self._append(self.buf)
                self.buf.clear()
                if not eof:
                    return None
                self._state = "done"
            if self._state == "done":
                if self.buf:  # bytes after the response: nothing we can reuse safely
                    self.keep_alive = False
                return HTTPResponse(self.status, self.headers, bytes(self._body))

    def _eof(self) -> None:
        if self.received_any:
            raise HTTPClientError("connection closed before the response was complete")
        raise _NoAnswer("connection closed before an answer")

    def _append(self, data: bytes | bytearray) -> None:
        self._body += data
        if len(self._body) > self.max_body:
            raise HTTPClientError(f"response body larger than {self.max_body} bytes")

    def _parse_head(self, head: bytes) -> None:
        lines = head.decode("latin-1").split("\r\n")
        version, _, rest = lines[0].partition(" ")
        code = rest[:3]
        if not version.startswith("HTTP/1.") or not code.isdigit():
            raise HTTPClientError(f"bad HTTP response - status line {lines[0][:80]!r}")
        status = int(code)
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep or not name or name != name.strip():
                raise HTTPClientError(f"bad HTTP response - header line {line[:80]!r}")
            key = name.lower()
            value = value.strip()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        if 100 <= status < 200:
            return  # an interim answer (100 Continue): the real one follows
        self.status, self.headers = status, headers
        connection = headers.get("connection", "").lower()
        self.keep_alive = "close" not in connection if version == "HTTP/1.1" else "keep-alive" in connection
        if self.head_only or status in (204, 304):
            self._state = "done"
        elif "chunked" in headers.get("transfer-encoding", "").lower():
            self._state = "chunk_size"
        elif "content-length" in headers:
            try:
                self._remaining = int(headers["content-length"])
            except ValueError:
                raise HTTPClientError(f"bad HTTP response - Content-Length {headers['content-length'][:20]!r}") from None
            if self._remaining < 0:
                raise HTTPClientError("bad HTTP response - negative Content-Length")
            self._state = "length"
        else:
            self._state = "until_close"
            self.keep_alive = False


def _check_header(name: str, value: str) -> None:
    if not name or any(c in name for c in " :\r\n\t") or "\r" in value or "\n" in value:
        raise ValueError(f"invalid HTTP header {name!r}: {value!r}")


class ConnectionPool:
    """Keep-alive HTTP/1.1 connections, kept per (scheme, host, port).

    A request takes an idle connection or opens one, and gives it back when
    the answer was complete and neither side asked to close.  A kept
    connection the server closed meanwhile shows on the next request, which
    is then sent once more on a fresh connection (no byte of an answer came
    back; Go's net/http retries the same way).  ``timeout`` bounds each
    request, connect included.  Close with :meth:`aclose` (or ``async with``).
    Requests are written directly and answers framed by
    :class:`ResponseParser`: this is the path of one request per message.
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
        self._idle: dict[tuple[str, str, int], list[anyio.abc.ByteStream]] = {}

    async def request(
        self, method: str, url: str, body: bytes = b"", *, headers: dict[str, str] | list[tuple[str, str]] | None = None
    ) -> HTTPResponse:
        scheme, host, port, host_header, target = _split_url(url)
        key = (scheme, host, port)
        method = method.upper()
        lines = [f"{method} {target} HTTP/1.1"]
        for name, value in _request_headers(host_header, method, body, headers, close=False):
            _check_header(name, value)
            lines.append(f"{name}: {value}")
        request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
        with anyio.move_on_after(self.timeout) as scope:
            while True:
                idle = self._idle.get(key)
                reused = bool(idle)
                stream = idle.pop() if idle else await _open(scheme, host, port, min(self.connect_timeout, self.timeout), self.ssl_context)
                parser = ResponseParser(method, self.max_body)
                try:
                    response = await self._exchange(stream, request, parser, method, url)
                except _NoAnswer:
                    await self._discard(stream)
                    if reused:
                        continue  # a kept connection the server had closed: send it again
                    raise
                except BaseException:
                    await self._discard(stream)
                    raise
                idle = self._idle.setdefault(key, [])
                if parser.keep_alive and len(idle) < self.max_idle_per_host:
                    idle.append(stream)
                else:
                    await self._discard(stream)
                return response
        assert scope.cancelled_caught
        raise HTTPTimeout(f"{method} {url} timed out after {self.timeout}s")

    @staticmethod
    async def _exchange(stream: anyio.abc.ByteStream, request: bytes, parser: ResponseParser, method: str, url: str) -> HTTPResponse:
        try:
            await stream.send(request)
        except (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
            raise _NoAnswer(f"connection lost before an answer - {exc!r}") from exc
        while True:
            try:
                data = await stream.receive(RECEIVE_SIZE)
            except anyio.EndOfStream:
                data = b""
            except (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
                if not parser.received_any:
                    raise _NoAnswer(f"connection lost before an answer - {exc!r}") from exc
                raise HTTPClientError(f"{method} {url} failed - {exc!r}") from exc
            response = parser.feed(data)
            if response is not None:
                return response

    @staticmethod
    async def _discard(stream: anyio.abc.ByteStream) -> None:
        with anyio.CancelScope(shield=True):
            await anyio.aclose_forcefully(stream)

    async def aclose(self) -> None:
        idle, self._idle = self._idle, {}
        for streams in idle.values():
            for stream in streams:
                await self._discard(stream)

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
