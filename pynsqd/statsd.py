"""Pushing stats to statsd over UDP, as nsqd's statsdLoop does.

Every ``--statsd-interval`` nsqd sends, under ``--statsd-prefix``:

- per topic: ``topic.T.message_count`` / ``.message_bytes`` (counters: the
  change since the last push), ``.depth`` / ``.backend_depth`` (gauges) and
  ``.e2e_processing_latency_P`` (gauges, P = quantile * 100, rounded);
- per channel ``topic.T.channel.C.``: ``message_count``, ``requeue_count``,
  ``timeout_count`` (counters), ``depth``, ``backend_depth``,
  ``in_flight_count``, ``deferred_count``, ``clients``, e2e percentiles
  (gauges);
- with ``--statsd-mem-stats``: ``mem.*`` gauges and ``mem.gc_runs`` (counter).

Lines are ``<prefix><stat>:<value>|c`` or ``|g``, newline terminated, packed
into datagrams of at most ``--statsd-udp-packet-size`` bytes (nsqd's
boundary-buffered writer: a line never straddles two packets).

``StatsdReport`` (line building, counter deltas) and ``pack`` are plain code;
``StatsdService.run`` is the trio edge the daemon runs as a service.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import trio

from .protocol import is_ephemeral
from .stats import memory_stats

if TYPE_CHECKING:
    from .nsqd import NSQD

_MEM_GAUGES = (
    "heap_objects",
    "heap_idle_bytes",
    "heap_in_use_bytes",
    "heap_released_bytes",
    "gc_pause_usec_100",
    "gc_pause_usec_99",
    "gc_pause_usec_95",
    "next_gc_bytes",
)


def host_key(host: str) -> str:
    """nsqd's statsd.HostKey: dots and colons become underscores."""
    return host.replace(".", "_").replace(":", "_")


def join_host_port(host: str, port: int) -> str:
    """Go's net.JoinHostPort."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def make_prefix(prefix: str, broadcast_address: str, http_port: int) -> str:
    """``--statsd-prefix`` with ``%s`` replaced by the host key of
    ``<broadcast-address>:<http port>``, ending in a dot (empty stays empty)."""
    if not prefix:
        return ""
    out = prefix.replace("%s", host_key(join_host_port(broadcast_address, http_port)))
    return out if out.endswith(".") else out + "."


def percentile_suffix(quantile: float) -> str:
    """Go's ``%.0f`` of quantile * 100 (0.99 -> "99", 0.999 -> "100")."""
    return f"{quantile * 100.0:.0f}"


class StatsdReport:
    """Builds the lines of each push; remembers the previous counters so that
    counters go out as deltas, as nsqd sends them."""

    def __init__(self, prefix: str, *, exclude_ephemeral: bool = False) -> None:
        self.prefix = prefix
        self.exclude_ephemeral = exclude_ephemeral
        self._last: dict[str, int] = {}
        self._now: dict[str, int] = {}
        self._lines: list[str] = []

    def _gauge(self, stat: str, value: int | float) -> None:
        self._lines.append(f"{self.prefix}{stat}:{int(value)}|g\n")

    def _counter(self, stat: str, total: int) -> None:
        self._now[stat] = total
        delta = total - self._last.get(stat, 0)
        if delta < 0:
            # the topic/channel was deleted and created again: nsqd would send a
            # wrapped-around uint64 here; the new total is the honest delta
            delta = total
        self._lines.append(f"{self.prefix}{stat}:{delta}|c\n")

    def _latency(self, stat: str, result: dict[str, Any] | None) -> None:
        for p in (result or {}).get("percentiles") or []:
            self._gauge(f"{stat}.e2e_processing_latency_{percentile_suffix(p['quantile'])}", p["value"])

    def lines(self, topics: Iterable[dict[str, Any]], mem: dict[str, int] | None = None) -> list[str]:
        """The lines for one push, from ``/stats``-shaped topic dicts."""
        self._lines = []
        self._now = {}
        for t in topics:
            name = t["topic_name"]
            if self.exclude_ephemeral and is_ephemeral(name):
                continue
            base = f"topic.{name}"
            self._counter(f"{base}.message_count", t["message_count"])
            self._counter(f"{base}.message_bytes", t["message_bytes"])
            self._gauge(f"{base}.depth", t["depth"])
            self._gauge(f"{base}.backend_depth", t["backend_depth"])
            self._latency(base, t.get("e2e_processing_latency"))
            for c in t["channels"]:
                cname = c["channel_name"]
                if self.exclude_ephemeral and is_ephemeral(cname):
                    continue
                cbase = f"{base}.channel.{cname}"
                self._counter(f"{cbase}.message_count", c["message_count"])
                self._gauge(f"{cbase}.depth", c["depth"])
                self._gauge(f"{cbase}.backend_depth", c["backend_depth"])
                self._gauge(f"{cbase}.in_flight_count", c["in_flight_count"])
                self._gauge(f"{cbase}.deferred_count", c["deferred_count"])
                self._counter(f"{cbase}.requeue_count", c["requeue_count"])
                self._counter(f"{cbase}.timeout_count", c["timeout_count"])
                self._gauge(f"{cbase}.clients", c["client_count"])
                self._latency(cbase, c.get("e2e_processing_latency"))
        if mem is not None:
            for key in _MEM_GAUGES:
                self._gauge(f"mem.{key}", mem.get(key, 0))
            self._counter("mem.gc_runs", mem.get("gc_total_runs", 0))
        # what is not reported this time (deleted, excluded) starts from zero next time
        self._last = self._now
        lines, self._lines = self._lines, []
        return lines


