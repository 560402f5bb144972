"""pynsqadmin's history (sans-IO): bounded memory whatever the cluster does,
and message rates from nsqd's counters that stay right across restarts."""

from __future__ import annotations

import math
import tracemalloc

from hypothesis import given, settings
from hypothesis import strategies as st

from pynsqadmin.graph import format_number, line_chart, nice_ceiling, sparkline
from pynsqadmin.history import History, Points


def stats(start_time: int, topics: dict[str, tuple[int, dict[str, int]]], depth: int = 0) -> dict:
    """A /stats document: {topic: (message_count, {channel: message_count})}."""
    return {
        "start_time": start_time,
        "topics": [
            {
                "topic_name": name,
                "depth": depth,
                "message_count": count,
                "channels": [
                    {"channel_name": c, "depth": depth, "in_flight_count": 1, "deferred_count": 0, "message_count": n}
                    for c, n in channels.items()
                ],
            }
            for name, (count, channels) in topics.items()
        ],
    }


def test_rate_from_counter_and_first_sight_has_none():
    h = History(10)
    h.record(100.0, {"a": stats(1, {"t": (0, {"c": 0})})})
    assert math.isnan(h.latest("t", "", "rate"))
    h.record(110.0, {"a": stats(1, {"t": (50, {"c": 20})})})
    assert h.latest("t", "", "rate") == 5.0
    assert h.latest("t", "c", "rate") == 2.0
    assert h.latest("t", "", "channel_depth") == 0
    assert h.latest("t", "c", "in_flight") == 1


def test_restart_resets_are_counted_not_negative():
    h = History(10)
    h.record(0.0, {"a": stats(1, {"t": (1000, {})})})
    # restarted (new start_time) and counted 30 since, though 30 < 1000
    h.record(10.0, {"a": stats(2, {"t": (30, {})})})
    assert h.latest("t", "", "rate") == 3.0
    # restarted and counted more than before: still a reset, by start_time
    h.record(20.0, {"a": stats(3, {"t": (2000, {})})})
    assert h.latest("t", "", "rate") == 200.0
    # topic deleted and re-created on a node that did not restart
    h.record(30.0, {"a": stats(3, {"t": (10, {})})})
    assert h.latest("t", "", "rate") == 1.0


def test_sums_over_nodes_and_a_silent_node_is_a_gap_not_a_drop_to_zero():
    h = History(10)
    h.record(0.0, {"a": stats(1, {"t": (0, {})}, depth=5), "b": stats(1, {"t": (0, {})}, depth=7)})
    h.record(1.0, {"a": stats(1, {"t": (10, {})}, depth=5), "b": stats(1, {"t": (20, {})}, depth=7)})
    assert h.latest("t", "", "rate") == 30.0
    assert h.latest("t", "", "depth") == 12
    h.record(2.0, {"a": None, "b": None})
    assert math.isnan(h.latest("t", "", "depth"))
    # a back after a gap: its counter difference spreads over the gap
    h.record(4.0, {"a": stats(1, {"t": (40, {})}), "b": None})
    assert h.latest("t", "", "rate") == 10.0
    points = h.series("t")["depth"]
    assert points.times == [0.0, 1.0, 2.0, 4.0]
    assert [v if not math.isnan(v) else None for v in points.values] == [12, 12, None, 0]


def test_clock_going_back_is_ignored():
    h = History(5)
    assert h.record(10.0, {"a": stats(1, {"t": (0, {})})})
    assert not h.record(10.0, {"a": stats(1, {"t": (5, {})})})
    assert not h.record(9.0, {"a": stats(1, {"t": (5, {})})})
    assert h.rounds == 1


def test_series_dropped_once_out_of_the_window_and_cap_on_series():
    h = History(3, max_series=2)
    h.record(0.0, {"a": stats(1, {"t1": (0, {}), "t2": (0, {}), "t3": (0, {})})})
    assert len(h) == 2 and h.untracked == 1
    for i in range(1, 4):
        h.record(float(i), {"a": stats(1, {})})
    assert len(h) == 0 and h.counter_count() == 0


