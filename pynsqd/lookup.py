"""nsqd's side of nsqlookupd: registration over TCP protocol V1, and asking
the lookupds for a new topic's channels.

What nsqd 1.3.0 does, and so what this does:

* one connection per ``--lookupd-tcp-address``: magic ``"  V1"``, then
  ``IDENTIFY`` with ``{broadcast_address, hostname, http_port, tcp_port,
  version}`` (the broadcast ports default to the real ones); the reply tells
  the lookupd's own broadcast address and HTTP port;
* right after IDENTIFY, on every (re)connect: ``REGISTER topic channel`` for
  every channel of every topic, or ``REGISTER topic`` for a topic without
  channels -- ephemeral ones included (lookupd drops everything of a peer
  whose connection closes, so a reconnect must tell it all again);
* creating/deleting a topic or channel sends ``REGISTER``/``UNREGISTER`` to
  every lookupd; ``PING`` every 15 s keeps the producer active;
* ``PUT /config/nsqlookupd_tcp_addresses`` adds and removes peers live;
* a topic created while lookupds are known asks every lookupd's
  ``/channels?topic=`` and creates the (non-ephemeral) channels before the
  topic delivers, so the first messages reach channels that consumers use on
  other nsqds.

Where we differ, on purpose: Go reconnects lazily on the next command or PING
(up to 15 s later) and notices a dead lookupd only when it next writes; here a
reader notices at once and we reconnect with a short backoff.  Go blocks the
publishing goroutine while it asks the lookupds for channels; here the topic
is *held* (messages wait in it) and the publish returns at once.  Only lookupds
we are connected to are asked, so a dead one costs no timeout.

The first half of the module is sans-IO (what to send, the per-peer queue,
backoff); :class:`Lookup` and :class:`LookupPeer` are the trio edge.
"""

from __future__ import annotations

import json
import math
import random
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import quote

import attrs
import trio

from .http_client import HTTPClientError, http_get
from .listener import format_address, parse_address
from .log import get_logger
from .protocol import MAGIC_V1, ProtocolError, V1ResponseDecoder, encode_command, is_ephemeral, is_valid_channel_name

if TYPE_CHECKING:
    from .channel import Channel
    from .nsqd import NSQD
    from .topic import Topic

PING_INTERVAL = 15.0
CONNECT_TIMEOUT = 2.0
# Go allows 1 s per read/write; a loaded box deserves more
REPLY_TIMEOUT = 5.0
BACKOFF_MIN = 0.1
BACKOFF_MAX = 5.0
# commands written to a lookupd before reading their replies
MAX_BATCH = 256
RECEIVE_SIZE = 65536
# nsqd's http_api client asks for the V1 (bare JSON) answers
V1_ACCEPT = "application/vnd.nsq; version=1.0"

PING = encode_command(b"PING")

# ---------------------------------------------------------------- sans-IO: what to send


def identify_body(*, version: str, tcp_port: int, http_port: int, hostname: str, broadcast_address: str) -> bytes:
    """The IDENTIFY JSON, exactly the five fields nsqd sends (Go marshals a
    map, so the keys come out sorted)."""
    info = {
        "broadcast_address": broadcast_address,
        "hostname": hostname,
        "http_port": http_port,
        "tcp_port": tcp_port,
        "version": version,
    }
    return json.dumps(info, separators=(",", ":")).encode()


def identify_command(**info: Any) -> bytes:
    return encode_command(b"IDENTIFY", body=identify_body(**info))


def register_command(topic: str, channel: str = "") -> bytes:
    return encode_command(b"REGISTER", topic, *([channel] if channel else []))


def unregister_command(topic: str, channel: str = "") -> bytes:
    return encode_command(b"UNREGISTER", topic, *([channel] if channel else []))


def event_command(event: str, topic: str, channel: str = "") -> bytes | None:
    """The command an nsqd event sends to every lookupd (None: nothing)."""
    if event == "topic_created":
        return register_command(topic)
    if event == "topic_deleted":
        return unregister_command(topic)
    if event == "channel_created":
        return register_command(topic, channel)
    if event == "channel_deleted":
        return unregister_command(topic, channel)
    return None


class _TopicLike(Protocol):
    @property
    def channels(self) -> Mapping[str, Any]: ...


def registration_commands(topics: Mapping[str, _TopicLike]) -> list[bytes]:
    """Everything a freshly connected lookupd must be told: each channel of
    each topic, or the bare topic when it has none (REGISTER with a channel
    registers its topic too)."""
    out: list[bytes] = []
    for name, topic in topics.items():
        if topic.channels:
            out.extend(register_command(name, cname) for cname in topic.channels)
        else:
            out.append(register_command(name))
    return out


