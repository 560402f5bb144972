"""``pynsq_stat``: a live table of a topic/channel's numbers, summed over every
nsqd that has it (nsq_stat's flags and columns).

    pynsq_stat --topic=events --channel=archive --lookupd-http-address=127.0.0.1:4161
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from typing import Any, TextIO
from urllib.parse import quote

import attrs
import trio

from pynsqd.flags import flag_field, run_cli

from ..lookupd import QueryErrors, producer_http_addresses, query_lookupd
from .common import version_line, run_tool

HEADER_EVERY = 25


@attrs.define(kw_only=True)
class StatOptions:
    topic: str = flag_field("", flag="topic", kind="str", help="NSQ topic")
    channel: str = flag_field("", flag="channel", kind="str", help="NSQ channel")
    status_every: float = flag_field(2.0, flag="status-every", kind="duration", help="duration of time between polling/printing output")
    count: int = flag_field(0, flag="count", kind="int", help="number of reports (0: forever)")
    nsqd_http_addresses: list[str] = flag_field([], flag="nsqd-http-address", kind="strings", help="nsqd HTTP address (may be given multiple times)")
    lookupd_http_addresses: list[str] = flag_field(
        [], flag="lookupd-http-address", kind="strings", help="lookupd HTTP address (may be given multiple times)"
    )
    http_timeout: float = flag_field(2.0, flag="http-client-request-timeout", kind="duration", help="timeout for HTTP requests")
    version: bool = flag_field(False, flag="version", kind="bool", help="print version string")


@attrs.frozen
class ChannelSample:
    depth: int = 0
    backend_depth: int = 0
    in_flight: int = 0
    deferred: int = 0
    requeued: int = 0
    timed_out: int = 0
    messages: int = 0
    clients: int = 0
    nsqds: int = 0

    @property
    def memory_depth(self) -> int:
        return self.depth - self.backend_depth


def sum_channel(stats_docs: Iterable[dict[str, Any]], topic: str, channel: str) -> ChannelSample:
    """Add up one channel over several nsqds' ``/stats?format=json``."""
    totals = dict.fromkeys(("depth", "backend_depth", "in_flight", "deferred", "requeued", "timed_out", "messages", "clients", "nsqds"), 0)
    for doc in stats_docs:
        doc = doc.get("data", doc) if "topics" not in doc else doc
        for t in doc.get("topics") or []:
            if t.get("topic_name") != topic:
                continue
            for c in t.get("channels") or []:
                if c.get("channel_name") != channel:
                    continue
                totals["depth"] += c.get("depth", 0)
                totals["backend_depth"] += c.get("backend_depth", 0)
                totals["in_flight"] += c.get("in_flight_count", 0)
                totals["deferred"] += c.get("deferred_count", 0)
                totals["requeued"] += c.get("requeue_count", 0)
                totals["timed_out"] += c.get("timeout_count", 0)
                totals["messages"] += c.get("message_count", 0)
                totals["clients"] += c.get("client_count", len(c.get("clients") or []))
                totals["nsqds"] += 1
    return ChannelSample(**totals)


def header() -> str:
    return (
        "-----rate------+----------------depth----------------+--------------metadata---------------\n"
        f"{'ingress':>7} {'egress':>6} | {'total':>7} {'mem':>7} {'disk':>7} {'inflt':>5} {'def':>5} | "
        f"{'req':>7} {'t-o':>7} {'msgs':>12} {'clients':>7}"
    )


def row(cur: ChannelSample, prev: ChannelSample | None, interval: float) -> str:
    if prev is None or interval <= 0:
        ingress = egress = 0
    else:
        arrived = cur.messages - prev.messages
        ingress = int(arrived / interval)
        # what left the queue: arrivals minus the growth of the depth
        egress = int((arrived - (cur.depth - prev.depth)) / interval)
    return (
        f"{ingress:>7} {egress:>6} | {cur.depth:>7} {cur.memory_depth:>7} {cur.backend_depth:>7} {cur.in_flight:>5} "
        f"{cur.deferred:>5} | {cur.requeued:>7} {cur.timed_out:>7} {cur.messages:>12} {cur.clients:>7}"
    )


async def fetch_stats(address: str, topic: str, channel: str, timeout: float) -> dict[str, Any] | None:
    base = address if "://" in address else f"http://{address}"
    url = f"{base.rstrip('/')}/stats?format=json&topic={quote(topic)}&channel={quote(channel)}"
    from pynsqd.http_client import HTTPClientError, http_get

    try:
        resp = await http_get(url, timeout=timeout)
        if resp.status != 200:
            return None
        doc = resp.json()
    except (HTTPClientError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


async def sample(opts: StatOptions) -> ChannelSample:
    addresses = set(opts.nsqd_http_addresses)

    async def lookup(address: str) -> None:
        try:
            producers = await query_lookupd(address, opts.topic, opts.http_timeout)
        except QueryErrors:
            return
        addresses.update(producer_http_addresses(producers))

    async with trio.open_nursery() as nursery:
        for address in opts.lookupd_http_addresses:
            nursery.start_soon(lookup, address)
    docs: list[dict[str, Any]] = []

    async def one(address: str) -> None:
        doc = await fetch_stats(address, opts.topic, opts.channel, opts.http_timeout)
        if doc is not None:
            docs.append(doc)

    async with trio.open_nursery() as nursery:
        for address in sorted(addresses):
            nursery.start_soon(one, address)
    return sum_channel(docs, opts.topic, opts.channel)


async def stat_loop(opts: StatOptions, out: TextIO) -> int:
    prev: ChannelSample | None = None
    prev_at = 0.0
    i = 0
    while not opts.count or i < opts.count:
        if i:
            await trio.sleep_until(prev_at + opts.status_every)
        now = trio.current_time()
        cur = await sample(opts)
        if i % HEADER_EVERY == 0:
            out.write(header() + "\n")
        out.write(row(cur, prev, now - prev_at if prev is not None else 0.0) + "\n")
        out.flush()
        prev, prev_at = cur, now
        i += 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    opts, _ = run_cli("pynsq_stat", StatOptions, args)
    if opts.version:
        print(version_line("pynsq_stat"))
        return 0
    if not opts.topic or not opts.channel:
        sys.stderr.write("pynsq_stat: --topic and --channel are required\n")
        return 1
    if not opts.nsqd_http_addresses and not opts.lookupd_http_addresses:
        sys.stderr.write("pynsq_stat: --nsqd-http-address or --lookupd-http-address required\n")
        return 1
    if opts.status_every <= 0:
        sys.stderr.write("pynsq_stat: --status-every must be positive\n")
        return 1
    return run_tool(stat_loop, opts, sys.stdout)


if __name__ == "__main__":
    raise SystemExit(main())
