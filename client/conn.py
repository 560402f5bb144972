"""One client connection to nsqd: sans-IO protocol objects and their anyio edge.

:class:`Handshake` and :class:`ConnProtocol` take and return bytes and never
touch a socket, so the async :class:`Connection` (trio or asyncio, through
anyio) and the blocking :class:`~pynsqd.client.SyncWriter` drive the same
code.  :class:`ConnProtocol` turns received bytes into events and queued
commands into bytes (answering heartbeats on its own); commands queued
between two writes go out in one ``send``, so a burst of FINs costs one
system call.

The handshake is ``"  V2"`` + IDENTIFY (with feature negotiation), then, for
each feature nsqd agreed to (TLS, snappy, deflate), the stream is wrapped by
an *upgrader* and nsqd's ``OK`` is read through the new layer, then AUTH if
nsqd asks for it.  Handshake frames are read with exact sizes so no byte of
a wrapped layer is ever consumed by the plain one.
"""

from __future__ import annotations

import json
import math
import socket
import ssl
import struct
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import anyio
import anyio.abc
import attrs

from pynsqd.protocol import (
    CLOSE_WAIT,
    FRAME_TYPE_ERROR,
    FRAME_TYPE_MESSAGE,
    FRAME_TYPE_RESPONSE,
    HEARTBEAT,
    MAGIC_V2,
    OK,
    Frame,
    FrameDecoder,
    ProtocolError,
    decode_message,
    encode_command,
    encode_mpub_body,
)

from . import __version__
from .errors import ConnectionClosed, HandshakeError, NSQError, describe
from .log import Prefixed, get_logger

USER_AGENT = f"pynsqd-client/{__version__}"
MAX_HANDSHAKE_FRAME = 16 * 1024 * 1024
_FRAME_HEADER = struct.Struct(">ii")


# ================================================================ sans-IO


@attrs.frozen
class IdentifyResponse:
    """nsqd's answer to IDENTIFY (defaults when it answered a bare OK)."""

    max_rdy_count: int = 2500
    version: str = ""
    max_msg_timeout: int = 0  # ms
    msg_timeout: int = 0  # ms
    tls_v1: bool = False
    snappy: bool = False
    deflate: bool = False
    deflate_level: int = 0
    auth_required: bool = False
    sample_rate: int = 0
    output_buffer_size: int = 0
    output_buffer_timeout: int = 0
    raw: dict[str, Any] = attrs.field(factory=dict, eq=False, repr=False)

    @property
    def upgrades(self) -> tuple[str, ...]:
        """Stream layers to add, in nsqd's order: TLS first, then compression."""
        return tuple(k for k, on in (("tls", self.tls_v1), ("snappy", self.snappy), ("deflate", self.deflate)) if on)


def parse_identify_response(data: bytes) -> IdentifyResponse:
    if data == OK:
        return IdentifyResponse()
    try:
        raw = json.loads(data)
    except ValueError:
        raise HandshakeError(f"unexpected IDENTIFY response {data[:100]!r}") from None
    if not isinstance(raw, dict):
        raise HandshakeError(f"unexpected IDENTIFY response {data[:100]!r}")
    fields = {a.name for a in attrs.fields(IdentifyResponse)} - {"raw"}
    known = {k: v for k, v in raw.items() if k in fields}
    return IdentifyResponse(**known, raw=raw)


@attrs.frozen
class Upgrade:
    """Handshake action: wrap the stream in this layer (``tls``, ``snappy``,
    ``deflate``), then read nsqd's ``OK`` through it."""

    kind: str