@attrs.frozen
class LookupdInfo:
    """What a lookupd says about itself in its IDENTIFY reply."""

    tcp_port: int = 0
    http_port: int = 0
    version: str = ""
    broadcast_address: str = ""
    hostname: str = ""

    @classmethod
    def parse(cls, data: bytes) -> LookupdInfo:
        try:
            raw = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            raise ValueError(f"IDENTIFY reply is not JSON: {data[:200]!r}") from None
        if not isinstance(raw, dict):
            raise ValueError(f"IDENTIFY reply is not a JSON object: {data[:200]!r}")
        fields: dict[str, Any] = {}
        for name, kind in (("tcp_port", int), ("http_port", int), ("version", str), ("broadcast_address", str), ("hostname", str)):
            value = raw.get(name)
            if value is None:
                continue
            if not isinstance(value, kind) or isinstance(value, bool):
                raise ValueError(f"IDENTIFY reply: bad {name} {value!r}")
            fields[name] = value
        return cls(**fields)

    @property
    def http_address(self) -> str | None:
        """``host:port`` of its HTTP API, as nsqd derives it (None without a
        broadcast address)."""
        if not self.broadcast_address or not self.http_port:
            return None
        return format_address(self.broadcast_address, self.http_port)


class PeerQueue:
    """The commands one lookupd connection still has to send.

    Events are queued only while connected: a connection that comes (back)
    starts from :meth:`connect` with the full registration list taken at that
    moment, which already reflects everything that happened before."""

    def __init__(self) -> None:
        self.connected = False
        self._pending: deque[bytes] = deque()

    def connect(self, commands: Iterable[bytes]) -> None:
        self.connected = True
        self._pending = deque(commands)

    def disconnect(self) -> None:
        self.connected = False
        self._pending.clear()

    def push(self, command: bytes) -> bool:
        if not self.connected:
            return False
        self._pending.append(command)
        return True

    def take(self, limit: int = MAX_BATCH) -> list[bytes]:
        out: list[bytes] = []
        while self._pending and len(out) < limit:
            out.append(self._pending.popleft())
        return out

    def __len__(self) -> int:
        return len(self._pending)


