"""Stats as ``/stats`` reports them: the text layout nsqd prints and the
memory section (with Python's numbers under nsqd's field names)."""

from __future__ import annotations

import datetime
import gc
import resource
import sys
import time
from typing import TYPE_CHECKING, Any

from .e2e import format_result
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


def format_e2e(result: dict[str, Any] | None) -> str:
    """nsqd's ``quantile.Result.String``: the percentile values only."""
    return format_result(result or {})


def _connected(connect_ts: int, now: float) -> str:
    # nsqd truncates the connection age to the second
    return format_duration(max(0, int(now - connect_ts)))


def _rfc3339(ts: float) -> str:
    text = datetime.datetime.fromtimestamp(ts).astimezone().isoformat(timespec="seconds")
    return text[:-6] + "Z" if text.endswith("+00:00") else text


def format_text_stats(nsqd: NSQD, stats: dict[str, Any], mem: dict[str, int] | None) -> str:
    """``/stats`` as nsqd 1.3.0's printStats writes it, byte for byte in layout."""
    now = time.time()
    out = [
        f"{nsqd.version_string}\n",
        f"start_time {_rfc3339(nsqd.start_time)}\n",
        f"uptime {format_duration(now - nsqd.start_time)}\n",
        f"\nHealth: {nsqd.health()}\n",
    ]
    if mem is not None:
        out.append("\nMemory:\n")
        out += [f"   {k:<25}\t{v}\n" for k, v in mem.items()]
    topics = stats["topics"]
    out.append("\nTopics: None\n" if not topics else "\nTopics:")
    for t in topics:
        prefix = "*P " if t["paused"] else "   "
        # pynsqd's opt-in features add to a line only where they are on
        disk = f" disk: {t['disk_bytes']}/{t['max_disk_bytes']}{' FULL' if t['disk_full'] else ''}" if "max_disk_bytes" in t else ""
        kept = t.get("retention")
        retained = f" retained: {kept['messages']} ({kept['disk_bytes']} bytes)" if kept is not None else ""
        out.append(
            f"\n{prefix}[{t['topic_name']:<15}] depth: {t['depth']:<5} be-depth: {t['backend_depth']:<5} "
            f"msgs: {t['message_count']:<8} e2e%: {format_e2e(t['e2e_processing_latency'])}{disk}{retained}\n"
        )
        for c in t["channels"]:
            cprefix = "   *P " if c["paused"] else "      "
            out.append(
                f"{cprefix}[{c['channel_name']:<25}] depth: {c['depth']:<5} be-depth: {c['backend_depth']:<5} "
                f"inflt: {c['in_flight_count']:<4} def: {c['deferred_count']:<4} re-q: {c['requeue_count']:<5} "
                f"timeout: {c['timeout_count']:<5} msgs: {c['message_count']:<8} e2e%: {format_e2e(c['e2e_processing_latency'])}"
                + (f" dead: {c['dead_letter_count']}" if "dead_letter_count" in c else "")
                + (f" replay: {c['replay']['replayed']}{' done' if c['replay']['done'] else ''}" if c.get("replay") is not None else "")
                + "\n"
            )
            for cl in c["clients"]:
                out.append(
                    f"        [{cl['version']} {cl['client_id']:<21}] state: {cl['state']} inflt: {cl['in_flight_count']:<4} "
                    f"rdy: {cl['ready_count']:<4} fin: {cl['finish_count']:<8} re-q: {cl['requeue_count']:<8} "
                    f"msgs: {cl['message_count']:<8} connected: {_connected(cl['connect_ts'], now)}\n"
                )
    producers = stats["producers"]
    out.append("\nProducers: None\n" if not producers else "\nProducers:")
    for p in producers:
        pub_counts = p.get("pub_counts") or []
        total = sum(pc["count"] for pc in pub_counts)
        out.append(f"\n   [{p['version']} {p['client_id']:<21}] msgs: {total:<8} connected: {_connected(p['connect_ts'], now)}\n")
        out += [f"      [{pc['topic']:<15}] msgs: {pc['count']:<8}\n" for pc in pub_counts]
    return "".join(out)
