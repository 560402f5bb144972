"""The NSQ wire codec, sans-IO: shared by the daemon, lookupd and the client.

Nothing here touches a socket.  Parsers take bytes and hand back parsed
values; encoders return bytes.  Framing as NSQ defines it:

* commands (client -> nsqd / nsqlookupd): ``NAME param param\\n`` optionally
  followed by ``[int32 size][body]`` for the commands that carry a body;
* V2 frames (nsqd -> client): ``[int32 size][int32 type][data]`` where size
  counts the type field too;
* V1 replies (nsqlookupd -> nsqd): ``[int32 size][data]``;
* messages: ``[int64 ns timestamp][uint16 attempts][16-byte hex id][body]``.
"""

from __future__ import annotations

import re
import struct
from array import array
from collections.abc import Callable, Container, Iterable, Sequence
from typing import NamedTuple

MAGIC_V1 = b"  V1"
MAGIC_V2 = b"  V2"

FRAME_TYPE_RESPONSE = 0
FRAME_TYPE_ERROR = 1
FRAME_TYPE_MESSAGE = 2

MSG_ID_LENGTH = 16
MSG_HEADER_LENGTH = 8 + 2 + MSG_ID_LENGTH  # 26

HEARTBEAT = b"_heartbeat_"
OK = b"OK"
CLOSE_WAIT = b"CLOSE_WAIT"

# nsqd reads command lines through a 16 KiB buffered reader; a longer line is
# an error there too.
MAX_LINE_LENGTH = 16 * 1024

# the longest parameter CommandParser.take_body_command looks for (a topic name)
MAX_KNOWN_PARAM = 64

# commands followed by a [size][body] block
NSQD_BODY_COMMANDS = frozenset({b"IDENTIFY", b"AUTH", b"PUB", b"MPUB", b"DPUB"})
LOOKUPD_BODY_COMMANDS = frozenset({b"IDENTIFY"})

_INT32 = struct.Struct(">i")
_UINT32 = struct.Struct(">I")
_FRAME_HEADER = struct.Struct(">ii")
_MSG_HEADER = struct.Struct(">qH")
# a message's encoding before its id: [int64 timestamp][uint16 attempts]
MESSAGE_RECORD_PREFIX = _MSG_HEADER
_MSG_FRAME_PREFIX = struct.Struct(">iiqH16s")

_NAME_RE = re.compile(r"^[.a-zA-Z0-9_-]+(#ephemeral)?$")


class ProtocolError(Exception):
    """An NSQ client error: ``code`` is the wire code (``E_INVALID``...).

    ``fatal`` errors close the connection after the error frame is sent.
    """

    def __init__(self, code: str, description: str = "", *, fatal: bool = True) -> None:
        super().__init__(f"{code} {description}" if description else code)
        self.code = code
        self.description = description
        self.fatal = fatal

    def frame_data(self) -> bytes:
        """The body of the error frame, e.g. ``b"E_INVALID invalid command X"``."""
        # names and ids are decoded with surrogateescape: echo the client's
        # raw bytes back, as nsqd's %s does
        return str(self).encode("utf-8", "surrogateescape")


# ---------------------------------------------------------------- names


def is_valid_name(name: str) -> bool:
    # fullmatch, not match: Python's ``$`` also matches before a trailing
    # newline, Go's does not ("foo\n" is not a valid name)
    return 0 < len(name) <= 64 and _NAME_RE.fullmatch(name) is not None


is_valid_topic_name = is_valid_name
is_valid_channel_name = is_valid_name


def is_ephemeral(name: str) -> bool:
    return name.endswith("#ephemeral")


def parse_base10(data: bytes) -> int:
    """Parse an unsigned decimal the way nsqd does (digits only; ``b""`` is 0)."""
    if data and not data.isdigit():
        raise ValueError(data)
    # isdigit() accepts only ASCII digits for bytes
    return int(data) if data else 0


# ---------------------------------------------------------------- frames


def encode_frame(frame_type: int, data: bytes) -> bytes:
    return _FRAME_HEADER.pack(len(data) + 4, frame_type) + data