class Backoff:
    """Exponential reconnect delays with jitter, reset by a good connect."""

    def __init__(
        self,
        minimum: float = BACKOFF_MIN,
        maximum: float = BACKOFF_MAX,
        factor: float = 2.0,
        jitter: float = 0.2,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.minimum = minimum
        self.maximum = maximum
        self.factor = factor
        self.jitter = jitter
        self._rand = rand
        self._current = minimum

    def next(self) -> float:
        delay = self._current
        self._current = min(self.maximum, self._current * self.factor)
        return delay * (1 + self.jitter * (2 * self._rand() - 1))

    def reset(self) -> None:
        self._current = self.minimum


def union_channels(answers: Iterable[Any]) -> list[str]:
    """The sorted union of ``/channels`` answers (``{"channels": [...]}``);
    malformed answers contribute nothing."""
    names: set[str] = set()
    for answer in answers:
        channels = answer.get("channels") if isinstance(answer, dict) else None
        if isinstance(channels, list):
            names.update(c for c in channels if isinstance(c, str))
    return sorted(names)


def channels_to_precreate(names: Iterable[str]) -> list[str]:
    """Ephemeral channels are not created without a consumer (Go skips them),
    nor names a lookupd should never have handed out."""
    return [n for n in names if not is_ephemeral(n) and is_valid_channel_name(n)]


# ---------------------------------------------------------------- trio edge


async def query_lookupd_channels(
    topic: str, addresses: list[str], *, timeout: float, connect_timeout: float
) -> tuple[list[str], list[str]]:
    """Ask every lookupd (``host:port`` of its HTTP API) for the topic's
    channels, concurrently.  -> (sorted union of channels, errors)."""
    answers: list[Any] = []
    errors: list[str] = []

    async def ask(address: str) -> None:
        url = f"http://{address}/channels?topic={quote(topic, safe='')}"
        try:
            resp = await http_get(url, headers={"Accept": V1_ACCEPT}, timeout=timeout, connect_timeout=connect_timeout)
            if resp.status != 200:
                raise HTTPClientError(f"{url}: status {resp.status} {resp.body[:200]!r}")
            answers.append(resp.json())
        except (HTTPClientError, ValueError) as exc:
            errors.append(str(exc))

    with trio.move_on_after(timeout + 0.5) as scope:
        async with trio.open_nursery() as nursery:
            for address in addresses:
                nursery.start_soon(ask, address)
    if scope.cancelled_caught:
        errors.append(f"timed out after {timeout}s")
    return union_channels(answers), errors


class _PeerError(Exception):
    pass


_CONNECTION_ERRORS = (OSError, trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError, ProtocolError, _PeerError)


class LookupPeer:
    """One lookupd: connect, IDENTIFY, register everything, then forward
    events and PING; reconnect with backoff whenever the connection ends."""

    def __init__(self, lookup: Lookup, address: str) -> None:
        self.lookup = lookup
        self.address = address
        self.queue = PeerQueue()
        self.info: LookupdInfo | None = None
        self.cancel_scope = trio.CancelScope()
        self.backoff = Backoff(lookup.backoff_min, lookup.backoff_max)
        self.log = get_logger(lookupd=address)
        self._wakeup = trio.Event()
        self._error: str | None = None

    @property
    def connected(self) -> bool:
        return self.queue.connected

    def push(self, command: bytes) -> None:
        if self.queue.push(command):
            self._wakeup.set()

    async def run(self) -> None:
        with self.cancel_scope:
            while True:
                self._error = None
                try:
                    await self._session()
                except _CONNECTION_ERRORS as exc:
                    self._error = self._error or _describe(exc)
                finally:
                    was_connected = self.queue.connected
                    self.queue.disconnect()
                if was_connected:
                    self.log.warning("LOOKUPD: disconnected", error=self._error)
                else:
                    self.log.info("LOOKUPD: connect failed", error=self._error)
                await trio.sleep(self.backoff.next())

    async def _session(self) -> None:
        try:
            host, port = parse_address(self.address)
        except ValueError as exc:
            raise _PeerError(str(exc)) from None
        self.log.debug("LOOKUPD: connecting")
        with trio.fail_after(CONNECT_TIMEOUT):
            stream = await trio.open_tcp_stream(host, port)
        try:
            decoder = V1ResponseDecoder(self.lookup.nsqd.options.max_body_size)
            identify = identify_command(**self.lookup.identify_info())
            with trio.fail_after(REPLY_TIMEOUT):
                await stream.send_all(MAGIC_V1 + identify)
                reply = await _read_one(stream, decoder)
            if reply.startswith(b"E_"):
                raise _PeerError(f"IDENTIFY refused - {reply.decode(errors='replace')}")
            try:
                self.info = info = LookupdInfo.parse(reply)
            except ValueError as exc:
                raise _PeerError(str(exc)) from None
            # the snapshot and the switch to "connected" happen together, so
            # every later event is queued after it and none is missed
            commands = registration_commands(self.lookup.nsqd.topics)
            self.queue.connect(commands)
            self.backoff.reset()
            self.log.info(
                "LOOKUPD: connected",
                broadcast_address=info.broadcast_address,
                http_port=info.http_port,
                version=info.version,
                registrations=len(commands),
            )
            if info.http_address is None:
                self.log.error("LOOKUPD: no broadcast address, cannot ask it for channels")
            replies_send, replies_recv = trio.open_memory_channel[bytes](math.inf)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read_loop, stream, decoder, replies_send, nursery.cancel_scope)
                try:
                    await self._write_loop(stream, replies_recv)
                except _CONNECTION_ERRORS as exc:
                    self._error = self._error or _describe(exc)
                nursery.cancel_scope.cancel()
            raise _PeerError(self._error or "connection ended")
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await stream.aclose()

    async def _read_loop(
        self, stream: trio.abc.Stream, decoder: V1ResponseDecoder, replies: trio.MemorySendChannel[bytes], scope: trio.CancelScope
    ) -> None:
        try:
            while True:
                while (reply := decoder.next_response()) is not None:
                    replies.send_nowait(reply)
                data = await stream.receive_some(RECEIVE_SIZE)
                if not data:
                    raise _PeerError("connection closed by lookupd")
                decoder.receive_data(data)
        except _CONNECTION_ERRORS as exc:
            self._error = self._error or _describe(exc)
        scope.cancel()

    async def _write_loop(self, stream: trio.abc.Stream, replies: trio.MemoryReceiveChannel[bytes]) -> None:
        interval = self.lookup.ping_interval
        next_ping = trio.current_time() + interval
        while True:
            batch = self.queue.take(MAX_BATCH)
            now = trio.current_time()
            if now >= next_ping:
                batch.append(PING)
                next_ping = now + interval
            if not batch:
                if self._wakeup.is_set():
                    self._wakeup = trio.Event()
                with trio.move_on_at(next_ping):
                    await self._wakeup.wait()
                continue
            with trio.fail_after(REPLY_TIMEOUT):
                await stream.send_all(b"".join(batch))
            for command in batch:
                with trio.fail_after(REPLY_TIMEOUT):
                    reply = await replies.receive()
                line = command.rstrip(b"\n").decode(errors="replace")
                if reply != b"OK":
                    # lookupd errors are fatal: the connection is closing
                    self.log.error("LOOKUPD: command failed", command=line, reply=reply.decode(errors="replace"))
                else:
                    self.log.debug("LOOKUPD: sent", command=line)


