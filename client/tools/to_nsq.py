"""``pyto_nsq``: publish stdin to a topic, one message per line, as Go's ``to_nsq``.

    seq 100 | pyto_nsq --topic=numbers --nsqd-tcp-address=127.0.0.1:4150

As in Go, every message goes to every ``--nsqd-tcp-address``, and any
failure -- an nsqd that cannot be reached at start, a bad topic, a line
bigger than nsqd's ``--max-msg-size`` -- stops the tool with nsqd's own
error (``E_BAD_MESSAGE PUB message too big ...``) and exit code 1.

Where we differ on purpose: lines that arrive together go out as one MPUB
(Go: one PUB each; the same messages, far fewer round trips); a last line
without a delimiter is published whole (Go's to_nsq cuts its last byte);
``--version`` and ``--log-level`` exist.
"""

from __future__ import annotations

import os
from collections.abc import Set as AbstractSet, Sequence
from typing import Any

import attrs
import trio

from pynsqd.flags import flag_field
from pynsqd.protocol import is_valid_topic_name

from ..errors import NSQError
from ..writer import Writer
from .common import (
    PRODUCER_OPTIONS,
    fail_if_not_dialled,
    log_level_flag,
    nsqd_tcp_addresses_flag,
    parse_opts,
    producer_opts_flag,
    run_tool,
    tool_main,
    tool_name,
    until_signal,
    user_agent,
    version_flag,
)

PROG = tool_name("to_nsq")
MAX_BATCH = 256  # lines per MPUB when stdin delivers many at once...
MAX_BATCH_BYTES = 512 * 1024  # ...well under nsqd's default --max-body-size (5 MiB)


@attrs.define(kw_only=True)
class ToNSQOptions:
    topic: str = flag_field("", flag="topic", kind="str", help="NSQ topic to publish to")
    delimiter: str = flag_field("\n", flag="delimiter", kind="str", help="character to split input from stdin")
    nsqd_tcp_addresses: list[str] = nsqd_tcp_addresses_flag("destination nsqd TCP address (may be given multiple times)")
    producer_opts: list[str] = producer_opts_flag()
    rate: int = flag_field(0, flag="rate", kind="int", help="Throttle messages to n/second. 0 to disable")
    log_level: str = log_level_flag("warn", PROG)
    version: bool = version_flag()


def check(opts: ToNSQOptions, given: AbstractSet[str] = frozenset()) -> str | None:
    if not opts.topic:
        return "--topic required"
    if not is_valid_topic_name(opts.topic):
        return f"invalid topic name {opts.topic!r}"
    if len(opts.delimiter.encode()) != 1:
        return "--delimiter must be a single byte"
    if not opts.nsqd_tcp_addresses:
        return "--nsqd-tcp-address required"
    if opts.rate < 0:
        return "--rate must be >= 0"
    return None


def split_records(buffer: bytes, delimiter: bytes) -> tuple[list[bytes], bytes]:
    """Complete records (empty ones dropped, as Go's to_nsq does) and the unterminated rest."""
    parts = buffer.split(delimiter)
    rest = parts.pop()
    return [p for p in parts if p], rest


def batches(records: list[bytes]) -> list[list[bytes]]:
    """Records cut into MPUB-sized batches (count and bytes)."""
    out: list[list[bytes]] = []
    current: list[bytes] = []
    size = 0
    for record in records:
        if current and (len(current) >= MAX_BATCH or size + len(record) > MAX_BATCH_BYTES):
            out.append(current)
            current, size = [], 0
        current.append(record)
        size += len(record) + 4
    if current:
        out.append(current)
    return out


async def read_stdin(fd: int, size: int = 65536) -> bytes:
    # a thread, not FdStream: stdin may be a terminal or a file, and
    # neither can be made non-blocking portably
    return await trio.to_thread.run_sync(os.read, fd, size, abandon_on_cancel=True)


async def publish_everywhere(writers: list[Writer], topic: str, batch: list[bytes]) -> None:
    """One batch to every nsqd (Go's to_nsq: every line to every nsqd)."""

    async def one(writer: Writer) -> None:
        if len(batch) == 1:
            await writer.pub(topic, batch[0])
            return
        try:
            await writer.mpub(topic, batch)
        except NSQError as exc:
            if exc.code != "E_BAD_BODY":
                raise
            # an nsqd with a small --max-body-size: one at a time, as Go does
            for body in batch:
                await writer.pub(topic, body)

    if len(writers) == 1:
        await one(writers[0])
        return
    async with trio.open_nursery() as nursery:
        for writer in writers:
            nursery.start_soon(one, writer)


async def publish_stream(writers: list[Writer], topic: str, delimiter: bytes, rate: int, fd: int = 0) -> int:
    sent = 0
    rest = b""
    interval = 1.0 / rate if rate > 0 else 0.0
    next_at = trio.current_time()
    while True:
        chunk = await read_stdin(fd)
        if chunk:
            records, rest = split_records(rest + chunk, delimiter)
        else:
            records, rest = ([rest] if rest else []), b""
        if interval:
            for record in records:
                await trio.sleep_until(next_at)
                next_at = max(next_at + interval, trio.current_time() - 1.0)
                await publish_everywhere(writers, topic, [record])
                sent += 1
        else:
            for batch in batches(records):
                await publish_everywhere(writers, topic, batch)
                sent += len(batch)
        if not chunk:
            return sent


async def run_to_nsq(opts: ToNSQOptions, extra: dict[str, Any], fd: int = 0) -> int:
    delimiter = opts.delimiter.encode()
    extra.setdefault("user_agent", user_agent(PROG))
    # one Writer per nsqd: each line goes to all of them, not to one of them
    writers = [Writer([address], **extra) for address in dict.fromkeys(opts.nsqd_tcp_addresses)]
    async with trio.open_nursery() as nursery:
        for writer in writers:
            await nursery.start(writer.run)

        async def interrupted() -> None:
            nursery.cancel_scope.cancel()

        await nursery.start(until_signal, interrupted)
        await fail_if_not_dialled(PROG, writers, nursery)
        await publish_stream(writers, opts.topic, delimiter, opts.rate, fd)
        for writer in writers:
            await writer.stop()
        nursery.cancel_scope.cancel()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return tool_main(PROG, ToNSQOptions, __doc__, argv, check, lambda opts: run_tool(PROG, run_to_nsq, opts, parse_opts(opts.producer_opts, PRODUCER_OPTIONS)))


if __name__ == "__main__":
    raise SystemExit(main())
