"""The TCP edge of nsqd: accept connections, check the magic, and move bytes
between the socket and a :class:`ProtocolV2` — nothing else.

Per connection three tasks share one nursery: the reader (receive, feed,
process), the writer (flush the client's output buffer by nsqd's rules, one
``send_all`` per flush) and the heartbeat ticker.  When any of them ends the
connection is over: the others are cancelled and the channel gets the
client's in-flight messages back.

How a connection ends is part of the wire contract.  The kernel answers a
``close()`` that finds unread input with RST instead of FIN, and a client
then reads ECONNRESET (some clients mishandle it) where nsqd's clients see
an orderly EOF.  So the reader never stops reading while it waits for
anything else (a full socket, an fsync), and every close the daemon makes
is a lingering one (:class:`LingeringSocketStream`).
"""

from __future__ import annotations

import fcntl
import os
import socket
import struct
import termios
from time import perf_counter
from typing import TYPE_CHECKING, Any

import trio

from .protocol import FRAME_TYPE_ERROR, MAGIC_V2, encode_frame
from .protocol_v2 import Action, Close, ProtocolV2, Upgrade, Authenticate, Reauthorize
from .listener import serve_listener
from .streams import PrefixedStream

if TYPE_CHECKING:
    from .nsqd import NSQD

RECEIVE_SIZE = 256 * 1024
MAGIC_TIMEOUT = 30.0
INF = float("inf")
# how long a closing connection waits for the peer to take our FIN
LINGER_TIMEOUT = 1.0
LINGER_POLL = 0.005
# how long the reader polls a quick request/response client before it waits
SPIN = 50e-6
# a reader that keeps finding input without waiting yields to the other tasks
# at least this often (seconds of its own work)
SLICE = 500e-6
# SIOCOUTQ: bytes sent but not yet acknowledged (our FIN counts as one)
_OUTQ = getattr(termios, "TIOCOUTQ", None)
# on plain TCP the reader does its own non-blocking read(2) and write(2)
_INLINE_IO = os.name == "posix"


def _trio_run_context() -> Any:
    """Where trio keeps the running loop (see _tasks_runnable); None if it moved."""
    try:
        from trio._core._run import GLOBAL_RUN_CONTEXT
    except ImportError:  # pragma: no cover - a trio without it: the public report
        return None
    return GLOBAL_RUN_CONTEXT


_RUN_CONTEXT = _trio_run_context()


class LingeringSocketStream(trio.abc.HalfCloseableStream):
    """A TCP stream whose close the client always reads as an orderly EOF.

    ``aclose`` half-closes first (our FIN goes out behind everything already
    sent), then keeps reading and discarding until the peer has acknowledged
    that FIN or closed its side (at most :data:`LINGER_TIMEOUT`), and only
    then closes the socket.  Input that arrives after that may still draw an
    RST from the kernel, but the client has already seen the EOF.  Stream
    wrappers (TLS, snappy, deflate) close down to this.

    (trio.SocketStream cannot be subclassed: this wraps one, its I/O methods
    bound straight through so reads and writes cost no extra call.)"""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.socket = stream.socket
        self.send_all = stream.send_all  # type: ignore[method-assign]
        self.receive_some = stream.receive_some  # type: ignore[method-assign]
        self.wait_send_all_might_not_block = stream.wait_send_all_might_not_block  # type: ignore[method-assign]
        self.send_eof = stream.send_eof  # type: ignore[method-assign]

    # the abstract methods, for the ABC (instances use the bound ones above)
    async def send_all(self, data: bytes | bytearray | memoryview) -> None:  # pragma: no cover
        raise NotImplementedError

    async def wait_send_all_might_not_block(self) -> None:  # pragma: no cover
        raise NotImplementedError

    async def receive_some(self, max_bytes: int | None = None) -> bytes:  # pragma: no cover
        raise NotImplementedError

    async def send_eof(self) -> None:  # pragma: no cover
        raise NotImplementedError

    async def aclose(self) -> None:
        sock = self.socket
        if sock.fileno() != -1:
            try:
                with trio.move_on_after(LINGER_TIMEOUT):
                    await _linger(sock)
            finally:
                sock.close()
        await trio.lowlevel.checkpoint()


async def _linger(sock: trio.socket.SocketType) -> None:
    fd = sock.fileno()
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:  # the peer reset or is gone: nothing to be orderly about
        return
    while _discard_input(fd) and _unacknowledged(fd):
        with trio.move_on_after(LINGER_POLL):
            await trio.lowlevel.wait_readable(sock)