def encode_response(data: bytes) -> bytes:
    return encode_frame(FRAME_TYPE_RESPONSE, data)


def encode_error(error: ProtocolError) -> bytes:
    return encode_frame(FRAME_TYPE_ERROR, error.frame_data())


# [size][type=2][timestamp][attempts][id] — the part of a message frame before its body
MESSAGE_FRAME_PREFIX = _MSG_FRAME_PREFIX


def append_message_frame(out: list[bytes], timestamp: int, attempts: int, msg_id: bytes, body: bytes) -> int:
    """Append one message frame to a list of output parts; returns its size.

    The delivery hot path: the header (with the id) is one small object and
    the body is not copied until the flush joins the parts."""
    n = len(body)
    out.append(_MSG_FRAME_PREFIX.pack(30 + n, FRAME_TYPE_MESSAGE, timestamp, attempts, msg_id))
    out.append(body)
    return 34 + n


def encode_message_frame(timestamp: int, attempts: int, msg_id: bytes, body: bytes) -> bytes:
    out: list[bytes] = []
    append_message_frame(out, timestamp, attempts, msg_id, body)
    return b"".join(out)


def encode_v1_response(data: bytes) -> bytes:
    """nsqlookupd's replies: size-prefixed, no frame type."""
    return _INT32.pack(len(data)) + data


class Frame(NamedTuple):
    frame_type: int
    data: bytes


class _Accumulator:
    """A receive buffer that avoids quadratic copying for large blocks.

    Short items (lines, headers) are found in one contiguous ``bytes``; once we
    know that a block of N bytes is due we only collect chunks until N have
    arrived and join them once.
    """

    __slots__ = ("_buf", "_pos", "_chunks", "_have", "_need")

    def __init__(self) -> None:
        self._buf = b""
        self._pos = 0
        self._chunks: list[bytes] | None = None
        self._have = 0
        self._need = 0

    def feed(self, data: bytes) -> None:
        if not data:
            return
        if self._chunks is not None:
            self._chunks.append(bytes(data))
            self._have += len(data)
            if self._have >= self._need:
                self._buf = b"".join([self._buf[self._pos :], *self._chunks])
                self._pos = 0
                self._chunks = None
            return
        if self._pos >= len(self._buf):
            self._buf = bytes(data)
        else:
            self._buf = self._buf[self._pos :] + data
        self._pos = 0

    def wait_for(self, total: int) -> bool:
        """True if ``total`` bytes are available from the current position;
        otherwise switch to collecting chunks until they are."""
        have = len(self._buf) - self._pos
        if have >= total:
            return True
        if total > 65536:
            self._buf = self._buf[self._pos :]
            self._pos = 0
            self._chunks = []
            self._have = have
            self._need = total
        return False

    @property
    def waiting(self) -> bool:
        return self._chunks is not None


class FrameDecoder:
    """Decode V2 frames from a byte stream (the client side of nsqd)."""

    def __init__(self, max_frame_size: int = 64 * 1024 * 1024) -> None:
        self._acc = _Accumulator()
        self._max = max_frame_size

    def receive_data(self, data: bytes) -> None:
        self._acc.feed(data)

    def next_frame(self) -> Frame | None:
        acc = self._acc
        if acc.waiting or not acc.wait_for(8):
            return None
        size, frame_type = _FRAME_HEADER.unpack_from(acc._buf, acc._pos)
        if size < 4 or size > self._max:
            raise ProtocolError("E_BAD_FRAME", f"invalid frame size {size}")
        if not acc.wait_for(4 + size):
            return None
        start = acc._pos + 8
        end = acc._pos + 4 + size
        data = acc._buf[start:end]
        acc._pos = end
        return Frame(frame_type, data)

    def frames(self, data: bytes = b"") -> list[Frame]:
        """Feed ``data`` and return every complete frame."""
        self.receive_data(data)
        out = []
        while (frame := self.next_frame()) is not None:
            out.append(frame)
        return out


