"""Metrics aggregator: play web servers, publishing access-log events.

Publishes ``--count`` fake request events to ``access_log`` through nsqd's
HTTP ``/mpub`` (one POST per ``--batch``), at ``--rate`` events per second
(0: as fast as nsqd takes them).  ``--echo`` also prints every event.

Run (with a pynsqd on 127.0.0.1:4151, and aggregator.py consuming):

    python examples/metrics_aggregator/generate.py --count 10000 --rate 500

The same events from a file or another program: one JSON object per line into
``pyto_nsq --topic=access_log --nsqd-tcp-address=127.0.0.1:4150``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys

import trio

from pynsqd.http_client import http_post

# route -> (method, typical latency in ms)
ROUTES = {
    "/": ("GET", 8.0),
    "/login": ("POST", 45.0),
    "/users/:id": ("GET", 15.0),
    "/search": ("GET", 120.0),
    "/orders": ("POST", 80.0),
}


def fake_event(rng: random.Random) -> dict[str, object]:
    route = rng.choice(list(ROUTES))
    method, typical = ROUTES[route]
    roll = rng.random()
    status = 500 if roll < 0.02 else 404 if roll < 0.07 else 200
    latency = round(rng.lognormvariate(0, 0.5) * typical, 1)
    return {"method": method, "route": route, "status": status, "latency_ms": latency}


async def main(args: argparse.Namespace) -> None:
    rng = random.Random(args.seed)
    url = f"http://{args.nsqd_http_address}/mpub?topic={args.topic}"
    interval = args.batch / args.rate if args.rate > 0 else 0.0
    sent = 0
    while sent < args.count:
        started = trio.current_time()
        batch = [json.dumps(fake_event(rng)) for _ in range(min(args.batch, args.count - sent))]
        answer = await http_post(url, "\n".join(batch).encode())
        if answer.status != 200:
            sys.exit(f"nsqd answered {answer.status}: {answer.body.decode(errors='replace')}")
        if args.echo:
            print("\n".join(batch), flush=True)
        sent += len(batch)
        await trio.sleep_until(started + interval)
    print(f"published {sent} events to {args.topic}", file=sys.stderr)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nsqd-http-address", default="127.0.0.1:4151")
    p.add_argument("--topic", default="access_log")
    p.add_argument("--count", type=int, default=1000)
    p.add_argument("--rate", type=float, default=0.0, help="events per second (0: no limit)")
    p.add_argument("--batch", type=int, default=100, help="events per /mpub request")
    p.add_argument("--seed", type=int, help="random seed, for a repeatable stream")
    p.add_argument("--echo", action="store_true", help="also print each event as a JSON line")
    return p.parse_args(argv)


if __name__ == "__main__":
    trio.run(main, parse_args())