def _read(fd: int) -> bytes | None:
    """A non-blocking read(2): None when nothing has arrived."""
    try:
        return os.read(fd, RECEIVE_SIZE)
    except BlockingIOError:
        return None
    except ConnectionError:
        raise
    except OSError as exc:
        raise trio.BrokenResourceError(str(exc)) from exc


def _tasks_runnable() -> int:
    """``trio.lowlevel.current_statistics().tasks_runnable``, read where trio
    keeps it (the run queue's length): the whole statistics report costs
    ~2 us, as much as a PUB's own work, and a reader asks before every spin.
    Falls back to the report if trio's internals ever move."""
    runq = getattr(getattr(_RUN_CONTEXT, "runner", None), "runq", None)
    if runq is None:
        return trio.lowlevel.current_statistics().tasks_runnable
    return len(runq)


def _spin_read(fd: int, until: float) -> bytes | None:
    """Poll with read(2) until ``perf_counter()`` reaches ``until``."""
    while perf_counter() < until:
        data = _read(fd)
        if data is not None:
            return data
    return None


def _discard_input(fd: int) -> bool:
    """Read what has arrived; False once the peer closed (or reset)."""
    try:
        while True:
            if not os.read(fd, RECEIVE_SIZE):
                return False
    except BlockingIOError:
        return True
    except OSError:
        return False


def _unacknowledged(fd: int) -> bool:
    if _OUTQ is None:  # no way to ask: the FIN was at least queued
        return False
    try:
        return struct.unpack("i", fcntl.ioctl(fd, _OUTQ, b"\0\0\0\0"))[0] > 0
    except OSError:
        return False


