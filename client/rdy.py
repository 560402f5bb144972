"""RDY distribution for a Reader, sans-IO.

NSQ's RDY is a per-connection window: nsqd keeps sending while the
connection's in-flight count is below it.  A Reader promises at most
``max_in_flight`` messages in flight over all its connections, so the sum of
the windows it hands out must never exceed that.  The rules are go-nsq's
Consumer (``perConnMaxInFlight``, ``updateRDY``, ``redistributeRDY``,
``startStopContinueBackoff``, ``resume``), with three gaps closed:

* lowering ``max_in_flight`` always lowers windows (go-nsq refuses when the
  total is already over the new limit);
* when a connection goes away the others grow back to their fair share
  (go-nsq waits for a reconnect);
* redistribution hands spare RDY only to connections that have none, so a
  rotation step is never wasted on a connection that already holds it.

Every event method takes ``now`` and returns the RDY commands to send as
:class:`RdyUpdate` values; :meth:`next_deadline` / :meth:`advance` drive the
timers (backoff resume, RDY retries, the redistribution tick).
"""

from __future__ import annotations

import math
import random
from collections.abc import Hashable
from typing import Generic, NamedTuple, TypeVar

import attrs

from .backoff import Backoff, Outcome, Signal

K = TypeVar("K", bound=Hashable)


class RdyUpdate(NamedTuple, Generic[K]):
    key: K
    rdy: int  # the window to send (not "count": that is tuple.count)


@attrs.define
class ConnRdy:
    max_rdy: int
    last_msg_at: float
    rdy: int = 0  # the window we last sent
    last_rdy_at: float = 0.0  # when the window last opened from 0
    closing: bool = False
    retry_at: float | None = None  # a RDY that did not fit, tried again later
    retry_count: int = 0


