"""End-to-end latency: the quantile sketch against exact quantiles, the
window, the result shape nsqd reports, and the daemon wiring."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import RawClient, start_nsqd, wait_for
from pynsqd.e2e import RELATIVE_ACCURACY, LatencyStream, format_result, human_ns, merged_result


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def exact_quantile(values: list[int], q: float) -> int:
    """The order statistic the sketch promises to approximate: rank
    floor(q * (n - 1)), 0-based, of the sorted values."""
    ordered = sorted(values)
    return ordered[int(q * (len(ordered) - 1))]


def within_bound(estimate: int, exact: int) -> bool:
    if exact <= 0:
        return estimate == 0
    # the relative bound, plus 1 ns for rounding the bucket's value to an int
    return abs(estimate - exact) <= RELATIVE_ACCURACY * exact + 1


latencies = st.lists(
    st.one_of(
        st.integers(min_value=1, max_value=10**13),  # 1 ns .. ~3 hours
        st.integers(min_value=1_000, max_value=5_000_000),  # the usual ms range, dense
        st.just(0),  # clock stepped back: counted, reported as 0
    ),
    min_size=1,
    max_size=400,
)
quantiles = st.lists(st.floats(min_value=0.001, max_value=1.0), min_size=1, max_size=5)


@settings(max_examples=300, deadline=None)
@given(values=latencies, qs=quantiles)
def test_sketch_within_relative_error_of_exact_quantiles(values: list[int], qs: list[float]) -> None:
    stream = LatencyStream(qs, 600.0, clock=FakeClock())
    for v in values:
        stream.add(v)
    result = stream.result()
    assert result["count"] == len(values)
    assert [p["quantile"] for p in result["percentiles"]] == qs
    for p in result["percentiles"]:
        exact = exact_quantile(values, p["quantile"])
        assert within_bound(p["value"], exact), (p, exact)


@settings(max_examples=100, deadline=None)
@given(parts=st.lists(latencies, min_size=1, max_size=4), qs=quantiles)
def test_merged_result_is_the_sketch_of_all_values(parts: list[list[int]], qs: list[float]) -> None:
    clock = FakeClock()
    streams = []
    for values in parts:
        s = LatencyStream(qs, 600.0, clock=clock)
        for v in values:
            s.add(v)
        streams.append(s)
    everything = LatencyStream(qs, 600.0, clock=clock)
    for values in parts:
        for v in values:
            everything.add(v)
    # merging log buckets loses nothing: same answer as one sketch of all values
    assert merged_result(streams) == everything.result()
    assert streams[0].merged_result(streams) == everything.result()
    for p in merged_result(streams)["percentiles"]:
        assert within_bound(p["value"], exact_quantile([v for vs in parts for v in vs], p["quantile"]))


def test_memory_is_bounded_whatever_the_values() -> None:
    stream = LatencyStream([0.99], 600.0, clock=FakeClock())
    value = 1
    for i in range(200_000):
        stream.add(value)
        value = value * 3 // 2 + 1 if value < 1 << 62 else 1 + i % 1000
    # one bucket per 2% step of a 64-bit range, at most
    assert len(stream.counts()) < 2300
    assert stream.result()["count"] == 200_000


def test_window_keeps_two_halves_like_nsqd() -> None:
    clock = FakeClock()
    stream = LatencyStream([1.0], 10.0, clock=clock)  # halves of 5 s
    stream.add(1_000)
    clock.now += 4.9
    stream.add(2_000)
    assert stream.result()["count"] == 2
    clock.now += 0.2  # 5.1 s after start: the window moves, the first half stays
    stream.add(3_000)
    assert stream.result()["count"] == 3
    clock.now += 5.0  # the half holding 1000 and 2000 is dropped
    assert stream.result()["count"] == 1
    assert within_bound(stream.result()["percentiles"][0]["value"], 3_000)
    clock.now += 1e6  # long idle: everything is gone, without looping a million times
    assert stream.result() == {"count": 0, "percentiles": [{"quantile": 1.0, "value": 0}]}
    stream.add(4_000)
    clock.now += 4.0
    assert stream.result()["count"] == 1


def test_result_shape_as_nsqd() -> None:
    stream = LatencyStream([0.99, 0.5], 600.0, clock=FakeClock())
    # nsqd answers every percentile, with 0 when nothing was recorded
    assert stream.result() == {"count": 0, "percentiles": [{"quantile": 0.99, "value": 0}, {"quantile": 0.5, "value": 0}]}
    # a topic without channels that track latency: Go's empty Result
    assert merged_result([]) == {"count": 0, "percentiles": None}
    stream.add(1_500_000)
    result = stream.result()
    assert isinstance(result["count"], int) and all(isinstance(p["value"], int) for p in result["percentiles"])


@pytest.mark.parametrize(
    "ns, text",
    [(0, "0.0ns"), (999, "999.0ns"), (1000, "1000.0ns"), (1500, "1.5us"), (2_500_000, "2.5ms"), (3_210_000_000, "3.2s")],
)
def test_human_durations_as_nsqd(ns: int, text: str) -> None:
    assert human_ns(ns) == text


def test_format_result_lists_values() -> None:
    assert format_result({"count": 2, "percentiles": [{"quantile": 0.99, "value": 2_500_000}, {"quantile": 0.5, "value": 1500}]}) == "2.5ms, 1.5us"
    assert format_result({"count": 0, "percentiles": None}) == ""


def test_daemon_reports_e2e_latency_per_channel_and_topic(tmp_path) -> None:
    d = start_nsqd(str(tmp_path), "--e2e-processing-latency-percentile=0.99,0.5", "--e2e-processing-latency-window-time=1m")
    try:
        with RawClient(d.tcp_port) as c:
            c.identify(feature_negotiation=True, output_buffer_timeout=25)
            c.sub("lat", "a")
            assert c.mpub("lat", [b"m%d" % i for i in range(20)]).data == b"OK"
            c.cmd(b"RDY", "20")
            for _ in range(20):
                c.cmd(b"FIN", c.read_message()[2])

            def finished() -> dict | None:
                t = d.stats("lat")["topics"][0]
                return t if t["channels"][0]["e2e_processing_latency"]["count"] == 20 else None

            topic = wait_for(finished, message="20 FINs in the e2e window")
        channel = topic["channels"][0]
        for result in (channel["e2e_processing_latency"], topic["e2e_processing_latency"]):
            assert result["count"] == 20
            assert [p["quantile"] for p in result["percentiles"]] == [0.99, 0.5]
            assert all(0 < p["value"] < 60e9 for p in result["percentiles"])
        # the text layout prints the values after e2e%:
        status, body = d.http("GET", "/stats?topic=lat")
        assert status == 200
        assert re.search(r"\[a {24}\] .* e2e%: [0-9.]+(ns|us|ms|s), [0-9.]+(ns|us|ms|s)\n", body.decode())
    finally:
        d.stop()
