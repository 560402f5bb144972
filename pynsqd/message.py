"""A message as a topic or channel holds it."""

from __future__ import annotations

import time
from array import array
import struct
from collections.abc import Iterable, Iterator
from itertools import chain, repeat
from typing import TYPE_CHECKING, Any, Union

from .guid import block_id, block_ids
from .protocol import MESSAGE_RECORD_PREFIX, decode_message, encode_message

if TYPE_CHECKING:
    from .client_v2 import ClientV2


class Message:
    """One message in one channel (channels beyond the first get copies).

    ``deferred`` is the delay (seconds) asked for at publish time (DPUB,
    ``/pub?defer=``); the in-flight fields are set while a client holds it.
    ``token`` identifies its still-unacknowledged disk record when the queue
    tracks reads (``--sync-every=1``): the record is acknowledged once the
    message is finished or stored again.
    """

    __slots__ = ("id", "body", "timestamp", "attempts", "deferred", "client", "delivered_at", "deadline", "due", "token", "flight")

    def __init__(self, msg_id: bytes, body: bytes, timestamp: int | None = None, attempts: int = 0, deferred: float = 0.0) -> None:
        self.id = msg_id
        self.body = body
        self.timestamp = time.time_ns() if timestamp is None else timestamp
        self.attempts = attempts
        self.deferred = deferred
        self.client: ClientV2 | None = None
        self.delivered_at = 0.0
        self.deadline = 0.0
        self.due = 0.0
        self.token: int | None = None
        # while in flight: the channel's dict of messages sharing its timeout
        self.flight: dict[bytes, Message] | None = None

    def copy(self) -> Message:
        return Message(self.id, self.body, self.timestamp, self.attempts, self.deferred)

    def encode(self) -> bytes:
        """The go-diskqueue record payload (also the wire message encoding)."""
        return encode_message(self.timestamp, self.attempts, self.id, self.body)

    @classmethod
    def decode(cls, data: bytes) -> Message:
        timestamp, attempts, msg_id, body = decode_message(data)
        return cls(msg_id, body, timestamp, attempts)

    def __repr__(self) -> str:
        return f"Message(id={self.id!r}, attempts={self.attempts}, len={len(self.body)})"

    def __lt__(self, other: Any) -> bool:  # heap tie-breaks never compare messages, but be total anyway
        return self.id < other.id


