"""What the relaying tools (nsq_to_http, nsq_to_nsq) share: choosing a
destination (``--mode``) and the ``--status-every`` timing lines.  Sans-IO:
time comes in as arguments."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence

MODES = ("round-robin", "hostpool", "epsilon-greedy")

# go-hostpool's standard pool: a failed host is left alone for 30 s, doubling
# per failure up to 15 min, then tried again
INITIAL_RETRY = 30.0
MAX_RETRY = 900.0
# epsilon-greedy: explore a random host this often, less over time
EPSILON_START = 0.3
EPSILON_MIN = 0.05
EPSILON_DECAY = 0.9  # per EPSILON_PERIOD
EPSILON_PERIOD = 300.0
LATENCY_WEIGHT = 0.1  # of a new sample in the moving average


class _Host:
    __slots__ = ("address", "dead", "retry_at", "retry_delay", "latency")

    def __init__(self, address: str) -> None:
        self.address = address
        self.dead = False
        self.retry_at = 0.0
        self.retry_delay = INITIAL_RETRY
        self.latency: float | None = None  # seconds, moving average


class HostPool:
    """Which destination the next message goes to, as Go's tools choose it.

    ``round-robin``: each in turn, whatever happened before (Go's
    round-robin).  ``hostpool`` (go-hostpool's standard pool): in turn among
    the hosts that did not fail; a failed one is skipped for 30 s (doubling
    up to 15 min), then tried again; when all have failed, all are tried
    again.  ``epsilon-greedy``: the host answering fastest (moving average),
    a random live one 30% of the time at first, down to 5%.  ``usable`` (an
    extra filter, e.g. "its connection is up") is honoured when some host
    passes it.
    """

    def __init__(self, addresses: Sequence[str], mode: str, *, rng: random.Random | None = None, now: float = 0.0) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}")
        if not addresses:
            raise ValueError("no destinations")
        self.mode = mode
        self.hosts = [_Host(a) for a in addresses]
        self._by_address = {h.address: h for h in self.hosts}
        self._next = -1
        self.rng = rng or random.Random()
        self._epsilon = EPSILON_START
        self._epsilon_at = now

    def get(self, now: float, usable: Callable[[str], bool] | None = None) -> str:
        hosts = self.hosts
        if usable is not None:
            hosts = [h for h in hosts if usable(h.address)] or hosts
        if self.mode == "round-robin":
            return self._turn(hosts).address
        live = [h for h in hosts if not h.dead or now >= h.retry_at]
        if not live:  # every one failed: try them all again
            for h in hosts:
                h.dead = False
            live = hosts
        if self.mode == "epsilon-greedy":
            return self._greedy(live, now).address
        return self._turn(live).address

    def _turn(self, hosts: list[_Host]) -> _Host:
        self._next += 1
        return hosts[self._next % len(hosts)]

    def _greedy(self, live: list[_Host], now: float) -> _Host:
        while now - self._epsilon_at >= EPSILON_PERIOD:
            self._epsilon = max(EPSILON_MIN, self._epsilon * EPSILON_DECAY)
            self._epsilon_at += EPSILON_PERIOD
        untried = [h for h in live if h.latency is None]
        if untried:
            return untried[0]
        if self.rng.random() < self._epsilon:
            return self.rng.choice(live)
        return min(live, key=lambda h: h.latency or 0.0)

    def mark(self, address: str, ok: bool, now: float, duration: float | None = None) -> None:
        host = self._by_address[address]
        if ok:
            host.dead = False
            host.retry_delay = INITIAL_RETRY
            if duration is not None:
                host.latency = duration if host.latency is None else host.latency + LATENCY_WEIGHT * (duration - host.latency)
            return
        if host.dead:  # failed again after its retry: wait longer
            host.retry_delay = min(host.retry_delay * 2, MAX_RETRY)
        host.dead = True
        host.retry_at = now + host.retry_delay


class TimerMetrics:
    """``--status-every``: every ``every`` requests, one line with the
    99th/95th percentile and the average duration of those requests (Go's
    timer_metrics); 0 disables."""

    def __init__(self, every: int, prefix: str) -> None:
        self.every = every
        self.prefix = prefix
        self._durations: list[float] = []

    def status(self, duration: float, count: int = 1) -> str | None:
        """Record ``count`` requests that took ``duration`` (a batch: each of
        its messages took that long); the line to log when a report is due."""
        if self.every <= 0:
            return None
        self._durations.extend([duration] * count)
        if len(self._durations) < self.every:
            return None
        durations = sorted(self._durations)
        self._durations = []
        n = len(durations)

        def pct(p: float) -> float:
            return durations[min(n - 1, max(0, math.ceil(n * p) - 1))] * 1000

        avg = sum(durations) / n * 1000
        return f"{self.prefix} finished {n} requests - 99th: {pct(0.99):.2f}ms - 95th: {pct(0.95):.2f}ms - avg: {avg:.2f}ms"
