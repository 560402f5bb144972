"""Stats as ``/stats`` reports them: the text layout nsqd prints and the
memory section (with Python's numbers under nsqd's field names)."""

from __future__ import annotations

import datetime
import gc
import resource
import sys
import time
from typing import TYPE_CHECKING, Any

from .flags import format_duration

if TYPE_CHECKING:
    from .nsqd import NSQD


def memory_stats() -> dict[str, int]:
    """nsqd's memory fields with CPython's numbers: allocated blocks as heap
    objects, the process RSS as heap in use, collections as GC runs.  Go-only
    figures (idle/released heap, GC pause percentiles, next GC) are 0."""
    rss = _rss_bytes()
    counts = gc.get_stats()
    return {
        "heap_objects": sys.getallocatedblocks(),
        "heap_idle_bytes": 0,
        "heap_in_use_bytes": rss,
        "heap_released_bytes": 0,
        "gc_pause_usec_100": 0,
        "gc_pause_usec_99": 0,
        "gc_pause_usec_95": 0,
        "next_gc_bytes": 0,
        "gc_total_runs": sum(s.get("collections", 0) for s in counts),
    }


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as fh:
            pages = int(fh.read().split()[1])
        return pages * resource.getpagesize()
    except (OSError, ValueError, IndexError):
        usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return usage if sys.platform == "darwin" else usage * 1024


def format_e2e(result: dict[str, Any]) -> str:
    percentiles = result.get("percentiles") or []
    parts = []
    for p in percentiles:
        q = p.get("quantile", 0)
        value_ns = p.get("value", 0)
        parts.append(f"{q * 100:g}%: {format_duration(value_ns / 1e9)}")
    return ", ".join(parts)


def _client_line(c: dict[str, Any], now: float) -> str:
    duration = format_duration(max(0, int(now - c["connect_ts"])))
    port = c["remote_address"].rsplit(":", 1)[-1]
    ident = f"{c['hostname']}:{port} {c['user_agent']}"
    pub_counts = c.get("pub_counts")
    if pub_counts:
        total = sum(p["count"] for p in pub_counts)
        topics = ",".join(f"{p['topic']}={p['count']}" for p in pub_counts)
        return f"[{c['version']} {ident:<21}] msgs: {total:<8} topics: {topics} connected: {duration}"
    return (
        f"[{c['version']} {ident:<21}] state: {c['state']} inflt: {c['in_flight_count']:<4} rdy: {c['ready_count']:<4} "
        f"fin: {c['finish_count']:<8} re-q: {c['requeue_count']:<8} msgs: {c['message_count']:<8} connected: {duration}"
    )


def format_text_stats(nsqd: NSQD, stats: dict[str, Any], mem: dict[str, int] | None) -> str:
    now = time.time()
    start = datetime.datetime.fromtimestamp(nsqd.start_time).astimezone()
    lines = [
        nsqd.version_string,
        f"start_time {start.isoformat(timespec='seconds')}",
        f"uptime {format_duration(now - nsqd.start_time)}",
        "",
        f"Health: {nsqd.health()}",
    ]
    if mem is not None:
        lines += ["", "Memory:"]
        lines += [f"   {k:<25}\t{v}" for k, v in mem.items()]
    topics = stats["topics"]
    if not topics:
        lines += ["", "Topics: None"]
    else:
        lines += ["", "Topics:"]
    for t in topics:
        prefix = "*P " if t["paused"] else "   "
        lines.append(
            f"{prefix}[{t['topic_name']:<15}] depth: {t['depth']:<5} be-depth: {t['backend_depth']:<5} "
            f"msgs: {t['message_count']:<8} e2e%: {format_e2e(t['e2e_processing_latency'])}"
        )
        for c in t["channels"]:
            cprefix = "   *P " if c["paused"] else "      "
            lines.append(
                f"{cprefix}[{c['channel_name']:<25}] depth: {c['depth']:<5} be-depth: {c['backend_depth']:<5} "
                f"inflt: {c['in_flight_count']:<4} def: {c['deferred_count']:<4} re-q: {c['requeue_count']:<5} "
                f"timeout: {c['timeout_count']:<5} msgs: {c['message_count']:<8} e2e%: {format_e2e(c['e2e_processing_latency'])}"
            )
            for client in c["clients"]:
                lines.append(f"        {_client_line(client, now)}")
        lines.append("")
    producers = stats["producers"]
    if not producers:
        lines += ["", "Producers: None"]
    else:
        lines += ["", "Producers:"]
        lines += [f"   {_client_line(p, now)}" for p in producers]
    return "\n".join(lines) + "\n"