def _peer(stream: trio.SocketStream | LingeringSocketStream) -> str:
    try:
        host, port = stream.socket.getpeername()[:2]
    except OSError:
        return ""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class ConnectionV2:
    def __init__(self, nsqd: NSQD, stream: trio.abc.Stream, remote_address: str) -> None:
        self.nsqd = nsqd
        self.stream = stream
        # plain TCP: the socket, which the reader reads and writes with its
        # own non-blocking read(2)/write(2); None once the stream is upgraded
        self._fd: int | None = stream.socket.fileno() if _INLINE_IO and type(stream) is LingeringSocketStream else None
        self.client = nsqd.new_client(remote_address)
        self.proto = ProtocolV2(nsqd, self.client)
        self._lot = trio.lowlevel.ParkingLot()
        # wakeups come per delivered message: only pay for unparking when
        # the writer is actually waiting
        self._writer_parked = False
        self._processing = False
        self.client.wakeup = self._wake
        self._heartbeat_scope: trio.CancelScope | None = None
        # nsqd's read deadline, kept by the heartbeat task: while the reader
        # waits for the client (since when), and the scope it waits in
        self._reading_since: float | None = None
        self._read_scope = trio.CancelScope()
        # when the reader last let the other tasks run (perf_counter seconds)
        self._yielded_at = 0.0
        # its last answer came within SPIN: poll before waiting (see _receive)
        self._quick_client = False
        # one sender at a time: the writer task, or the reader while it
        # upgrades the stream (TLS/snappy/deflate) after IDENTIFY
        self._send_lock = trio.Lock()
        self._heartbeat_interval = self.client.heartbeat_interval
        self.log = nsqd.log.bind(client=remote_address)

    async def run(self, initial: bytes) -> None:
        self.log.info("TCP: new client")
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._heartbeats)
                nursery.start_soon(self._read_loop, initial, nursery.cancel_scope)
                await self._write_loop()
                nursery.cancel_scope.cancel()
        finally:
            self.proto.connection_lost()
            with trio.CancelScope(shield=True):
                # bounded: a TLS close_notify to a client that reads nothing
                with trio.move_on_after(2 * LINGER_TIMEOUT):
                    await self.stream.aclose()
            self.log.info("TCP: client closed")

    # ------------------------------------------------------------ reading

    async def _read_loop(self, initial: bytes, scope: trio.CancelScope) -> None:
        client = self.client
        proto = self.proto
        try:
            if initial:
                proto.receive_data(initial)
                await self._process()
            with self._read_scope:  # cancelled by the heartbeat task past the read deadline
                while not client.closing_connection:
                    data = await self._receive()
                    if not data:
                        break
                    proto.receive_data(data)
                    await self._process()
            if self._read_scope.cancelled_caught:
                self.log.warning("TCP: client missed heartbeats, closing", timeout=2 * client.heartbeat_interval)
        except (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError):
            pass
        except trio.TooSlowError:
            self.log.warning("TCP: write timed out, closing slow client")
        finally:
            # let the writer flush what is left (an error frame...), then stop
            client.closing_connection = True
            client.flush_now = True
            client.wakeup()

    async def _receive(self) -> bytes:
        """The next bytes from the client (b"" at EOF)."""
        fd = self._fd
        if fd is None:  # an upgraded stream (TLS, snappy, deflate)
            self._reading_since = trio.current_time()
            try:
                return bytes(await self.stream.receive_some(RECEIVE_SIZE))  # bytes already: not copied
            finally:
                self._reading_since = None
        # plain TCP: read(2) straight away, and wait only when nothing is
        # there (one trio socket layer less per request/response round trip)
        data = _read(fd)
        since = perf_counter()
        if data is None and self._quick_client and _tasks_runnable() == 0:
            # a client whose last answer came within SPIN (PUB, wait for OK,
            # PUB...) is polled for that long before the loop sleeps in epoll:
            # the sleep and the wake-up cost more than the client's whole turn
            # (Go's scheduler spins before it parks for the same reason).  Only
            # while nothing else is runnable.
            data = _spin_read(fd, since + SPIN)
        if data is not None:
            if since - self._yielded_at > SLICE:
                # a client that always has more must not starve the others;
                # but a scheduler pass costs as much as a PUB round trip, so
                # not one per read: once per SLICE of work (the wait below is one)
                await trio.lowlevel.checkpoint()
                self._yielded_at = perf_counter()
            return data
        self._reading_since = trio.current_time()
        try:
            while True:
                await trio.lowlevel.wait_readable(fd)
                data = _read(fd)
                if data is not None:
                    self._yielded_at = now = perf_counter()
                    self._quick_client = now - since < SPIN
                    return data
        finally:
            self._reading_since = None

    async def _process(self) -> None:
        proto = self.proto
        client = self.client
        # replies and messages produced now are flushed by this task at the
        # end (one task switch less per request/response round trip)
        self._processing = True
        try:
            while True:
                action = proto.process()
                if action is None:
                    break
                if isinstance(action, Close):
                    client.closing_connection = True
                    break
                await self._perform(action)
        finally:
            self._processing = False
        nsqd = self.nsqd
        if client.out and nsqd.sync_pending():
            # acknowledge nothing before it is as durable as --sync-every asks:
            # the writer holds this connection's replies until the sync is done
            # (a batch with nothing to say - FIN, NOP, RDY - keeps reading)
            client.hold_output = True
            try:
                await nsqd.sync_barrier()
            finally:
                client.hold_output = False
                if client.out:
                    client.flush_now = True
                    client.wakeup()
        if client.heartbeat_interval != self._heartbeat_interval:
            self._reset_heartbeat()
        if client.out and not client.hold_output:
            if not (client.flush_now and not client.closing_connection and self._write_now()):
                self._wake()

    def _write_now(self) -> bool:
        """Write the output from the reader, without ever blocking it (a
        reader stuck on a full socket would leave the client's commands
        unread).  False: the writer task must send (what is left)."""
        fd = self._fd
        if fd is None or self._send_lock.locked():
            return False
        client = self.client
        data = client.take_output()
        try:
            sent = os.write(fd, data)
        except BlockingIOError:
            sent = 0
        if sent == len(data):
            return True
        rest = data[sent:]
        client.out.insert(0, rest)
        client.out_size += len(rest)
        client.flush_now = True
        return False

    async def _perform(self, action: Action) -> None:
        if isinstance(action, Upgrade):
            await self._upgrade(action)
        elif isinstance(action, (Authenticate, Reauthorize)):
            auth = self.nsqd.auth
            state, error = await auth.authenticate(self, action)
            self.proto.auth_done(state, error)
        else:  # pragma: no cover
            raise AssertionError(action)

    async def _upgrade(self, action: Upgrade) -> None:
        """nsqd's order: the IDENTIFY reply in clear, then per layer the
        handshake (TLS) and an ``OK`` sent through the new layer."""
        client = self.client
        client.hold_output = True  # heartbeats wait until the layers are in place
        try:
            async with self._send_lock:
                await self._flush_locked()
                # bytes the client sent after IDENTIFY belong to the new layer
                self._fd = None  # from now on the layers read and write
                early = self.proto.parser.take_unparsed()
                if early:
                    self.stream = PrefixedStream(self.stream, early)
                for kind in action.kinds:
                    self.log.info("TCP: upgrading connection", to=kind)
                    try:
                        self.stream = await self.nsqd.upgrade_stream(self, kind, action)
                    except (trio.BrokenResourceError, trio.TooSlowError) as exc:
                        self.log.warning("TCP: connection upgrade failed, closing", to=kind, error=str(exc) or type(exc).__name__)
                        raise trio.BrokenResourceError(f"{kind} upgrade failed") from exc
                    self.proto.upgraded(kind)
                    await self._flush_locked()
        finally:
            client.hold_output = False
            if client.out:
                client.flush_now = True
                client.wakeup()

    # ------------------------------------------------------------ writing

    async def _send(self, data: bytes) -> None:
        lock = self._send_lock
        try:
            lock.acquire_nowait()  # the usual case, without a checkpoint
        except trio.WouldBlock:
            await lock.acquire()
        try:
            await self._send_locked(data)
        finally:
            lock.release()

    async def _send_locked(self, data: bytes) -> None:
        # nsqd's write deadline is the heartbeat interval: a consumer that
        # stops reading for that long is dropped, its messages requeued
        interval = self.client.heartbeat_interval
        with trio.CancelScope(deadline=trio.current_time() + (interval if interval > 0 else 60.0)) as scope:
            await self.stream.send_all(data)
        if scope.cancelled_caught:
            raise trio.TooSlowError

    async def _flush_locked(self) -> None:
        data = self.client.take_output()
        if data:
            await self._send_locked(data)

    def _wake(self) -> None:
        if self._writer_parked and not self._processing:
            self._lot.unpark_all()

    async def _park(self) -> None:
        self._writer_parked = True
        try:
            await self._lot.park()
        finally:
            self._writer_parked = False

    async def _write_loop(self) -> None:
        client = self.client
        park = self._park
        try:
            while True:
                if not client.out or client.hold_output:
                    if client.closing_connection and not client.hold_output:
                        return
                    await park()
                    continue
                if not client.flush_now and not client.closing_connection:
                    with trio.move_on_after(client.output_buffer_timeout):
                        while not client.flush_now:
                            await park()
                data = client.take_output()
                if data:
                    await self._send(data)
        except trio.TooSlowError:
            self.log.warning("TCP: write timed out, closing slow client")
        except (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError):
            pass

    # ------------------------------------------------------------ heartbeats

    async def _heartbeats(self) -> None:
        """nsqd's heartbeat ticker, and its read deadline: a client that sends
        nothing for twice the interval while the reader waits is dropped (kept
        here rather than as a cancel scope per read, which costs as much as
        the rest of a PUB round trip)."""
        client = self.client
        while True:
            interval = client.heartbeat_interval
            self._heartbeat_interval = interval
            if interval <= 0:  # no heartbeats, no read deadline
                with trio.CancelScope() as scope:
                    self._heartbeat_scope = scope
                    await trio.sleep_forever()
                self._heartbeat_scope = None
                continue
            beat = trio.current_time() + interval
            while True:
                since = self._reading_since
                read_deadline = INF if since is None else since + 2 * interval
                with trio.CancelScope(deadline=min(beat, read_deadline)) as scope:
                    self._heartbeat_scope = scope
                    await trio.sleep_forever()
                self._heartbeat_scope = None
                if client.heartbeat_interval != interval:
                    break  # IDENTIFY changed it: start over with the new one
                now = trio.current_time()
                since = self._reading_since
                if since is not None and now >= since + 2 * interval:
                    self._reading_since = None
                    self._read_scope.cancel()
                if now >= beat:
                    client.send_heartbeat()
                    break

    def _reset_heartbeat(self) -> None:
        # IDENTIFY changed the interval: restart the ticker with it
        scope = self._heartbeat_scope
        if scope is not None:
            scope.cancel()


