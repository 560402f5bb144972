"""Addresses as NSQ writes them (``host:port``, ``[::1]:port``) and listeners."""

from __future__ import annotations

import errno
import math
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from .log import get_logger


def parse_address(address: str, default_port: int | None = None) -> tuple[str, int]:
    """``"0.0.0.0:4150"`` -> ``("0.0.0.0", 4150)``; ``"[::1]:0"`` -> ``("::1", 0)``."""
    text = address.strip()
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"invalid address {address!r}")
        host = text[1:end]
        rest = text[end + 1 :]
        if not rest and default_port is not None:
            return host, default_port
        if not rest.startswith(":"):
            raise ValueError(f"invalid address {address!r}")
        port_text = rest[1:]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            if default_port is None:
                raise ValueError(f"missing port in address {address!r}")
            return text, default_port
        if ":" in host:
            raise ValueError(f"too many colons in address {address!r}")
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"invalid port in address {address!r}") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"invalid port in address {address!r}")
    return host, port


class ListenError(Exception):
    """A listener could not be opened (address in use, bad host...)."""


async def listen_or_fail(address: str) -> tuple[trio.SocketListener, str, int]:
    """:func:`open_listener` with every failure as a one-line ListenError."""
    try:
        return await open_listener(address)
    except (OSError, ValueError) as exc:
        raise ListenError(f"listen ({address}) failed - {exc}") from exc


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def open_listener(address: str) -> tuple[trio.SocketListener, str, int]:
    """Bind one TCP listener; port 0 picks a free port.  Returns the listener,
    the real address (as nsqd logs it) and the port."""
    host, port = parse_address(address)
    bind_host = host or "0.0.0.0"
    family = socket.AF_INET6 if ":" in bind_host else socket.AF_INET
    if not any(c.isalpha() for c in bind_host) or bind_host == "localhost":
        infos = [(family, bind_host)]
    else:
        resolved = await trio.socket.getaddrinfo(bind_host, port, type=socket.SOCK_STREAM)
        infos = [(resolved[0][0], resolved[0][4][0])]
    fam, addr = infos[0]
    if bind_host == "localhost":
        fam, addr = socket.AF_INET, "127.0.0.1"
    sock = trio.socket.socket(fam, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if fam == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        await sock.bind((addr, port))
        sock.listen(socket.SOMAXCONN)
    except BaseException:
        sock.close()
        raise
    real_host, real_port = sock.getsockname()[:2]
    return trio.SocketListener(sock), format_address(real_host, real_port), real_port


# accept() errors that mean "out of file descriptors/memory right now": the
# daemon keeps serving the connections it has and retries
ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
ACCEPT_RETRY = 0.1
ACCEPT_LOG_EVERY = 1.0


async def serve_listener(
    handler: Callable[[Any], Awaitable[object]],
    listener: trio.abc.Listener[Any],
    *,
    name: str,
    log: Any = None,
    task_status: Any = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept forever, each connection handled in its own task (like
    ``trio.serve_listeners``), logging resource exhaustion through our
    logger at most once a second and resuming once descriptors are free."""
    log = log or get_logger()
    failing_since: float | None = None
    last_logged = -math.inf
    async with trio.open_nursery() as nursery:
        async with listener:
            task_status.started()
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    if exc.errno not in ACCEPT_CAPACITY_ERRNOS:
                        raise
                    now = trio.current_time()
                    if failing_since is None:
                        failing_since = now
                    if now - last_logged >= ACCEPT_LOG_EVERY:
                        last_logged = now
                        log.error(f"{name}: accept failed, retrying", error=exc.strerror, errno=errno.errorcode.get(exc.errno or 0, ""))
                    await trio.sleep(ACCEPT_RETRY)
                    continue
                if failing_since is not None:
                    log.info(f"{name}: accepting connections again", after=round(trio.current_time() - failing_since, 3))
                    failing_since = None
                    last_logged = -math.inf
                nursery.start_soon(handler, stream)