class V1ResponseDecoder:
    """Decode nsqlookupd's size-prefixed replies."""

    def __init__(self, max_size: int = 64 * 1024 * 1024) -> None:
        self._acc = _Accumulator()
        self._max = max_size

    def receive_data(self, data: bytes) -> None:
        self._acc.feed(data)

    def next_response(self) -> bytes | None:
        acc = self._acc
        if acc.waiting or not acc.wait_for(4):
            return None
        (size,) = _INT32.unpack_from(acc._buf, acc._pos)
        if size < 0 or size > self._max:
            raise ProtocolError("E_BAD_FRAME", f"invalid response size {size}")
        if not acc.wait_for(4 + size):
            return None
        data = acc._buf[acc._pos + 4 : acc._pos + 4 + size]
        acc._pos += 4 + size
        return data


# ---------------------------------------------------------------- messages


def encode_message(timestamp: int, attempts: int, msg_id: bytes, body: bytes) -> bytes:
    """The message encoding used on the wire and in diskqueue records."""
    return _MSG_HEADER.pack(timestamp, attempts) + msg_id + body


def decode_message(data: bytes) -> tuple[int, int, bytes, bytes]:
    """-> (timestamp ns, attempts, id, body)."""
    if len(data) < MSG_HEADER_LENGTH:
        raise ValueError(f"message too short: {len(data)} < {MSG_HEADER_LENGTH}")
    timestamp, attempts = _MSG_HEADER.unpack_from(data, 0)
    return timestamp, attempts, data[10:26], data[26:]


# ---------------------------------------------------------------- commands


class Command(NamedTuple):
    name: bytes
    params: list[bytes]
    body: bytes | None = None


def encode_command(name: bytes, *params: bytes | str, body: bytes | None = None) -> bytes:
    parts = [name]
    for p in params:
        parts.append(p.encode() if isinstance(p, str) else p)
    line = b" ".join(parts) + b"\n"
    if body is None:
        return line
    return line + _INT32.pack(len(body)) + body


def encode_mpub_body(bodies: Sequence[bytes]) -> bytes:
    parts = [_INT32.pack(len(bodies))]
    for b in bodies:
        parts.append(_INT32.pack(len(b)))
        parts.append(b)
    return b"".join(parts)


def scan_mpub_body(body: bytes, max_msg_size: int, max_body_size: int) -> tuple[int, int, array[int] | None]:
    """Validate an MPUB body without splitting it: ``(count, size, starts)``.

    When every message has the same size (the usual batch) ``size`` is that
    size and ``starts`` is None: message i's body is ``size`` bytes from
    ``8 + i * (4 + size)``.  Otherwise ``size`` is 0 and message i's body runs
    from ``starts[i]`` to ``starts[i + 1] - 4`` (``starts`` has count + 1
    entries).  Errors are nsqd's: ``E_BAD_BODY`` for the count,
    ``E_BAD_MESSAGE`` for the first bad message.
    """
    n = len(body)
    if n < 4:
        raise ProtocolError("E_BAD_BODY", "MPUB failed to read message count")
    (count,) = _INT32.unpack_from(body, 0)
    # 4 bytes for the count, then at least 4 + 1 per message
    max_messages = (max_body_size - 4) // 5
    if count <= 0 or count > max_messages:
        raise ProtocolError("E_BAD_BODY", f"MPUB invalid message count {count}")
    if n >= 8:
        # one size for all: the length prefixes sit every 4 + size bytes, so
        # each of their 4 bytes, taken with one strided slice, repeats
        size = body[4:8]
        (first,) = _INT32.unpack(size)
        stride = 4 + first
        if 0 < first <= max_msg_size and n == 4 + count * stride and all(
            body[4 + k :: stride] == size[k : k + 1] * count for k in range(4)
        ):
            return count, first, None
    starts = array("q")
    pos = 4
    unpack = _INT32.unpack_from
    for i in range(count):
        if pos + 4 > n:
            raise ProtocolError("E_BAD_MESSAGE", f"MPUB failed to read message({i}) body size")
        (size_i,) = unpack(body, pos)
        pos += 4
        if size_i <= 0:
            raise ProtocolError("E_BAD_MESSAGE", f"MPUB invalid message({i}) body size {size_i}")
        if size_i > max_msg_size:
            raise ProtocolError("E_BAD_MESSAGE", f"MPUB message too big {size_i} > {max_msg_size}")
        if pos + size_i > n:
            raise ProtocolError("E_BAD_MESSAGE", "MPUB failed to read message body")
        starts.append(pos)
        pos += size_i
    if pos != n:
        raise ProtocolError("E_BAD_BODY", f"MPUB body has {n - pos} bytes beyond its {count} messages")
    starts.append(n + 4)
    return count, 0, starts