async def handle_connection(nsqd: NSQD, stream: LingeringSocketStream) -> None:
    remote = _peer(stream)
    buf = b""
    serve = False
    try:
        with trio.move_on_after(MAGIC_TIMEOUT):
            while len(buf) < 4:
                data = await stream.receive_some(RECEIVE_SIZE)
                if not data:
                    break
                buf += data
        if buf[:4] == MAGIC_V2:
            serve = not nsqd.exiting
        elif len(buf) >= 4:
            nsqd.log.error("client bad protocol magic", client=remote, magic=repr(buf[:4]))
            with trio.move_on_after(1):
                await stream.send_all(encode_frame(FRAME_TYPE_ERROR, b"E_BAD_PROTOCOL"))
    except (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError):
        pass
    finally:
        if not serve:
            with trio.CancelScope(shield=True):
                await stream.aclose()
    if serve:
        await ConnectionV2(nsqd, stream, remote).run(buf[4:])


async def serve_tcp(nsqd: NSQD, listener: trio.SocketListener, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    async def handler(stream: trio.SocketStream) -> None:
        try:
            await handle_connection(nsqd, LingeringSocketStream(stream))
        except Exception:
            # a bug met by one connection must not take the daemon down
            nsqd.log.exception("TCP: connection failed", client=_peer(stream))

    await serve_listener(handler, listener, name="TCP", log=nsqd.log, task_status=task_status)
