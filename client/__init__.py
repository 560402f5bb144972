"""The bundled NSQ client for trio: :class:`Reader` (consumer) and
:class:`Writer` (producer), wire-compatible with any NSQ 1.x nsqd."""

from __future__ import annotations

__version__ = "0.1.0"

from .backoff import ExponentialStrategy, FullJitterStrategy  # noqa: E402
from .conn import ConnectionClosed, ConnectionOptions, HandshakeError, NSQError  # noqa: E402
from .message import AlreadyResponded, Message  # noqa: E402
from .reader import Reader, ReaderConfig, ReaderStats  # noqa: E402
from .writer import PublishError, Writer, WriterConfig  # noqa: E402

__all__ = [
    "AlreadyResponded",
    "ConnectionClosed",
    "ConnectionOptions",
    "ExponentialStrategy",
    "FullJitterStrategy",
    "HandshakeError",
    "Message",
    "NSQError",
    "PublishError",
    "Reader",
    "ReaderConfig",
    "ReaderStats",
    "Writer",
    "WriterConfig",
]
