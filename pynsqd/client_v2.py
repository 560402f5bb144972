"""One TCP client's state as nsqd keeps it: identity, IDENTIFY settings, RDY
and in-flight counts, stats counters, and its output buffer.

Channels deliver messages by appending frames to ``out``; the connection's
trio edge (``tcp.py``) owns the socket and flushes ``out`` following nsqd's
rules: at once for non-message frames, when the client stops being ready,
when the buffer exceeds ``output_buffer_size``, else on the
``output_buffer_timeout`` tick.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from .protocol import FRAME_TYPE_MESSAGE, FRAME_TYPE_RESPONSE, HEARTBEAT, MESSAGE_FRAME_PREFIX, OK, ProtocolError, encode_error, encode_frame

_pack_message_prefix = MESSAGE_FRAME_PREFIX.pack
# the reply to every publish, made once
_OK_FRAME = encode_frame(FRAME_TYPE_RESPONSE, OK)

if TYPE_CHECKING:
    from .channel import Channel
    from .message import Message
    from .options import Options

# states, as /stats reports them
STATE_INIT = 0
STATE_DISCONNECTED = 1
STATE_CONNECTED = 2
STATE_SUBSCRIBED = 3
STATE_CLOSING = 4

DEFAULT_OUTPUT_BUFFER_SIZE = 16 * 1024


def _noop() -> None:
    return None


class ClientV2:
    __slots__ = (
        "id", "remote_address", "client_id", "hostname", "user_agent", "state",
        "ready_count", "in_flight_count", "message_count", "finish_count", "requeue_count",
        "connect_ts", "heartbeat_interval", "output_buffer_size", "output_buffer_timeout",
        "msg_timeout", "sample_rate", "tls", "snappy", "deflate", "deflate_level",
        "channel", "out", "out_size", "flush_now", "wakeup", "closing_connection", "pub_counts",
        "in_ready_queue", "auth_state", "tls_info", "_sample_counter", "hold_output",
    )

    def __init__(self, client_id: int, remote_address: str, options: Options) -> None:
        self.id = client_id
        self.remote_address = remote_address
        host = remote_address.rsplit(":", 1)[0].strip("[]")
        self.client_id = host
        self.hostname = host
        self.user_agent = ""
        self.state = STATE_INIT
        self.ready_count = 0
        self.in_flight_count = 0
        self.message_count = 0
        self.finish_count = 0
        self.requeue_count = 0
        self.connect_ts = int(time.time())
        self.heartbeat_interval = options.heartbeat_interval
        self.output_buffer_size = DEFAULT_OUTPUT_BUFFER_SIZE
        self.output_buffer_timeout = options.output_buffer_timeout
        self.msg_timeout = options.msg_timeout
        self.sample_rate = 0
        self.tls = False
        self.snappy = False
        self.deflate = False
        self.deflate_level = 0
        self.channel: Channel | None = None
        # output waiting for the writer, as parts joined at flush time
        self.out: list[bytes] = []
        self.out_size = 0
        # set when ``out`` must be written without waiting for the buffer timeout
        self.flush_now = False
        # installed by the connection edge: called when the writer should look at ``out``
        self.wakeup: Callable[[], None] = _noop
        # set when the daemon wants this connection closed (channel deleted, shutdown)
        self.closing_connection = False
        # replies wait while the connection's publishes are being made durable
        self.hold_output = False
        self.pub_counts: dict[str, int] = {}
        self.in_ready_queue = False
        self.auth_state: object | None = None
        self.tls_info: dict[str, object] = {}
        self._sample_counter = 0

    # ------------------------------------------------------------ output

    def send_response(self, data: bytes) -> None:
        frame = _OK_FRAME if data is OK else encode_frame(FRAME_TYPE_RESPONSE, data)
        self.out.append(frame)
        self.out_size += len(frame)
        self.flush_now = True
        self.wakeup()

    def send_error(self, error: ProtocolError) -> None:
        frame = encode_error(error)
        self.out.append(frame)
        self.out_size += len(frame)
        self.flush_now = True
        self.wakeup()

    def send_heartbeat(self) -> None:
        self.send_response(HEARTBEAT)

    def take_output(self) -> bytes:
        data = b"".join(self.out)
        self.out.clear()
        self.out_size = 0
        self.flush_now = False
        return data

    def close_connection(self) -> None:
        """Ask the edge to close this connection (after flushing)."""
        self.closing_connection = True
        self.flush_now = True
        self.wakeup()

    # ------------------------------------------------------------ delivery

    def can_receive(self) -> bool:
        return self.in_flight_count < self.ready_count

    def sampled_out(self) -> bool:
        """True if ``sample_rate`` says to skip the next message.

        nsqd draws a random number per message; a deterministic spread gives
        the same proportion without the per-message RNG call."""
        rate = self.sample_rate
        if rate <= 0:
            return False
        self._sample_counter = (self._sample_counter + rate) % 100
        return self._sample_counter >= rate

    def deliver(self, msg: Message) -> None:
        """Write one message frame (the channel already made it in-flight)."""
        self.deliver_many((msg,))

    def deliver_many(self, msgs: Sequence[Message]) -> None:
        """Write message frames (the channel already made them in-flight)."""
        out = self.out
        was_empty = not out
        size = 34 * len(msgs)
        pack = _pack_message_prefix
        append = out.append
        for msg in msgs:
            body = msg.body
            n = len(body)
            # the codec's message frame, written as two parts (no copy of the body)
            append(pack(30 + n, FRAME_TYPE_MESSAGE, msg.timestamp, msg.attempts, msg.id))
            append(body)
            size += n
        self.out_size += size
        self.in_flight_count += len(msgs)
        self.message_count += len(msgs)
        if self.in_flight_count >= self.ready_count or self.out_size >= self.output_buffer_size or self.output_buffer_timeout <= 0:
            self.flush_now = True
            self.wakeup()
        elif was_empty:
            self.wakeup()

    def message_done(self) -> None:
        """A message left this client's in-flight window (FIN/REQ/timeout)."""
        if self.in_flight_count > 0:
            self.in_flight_count -= 1

    # ------------------------------------------------------------ stats

    def stats(self) -> dict[str, object]:
        st: dict[str, object] = {
            "client_id": self.client_id,
            "hostname": self.hostname,
            "version": "V2",
            "remote_address": self.remote_address,
            "state": self.state,
            "ready_count": self.ready_count,
            "in_flight_count": self.in_flight_count,
            "message_count": self.message_count,
            "finish_count": self.finish_count,
            "requeue_count": self.requeue_count,
            "connect_ts": self.connect_ts,
            "sample_rate": self.sample_rate,
            "deflate": self.deflate,
            "snappy": self.snappy,
            "user_agent": self.user_agent,
            "tls": self.tls,
            "tls_cipher_suite": self.tls_info.get("cipher_suite", ""),
            "tls_version": self.tls_info.get("version", ""),
            "tls_negotiated_protocol": self.tls_info.get("negotiated_protocol", ""),
            "tls_negotiated_protocol_is_mutual": bool(self.tls_info.get("negotiated_protocol_is_mutual", False)),
        }
        auth = self.auth_state
        if auth is not None:
            st["authed"] = True
            st["auth_identity"] = getattr(auth, "identity", "")
            st["auth_identity_url"] = getattr(auth, "identity_url", "")
        if self.pub_counts:
            st["pub_counts"] = [{"topic": t, "count": c} for t, c in sorted(self.pub_counts.items())]
        return st

    def __repr__(self) -> str:
        return f"ClientV2({self.id}, {self.remote_address})"