class Handshake:
    """The client's side of the handshake.

    The edge sends :meth:`start`, then reads frames one at a time (exact
    sizes: :meth:`frame_body_size` on the 8-byte header) and hands each to
    :meth:`receive_frame`, carrying out what it returns -- bytes to send or
    an :class:`Upgrade` -- until :attr:`done`.  Error frames raise
    :class:`NSQError`; anything unexpected :class:`HandshakeError`.
    """

    def __init__(self, options: ConnectionOptions) -> None:
        self.options = options
        self.identify: IdentifyResponse | None = None
        self.auth: dict[str, Any] | None = None
        self.done = False
        self._expect = "identify"
        self._upgrades: list[str] = []

    def start(self) -> bytes:
        return MAGIC_V2 + encode_command(b"IDENTIFY", body=json.dumps(self.options.identify_body()).encode())

    @staticmethod
    def frame_body_size(header: bytes) -> tuple[int, int]:
        """(bytes that follow the header, frame type)."""
        size, frame_type = _FRAME_HEADER.unpack(header)
        if size < 4 or size > MAX_HANDSHAKE_FRAME:
            raise HandshakeError(f"bad frame size {size}")
        return size - 4, frame_type

    def receive_frame(self, frame_type: int, data: bytes) -> list[bytes | Upgrade]:
        if frame_type == FRAME_TYPE_ERROR:
            raise NSQError.from_frame(data)
        if frame_type != FRAME_TYPE_RESPONSE:
            raise HandshakeError(f"unexpected frame type {frame_type} during the handshake")
        if data == HEARTBEAT:
            return [encode_command(b"NOP")]
        if self._expect == "identify":
            self.identify = parse_identify_response(data)
            self._upgrades = list(self.identify.upgrades)
        elif self._expect.startswith("upgrade "):
            if data != OK:
                raise HandshakeError(f"{self._expect[8:]} upgrade: nsqd answered {data[:100]!r}")
        elif self._expect == "auth":
            try:
                self.auth = json.loads(data)
            except ValueError:
                raise HandshakeError(f"unexpected AUTH response {data[:100]!r}") from None
            self.done = True
            return []
        return self._next()

    def _next(self) -> list[bytes | Upgrade]:
        assert self.identify is not None
        if self._upgrades:
            kind = self._upgrades.pop(0)
            self._expect = f"upgrade {kind}"
            return [Upgrade(kind)]
        if self.identify.auth_required:
            if not self.options.auth_secret:
                raise HandshakeError("nsqd requires AUTH and no auth_secret is set")
            self._expect = "auth"
            return [encode_command(b"AUTH", body=self.options.auth_secret.encode())]
        self.done = True
        return []


@attrs.frozen
class Response:
    data: bytes


@attrs.frozen
class ErrorReceived:
    error: NSQError


@attrs.frozen
class MessageReceived:
    timestamp: int
    attempts: int
    id: bytes
    body: bytes


@attrs.frozen
class Heartbeat:
    pass


@attrs.frozen
class CloseWait:
    pass


Event = Response | ErrorReceived | MessageReceived | Heartbeat | CloseWait


class ConnProtocol:
    """Client side of protocol V2 once the handshake is done."""

    def __init__(self, max_frame_size: int = 64 * 1024 * 1024) -> None:
        self._decoder = FrameDecoder(max_frame_size)
        self._out = bytearray()
        self.closing = False  # CLS sent
        self.close_wait = False  # CLOSE_WAIT received

    # ------------------------------------------------------------ input

    def receive_data(self, data: bytes) -> list[Event]:
        """Feed bytes from nsqd; returns the events (raises ProtocolError on
        a malformed frame)."""
        out: list[Event] = []
        for frame in self._decoder.frames(data):
            out.append(self._event(frame))
        return out

    def _event(self, frame: Frame) -> Event:
        if frame.frame_type == FRAME_TYPE_MESSAGE:
            timestamp, attempts, msg_id, body = decode_message(frame.data)
            return MessageReceived(timestamp, attempts, msg_id, body)
        if frame.frame_type == FRAME_TYPE_RESPONSE:
            if frame.data == HEARTBEAT:
                self.nop()  # nsqd drops us after two unanswered heartbeats
                return Heartbeat()
            if frame.data == CLOSE_WAIT:
                self.close_wait = True
                return CloseWait()
            return Response(frame.data)
        if frame.frame_type == FRAME_TYPE_ERROR:
            return ErrorReceived(NSQError.from_frame(frame.data))
        raise HandshakeError(f"unknown frame type {frame.frame_type}")

    # ------------------------------------------------------------ output

    def data_to_send(self) -> bytes:
        data = bytes(self._out)
        self._out.clear()
        return data

    @property
    def has_data(self) -> bool:
        return bool(self._out)

    def command(self, name: bytes, *params: bytes | str, body: bytes | None = None) -> None:
        self._out += encode_command(name, *params, body=body)

    def nop(self) -> None:
        self.command(b"NOP")

    def rdy(self, count: int) -> None:
        self.command(b"RDY", str(count))

    def fin(self, msg_id: bytes) -> None:
        self.command(b"FIN", msg_id)

    def req(self, msg_id: bytes, delay: float) -> None:
        self.command(b"REQ", msg_id, str(max(0, int(delay * 1000))))

    def touch(self, msg_id: bytes) -> None:
        self.command(b"TOUCH", msg_id)

    def cls(self) -> None:
        self.closing = True
        self.command(b"CLS")

    def pub(self, topic: str, body: bytes) -> None:
        self.command(b"PUB", topic, body=body)

    def mpub(self, topic: str, bodies: list[bytes]) -> None:
        self.command(b"MPUB", topic, body=encode_mpub_body(bodies))

    def dpub(self, topic: str, delay: float, body: bytes) -> None:
        self.command(b"DPUB", topic, str(int(delay * 1000)), body=body)