def pack(lines: Iterable[str], packet_size: int) -> list[bytes]:
    """Lines packed into datagrams of at most ``packet_size`` bytes; a line
    longer than that goes alone (as Go's bufio writes it through)."""
    packets: list[bytes] = []
    buf = bytearray()
    for line in lines:
        data = line.encode()
        if len(data) > packet_size - len(buf) and buf:
            packets.append(bytes(buf))
            buf.clear()
        if len(data) >= packet_size:
            packets.append(data)
            continue
        buf += data
    if buf:
        packets.append(bytes(buf))
    return packets


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"invalid statsd address {address!r}")
    return host.strip("[]"), int(port)


class StatsdService:
    """The daemon's statsd task: every interval, one report, sent as UDP datagrams."""

    def __init__(self, nsqd: NSQD) -> None:
        self.nsqd = nsqd
        self.log = nsqd.log
        self.report: StatsdReport | None = None

    def _report(self) -> StatsdReport:
        if self.report is None:
            n = self.nsqd
            o = n.options
            # the HTTP port is known once the daemon listens, before services start
            port = o.broadcast_http_port or n.http_port
            self.report = StatsdReport(make_prefix(o.statsd_prefix, o.broadcast_address, port), exclude_ephemeral=o.statsd_exclude_ephemeral)
        return self.report

    def build_packets(self) -> list[bytes]:
        o = self.nsqd.options
        topics = self.nsqd.stats(include_clients=False)["topics"]
        mem = memory_stats() if o.statsd_mem_stats else None
        return pack(self._report().lines(topics, mem), o.statsd_udp_packet_size)

    async def push(self) -> None:
        address = self.nsqd.options.statsd_address
        packets = self.build_packets()
        self.log.info("STATSD: pushing stats", address=address)
        try:
            host, port = split_address(address)
            infos = await trio.socket.getaddrinfo(host, port, type=trio.socket.SOCK_DGRAM)
            family, type_, proto, _, sockaddr = infos[0]
            with trio.socket.socket(family, type_, proto) as sock:
                await sock.connect(sockaddr)
                for packet in packets:
                    try:
                        await sock.send(packet)
                    except ConnectionRefusedError:
                        # ICMP port unreachable from an earlier datagram: nobody listens yet
                        continue
        except (OSError, ValueError) as exc:
            self.log.error("STATSD: failed to send", address=address, error=str(exc))

    async def run(self) -> None:
        interval = self.nsqd.options.statsd_interval
        try:
            while True:
                await trio.sleep(interval)
                await self.push()
        finally:
            self.log.info("STATSD: closing")
