"""The producer: publish to one of several nsqds, failing over between them.

    async with Writer(["127.0.0.1:4150", "127.0.0.1:4250"]) as writer:
        await writer.pub("topic", b"hello")          # returns once nsqd said OK
        await writer.mpub("topic", [b"a", b"b"])
        await writer.dpub("topic", 5.0, b"later")    # delivered in 5 s

Runs on trio and on asyncio (anyio).  Every address gets a supervisor task
that keeps a connection up (redialling with exponential backoff).  A publish
goes to the next healthy connection (round robin); nsqd answers each
connection's commands in order, so answers are matched FIFO and any number
of concurrent publishers share a connection (pipelined, written in one
batch).  When a connection dies with publishes unanswered, or nsqd answers
``E_PUB_FAILED`` (it is exiting), the publish is retried on another
connection until ``publish_timeout``: NSQ delivers at least once, so a retry
after a lost answer may duplicate, never lose.  Errors that would fail
anywhere (bad topic, message too big) raise at once.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import anyio
import anyio.abc
import attrs

from pynsqd.protocol import is_valid_topic_name

from .conn import (
    CONNECT_ERRORS,
    Connection,
    ConnProtocol,
    ErrorReceived,
    Event,
    OpenStream,
    Response,
    check_addresses,
    open_tcp,
    split_options,
)
from .errors import ConnectionClosed, NotRunningError, NSQError, PublishError, describe
from .log import get_logger
from .service import NurseryService, internal_failures_reported

# answers that mean "this nsqd cannot take it now", not "this message is bad"
RETRYABLE_CODES = frozenset({"E_PUB_FAILED", "E_MPUB_FAILED", "E_DPUB_FAILED"})


@attrs.define(kw_only=True)
class WriterConfig:
    publish_timeout: float = 10.0  # for one pub/mpub/dpub, failovers included
    reconnect_interval: float = 0.5  # first redial; doubles per failure
    max_reconnect_interval: float = 30.0


def check_topic(topic: str) -> None:
    """Refuse a bad name before sending, with nsqd's own error."""
    if not is_valid_topic_name(topic):
        raise NSQError("E_BAD_TOPIC", f"invalid topic name {topic!r}")


def check_bodies(bodies: Sequence[bytes]) -> list[bytes]:
    out = list(bodies)
    if not out:
        raise ValueError("mpub needs at least one message")
    return out


def publish_error(timeout: float, last: BaseException | None, connect_errors: dict[str, BaseException]) -> PublishError:
    """Why nothing was accepted: the last answer or lost connection, else why
    no nsqd could be reached."""
    if last is not None:
        reason = describe(last)
    elif connect_errors:
        reason = "; ".join(f"cannot connect to {a}: {describe(e)}" for a, e in sorted(connect_errors.items()))
    else:
        reason = "no connection to any nsqd yet"
    error = PublishError(f"no nsqd accepted the publish within {timeout}s: {reason}")
    error.__cause__ = last if last is not None else next(iter(connect_errors.values()), None)
    return error


