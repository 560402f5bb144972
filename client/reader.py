"""The consumer: subscribe a handler to a topic/channel on every nsqd that has it.

    async def handler(message: Message) -> None:
        print(message.body)            # return: FIN; raise: REQ (and back off)

    async with Reader("topic", "channel", handler, lookupd_http_addresses=["127.0.0.1:4161"], max_in_flight=10):
        await anyio.sleep_forever()

Runs on trio and on asyncio (anyio).  The handler may also be a plain
function: it then runs in worker threads, never more at once than the
Reader's concurrency, with the same FIN/REQ rules.

Everything runs in the Reader's own task group, inside the caller's task
(``async with``, or ``await reader.run()`` in a task group of yours): one
supervisor task per nsqd (connect, subscribe, serve, reconnect with
backoff), the lookupd poller, the RDY timer task, and one task per message
being handled.  The decisions -- how much RDY each connection gets, when to
back off -- are made by the sans-IO :class:`~pynsqd.client.rdy.RdyController`;
this module only carries them out.
"""

from __future__ import annotations

import inspect
import math
import random
import threading
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Union

import anyio
import anyio.abc
import anyio.from_thread
import anyio.lowlevel
import anyio.to_thread
import attrs
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from pynsqd.protocol import is_valid_channel_name, is_valid_topic_name

from .backoff import Backoff, BackoffStrategy, strategy_named
from .conn import (
    CONNECT_ERRORS,
    CloseWait,
    Connection,
    ErrorReceived,
    Event,
    IdentifyResponse,
    MessageReceived,
    OpenStream,
    check_addresses,
    open_tcp,
    split_options,
)
from .errors import NotRunningError, describe
from .log import get_logger
from .lookupd import Discovery, QueryErrors, producer_tcp_addresses, query_lookupd
from .message import Message
from .rdy import RdyController, RdyUpdate
from .service import NurseryService, internal_failures_reported

# an async function, or a plain one (run in a worker thread); returning
# False requeues, as in pynsq
Handler = Callable[[Message], Union[Awaitable[Any], Any]]
GiveUpHook = Callable[[Message], Any]

# while lookupd knows no nsqd for the topic, ask again after 1, 2, 4... s
# (up to lookupd_poll_interval): a Reader started before its topic exists
# gets the first message within seconds, not a poll interval later
FIRST_EMPTY_POLL_RETRY = 1.0


def is_async_callable(fn: Any) -> bool:
    """``async def`` functions, partials of them, objects with an async ``__call__``."""
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None))


@attrs.define(kw_only=True)
class ReaderConfig:
    """go-nsq's Consumer settings and defaults; durations in seconds."""

    max_in_flight: int = attrs.field(default=1, validator=attrs.validators.ge(0))
    max_attempts: int = 5  # 0: never give up
    default_requeue_delay: float = 90.0  # x attempts
    max_requeue_delay: float = 900.0
    backoff_strategy: str | BackoffStrategy = "exponential"  # or "full_jitter", or an object
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

    # -- Responder: called by Message.finish()/requeue()/touch(), from the
    # event loop or from any thread (the work is then done on the loop)

    def finish(self, message: Message) -> None:
        self.reader._on_loop(self._finish, message)

    def requeue(self, message: Message, delay: float | None, backoff: bool) -> None:
        self.reader._on_loop(self._requeue, message, delay, backoff)

    def touch(self, message: Message) -> None:
        self.reader._on_loop(self._touch, message)

    def _finish(self, message: Message) -> None:
        if self._answerable(message):
            self.conn.proto.fin(message.id)
            self.conn.wake()
        self.reader._message_done(self, message, finished=True, backoff=False)

    def _requeue(self, message: Message, delay: float | None, backoff: bool) -> None:
        if delay is None:
            cfg = self.reader.config
            delay = min(cfg.default_requeue_delay * message.attempts, cfg.max_requeue_delay)
        if self._answerable(message):
            self.conn.proto.req(message.id, delay)
            self.conn.wake()
        self.reader._message_done(self, message, finished=False, backoff=backoff)

    def _touch(self, message: Message) -> None:
        if self._answerable(message):
            self.conn.proto.touch(message.id)
            self.conn.wake()

    def _answerable(self, message: Message) -> bool:
        if self.gone or self.conn.closed:
            # nsqd requeues it itself once it notices the connection is gone
            self.reader.log.warning("nsqd %s: connection gone, cannot answer for message %s", self.address, message.id.decode(errors="replace"))
            return False
        return message.id in self.in_flight


