"""One client connection to nsqd: a sans-IO protocol object and its trio edge.

:class:`ConnProtocol` turns received bytes into events and queued commands
into bytes (answering heartbeats on its own); it never touches a socket.
:class:`Connection` moves those bytes over a trio stream.  Commands queued
between two writes go out in one ``send_all``, so a burst of FINs costs one
system call.

The handshake is ``"  V2"`` + IDENTIFY (with feature negotiation), then, for
each feature nsqd agreed to (TLS, snappy, deflate), the stream is wrapped by
an *upgrader* and nsqd's ``OK`` is read through the new layer, then AUTH if
nsqd asks for it.  Handshake frames are read with exact sizes so no byte of
a wrapped layer is ever consumed by the plain one.
"""

from __future__ import annotations

import json
import socket
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import trio

from pynsqd.protocol import (
    CLOSE_WAIT,
    FRAME_TYPE_ERROR,
    FRAME_TYPE_MESSAGE,
    FRAME_TYPE_RESPONSE,
    HEARTBEAT,
    MAGIC_V2,
    OK,
    Frame,
    ProtocolError,
    FrameDecoder,
    decode_message,
    encode_command,
    encode_mpub_body,
)
from pynsqd.log import get_logger

from . import __version__

USER_AGENT = f"pynsqd-client/{__version__}"
NON_FATAL_ERRORS = frozenset({"E_FIN_FAILED", "E_REQ_FAILED", "E_TOUCH_FAILED"})


# ================================================================ errors


class NSQError(Exception):
    """An error frame from nsqd: ``code`` is ``E_BAD_TOPIC``..."""

    def __init__(self, code: str, description: str = "") -> None:
        super().__init__(f"{code} {description}".strip())
        self.code = code
        self.description = description

    @property
    def fatal(self) -> bool:
        return self.code not in NON_FATAL_ERRORS

    @classmethod
    def from_frame(cls, data: bytes) -> NSQError:
        code, _, description = data.decode(errors="replace").partition(" ")
        return cls(code, description)


class ConnectionClosed(Exception):
    """The connection went away before nsqd answered."""


class HandshakeError(Exception):
    """nsqd did not accept the connection (IDENTIFY, upgrade, AUTH or SUB)."""


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


OpenStream = Callable[[str, int], Awaitable[trio.abc.Stream]]
# (stream, what nsqd agreed to, our options, host) -> the wrapped stream
Upgrader = Callable[[trio.abc.Stream, IdentifyResponse, ConnectionOptions, str], Awaitable[trio.abc.Stream]]


async def open_tcp(host: str, port: int) -> trio.abc.Stream:
    return await trio.open_tcp_stream(host, port)


def split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"bad address {address!r}: want host:port")
    return host.strip("[]") or "127.0.0.1", int(port)


async def upgrade_stream(kind: str, stream: trio.abc.Stream, identify: IdentifyResponse, options: ConnectionOptions, host: str) -> trio.abc.Stream:
    """The built-in layers; imported lazily so plain connections need none."""
    if kind == "tls":
        context = options.tls_context or ssl.create_default_context()
        tls = trio.SSLStream(stream, context, server_hostname=options.tls_server_hostname or host)
        await tls.do_handshake()
        return tls
    if kind in ("snappy", "deflate"):
        # the codec nsqd itself uses (pynsqd.streams): one implementation for both ends
        from pynsqd.streams import DeflateStream, SnappyStream

        if kind == "snappy":
            return SnappyStream(stream)
        return DeflateStream(stream, identify.deflate_level or options.deflate_level)
    raise HandshakeError(f"no upgrader for {kind}")


# ================================================================ trio edge

EventHandler = Callable[["Connection", list[Event]], None]


