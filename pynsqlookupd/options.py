"""nsqlookupd's options: flag names, config keys and defaults as nsqlookupd 1.3.0 has them."""

from __future__ import annotations

import socket

import attrs

from pynsqd.flags import flag_field, flags_of
from pynsqd.options import DaemonOptions


@attrs.define(kw_only=True)
class Options(DaemonOptions):
    log_prefix: str = flag_field("[nsqlookupd] ", flag="log-prefix", kind="str", help="log message prefix")

    tcp_address: str = flag_field("0.0.0.0:4160", flag="tcp-address", kind="str", help="<addr>:<port> to listen on for TCP clients")
    http_address: str = flag_field("0.0.0.0:4161", flag="http-address", kind="str", help="<addr>:<port> to listen on for HTTP clients")
    broadcast_address: str = flag_field(
        socket.gethostname(), flag="broadcast-address", kind="str", help="address of this lookupd node, (default to the OS hostname)"
    )

    inactive_producer_timeout: float = flag_field(
        300.0,
        flag="inactive-producer-timeout",
        kind="duration",
        help="duration of time a producer will remain in the active list since its last ping",
    )
    tombstone_lifetime: float = flag_field(
        45.0,
        flag="tombstone-lifetime",
        kind="duration",
        help="duration of time a producer will remain tombstoned if registration remains",
    )


NSQLOOKUPD_FLAGS = flags_of(Options)
