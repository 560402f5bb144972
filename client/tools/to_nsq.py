"""``pynsq_to_nsq``: publish stdin to a topic, one message per line (to_nsq's flags).

    seq 100 | pynsq_to_nsq --topic=numbers --nsqd-tcp-address=127.0.0.1:4150

With several ``--nsqd-tcp-address`` each message goes to one healthy nsqd
(failing over when one is down), where to_nsq sends a copy to every nsqd.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

import attrs
import trio

from pynsqd.flags import flag_field, run_cli

from ..conn import ConnectionOptions
from ..writer import Writer, WriterConfig
from .common import configure_logging, parse_opts, until_signal, version_line, run_tool

MAX_BATCH = 256  # lines per MPUB when stdin delivers many at once


@attrs.define(kw_only=True)
class ToNSQOptions:
    topic: str = flag_field("", flag="topic", kind="str", help="NSQ topic to publish to")
    delimiter: str = flag_field("\n", flag="delimiter", kind="str", help="character to split input from stdin")
    nsqd_tcp_addresses: list[str] = flag_field([], flag="nsqd-tcp-address", kind="strings", help="destination nsqd TCP address (may be given multiple times)")
    producer_opts: list[str] = flag_field(
        [], flag="producer-opt", kind="strings", help="option to passthrough to the Writer (may be given multiple times, name,value)"
    )
    rate: int = flag_field(0, flag="rate", kind="int", help="throttle messages per second (0: no limit)")
    log_level: str = flag_field("warn", flag="log-level", kind="str", choices=("debug", "info", "warn", "error"), help="log verbosity")
    version: bool = flag_field(False, flag="version", kind="bool", help="print version string")


def split_records(buffer: bytes, delimiter: bytes) -> tuple[list[bytes], bytes]:
    """Complete records (empty ones dropped) and the unterminated rest."""
    parts = buffer.split(delimiter)
    rest = parts.pop()
    return [p for p in parts if p], rest


async def read_stdin(fd: int, size: int = 65536) -> bytes:
    # a thread, not FdStream: stdin may be a terminal or a file, and
    # neither can be made non-blocking portably
    return await trio.to_thread.run_sync(os.read, fd, size, abandon_on_cancel=True)


async def publish_stream(writer: Writer, topic: str, delimiter: bytes, rate: int, fd: int = 0) -> int:
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
                await writer.pub(topic, record)
                sent += 1
        else:
            for i in range(0, len(records), MAX_BATCH):
                batch = records[i : i + MAX_BATCH]
                if len(batch) == 1:
                    await writer.pub(topic, batch[0])
                else:
                    await writer.mpub(topic, batch)
                sent += len(batch)
        if not chunk:
            return sent


async def run_to_nsq(opts: ToNSQOptions, extra: dict[str, object], fd: int = 0) -> int:
    delimiter = opts.delimiter.encode()
    async with Writer(opts.nsqd_tcp_addresses, **extra) as writer:  # type: ignore[arg-type]
        async with trio.open_nursery() as nursery:

            async def interrupted() -> None:
                nursery.cancel_scope.cancel()

            await nursery.start(until_signal, interrupted)
            await publish_stream(writer, opts.topic, delimiter, opts.rate, fd)
            nursery.cancel_scope.cancel()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    opts, _ = run_cli("pynsq_to_nsq", ToNSQOptions, args)
    if opts.version:
        print(version_line("pynsq_to_nsq"))
        return 0
    if not opts.topic:
        sys.stderr.write("pynsq_to_nsq: --topic required\n")
        return 1
    if not opts.nsqd_tcp_addresses:
        sys.stderr.write("pynsq_to_nsq: --nsqd-tcp-address required\n")
        return 1
    if len(opts.delimiter.encode()) != 1:
        sys.stderr.write("pynsq_to_nsq: --delimiter must be a single byte\n")
        return 1
    defaults = {a.name: a.default for cls in (WriterConfig, ConnectionOptions) for a in attrs.fields(cls) if isinstance(a.default, (bool, int, float, str))}
    try:
        extra = parse_opts(opts.producer_opts, defaults)
    except ValueError as exc:
        sys.stderr.write(f"pynsq_to_nsq: {exc}\n")
        return 1
    configure_logging("pynsq_to_nsq", opts.log_level)
    try:
        return run_tool(run_to_nsq, opts, extra)
    except Exception as exc:  # noqa: BLE001 - one line, not a traceback
        sys.stderr.write(f"pynsq_to_nsq: {exc}\n")
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
