"""Metrics aggregator: access-log events in, per-route counts and latencies out.

Web servers publish one JSON event per request to the ``access_log`` topic
(generate.py plays them); this consumer, on the ``aggregator`` channel,
keeps per-route totals -- requests, 5xx errors, average and maximum latency
-- and prints them as a table every ``--print-every`` seconds and on exit
(Ctrl-C / SIGTERM).  ``--json-out FILE`` also writes them as JSON, replaced
atomically at every report, for dashboards and scripts.

Run (with a pynsqd on 127.0.0.1:4150/4151):

    python examples/metrics_aggregator/aggregator.py --print-every 5
    python examples/metrics_aggregator/generate.py --count 10000 --rate 500

An event: ``{"method": "GET", "route": "/users/:id", "status": 200, "latency_ms": 12.5}``.
Events that are not like that are counted as ``invalid`` and dropped
(retrying would not fix them).  Every channel of a topic gets every event:
an archiver (``nsq_to_file``) or an alerting consumer can read the same
stream on channels of their own, at their own pace.
"""

from __future__ import annotations

import argparse
import json
import signal
from typing import Any

import attrs
import trio

from pynsqd.client import Message, Reader
from pynsqd import log


@attrs.define
class RouteStats:
    count: int = 0
    errors: int = 0  # 5xx answers
    total_ms: float = 0.0
    max_ms: float = 0.0

    def add(self, status: int, latency_ms: float) -> None:
        self.count += 1
        if status >= 500:
            self.errors += 1
        self.total_ms += latency_ms
        self.max_ms = max(self.max_ms, latency_ms)

    @property
    def avg_ms(self) -> float:
        return self.total_ms / self.count if self.count else 0.0


@attrs.define
class Aggregates:
    routes: dict[str, RouteStats] = attrs.Factory(dict)
    events: int = 0
    invalid: int = 0

    def add(self, body: bytes) -> None:
        try:
            event = json.loads(body)
            key = f"{event.get('method', '')} {event['route']}".strip()
            status = int(event["status"])
            latency_ms = float(event["latency_ms"])
        except (ValueError, KeyError, TypeError, AttributeError):
            self.invalid += 1
            return
        self.events += 1
        self.routes.setdefault(key, RouteStats()).add(status, latency_ms)

    def as_json(self) -> dict[str, Any]:
        return {
            "events": self.events,
            "invalid": self.invalid,
            "routes": {
                key: {"count": s.count, "errors": s.errors, "avg_ms": s.avg_ms, "max_ms": s.max_ms}
                for key, s in sorted(self.routes.items())
            },
        }

    def table(self) -> str:
        lines = [f"{'route':<32} {'requests':>9} {'5xx':>6} {'avg ms':>9} {'max ms':>9}"]
        for key, s in sorted(self.routes.items(), key=lambda item: -item[1].count):
            lines.append(f"{key:<32} {s.count:>9} {s.errors:>6} {s.avg_ms:>9.1f} {s.max_ms:>9.1f}")
        lines.append(f"{self.events} events, {self.invalid} invalid")
        return "\n".join(lines)


async def report(aggregates: Aggregates, json_out: str | None) -> None:
    print(aggregates.table() + "\n", flush=True)
    if json_out:
        tmp = trio.Path(json_out + ".tmp")
        await tmp.write_text(json.dumps(aggregates.as_json(), indent=2))
        await tmp.replace(json_out)  # readers never see half a file


async def report_every(aggregates: Aggregates, args: argparse.Namespace) -> None:
    while True:
        await trio.sleep(args.print_every)
        await report(aggregates, args.json_out)


async def main(args: argparse.Namespace) -> None:
    aggregates = Aggregates()

    async def handle(message: Message) -> None:
        aggregates.add(message.body)

    if args.lookupd_http_address:
        sources = {"lookupd_http_addresses": args.lookupd_http_address, "nsqd_tcp_addresses": args.nsqd_tcp_address or []}
    else:
        sources = {"nsqd_tcp_addresses": args.nsqd_tcp_address or ["127.0.0.1:4150"]}
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with Reader(args.topic, args.channel, handle, **sources, max_in_flight=args.max_in_flight):
            async with trio.open_nursery() as nursery:
                if args.print_every > 0:
                    nursery.start_soon(report_every, aggregates, args)
                async for _ in signals:
                    break
                nursery.cancel_scope.cancel()
    await report(aggregates, args.json_out)  # final: the Reader has stopped


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nsqd-tcp-address", action="append", help="nsqd to consume from, repeatable (default 127.0.0.1:4150 unless --lookupd-http-address)")
    p.add_argument("--lookupd-http-address", action="append", help="nsqlookupd to discover nsqds from, repeatable")
    p.add_argument("--topic", default="access_log")
    p.add_argument("--channel", default="aggregator")
    p.add_argument("--max-in-flight", type=int, default=200)
    p.add_argument("--print-every", type=float, default=10.0, help="seconds between tables (0: only on exit)")
    p.add_argument("--json-out", help="also write the aggregates to this JSON file at every report")
    p.add_argument("--log-level", default="warn", choices=("debug", "info", "warn", "error"))
    return p.parse_args(argv)


if __name__ == "__main__":
    arguments = parse_args()
    log.configure(app="aggregator", level=arguments.log_level)
    trio.run(main, arguments)
