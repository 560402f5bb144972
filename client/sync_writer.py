"""A blocking, thread-safe publisher for plain synchronous code (Flask,
Django, scripts, cron jobs): no event loop, no thread of its own.

    writer = SyncWriter(["127.0.0.1:4150", "127.0.0.1:4250"])
    writer.pub("events", b"hello")        # returns once nsqd said OK
    writer.close()

It speaks through the same sans-IO pieces as the async :class:`Writer`
(:class:`~pynsqd.client.conn.Handshake`, :class:`~pynsqd.client.conn.ConnProtocol`,
the ``pynsqd.protocol`` codec) over plain sockets.  Connections are opened
on first use and kept.  Any number of threads share a connection: each
sends its command under a send lock and queues a waiter; nsqd answers in
order, so whichever waiting thread is free reads the answers and hands
them out (no reader thread).  Errors, failover and timeouts are the
Writer's: an error frame for a bad message raises :class:`NSQError` at
once; a lost connection or ``E_PUB_FAILED`` retries on another nsqd (or the
same one, redialled with exponential backoff) until ``publish_timeout``,
then :class:`PublishError` names the last error.  Heartbeats are turned off
(IDENTIFY ``heartbeat_interval: -1``): nobody would answer them between
publishes, and nsqd has no read deadline without them.  In a child process
(a pre-forking server such as gunicorn) it dials its own connections.
"""

from __future__ import annotations

import contextlib
import os
import random
import select
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Iterable, Sequence
from types import TracebackType
from typing import Any

import attrs

from pynsqd.protocol import encode_command, encode_mpub_body

from .conn import (
    CONNECT_ERRORS,
    ConnectionOptions,
    ConnProtocol,
    ErrorReceived,
    Handshake,
    Response,
    Upgrade,
    check_addresses,
    split_address,
    split_options,
)
from .errors import ConnectionClosed, NotRunningError, NSQError, describe
from .log import Prefixed, get_logger
from .writer import RETRYABLE_CODES, WriterConfig, check_bodies, check_topic, publish_error

RECEIVE_SIZE = 65536


class _CodecSocket:
    """A blocking socket seen through a snappy/deflate codec (``pynsqd.streams``)."""

    def __init__(self, sock: Any, encoder: Any, decoder: Any) -> None:
        self.sock = sock
        self.encoder = encoder
        self.decoder = decoder
        self._ready = b""

    def sendall(self, data: bytes) -> None:
        out = self.encoder.encode(data)
        if out:
            self.sock.sendall(out)

    def buffered(self) -> bool:
        if not self._ready:
            self._ready = self.decoder.read(RECEIVE_SIZE)
        return bool(self._ready) or _buffered(self.sock)

    def recv(self, n: int) -> bytes:
        while True:
            if self._ready:
                out, self._ready = self._ready[:n], self._ready[n:]
                return bytes(out)
            self._ready = self.decoder.read(RECEIVE_SIZE)
            if self._ready:
                continue
            raw = self.sock.recv(RECEIVE_SIZE)
            if not raw:
                return b""
            self.decoder.feed(raw)

    def fileno(self) -> int:
        return int(self.sock.fileno())

    def shutdown(self, how: int) -> None:
        self.sock.shutdown(how)

    def close(self) -> None:
        self.sock.close()


def _buffered(sock: Any) -> bool:
    """Decoded bytes already waiting above the kernel socket (TLS, codec)."""
    if isinstance(sock, ssl.SSLSocket):
        return sock.pending() > 0
    if isinstance(sock, _CodecSocket):
        return sock.buffered()
    return False


def _readable(sock: Any, timeout: float) -> bool:
    """Data (or EOF) waiting on the socket within ``timeout`` (poll: no
    FD_SETSIZE limit in applications with many open files)."""
    if _buffered(sock):
        return True
    if hasattr(select, "poll"):
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLIN)
        return bool(poller.poll(max(0.0, timeout) * 1000))
    readable, _, _ = select.select([sock], [], [], max(0.0, timeout))
    return bool(readable)


