"""End-to-end processing latency: publish -> FIN time, as percentiles.

nsqd keeps, per channel, two rotating quantile streams covering
``--e2e-processing-latency-window-time`` (each holds half the window; the
older one is reset when the window moves) and reports
``{"count": n, "percentiles": [{"quantile": q, "value": ns}, ...]}``.

The sketch here is log-bucketed (the DDSketch idea): a value ``x >= 1`` ns
lands in bucket ``ceil(log_gamma(x))`` with ``gamma = (1 + a) / (1 - a)``,
and a bucket answers with ``2 * gamma**k / (gamma + 1)``, which is within a
relative error ``a`` of every value in it.  So any quantile is within
``RELATIVE_ACCURACY`` of the exact order statistic, memory is bounded by the
number of buckets a 64-bit nanosecond range can touch (~2200 at 1%), merging
(the topic aggregate) is exact, and ``add`` is a log, a ceil and a dict
increment — cheap enough for the FIN path.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

RELATIVE_ACCURACY = 0.01
_GAMMA = (1 + RELATIVE_ACCURACY) / (1 - RELATIVE_ACCURACY)
_INV_LOG_GAMMA = 1.0 / math.log(_GAMMA)
# latencies <= 0 (the wall clock stepped back) are counted here, reported as 0
_ZERO = -1


def bucket_of(ns: int) -> int:
    """The bucket key of a latency in nanoseconds."""
    if ns < 1:
        return _ZERO
    return math.ceil(math.log(ns) * _INV_LOG_GAMMA)


def bucket_value(key: int) -> int:
    """The value a bucket answers with (within RELATIVE_ACCURACY of its members)."""
    if key == _ZERO:
        return 0
    return round(2.0 * _GAMMA**key / (_GAMMA + 1.0))


def quantile_of(counts: dict[int, int], total: int, q: float) -> int:
    """The ``q`` quantile of bucketed counts: the bucket holding the element of
    rank ``floor(q * (total - 1))`` (0-based) in sorted order."""
    if total <= 0:
        return 0
    rank = int(q * (total - 1))
    seen = 0
    for key in sorted(counts):
        seen += counts[key]
        if seen > rank:
            return bucket_value(key)
    return bucket_value(max(counts))  # pragma: no cover - counts sum to total


def result_of(counts: dict[int, int], percentiles: Sequence[float]) -> dict[str, Any]:
    """nsqd's quantile.Result for merged bucket counts."""
    total = sum(counts.values())
    return {
        "count": total,
        "percentiles": [{"quantile": q, "value": quantile_of(counts, total, q)} for q in percentiles],
    }


class LatencyStream:
    """One channel's windowed latency sketch (nsqd's ``quantile.Quantile``)."""

    __slots__ = ("percentiles", "move_window_time", "_clock", "_streams", "_current", "_index", "_last_move", "_move_at")

    def __init__(
        self,
        percentiles: Sequence[float],
        window_time: float = 600.0,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.percentiles = list(percentiles)
        # as nsqd: two streams, each covering half the window
        self.move_window_time = window_time / 2
        self._clock = clock
        self._streams: list[defaultdict[int, int]] = [defaultdict(int), defaultdict(int)]
        self._index = 0
        self._current = self._streams[0]
        self._last_move = clock()
        self._move_at = self._last_move + self.move_window_time

    def add(self, ns: int) -> None:
        """Record one latency (ns).  Hot path: called on every FIN."""
        if self._clock() > self._move_at:
            self._move_window()
        if ns >= 1:
            self._current[math.ceil(math.log(ns) * _INV_LOG_GAMMA)] += 1
        else:
            self._current[_ZERO] += 1

    def _move_window(self) -> None:
        now = self._clock()
        step = self.move_window_time
        if step <= 0:
            self._streams[0].clear()
            self._streams[1].clear()
            self._last_move = now
        else:
            # nsqd moves one half-window at a time; after two moves both
            # halves are empty, so skip ahead instead of looping
            moves = 0
            while now > self._last_move + step and moves < 2:
                self._index ^= 1
                self._streams[self._index].clear()
                self._last_move += step
                moves += 1
            if now > self._last_move + step:
                self._last_move += (now - self._last_move) // step * step
        self._current = self._streams[self._index]
        self._move_at = self._last_move + step

    def counts(self) -> dict[int, int]:
        """Both halves of the window merged (what a query sees)."""
        if self._clock() > self._move_at:
            self._move_window()
        merged = dict(self._streams[0])
        for key, n in self._streams[1].items():
            merged[key] = merged.get(key, 0) + n
        return merged

    def result(self) -> dict[str, Any]:
        """``{"count": n, "percentiles": [{"quantile": q, "value": ns}, ...]}``."""
        return result_of(self.counts(), self.percentiles)

    def merged_result(self, streams: Iterable[LatencyStream]) -> dict[str, Any]:
        """The aggregate over ``streams`` with this stream's percentiles."""
        return merged_result(streams, self.percentiles)


def merged_result(streams: Iterable[LatencyStream], percentiles: Sequence[float] | None = None) -> dict[str, Any]:
    """A topic's e2e latency: every channel's window merged (exact for this
    sketch, unlike averaging per-channel percentiles)."""
    streams = list(streams)
    if not streams:
        return {"count": 0, "percentiles": None}
    merged: dict[int, int] = {}
    for stream in streams:
        for key, n in stream.counts().items():
            merged[key] = merged.get(key, 0) + n
    return result_of(merged, streams[0].percentiles if percentiles is None else percentiles)


def human_ns(value: float) -> str:
    """nsqd's NanoSecondToHuman, used by the text /stats (``1.5ms``)."""
    if value > 1e9:
        return f"{value / 1e9:.1f}s"
    if value > 1e6:
        return f"{value / 1e6:.1f}ms"
    if value > 1e3:
        return f"{value / 1e3:.1f}us"
    return f"{value:.1f}ns"


def format_result(result: dict[str, Any]) -> str:
    """nsqd's ``quantile.Result.String``: the values, comma separated."""
    return ", ".join(human_ns(p["value"]) for p in result.get("percentiles") or [])
