"""client_bench: throughput of the client library itself (``pynsqd.client``).

Publish throughput of the blocking ``SyncWriter`` (one thread, and 50 threads
sharing it) and of the async ``Writer`` on asyncio and on trio (sequential
``await pub``, and 50 concurrent tasks), and the ``Reader``'s consume
throughput on both backends (and with a plain-function handler, which runs
in worker threads).  Each round spawns a fresh pynsqd (``--mem-queue-size``
1,000,000, so nothing goes to disk); every workload gets its own topic.
Every figure is messages per second, from the first publish (or the
Reader's start) to the last ``OK`` (or the last message handled).

    .venv/bin/python bench/client_bench.py --repeat 3 --json-out /tmp/client.json

Traffic goes to loopback only; every workload is bounded by a message count
and by ``--time-limit`` (an over-long workload is reported as failed).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

_REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

import anyio  # noqa: E402
import anyio.from_thread  # noqa: E402
from nsq_bench import SpawnedDaemon, http_call, topic_stats  # noqa: E402

from pynsqd.client import Message, Reader, SyncWriter, Writer  # noqa: E402

CONCURRENCY = 50


class BenchFailed(Exception):
    pass


def body_of(size: int) -> bytes:
    return b"x" * size


# ---------------------------------------------------------------- publishers


def sync_pub(tcp: str, topic: str, count: int, threads: int, size: int, time_limit: float) -> float:
    body = body_of(size)
    errors: list[BaseException] = []
    with SyncWriter([tcp], publish_timeout=time_limit) as writer:
        writer.pub(topic, body)  # connect outside the timing, as the async Writer does
        shares = [count // threads + (1 if i < count % threads else 0) for i in range(threads)]

        def work(n: int) -> None:
            try:
                for _ in range(n):
                    writer.pub(topic, body)
            except Exception as exc:  # noqa: BLE001 - reported
                errors.append(exc)

        workers = [threading.Thread(target=work, args=(n,)) for n in shares]
        start = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join(time_limit)
        elapsed = time.perf_counter() - start
    if errors or any(w.is_alive() for w in workers):
        raise BenchFailed(f"sync publish: {errors[:1] or 'timed out'}")
    return count / elapsed


def writer_pub(tcp: str, topic: str, count: int, tasks: int, size: int, time_limit: float, backend: str) -> float:
    body = body_of(size)

    async def main() -> float:
        async with Writer([tcp], publish_timeout=time_limit) as writer:
            await writer.pub(topic, body)
            shares = [count // tasks + (1 if i < count % tasks else 0) for i in range(tasks)]

            async def work(n: int) -> None:
                for _ in range(n):
                    await writer.pub(topic, body)

            start = time.perf_counter()
            with anyio.fail_after(time_limit):
                async with anyio.create_task_group() as tg:
                    for n in shares:
                        tg.start_soon(work, n)
            return count / (time.perf_counter() - start)

    return anyio.run(main, backend=backend)


# ---------------------------------------------------------------- reader


def fill_backlog(tcp: str, http: tuple[str, int], topic: str, channel: str, count: int, size: int) -> None:
    for path in (f"/topic/create?topic={topic}", f"/channel/create?topic={topic}&channel={channel}"):
        status, _ = http_call(http, "POST", path)
        if status != 200:
            raise BenchFailed(f"{path}: HTTP {status}")
    body = body_of(size)
    with SyncWriter([tcp]) as writer:
        for i in range(0, count, 200):
            writer.mpub(topic, [body] * min(200, count - i))
    deadline = time.monotonic() + 60
    while True:  # the topic pump has copied everything into the channel
        stats = topic_stats(http, topic) or {}
        channels = stats.get("channels") or [{}]
        if channels[0].get("depth") == count:
            return
        if time.monotonic() > deadline:
            raise BenchFailed("backlog did not reach the channel")
        time.sleep(0.05)


def reader_consume(tcp: str, topic: str, channel: str, count: int, time_limit: float, backend: str, sync_handler: bool) -> float:
    async def main() -> float:
        done = anyio.Event()
        seen = 0
        lock = threading.Lock()

        async def async_handler(message: Message) -> None:
            nonlocal seen
            seen += 1
            if seen == count:
                done.set()

        def plain_handler(message: Message) -> None:  # in a worker thread
            nonlocal seen
            with lock:
                seen += 1
                last = seen == count
            if last:
                anyio.from_thread.run_sync(done.set)

        handler: Callable[[Message], Any] = plain_handler if sync_handler else async_handler
        start = time.perf_counter()
        with anyio.fail_after(time_limit):
            async with Reader(topic, channel, handler, nsqd_tcp_addresses=[tcp], max_in_flight=2500, concurrency=8 if sync_handler else None):
                await done.wait()
                elapsed = time.perf_counter() - start
        return count / elapsed

    return anyio.run(main, backend=backend)


# ---------------------------------------------------------------- driver

WORKLOADS = {
    "sync_writer_seq": "SyncWriter.pub, one thread",
    "sync_writer_50": f"SyncWriter.pub, {CONCURRENCY} threads sharing it",
    "writer_seq_asyncio": "Writer.pub on asyncio, one task",
    "writer_50_asyncio": f"Writer.pub on asyncio, {CONCURRENCY} tasks",
    "writer_seq_trio": "Writer.pub on trio, one task",
    "writer_50_trio": f"Writer.pub on trio, {CONCURRENCY} tasks",
    "reader_asyncio": "Reader on asyncio, async handler, max_in_flight 2500",
    "reader_trio": "Reader on trio, async handler, max_in_flight 2500",
    "reader_trio_sync_handler": "Reader on trio, plain-function handler (8 threads)",
}


def run_workload(name: str, daemon: SpawnedDaemon, opts: argparse.Namespace, run_id: str) -> float:
    tcp_host, tcp_port = daemon.addresses["TCP"]
    tcp = f"{tcp_host}:{tcp_port}"
    http = daemon.addresses["HTTP"]
    topic = f"cbench_{name}_{run_id}"
    try:
        if name.startswith("sync_writer"):
            return sync_pub(tcp, topic, opts.pub_messages, 1 if name.endswith("seq") else CONCURRENCY, opts.size, opts.time_limit)
        if name.startswith("writer_"):
            _, kind, backend = name.split("_")
            return writer_pub(tcp, topic, opts.pub_messages, 1 if kind == "seq" else CONCURRENCY, opts.size, opts.time_limit, backend)
        backend = name.split("_")[1]
        fill_backlog(tcp, http, topic, "bench", opts.consume_messages, opts.size)
        return reader_consume(tcp, topic, "bench", opts.consume_messages, opts.time_limit, backend, name.endswith("sync_handler"))
    finally:
        http_call(http, "POST", f"/topic/delete?topic={topic}")


def run(opts: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, list[float]] = {name: [] for name in opts.workloads}
    failures: list[str] = []
    loads: list[tuple[float, float, float]] = []
    for round_no in range(opts.repeat):
        daemon = SpawnedDaemon([sys.executable, "-m", "pynsqd"], ["--mem-queue-size=1000000"])
        try:
            daemon.wait_listening()
            for name in opts.workloads:
                loads.append(os.getloadavg())
                try:
                    rate = run_workload(name, daemon, opts, f"{round_no}")
                except (BenchFailed, TimeoutError, OSError) as exc:
                    failures.append(f"{name} round {round_no}: {exc!r}")
                    continue
                results[name].append(rate)
                if not opts.quiet:
                    print(f"  round {round_no + 1}: {name:<26} {rate:>10,.0f} msg/s", file=sys.stderr)
        finally:
            daemon.stop(30)
    return {
        "workloads": {
            name: {"what": WORKLOADS[name], "runs": rates, "median": statistics.median(rates) if rates else None}
            for name, rates in results.items()
        },
        "options": {k: v for k, v in vars(opts).items() if k not in ("json_out",)},
        "failures": failures,
        "loadavg_1m": [round(x[0], 2) for x in loads],
        "cpu_count": os.cpu_count(),
    }


def format_table(report: dict[str, Any]) -> str:
    lines = ["| workload | what | msg/s (median) | runs |", "|---|---|---:|---|"]
    for name, w in report["workloads"].items():
        median = f"**{w['median']:,.0f}**" if w["median"] else "failed"
        runs = ", ".join(f"{r:,.0f}" for r in w["runs"])
        lines.append(f"| `{name}` | {w['what']} | {median} | {runs} |")
    return "\n".join(lines)


def parse_options(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated, from: " + ", ".join(WORKLOADS))
    p.add_argument("--pub-messages", type=int, default=20_000, help="messages per publish workload")
    p.add_argument("--consume-messages", type=int, default=100_000, help="backlog per Reader workload")
    p.add_argument("--size", type=int, default=200, help="message body size in bytes")
    p.add_argument("--repeat", type=int, default=3, help="rounds (each on a fresh pynsqd); the table gives the median")
    p.add_argument("--time-limit", type=float, default=120.0, help="seconds one workload may take")
    p.add_argument("--json-out", help="write the report here")
    p.add_argument("--quiet", action="store_true")
    opts = p.parse_args(argv)
    opts.workloads = [w for w in opts.workloads.split(",") if w]
    unknown = set(opts.workloads) - set(WORKLOADS)
    if unknown:
        p.error(f"unknown workloads: {', '.join(sorted(unknown))}")
    return opts


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_options(argv)
    report = run(opts)
    print(format_table(report))
    if report["failures"]:
        print("failures:\n  " + "\n  ".join(report["failures"]))
    if opts.json_out:
        Path(opts.json_out).write_text(json.dumps(report, indent=2))
    return 3 if report["failures"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
