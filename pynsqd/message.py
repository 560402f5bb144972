"""A message as a topic or channel holds it."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from .protocol import decode_message, encode_message

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
