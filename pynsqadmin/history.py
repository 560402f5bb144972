"""The graphs' memory: what pynsqadmin keeps of the nsqds' ``/stats`` over
time, so that it draws message rates, depths and in-flight counts without a
graphite server.

Sans-IO: the sampler task feeds :meth:`History.record` one *round* -- every
nsqd's ``/stats?format=json`` document (``None`` for a node that did not
answer) with the time it was taken -- and pages ask for :meth:`History.series`.

Memory is bounded whatever the cluster does:

* one ring of round timestamps and, per topic and per channel, one float32
  ring per metric, all ``capacity`` long (``--history`` / ``--sample-interval``
  points); a series absent for a whole ring's worth of rounds is dropped;
* at most ``max_series`` series; topics/channels beyond that are not graphed
  (:attr:`History.untracked` counts them in the last round);
* per (node, topic[, channel]) the last counter seen, for rates; forgotten
  when the node answers without it, or has not answered for a whole ring.

Rates come from nsqd's ``message_count`` counters, which restart at 0 when an
nsqd restarts (its ``start_time`` changes) or a topic/channel is deleted and
created again (the counter goes down).  As Prometheus' ``rate()`` does, a reset
counts the new value as the messages since the reset, so a rate is never
negative and never loses the messages counted after a restart.  The first
sight of a counter gives no rate (there is nothing to take a difference from).
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Iterator, Mapping
from typing import Any

import attrs

NaN = math.nan

TOPIC_METRICS = ("rate", "depth", "channel_depth", "in_flight")
CHANNEL_METRICS = ("rate", "depth", "in_flight", "deferred")

# (topic, channel); channel "" is the topic itself
Key = tuple[str, str]


@attrs.define
class _Counter:
    start_time: int
    count: int
    at: float


@attrs.define
class _NodeCounters:
    last_round: int
    counters: dict[Key, _Counter] = attrs.Factory(dict)


class Series:
    """One topic's or channel's rings (float32, NaN where nothing was seen)."""

    __slots__ = ("metrics", "rings", "last_seen")

    def __init__(self, metrics: tuple[str, ...], capacity: int) -> None:
        self.metrics = metrics
        blank = array("f", [NaN]) * capacity
        self.rings = {m: array("f", blank) for m in metrics}
        self.last_seen = -1


@attrs.frozen
class Points:
    """A metric in time order: ``times[i]`` (unix seconds) -> ``values[i]``
    (NaN where the series had no value in that round)."""

    times: list[float]
    values: list[float]

    def last(self) -> float:
        """The newest value that is not NaN (NaN if there is none)."""
        for v in reversed(self.values):
            if not math.isnan(v):
                return v
        return NaN

    def __len__(self) -> int:
        return len(self.times)


class History:
    def __init__(self, capacity: int, *, max_series: int = 5000) -> None:
        if capacity < 2:
            raise ValueError("capacity must be at least 2")
        self.capacity = capacity
        self.max_series = max_series
        self._times = array("d", [NaN]) * capacity
        self._rounds = 0  # rounds recorded; the next one goes to _rounds % capacity
        self._series: dict[Key, Series] = {}
        self._nodes: dict[str, _NodeCounters] = {}
        self.untracked = 0

    # ------------------------------------------------------------ feeding

    def record(self, now: float, snapshots: Mapping[str, dict[str, Any] | None]) -> bool:
        """One sampling round: ``{node: /stats document or None}`` taken at
        ``now``.  A round not later than the previous one is ignored (the wall
        clock stepped back) and False returned."""
        if self._rounds and now <= self._times[(self._rounds - 1) % self.capacity]:
            return False
        rnd = self._rounds
        slot = rnd % self.capacity
        sums: dict[Key, dict[str, float]] = {}
        rated: dict[Key, float] = {}
        for node, doc in snapshots.items():
            if doc is None:
                continue
            self._add_node(node, doc, now, rnd, sums, rated)
        self.untracked = 0
        for key, values in sums.items():
            series = self._series.get(key)
            if series is None:
                if len(self._series) >= self.max_series:
                    self.untracked += 1
                    continue
                series = self._series[key] = Series(CHANNEL_METRICS if key[1] else TOPIC_METRICS, self.capacity)
            values["rate"] = rated.get(key, NaN)
            for metric, ring in series.rings.items():
                ring[slot] = values.get(metric, NaN)
            series.last_seen = rnd
        for key in list(self._series):
            series = self._series[key]
            if series.last_seen == rnd:
                continue
            if rnd - series.last_seen >= self.capacity:
                del self._series[key]  # nothing of it left in the window
                continue
            for ring in series.rings.values():
                ring[slot] = NaN
        # the counters of nodes silent for a whole window
        for node in [n for n, c in self._nodes.items() if rnd - c.last_round >= self.capacity]:
            del self._nodes[node]
        self._times[slot] = now
        self._rounds += 1
        return True

    def _add_node(self, node: str, doc: dict[str, Any], now: float, rnd: int, sums: dict[Key, dict[str, float]], rated: dict[Key, float]) -> None:
        start_time = doc.get("start_time", 0)
        previous = self._nodes.get(node)
        old = previous.counters if previous is not None else {}
        # rebuilt from this answer: what the node no longer has is forgotten
        counters: dict[Key, _Counter] = {}
        self._nodes[node] = _NodeCounters(rnd, counters)

        def rate(key: Key, count: int) -> None:
            prev = old.get(key)
            counters[key] = _Counter(start_time, count, now)
            if prev is None or now <= prev.at:
                return
            if prev.start_time != start_time or count < prev.count:
                delta = count  # reset: everything counted since is new
            else:
                delta = count - prev.count
            rated[key] = rated.get(key, 0.0) + delta / (now - prev.at)

        for topic in doc.get("topics") or ():
            tname = topic.get("topic_name", "")
            tkey = (tname, "")
            t = sums.setdefault(tkey, {"depth": 0.0, "channel_depth": 0.0, "in_flight": 0.0})
            t["depth"] += topic.get("depth", 0)
            rate(tkey, topic.get("message_count", 0))
            for channel in topic.get("channels") or ():
                ckey = (tname, channel.get("channel_name", ""))
                c = sums.setdefault(ckey, {"depth": 0.0, "in_flight": 0.0, "deferred": 0.0})
                depth = channel.get("depth", 0)
                in_flight = channel.get("in_flight_count", 0)
                c["depth"] += depth
                c["in_flight"] += in_flight
                c["deferred"] += channel.get("deferred_count", 0)
                t["channel_depth"] += depth
                t["in_flight"] += in_flight
                rate(ckey, channel.get("message_count", 0))

    # ------------------------------------------------------------ reading

    def _order(self) -> Iterator[int]:
        n = min(self._rounds, self.capacity)
        first = self._rounds - n
        for r in range(first, self._rounds):
            yield r % self.capacity

    def times(self) -> list[float]:
        return [self._times[i] for i in self._order()]

    def series(self, topic: str, channel: str = "") -> dict[str, Points] | None:
        """Every metric of a topic (``channel=""``) or channel, or None if it
        has no history."""
        series = self._series.get((topic, channel))
        if series is None:
            return None
        order = list(self._order())
        times = [self._times[i] for i in order]
        return {m: Points(times, [ring[i] for i in order]) for m, ring in series.rings.items()}

    def latest(self, topic: str, channel: str, metric: str) -> float:
        """The value of ``metric`` in the newest round (NaN if not seen then)."""
        series = self._series.get((topic, channel))
        if series is None or series.last_seen != self._rounds - 1:
            return NaN
        return float(series.rings[metric][(self._rounds - 1) % self.capacity])

    @property
    def rounds(self) -> int:
        return self._rounds

    def __len__(self) -> int:
        """Series kept."""
        return len(self._series)

    def counter_count(self) -> int:
        return sum(len(n.counters) for n in self._nodes.values())