class Reader(NurseryService):
    """Consume ``topic``/``channel`` with ``handler``.

    ``handler(message)`` is an async callable, or a plain function (run in a
    worker thread; at most ``concurrency``, else ``max_in_flight``, at once).
    Returning finishes the message, raising or returning ``False`` requeues
    it.  Addresses are ``host:port``; lookupd addresses may also be URLs.
    Any :class:`ReaderConfig` or :class:`ConnectionOptions` field can be
    given as a keyword (``heartbeat_interval=5``, ``msg_timeout=30``,
    ``backoff_strategy="full_jitter"``...).  ``on_give_up(message)`` (sync
    or async) is called once for a message seen more than ``max_attempts``
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
        if not callable(handler):
            raise TypeError(f"handler must be callable, not {type(handler).__name__}")
        if isinstance(nsqd_tcp_addresses, str) or isinstance(lookupd_http_addresses, str):
            raise TypeError("addresses must be a list of strings")
        self.topic = topic
        self.channel = channel
        self.handler = handler
        self._handler_is_async = is_async_callable(handler)
        self.on_give_up = on_give_up
        self.nsqd_tcp_addresses = check_addresses(nsqd_tcp_addresses)
        self.lookupd_http_addresses = list(lookupd_http_addresses)
        if not self.nsqd_tcp_addresses and not self.lookupd_http_addresses:
            raise ValueError("give nsqd_tcp_addresses or lookupd_http_addresses")
        own, self.conn_options = split_options(options, ReaderConfig, "Reader")
        self.config = ReaderConfig(**own)
        if self.conn_options.heartbeat_interval <= 0:
            raise ValueError("nsqd refuses SUB without heartbeats: heartbeat_interval must be > 0")
        if self.config.concurrency is not None and self.config.concurrency < 1:
            raise ValueError("concurrency must be None (one task per message) or >= 1")
        self._open_stream = open_stream
        self.rng = rng or random.Random()
        self.log = get_logger(__name__, f"{topic}/{channel}")
        self.rdy = self._new_rdy(0.0)
        self.connections: dict[str, _ReaderConn] = {}
        # the last connect/subscribe failure of each nsqd not connected now
        self.connect_errors: dict[str, BaseException] = {}
        self._dialled: set[str] = set()
        self._received = 0
        self._finished = 0
        self._requeued = 0
        self._task_group: anyio.abc.TaskGroup | None = None
        self._started = False
        self._stopping = False
        # events and the thread limiter belong to the event loop run() runs on
        self._stop_requested: anyio.Event | None = None
        self._stopped: anyio.Event | None = None
        self._rdy_wakeup: anyio.Event | None = None
        self._conns_changed: anyio.Event | None = None
        self._lookupd_recheck: anyio.Event | None = None
        self._limiter: anyio.CapacityLimiter | None = None
        self._loop_thread: int | None = None
        self._loop_token: Any = None
        # address -> cancel scope of its supervisor (whoever wants it)
        self._targets: dict[str, anyio.CancelScope] = {}
        self._static = set(self.nsqd_tcp_addresses)
        self._queue: MemoryObjectSendStream[Message] | None = None

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
        if max_in_flight < 0:
            raise ValueError("max_in_flight must be >= 0")
        self.config.max_in_flight = max_in_flight
        if self._limiter is not None and self.config.concurrency is None:
            self._limiter.total_tokens = max(1, max_in_flight)
        if self._started:
            self._apply(self.rdy.set_max_in_flight(max_in_flight, self._now()))

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Consume until :meth:`stop` (or cancellation, which is abrupt)."""
        if self._started:
            raise RuntimeError("a Reader runs once")
        self._started = True
        self._stop_requested = anyio.Event()
        self._stopped = anyio.Event()
        self._rdy_wakeup = anyio.Event()
        self._conns_changed = anyio.Event()
        self._lookupd_recheck = anyio.Event()
        cfg = self.config
        self._limiter = anyio.CapacityLimiter(cfg.concurrency or max(1, cfg.max_in_flight))
        self._loop_thread = threading.get_ident()
        self._loop_token = anyio.lowlevel.current_token()
        if self._stopping:  # stop() came first
            self._stopped.set()
            task_status.started()
            return
        self.rdy = self._new_rdy(anyio.current_time())
        try:
            with internal_failures_reported("Reader", self.log):
                await self._run(task_status)
        finally:
            self._stopping = True
            self._stopped.set()
            self._notify_conns()  # wake wait_dialled()

    async def _run(self, task_status: anyio.abc.TaskStatus[None]) -> None:
        cfg = self.config
        assert self._stop_requested is not None
        async with anyio.create_task_group() as tg:
            self._task_group = tg
            tg.start_soon(self._rdy_loop)
            if cfg.concurrency:
                # unbounded is fine: RDY already bounds what can arrive
                send, receive = anyio.create_memory_object_stream[Message](math.inf)
                self._queue = send
                for _ in range(cfg.concurrency):
                    tg.start_soon(self._worker, receive)
            for address in self.nsqd_tcp_addresses:
                self._want(address)
            if self.lookupd_http_addresses:
                tg.start_soon(self._lookupd_loop)
            task_status.started()
            await self._stop_requested.wait()
            await self._graceful_close()
            tg.cancel_scope.cancel()

    async def stop(self) -> None:
        """Graceful stop: CLS everywhere, let in-flight handlers finish (up
        to ``stop_timeout``), close.  Returns when the Reader has stopped."""
        if not self._started or self._stop_requested is None or self._stopped is None:
            self._stopping = True
            return
        self._stop_requested.set()
        await self._stopped.wait()

    async def wait_stopped(self) -> None:
        """Wait until the Reader has stopped (after :meth:`stop`, or on its own)."""
        if self._stopped is None:
            raise NotRunningError("the Reader is not started")
        await self._stopped.wait()

    async def wait_connected(self, count: int = 1) -> None:
        """Wait until at least ``count`` connections are subscribed."""
        if self._conns_changed is None:
            raise NotRunningError("the Reader is not started: use `async with Reader(...)` (or start reader.run in a task group)")
        while len(self.connections) < count:
            if self._stopped is not None and self._stopped.is_set():
                raise NotRunningError("the Reader has stopped")
            await self._conns_changed.wait()

    async def wait_dialled(self) -> None:
        """Wait until every nsqd of ``nsqd_tcp_addresses`` has been dialled
        once: subscribed, or its failure in :attr:`connect_errors`.  A
        program that must fail at once when an nsqd is down or refuses the
        subscription (go-nsq's ``ConnectToNSQD`` returns that error) checks
        ``connect_errors`` after it; the Reader itself keeps redialling."""
        if self._conns_changed is None or self._stopped is None:
            raise NotRunningError("the Reader is not started: use `async with Reader(...)` (or start reader.run in a task group)")
        while not self._static <= self._dialled and not self._stopped.is_set():
            await self._conns_changed.wait()

    # ------------------------------------------------------------ internals

    def _now(self) -> float:
        return anyio.current_time()

    def _on_loop(self, fn: Callable[..., None], *args: Any) -> None:
        """Run ``fn`` on the Reader's event loop (at once if already there)."""
        if threading.get_ident() == self._loop_thread:
            fn(*args)
            return
        try:
            anyio.from_thread.run_sync(fn, *args, token=self._loop_token)
        except RuntimeError as exc:  # the loop is gone: nsqd redelivers
            self.log.warning("cannot answer for a message, the Reader is not running: %s", exc)

    def _notify_conns(self) -> None:
        assert self._conns_changed is not None
        self._conns_changed.set()
        self._conns_changed = anyio.Event()

    def _apply(self, updates: list[RdyUpdate[str]], *, from_timer: bool = False) -> None:
        for key, count in updates:
            rc = self.connections.get(key)
            if rc is not None and not rc.conn.proto.closing:
                rc.conn.proto.rdy(count)
                rc.conn.wake()
        if not from_timer and self._rdy_wakeup is not None:
            # an event may have moved a deadline (backoff pause, RDY retry)
            self._rdy_wakeup.set()

    async def _rdy_loop(self) -> None:
        while True:
            assert self._rdy_wakeup is not None
            with anyio.CancelScope(deadline=self.rdy.next_deadline()):
                await self._rdy_wakeup.wait()
            self._rdy_wakeup = anyio.Event()
            self._apply(self.rdy.advance(self._now()), from_timer=True)

    # -- targets: which nsqds we want a connection to

    def _want(self, address: str) -> None:
        if address in self._targets or self._stopping:
            return
        assert self._task_group is not None
        scope = anyio.CancelScope()
        self._targets[address] = scope
        self._task_group.start_soon(self._supervise, address, scope)

    def _unwant(self, address: str) -> None:
        scope = self._targets.pop(address, None)
        if scope is None:
            return
        rc = self.connections.get(address)
        if rc is None:
            scope.cancel()  # connecting or waiting to reconnect
        else:
            self.log.info("nsqd %s no longer has the topic, closing", address)
            self._start_close(rc)

    async def _supervise(self, address: str, scope: anyio.CancelScope) -> None:
        delay = self.config.reconnect_interval
        with scope:
            while not self._stopping and self._targets.get(address) is scope:
                served = await self._connect_and_serve(address)
                if self._stopping or self._targets.get(address) is not scope:
                    return
                if served:
                    delay = self.config.reconnect_interval
                if self.lookupd_http_addresses and self._lookupd_recheck is not None:
                    self._lookupd_recheck.set()
                wait = delay * (0.5 + self.rng.random() / 2)
                self.log.info("nsqd %s: reconnecting in %.3fs", address, wait)
                assert self._stop_requested is not None
                with anyio.move_on_after(wait):
                    await self._stop_requested.wait()
                delay = min(delay * 2, self.config.max_reconnect_interval)
        if self._targets.get(address) is scope:
            del self._targets[address]

    async def _connect_and_serve(self, address: str) -> bool:
        """One connection's life; True if it got as far as subscribing."""
        log = self.log.child(f"nsqd {address}")
        conn = Connection(address, self.conn_options, open_stream=self._open_stream, log=log)
        try:
            identify = await conn.connect()
            if identify.max_rdy_count < self.config.max_in_flight:
                log.warning("max_rdy_count %d is below max_in_flight, RDY will be capped", identify.max_rdy_count)
            await conn.subscribe(self.topic, self.channel)
        except CONNECT_ERRORS as exc:
            log.error("cannot connect: %s", describe(exc))
            self.connect_errors[address] = exc
            self._dialled.add(address)
            self._notify_conns()
            return False
        self.connect_errors.pop(address, None)
        self._dialled.add(address)
        if self._stopping:
            conn.abort()
            await conn.serve(lambda c, e: None)
            return True
        rc = _ReaderConn(self, conn, identify)
        self.connections[address] = rc
        log.info("subscribed (max_rdy_count %d)", identify.max_rdy_count)
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
                log.warning("connection closed with %d messages in flight; nsqd will redeliver them", len(rc.in_flight))
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
                    assert self._task_group is not None
                    self._task_group.start_soon(self._handle, message)
            elif isinstance(event, CloseWait):
                rc.conn.log.info("CLOSE_WAIT from nsqd")
                if not rc.in_flight:
                    conn.close()
            elif isinstance(event, ErrorReceived):
                err = event.error
                rc.conn.log.log(40 if err.fatal else 30, "nsqd error: %s", err)

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

    async def _worker(self, receive: MemoryObjectReceiveStream[Message]) -> None:
        async for message in receive:
            await self._handle(message)

    async def _call(self, fn: Callable[[Message], Any], message: Message, is_async: bool) -> Any:
        """A user callback: awaited, or run in a worker thread (never more
        threads than the Reader's concurrency)."""
        if is_async:
            return await fn(message)
        # abandon on cancel: a thread cannot be interrupted, and nsqd
        # redelivers the message of a handler that never answered
        result = await anyio.to_thread.run_sync(fn, message, limiter=self._limiter, abandon_on_cancel=True)
        if inspect.isawaitable(result):  # lambda m: some_coroutine(m)
            result = await result
        return result

    async def _handle(self, message: Message) -> None:
        cfg = self.config
        msg_id = message.id.decode(errors="replace")
        if cfg.max_attempts > 0 and message.attempts > cfg.max_attempts:
            self.log.warning("giving up on message %s after %d attempts", msg_id, message.attempts)
            if self.on_give_up is not None:
                try:
                    await self._call(self.on_give_up, message, is_async_callable(self.on_give_up))
                except Exception:
                    self.log.exception("on_give_up hook failed for message %s", msg_id)
            if not message.has_responded:
                message.finish()
            return
        try:
            result = await self._call(self.handler, message, self._handler_is_async)
        except Exception:
            # with the traceback: the failure is in the application's code
            self.log.exception("handler failed for message %s (attempt %d), requeueing", msg_id, message.attempts)
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
        """Ask at once, as go-nsq does; then every ``lookupd_poll_interval``,
        the first of those polls delayed by a random share of
        ``lookupd_poll_jitter`` so consumers restarted together spread out.
        While lookupd knows no nsqd for the topic, ask again sooner."""
        cfg = self.config
        discovery = Discovery(self.lookupd_http_addresses)
        empty_retry = FIRST_EMPTY_POLL_RETRY
        jitter: float | None = self.rng.random() * cfg.lookupd_poll_jitter * cfg.lookupd_poll_interval
        while True:
            self._lookupd_recheck = anyio.Event()
            await self._query_lookupds(discovery)
            if not discovery.producers():
                wait = min(empty_retry, cfg.lookupd_poll_interval)
                empty_retry *= 2
            else:
                empty_retry = FIRST_EMPTY_POLL_RETRY
                wait = cfg.lookupd_poll_interval + (jitter or 0.0)
                jitter = None
            with anyio.move_on_after(wait):
                await self._lookupd_recheck.wait()

    async def _query_lookupds(self, discovery: Discovery) -> None:
        async def one(address: str) -> None:
            try:
                producers = await query_lookupd(address, self.topic, self.config.lookupd_poll_timeout)
            except QueryErrors as exc:
                self.log.error("lookupd %s query failed: %s", address, exc)
                discovery.failed(address)
                return
            discovery.answered(address, producer_tcp_addresses(producers))

        async with anyio.create_task_group() as tg:
            for address in discovery.lookupds:
                tg.start_soon(one, address)
        if self._stopping:
            return
        wanted = discovery.producers() | self._static
        for address in sorted(wanted - set(self._targets)):
            self.log.info("discovered nsqd %s", address)
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
        self.log.info("stopping: CLS sent to %d nsqd(s)", len(self.connections))
        assert self._conns_changed is not None
        with anyio.move_on_after(self.config.stop_timeout):
            while self.connections:
                await self._conns_changed.wait()
            return
        # handlers are stuck: hand their messages back to nsqd now rather
        # than at their timeout, then close
        for rc in list(self.connections.values()):
            for msg_id in list(rc.in_flight):
                rc.conn.proto.req(msg_id, 0)
            rc.conn.log.warning("stop timeout: requeued %d in-flight messages", len(rc.in_flight))
            rc.in_flight.clear()
            rc.conn.close()
        with anyio.move_on_after(2.0):
            while self.connections:
                await self._conns_changed.wait()