def _upgrade(kind: str, sock: Any, handshake: Handshake, options: ConnectionOptions, host: str) -> Any:
    if kind == "tls":
        context, server_name = options.tls_settings(host)
        return context.wrap_socket(sock, server_hostname=server_name)
    from pynsqd.streams import DeflateDecoder, DeflateEncoder, SnappyDecoder, SnappyEncoder

    if kind == "snappy":
        return _CodecSocket(sock, SnappyEncoder(), SnappyDecoder())
    assert handshake.identify is not None
    return _CodecSocket(sock, DeflateEncoder(handshake.identify.deflate_level or options.deflate_level), DeflateDecoder())


def _recv_exactly(sock: Any, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionClosed("nsqd closed the connection during the handshake")
        buf += chunk
    return bytes(buf)


class _Waiter:
    __slots__ = ("done", "error")

    def __init__(self) -> None:
        self.done = False
        self.error: BaseException | None = None


class _SyncConn:
    """One connection shared by every publishing thread."""

    def __init__(self, address: str, sock: Any, log: Prefixed) -> None:
        self.address = address
        self.sock = sock
        self.log = log
        self.proto = ConnProtocol()
        # TLS objects must not be read and written by two threads at once
        self._send_lock = threading.RLock()
        self._read_lock: Any = self._send_lock if isinstance(sock, ssl.SSLSocket) or isinstance(getattr(sock, "sock", None), ssl.SSLSocket) else contextlib.nullcontext()
        self._cond = threading.Condition()
        self._pending: deque[_Waiter] = deque()
        self._reading = False
        self.broken: BaseException | None = None

    @classmethod
    def open(cls, address: str, options: ConnectionOptions, log: Prefixed) -> _SyncConn:
        host, port = split_address(address)
        sock: Any = socket.create_connection((host, port), timeout=options.dial_timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(options.dial_timeout + options.write_timeout)
            handshake = Handshake(options)
            sock.sendall(handshake.start())
            while not handshake.done:
                size, frame_type = Handshake.frame_body_size(_recv_exactly(sock, 8))
                for action in handshake.receive_frame(frame_type, _recv_exactly(sock, size)):
                    if isinstance(action, Upgrade):
                        sock = _upgrade(action.kind, sock, handshake, options, host)
                    else:
                        sock.sendall(action)
            sock.settimeout(options.write_timeout)
        except BaseException:
            sock.close()
            raise
        return cls(address, sock, log)

    @property
    def usable(self) -> bool:
        return self.broken is None

    def request(self, data: bytes, deadline: float) -> None:
        """Send one publish and wait for its answer; raises NSQError for an
        error frame, ConnectionClosed or TimeoutError."""
        waiter = _Waiter()
        with self._send_lock:
            with self._cond:
                if self.broken is not None:
                    raise ConnectionClosed(f"connection to {self.address} lost: {describe(self.broken)}")
                idle = not self._pending
                self._pending.append(waiter)
            try:
                if idle and self._closed_meanwhile():
                    raise ConnectionClosed(f"{self.address} closed the idle connection")
                self.sock.sendall(data)
            except (OSError, ConnectionClosed) as exc:
                self._break(exc)
        self._wait(waiter, deadline)
        if waiter.error is not None:
            raise waiter.error

    def _closed_meanwhile(self) -> bool:
        """An idle connection with something to read has been closed by
        nsqd (a restart): find out before sending, not after."""
        return _readable(self.sock, 0)

    def _wait(self, waiter: _Waiter, deadline: float) -> None:
        with self._cond:
            while not waiter.done:
                if not self._reading:
                    self._reading = True
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no answer from nsqd {self.address} in time")
                self._cond.wait(remaining)
            else:
                return
        try:
            with self._read_lock:
                self._read_until(waiter, deadline)
        finally:
            with self._cond:
                self._reading = False
                self._cond.notify_all()

    def _read_until(self, waiter: _Waiter, deadline: float) -> None:
        """The reading thread hands out answers in order until its own came."""
        while not waiter.done:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no answer from nsqd {self.address} in time")
            try:
                if not _readable(self.sock, remaining):
                    continue
                data = self.sock.recv(RECEIVE_SIZE)
            except OSError as exc:
                self._break(exc)
                return
            if not data:
                self._break(ConnectionClosed(f"{self.address} closed the connection"))
                return
            try:
                events = self.proto.receive_data(data)
            except ValueError as exc:
                self._break(ConnectionClosed(f"bad data from {self.address}: {exc}"))
                return
            with self._cond:
                for event in events:
                    if isinstance(event, Response) and self._pending:
                        self._resolve(None)
                    elif isinstance(event, ErrorReceived) and self._pending:
                        if event.error.fatal:  # nsqd closes the connection after it
                            self.broken = event.error
                        self._resolve(event.error)
                self._cond.notify_all()
            if self.proto.has_data:  # a heartbeat after all: answer it
                with self._send_lock:
                    self.sock.sendall(self.proto.data_to_send())

    def _resolve(self, error: BaseException | None) -> None:
        waiter = self._pending.popleft()
        waiter.error = error
        waiter.done = True

    def _break(self, exc: BaseException, *, closing: bool = False) -> None:
        with self._cond:
            if self.broken is None:
                self.broken = exc
                if closing:
                    self.log.debug("closed")
                else:
                    self.log.warning("connection lost: %s", describe(exc))
            while self._pending:
                self._resolve(ConnectionClosed(f"connection to {self.address} lost: {describe(exc)}"))
            self._cond.notify_all()
        with contextlib.suppress(OSError):
            self.sock.close()

    def close(self, timeout: float) -> None:
        """Let unanswered publishes finish (up to ``timeout``), then close."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._pending and self.broken is None and (remaining := deadline - time.monotonic()) > 0:
                self._cond.wait(remaining)
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self._break(ConnectionClosed("writer closed"), closing=True)


@attrs.define
class _Target:
    """One nsqd address: its connection, or when to dial it again."""

    address: str
    delay: float
    conn: _SyncConn | None = None
    retry_at: float = 0.0
    dialling: threading.Lock = attrs.field(factory=threading.Lock)


class SyncWriter:
    """Publish from plain synchronous code, from any number of threads.

    Takes the :class:`Writer`'s arguments: ``nsqd_tcp_addresses`` and
    :class:`WriterConfig` / :class:`ConnectionOptions` keywords (TLS,
    snappy, deflate and AUTH included).  Use it as a context manager or
    call :meth:`close`; one instance per process is the intended use (it is
    cheap to keep and safe to share).
    """

    def __init__(self, nsqd_tcp_addresses: Iterable[str], *, rng: random.Random | None = None, **options: Any) -> None:
        if isinstance(nsqd_tcp_addresses, str):
            raise TypeError("nsqd_tcp_addresses must be a list of strings")
        self.addresses = check_addresses(nsqd_tcp_addresses)
        if not self.addresses:
            raise ValueError("give at least one nsqd address")
        own, self.conn_options = split_options(options, WriterConfig, "SyncWriter")
        self.config = WriterConfig(**own)
        self.conn_options.heartbeat_interval = 0  # see the module docstring
        self.rng = rng or random.Random()
        self.log = get_logger(__name__, "sync writer")
        self._targets = [_Target(a, self.config.reconnect_interval) for a in self.addresses]
        self._lock = threading.Lock()
        self._rr = 0
        self._closed = False
        self._pid = os.getpid()
        self.connect_errors: dict[str, BaseException] = {}

    # ------------------------------------------------------------ publishing

    def pub(self, topic: str, body: bytes) -> None:
        """Publish one message; returns once nsqd has it."""
        check_topic(topic)
        self._publish(encode_command(b"PUB", topic, body=body))

    def mpub(self, topic: str, bodies: Sequence[bytes]) -> None:
        """Publish several messages at once (atomically, on one nsqd)."""
        check_topic(topic)
        self._publish(encode_command(b"MPUB", topic, body=encode_mpub_body(check_bodies(bodies))))

    def dpub(self, topic: str, delay: float, body: bytes) -> None:
        """Publish ``body``, delivered after ``delay`` seconds."""
        check_topic(topic)
        self._publish(encode_command(b"DPUB", topic, str(int(delay * 1000)), body=body))

    @property
    def connected(self) -> list[str]:
        """Addresses with an open connection."""
        return [t.address for t in self._targets if t.conn is not None and t.conn.usable]

    def close(self, timeout: float = 5.0) -> None:
        """Close every connection (publishes in flight get ``timeout`` to finish)."""
        self._closed = True
        for target in self._targets:
            conn, target.conn = target.conn, None
            if conn is not None:
                conn.close(timeout)

    def __enter__(self) -> SyncWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    # ------------------------------------------------------------ internals

    def _publish(self, data: bytes) -> None:
        if self._closed:
            raise NotRunningError("the SyncWriter is closed")
        deadline = time.monotonic() + self.config.publish_timeout
        last: BaseException | None = None
        while time.monotonic() < deadline:
            conn = self._connection(deadline)
            if conn is None:
                continue
            try:
                conn.request(data, deadline)
                return
            except NSQError as exc:
                if exc.code not in RETRYABLE_CODES:
                    raise
                last = exc
            except (ConnectionClosed, TimeoutError) as exc:
                last = exc
            if self._closed:
                raise NotRunningError("the SyncWriter is closed")
            self.log.warning("publish to nsqd %s failed, trying again: %s", conn.address, describe(last))
        raise publish_error(self.config.publish_timeout, last, self.connect_errors)

    def _connection(self, deadline: float) -> _SyncConn | None:
        """A live connection, round robin; a down nsqd whose backoff is over
        is dialled first (by one thread; the others use a live connection
        meanwhile, or wait for that dial when there is none).  None, after
        waiting for the next redial, when there is nothing to use yet."""
        if self._pid != os.getpid():
            self._forked()
        with self._lock:
            self._rr += 1
            start = self._rr % len(self._targets)
        order = self._targets[start:] + self._targets[:start]
        live = [t.conn for t in order if t.conn is not None and t.conn.usable]
        now = time.monotonic()
        for target in order:
            if (target.conn is None or not target.conn.usable) and now >= target.retry_at:
                conn = self._dial(target, deadline, wait=not live)
                if conn is not None:
                    return conn
        if live:
            return live[0]
        # all down: wait for the first redial (never past the deadline)
        next_try = min(t.retry_at for t in self._targets)
        time.sleep(max(0.0, min(next_try, deadline) - time.monotonic()))
        return None

    def _forked(self) -> None:
        """In a child process (a pre-forking server imported us first): the
        connections belong to the parent; leave them to it and dial anew."""
        with self._lock:
            if self._pid == os.getpid():
                return
            self._pid = os.getpid()
            self._targets = [_Target(a, self.config.reconnect_interval) for a in self.addresses]

    def _dial(self, target: _Target, deadline: float, *, wait: bool) -> _SyncConn | None:
        if wait:
            acquired = target.dialling.acquire(timeout=max(0.0, deadline - time.monotonic()))
        else:
            acquired = target.dialling.acquire(blocking=False)
        if not acquired:
            return None
        try:
            if target.conn is not None and target.conn.usable:
                return target.conn  # dialled by the thread we waited for
            if time.monotonic() < target.retry_at:
                return None  # that thread failed just now
            log = self.log.child(f"nsqd {target.address}")
            try:
                conn = _SyncConn.open(target.address, self.conn_options, log)
            except CONNECT_ERRORS as exc:
                self.connect_errors[target.address] = exc
                target.retry_at = time.monotonic() + target.delay * (0.5 + self.rng.random() / 2)
                target.delay = min(target.delay * 2, self.config.max_reconnect_interval)
                log.warning("cannot connect: %s", describe(exc))
                return None
            if self._closed:
                conn.close(0)
                raise NotRunningError("the SyncWriter is closed")
            log.info("connected")
            self.connect_errors.pop(target.address, None)
            target.delay = self.config.reconnect_interval
            target.conn = conn
            return conn
        finally:
            target.dialling.release()