# ================================================================ options


@attrs.define
class ConnectionOptions:
    """What a connection tells nsqd in IDENTIFY, and its timeouts.

    ``None`` leaves a setting to nsqd's default.  Durations in seconds.
    """

    client_id: str = attrs.field(factory=lambda: socket.gethostname().split(".")[0])
    hostname: str = attrs.field(factory=socket.gethostname)
    user_agent: str = USER_AGENT
    heartbeat_interval: float = 30.0  # <= 0 disables heartbeats (no SUB then)
    output_buffer_size: int | None = None  # bytes; -1 disables buffering
    output_buffer_timeout: float | None = None  # -1 disables the timeout
    msg_timeout: float | None = None
    sample_rate: int = 0  # 1..99: nsqd sends only that % of messages
    tls_v1: bool = False
    tls_context: ssl.SSLContext | None = None
    tls_server_hostname: str | None = None
    snappy: bool = False
    deflate: bool = False
    deflate_level: int = 6
    auth_secret: str | None = None
    dial_timeout: float = 5.0
    write_timeout: float = 10.0
    read_timeout: float | None = None  # default: twice the heartbeat interval

    def identify_body(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "client_id": self.client_id,
            "hostname": self.hostname,
            "user_agent": self.user_agent,
            "feature_negotiation": True,
            "heartbeat_interval": -1 if self.heartbeat_interval <= 0 else int(self.heartbeat_interval * 1000),
            "tls_v1": self.tls_v1,
            "snappy": self.snappy,
            "deflate": self.deflate,
            "deflate_level": self.deflate_level,
            "sample_rate": self.sample_rate,
        }
        if self.output_buffer_size is not None:
            body["output_buffer_size"] = self.output_buffer_size
        if self.output_buffer_timeout is not None:
            t = self.output_buffer_timeout
            body["output_buffer_timeout"] = -1 if t < 0 else int(t * 1000)
        if self.msg_timeout is not None:
            body["msg_timeout"] = int(self.msg_timeout * 1000)
        return body

    def effective_read_timeout(self) -> float:
        if self.read_timeout is not None:
            return self.read_timeout
        return 2 * self.heartbeat_interval if self.heartbeat_interval > 0 else 60.0

    def tls_settings(self, host: str) -> tuple[ssl.SSLContext, str]:
        """(context, server name) for the TLS upgrade: the system's trust
        store and the dialled host unless given."""
        return self.tls_context or ssl.create_default_context(), self.tls_server_hostname or host


def split_options(options: dict[str, Any], own: type, owner: str) -> tuple[dict[str, Any], ConnectionOptions]:
    """Keywords for ``own`` (an attrs class) and the ConnectionOptions; an
    unknown keyword is a TypeError naming it."""
    own_names = {a.name for a in attrs.fields(own)}
    conn_names = {a.name for a in attrs.fields(ConnectionOptions)}
    unknown = set(options) - own_names - conn_names
    if unknown:
        raise TypeError(f"unknown {owner} option{'s' if len(unknown) > 1 else ''} {', '.join(sorted(unknown))}")
    conn = ConnectionOptions(**{k: v for k, v in options.items() if k in conn_names})
    return {k: v for k, v in options.items() if k in own_names}, conn


def split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"bad address {address!r}: want host:port")
    return host.strip("[]") or "127.0.0.1", int(port)


def check_addresses(addresses: Iterable[str]) -> list[str]:
    """``host:port`` addresses, refused when a Reader or Writer is built
    (not later, as a failure of the task that would dial them)."""
    out = list(addresses)
    for address in out:
        split_address(address)
    return out


# ================================================================ async edge

ByteStream = anyio.abc.ByteStream
OpenStream = Callable[[str, int], Awaitable[ByteStream]]
# (layer, stream, what nsqd agreed to, our options, host) -> the wrapped stream
Upgrader = Callable[[str, ByteStream, IdentifyResponse, ConnectionOptions, str], Awaitable[ByteStream]]
# errors that mean "this connection is gone", whatever the backend
STREAM_ERRORS = (anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream, OSError)
CONNECT_ERRORS = (*STREAM_ERRORS, HandshakeError, NSQError, ConnectionClosed)