@st.composite
def rounds(draw):
    """Random rounds of random clusters: nodes come and go, restart, topics
    and channels appear and vanish."""
    out = []
    t = 0.0
    for _ in range(draw(st.integers(1, 40))):
        t += draw(st.floats(0.1, 30.0))
        snaps = {}
        for node in draw(st.lists(st.sampled_from("abcd"), unique=True, max_size=4)):
            if draw(st.booleans()) and draw(st.booleans()):
                snaps[node] = None
                continue
            topics = {}
            for name in draw(st.lists(st.sampled_from([f"t{i}" for i in range(8)]), unique=True, max_size=5)):
                chans = {c: draw(st.integers(0, 10**6)) for c in draw(st.lists(st.sampled_from(["x", "y", "z"]), unique=True, max_size=3))}
                topics[name] = (draw(st.integers(0, 10**6)), chans)
            snaps[node] = stats(draw(st.integers(1, 3)), topics)
        out.append((t, snaps))
    return out


@settings(max_examples=150, deadline=None)
@given(rounds(), st.integers(2, 12), st.integers(1, 30))
def test_memory_stays_bounded(recorded, capacity, max_series):
    h = History(capacity, max_series=max_series)
    for now, snaps in recorded:
        h.record(now, snaps)
        assert len(h) <= max_series
        assert len(h.times()) == min(h.rounds, capacity)
        # counters: at most one per (node, topic or channel) the nodes have
        assert h.counter_count() <= 4 * 8 * 4
        for key in list(h._series):
            series = h.series(*key)
            assert all(len(p) == len(h.times()) for p in series.values())
            assert all(len(ring) == capacity for ring in h._series[key].rings.values())
            assert all(v >= 0 or math.isnan(v) for p in series.values() for v in p.values)


@st.composite
def counter_runs(draw):
    """One nsqd's topic: publishes between samples, restarts now and then."""
    steps = []
    for _ in range(draw(st.integers(2, 60))):
        steps.append((draw(st.floats(0.5, 20.0)), draw(st.booleans()) and draw(st.booleans()), draw(st.integers(0, 5000)), draw(st.integers(0, 5000))))
    return steps


@settings(max_examples=200, deadline=None)
@given(counter_runs())
def test_rates_integrate_to_the_messages_the_counters_show(steps):
    """Sum(rate x interval) equals every message counted after each sample,
    restarts included: what was published after a restart is never lost, and
    a restart never yields a negative rate."""
    h = History(len(steps) + 1)
    t, start, count = 0.0, 1, 0
    h.record(t, {"n": stats(start, {"t": (count, {})})})
    expected = 0
    integral = 0.0
    for dt, restart, before, after in steps:
        t += dt
        if restart:
            # `before` published then lost with the restart (unobservable),
            # `after` counted by the new process
            start += 1
            count = after
            expected += after
        else:
            count += before + after
            expected += before + after
        h.record(t, {"n": stats(start, {"t": (count, {})})})
        rate = h.latest("t", "", "rate")
        assert rate >= 0
        integral += rate * dt
    assert math.isclose(integral, expected, rel_tol=1e-6, abs_tol=1e-3)


def test_memory_per_series_measured():
    """The figure the README quotes: bytes per topic/channel for a 1h window
    at 10 s (361 points x 4 metrics x float32 + bookkeeping)."""
    h = History(361)
    h.record(0.0, {"a": stats(1, {"warmup": (0, {})})})
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    h.record(10.0, {"a": stats(1, {f"t{i}": (i, {"c": i}) for i in range(100)})})
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    grown = sum(s.size_diff for s in after.compare_to(before, "filename"))
    per_series = grown / 200
    assert 361 * 4 * 4 <= per_series < 12_000, per_series


def test_charts_escape_and_break_lines_at_gaps():
    p = Points([0.0, 10.0, 20.0, 30.0, 40.0], [1.0, 2.0, math.nan, 3.0, 4.0])
    svg = str(line_chart(p, title='<script>alert("x")</script>', window=60, now=40.0))
    assert "<script>" not in svg and "&lt;script&gt;" in svg
    assert svg.count("<polyline") == 2
    assert 'data-last="4.0"' in svg and 'data-points="4"' in svg
    empty = str(line_chart(Points([], []), title="Depth", window=60, now=0.0))
    assert "no data yet" in empty and "<polyline" not in empty
    assert sparkline(p, window=60, now=40.0, label="<b>").count("&lt;b&gt;") == 1


def test_axis_and_number_formatting():
    assert nice_ceiling(0) == 1 and nice_ceiling(3) == 5 and nice_ceiling(101) == 200 and nice_ceiling(0.03) == 0.05
    assert format_number(950) == "950" and format_number(1234) == "1.2k" and format_number(3_400_000) == "3.4M"
    assert format_number(2.5) == "2.5" and format_number(math.nan) == "–"
