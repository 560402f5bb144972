"""``pynsq_stat``: a live table of one channel's numbers, summed over every
nsqd that has its topic, as Go's ``nsq_stat``.

    pynsq_stat --topic=events --channel=archive --lookupd-http-address=127.0.0.1:4161

Go's flags, columns and exit codes: the first poll is the baseline, each
``--interval`` prints one row (``--count`` rows, then exit 0); a header every
25 rows.  Any failure -- an nsqd or lookupd that does not answer, a topic or
channel that does not exist -- is printed and exits 1: a monitoring tool
must never show "idle" for "unreachable".

Where we differ on purpose: ``--lookupd-http-address`` and
``--nsqd-http-address`` also take URLs (``http://host:port``); the error says
which node failed and why (Go: "failed to query any nsqd: " for a topic
that does not exist).
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Set as AbstractSet, Iterable, Sequence
from typing import Any, TextIO
from urllib.parse import quote

import attrs
import trio

from pynsqd.flags import flag_field

from ..lookupd import QueryErrors, lookup_url, parse_lookup, producer_http_addresses
from .common import (
    ToolExit,
    http_timeout_flags,
    lookupd_http_addresses_flag,
    run_tool,
    tool_main,
    tool_name,
    version_flag,
)

PROG = tool_name("nsq_stat")
HEADER_EVERY = 25


@attrs.define(kw_only=True)
class StatOptions:
    topic: str = flag_field("", flag="topic", kind="str", help="NSQ topic")
    channel: str = flag_field("", flag="channel", kind="str", help="NSQ channel")
    interval: float = flag_field(2.0, flag="interval", kind="duration", help="duration of time between polling/printing output")
    count: int = flag_field(0, flag="count", kind="int", help="number of reports (default: until interrupted)")
    nsqd_http_addresses: list[str] = flag_field([], flag="nsqd-http-address", kind="strings", help="nsqd HTTP address (may be given multiple times)")
    lookupd_http_addresses: list[str] = lookupd_http_addresses_flag()
    http_connect_timeout, http_request_timeout = http_timeout_flags(5.0)
    version: bool = version_flag()


def check(opts: StatOptions, given: AbstractSet[str]) -> str | None:
    """Go's start-up checks, in Go's order."""
    if not opts.topic or not opts.channel:
        return "--topic and --channel are required"
    if opts.interval <= 0:
        return "--interval should be positive"
    if opts.http_connect_timeout <= 0:
        return "--http-client-connect-timeout should be positive"
    if opts.http_request_timeout <= 0:
        return "--http-client-request-timeout should be positive"
    if "count" in given and opts.count <= 0:
        return "--count should be positive"
    if not opts.nsqd_http_addresses and not opts.lookupd_http_addresses:
        return "--nsqd-http-address or --lookupd-http-address required"
    if opts.nsqd_http_addresses and opts.lookupd_http_addresses:
        return "use --nsqd-http-address or --lookupd-http-address not both"
    return None


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


class StatError(Exception):
    """Why there is no sample; printed as nsq_stat's ``ERROR: ...`` line."""


def sum_channel(stats_docs: Iterable[dict[str, Any]], topic: str, channel: str) -> ChannelSample:
    """Add up one channel over several nsqds' ``/stats?format=json``;
    StatError if no nsqd has the topic, or none has the channel."""
    totals = dict.fromkeys(("depth", "backend_depth", "in_flight", "deferred", "requeued", "timed_out", "messages", "clients", "nsqds"), 0)
    topic_seen = False
    for doc in stats_docs:
        doc = doc.get("data", doc) if "topics" not in doc else doc  # pre-1.0 nsqd wraps it
        for t in doc.get("topics") or []:
            if t.get("topic_name") != topic:
                continue
            topic_seen = True
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
    if not topic_seen:
        raise StatError(f"failed to find topic({topic}) on any nsqd")
    if not totals["nsqds"]:
        raise StatError(f"failed to find channel({channel}) in stats metadata for topic({topic})")
    return ChannelSample(**totals)


def header() -> str:
    return (
        "------rate------+----------------depth----------------+--------------metadata---------------\n"
        f"{'ingress':>7} {'egress':>7} | {'total':>7} {'mem':>7} {'disk':>7} {'inflt':>5} {'def':>5} | "
        f"{'req':>7} {'t-o':>7} {'msgs':>12} {'clients':>7}"
    )


