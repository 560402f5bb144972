"""Pages' numbers: the nsqds' ``/stats`` documents of a :class:`Snapshot`
added up per topic and per channel across the cluster (pure functions,
what nsqadmin's ``TopicStats.Add``/``ChannelStats.Add`` do)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import attrs

from .cluster_info import KnownNode, NodeState, Snapshot

TOPIC_SUMS = ("depth", "backend_depth", "message_count")
CHANNEL_SUMS = (
    "depth", "backend_depth", "in_flight_count", "deferred_count", "requeue_count", "timeout_count", "message_count", "client_count",
    "dead_letter_count",  # pynsqd, where dead letters are on
)


def _sum_into(totals: dict[str, int], doc: dict[str, Any], fields: Iterable[str]) -> None:
    for f in fields:
        totals[f] = totals.get(f, 0) + int(doc.get(f) or 0)


def percentiles(doc: dict[str, Any]) -> dict[float, float]:
    """An e2e_processing_latency document as {quantile: seconds}."""
    e2e = doc.get("e2e_processing_latency") or {}
    if not e2e.get("count"):
        return {}  # nothing finished in the window: no latency to show
    out = {}
    for p in e2e.get("percentiles") or ():
        if "quantile" in p and p.get("value") is not None:
            out[float(p["quantile"])] = float(p["value"]) / 1e9
    return out


def worst_percentiles(docs: Iterable[dict[str, Any]]) -> dict[float, float]:
    """Per quantile, the slowest node's value: an honest upper bound (nsqds'
    quantiles cannot be merged exactly)."""
    out: dict[float, float] = {}
    for doc in docs:
        for q, v in percentiles(doc).items():
            out[q] = max(out.get(q, 0.0), v)
    return dict(sorted(out.items(), reverse=True))


@attrs.define
class TopicRow:
    name: str
    totals: dict[str, int] = attrs.Factory(dict)
    channel_depth: int = 0
    channels: set[str] = attrs.Factory(set)
    nodes: list[str] = attrs.Factory(list)
    paused_on: list[str] = attrs.Factory(list)
    down: list[str] = attrs.Factory(list)  # nodes down that had it

    @property
    def memory_depth(self) -> int:
        return self.totals.get("depth", 0) - self.totals.get("backend_depth", 0)


def topic_rows(snapshot: Snapshot, lookupd_topics: Iterable[str] = (), down: Iterable[KnownNode] = ()) -> list[TopicRow]:
    rows: dict[str, TopicRow] = {name: TopicRow(name) for name in lookupd_topics}
    for node in snapshot.nodes.values():
        for topic in (node.stats or {}).get("topics") or ():
            name = topic.get("topic_name", "")
            row = rows.setdefault(name, TopicRow(name))
            _sum_into(row.totals, topic, TOPIC_SUMS)
            row.nodes.append(node.address)
            if topic.get("paused"):
                row.paused_on.append(node.address)
            for channel in topic.get("channels") or ():
                row.channels.add(channel.get("channel_name", ""))
                row.channel_depth += int(channel.get("depth") or 0)
    for known in down:
        for name in known.topics:
            rows.setdefault(name, TopicRow(name)).down.append(known.address)
    return sorted(rows.values(), key=lambda r: r.name)


@attrs.define
class NodeRow:
    """One nsqd's part of a topic or channel."""

    node: str
    doc: dict[str, Any]
    hostname: str = ""

    @property
    def memory_depth(self) -> int:
        return int(self.doc.get("depth") or 0) - int(self.doc.get("backend_depth") or 0)

    @property
    def e2e(self) -> dict[float, float]:
        return percentiles(self.doc)


@attrs.define
class Aggregate:
    """A topic or channel added up over the nsqds that have it."""

    name: str
    totals: dict[str, int] = attrs.Factory(dict)
    node_rows: list[NodeRow] = attrs.Factory(list)
    paused_on: list[str] = attrs.Factory(list)

    @property
    def memory_depth(self) -> int:
        return self.totals.get("depth", 0) - self.totals.get("backend_depth", 0)

    @property
    def e2e(self) -> dict[float, float]:
        return worst_percentiles(r.doc for r in self.node_rows)

    def nodes_with(self, field: str) -> list[NodeRow]:
        """The nsqds whose /stats have ``field`` set: pynsqd's opt-in
        features add theirs only where on (max_attempts, retention...)."""
        return [r for r in self.node_rows if r.doc.get(field)]

    @property
    def replaying(self) -> bool:
        return any(not r.doc["replay"].get("done") for r in self.nodes_with("replay"))


@attrs.define
class ChannelRow(Aggregate):
    clients: list[dict[str, Any]] = attrs.Factory(list)  # each with "node" added


@attrs.define
class TopicView(Aggregate):
    channels: dict[str, ChannelRow] = attrs.Factory(dict)
    down: list[KnownNode] = attrs.Factory(list)

    @property
    def exists(self) -> bool:
        return bool(self.node_rows or self.down)


def _hostname(node: NodeState) -> str:
    return str(node.producer.get("hostname") or (node.info or {}).get("hostname") or "")


def topic_view(snapshot: Snapshot, name: str, down: Iterable[KnownNode] = ()) -> TopicView:
    view = TopicView(name, down=list(down))
    for node in sorted(snapshot.nodes.values(), key=lambda n: n.address):
        topic = node.topic(name)
        if topic is None:
            continue
        view.node_rows.append(NodeRow(node.address, topic, _hostname(node)))
        _sum_into(view.totals, topic, TOPIC_SUMS)
        if topic.get("paused"):
            view.paused_on.append(node.address)
        for channel in topic.get("channels") or ():
            cname = channel.get("channel_name", "")
            row = view.channels.setdefault(cname, ChannelRow(cname))
            _sum_into(row.totals, channel, CHANNEL_SUMS)
            row.node_rows.append(NodeRow(node.address, channel, _hostname(node)))
            if channel.get("paused"):
                row.paused_on.append(node.address)
            for client in channel.get("clients") or ():
                row.clients.append({**client, "node": node.address})
    view.channels = dict(sorted(view.channels.items()))
    return view


def lookupd_registrations(debug: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """nsqlookupd's ``/debug`` map as {topic: {"producers": [...], "channels":
    {channel: [producers]}}}; producers carry ``tombstoned``."""
    out: dict[str, dict[str, Any]] = {}
    for key, producers in sorted(debug.items()):
        category, _, rest = key.partition(":")
        topic, _, sub = rest.partition(":")
        if category == "topic":
            out.setdefault(topic, {"producers": [], "channels": {}})["producers"] = producers
        elif category == "channel":
            out.setdefault(topic, {"producers": [], "channels": {}})["channels"][sub] = producers
    return out
