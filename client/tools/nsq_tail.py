"""``pynsq_tail``: print a topic's messages to stdout, as Go's ``nsq_tail``.

    pynsq_tail --topic=events --lookupd-http-address=127.0.0.1:4161 -n 10

Go's flags, defaults and exit codes: a bad topic or channel, or an nsqd given
by address that cannot be reached, exits 1 with one line; ``| head`` closing
the pipe exits at once (141, as Go killed by SIGPIPE).

Where we differ on purpose: ``--log-level`` (default warn; Go's tool always
logs go-nsq's lines); messages received but not printed when the pipe closes
(or past ``-n``) are requeued at once, not left to time out.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Set as AbstractSet, Awaitable, Callable, Sequence
from typing import Any, BinaryIO

import attrs
import trio

from pynsqd.flags import flag_field
from pynsqd.protocol import is_valid_channel_name, is_valid_topic_name

from ..message import Message
from ..reader import Reader
from .common import (
    CONSUMER_OPTIONS,
    consumer_opts_flag,
    fail_if_not_dialled,
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

PROG = tool_name("nsq_tail")


@attrs.define(kw_only=True)
class TailOptions:
    topics: list[str] = flag_field([], flag="topic", kind="strings", help="NSQ topic (may be given multiple times)")
    channel: str = flag_field("", flag="channel", kind="str", help="NSQ channel (default: tailNNNNNN#ephemeral)")
    n: int = flag_field(0, flag="n", kind="int", help="total messages to show (will wait if starved)")
    max_in_flight: int = max_in_flight_flag()
    nsqd_tcp_addresses: list[str] = nsqd_tcp_addresses_flag()
    lookupd_http_addresses: list[str] = lookupd_http_addresses_flag()
    print_topic: bool = flag_field(False, flag="print-topic", kind="bool", help="print topic name where message was received")
    consumer_opts: list[str] = consumer_opts_flag()
    log_level: str = log_level_flag("warn", PROG)
    version: bool = version_flag()


def check(opts: TailOptions, given: AbstractSet[str] = frozenset()) -> str | None:
    """Go's start-up checks, in Go's order; the first failure's message."""
    if not opts.nsqd_tcp_addresses and not opts.lookupd_http_addresses:
        return "--nsqd-tcp-address or --lookupd-http-address required"
    if opts.nsqd_tcp_addresses and opts.lookupd_http_addresses:
        return "use --nsqd-tcp-address or --lookupd-http-address not both"
    if not opts.topics:
        return "--topic required"
    for topic in opts.topics:
        if not is_valid_topic_name(topic):
            return f"invalid topic name {topic!r}"
    if opts.channel and not is_valid_channel_name(opts.channel):
        return f"invalid channel name {opts.channel!r}"
    if opts.max_in_flight < 1:
        return "--max-in-flight must be at least 1"
    return None


class Tail:
    """Prints messages until ``n`` have been shown (0: forever)."""

    def __init__(self, opts: TailOptions, out: BinaryIO | None = None) -> None:
        self.opts = opts
        self.out = out if out is not None else sys.stdout.buffer
        self.shown = 0
        self.done = trio.Event()
        self.broken_pipe = False

    def handler_for(self, topic: str) -> Callable[[Message], Awaitable[None]]:
        prefix = topic.encode() + b" | " if self.opts.print_topic else b""

        async def handle(message: Message) -> None:
            n = self.opts.n
            if self.broken_pipe or (n and self.shown >= n):
                # not shown: give it back untouched, for the channel's next reader
                message.requeue(0, backoff=False)
                return
            try:
                self.out.write(prefix + message.body + b"\n")
                self.out.flush()
            except BrokenPipeError:
                # the reader of our stdout is gone (| head): stop at once
                self.broken_pipe = True
                message.requeue(0, backoff=False)
                self.done.set()
                return
            self.shown += 1
            if n and self.shown >= n:
                self.done.set()

        return handle


async def run_tail(opts: TailOptions, extra: dict[str, Any], out: BinaryIO | None = None) -> int:
    tail = Tail(opts, out)
    max_in_flight = opts.max_in_flight
    if 0 < opts.n < max_in_flight:
        max_in_flight = opts.n  # don't ask for more than will be shown
    channel = opts.channel or f"tail{random.randrange(1_000_000):06d}#ephemeral"
    extra.setdefault("user_agent", user_agent(PROG))
    readers = [
        Reader(
            topic,
            channel,
            tail.handler_for(topic),
            nsqd_tcp_addresses=opts.nsqd_tcp_addresses,
            lookupd_http_addresses=opts.lookupd_http_addresses,
            max_in_flight=max_in_flight,
            concurrency=1,  # print in arrival order
            **extra,
        )
        for topic in opts.topics
    ]

    async def stop_all() -> None:
        async with trio.open_nursery() as nursery:
            for r in readers:
                nursery.start_soon(r.stop)

    async with trio.open_nursery() as nursery:
        for r in readers:
            await nursery.start(r.run)
        await nursery.start(until_signal, stop_all)
        await fail_if_not_dialled(PROG, readers, nursery)
        nursery.start_soon(_stop_when_done, tail, stop_all)
        for r in readers:
            await r.wait_stopped()
        nursery.cancel_scope.cancel()
    if tail.broken_pipe:
        raise BrokenPipeError
    return 0


async def _stop_when_done(tail: Tail, stop_all: Callable[[], Awaitable[None]]) -> None:
    await tail.done.wait()
    await stop_all()


def main(argv: Sequence[str] | None = None) -> int:
    return tool_main(PROG, TailOptions, __doc__, argv, check, lambda opts: run_tool(PROG, run_tail, opts, parse_opts(opts.consumer_opts, CONSUMER_OPTIONS)))


if __name__ == "__main__":
    raise SystemExit(main())