class _Pending:
    __slots__ = ("done", "error")

    def __init__(self) -> None:
        self.done = anyio.Event()
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

    Keywords are :class:`WriterConfig` or :class:`ConnectionOptions` fields.
    Use ``async with Writer(...) as writer:`` (or run :meth:`run` in a task
    group of yours); publishing waits for a connection if none is up yet.
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
        self.addresses = check_addresses(nsqd_tcp_addresses)
        if not self.addresses:
            raise ValueError("give at least one nsqd address")
        own, self.conn_options = split_options(options, WriterConfig, "Writer")
        self.config = WriterConfig(**own)
        self._open_stream = open_stream
        self.rng = rng or random.Random()
        self.log = get_logger(__name__, "writer")
        self.connections: dict[str, _WriterConn] = {}
        self.connect_errors: dict[str, BaseException] = {}
        self._dialled: set[str] = set()
        self._rr = 0
        self._ready_changed: anyio.Event | None = None
        self._state = "new"  # running, stopping, stopped
        self._cancel: anyio.CancelScope | None = None
        self.published = 0
        self.failovers = 0

    # ------------------------------------------------------------ lifetime

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Keep connections up until :meth:`stop` (or cancellation)."""
        if self._state != "new":
            raise RuntimeError("a Writer runs once")
        self._state = "running"
        self._ready_changed = anyio.Event()
        try:
            with internal_failures_reported("Writer", self.log), anyio.CancelScope() as cancel:
                self._cancel = cancel
                async with anyio.create_task_group() as tg:
                    for address in self.addresses:
                        tg.start_soon(self._supervise, address)
                    task_status.started()
        finally:
            self._state = "stopped"
            for wc in self.connections.values():
                wc.fail_all(ConnectionClosed("writer stopped"))
            self._ready_changed.set()  # publishes waiting for a connection: stop waiting

    async def stop(self, timeout: float = 5.0) -> None:
        """Wait (up to ``timeout``) for unanswered publishes, then close."""
        if self._state == "running":
            self._state = "stopping"
        with anyio.move_on_after(timeout):
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
        """Wait until ``count`` nsqds are connected."""
        self._check_running()
        while len(self._usable()) < count:
            assert self._ready_changed is not None
            await self._ready_changed.wait()
            self._check_running()  # stopped meanwhile: its event stays set

    async def wait_dialled(self) -> None:
        """Wait until every nsqd has been dialled once: connected, or its
        failure in :attr:`connect_errors` (to fail at once when an nsqd is
        down, as go-nsq's ``Producer.Ping``; the Writer keeps redialling)."""
        self._check_running()
        while not set(self.addresses) <= self._dialled and self._state == "running":
            assert self._ready_changed is not None
            await self._ready_changed.wait()

    # ------------------------------------------------------------ publishing

    async def pub(self, topic: str, body: bytes) -> None:
        """Publish one message; returns once nsqd has it."""
        check_topic(topic)
        await self._publish(lambda proto: proto.pub(topic, body))

    async def mpub(self, topic: str, bodies: Sequence[bytes]) -> None:
        """Publish several messages at once (atomically, on one nsqd)."""
        check_topic(topic)
        batch = check_bodies(bodies)
        await self._publish(lambda proto: proto.mpub(topic, batch))

    async def dpub(self, topic: str, delay: float, body: bytes) -> None:
        """Publish ``body``, delivered after ``delay`` seconds."""
        check_topic(topic)
        await self._publish(lambda proto: proto.dpub(topic, delay, body))

    def _check_running(self) -> None:
        if self._state == "new":
            raise NotRunningError("the Writer is not started: use `async with Writer(...) as writer:` (or start writer.run in a task group)")
        if self._state != "running":
            raise NotRunningError(f"the Writer is {self._state}")

    async def _publish(self, queue: Callable[[ConnProtocol], None]) -> None:
        self._check_running()
        last: BaseException | None = None
        with anyio.move_on_after(self.config.publish_timeout):
            while True:
                wc = await self._pick()
                pending = _Pending()
                queue(wc.conn.proto)
                wc.pending.append(pending)
                wc.conn.wake()
                try:
                    await pending.done.wait()
                except anyio.get_cancelled_exc_class():
                    # sent, and nsqd was connected but silent (hung, overloaded)
                    last = TimeoutError(f"no answer from nsqd {wc.conn.address} in time")
                    raise
                error = pending.error
                if error is None:
                    self.published += 1
                    return
                if isinstance(error, NSQError) and error.code not in RETRYABLE_CODES:
                    raise error
                last = error
                self.failovers += 1
                self.log.warning("publish to nsqd %s failed, trying another: %s", wc.conn.address, error)
        raise publish_error(self.config.publish_timeout, last, self.connect_errors)

    def _usable(self) -> list[_WriterConn]:
        return [wc for wc in self.connections.values() if wc.usable and not wc.conn.closed]

    async def _pick(self) -> _WriterConn:
        while True:
            usable = self._usable()
            if usable:
                self._rr = (self._rr + 1) % len(usable)
                return usable[self._rr]
            if self._state != "running":
                raise NotRunningError(f"the Writer is {self._state}")
            assert self._ready_changed is not None
            await self._ready_changed.wait()

    def _notify(self) -> None:
        assert self._ready_changed is not None
        self._ready_changed.set()
        self._ready_changed = anyio.Event()

    # ------------------------------------------------------------ connections

    async def _supervise(self, address: str) -> None:
        delay = self.config.reconnect_interval
        log = self.log.child(f"nsqd {address}")
        while True:
            conn = Connection(address, self.conn_options, open_stream=self._open_stream, log=log)
            try:
                await conn.connect()
            except CONNECT_ERRORS as exc:
                self.connect_errors[address] = exc
                log.warning("cannot connect: %s", describe(exc))
                self._dialled.add(address)
                self._notify()
            else:
                delay = self.config.reconnect_interval
                self.connect_errors.pop(address, None)
                self._dialled.add(address)
                wc = _WriterConn(conn)
                self.connections[address] = wc
                log.info("connected")
                self._notify()
                try:
                    await conn.serve(wc.on_events)
                finally:
                    wc.fail_all(ConnectionClosed(f"connection to {address} lost"))
                    if self.connections.get(address) is wc:
                        del self.connections[address]
                    self._notify()
            await anyio.sleep(delay * (0.5 + self.rng.random() / 2))
            delay = min(delay * 2, self.config.max_reconnect_interval)
