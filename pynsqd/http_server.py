"""The HTTP plumbing nsqd and nsqlookupd share: h11 connections, a router,
and NSQ's response conventions (NSQ's ``internal/http_api``).

Responses follow nsqd's V1 rules: 200 with plain text (``OK``), JSON or an
empty body; errors as ``{"message": "CODE"}``; always the header
``X-NSQ-Content-Type: nsq; version=1.0``.
"""

from __future__ import annotations

import json
from http import HTTPStatus
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

import attrs
import h11
import trio

from .log import get_logger

log = get_logger()

NSQ_CONTENT_TYPE = (b"X-NSQ-Content-Type", b"nsq; version=1.0")
RECEIVE_SIZE = 65536


@attrs.define
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: list[tuple[bytes, bytes]]
    body: bytes
    remote_address: str = ""

    def arg(self, name: str) -> str | None:
        """The first value of a query parameter, or None if absent."""
        values = self.query.get(name)
        return values[0] if values else None

    def has_arg(self, name: str) -> bool:
        return name in self.query

    def header(self, name: bytes) -> bytes | None:
        name = name.lower()
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return None


@attrs.define
class Response:
    status: int = 200
    body: bytes = b""
    content_type: bytes | None = None
    headers: list[tuple[bytes, bytes]] = attrs.Factory(list)


class HTTPError(Exception):
    """Raised by handlers: becomes ``{"message": message}`` with ``status``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def respond(data: Any = None, status: int = 200) -> Response:
    """nsqd's RespondV1: text for str/bytes, JSON for anything else, empty for None."""
    if status != 200:
        return Response(status, _json({"message": str(data)}), b"application/json; charset=utf-8", [NSQ_CONTENT_TYPE])
    if data is None:
        return Response(200, b"", None, [NSQ_CONTENT_TYPE])
    if isinstance(data, str):
        return Response(200, data.encode(), b"text/plain; charset=utf-8", [NSQ_CONTENT_TYPE])
    if isinstance(data, bytes):
        return Response(200, data, b"text/plain; charset=utf-8", [NSQ_CONTENT_TYPE])
    return Response(200, _json(data), b"application/json; charset=utf-8", [NSQ_CONTENT_TYPE])


def _json(data: Any) -> bytes:
    # compact, as Go's encoding/json writes it
    return json.dumps(data, separators=(",", ":")).encode()


def respond_error(status: int, message: str) -> Response:
    return respond(message, status)


def plain_text(text: str, status: int = 200) -> Response:
    """For /ping: plain text even on error, as nsqd's PlainText decorator."""
    return Response(status, text.encode(), b"text/plain; charset=utf-8")


Handler = Callable[[Request], Awaitable[Response]]


@attrs.define
class Route:
    handler: Handler
    # bodies larger than this get 413 with ``too_big`` as the message, before
    # the body is read (nsqd compares Content-Length the same way)
    max_body: int | None = None
    too_big: str = "BODY_TOO_BIG"


class Router:
    """Exact paths, prefix routes (``/config/*``) for one trailing segment,
    and subtree routes (``/topics/**``) for any path below the prefix."""

    def __init__(self, default_max_body: int = 1 << 20) -> None:
        self._routes: dict[str, dict[str, Route]] = {}
        self._prefixes: dict[str, dict[str, Route]] = {}
        self._subtrees: dict[str, dict[str, Route]] = {}
        self.default_max_body = default_max_body

    def add(self, methods: str | tuple[str, ...], path: str, handler: Handler, *, max_body: int | None = None, too_big: str = "BODY_TOO_BIG") -> None:
        if path.endswith("/**"):
            table, key = self._subtrees, path[:-2]
        elif path.endswith("/*"):
            table, key = self._prefixes, path[:-1]
        else:
            table, key = self._routes, path
        for method in (methods,) if isinstance(methods, str) else methods:
            table.setdefault(key, {})[method] = Route(handler, max_body, too_big)

    def find(self, method: str, path: str) -> Route | Response:
        by_method = self._routes.get(path)
        if by_method is None:
            for prefix, candidates in self._prefixes.items():
                if path.startswith(prefix) and "/" not in path[len(prefix) :] and len(path) > len(prefix):
                    by_method = candidates
                    break
        if by_method is None:
            # the longest subtree prefix wins
            for prefix in sorted(self._subtrees, key=len, reverse=True):
                if path.startswith(prefix) and len(path) > len(prefix):
                    by_method = self._subtrees[prefix]
                    break
        if by_method is None:
            return respond_error(404, "NOT_FOUND")
        route = by_method.get(method)
        if route is None and method == "HEAD":
            route = by_method.get("GET")
        if route is None:
            return respond_error(405, "METHOD_NOT_ALLOWED")
        return route


def _encode_response(conn: h11.Connection, response: Response, method: str, extra: list[tuple[bytes, bytes]]) -> bytes:
    headers = list(response.headers) + extra
    if response.content_type is not None:
        headers.append((b"Content-Type", response.content_type))
    headers.append((b"Content-Length", str(len(response.body)).encode()))
    out = conn.send(h11.Response(status_code=response.status, headers=headers, reason=_reason(response.status)))
    if response.body and method != "HEAD":
        out += conn.send(h11.Data(data=response.body))
    out += conn.send(h11.EndOfMessage())
    return out


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


