"""Prometheus text exposition (format 0.0.4) of nsqd's stats, at ``/metrics``.

NSQ users have asked for this for years (nsqio/nsq#732); nsqd itself only
pushes to statsd.  The numbers are the ones ``/stats`` reports, under
Prometheus names: counts that only grow are counters (``*_total``), the rest
gauges; e2e latency percentiles are gauges with a ``quantile`` label because
they cover nsqd's sliding window rather than the process lifetime.

``render_metrics`` is a plain function of ``/stats``-shaped data;
``metrics_endpoint`` is the HTTP handler.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from .http_server import Handler, Request, Response
from .stats import memory_stats

if TYPE_CHECKING:
    from .nsqd import NSQD

CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"

# name -> (type, help); the order here is the order of the output
FAMILIES: dict[str, tuple[str, str]] = {
    "nsqd_info": ("gauge", "nsqd version this server is compatible with (always 1)."),
    "nsqd_healthy": ("gauge", "1 while nsqd is healthy (GET /ping answers OK), else 0."),
    "nsqd_clients": ("gauge", "TCP client connections."),
    "nsqd_topics": ("gauge", "Topics."),
    "nsqd_topic_depth": ("gauge", "Messages queued in the topic (memory + disk), not yet copied to channels."),
    "nsqd_topic_backend_depth": ("gauge", "Messages of the topic queued on disk."),
    "nsqd_topic_messages_total": ("counter", "Messages published to the topic."),
    "nsqd_topic_message_bytes_total": ("counter", "Bytes of message bodies published to the topic."),
    "nsqd_topic_paused": ("gauge", "1 if the topic is paused."),
    "nsqd_topic_channels": ("gauge", "Channels of the topic."),
    "nsqd_topic_e2e_processing_latency_seconds": (
        "gauge", "Publish-to-FIN latency percentile over all the topic's channels, in the e2e window."),
    "nsqd_topic_e2e_processing_latency_samples": ("gauge", "FINished messages in the topic's e2e window."),
    # only for topics with a disk bound (--max-disk-bytes-per-topic, /topic/settings)
    "nsqd_topic_disk_bytes": ("gauge", "Bytes of messages the topic and its channels hold queued on disk (what the bound counts)."),
    "nsqd_topic_max_disk_bytes": ("gauge", "The topic's disk bound: publishes are refused past it."),
    "nsqd_topic_disk_full": ("gauge", "1 while the topic refuses publishes (its disk bound reached, not yet back to 90%)."),
    "nsqd_topic_retained_messages": ("gauge", "Messages kept by the topic's retention (retaining topics only)."),
    "nsqd_topic_retained_bytes": ("gauge", "Bytes of the topic's retention log on disk (retaining topics only)."),
    "nsqd_topic_retained_oldest_timestamp_seconds": ("gauge", "Publish time of the oldest retained message (retaining topics only)."),
    "nsqd_channel_depth": ("gauge", "Messages queued in the channel (memory + disk)."),
    "nsqd_channel_backend_depth": ("gauge", "Messages of the channel queued on disk."),
    "nsqd_channel_in_flight": ("gauge", "Messages sent to consumers and not yet finished."),
    "nsqd_channel_deferred": ("gauge", "Messages deferred (REQ with a delay, DPUB)."),
    "nsqd_channel_messages_total": ("counter", "Messages that entered the channel."),
    "nsqd_channel_requeued_total": ("counter", "Messages requeued by consumers (REQ)."),
    "nsqd_channel_timed_out_total": ("counter", "In-flight messages that timed out and were requeued."),
    "nsqd_channel_clients": ("gauge", "Consumers subscribed to the channel."),
    "nsqd_channel_paused": ("gauge", "1 if the channel is paused."),
    "nsqd_channel_e2e_processing_latency_seconds": ("gauge", "Publish-to-FIN latency percentile of the channel, in the e2e window."),
    "nsqd_channel_e2e_processing_latency_samples": ("gauge", "FINished messages in the channel's e2e window."),
    # only for channels with server-side max attempts (--max-attempts, /channel/settings)
    "nsqd_channel_dead_lettered_total": ("counter", "Messages moved to the channel's dead-letter topic after max attempts."),
    "nsqd_channel_replayed_total": ("counter", "Retained messages given to the channel again by its current replay (while one runs)."),
    "process_resident_memory_bytes": ("gauge", "Resident memory size in bytes."),
    "process_start_time_seconds": ("gauge", "Start time of the process since unix epoch in seconds."),
}


def escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_value(value: int | float | bool) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def format_quantile(q: float) -> str:
    return f"{q:g}"  # "0.99", "1": the usual spelling of quantile labels


class Exposition:
    """Samples collected per family, rendered with one HELP/TYPE per family."""

    def __init__(self, families: Mapping[str, tuple[str, str]] = FAMILIES) -> None:
        self.families = families
        self.samples: dict[str, list[str]] = {name: [] for name in families}

    def add(self, name: str, value: int | float | bool, **labels: str) -> None:
        if labels:
            text = ",".join(f'{k}="{escape_label(v)}"' for k, v in labels.items())
            self.samples[name].append(f"{name}{{{text}}} {format_value(value)}")
        else:
            self.samples[name].append(f"{name} {format_value(value)}")

    def render(self) -> str:
        out: list[str] = []
        for name, (typ, help_text) in self.families.items():
            samples = self.samples[name]
            if not samples:
                continue
            out.append(f"# HELP {name} {escape_help(help_text)}")
            out.append(f"# TYPE {name} {typ}")
            out += samples
        return "\n".join(out) + "\n"


def _latency(exp: Exposition, family: str, result: dict[str, Any] | None, **labels: str) -> None:
    if not result or result.get("percentiles") is None:
        return
    for p in result["percentiles"]:
        exp.add(f"{family}_seconds", p["value"] / 1e9, **labels, quantile=format_quantile(p["quantile"]))
    exp.add(f"{family}_samples", result.get("count", 0), **labels)


def render_metrics(
    topics: Iterable[dict[str, Any]],
    *,
    version: str,
    healthy: bool,
    clients: int,
    rss_bytes: int,
    start_time: float,
) -> str:
    """The exposition for ``/stats``-shaped topic dicts and process figures."""
    exp = Exposition()
    exp.add("nsqd_info", 1, version=version)
    exp.add("nsqd_healthy", healthy)
    exp.add("nsqd_clients", clients)
    topics = list(topics)
    exp.add("nsqd_topics", len(topics))
    for t in topics:
        topic = t["topic_name"]
        exp.add("nsqd_topic_depth", t["depth"], topic=topic)
        exp.add("nsqd_topic_backend_depth", t["backend_depth"], topic=topic)
        exp.add("nsqd_topic_messages_total", t["message_count"], topic=topic)
        exp.add("nsqd_topic_message_bytes_total", t["message_bytes"], topic=topic)
        exp.add("nsqd_topic_paused", bool(t["paused"]), topic=topic)
        exp.add("nsqd_topic_channels", len(t["channels"]), topic=topic)
        _latency(exp, "nsqd_topic_e2e_processing_latency", t.get("e2e_processing_latency"), topic=topic)
        if "max_disk_bytes" in t:
            exp.add("nsqd_topic_disk_bytes", t["disk_bytes"], topic=topic)
            exp.add("nsqd_topic_max_disk_bytes", t["max_disk_bytes"], topic=topic)
            exp.add("nsqd_topic_disk_full", bool(t["disk_full"]), topic=topic)
        kept = t.get("retention")
        if kept is not None:
            exp.add("nsqd_topic_retained_messages", kept["messages"], topic=topic)
            exp.add("nsqd_topic_retained_bytes", kept["disk_bytes"], topic=topic)
            exp.add("nsqd_topic_retained_oldest_timestamp_seconds", kept["oldest_timestamp"] / 1e9, topic=topic)
        for c in t["channels"]:
            labels = {"topic": topic, "channel": c["channel_name"]}
            exp.add("nsqd_channel_depth", c["depth"], **labels)
            exp.add("nsqd_channel_backend_depth", c["backend_depth"], **labels)
            exp.add("nsqd_channel_in_flight", c["in_flight_count"], **labels)
            exp.add("nsqd_channel_deferred", c["deferred_count"], **labels)
            exp.add("nsqd_channel_messages_total", c["message_count"], **labels)
            exp.add("nsqd_channel_requeued_total", c["requeue_count"], **labels)
            exp.add("nsqd_channel_timed_out_total", c["timeout_count"], **labels)
            exp.add("nsqd_channel_clients", c["client_count"], **labels)
            exp.add("nsqd_channel_paused", bool(c["paused"]), **labels)
            _latency(exp, "nsqd_channel_e2e_processing_latency", c.get("e2e_processing_latency"), **labels)
            if "dead_letter_count" in c:
                exp.add("nsqd_channel_dead_lettered_total", c["dead_letter_count"], **labels)
            if c.get("replay") is not None:
                exp.add("nsqd_channel_replayed_total", c["replay"]["replayed"], **labels)
    exp.add("process_resident_memory_bytes", rss_bytes)
    exp.add("process_start_time_seconds", start_time)
    return exp.render()


def metrics_endpoint(nsqd: NSQD) -> Handler:
    """The ``GET /metrics`` handler for ``nsqd``."""

    async def handler(req: Request) -> Response:
        text = render_metrics(
            nsqd.stats(include_clients=False)["topics"],
            version=nsqd.version,
            healthy=nsqd.is_healthy(),
            clients=len(nsqd.clients),
            rss_bytes=memory_stats()["heap_in_use_bytes"],
            start_time=float(nsqd.start_time),
        )
        return Response(200, text.encode(), CONTENT_TYPE)

    return handler