def decode_mpub_body(body: bytes, max_msg_size: int, max_body_size: int) -> list[bytes]:
    """Split an MPUB body into message bodies, validating all of them first
    (see :func:`scan_mpub_body`)."""
    count, size, starts = scan_mpub_body(body, max_msg_size, max_body_size)
    if starts is None:
        return [body[p : p + size] for p in range(8, 8 + count * (4 + size), 4 + size)]
    return [body[starts[i] : starts[i + 1] - 4] for i in range(count)]


class LineRun:
    """Command lines of one fixed shape, ``NAME param\n`` with a parameter of
    exactly ``length`` bytes (no space, no CR): what :meth:`CommandParser.take_run`
    takes a buffer at a time for the per-message commands (``FIN <id>``)."""

    __slots__ = ("pattern", "param_start", "param_length", "line_length")

    def __init__(self, name: bytes, length: int) -> None:
        self.pattern = re.compile(b"(?:%s [^ \r\n]{%d}\n)+" % (re.escape(name), length))
        self.param_start = len(name) + 1
        self.param_length = length
        self.line_length = len(name) + 1 + length + 1


FIN_RUN = LineRun(b"FIN", MSG_ID_LENGTH)

HeaderHook = Callable[[bytes, list[bytes]], None]
BodySizeHook = Callable[[bytes, list[bytes], int], None]


def _no_header_check(name: bytes, params: list[bytes]) -> None:
    return None


def _default_body_size_check(name: bytes, params: list[bytes], size: int) -> None:
    if size < 0:
        raise ProtocolError("E_BAD_BODY", f"{name.decode(errors='replace')} invalid body size {size}")


