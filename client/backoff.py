"""Consumer backoff, sans-IO: how long a Reader pauses after failures.

The state machine follows go-nsq's Consumer: every failure raises a counter
(as long as the next duration stays within ``max_duration``), every success
lowers it.  A counter above zero means "in backoff": the Reader sends RDY 0
to every connection for ``strategy.calculate(counter)`` seconds, then lets
one message through on one connection ("test the water").  While that pause
runs, further signals are ignored, so a burst of failures from messages that
were already in flight counts once, not N times.

Times are plain floats (seconds, any monotonic origin) handed in by the
caller; nothing here sleeps or reads a clock.
"""

from __future__ import annotations

import enum
import random
from typing import Protocol

import attrs


class BackoffStrategy(Protocol):
    def calculate(self, attempt: int) -> float:
        """Seconds to pause at backoff level ``attempt`` (>= 1)."""
        ...


@attrs.frozen
class ExponentialStrategy:
    """``multiplier * 2**attempt`` (go-nsq's default)."""

    multiplier: float = 1.0

    def calculate(self, attempt: int) -> float:
        return self.multiplier * 2.0**attempt


@attrs.define
class FullJitterStrategy:
    """Uniform in ``[0, multiplier * 2**attempt)``: consumers that fail
    together do not all come back together."""

    multiplier: float = 1.0
    rng: random.Random = attrs.field(factory=random.Random, repr=False)

    def calculate(self, attempt: int) -> float:
        return self.rng.uniform(0.0, self.multiplier * 2.0**attempt)


def strategy_named(name: str | BackoffStrategy, multiplier: float, rng: random.Random | None = None) -> BackoffStrategy:
    """A strategy by name, or one given as an object (anything with ``calculate``)."""
    if not isinstance(name, str):
        return name
    if name == "exponential":
        return ExponentialStrategy(multiplier)
    if name in ("full_jitter", "full-jitter", "jitter"):
        return FullJitterStrategy(multiplier, rng or random.Random())
    raise ValueError(f"unknown backoff strategy {name!r}")


class Signal(enum.Enum):
    SUCCESS = "success"  # a message was finished
    FAILURE = "failure"  # requeued with backoff (handler failed)
    CONTINUE = "continue"  # requeued without backoff


class Outcome(enum.Enum):
    NONE = "none"  # nothing changes
    PAUSE = "pause"  # (re)enter backoff: RDY 0 everywhere until ``paused_until``
    EXIT = "exit"  # backoff is over: every connection back to full RDY


class Backoff:
    """The counter and the pause timer.

    ``signal`` reports a message outcome and says what the RDY side must do;
    ``pause``/``resume`` are driven by the owner of the timer (the RDY
    controller), which also decides which connection tests the water.
    """

    def __init__(self, strategy: BackoffStrategy | None = None, max_duration: float = 120.0) -> None:
        self.strategy: BackoffStrategy = strategy or ExponentialStrategy()
        self.max_duration = max_duration
        self.counter = 0
        # end of the current pause; None when no pause is running
        self.paused_until: float | None = None
        self.last_duration = 0.0

    @property
    def in_backoff(self) -> bool:
        return self.counter > 0

    @property
    def paused(self) -> bool:
        return self.paused_until is not None

    def signal(self, signal: Signal, now: float) -> Outcome:
        if self.paused_until is not None:
            # outcomes of messages that were in flight when the pause began
            # must not push the level up (or down) again
            return Outcome.NONE
        updated = False
        if signal is Signal.SUCCESS:
            if self.counter > 0:
                self.counter -= 1
                updated = True
        elif signal is Signal.FAILURE:
            if self.strategy.calculate(self.counter + 1) <= self.max_duration:
                self.counter += 1
                updated = True
        if self.counter == 0:
            return Outcome.EXIT if updated else Outcome.NONE
        # still in backoff (a CONTINUE, or a level that is capped, pauses too)
        self.pause(now, min(self.strategy.calculate(self.counter), self.max_duration))
        return Outcome.PAUSE

    def pause(self, now: float, duration: float) -> None:
        self.last_duration = duration
        self.paused_until = now + duration

    def resume_due(self, now: float) -> bool:
        return self.paused_until is not None and now >= self.paused_until

    def resumed(self) -> None:
        """The pause is over (one connection was given RDY 1)."""
        self.paused_until = None

    def reset(self) -> None:
        self.counter = 0
        self.paused_until = None
