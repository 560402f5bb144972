"""nsqd's in-memory queue (``--mem-queue-size``) of a topic or a channel.

A FIFO of messages whose entries are either single :class:`Message` objects
(PUB, DPUB, requeues, what was read back from disk) or whole
:class:`MessageBatch` views (MPUB): a batch stays one entry until its last
message is taken, and each queue keeps its own position in its head batch,
so the channels of a topic share one batch without copying it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator

from .guid import block_index
from .message import Message, MessageBatch, Messages


class MemoryQueue:
    __slots__ = ("_items", "_len", "_pos")

    def __init__(self) -> None:
        self._items: deque[Message | MessageBatch] = deque()
        self._len = 0
        # messages already taken from the head entry when it is a batch
        self._pos = 0

    def __len__(self) -> int:
        return self._len

    def __bool__(self) -> bool:
        return self._len > 0

    def append(self, msg: Message) -> None:
        self._items.append(msg)
        self._len += 1

    def put(self, msgs: Messages) -> None:
        if type(msgs) is MessageBatch:
            if msgs:
                self._items.append(msgs)
        else:
            self._items.extend(msgs)
        self._len += len(msgs)

    def popleft(self) -> Message:
        items = self._items
        head = items[0]
        self._len -= 1
        if isinstance(head, Message):
            items.popleft()
            return head
        pos = self._pos
        msg = head.message(head.lo + pos)
        if pos + 1 == len(head):
            items.popleft()
            self._pos = 0
        else:
            self._pos = pos + 1
        return msg

    def pop_many(self, limit: int) -> list[Message]:
        """Up to ``limit`` messages from the head (``popleft`` that many times)."""
        items = self._items
        out: list[Message] = []
        while len(out) < limit and items:
            head = items[0]
            if isinstance(head, Message):
                out.append(head)
                items.popleft()
                continue
            pos = self._pos
            n = min(limit - len(out), len(head) - pos)
            out += head.messages(head.lo + pos, head.lo + pos + n)
            if pos + n == len(head):
                items.popleft()
                self._pos = 0
            else:
                self._pos = pos + n
        self._len -= len(out)
        return out

    def take(self, limit: int) -> Messages:
        """Up to ``limit`` messages from the head, as they are stored: part of
        the head batch, or a list of the single messages there."""
        items = self._items
        head = items[0]
        if isinstance(head, MessageBatch):
            pos = self._pos
            part = head[pos : pos + limit]
            if pos + len(part) == len(head):
                items.popleft()
                self._pos = 0
            else:
                self._pos = pos + len(part)
            self._len -= len(part)
            return part
        out: list[Message] = []
        while items and len(out) < limit and isinstance(items[0], Message):
            out.append(items.popleft())  # type: ignore[arg-type]
        self._len -= len(out)
        return out

    def take_all(self) -> list[Messages]:
        """Everything, in order, as stored (shutdown)."""
        out: list[Messages] = []
        while self._len:
            out.append(self.take(self._len))
        return out

    def __iter__(self) -> Iterator[Message]:
        """The messages in order (made from their batches: for shutdown and tests)."""
        pos = self._pos
        for item in self._items:
            if isinstance(item, Message):
                yield item
            else:
                yield from item[pos:]
            pos = 0

    def extract(self, pred: Callable[[Message], bool]) -> list[Message]:
        """Remove and return the single messages (not batches: never
        delivered) for which ``pred`` is true, the rest kept in order."""
        out = [m for m in self._items if isinstance(m, Message) and pred(m)]
        if out:
            taken = {id(m) for m in out}
            # only single messages go: a batch at the head keeps its position
            self._items = deque(m for m in self._items if id(m) not in taken)
            self._len -= len(out)
        return out

    def peek(self, limit: int) -> Iterator[Message]:
        """Up to ``limit`` messages from the head, in order, taking nothing:
        queued ones as they are, a batch's made for the look (never more than
        ``limit`` of them)."""
        pos = self._pos
        left = limit
        for item in self._items:
            if left <= 0:
                return
            if isinstance(item, Message):
                left -= 1
                yield item
            else:
                lo = item.lo + pos
                hi = min(item.hi, lo + left)
                left -= hi - lo
                yield from item.messages(lo, hi)
            pos = 0

    def find(self, msg_id: bytes) -> tuple[int, Message] | None:
        """(messages ahead of it, the message) for an id in the queue, or None.
        One step per entry: a batch answers from its id range."""
        ahead = 0
        pos = self._pos
        for item in self._items:
            if isinstance(item, Message):
                if item.id == msg_id:
                    return ahead, item
                ahead += 1
            else:
                i = block_index(item.id_base, item.id_first, msg_id)
                if i is not None and item.lo + pos <= i < item.hi:
                    return ahead + i - item.lo - pos, item.message(i)
                ahead += len(item) - pos
            pos = 0
        return None

    def clear(self) -> None:
        self._items.clear()
        self._len = 0
        self._pos = 0
