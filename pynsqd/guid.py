"""Message ids as nsqd makes them: a snowflake of time, node id and sequence,
hex-encoded to 16 ASCII bytes."""

from __future__ import annotations

import time

# 2010-11-04 01:42:54.288 UTC, nsqd's epoch
TWEPOCH = 1288834974288
NODE_ID_BITS = 10
SEQUENCE_BITS = 12
SEQUENCE_MASK = (1 << SEQUENCE_BITS) - 1
TIMESTAMP_SHIFT = NODE_ID_BITS + SEQUENCE_BITS


class GuidFactory:
    """One per topic, as in nsqd.

    nsqd's factory fails (and the caller spins) when the 12-bit sequence runs
    out within one 1.048 ms tick or the clock steps back; we instead let the
    tick run ahead of the wall clock, which keeps ids unique and increasing
    without waiting.
    """

    __slots__ = ("_node", "_last_ts", "_seq")

    def __init__(self, node_id: int) -> None:
        if not 0 <= node_id < 1024:
            raise ValueError(f"node id {node_id} out of range [0,1024)")
        self._node = node_id << SEQUENCE_BITS
        self._last_ts = -1
        self._seq = 0

    def new_id(self) -> bytes:
        ts = time.time_ns() >> 20  # ~milliseconds, as nsqd
        if ts <= self._last_ts:
            ts = self._last_ts
            self._seq = (self._seq + 1) & SEQUENCE_MASK
            if self._seq == 0:
                ts += 1
        else:
            self._seq = 0
        self._last_ts = ts
        value = ((ts - TWEPOCH) << TIMESTAMP_SHIFT) | self._node | self._seq
        return b"%016x" % value

    def new_ids(self, count: int) -> list[bytes]:
        """``count`` ids for one MPUB, reading the clock once."""
        if count <= 0:
            # nothing issued: leave the state alone (a sequence of -1 would
            # make the next new_id() skip a tick ahead of the clock)
            return []
        ts = time.time_ns() >> 20
        seq = self._seq
        last = self._last_ts
        if ts <= last:
            ts = last
        else:
            seq = -1
        node = self._node
        out = []
        append = out.append
        for _ in range(count):
            seq += 1
            if seq > SEQUENCE_MASK:
                seq = 0
                ts += 1
            append(b"%016x" % (((ts - TWEPOCH) << TIMESTAMP_SHIFT) | node | seq))
        self._last_ts = ts
        self._seq = seq
        return out


def id_timestamp_ms(msg_id: bytes) -> int:
    """The (pseudo-)millisecond time embedded in an id, for debugging."""
    return (int(msg_id, 16) >> TIMESTAMP_SHIFT) + TWEPOCH
