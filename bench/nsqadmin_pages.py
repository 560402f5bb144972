"""pynsqadmin's costs: how long its pages take to render against a real
cluster, and how much memory its graphs' history keeps.

    python bench/nsqadmin_pages.py [--topics 200] [--channels 3] [--requests 20]

Starts pynsqlookupd, two pynsqd and pynsqadmin on loopback (ports chosen by
the OS), creates ``topics`` x ``channels`` on both nsqds, and times each page
(client-side wall time over loopback: the lookupd and nsqd queries a page
makes are included).  The history's memory is measured in-process with
tracemalloc, on a full window (361 rounds, the default 1h at 10 s).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import tracemalloc
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pynsqadmin.history import History  # noqa: E402
from pynsqadmin.screenshots import LocalCluster, post  # noqa: E402


def fake_stats(topics: int, channels: int, r: int) -> dict:
    return {
        "start_time": 1,
        "topics": [
            {
                "topic_name": f"topic{t}",
                "depth": r,
                "message_count": r * 10,
                "channels": [
                    {"channel_name": f"ch{c}", "depth": r, "in_flight_count": 1, "deferred_count": 0, "message_count": r * 10} for c in range(channels)
                ],
            }
            for t in range(topics)
        ],
    }


def history_bytes(topics: int, channels: int, points: int = 361) -> tuple[float, float]:
    """(bytes per series, ms per sampling round) on a full window."""
    history = History(points)
    history.record(0.0, {"warm": fake_stats(1, 0, 0)})
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    started = time.perf_counter()
    for r in range(1, points + 1):
        history.record(float(r * 10), {"a": fake_stats(topics, channels, r), "b": fake_stats(topics, channels, r)})
    per_round = (time.perf_counter() - started) / points * 1000
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    grown = sum(s.size_diff for s in after.compare_to(before, "filename"))
    return grown / (topics * (channels + 1)), per_round


def time_page(url: str, requests: int) -> tuple[float, float]:
    samples = []
    for _ in range(requests):
        started = time.perf_counter()
        with urllib.request.urlopen(url, timeout=30) as resp:
            resp.read()
        samples.append((time.perf_counter() - started) * 1000)
    samples.sort()
    return statistics.median(samples), samples[int(len(samples) * 0.9) - 1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--topics", type=int, default=200)
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--requests", type=int, default=20)
    args = parser.parse_args()

    per_series, round_ms = history_bytes(args.topics, args.channels)
    print(f"history: {per_series:,.0f} bytes per topic/channel over a full 361-point window; "
          f"{round_ms:.1f} ms of CPU per sampling round of 2 nsqds x {args.topics * (args.channels + 1)} series")

    with LocalCluster(2, admin_flags=["--sample-interval=2s"]) as cluster:
        for n in cluster.nsqds:
            for t in range(args.topics):
                post(n.ports["HTTP"], f"/pub?topic=topic{t}", b"x")
                for c in range(args.channels):
                    post(n.ports["HTTP"], f"/channel/create?topic=topic{t}&channel=ch{c}")
        time.sleep(5)  # a few sampling rounds: graphs to draw
        print(f"\n{args.topics} topics x {args.channels} channels on 2 pynsqd, 1 pynsqlookupd; {args.requests} requests per page\n")
        print("| page | median ms | p90 ms |\n|---|---:|---:|")
        for name, path in (("topics", "/"), ("topic", "/topics/topic0"), ("channel", "/topics/topic0/ch0"), ("nodes", "/nodes"), ("lookup", "/lookup")):
            median, p90 = time_page(cluster.url + path, args.requests)
            print(f"| {name} `{path}` | {median:.1f} | {p90:.1f} |")
        rss = next(line for line in Path(f"/proc/{cluster.admin.proc.pid}/status").read_text().splitlines() if line.startswith("VmRSS"))
        print(f"\npynsqadmin {rss.split(':')[1].strip()} RSS")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