class RdyController(Generic[K]):
    def __init__(
        self,
        max_in_flight: int,
        backoff: Backoff | None = None,
        *,
        now: float = 0.0,
        redistribute_interval: float = 5.0,
        low_rdy_idle_timeout: float = 10.0,
        low_rdy_timeout: float = 30.0,
        retry_interval: float = 5.0,
        resume_retry_interval: float = 1.0,
        rng: random.Random | None = None,
    ) -> None:
        if max_in_flight < 0:
            raise ValueError("max_in_flight must be >= 0")
        self.max_in_flight = max_in_flight
        self.backoff = backoff or Backoff()
        self.redistribute_interval = redistribute_interval
        self.low_rdy_idle_timeout = low_rdy_idle_timeout
        self.low_rdy_timeout = low_rdy_timeout
        self.retry_interval = retry_interval
        self.resume_retry_interval = resume_retry_interval
        self.rng = rng or random.Random()
        self.conns: dict[K, ConnRdy] = {}
        self.total_rdy = 0
        self.need_redistribute = False
        self.stopped = False
        self._next_redistribute = now + redistribute_interval

    # ------------------------------------------------------------ queries

    def per_conn_max_in_flight(self) -> int:
        n = len(self.conns)
        if n == 0:
            return self.max_in_flight
        share = self.max_in_flight / n
        return int(min(max(1.0, share), float(self.max_in_flight)))

    def rdy(self, key: K) -> int:
        return self.conns[key].rdy

    @property
    def in_backoff(self) -> bool:
        return self.backoff.in_backoff

    def next_deadline(self) -> float:
        deadlines = [self._next_redistribute]
        if self.backoff.paused_until is not None:
            deadlines.append(self.backoff.paused_until)
        deadlines.extend(c.retry_at for c in self.conns.values() if c.retry_at is not None)
        return min(deadlines) if not self.stopped else math.inf

    # ------------------------------------------------------------ events

    def add_connection(self, key: K, max_rdy: int, now: float) -> list[RdyUpdate[K]]:
        """A connection subscribed; nsqd told us its ``max_rdy_count``."""
        self.conns[key] = ConnRdy(max_rdy=max_rdy, last_msg_at=now)
        out: list[RdyUpdate[K]] = []
        # shrink the others to the new fair share first, so the new one fits
        for other in list(self.conns):
            if other != key:
                self._maybe_update(other, now, out)
        self._maybe_update(key, now, out)
        return out

    def remove_connection(self, key: K, now: float) -> list[RdyUpdate[K]]:
        state = self.conns.pop(key, None)
        out: list[RdyUpdate[K]] = []
        if state is None:
            return out
        self.total_rdy -= state.rdy
        if (state.retry_at is not None or state.rdy > 0) and (len(self.conns) == self.max_in_flight or self.in_backoff):
            # its RDY must move to another connection
            self.need_redistribute = True
        for other in list(self.conns):
            self._maybe_update(other, now, out)
        return out

    def closing(self, key: K) -> None:
        """CLS was sent: nsqd sets the window to 0 and we send no more RDY."""
        state = self.conns.get(key)
        if state is None:
            return
        self.total_rdy -= state.rdy
        state.rdy = 0
        state.closing = True
        state.retry_at = None

    def message_received(self, key: K, now: float) -> None:
        state = self.conns.get(key)
        if state is not None:
            state.last_msg_at = now

    def message_finished(self, now: float) -> list[RdyUpdate[K]]:
        return self._signal(Signal.SUCCESS, now)

    def message_requeued(self, now: float, *, backoff: bool = True) -> list[RdyUpdate[K]]:
        return self._signal(Signal.FAILURE if backoff else Signal.CONTINUE, now)

    def set_max_in_flight(self, max_in_flight: int, now: float) -> list[RdyUpdate[K]]:
        if max_in_flight < 0:
            raise ValueError("max_in_flight must be >= 0")
        self.max_in_flight = max_in_flight
        out: list[RdyUpdate[K]] = []
        # lower before raising so the total never overshoots on the way
        share = self.per_conn_max_in_flight()
        for key, state in list(self.conns.items()):
            if state.rdy > share:
                self._update(key, share, now, out)
        if self.total_rdy > max_in_flight:
            # more connections than max_in_flight: the longest idle ones give
            # theirs up; redistribution rotates it later
            for key in sorted(self.conns, key=lambda k: self.conns[k].last_msg_at):
                if self.total_rdy <= max_in_flight:
                    break
                if self.conns[key].rdy > 0:
                    self._update(key, 0, now, out)
        for key in list(self.conns):
            self._maybe_update(key, now, out)
        return out

    def stop(self) -> None:
        """The Reader is stopping: no timers, no more RDY."""
        self.stopped = True
        self.backoff.resumed()
        for state in self.conns.values():
            state.retry_at = None

    # ------------------------------------------------------------ time

    def advance(self, now: float) -> list[RdyUpdate[K]]:
        """Run every timer due at ``now``."""
        out: list[RdyUpdate[K]] = []
        if self.stopped:
            return out
        for key, state in list(self.conns.items()):
            if state.retry_at is not None and now >= state.retry_at:
                count = state.retry_count
                state.retry_at = None
                self._update(key, count, now, out)
        if self.backoff.resume_due(now):
            self._resume(now, out)
        if now >= self._next_redistribute:
            self._next_redistribute = now + self.redistribute_interval
            self._redistribute(now, out)
        return out

    # ------------------------------------------------------------ internals

    def _signal(self, signal: Signal, now: float) -> list[RdyUpdate[K]]:
        out: list[RdyUpdate[K]] = []
        if self.stopped:
            return out
        outcome = self.backoff.signal(signal, now)
        if outcome is Outcome.EXIT:
            share = self.per_conn_max_in_flight()
            for key in list(self.conns):
                self._update(key, share, now, out)
        elif outcome is Outcome.PAUSE:
            for key in list(self.conns):
                self._update(key, 0, now, out)
        return out

    def _resume(self, now: float, out: list[RdyUpdate[K]]) -> None:
        candidates = [k for k, c in self.conns.items() if not c.closing]
        if not candidates:
            # nobody to test the water with yet: look again shortly
            self.backoff.pause(now, self.resume_retry_interval)
            return
        choice = candidates[self.rng.randrange(len(candidates))]
        self.backoff.resumed()
        # while in backoff only one message at a time goes through
        if not self._update(choice, 1, now, out):
            self.backoff.pause(now, self.resume_retry_interval)

    def _maybe_update(self, key: K, now: float, out: list[RdyUpdate[K]]) -> None:
        if self.in_backoff or self.backoff.paused:
            return
        self._update(key, self.per_conn_max_in_flight(), now, out)

    def _update(self, key: K, count: int, now: float, out: list[RdyUpdate[K]]) -> bool:
        """Set one window, keeping the total within max_in_flight; False if it
        did not fit (a retry is then scheduled for a connection at 0)."""
        state = self.conns.get(key)
        if state is None or state.closing or self.stopped:
            return False
        count = min(count, state.max_rdy)
        state.retry_at = None
        if count > state.rdy:
            room = self.max_in_flight - self.total_rdy + state.rdy
            if room <= 0:
                if state.rdy == 0 and count > 0:
                    # wanted out of zero but could not: try again later so
                    # the connection cannot starve forever
                    state.retry_at = now + self.retry_interval
                    state.retry_count = count
                return False
            count = min(count, room)
        previous = state.rdy
        self.total_rdy += count - previous
        state.rdy = count
        if count > 0 and previous == 0:
            state.last_rdy_at = now
        if count != previous:
            out.append(RdyUpdate(key, count))
        return True

    def _redistribute(self, now: float, out: list[RdyUpdate[K]]) -> None:
        if self.backoff.paused or not self.conns:
            return
        if len(self.conns) > self.max_in_flight:
            self.need_redistribute = True
        if self.in_backoff and len(self.conns) > 1:
            self.need_redistribute = True
        if not self.need_redistribute:
            return
        self.need_redistribute = False
        gave_up = set()
        for key, state in list(self.conns.items()):
            if state.rdy > 0 and (
                now - state.last_msg_at > self.low_rdy_idle_timeout or now - state.last_rdy_at > self.low_rdy_timeout
            ):
                # idle, or held it long enough: give someone else a turn
                self._update(key, 0, now, out)
                gave_up.add(key)
        limit = 1 if self.in_backoff else self.max_in_flight
        available = limit - self.total_rdy
        idle = [k for k, c in self.conns.items() if c.rdy == 0 and not c.closing]
        # those that just gave theirs up come last, so the turn really moves on
        for group in ([k for k in idle if k not in gave_up], [k for k in idle if k in gave_up]):
            while group and available > 0:
                key = group.pop(self.rng.randrange(len(group)))
                if self._update(key, 1, now, out):
                    available -= 1
