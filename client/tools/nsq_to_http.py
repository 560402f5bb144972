"""``pynsq_to_http``: relay a topic's messages to HTTP endpoints, as Go's
``nsq_to_http``.

    pynsq_to_http --topic=events --lookupd-http-address=127.0.0.1:4161 --post=http://127.0.0.1:8080/events

Go's flags and semantics: ``--post`` sends the message as the body
(``--content-type``, extra ``--header key:value``); ``--get`` fills the
message, URL-escaped, into the one ``%s`` of the address.  With several
addresses, ``--mode`` picks one per message: ``hostpool`` (default: in turn,
a failing endpoint left alone for a while), ``round-robin``,
``epsilon-greedy`` (mostly the fastest); ``multicast`` sends every message to
every address.  A POST answered 2xx, or a GET answered 200, finishes the
message; anything else (another status, a refused connection, a timeout
after ``--http-client-request-timeout``) requeues it (go-nsq's delay and
backoff, ``--consumer-opt=default_requeue_delay,5s`` to change) -- and, as
in Go, a message that failed ``max_attempts`` times (5) is given up:
``--consumer-opt=max_attempts,0`` to never give up.  ``-n`` requests run
at once, over kept-alive connections.  ``--sample`` passes only that
fraction.  Every ``--status-every`` requests a timing line is logged.

Where we differ on purpose: an unknown ``--mode`` is an error (Go 1.3.0
multicasts for any mode it does not know, and no longer lists
``multicast``); the ``--header`` error names the right syntax (``key:value``); a bad
setting or an nsqd given by address that cannot be reached stops the tool
at start with exit code 1; ``--log-level`` exists (default info).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Set as AbstractSet, Sequence
from typing import Any
from urllib.parse import quote_plus

import attrs
import trio

from pynsqd.flags import flag_field
from pynsqd.http_client import ConnectionPool, HTTPClientError
from pynsqd.protocol import is_valid_channel_name, is_valid_topic_name

from ..message import Message
from ..reader import Reader
from .common import (
    CONSUMER_OPTIONS,
    consumer_opts_flag,
    fail_if_not_dialled,
    http_timeout_flags,
    log_level_flag,
    lookupd_http_addresses_flag,
    max_in_flight_flag,
    nsqd_tcp_addresses_flag,
    parse_opts,
    run_tool,
    tool_main,
    tool_name,
    until_signal,
    user_agent,
    version_flag,
)
from .relay import MODES, HostPool, TimerMetrics

PROG = tool_name("nsq_to_http")
DEFAULT_CONTENT_TYPE = "application/octet-stream"


@attrs.define(kw_only=True)
class ToHTTPOptions:
    topic: str = flag_field("", flag="topic", kind="str", help="nsq topic")
    channel: str = flag_field("nsq_to_http", flag="channel", kind="str", help="nsq channel")
    consumer_opts: list[str] = consumer_opts_flag()
    content_type: str = flag_field(DEFAULT_CONTENT_TYPE, flag="content-type", kind="str", help="the Content-Type used for POST requests")
    get_addresses: list[str] = flag_field(
        [], flag="get", kind="strings", help="HTTP address to make a GET request to. '%s' will be printf replaced with data (may be given multiple times)"
    )
    post_addresses: list[str] = flag_field(
        [], flag="post", kind="strings", help="HTTP address to make a POST request to.  data will be in the body (may be given multiple times)"
    )
    headers: list[str] = flag_field([], flag="header", kind="strings", help="Custom header for HTTP requests, key:value (may be given multiple times)")
    http_connect_timeout, http_request_timeout = http_timeout_flags(20.0)
    lookupd_http_addresses: list[str] = lookupd_http_addresses_flag()
    max_in_flight: int = max_in_flight_flag()
    mode: str = flag_field(
        "hostpool",
        flag="mode",
        kind="str",
        help="the upstream request mode options: round-robin, hostpool (default), epsilon-greedy, multicast (every message to every address)",
    )
    n: int = flag_field(100, flag="n", kind="int", help="number of concurrent publishers")
    nsqd_tcp_addresses: list[str] = nsqd_tcp_addresses_flag()
    sample: float = flag_field(1.0, flag="sample", kind="float", help="% of messages to publish (float b/w 0 -> 1)")
    status_every: int = flag_field(250, flag="status-every", kind="int", help="the # of requests between logging status (per handler), 0 disables")
    log_level: str = log_level_flag("info", PROG)
    version: bool = version_flag()


def parse_headers(items: Sequence[str]) -> list[tuple[str, str]]:
    out = []
    for item in items:
        name, sep, value = item.partition(":")
        if not sep or not name.strip():
            raise ValueError("--header value format should be 'key:value'")
        out.append((name.strip(), value.strip()))
    return out


def check(opts: ToHTTPOptions, given: AbstractSet[str]) -> str | None:
    """Go's start-up checks, in Go's order."""
    if not opts.topic or not opts.channel:
        return "--topic and --channel are required"
    if "content_type" in given and opts.content_type != DEFAULT_CONTENT_TYPE:
        if not opts.post_addresses:
            return "--content-type only used with --post"
    if "content_type" in given and not opts.content_type:
        return "--content-type requires a value when used"
    if not opts.nsqd_tcp_addresses and not opts.lookupd_http_addresses:
        return "--nsqd-tcp-address or --lookupd-http-address required"
    if opts.nsqd_tcp_addresses and opts.lookupd_http_addresses:
        return "use --nsqd-tcp-address or --lookupd-http-address not both"
    if not opts.get_addresses and not opts.post_addresses:
        return "--get or --post required"
    if opts.get_addresses and opts.post_addresses:
        return "use --get or --post not both"
    for get in opts.get_addresses:
        if get.count("%s") != 1:
            return "invalid GET address - must be a printf string"
    for address in opts.get_addresses + opts.post_addresses:
        if not address.startswith(("http://", "https://")):
            return f"invalid address {address!r} - must be an http:// or https:// URL"
    if opts.mode not in (*MODES, "multicast"):
        return f"invalid --mode {opts.mode!r} (round-robin, hostpool, epsilon-greedy or multicast)"
    if not 0.0 <= opts.sample <= 1.0:
        return "ERROR: --sample must be between 0.0 and 1.0"
    try:
        parse_headers(opts.headers)
    except ValueError as exc:
        return str(exc)
    if opts.n < 1:
        return "no handlers (-n must be at least 1)"
    if not is_valid_topic_name(opts.topic):
        return f"invalid topic name {opts.topic!r}"
    if not is_valid_channel_name(opts.channel):
        return f"invalid channel name {opts.channel!r}"
    if opts.max_in_flight < 1:
        return "--max-in-flight must be at least 1"
    return None


class PublishFailed(Exception):
    """The endpoint did not take the message (the Reader requeues it)."""


class HTTPRelay:
    """The Reader's handler: one request per message (per address in multicast)."""

    def __init__(self, opts: ToHTTPOptions, log: logging.Logger, pool: ConnectionPool, *, rng: random.Random | None = None) -> None:
        self.opts = opts
        self.log = log
        self.pool = pool
        self.rng = rng or random.Random()
        self.method = "POST" if opts.post_addresses else "GET"
        self.addresses = opts.post_addresses or opts.get_addresses
        self.headers = [("User-Agent", user_agent(PROG))] + parse_headers(opts.headers)
        if self.method == "POST":
            self.headers.append(("Content-Type", opts.content_type))
        self.hosts = None if opts.mode == "multicast" else HostPool(self.addresses, opts.mode, rng=self.rng, now=trio.current_time())
        one = len(self.addresses) == 1  # per-address lines only say something with several
        self.per_address = {a: TimerMetrics(0 if one else opts.status_every, f"[{a}]:") for a in self.addresses}
        self.aggregate = TimerMetrics(opts.status_every, "[aggregate]:")
        self.sent = 0
        self.failed = 0

    async def publish(self, address: str, body: bytes) -> None:
        if self.method == "POST":
            url, payload = address, body
        else:
            url, payload = address.replace("%s", quote_plus(body), 1), b""
        try:
            resp = await self.pool.request(self.method, url, payload, headers=self.headers)
        except (HTTPClientError, ValueError) as exc:
            raise PublishFailed(str(exc)) from exc
        ok = 200 <= resp.status < 300 if self.method == "POST" else resp.status == 200
        if not ok:
            raise PublishFailed(f"got status code {resp.status}")

    def _timed(self, metrics: TimerMetrics, started: float) -> None:
        line = metrics.status(trio.current_time() - started)
        if line:
            self.log.info(line)

    async def __call__(self, message: Message) -> None:
        if self.opts.sample < 1.0 and self.rng.random() > self.opts.sample:
            return  # sampled out: finished without a request
        started = trio.current_time()
        try:
            if self.hosts is None:  # multicast: every address, in order; any failure requeues
                for address in self.addresses:
                    t0 = trio.current_time()
                    await self.publish(address, message.body)
                    self._timed(self.per_address[address], t0)
            else:
                address = self.hosts.get(started)
                try:
                    await self.publish(address, message.body)
                except PublishFailed:
                    self.hosts.mark(address, False, trio.current_time())
                    raise
                self.hosts.mark(address, True, trio.current_time(), trio.current_time() - started)
                self._timed(self.per_address[address], started)
        except PublishFailed as exc:
            # an expected failure: one line (not the Reader's traceback), requeue with backoff
            self.failed += 1
            self.log.warning("[%s/%s] %s %s failed for message %s (attempt %d): %s, requeueing",
                             self.opts.topic, self.opts.channel, self.method, address, message.id.decode(), message.attempts, exc)
            message.requeue()
            return
        self.sent += 1
        self._timed(self.aggregate, started)


async def run_to_http(opts: ToHTTPOptions, extra: dict[str, Any]) -> int:
    log = logging.getLogger("pynsqd.client.tools.nsq_to_http")
    extra.setdefault("user_agent", user_agent(PROG))
    async with ConnectionPool(timeout=opts.http_request_timeout, connect_timeout=opts.http_connect_timeout, max_idle_per_host=opts.n) as pool:
        relay = HTTPRelay(opts, log, pool)
        reader = Reader(
            opts.topic,
            opts.channel,
            relay,
            nsqd_tcp_addresses=opts.nsqd_tcp_addresses,
            lookupd_http_addresses=opts.lookupd_http_addresses,
            max_in_flight=opts.max_in_flight,
            concurrency=opts.n,
            **extra,
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(reader.run)
            await nursery.start(until_signal, reader.stop)
            await fail_if_not_dialled(PROG, [reader], nursery)
            await reader.wait_stopped()
            nursery.cancel_scope.cancel()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return tool_main(PROG, ToHTTPOptions, __doc__, argv, check, lambda opts: run_tool(PROG, run_to_http, opts, parse_opts(opts.consumer_opts, CONSUMER_OPTIONS)))


if __name__ == "__main__":
    raise SystemExit(main())