async def open_tcp(host: str, port: int) -> ByteStream:
    return await anyio.connect_tcp(host, port)


class CompressedByteStream(anyio.abc.ByteStream):
    """An anyio byte stream through one of the codecs nsqd itself uses
    (``pynsqd.streams``): one implementation of snappy/deflate for both ends."""

    def __init__(self, inner: ByteStream, encoder: Any, decoder: Any) -> None:
        self.inner = inner
        self.encoder = encoder
        self.decoder = decoder

    async def receive(self, max_bytes: int = 65536) -> bytes:
        from pynsqd.streams import CorruptStream

        while True:
            try:
                data: bytes = self.decoder.read(max_bytes)
            except CorruptStream as exc:
                raise anyio.BrokenResourceError(str(exc)) from exc
            if data:
                return data
            if self.decoder.finished:
                raise anyio.EndOfStream
            self.decoder.feed(await self.inner.receive())

    async def send(self, item: bytes) -> None:
        out = self.encoder.encode(bytes(item))
        if out:
            await self.inner.send(out)

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    async def aclose(self) -> None:
        await self.inner.aclose()


async def upgrade_stream(kind: str, stream: ByteStream, identify: IdentifyResponse, options: ConnectionOptions, host: str) -> ByteStream:
    """The built-in layers."""
    if kind == "tls":
        from anyio.streams.tls import TLSStream

        context, server_name = options.tls_settings(host)
        # nsqd closes without a TLS close_notify, as Go's net/http does
        return await TLSStream.wrap(stream, hostname=server_name, ssl_context=context, standard_compatible=False)
    if kind in ("snappy", "deflate"):
        from pynsqd.streams import DeflateDecoder, DeflateEncoder, SnappyDecoder, SnappyEncoder

        if kind == "snappy":
            return CompressedByteStream(stream, SnappyEncoder(), SnappyDecoder())
        return CompressedByteStream(stream, DeflateEncoder(identify.deflate_level or options.deflate_level), DeflateDecoder())
    raise HandshakeError(f"no upgrader for {kind}")


EventHandler = Callable[["Connection", list[Event]], None]


