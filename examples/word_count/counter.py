"""Word count, stage 2: count the words.

Consumes ``words`` (one word per message, from splitter.py) on the
``counter`` channel and keeps a count per word in memory.  Every
``--print-every`` seconds it prints the ``--top`` words so far; on exit
(Ctrl-C / SIGTERM) it stops consuming, then flushes every count.

Run (with a pynsqd on 127.0.0.1:4150):

    python examples/word_count/counter.py --print-every 5 --top 10
    python examples/word_count/counter.py --json > counts.jsonl   # one JSON object per report

A report in ``--json`` mode: ``{"words": 1543, "distinct": 412, "counts": {"the": 120, ...}}``
(most frequent first).  Counters on one channel would each count a share of
the words; to scale the counting, give each counter its own topic (splitters
publishing ``words-a-m``, ``words-n-z``...) so that every word lands in one place.
"""

from __future__ import annotations

import argparse
import json
import signal
from collections import Counter

import trio

from pynsqd.client import Message, Reader
from pynsqd import log


def report(counts: Counter[str], top: int, as_json: bool) -> None:
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    if top > 0:
        ranked = ranked[:top]
    total = sum(counts.values())
    if as_json:
        print(json.dumps({"words": total, "distinct": len(counts), "counts": dict(ranked)}), flush=True)
        return
    lines = [f"{total} words, {len(counts)} distinct" + (f"; top {top}:" if top > 0 else ":")]
    lines += [f"{n:>8}  {word}" for word, n in ranked]
    print("\n".join(lines), flush=True)


async def print_every(counts: Counter[str], args: argparse.Namespace) -> None:
    while True:
        await trio.sleep(args.print_every)
        report(counts, args.top, args.json)


async def main(args: argparse.Namespace) -> None:
    counts: Counter[str] = Counter()

    async def count(message: Message) -> None:
        counts[message.body.decode("utf-8", errors="replace")] += 1

    if args.lookupd_http_address:
        sources = {"lookupd_http_addresses": args.lookupd_http_address, "nsqd_tcp_addresses": args.nsqd_tcp_address or []}
    else:
        sources = {"nsqd_tcp_addresses": args.nsqd_tcp_address or ["127.0.0.1:4150"]}
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with Reader(args.topic, args.channel, count, **sources, max_in_flight=args.max_in_flight):
            async with trio.open_nursery() as nursery:
                if args.print_every > 0:
                    nursery.start_soon(print_every, counts, args)
                async for _ in signals:
                    break
                nursery.cancel_scope.cancel()
    # the Reader has stopped: every message it took is counted and finished
    report(counts, 0, args.json)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nsqd-tcp-address", action="append", help="nsqd to consume from, repeatable (default 127.0.0.1:4150 unless --lookupd-http-address)")
    p.add_argument("--lookupd-http-address", action="append", help="nsqlookupd to discover nsqds from, repeatable")
    p.add_argument("--topic", default="words")
    p.add_argument("--channel", default="counter")
    p.add_argument("--max-in-flight", type=int, default=200)
    p.add_argument("--print-every", type=float, default=10.0, help="seconds between reports (0: only on exit)")
    p.add_argument("--top", type=int, default=10, help="words per periodic report (0: all)")
    p.add_argument("--json", action="store_true", help="reports as JSON lines")
    p.add_argument("--log-level", default="warn", choices=("debug", "info", "warn", "error"))
    return p.parse_args(argv)


if __name__ == "__main__":
    arguments = parse_args()
    log.configure(app="counter", level=arguments.log_level)
    trio.run(main, arguments)