def row(cur: ChannelSample, prev: ChannelSample, interval: float) -> str:
    arrived = cur.messages - prev.messages
    ingress = int(arrived / interval)
    # what left the queue: arrivals minus the growth of the depth
    egress = int((arrived - (cur.depth - prev.depth)) / interval)
    return (
        f"{ingress:>7} {egress:>7} | {cur.depth:>7} {cur.memory_depth:>7} {cur.backend_depth:>7} {cur.in_flight:>5} "
        f"{cur.deferred:>5} | {cur.requeued:>7} {cur.timed_out:>7} {cur.messages:>12} {cur.clients:>7}"
    )


def _url(address: str, path: str) -> str:
    base = address if "://" in address else f"http://{address}"
    return base.rstrip("/") + path


async def _get_json(url: str, opts: StatOptions) -> Any:
    from pynsqd.http_client import HTTPClientError, http_get

    try:
        resp = await http_get(url, timeout=opts.http_request_timeout, connect_timeout=opts.http_connect_timeout)
    except HTTPClientError as exc:
        raise StatError(str(exc)) from exc
    if resp.status != 200:
        raise StatError(f"GET {url}: HTTP {resp.status} {resp.body[:200].decode(errors='replace')}")
    try:
        return resp.json()
    except ValueError:
        raise StatError(f"GET {url}: not JSON: {resp.body[:200]!r}") from None


async def producers(opts: StatOptions) -> list[str]:
    """The nsqds' HTTP addresses: as given, or every lookupd's answer
    (one lookupd not answering fails the sample, as in Go)."""
    if not opts.lookupd_http_addresses:
        return sorted(set(opts.nsqd_http_addresses))
    found: set[str] = set()
    errors: list[str] = []

    async def lookup(address: str) -> None:
        from pynsqd.http_client import HTTPClientError, http_get

        url = lookup_url(address, opts.topic)
        try:
            resp = await http_get(url, timeout=opts.http_request_timeout, connect_timeout=opts.http_connect_timeout)
            found.update(producer_http_addresses(parse_lookup(resp.status, resp.body)))
        except (HTTPClientError, *QueryErrors) as exc:
            errors.append(f"lookupd {address}: {exc}")

    async with trio.open_nursery() as nursery:
        for address in opts.lookupd_http_addresses:
            nursery.start_soon(lookup, address)
    if errors:
        raise StatError("failed to get topic producers - " + "; ".join(sorted(errors)))
    if not found:
        raise StatError(f"failed to get topic producers - no nsqlookupd knows topic({opts.topic})")
    return sorted(found)


async def sample(opts: StatOptions) -> ChannelSample:
    addresses = await producers(opts)
    docs: list[dict[str, Any]] = []
    errors: list[str] = []

    async def one(address: str) -> None:
        url = _url(address, f"/stats?format=json&topic={quote(opts.topic)}&channel={quote(opts.channel)}&include_clients=false")
        try:
            doc = await _get_json(url, opts)
        except StatError as exc:
            errors.append(f"nsqd {address}: {exc}")
            return
        if isinstance(doc, dict):
            docs.append(doc)

    async with trio.open_nursery() as nursery:
        for address in addresses:
            nursery.start_soon(one, address)
    if errors:
        raise StatError("failed to get nsqd stats - " + "; ".join(sorted(errors)))
    return sum_channel(docs, opts.topic, opts.channel)


async def stat_loop(opts: StatOptions, out: TextIO) -> int:
    prev: ChannelSample | None = None
    shown = 0
    next_at = trio.current_time()
    for i in itertools.count():
        try:
            cur = await sample(opts)
        except StatError as exc:
            raise ToolExit(1, f"{PROG}: ERROR: {exc}") from None
        if i % HEADER_EVERY == 0:
            out.write(header() + "\n")
        if prev is not None:
            out.write(row(cur, prev, opts.interval) + "\n")
            shown += 1
        out.flush()
        if opts.count and shown >= opts.count:
            break
        prev = cur
        next_at += opts.interval
        await trio.sleep_until(next_at)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return tool_main(PROG, StatOptions, __doc__, argv, check, lambda opts: run_tool(PROG, stat_loop, opts, sys.stdout))


if __name__ == "__main__":
    raise SystemExit(main())