async def _discard_body(stream: trio.abc.Stream, budget: int, timeout: float = 5.0) -> None:
    """Read and drop what the client is still sending after an early 413, so
    that a client writing its whole body before reading sees the answer
    instead of a reset connection."""
    with trio.move_on_after(timeout):
        while budget > 0:
            data = await stream.receive_some(RECEIVE_SIZE)
            if not data:
                return
            budget -= len(data)


async def serve_http_connection(
    stream: trio.abc.Stream,
    router: Router,
    *,
    remote_address: str = "",
    idle_timeout: float = 120.0,
    server_header: bytes = b"pynsqd",
) -> None:
    """Serve requests on one connection until it closes (keep-alive)."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=64 * 1024)
    extra = [(b"Server", server_header)]

    async def next_event() -> Any:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                with trio.move_on_after(idle_timeout) as scope:
                    data = await stream.receive_some(RECEIVE_SIZE)
                if scope.cancelled_caught:
                    return None
                conn.receive_data(data)
                continue
            return event

    async def send(data: bytes) -> None:
        with trio.fail_after(idle_timeout):
            await stream.send_all(data)

    try:
        while True:
            try:
                event = await next_event()
                if not isinstance(event, h11.Request):
                    return
                target = event.target.decode("latin-1")
                method = event.method.decode("ascii", "replace")
                try:
                    parts = urlsplit(target)
                except ValueError:  # e.g. "//[bad" as an authority
                    parts = None
                found = router.find(method, parts.path) if parts is not None else respond_error(400, "INVALID_REQUEST")
                if isinstance(found, Response):
                    response: Response = found
                    route = None
                else:
                    route = found
                    response = Response()
                limit = (route.max_body if route and route.max_body is not None else router.default_max_body)
                content_length = None
                for k, v in event.headers:
                    if k == b"content-length":
                        content_length = int(v)
                if route is not None and content_length is not None and content_length > limit:
                    # refuse before reading, then close: the body is unread
                    await send(_encode_response(conn, respond_error(413, route.too_big), method, extra + [(b"Connection", b"close")]))
                    await _discard_body(stream, min(content_length, 4 * limit + RECEIVE_SIZE))
                    return
                chunks = []
                size = 0
                while True:
                    ev = await next_event()
                    if ev is None or isinstance(ev, h11.ConnectionClosed):
                        return
                    if isinstance(ev, h11.Data):
                        size += len(ev.data)
                        if size > limit:
                            too_big = route.too_big if route else "BODY_TOO_BIG"
                            await send(_encode_response(conn, respond_error(413, too_big), method, extra + [(b"Connection", b"close")]))
                            await _discard_body(stream, 4 * limit + RECEIVE_SIZE)
                            return
                        chunks.append(bytes(ev.data))
                    elif isinstance(ev, h11.EndOfMessage):
                        break
                if route is not None and parts is not None:
                    request = Request(
                        method=method,
                        path=parts.path,
                        query=parse_qs(parts.query, keep_blank_values=True),
                        headers=list(event.headers),
                        body=b"".join(chunks),
                        remote_address=remote_address,
                    )
                    try:
                        response = await route.handler(request)
                    except HTTPError as exc:
                        response = respond_error(exc.status, exc.message)
                    except Exception:
                        log.exception("HTTP handler failed", path=parts.path)
                        response = respond_error(500, "INTERNAL_ERROR")
                await send(_encode_response(conn, response, method, extra))
            except h11.RemoteProtocolError as exc:
                if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                    try:
                        status = exc.error_status_hint
                        await send(_encode_response(conn, respond_error(status, "INVALID_REQUEST"), "GET", extra + [(b"Connection", b"close")]))
                    except (h11.LocalProtocolError, trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError):
                        pass
                return
            if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                return
            try:
                conn.start_next_cycle()
            except h11.LocalProtocolError:
                return
    except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError, ConnectionError):
        return
    finally:
        with trio.CancelScope(shield=True):
            with trio.move_on_after(1):
                await stream.aclose()


async def serve_http(
    listener: trio.abc.Listener[Any], router: Router, *, name: str = "HTTP", task_status: Any = trio.TASK_STATUS_IGNORED, **kwargs: Any
) -> None:
    """Accept connections forever, each served in its own task.  ``listener``
    may be a ``trio.SSLListener`` (HTTPS): the handshake then happens on the
    first read, and a failed one just ends that connection."""
    from .listener import serve_listener

    async def handle(stream: trio.abc.Stream) -> None:
        sock = getattr(getattr(stream, "transport_stream", stream), "socket", None)
        try:
            peer = sock.getpeername() if sock is not None else ("", 0)
            remote = f"{peer[0]}:{peer[1]}" if ":" not in peer[0] else f"[{peer[0]}]:{peer[1]}"
        except OSError:
            remote = ""
        try:
            await serve_http_connection(stream, router, remote_address=remote, **kwargs)
        except Exception:
            # one bad connection must never take the listener (and daemon) down
            log.exception(f"{name}: connection failed", client=remote)

    await serve_listener(handle, listener, name=name, log=log, task_status=task_status)
