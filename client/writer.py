"""The producer: publish to one of several nsqds, failing over between them.

    async with Writer(["127.0.0.1:4150", "127.0.0.1:4250"]) as writer:
        await writer.pub("topic", b"hello")          # returns once nsqd said OK
        await writer.mpub("topic", [b"a", b"b"])
        await writer.dpub("topic", 5.0, b"later")    # delivered in 5 s

Every address gets a supervisor task that keeps a connection up (redialling
with exponential backoff).  A publish goes to the next healthy connection
(round robin); nsqd answers each connection's commands in order, so answers
are matched FIFO and any number of concurrent publishers share a connection
(pipelined, written in one batch).  When a connection dies with publishes
unanswered, or nsqd answers ``E_PUB_FAILED`` (it is exiting), the publish is
retried on another connection until ``publish_timeout``: NSQ delivers at
least once, so a retry after a lost answer may duplicate, never lose.
Errors that would fail anywhere (bad topic, message too big) raise at once.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import attrs
import trio

from pynsqd.log import get_logger
from pynsqd.protocol import is_valid_topic_name

from .conn import (
    Connection,
    ConnectionClosed,
    ConnectionOptions,
    ConnProtocol,
    ErrorReceived,
    Event,
    HandshakeError,
    NSQError,
    OpenStream,
    Response,
    open_tcp,
)
from .service import NurseryService

# answers that mean "this nsqd cannot take it now", not "this message is bad"
RETRYABLE_CODES = frozenset({"E_PUB_FAILED", "E_MPUB_FAILED", "E_DPUB_FAILED"})


class PublishError(Exception):
    """No nsqd accepted the publish within ``publish_timeout``."""


@attrs.define(kw_only=True)
class WriterConfig:
    publish_timeout: float = 10.0  # for one pub/mpub/dpub, failovers included
    reconnect_interval: float = 0.5  # first redial; doubles per failure
    max_reconnect_interval: float = 30.0


class _Pending:
    __slots__ = ("done", "error")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.error: BaseException | None = None

    def resolve(self, error: BaseException | None) -> None:
        self.error = error
        self.done.set()


class _WriterConn:
    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.pending: deque[_Pending] = deque()
        self.usable = True

    def on_events(self, conn: Connection, events: list[Event]) -> None:
        for event in events:
            if isinstance(event, Response):
                if self.pending:
                    self.pending.popleft().resolve(None)
            elif isinstance(event, ErrorReceived):
                if event.error.fatal:
                    # nsqd closes the connection after this one
                    self.usable = False
                if self.pending:
                    self.pending.popleft().resolve(event.error)

    def fail_all(self, error: BaseException) -> None:
        self.usable = False
        while self.pending:
            self.pending.popleft().resolve(error)


class Writer(NurseryService):
    """Publish to ``nsqd_tcp_addresses`` (``host:port``), failing over.

    Keywords are :class:`WriterConfig` or :class:`~client.conn.ConnectionOptions`
    fields.  Use ``async with Writer(...)`` or ``await writer.run()`` in a
    nursery; publishing waits for a connection if none is up yet.
    """

    def __init__(
        self,
        nsqd_tcp_addresses: Iterable[str],
        *,
        open_stream: OpenStream = open_tcp,
        rng: random.Random | None = None,
        **options: Any,
    ) -> None:
        if isinstance(nsqd_tcp_addresses, str):
            raise TypeError("nsqd_tcp_addresses must be a list of strings")
        self.addresses = list(nsqd_tcp_addresses)
        if not self.addresses:
            raise ValueError("give at least one nsqd address")
        writer_names = {a.name for a in attrs.fields(WriterConfig)}
        conn_names = {a.name for a in attrs.fields(ConnectionOptions)}
        unknown = set(options) - writer_names - conn_names
        if unknown:
            raise TypeError(f"unknown Writer options {sorted(unknown)}")
        self.config = WriterConfig(**{k: v for k, v in options.items() if k in writer_names})
        self.conn_options = ConnectionOptions(**{k: v for k, v in options.items() if k in conn_names})
        self._open_stream = open_stream
        self.rng = rng or random.Random()
        self.log = get_logger(writer=",".join(self.addresses))
        self.connections: dict[str, _WriterConn] = {}
        self._rr = 0
        self._ready_changed = trio.Event()
        self._started = False
        self._closing = False
        self._cancel: trio.CancelScope | None = None
        self.published = 0
        self.failovers = 0

    # ------------------------------------------------------------ lifetime

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep connections up until :meth:`stop` (or cancellation)."""
        if self._started:
            raise RuntimeError("a Writer runs once")
        self._started = True
        with trio.CancelScope() as cancel:
            self._cancel = cancel
            async with trio.open_nursery() as nursery:
                for address in self.addresses:
                    nursery.start_soon(self._supervise, address)
                task_status.started()
        for wc in self.connections.values():
            wc.fail_all(ConnectionClosed("writer stopped"))

    async def stop(self, timeout: float = 5.0) -> None:
        """Wait (up to ``timeout``) for unanswered publishes, then close."""
        self._closing = True
        with trio.move_on_after(timeout):
            for wc in list(self.connections.values()):
                while wc.pending:
                    await wc.pending[-1].done.wait()
        if self._cancel is not None:
            self._cancel.cancel()


    @property
    def connected(self) -> list[str]:
        """Addresses of the nsqds a publish can go to right now."""
        return [wc.conn.address for wc in self._usable()]

    async def wait_connected(self, count: int = 1) -> None:
        while len(self._usable()) < count:
            await self._ready_changed.wait()

    # ------------------------------------------------------------ publishing

    async def pub(self, topic: str, body: bytes) -> None:
        _check(topic)
        await self._publish(lambda proto: proto.pub(topic, body))

    async def mpub(self, topic: str, bodies: Sequence[bytes]) -> None:
        _check(topic)
        bodies = list(bodies)
        if not bodies:
            raise ValueError("mpub needs at least one message")
        await self._publish(lambda proto: proto.mpub(topic, bodies))

    async def dpub(self, topic: str, delay: float, body: bytes) -> None:
        """Publish ``body``, delivered after ``delay`` seconds."""
        _check(topic)
        await self._publish(lambda proto: proto.dpub(topic, delay, body))

    async def _publish(self, queue: Callable[[ConnProtocol], None]) -> None:
        if self._closing:
            raise PublishError("writer is stopping")
        last: BaseException | None = None
        with trio.move_on_after(self.config.publish_timeout):
            while True:
                wc = await self._pick()
                pending = _Pending()
                queue(wc.conn.proto)
                wc.pending.append(pending)
                wc.conn.wake()
                await pending.done.wait()
                error = pending.error
                if error is None:
                    self.published += 1
                    return
                if isinstance(error, NSQError) and error.code not in RETRYABLE_CODES:
                    raise error
                last = error
                self.failovers += 1
                self.log.warning("publish failed, trying another nsqd", nsqd=wc.conn.address, error=str(error))
        raise PublishError(f"no nsqd accepted the publish within {self.config.publish_timeout}s (last error: {last!r})")

    def _usable(self) -> list[_WriterConn]:
        return [wc for wc in self.connections.values() if wc.usable and not wc.conn.closed]

    async def _pick(self) -> _WriterConn:
        while True:
            usable = self._usable()
            if usable:
                self._rr = (self._rr + 1) % len(usable)
                return usable[self._rr]
            await self._ready_changed.wait()

    def _notify(self) -> None:
        self._ready_changed.set()
        self._ready_changed = trio.Event()

    # ------------------------------------------------------------ connections

    async def _supervise(self, address: str) -> None:
        delay = self.config.reconnect_interval
        while True:
            conn = Connection(address, self.conn_options, open_stream=self._open_stream, log=self.log.bind(nsqd=address))
            try:
                await conn.connect()
            except (OSError, trio.TooSlowError, HandshakeError, NSQError, ConnectionClosed, trio.BrokenResourceError) as exc:
                self.log.warning("cannot connect", nsqd=address, error=str(exc) or repr(exc))
            else:
                delay = self.config.reconnect_interval
                wc = _WriterConn(conn)
                self.connections[address] = wc
                self.log.info("connected", nsqd=address)
                self._notify()
                try:
                    await conn.serve(wc.on_events)
                finally:
                    wc.fail_all(ConnectionClosed(f"connection to {address} lost"))
                    if self.connections.get(address) is wc:
                        del self.connections[address]
                    self._notify()
            await trio.sleep(delay * (0.5 + self.rng.random() / 2))
            delay = min(delay * 2, self.config.max_reconnect_interval)


def _check(topic: str) -> None:
    if not is_valid_topic_name(topic):
        raise NSQError("E_BAD_TOPIC", f"invalid topic name {topic!r}")
