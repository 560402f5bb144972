"""``pynsq_tail``: print a topic's messages to stdout (nsq_tail's flags).

    pynsq_tail --topic=events --lookupd-http-address=127.0.0.1:4161 -n 10
"""

from __future__ import annotations

import random
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import attrs
import trio

from pynsqd.flags import flag_field, run_cli

from ..conn import ConnectionOptions
from ..message import Message
from ..reader import Reader, ReaderConfig
from .common import configure_logging, parse_opts, until_signal, version_line, run_tool


@attrs.define(kw_only=True)
class TailOptions:
    topic: list[str] = flag_field([], flag="topic", kind="strings", help="NSQ topic (may be given multiple times)")
    channel: str = flag_field("", flag="channel", kind="str", help="NSQ channel (default: an ephemeral tail channel)")
    n: int = flag_field(0, flag="n", kind="int", help="total messages to show (will wait if starved)")
    max_in_flight: int = flag_field(200, flag="max-in-flight", kind="int", help="max number of messages to allow in flight")
    nsqd_tcp_addresses: list[str] = flag_field([], flag="nsqd-tcp-address", kind="strings", help="nsqd TCP address (may be given multiple times)")
    lookupd_http_addresses: list[str] = flag_field(
        [], flag="lookupd-http-address", kind="strings", help="lookupd HTTP address (may be given multiple times)"
    )
    print_topic: bool = flag_field(False, flag="print-topic", kind="bool", help="print topic name where message was received")
    consumer_opts: list[str] = flag_field(
        [], flag="consumer-opt", kind="strings", help="option to passthrough to the Reader (may be given multiple times, name,value)"
    )
    log_level: str = flag_field("warn", flag="log-level", kind="str", choices=("debug", "info", "warn", "error"), help="log verbosity")
    version: bool = flag_field(False, flag="version", kind="bool", help="print version string")


def reader_option_defaults() -> dict[str, object]:
    out: dict[str, object] = {}
    for cls in (ReaderConfig, ConnectionOptions):
        for a in attrs.fields(cls):
            if isinstance(a.default, (bool, int, float, str)):
                out[a.name] = a.default
    return out


class Tail:
    """Prints messages until ``n`` have been shown (0: forever)."""

    def __init__(self, opts: TailOptions, out: Any = None) -> None:
        self.opts = opts
        self.out = out if out is not None else sys.stdout.buffer
        self.shown = 0
        self.done = trio.Event()

    def handler_for(self, topic: str) -> Callable[[Message], Awaitable[None]]:
        async def handle(message: Message) -> None:
            n = self.opts.n
            if n and self.shown >= n:
                # more arrived than asked for: give them back untouched
                message.requeue(0, backoff=False)
                return
            self.shown += 1
            if self.opts.print_topic:
                self.out.write(topic.encode() + b" | ")
            self.out.write(message.body + b"\n")
            self.out.flush()
            if n and self.shown >= n:
                self.done.set()

        return handle


async def run_tail(opts: TailOptions, extra: dict[str, object], out: object = None) -> int:
    tail = Tail(opts, out)
    max_in_flight = opts.max_in_flight
    if 0 < opts.n < max_in_flight:
        max_in_flight = opts.n
    channel = opts.channel or f"tail{random.randrange(1_000_000)}#ephemeral"
    readers = [
        Reader(
            topic,
            channel,
            tail.handler_for(topic),
            nsqd_tcp_addresses=opts.nsqd_tcp_addresses,
            lookupd_http_addresses=opts.lookupd_http_addresses,
            max_in_flight=max_in_flight,
            concurrency=1,  # print in arrival order
            **extra,  # type: ignore[arg-type]
        )
        for topic in opts.topic
    ]

    async def stop_all() -> None:
        async with trio.open_nursery() as nursery:
            for r in readers:
                nursery.start_soon(r.stop)

    async with trio.open_nursery() as nursery:
        for r in readers:
            await nursery.start(r.run)
        await nursery.start(until_signal, stop_all)
        if opts.n:
            nursery.start_soon(_stop_when_done, tail, stop_all)
        for r in readers:
            await r.wait_stopped()
        nursery.cancel_scope.cancel()
    return 0


async def _stop_when_done(tail: Tail, stop_all: Callable[[], Awaitable[None]]) -> None:
    await tail.done.wait()
    await stop_all()


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    opts, _ = run_cli("pynsq_tail", TailOptions, args)
    if opts.version:
        print(version_line("pynsq_tail"))
        return 0
    if not opts.topic:
        sys.stderr.write("pynsq_tail: --topic is required\n")
        return 1
    if not opts.nsqd_tcp_addresses and not opts.lookupd_http_addresses:
        sys.stderr.write("pynsq_tail: --nsqd-tcp-address or --lookupd-http-address required\n")
        return 1
    if opts.nsqd_tcp_addresses and opts.lookupd_http_addresses:
        sys.stderr.write("pynsq_tail: use --nsqd-tcp-address or --lookupd-http-address not both\n")
        return 1
    try:
        extra = parse_opts(opts.consumer_opts, reader_option_defaults())
    except ValueError as exc:
        sys.stderr.write(f"pynsq_tail: {exc}\n")
        return 1
    configure_logging("pynsq_tail", opts.log_level)
    return run_tool(run_tail, opts, extra)


if __name__ == "__main__":
    raise SystemExit(main())
