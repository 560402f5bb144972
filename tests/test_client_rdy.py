"""The sans-IO backoff and RDY state machines of the client (no I/O, no clock:
time is a number handed in)."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pynsqd.client.backoff import Backoff, ExponentialStrategy, FullJitterStrategy, Outcome, Signal
from pynsqd.client.rdy import RdyController, RdyUpdate


def rdys(ctl: RdyController) -> dict:
    return {k: c.rdy for k, c in ctl.conns.items()}


# ---------------------------------------------------------------- backoff


def test_exponential_and_full_jitter_durations():
    assert [ExponentialStrategy(1.0).calculate(n) for n in (1, 2, 3)] == [2.0, 4.0, 8.0]
    assert ExponentialStrategy(0.5).calculate(4) == 8.0
    jitter = FullJitterStrategy(1.0, random.Random(7))
    values = [jitter.calculate(3) for _ in range(200)]
    assert all(0 <= v < 8.0 for v in values) and len(set(values)) > 100


def test_backoff_counter_rises_and_falls_and_ignores_signals_while_paused():
    b = Backoff(ExponentialStrategy(1.0), max_duration=120)
    assert b.signal(Signal.FAILURE, 0.0) is Outcome.PAUSE
    assert (b.counter, b.paused_until) == (1, 2.0)
    # failures of messages already in flight during the pause count once
    assert b.signal(Signal.FAILURE, 0.5) is Outcome.NONE
    assert b.signal(Signal.SUCCESS, 0.5) is Outcome.NONE
    assert b.counter == 1
    assert not b.resume_due(1.9) and b.resume_due(2.0)
    b.resumed()
    assert b.signal(Signal.FAILURE, 3.0) is Outcome.PAUSE
    assert (b.counter, b.paused_until) == (2, 7.0)
    b.resumed()
    assert b.signal(Signal.SUCCESS, 8.0) is Outcome.PAUSE  # lower level, still backing off
    assert (b.counter, b.paused_until) == (1, 10.0)
    b.resumed()
    assert b.signal(Signal.SUCCESS, 11.0) is Outcome.EXIT
    assert b.counter == 0 and not b.paused
    assert b.signal(Signal.SUCCESS, 12.0) is Outcome.NONE


def test_backoff_is_capped_by_max_duration():
    b = Backoff(ExponentialStrategy(1.0), max_duration=10)
    for t in range(10):
        b.signal(Signal.FAILURE, float(t * 100))
        b.resumed()
    # 2**3 = 8 fits, 2**4 = 16 does not: the level stops at 3
    assert b.counter == 3
    assert b.last_duration == 8.0
    # zero max disables backoff entirely
    off = Backoff(ExponentialStrategy(1.0), max_duration=0)
    assert off.signal(Signal.FAILURE, 0.0) is Outcome.NONE and off.counter == 0


def test_continue_keeps_the_level_but_pauses_again():
    b = Backoff(ExponentialStrategy(1.0), max_duration=120)
    b.signal(Signal.FAILURE, 0.0)
    b.resumed()
    assert b.signal(Signal.CONTINUE, 5.0) is Outcome.PAUSE
    assert (b.counter, b.paused_until) == (1, 7.0)
    fresh = Backoff()
    assert fresh.signal(Signal.CONTINUE, 0.0) is Outcome.NONE


def test_a_strategy_by_name_or_as_an_object():
    import random

    from pynsqd.client.backoff import strategy_named

    assert strategy_named("exponential", 0.5).calculate(3) == 4.0
    jitter = strategy_named("full_jitter", 1.0, random.Random(1))
    assert all(0 <= jitter.calculate(2) < 4 for _ in range(20))
    own = FullJitterStrategy(2.0, random.Random(3))
    assert strategy_named(own, 1.0) is own
    with pytest.raises(ValueError):
        strategy_named("linear", 1.0)


# ---------------------------------------------------------------- RDY distribution


def test_max_in_flight_is_split_between_connections():
    ctl = RdyController(10, now=0.0)
    assert ctl.add_connection("a", 2500, 0.0) == [RdyUpdate("a", 10)]
    # the first shrinks before the second gets its share
    assert ctl.add_connection("b", 2500, 0.0) == [RdyUpdate("a", 5), RdyUpdate("b", 5)]
    out = ctl.add_connection("c", 2500, 0.0)
    assert rdys(ctl) == {"a": 3, "b": 3, "c": 3} and ctl.total_rdy == 9
    assert out == [RdyUpdate("a", 3), RdyUpdate("b", 3), RdyUpdate("c", 3)]
    # one leaves: the others grow back to their share (go-nsq waits for a reconnect)
    ctl.remove_connection("c", 1.0)
    assert rdys(ctl) == {"a": 5, "b": 5}


def test_rdy_is_capped_by_the_servers_max_rdy_count():
    ctl = RdyController(100, now=0.0)
    assert ctl.add_connection("a", 20, 0.0) == [RdyUpdate("a", 20)]
    assert ctl.total_rdy == 20


def test_lowering_max_in_flight_always_lowers():
    ctl = RdyController(10, now=0.0)
    ctl.add_connection("a", 2500, 0.0)
    ctl.add_connection("b", 2500, 0.0)
    out = ctl.set_max_in_flight(2, 1.0)
    assert sorted(out) == [RdyUpdate("a", 1), RdyUpdate("b", 1)]
    assert ctl.total_rdy == 2
    ctl.set_max_in_flight(0, 2.0)
    assert rdys(ctl) == {"a": 0, "b": 0}


def test_more_connections_than_max_in_flight_rotate_rdy():
    ctl = RdyController(1, now=0.0, redistribute_interval=5, low_rdy_idle_timeout=10, low_rdy_timeout=30, rng=random.Random(1))
    ctl.add_connection("a", 2500, 0.0)
    ctl.add_connection("b", 2500, 0.0)
    ctl.add_connection("c", 2500, 0.0)
    assert rdys(ctl) == {"a": 1, "b": 0, "c": 0}
    holders = []
    now = 0.0
    for _ in range(40):
        now = ctl.next_deadline()
        ctl.advance(now)
        assert ctl.total_rdy <= 1
        holders.extend(k for k, v in rdys(ctl).items() if v)
    # nobody starves: every connection held the RDY at some point
    assert set(holders) == {"a", "b", "c"}


def test_busy_connection_keeps_rdy_until_low_rdy_timeout():
    ctl = RdyController(1, now=0.0, redistribute_interval=5, low_rdy_idle_timeout=10, low_rdy_timeout=30, rng=random.Random(1))
    for k in "ab":
        ctl.add_connection(k, 2500, 0.0)
    for t in range(5, 30, 5):
        ctl.message_received("a", float(t))
        ctl.advance(float(t))
        assert rdys(ctl) == {"a": 1, "b": 0}
    ctl.message_received("a", 35.0)
    ctl.advance(35.0)
    # held for more than low_rdy_timeout: handed over although busy
    assert rdys(ctl) == {"a": 0, "b": 1}


def test_rdy_retry_for_a_connection_that_could_not_get_any():
    ctl = RdyController(1, now=0.0, retry_interval=5, redistribute_interval=1000)
    ctl.add_connection("a", 2500, 0.0)
    ctl.add_connection("b", 2500, 0.0)
    assert ctl.conns["b"].retry_at == 5.0
    ctl.remove_connection("a", 1.0)
    # the freed RDY goes to b at once (fair share), and the retry is dropped
    assert rdys(ctl) == {"b": 1} and ctl.conns["b"].retry_at is None


# ---------------------------------------------------------------- backoff through RDY


def test_failure_sends_rdy_0_everywhere_then_tests_the_water_then_recovers():
    ctl = RdyController(6, Backoff(ExponentialStrategy(1.0), 120), now=0.0, redistribute_interval=1000, rng=random.Random(3))
    for k in "abc":
        ctl.add_connection(k, 2500, 0.0)
    assert rdys(ctl) == {"a": 2, "b": 2, "c": 2}
    out = ctl.message_requeued(10.0)
    assert sorted(out) == [RdyUpdate("a", 0), RdyUpdate("b", 0), RdyUpdate("c", 0)]
    assert ctl.next_deadline() == 12.0
    assert ctl.advance(11.9) == []
    out = ctl.advance(12.0)
    assert len(out) == 1 and out[0].rdy == 1  # one connection tests the water
    tester = out[0].key
    # the test message fails again: level 2, 4 s
    assert sorted(ctl.message_requeued(12.5)) == [RdyUpdate(tester, 0)]
    assert ctl.next_deadline() == 16.5
    out = ctl.advance(16.5)
    assert [u.rdy for u in out] == [1]
    # success lowers the level (still backing off: 2 s at RDY 0)
    out = ctl.message_finished(17.0)
    assert [u.rdy for u in out] == [0] and ctl.backoff.counter == 1
    out = ctl.advance(19.0)
    assert [u.rdy for u in out] == [1]
    # success at level 1: back to full RDY everywhere
    out = ctl.message_finished(19.5)
    assert rdys(ctl) == {"a": 2, "b": 2, "c": 2} and not ctl.in_backoff


def test_resume_without_connections_waits_and_retries():
    ctl = RdyController(2, now=0.0, redistribute_interval=1000)
    ctl.add_connection("a", 2500, 0.0)
    ctl.message_requeued(0.0)
    ctl.remove_connection("a", 0.5)
    assert ctl.advance(2.0) == []
    assert ctl.backoff.paused_until == 3.0
    ctl.add_connection("b", 2500, 2.5)  # in backoff: no RDY yet
    assert ctl.conns["b"].rdy == 0
    assert ctl.advance(3.0) == [RdyUpdate("b", 1)]


def test_closing_connection_gets_no_rdy_and_stop_silences_everything():
    ctl = RdyController(4, now=0.0)
    ctl.add_connection("a", 2500, 0.0)
    ctl.add_connection("b", 2500, 0.0)
    ctl.closing("a")
    assert ctl.total_rdy == 2
    assert ctl.message_requeued(1.0) == [RdyUpdate("b", 0)]
    ctl.stop()
    assert ctl.advance(100.0) == [] and ctl.message_finished(101.0) == []


# ---------------------------------------------------------------- invariants

EVENTS = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(0, 5), st.integers(1, 50)),
        st.tuples(st.just("remove"), st.integers(0, 5), st.just(0)),
        st.tuples(st.just("close"), st.integers(0, 5), st.just(0)),
        st.tuples(st.just("msg"), st.integers(0, 5), st.just(0)),
        st.tuples(st.just("fin"), st.just(0), st.just(0)),
        st.tuples(st.just("req"), st.just(0), st.just(0)),
        st.tuples(st.just("req_nb"), st.just(0), st.just(0)),
        st.tuples(st.just("mif"), st.integers(0, 12), st.just(0)),
        st.tuples(st.just("tick"), st.integers(0, 40), st.just(0)),
    ),
    max_size=80,
)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 12), st.sampled_from(["exp", "jitter"]), EVENTS, st.integers(0, 2**32))
def test_rdy_invariants_hold_under_any_event_sequence(mif, strategy, events, seed):
    rng = random.Random(seed)
    strat = ExponentialStrategy(0.5) if strategy == "exp" else FullJitterStrategy(0.5, rng)
    ctl: RdyController[int] = RdyController(
        mif, Backoff(strat, 20.0), now=0.0, redistribute_interval=2.0, low_rdy_idle_timeout=3.0, low_rdy_timeout=6.0, retry_interval=2.5, rng=rng
    )
    sent: dict[int, int] = {}  # what nsqd believes each window is
    now = 0.0
    for kind, key, arg in events:
        if kind == "add":
            if key in ctl.conns:
                continue
            out = ctl.add_connection(key, arg, now)
            sent[key] = 0
        elif kind == "remove":
            out = ctl.remove_connection(key, now)
            sent.pop(key, None)
        elif kind == "close":
            ctl.closing(key)
            if key in sent:
                sent[key] = 0
            out = []
        elif kind == "msg":
            ctl.message_received(key, now)
            out = []
        elif kind == "fin":
            out = ctl.message_finished(now)
        elif kind == "req":
            out = ctl.message_requeued(now)
        elif kind == "req_nb":
            out = ctl.message_requeued(now, backoff=False)
        elif kind == "mif":
            out = ctl.set_max_in_flight(key, now)
        else:
            now += key / 4
            out = ctl.advance(now)
        for upd in out:
            assert upd.key in ctl.conns and not ctl.conns[upd.key].closing
            assert sent[upd.key] != upd.rdy, "redundant RDY"
            sent[upd.key] = upd.rdy
        # nsqd's view and ours agree, and the promises hold
        assert all(sent[k] == c.rdy for k, c in ctl.conns.items())
        assert ctl.total_rdy == sum(c.rdy for c in ctl.conns.values())
        assert ctl.total_rdy <= ctl.max_in_flight
        assert all(c.rdy <= c.max_rdy for c in ctl.conns.values())
        if ctl.backoff.paused:
            assert ctl.total_rdy == 0
        elif ctl.in_backoff:
            assert ctl.total_rdy <= 1
        assert ctl.next_deadline() >= now or ctl.next_deadline() <= now  # a number, not NaN


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 6), st.integers(1, 10), st.integers(0, 2**32))
def test_every_connection_gets_a_turn_when_they_outnumber_max_in_flight(mif, extra, seed):
    n = mif + extra
    ctl = RdyController(mif, now=0.0, redistribute_interval=1.0, low_rdy_idle_timeout=2.0, low_rdy_timeout=4.0, rng=random.Random(seed))
    for k in range(n):
        ctl.add_connection(k, 2500, 0.0)
    served = set()
    now = 0.0
    for _ in range(60 * n):
        now = ctl.next_deadline()
        ctl.advance(now)
        served |= {k for k, c in ctl.conns.items() if c.rdy}
        assert ctl.total_rdy <= mif
        if len(served) == n:
            break
    assert len(served) == n


@pytest.mark.parametrize("mif,n,expected", [(1, 1, 1), (10, 3, 3), (2, 5, 1), (0, 2, 0), (7, 7, 1), (100, 8, 12)])
def test_per_connection_share(mif, n, expected):
    ctl = RdyController(mif, now=0.0)
    for k in range(n):
        ctl.conns[k] = None  # type: ignore[assignment]
    assert ctl.per_conn_max_in_flight() == expected
