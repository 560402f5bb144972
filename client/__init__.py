"""pynsqd's NSQ client: :class:`Reader` (consumer) and :class:`Writer`
(producer) for trio and asyncio, :class:`SyncWriter` for plain synchronous
code; wire-compatible with any NSQ 1.x nsqd.  Installed as ``pynsqd.client``.
"""

from __future__ import annotations

import logging

__version__ = "0.1.0"

# a library prints nothing unless the application configures logging
logging.getLogger(__name__).addHandler(logging.NullHandler())

from .backoff import ExponentialStrategy, FullJitterStrategy  # noqa: E402
from .conn import ConnectionOptions  # noqa: E402
from .errors import (  # noqa: E402
    AlreadyResponded,
    BackgroundTaskError,
    ClientError,
    ConnectionClosed,
    HandshakeError,
    NotRunningError,
    NSQError,
    PublishError,
)
from .message import Message  # noqa: E402
from .reader import Reader, ReaderConfig, ReaderStats  # noqa: E402
from .sync_writer import SyncWriter  # noqa: E402
from .writer import Writer, WriterConfig  # noqa: E402

__all__ = [
    "AlreadyResponded",
    "BackgroundTaskError",
    "ClientError",
    "ConnectionClosed",
    "ConnectionOptions",
    "ExponentialStrategy",
    "FullJitterStrategy",
    "HandshakeError",
    "Message",
    "NSQError",
    "NotRunningError",
    "PublishError",
    "Reader",
    "ReaderConfig",
    "ReaderStats",
    "SyncWriter",
    "Writer",
    "WriterConfig",
]
