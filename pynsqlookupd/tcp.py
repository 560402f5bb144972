"""The trio edge of the TCP protocol: magic, read loop, cleanup on disconnect."""

from __future__ import annotations

import time
from collections.abc import Callable

import trio

from pynsqd.listener import format_address, serve_listener
from pynsqd.log import get_logger
from pynsqd.protocol import MAGIC_V1, encode_v1_response

from .lookup_protocol_v1 import LookupProtocolV1, ServerInfo
from .registration_db import RegistrationDB

RECEIVE_SIZE = 65536
# nsqd reads our replies promptly; a peer that stops reading is dropped
# rather than allowed to hold a task forever
SEND_TIMEOUT = 30.0

_STREAM_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError, ConnectionError, OSError)


def peer_address(stream: trio.SocketStream) -> str:
    try:
        host, port = stream.socket.getpeername()[:2]
    except OSError:
        return ""
    return format_address(host, port)


async def _read_magic(stream: trio.abc.Stream) -> tuple[bytes, bytes] | None:
    """-> (magic, bytes after it), or None if the peer left before sending 4 bytes."""
    buf = b""
    while len(buf) < 4:
        data = await stream.receive_some(RECEIVE_SIZE)
        if not data:
            return None
        buf += data
    return buf[:4], buf[4:]


async def serve_lookup_connection(
    stream: trio.abc.Stream,
    db: RegistrationDB,
    server: ServerInfo,
    *,
    remote_address: str,
    clock: Callable[[], float] = time.time,
) -> None:
    """Serve one nsqd until it disconnects or errs; always removes its registrations."""
    log = get_logger(client=remote_address)
    log.info("TCP: new client")
    protocol: LookupProtocolV1 | None = None
    try:
        got = await _read_magic(stream)
        if got is None:
            log.info("TCP: client left before sending the protocol magic")
            return
        magic, rest = got
        if magic != MAGIC_V1:
            log.error("bad protocol magic", magic=repr(magic))
            with trio.move_on_after(SEND_TIMEOUT):
                await stream.send_all(encode_v1_response(b"E_BAD_PROTOCOL"))
            return
        protocol = LookupProtocolV1(db, server, remote_address=remote_address)
        data = rest
        while True:
            reply = protocol.receive_data(data, clock())
            if reply:
                with trio.fail_after(SEND_TIMEOUT):
                    await stream.send_all(reply)
            if protocol.closed:
                return
            data = await stream.receive_some(RECEIVE_SIZE)
            if not data:
                return
    except _STREAM_ERRORS as exc:
        log.info("TCP: connection error", error=repr(exc))
    finally:
        if protocol is not None:
            protocol.connection_lost()
        log.info("CLIENT: closing")
        with trio.CancelScope(shield=True):
            with trio.move_on_after(1):
                await stream.aclose()


async def serve_tcp(
    listener: trio.SocketListener,
    db: RegistrationDB,
    server: ServerInfo,
    *,
    clock: Callable[[], float] = time.time,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept nsqd connections until cancelled, each in its own task."""
    log = get_logger()

    async def handle(stream: trio.SocketStream) -> None:
        remote = peer_address(stream)
        try:
            await serve_lookup_connection(stream, db, server, remote_address=remote, clock=clock)
        except Exception:
            # a bug met by one connection must not take the daemon down
            log.exception("TCP: connection failed", remote_address=remote)

    await serve_listener(handle, listener, name="TCP", log=log, task_status=task_status)