class Connection:
    """A connection to one nsqd: :meth:`connect`, then :meth:`serve` until
    it ends (EOF, error, read timeout or :meth:`close`).

    Producers and consumers queue commands through :attr:`proto` and call
    :meth:`wake`; a single writer task sends whatever has accumulated.
    """

    def __init__(
        self,
        address: str,
        options: ConnectionOptions | None = None,
        *,
        open_stream: OpenStream = open_tcp,
        upgrader: Callable[..., Awaitable[trio.abc.Stream]] = upgrade_stream,
        log: Any = None,
    ) -> None:
        self.address = address
        self.host, self.port = split_address(address)
        self.options = options or ConnectionOptions()
        self.proto = ConnProtocol()
        self.identify: IdentifyResponse | None = None
        self.auth: dict[str, Any] | None = None
        self._open_stream = open_stream
        self._upgrader = upgrader
        self._stream: trio.abc.Stream | None = None
        self._wakeup = trio.Event()
        self._close_requested = False
        self._cancel: trio.CancelScope | None = None
        self.closed = False
        self.log = log or get_logger(conn=address)

    def __repr__(self) -> str:
        return f"<Connection {self.address}>"

    # ------------------------------------------------------------ handshake

    async def connect(self) -> IdentifyResponse:
        """Dial, IDENTIFY, add the negotiated layers, AUTH.  Raises OSError,
        HandshakeError, NSQError or trio.TooSlowError (dial timeout)."""
        with trio.fail_after(self.options.dial_timeout):
            stream = await self._open_stream(self.host, self.port)
        self._stream = stream
        try:
            with trio.fail_after(self.options.dial_timeout + self.options.write_timeout):
                await stream.send_all(MAGIC_V2 + encode_command(b"IDENTIFY", body=json.dumps(self.options.identify_body()).encode()))
                frame = await self._read_frame()
                identify = parse_identify_response(frame.data)
                for kind in identify.upgrades:
                    self._stream = await self._upgrader(kind, self._stream, identify, self.options, self.host)
                    ok = await self._read_frame()
                    if ok.data != OK:
                        raise HandshakeError(f"{kind} upgrade: nsqd answered {ok.data[:100]!r}")
                if identify.auth_required:
                    if not self.options.auth_secret:
                        raise HandshakeError("nsqd requires AUTH and no auth_secret is set")
                    await self._stream.send_all(encode_command(b"AUTH", body=self.options.auth_secret.encode()))
                    self.auth = json.loads((await self._read_frame()).data)
        except BaseException:
            await trio.aclose_forcefully(self._stream)
            self.closed = True
            raise
        self.identify = identify
        return identify

    async def subscribe(self, topic: str, channel: str) -> None:
        assert self._stream is not None
        try:
            with trio.fail_after(self.options.dial_timeout + self.options.write_timeout):
                await self._stream.send_all(encode_command(b"SUB", topic, channel))
                frame = await self._read_frame()
        except BaseException:
            await trio.aclose_forcefully(self._stream)
            self.closed = True
            raise
        if frame.data != OK:
            await trio.aclose_forcefully(self._stream)
            self.closed = True
            raise HandshakeError(f"SUB {topic} {channel}: {frame.data[:200].decode(errors='replace')}")

    async def _read_exactly(self, n: int) -> bytes:
        assert self._stream is not None
        buf = bytearray()
        while len(buf) < n:
            chunk = await self._stream.receive_some(n - len(buf))
            if not chunk:
                raise ConnectionClosed(f"{self.address} closed during the handshake")
            buf += chunk
        return bytes(buf)

    async def _read_frame(self) -> Frame:
        """One handshake frame, answering heartbeats; error frames raise."""
        while True:
            header = await self._read_exactly(8)
            size = int.from_bytes(header[:4], "big", signed=True)
            frame_type = int.from_bytes(header[4:], "big", signed=True)
            if size < 4 or size > 16 * 1024 * 1024:
                raise HandshakeError(f"bad frame size {size}")
            data = await self._read_exactly(size - 4)
            if frame_type == FRAME_TYPE_ERROR:
                raise NSQError.from_frame(data)
            if frame_type == FRAME_TYPE_RESPONSE and data == HEARTBEAT:
                assert self._stream is not None
                await self._stream.send_all(encode_command(b"NOP"))
                continue
            if frame_type != FRAME_TYPE_RESPONSE:
                raise HandshakeError(f"unexpected frame type {frame_type} during the handshake")
            return Frame(frame_type, data)

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
            async with trio.open_nursery() as nursery:
                self._cancel = nursery.cancel_scope
                nursery.start_soon(self._write_loop, stream, nursery.cancel_scope)
                await self._read_loop(stream, on_events)
                nursery.cancel_scope.cancel()
        finally:
            self.closed = True
            await trio.aclose_forcefully(stream)

    async def _read_loop(self, stream: trio.abc.Stream, on_events: EventHandler) -> None:
        timeout = self.options.effective_read_timeout()
        proto = self.proto
        while True:
            try:
                with trio.move_on_after(timeout) as scope:
                    data = await stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                self.log.warning("connection lost", error=repr(exc))
                return
            if scope.cancelled_caught:
                self.log.warning("read timeout: no data from nsqd", timeout=timeout)
                return
            if not data:
                if not self._close_requested:
                    self.log.info("nsqd closed the connection")
                return
            try:
                events = proto.receive_data(data)
            except (ProtocolError, ValueError, HandshakeError) as exc:
                self.log.error("bad data from nsqd, closing", error=str(exc))
                return
            if events:
                on_events(self, events)
            if proto.has_data:
                self._wakeup.set()

    async def _write_loop(self, stream: trio.abc.Stream, scope: trio.CancelScope) -> None:
        proto = self.proto
        while True:
            await self._wakeup.wait()
            self._wakeup = trio.Event()
            data = proto.data_to_send()
            if data:
                try:
                    with trio.fail_after(self.options.write_timeout):
                        await stream.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, trio.TooSlowError) as exc:
                    self.log.warning("write failed", error=repr(exc))
                    scope.cancel()
                    return
            if self._close_requested and not proto.has_data:
                scope.cancel()
                return