class MessageBatch:
    """The messages of one MPUB, kept as the publisher's buffer until each is
    delivered (or written to disk).

    While it waits a message costs its bytes in that buffer and nothing else:
    no object, no id (ids are reserved for the whole batch at publish time and
    formatted on delivery).  A batch is immutable and shared by every channel
    of the topic; slicing gives a view of some of its messages (``lo``..``hi``
    of the buffer's), and :meth:`message` makes the :class:`Message` a
    channel delivers.  Layout: see :func:`protocol.scan_mpub_body`.
    """

    __slots__ = ("buf", "size", "starts", "timestamp", "id_base", "id_first", "lo", "hi")

    def __init__(
        self, buf: bytes, count: int, size: int, starts: array[int] | None, timestamp: int, ids: tuple[int, int],
        lo: int = 0, hi: int | None = None,
    ) -> None:
        self.buf = buf
        self.size = size
        self.starts = starts
        self.timestamp = timestamp
        self.id_base, self.id_first = ids
        self.lo = lo
        self.hi = count if hi is None else hi

    def __len__(self) -> int:
        return self.hi - self.lo

    def __getitem__(self, part: slice) -> MessageBatch:
        lo, hi, _ = part.indices(self.hi - self.lo)
        view = MessageBatch.__new__(MessageBatch)
        view.buf, view.size, view.starts, view.timestamp = self.buf, self.size, self.starts, self.timestamp
        view.id_base, view.id_first = self.id_base, self.id_first
        view.lo = self.lo + lo
        view.hi = self.lo + max(lo, hi)
        return view

    def message(self, i: int) -> Message:
        """Message ``i`` of the buffer (``lo <= i < hi``), made for delivery."""
        size = self.size
        if size:
            start = 8 + i * (4 + size)
            body = self.buf[start : start + size]
        else:
            starts = self.starts
            body = self.buf[starts[i] : starts[i + 1] - 4]  # type: ignore[index]
        return Message(block_id(self.id_base, self.id_first, i), body, self.timestamp, 0, 0.0)

    def messages(self, lo: int, hi: int) -> list[Message]:
        """Messages ``lo``..``hi`` of the buffer, made for delivery."""
        ts = self.timestamp
        return [Message(i, b, ts, 0, 0.0) for i, b in zip(block_ids(self.id_base, self.id_first, lo, hi), self._bodies(lo, hi))]

    def _bodies(self, lo: int, hi: int) -> list[bytes]:
        buf, size = self.buf, self.size
        if size:
            stride = 4 + size
            return [buf[p : p + size] for p in range(8 + lo * stride, 8 + hi * stride, stride)]
        starts = self.starts
        return [buf[starts[i] : starts[i + 1] - 4] for i in range(lo, hi)]  # type: ignore[index]

    def __iter__(self) -> Iterator[Message]:
        return iter(self.messages(self.lo, self.hi))

    def body_bytes(self) -> int:
        size = self.size
        if size:
            return size * (self.hi - self.lo)
        starts = self.starts
        return starts[self.hi] - starts[self.lo] - 4 * (self.hi - self.lo)  # type: ignore[index]

    def encode(self) -> list[bytes]:
        """The go-diskqueue record payloads, as :meth:`Message.encode` makes them."""
        prefix = MESSAGE_RECORD_PREFIX.pack(self.timestamp, 0)
        lo, hi = self.lo, self.hi
        return [prefix + i + b for i, b in zip(block_ids(self.id_base, self.id_first, lo, hi), self._bodies(lo, hi))]

    def __repr__(self) -> str:
        return f"MessageBatch({len(self)} messages)"


_FRAME_LEN = struct.Struct(">i")

# what topics and channels pass around: a list of messages, or one MPUB's
Messages = Union[list[Message], MessageBatch]


def encode_messages(msgs: Messages) -> list[bytes]:
    """Disk records of ``msgs``."""
    if type(msgs) is MessageBatch:
        return msgs.encode()
    return [m.encode() for m in msgs]


def disk_frames(msgs: Messages) -> bytes:
    """``msgs`` as go-diskqueue records, each with its length prefix, in one
    buffer (an MPUB's straight from its buffer: no record object per message)."""
    if type(msgs) is MessageBatch:
        lo, hi = msgs.lo, msgs.hi
        ids = block_ids(msgs.id_base, msgs.id_first, lo, hi)
        bodies = msgs._bodies(lo, hi)
        prefix = MESSAGE_RECORD_PREFIX.pack(msgs.timestamp, 0)
        if msgs.size:
            heads: Iterable[bytes] = repeat(_FRAME_LEN.pack(26 + msgs.size) + prefix)
        else:
            heads = [_FRAME_LEN.pack(26 + len(b)) + prefix for b in bodies]
        return b"".join(chain.from_iterable(zip(heads, ids, bodies)))
    pack = MESSAGE_RECORD_PREFIX.pack
    return b"".join([_FRAME_LEN.pack(26 + len(m.body)) + pack(m.timestamp, m.attempts) + m.id + m.body for m in msgs])


def any_deferred(msgs: Messages) -> bool:
    if type(msgs) is MessageBatch:
        return False
    for m in msgs:  # mostly one (a PUB's): no generator to set up
        if m.deferred:
            return True
    return False


def body_bytes(msgs: Messages) -> int:
    if type(msgs) is MessageBatch:
        return msgs.body_bytes()
    total = 0
    for m in msgs:  # mostly one (a PUB's): no comprehension to set up
        total += len(m.body)
    return total


def copy_messages(msgs: Messages) -> Messages:
    """Another channel's copy: messages change as they are delivered, a batch never does."""
    if type(msgs) is MessageBatch:
        return msgs
    return [m.copy() for m in msgs]