async def _read_one(stream: trio.abc.Stream, decoder: V1ResponseDecoder) -> bytes:
    while (reply := decoder.next_response()) is None:
        data = await stream.receive_some(RECEIVE_SIZE)
        if not data:
            raise _PeerError("connection closed by lookupd")
        decoder.receive_data(data)
    return reply


def _describe(exc: BaseException) -> str:
    if isinstance(exc, trio.TooSlowError):
        return "timed out"
    return str(exc) or type(exc).__name__


class Lookup:
    """The lookupd subsystem of one nsqd: ``Lookup(nsqd).install()``."""

    def __init__(self, nsqd: NSQD) -> None:
        self.nsqd = nsqd
        self.peers: dict[str, LookupPeer] = {}
        self.ping_interval = PING_INTERVAL
        self.backoff_min = BACKOFF_MIN
        self.backoff_max = BACKOFF_MAX
        self.log = get_logger()
        self._nursery: trio.Nursery | None = None

    def install(self) -> Lookup:
        self.nsqd.event_hooks.append(self.on_event)
        self.nsqd.options_changed_hooks.append(self.update_peers)
        self.nsqd.services.append(self.run)
        return self

    def identify_info(self) -> dict[str, Any]:
        n = self.nsqd
        o = n.options
        return {
            "version": n.version,
            "tcp_port": o.broadcast_tcp_port or n.tcp_port,
            "http_port": o.broadcast_http_port or n.http_port,
            "hostname": n.hostname,
            "broadcast_address": o.broadcast_address,
        }

    async def run(self) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self.update_peers()
                await trio.sleep_forever()
        finally:
            self._nursery = None
            for peer in self.peers.values():
                peer.queue.disconnect()
            if self.peers:
                self.log.info("LOOKUP: closing")

    def update_peers(self) -> None:
        """Start a peer for each configured address that has none, stop those
        no longer configured (``PUT /config/nsqlookupd_tcp_addresses``)."""
        if self._nursery is None:
            return
        wanted = list(dict.fromkeys(self.nsqd.options.lookupd_tcp_addresses))
        for address in [a for a in self.peers if a not in wanted]:
            peer = self.peers.pop(address)
            peer.log.info("LOOKUP: removing peer")
            peer.queue.disconnect()
            peer.cancel_scope.cancel()
        for address in wanted:
            if address not in self.peers:
                peer = LookupPeer(self, address)
                self.peers[address] = peer
                peer.log.info("LOOKUP: adding peer")
                self._nursery.start_soon(peer.run)

    def http_addresses(self) -> list[str]:
        """HTTP addresses of the lookupds we are connected to."""
        out = []
        for peer in self.peers.values():
            if peer.connected and peer.info is not None and peer.info.http_address:
                out.append(peer.info.http_address)
        return list(dict.fromkeys(out))

    def on_event(self, event: str, topic: Topic, channel: Channel | None) -> None:
        command = event_command(event, topic.name, channel.name if channel is not None else "")
        if command is not None:
            for peer in self.peers.values():
                peer.push(command)
        if event == "topic_created":
            self._precreate_channels(topic)

    # ------------------------------------------------------------ new topics

    def _precreate_channels(self, topic: Topic) -> None:
        addresses = self.http_addresses()
        if not addresses:
            if self._nursery is not None and self.nsqd.options.lookupd_tcp_addresses:
                self.log.error("no available nsqlookupd to query for channels to pre-create for topic", topic=topic.name)
            return
        topic.hold()
        if not self.nsqd.start_soon(self._query_and_create, topic, addresses):
            topic.release()

    async def _query_and_create(self, topic: Topic, addresses: list[str]) -> None:
        o = self.nsqd.options
        try:
            channels, errors = await query_lookupd_channels(
                topic.name, addresses, timeout=o.http_client_request_timeout, connect_timeout=o.http_client_connect_timeout
            )
            if errors:
                self.log.warning(
                    "failed to query nsqlookupd for channels to pre-create for topic", topic=topic.name, errors="; ".join(errors)
                )
            if topic.exiting or self.nsqd.topics.get(topic.name) is not topic:
                return
            created = [name for name in channels_to_precreate(channels) if name not in topic.channels]
            for name in created:
                topic.get_channel(name)
            if created:
                self.log.info("pre-created channels from nsqlookupd", topic=topic.name, channels=",".join(created))
        finally:
            topic.release()