class CommandParser:
    """Split a client's byte stream into :class:`Command` values.

    ``on_header(name, params)`` runs when the line of a body-carrying command
    has been read, before its body arrives: it validates what nsqd validates
    first (topic names...).  ``on_body_size(name, params, size)`` validates the
    announced size before any of the body is buffered.  Both raise
    :class:`ProtocolError`.  ``next_command`` returns ``None`` when more data is
    needed; after it raises, the parser must not be used again.
    """

    def __init__(
        self,
        body_commands: Iterable[bytes] = NSQD_BODY_COMMANDS,
        *,
        on_header: HeaderHook = _no_header_check,
        on_body_size: BodySizeHook = _default_body_size_check,
        max_line_length: int = MAX_LINE_LENGTH,
        strip_lines: bool = False,
    ) -> None:
        self._acc = _Accumulator()
        # nsqlookupd trims surrounding whitespace off every line before it
        # splits it (so " IDENTIFY" still carries a body); nsqd only drops \r
        self._strip = strip_lines
        self._body_commands = frozenset(body_commands)
        self._on_header = on_header
        self._on_body_size = on_body_size
        self._max_line = max_line_length
        self._pending: tuple[bytes, list[bytes]] | None = None
        self._size = -1

    def receive_data(self, data: bytes) -> None:
        self._acc.feed(data)

    def next_command(self) -> Command | None:
        acc = self._acc
        if acc.waiting:
            return None
        if self._pending is None:
            buf = acc._buf
            pos = acc._pos
            nl = buf.find(b"\n", pos)
            if nl < 0:
                if len(buf) - pos > self._max_line:
                    raise ProtocolError("E_INVALID", f"command line longer than {self._max_line} bytes")
                return None
            if nl - pos > self._max_line:
                raise ProtocolError("E_INVALID", f"command line longer than {self._max_line} bytes")
            end = nl - 1 if nl > pos and buf[nl - 1] == 13 else nl  # trim a trailing \r
            line = buf[pos:end]
            parts = (line.strip() if self._strip else line).split(b" ")
            acc._pos = nl + 1
            name = parts[0]
            if name not in self._body_commands:
                return Command(name, parts[1:])
            params = parts[1:]
            self._on_header(name, params)
            self._pending = (name, params)
            self._size = -1
        name, params = self._pending
        if self._size < 0:
            if not acc.wait_for(4):
                return None
            (size,) = _INT32.unpack_from(acc._buf, acc._pos)
            self._on_body_size(name, params, size)
            acc._pos += 4
            self._size = size
        size = self._size
        if not acc.wait_for(size):
            return None
        start = acc._pos
        body = acc._buf[start : start + size]
        acc._pos = start + size
        self._pending = None
        self._size = -1
        return Command(name, params, body)

    def take_run(self, run: LineRun) -> list[bytes]:
        """The parameters of the complete ``run``-shaped lines at the head of
        the input, consumed (``[]`` if the next line is not one): the same
        commands ``next_command`` would return, without a Command each."""
        acc = self._acc
        if acc.waiting or self._pending is not None:
            return []
        buf = acc._buf
        start = acc._pos
        m = run.pattern.match(buf, start)
        if m is None:
            return []
        end = acc._pos = m.end()
        n = run.param_length
        return [buf[i : i + n] for i in range(start + run.param_start, end, run.line_length)]

    def has_input(self) -> bool:
        """Whether received bytes wait to be parsed (without them ``next_command``
        and the ``take_`` methods find nothing)."""
        acc = self._acc
        return acc._chunks is None and acc._pos < len(acc._buf)

    def take_body_command(self, prefix: bytes, known: Container[bytes], max_size: int) -> tuple[bytes, bytes] | None:
        """A whole ``NAME param\\n[size][body]`` command at the head of the
        input, consumed, as ``(param, body)``: ``prefix`` is ``b"NAME "``,
        ``param`` one of ``known`` (at most MAX_KNOWN_PARAM bytes) and
        ``0 < size <= max_size``.  Anything else (another command, a body not
        all here, a parameter never seen, a size ``next_command``'s checks must
        judge) gives None and consumes nothing: ``next_command`` takes it.

        The request/response publisher's command (PUB, wait for OK, PUB...)
        without the general path's Command and checks: what ``known`` holds
        was checked when ``next_command`` first met it."""
        acc = self._acc
        if self._pending is not None or acc._chunks is not None:
            return None
        buf = acc._buf
        pos = acc._pos
        if not buf.startswith(prefix, pos):
            return None
        start = pos + len(prefix)
        nl = buf.find(b"\n", start, start + MAX_KNOWN_PARAM + 1)
        if nl < 0:
            return None
        param = buf[start:nl]
        if param not in known or nl + 5 > len(buf):
            return None
        (size,) = _INT32.unpack_from(buf, nl + 1)
        end = nl + 5 + size
        if not 0 < size <= max_size or end > len(buf):
            return None
        acc._pos = end
        return param, buf[nl + 5 : end]

    def commands(self, data: bytes = b"") -> list[Command]:
        """Feed ``data`` and return every complete command (raises on bad input)."""
        self.receive_data(data)
        out = []
        while (cmd := self.next_command()) is not None:
            out.append(cmd)
        return out

    def take_unparsed(self) -> bytes:
        """Remove and return the bytes received but not yet parsed (between
        commands only): when IDENTIFY upgrades the stream they belong to the
        new layer, not to this parser."""
        acc = self._acc
        assert self._pending is None and not acc.waiting
        data = acc._buf[acc._pos :]
        acc._buf = b""
        acc._pos = 0
        return data
