"""The queue behind a topic's or channel's in-memory queue.

Topics and channels keep up to ``--mem-queue-size`` messages in memory and put
the rest into a backend.  A backend stores encoded messages (the
go-diskqueue record payload) in FIFO order.  Every method is synchronous:
backends do buffered I/O that does not block for long, and the daemon runs
their periodic maintenance (``sync``) from its own tasks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol


class BackendError(Exception):
    """A write failed (disk full, I/O error): the publish must be refused."""


class BackendQueue(Protocol):
    def put(self, data: bytes) -> None:
        """Append one record; raise BackendError if it cannot be stored."""

    def put_many(self, items: list[bytes]) -> None:
        """Append records in order, all or none; raise BackendError on failure."""

    def get(self) -> bytes | None:
        """Remove and return the oldest record, or None when empty."""

    def depth(self) -> int:
        """Records stored and not yet read."""

    def bytes_queued(self) -> int:
        """Bytes those records take on disk."""

    def empty(self) -> None:
        """Drop every record."""

    def sync(self) -> None:
        """Make what was written durable (fsync + metadata)."""

    def close(self) -> None:
        """Sync and release files; the records stay for the next start."""

    def delete(self) -> None:
        """Close and remove every file."""


class SyncNotifier:
    """Tells its owner once, until the next sync is prepared, that a sync is
    due (the daemon's group commit collects the queues and logs that ask)."""

    _due_notified: bool
    _on_sync_due: Callable[[Any], None] | None

    def _notify_due(self) -> None:
        if not self._due_notified:
            self._due_notified = True
            if self._on_sync_due is not None:
                self._on_sync_due(self)


class DummyBackendQueue:
    """Ephemeral topics and channels have no disk: overflow is dropped, as in nsqd."""

    __slots__ = ()

    def put(self, data: bytes) -> None:
        return None

    def put_many(self, items: list[bytes]) -> None:
        return None

    def get(self) -> bytes | None:
        return None

    def depth(self) -> int:
        return 0

    def bytes_queued(self) -> int:
        return 0

    def empty(self) -> None:
        return None

    def sync(self) -> None:
        return None

    def close(self) -> None:
        return None

    def delete(self) -> None:
        return None