class Connection:
    """A connection to one nsqd: :meth:`connect`, then :meth:`serve` until
    it ends (EOF, error, read timeout or :meth:`close`).

    Producers and consumers queue commands through :attr:`proto` and call
    :meth:`wake`; a single writer task sends whatever has accumulated.
    Everything here runs on the event loop of the caller (trio or asyncio).
    """

    def __init__(
        self,
        address: str,
        options: ConnectionOptions | None = None,
        *,
        open_stream: OpenStream = open_tcp,
        upgrader: Upgrader = upgrade_stream,
        log: Prefixed | None = None,
    ) -> None:
        self.address = address
        self.host, self.port = split_address(address)
        self.options = options or ConnectionOptions()
        self.proto = ConnProtocol()
        self.identify: IdentifyResponse | None = None
        self.auth: dict[str, Any] | None = None
        self._open_stream = open_stream
        self._upgrader = upgrader
        self._stream: ByteStream | None = None
        self._wakeup = anyio.Event()
        self._close_requested = False
        self._cancel: anyio.CancelScope | None = None
        self.closed = False
        self.log = log or get_logger(__name__, f"nsqd {address}")

    def __repr__(self) -> str:
        return f"<Connection {self.address}>"

    # ------------------------------------------------------------ handshake

    async def connect(self) -> IdentifyResponse:
        """Dial, IDENTIFY, add the negotiated layers, AUTH.  Raises OSError
        (TimeoutError for the dial timeout), HandshakeError, NSQError or
        ConnectionClosed."""
        with anyio.fail_after(self.options.dial_timeout):
            stream = await self._open_stream(self.host, self.port)
        self._stream = stream
        handshake = Handshake(self.options)
        try:
            with anyio.fail_after(self.options.dial_timeout + self.options.write_timeout):
                await stream.send(handshake.start())
                while not handshake.done:
                    frame_type, data = await self._read_frame()
                    for action in handshake.receive_frame(frame_type, data):
                        if isinstance(action, Upgrade):
                            assert handshake.identify is not None
                            self._stream = await self._upgrader(action.kind, self._stream, handshake.identify, self.options, self.host)
                        else:
                            await self._stream.send(action)
        except BaseException:
            await self._abandon()
            raise
        assert handshake.identify is not None
        self.identify = handshake.identify
        self.auth = handshake.auth
        return handshake.identify

    async def subscribe(self, topic: str, channel: str) -> None:
        assert self._stream is not None
        try:
            with anyio.fail_after(self.options.dial_timeout + self.options.write_timeout):
                await self._stream.send(encode_command(b"SUB", topic, channel))
                while True:
                    frame_type, data = await self._read_frame()
                    if frame_type == FRAME_TYPE_RESPONSE and data == HEARTBEAT:
                        await self._stream.send(encode_command(b"NOP"))
                        continue
                    break
            if frame_type != FRAME_TYPE_RESPONSE or data != OK:
                raise HandshakeError(f"SUB {topic} {channel}: {data[:200].decode(errors='replace')}")
        except BaseException:
            await self._abandon()
            raise

    async def _abandon(self) -> None:
        self.closed = True
        if self._stream is not None:
            await anyio.aclose_forcefully(self._stream)

    async def _read_exactly(self, n: int) -> bytes:
        assert self._stream is not None
        buf = bytearray()
        while len(buf) < n:
            try:
                buf += await self._stream.receive(n - len(buf))
            except anyio.EndOfStream:
                raise ConnectionClosed(f"{self.address} closed the connection during the handshake") from None
        return bytes(buf)

    async def _read_frame(self) -> tuple[int, bytes]:
        size, frame_type = Handshake.frame_body_size(await self._read_exactly(8))
        return frame_type, await self._read_exactly(size)

    # ------------------------------------------------------------ running

    def wake(self) -> None:
        """Commands were queued: let the writer send them."""
        self._wakeup.set()

    def close(self) -> None:
        """Send what is queued, then close."""
        self._close_requested = True
        self._wakeup.set()

    def abort(self) -> None:
        """Close now, dropping anything unsent."""
        if self._cancel is not None:
            self._cancel.cancel()
        self._close_requested = True

    async def serve(self, on_events: EventHandler) -> None:
        """Run until the connection ends; the stream is closed on return.

        ``on_events`` is called synchronously for every batch of events; it
        may queue commands and call :meth:`wake`.  Returns on EOF, I/O error,
        read timeout (all logged) or after :meth:`close`.
        """
        assert self._stream is not None, "connect() first"
        stream = self._stream
        try:
            if self._close_requested:
                return
            async with anyio.create_task_group() as tg:
                self._cancel = tg.cancel_scope
                tg.start_soon(self._write_loop, stream, tg.cancel_scope)
                await self._read_loop(stream, on_events)
                tg.cancel_scope.cancel()
        finally:
            self.closed = True
            await anyio.aclose_forcefully(stream)

    async def _read_loop(self, stream: ByteStream, on_events: EventHandler) -> None:
        timeout = self.options.effective_read_timeout()
        proto = self.proto
        # one scope for the connection's life, its deadline moved on at every
        # read: a scope per read costs more than the read on a busy connection
        with anyio.CancelScope() as deadline:
            while True:
                deadline.deadline = anyio.current_time() + timeout
                try:
                    data = await stream.receive(65536)
                except anyio.EndOfStream:
                    if not self._close_requested:
                        self.log.info("nsqd closed the connection")
                    return
                except STREAM_ERRORS as exc:
                    self.log.warning("connection lost: %s", describe(exc))
                    return
                try:
                    events = proto.receive_data(data)
                except (ProtocolError, ValueError, HandshakeError) as exc:
                    self.log.error("bad data from nsqd, closing: %s", exc)
                    return
                if events:
                    on_events(self, events)
                if proto.has_data:
                    self._wakeup.set()
        if deadline.cancelled_caught:
            self.log.warning("read timeout: no data from nsqd for %ss", timeout)

    async def _write_loop(self, stream: ByteStream, scope: anyio.CancelScope) -> None:
        proto = self.proto
        with anyio.CancelScope() as deadline:
            while True:
                await self._wakeup.wait()
                self._wakeup = anyio.Event()
                data = proto.data_to_send()
                if data:
                    deadline.deadline = anyio.current_time() + self.options.write_timeout
                    try:
                        await stream.send(data)
                    except STREAM_ERRORS as exc:
                        self.log.warning("write failed: %s", describe(exc))
                        break
                    deadline.deadline = math.inf
                if self._close_requested and not proto.has_data:
                    break
        if deadline.cancelled_caught:
            self.log.warning("write timeout: nsqd took no data for %ss", self.options.write_timeout)
        scope.cancel()
