"""The consumer: subscribe a handler to a topic/channel on every nsqd that has it.

    async def handler(message: Message) -> None:
        print(message.body)            # return: FIN; raise: REQ (and back off)

    async with Reader("topic", "channel", handler, lookupd_http_addresses=["127.0.0.1:4161"], max_in_flight=10):
        await trio.sleep_forever()

Everything runs in the Reader's own nursery, inside the caller's task (``async
with``, or ``await reader.run()`` in a nursery of yours): one supervisor task
per nsqd (connect, subscribe, serve, reconnect with backoff), the lookupd
poller, the RDY timer task, and one task per message being handled.  The
decisions -- how much RDY each connection gets, when to back off -- are made
by the sans-IO :class:`~client.rdy.RdyController`; this module only carries
them out.
"""

from __future__ import annotations

import inspect
import math
import random
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import attrs
import trio

from pynsqd.log import get_logger
from pynsqd.protocol import is_valid_channel_name, is_valid_topic_name

from .backoff import Backoff, strategy_named
from .conn import (
    CloseWait,
    Connection,
    ConnectionClosed,
    ConnectionOptions,
    ErrorReceived,
    Event,
    HandshakeError,
    IdentifyResponse,
    MessageReceived,
    NSQError,
    OpenStream,
    open_tcp,
)
from .lookupd import Discovery, QueryErrors, producer_tcp_addresses, query_lookupd
from .message import Message
from .rdy import RdyController, RdyUpdate
from .service import NurseryService

Handler = Callable[[Message], Awaitable[Any]]
GiveUpHook = Callable[[Message], Any]

_CONNECT_ERRORS = (OSError, trio.TooSlowError, HandshakeError, NSQError, ConnectionClosed, trio.BrokenResourceError)


@attrs.define(kw_only=True)
class ReaderConfig:
    """go-nsq's Consumer settings and defaults; durations in seconds."""

    max_in_flight: int = attrs.field(default=1, validator=attrs.validators.ge(0))
    max_attempts: int = 5  # 0: never give up
    default_requeue_delay: float = 90.0  # x attempts
    max_requeue_delay: float = 900.0
    backoff_strategy: str = "exponential"  # or "full_jitter"
    backoff_multiplier: float = 1.0
    max_backoff_duration: float = 120.0  # 0: never back off
    lookupd_poll_interval: float = 60.0
    lookupd_poll_jitter: float = 0.3
    lookupd_poll_timeout: float = 10.0
    low_rdy_idle_timeout: float = 10.0
    low_rdy_timeout: float = 30.0
    rdy_redistribute_interval: float = 5.0
    rdy_retry_interval: float = 5.0
    reconnect_interval: float = 1.0  # first retry; doubles per failure
    max_reconnect_interval: float = 60.0
    stop_timeout: float = 30.0  # graceful stop waits this long for handlers
    # None: one task per message (up to max_in_flight at once); N: N worker
    # tasks taking messages in arrival order (1 = sequential, like go-nsq's AddHandler)
    concurrency: int | None = None


@attrs.frozen
class ReaderStats:
    messages_received: int
    messages_finished: int
    messages_requeued: int
    connections: int


