"""A small async HTTP/1.1 client on h11 + anyio, for the daemons' outgoing
requests (nsqd asking nsqlookupd for channels, the auth server) and the
client library's lookupd polling, so it runs on trio and on asyncio.

One request per connection (``Connection: close``), no pool: these requests
are rare and go to many different hosts.  Timeouts are cancel scopes:
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
    extra = list(headers.items()) if isinstance(headers, dict) else list(headers or [])
    names = {k.lower() for k, _ in extra}
    req_headers = [("Host", host_header)]
    if "user-agent" not in names:
        req_headers.append(("User-Agent", USER_AGENT))
    req_headers += extra
    if body or method.upper() in ("POST", "PUT", "PATCH"):
        req_headers.append(("Content-Length", str(len(body))))
    req_headers.append(("Connection", "close"))

    with anyio.move_on_after(timeout) as scope:
        try:
            stream = await _connect(scheme, host, port, min(connect_timeout, timeout), ssl_context)
        except (OSError, anyio.BrokenResourceError) as exc:
            cause = exc.__cause__ if isinstance(exc.__cause__, OSError) else exc  # anyio: "All connection attempts failed"
            raise HTTPClientError(f"connect to {host}:{port} failed - {cause}") from exc
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


async def http_get(url: str, **kwargs: Any) -> HTTPResponse:
    return await http_request("GET", url, **kwargs)


async def http_post(url: str, body: bytes = b"", **kwargs: Any) -> HTTPResponse:
    return await http_request("POST", url, body, **kwargs)


async def http_put(url: str, body: bytes = b"", **kwargs: Any) -> HTTPResponse:
    return await http_request("PUT", url, body, **kwargs)