def _split_options(options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    reader_names = {a.name for a in attrs.fields(ReaderConfig)}
    conn_names = {a.name for a in attrs.fields(ConnectionOptions)}
    reader_kw, conn_kw = {}, {}
    for name, value in options.items():
        if name in reader_names:
            reader_kw[name] = value
        elif name in conn_names:
            conn_kw[name] = value
        else:
            raise TypeError(f"unknown Reader option {name!r}")
    return reader_kw, conn_kw


class _ReaderConn:
    """A subscribed connection as the Reader sees it; messages answer to it."""

    def __init__(self, reader: Reader, conn: Connection, identify: IdentifyResponse) -> None:
        self.reader = reader
        self.conn = conn
        self.identify = identify
        self.in_flight: dict[bytes, Message] = {}
        self.gone = False

    @property
    def address(self) -> str:
        return self.conn.address

    # -- Responder: called by Message.finish()/requeue()/touch()

    def finish(self, message: Message) -> None:
        if self._answerable(message):
            self.conn.proto.fin(message.id)
            self.conn.wake()
        self.reader._message_done(self, message, finished=True, backoff=False)

    def requeue(self, message: Message, delay: float | None, backoff: bool) -> None:
        if delay is None:
            cfg = self.reader.config
            delay = min(cfg.default_requeue_delay * message.attempts, cfg.max_requeue_delay)
        if self._answerable(message):
            self.conn.proto.req(message.id, delay)
            self.conn.wake()
        self.reader._message_done(self, message, finished=False, backoff=backoff)

    def touch(self, message: Message) -> None:
        if self._answerable(message):
            self.conn.proto.touch(message.id)
            self.conn.wake()

    def _answerable(self, message: Message) -> bool:
        if self.gone or self.conn.closed:
            # nsqd requeues it itself once it notices the connection is gone
            self.reader.log.warning("connection gone, cannot answer for message", msg_id=message.id.decode(errors="replace"))
            return False
        return message.id in self.in_flight


class Reader(NurseryService):
    """Consume ``topic``/``channel`` with ``handler`` (an async callable).

    Addresses are ``host:port``; lookupd addresses may also be URLs.  Any
    :class:`ReaderConfig` or :class:`~client.conn.ConnectionOptions` field
    can be given as a keyword (``heartbeat_interval=5``, ``msg_timeout=30``,
    ``backoff_strategy="full_jitter"``...).  ``on_give_up(message)`` (sync or
    async) is called once for a message seen more than ``max_attempts``
    times, which is then finished.  ``open_stream(host, port)`` replaces
    the TCP dialer (tests, proxies).
    """

    def __init__(
        self,
        topic: str,
        channel: str,
        handler: Handler,
        *,
        nsqd_tcp_addresses: Iterable[str] = (),
        lookupd_http_addresses: Iterable[str] = (),
        on_give_up: GiveUpHook | None = None,
        open_stream: OpenStream = open_tcp,
        rng: random.Random | None = None,
        **options: Any,
    ) -> None:
        if not is_valid_topic_name(topic):
            raise ValueError(f"invalid topic name {topic!r}")
        if not is_valid_channel_name(channel):
            raise ValueError(f"invalid channel name {channel!r}")
        if isinstance(nsqd_tcp_addresses, str) or isinstance(lookupd_http_addresses, str):
            raise TypeError("addresses must be a list of strings")
        self.topic = topic
        self.channel = channel
        self.handler = handler
        self.on_give_up = on_give_up
        self.nsqd_tcp_addresses = list(nsqd_tcp_addresses)
        self.lookupd_http_addresses = list(lookupd_http_addresses)
        if not self.nsqd_tcp_addresses and not self.lookupd_http_addresses:
            raise ValueError("give nsqd_tcp_addresses or lookupd_http_addresses")
        reader_kw, conn_kw = _split_options(options)
        self.config = ReaderConfig(**reader_kw)
        self.conn_options = ConnectionOptions(**conn_kw)
        if self.conn_options.heartbeat_interval <= 0:
            raise ValueError("nsqd refuses SUB without heartbeats: heartbeat_interval must be > 0")
        self._open_stream = open_stream
        self.rng = rng or random.Random()
        self.log = get_logger(reader=f"{topic}/{channel}")
        self.rdy = self._new_rdy(0.0)
        self.connections: dict[str, _ReaderConn] = {}
        self._received = 0
        self._finished = 0
        self._requeued = 0
        self._nursery: trio.Nursery | None = None
        self._started = False
        self._stopping = False
        self._stop_requested = trio.Event()
        self._stopped = trio.Event()
        self._rdy_wakeup = trio.Event()
        self._conns_changed = trio.Event()
        self._lookupd_recheck = trio.Event()
        # address -> cancel scope of its supervisor (whoever wants it)
        self._targets: dict[str, trio.CancelScope] = {}
        self._static = set(self.nsqd_tcp_addresses)
        self._queue: trio.MemorySendChannel[Message] | None = None

    def _new_rdy(self, now: float) -> RdyController[str]:
        cfg = self.config
        strategy = strategy_named(cfg.backoff_strategy, cfg.backoff_multiplier, self.rng)
        return RdyController(
            cfg.max_in_flight,
            Backoff(strategy, cfg.max_backoff_duration),
            now=now,
            redistribute_interval=cfg.rdy_redistribute_interval,
            low_rdy_idle_timeout=cfg.low_rdy_idle_timeout,
            low_rdy_timeout=cfg.low_rdy_timeout,
            retry_interval=cfg.rdy_retry_interval,
            rng=self.rng,
        )

    # ------------------------------------------------------------ public

    def stats(self) -> ReaderStats:
        return ReaderStats(self._received, self._finished, self._requeued, len(self.connections))

    @property
    def in_flight(self) -> int:
        return sum(len(rc.in_flight) for rc in self.connections.values())

    def is_starved(self) -> bool:
        """True when some connection is (nearly) full of unanswered messages."""
        for key, rc in self.connections.items():
            rdy = self.rdy.conns[key].rdy if key in self.rdy.conns else 0
            n = len(rc.in_flight)
            if n > 0 and n >= int(rdy * 0.85) and not rc.conn.proto.closing:
                return True
        return False

    def set_max_in_flight(self, max_in_flight: int) -> None:
        """Change the window at run time (0 pauses consumption)."""
        self.config.max_in_flight = max_in_flight
        self._apply(self.rdy.set_max_in_flight(max_in_flight, self._now()))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Consume until :meth:`stop` (or cancellation, which is abrupt)."""
        if self._started:
            raise RuntimeError("a Reader runs once")
        self._started = True
        self.rdy = self._new_rdy(trio.current_time())
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._rdy_loop)
                if self.config.concurrency:
                    # unbounded is fine: RDY already bounds what can arrive
                    send, receive = trio.open_memory_channel[Message](math.inf)
                    self._queue = send
                    for _ in range(self.config.concurrency):
                        nursery.start_soon(self._worker, receive)
                for address in self.nsqd_tcp_addresses:
                    self._want(address)
                if self.lookupd_http_addresses:
                    nursery.start_soon(self._lookupd_loop)
                task_status.started()
                await self._stop_requested.wait()
                await self._graceful_close()
                nursery.cancel_scope.cancel()
        finally:
            self._stopping = True
            self._stopped.set()

    async def stop(self) -> None:
        """Graceful stop: CLS everywhere, let in-flight handlers finish (up
        to ``stop_timeout``), close.  Returns when the Reader has stopped."""
        self._stop_requested.set()
        if self._started:
            await self._stopped.wait()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()


    async def wait_connected(self, count: int = 1) -> None:
        """Wait until at least ``count`` connections are subscribed."""
        while len(self.connections) < count:
            await self._conns_event().wait()

    # ------------------------------------------------------------ internals

    def _now(self) -> float:
        return trio.current_time()

    def _conns_event(self) -> trio.Event:
        return self._conns_changed

    def _notify_conns(self) -> None:
        self._conns_changed.set()
        self._conns_changed = trio.Event()

    def _apply(self, updates: list[RdyUpdate[str]], *, from_timer: bool = False) -> None:
        for key, count in updates:
            rc = self.connections.get(key)
            if rc is not None and not rc.conn.proto.closing:
                rc.conn.proto.rdy(count)
                rc.conn.wake()
        if not from_timer:
            # an event may have moved a deadline (backoff pause, RDY retry)
            self._rdy_wakeup.set()

    async def _rdy_loop(self) -> None:
        while True:
            with trio.move_on_at(self.rdy.next_deadline()):
                await self._rdy_wakeup.wait()
            self._rdy_wakeup = trio.Event()
            self._apply(self.rdy.advance(self._now()), from_timer=True)

    # -- targets: which nsqds we want a connection to

    def _want(self, address: str) -> None:
        if address in self._targets or self._stopping:
            return
        assert self._nursery is not None
        scope = trio.CancelScope()
        self._targets[address] = scope
        self._nursery.start_soon(self._supervise, address, scope)

    def _unwant(self, address: str) -> None:
        scope = self._targets.pop(address, None)
        if scope is None:
            return
        rc = self.connections.get(address)
        if rc is None:
            scope.cancel()  # connecting or waiting to reconnect
        else:
            self.log.info("nsqd no longer has the topic, closing", address=address)
            self._start_close(rc)

    async def _supervise(self, address: str, scope: trio.CancelScope) -> None:
        delay = self.config.reconnect_interval
        with scope:
            while not self._stopping and self._targets.get(address) is scope:
                served = await self._connect_and_serve(address)
                if self._stopping or self._targets.get(address) is not scope:
                    return
                if served:
                    delay = self.config.reconnect_interval
                if self.lookupd_http_addresses:
                    self._lookupd_recheck.set()
                wait = delay * (0.5 + self.rng.random() / 2)
                self.log.info("reconnecting", address=address, delay=round(wait, 3))
                with trio.move_on_after(wait):
                    await self._stop_requested.wait()
                delay = min(delay * 2, self.config.max_reconnect_interval)
        if self._targets.get(address) is scope:
            del self._targets[address]

    async def _connect_and_serve(self, address: str) -> bool:
        """One connection's life; True if it got as far as subscribing."""
        conn = Connection(address, self.conn_options, open_stream=self._open_stream, log=self.log.bind(nsqd=address))
        try:
            identify = await conn.connect()
            if identify.max_rdy_count < self.config.max_in_flight:
                self.log.warning("max_rdy_count below max_in_flight, RDY will be capped", address=address, max_rdy_count=identify.max_rdy_count)
            await conn.subscribe(self.topic, self.channel)
        except _CONNECT_ERRORS as exc:
            self.log.error("cannot connect", address=address, error=str(exc) or repr(exc))
            return False
        if self._stopping:
            conn.abort()
            await conn.serve(lambda c, e: None)
            return True
        rc = _ReaderConn(self, conn, identify)
        self.connections[address] = rc
        self.log.info("subscribed", address=address, max_rdy_count=identify.max_rdy_count)
        self._apply(self.rdy.add_connection(address, identify.max_rdy_count, self._now()))
        self._notify_conns()
        try:
            await conn.serve(self._on_events)
        finally:
            rc.gone = True
            if self.connections.get(address) is rc:
                del self.connections[address]
            self._apply(self.rdy.remove_connection(address, self._now()))
            if rc.in_flight:
                self.log.warning("connection closed with messages in flight; nsqd will redeliver them", address=address, count=len(rc.in_flight))
            self._notify_conns()
        return True

    def _start_close(self, rc: _ReaderConn) -> None:
        if rc.conn.proto.closing:
            return
        self.rdy.closing(rc.address)
        rc.conn.proto.cls()
        rc.conn.wake()

    # -- events from a connection (synchronous, inside its read loop)

    def _on_events(self, conn: Connection, events: list[Event]) -> None:
        rc = self.connections.get(conn.address)
        if rc is None or rc.conn is not conn:
            return
        now = self._now()
        for event in events:
            if isinstance(event, MessageReceived):
                self._received += 1
                message = Message(event.id, event.body, event.attempts, event.timestamp, conn.address, responder=rc)
                rc.in_flight[event.id] = message
                self.rdy.message_received(conn.address, now)
                if self._queue is not None:
                    self._queue.send_nowait(message)
                else:
                    assert self._nursery is not None
                    self._nursery.start_soon(self._handle, message, name=f"nsq handler {event.id!r}")
            elif isinstance(event, CloseWait):
                self.log.info("CLOSE_WAIT from nsqd", address=conn.address)
                if not rc.in_flight:
                    conn.close()
            elif isinstance(event, ErrorReceived):
                err = event.error
                if err.fatal:
                    self.log.error("nsqd error", address=conn.address, error=str(err))
                else:
                    self.log.warning("nsqd error", address=conn.address, error=str(err))

    def _message_done(self, rc: _ReaderConn, message: Message, *, finished: bool, backoff: bool) -> None:
        if rc.in_flight.pop(message.id, None) is None:
            return
        now = self._now()
        if finished:
            self._finished += 1
            self._apply(self.rdy.message_finished(now))
        else:
            self._requeued += 1
            self._apply(self.rdy.message_requeued(now, backoff=backoff))
        if rc.conn.proto.close_wait and not rc.in_flight:
            rc.conn.close()

    async def _worker(self, receive: trio.MemoryReceiveChannel[Message]) -> None:
        async for message in receive:
            await self._handle(message)

    async def _handle(self, message: Message) -> None:
        cfg = self.config
        if cfg.max_attempts > 0 and message.attempts > cfg.max_attempts:
            self.log.warning("giving up on message", msg_id=message.id.decode(errors="replace"), attempts=message.attempts)
            if self.on_give_up is not None:
                try:
                    result = self.on_give_up(message)
                    if inspect.isawaitable(result):
                        await result
                except Exception:
                    self.log.exception("on_give_up hook failed")
            if not message.has_responded:
                message.finish()
            return
        try:
            result = await self.handler(message)
        except Exception as exc:
            self.log.error("handler failed, requeueing", msg_id=message.id.decode(errors="replace"), error=repr(exc))
            if message.auto_response and not message.has_responded:
                message.requeue()
            return
        if message.auto_response and not message.has_responded:
            if result is False:  # pynsq's convention for "requeue"
                message.requeue()
            else:
                message.finish()

    # -- lookupd

    async def _lookupd_loop(self) -> None:
        cfg = self.config
        discovery = Discovery(self.lookupd_http_addresses)
        await self._query_lookupds(discovery)
        # spread the polls of consumers restarted together
        with trio.move_on_after(self.rng.random() * cfg.lookupd_poll_jitter * cfg.lookupd_poll_interval):
            await self._lookupd_recheck.wait()
        while True:
            self._lookupd_recheck = trio.Event()
            await self._query_lookupds(discovery)
            with trio.move_on_after(cfg.lookupd_poll_interval):
                await self._lookupd_recheck.wait()

    async def _query_lookupds(self, discovery: Discovery) -> None:
        async def one(address: str) -> None:
            try:
                producers = await query_lookupd(address, self.topic, self.config.lookupd_poll_timeout)
            except QueryErrors as exc:
                self.log.error("lookupd query failed", lookupd=address, error=str(exc))
                discovery.failed(address)
                return
            discovery.answered(address, producer_tcp_addresses(producers))

        async with trio.open_nursery() as nursery:
            for address in discovery.lookupds:
                nursery.start_soon(one, address)
        if self._stopping:
            return
        wanted = discovery.producers() | self._static
        for address in sorted(wanted - set(self._targets)):
            self.log.info("discovered nsqd", address=address)
            self._want(address)
        for address in sorted(set(self._targets) - wanted):
            self._unwant(address)

    # -- stopping

    async def _graceful_close(self) -> None:
        self._stopping = True
        self.rdy.stop()
        for address, scope in list(self._targets.items()):
            if address not in self.connections:
                scope.cancel()  # still dialling or waiting to redial
        for rc in list(self.connections.values()):
            self._start_close(rc)
        self.log.info("stopping: CLS sent", connections=len(self.connections))
        with trio.move_on_after(self.config.stop_timeout):
            while self.connections:
                await self._conns_event().wait()
            return
        # handlers are stuck: hand their messages back to nsqd now rather
        # than at their timeout, then close
        for rc in list(self.connections.values()):
            for msg_id in list(rc.in_flight):
                rc.conn.proto.req(msg_id, 0)
            self.log.warning("stop timeout: requeued in-flight messages", address=rc.address, count=len(rc.in_flight))
            rc.in_flight.clear()
            rc.conn.close()
        with trio.move_on_after(2.0):
            while self.connections:
                await self._conns_event().wait()
