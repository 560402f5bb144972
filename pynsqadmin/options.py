"""nsqadmin's options: flag names, config keys and defaults as nsqadmin 1.3.0
has them where they apply, plus pynsqadmin's own (sampling, read-only mode).

nsqadmin's graphite/statsd flags are accepted so that existing command lines
keep working, but unused: pynsqadmin draws its graphs from its own sampling
of the nsqds' ``/stats``."""

from __future__ import annotations

import ipaddress

import attrs

from pynsqd.flags import flag_field, flags_of
from pynsqd.options import DaemonOptions

_UNUSED = " (accepted for compatibility, unused: pynsqadmin samples /stats itself, no graphite)"


@attrs.define(kw_only=True)
class Options(DaemonOptions):
    log_prefix: str = flag_field("[nsqadmin] ", flag="log-prefix", kind="str", help="log message prefix")

    http_address: str = flag_field("0.0.0.0:4171", flag="http-address", kind="str", help="<addr>:<port> to listen on for HTTP clients")
    base_path: str = flag_field(
        "/", flag="base-path", kind="str", help="URL base path (pages and forms live under it, for a reverse proxy)"
    )
    lookupd_http_addresses: list[str] = flag_field(
        [], flag="lookupd-http-address", kind="strings", cfg="nsqlookupd_http_addresses", help="lookupd HTTP address (may be given multiple times)"
    )
    nsqd_http_addresses: list[str] = flag_field(
        [], flag="nsqd-http-address", kind="strings", help="nsqd HTTP address (may be given multiple times)"
    )

    http_client_connect_timeout: float = flag_field(2.0, flag="http-client-connect-timeout", kind="duration", help="timeout for HTTP connect")
    http_client_request_timeout: float = flag_field(5.0, flag="http-client-request-timeout", kind="duration", help="timeout for HTTP request")
    http_client_tls_insecure_skip_verify: bool = flag_field(
        False,
        flag="http-client-tls-insecure-skip-verify",
        kind="bool",
        help="configure the HTTP client to skip verification of TLS certificates",
    )
    http_client_tls_root_ca_file: str = flag_field("", flag="http-client-tls-root-ca-file", kind="str", help="path to CA file for the HTTP client")
    http_client_tls_cert: str = flag_field("", flag="http-client-tls-cert", kind="str", help="path to certificate file for the HTTP client")
    http_client_tls_key: str = flag_field("", flag="http-client-tls-key", kind="str", help="path to key file for the HTTP client")

    acl_http_header: str = flag_field(
        "X-Forwarded-User", flag="acl-http-header", kind="str", help="HTTP header to check for authenticated admin users"
    )
    admin_users: list[str] = flag_field(
        [],
        flag="admin-user",
        kind="strings",
        help="admin user (may be given multiple times; if specified, only these users will be able to perform "
        "privileged actions; acl-http-header is used to determine the authenticated user)",
    )
    allow_config_from_cidr: str = flag_field(
        "127.0.0.1/8",
        flag="allow-config-from-cidr",
        kind="str",
        help="A CIDR from which to allow HTTP requests to the /config endpoint",
    )
    notification_http_endpoint: str = flag_field(
        "",
        flag="notification-http-endpoint",
        kind="str",
        help="HTTP endpoint (fully qualified) to which POST notifications of admin actions will be sent",
    )

    # pynsqadmin's own
    disable_actions: bool = flag_field(
        False,
        flag="disable-actions",
        kind="bool",
        help="read-only UI: no action forms, and every action POST answered 403 (pynsqadmin only)",
    )
    sample_interval: float = flag_field(
        10.0, flag="sample-interval", kind="duration", help="how often every nsqd's /stats is sampled for the graphs (pynsqadmin only)"
    )
    history_duration: float = flag_field(
        3600.0,
        flag="history",
        kind="duration",
        help="how far back the graphs go; each topic and channel keeps history / sample-interval points of 16 bytes (pynsqadmin only)",
    )
    history_max_series: int = flag_field(
        10000,
        flag="history-max-series",
        kind="int",
        help="most topics + channels whose history is kept; beyond it new ones are not graphed (pynsqadmin only)",
    )
    down_node_memory: float = flag_field(
        3600.0,
        flag="down-node-memory",
        kind="duration",
        help="how long an nsqd that stopped answering (or left lookupd) is still listed as down (pynsqadmin only)",
    )

    # nsqadmin's graphite/statsd flags: accepted, unused
    graphite_url: str = flag_field("", flag="graphite-url", kind="str", help="graphite HTTP address" + _UNUSED)
    proxy_graphite: bool = flag_field(False, flag="proxy-graphite", kind="bool", help="proxy HTTP requests to graphite" + _UNUSED)
    statsd_counter_format: str = flag_field(
        "stats.counters.%s.count", flag="statsd-counter-format", kind="str", help="The counter stats key formatting applied by statsd" + _UNUSED
    )
    statsd_gauge_format: str = flag_field(
        "stats.gauges.%s", flag="statsd-gauge-format", kind="str", help="The gauge stats key formatting applied by statsd" + _UNUSED
    )
    statsd_interval: float = flag_field(60.0, flag="statsd-interval", kind="duration", help="time interval nsqd is configured to push to statsd" + _UNUSED)
    statsd_prefix: str = flag_field("nsq.%s", flag="statsd-prefix", kind="str", help="prefix used for keys sent to statsd" + _UNUSED)

    def __attrs_post_init__(self) -> None:
        try:
            ipaddress.ip_network(self.allow_config_from_cidr, strict=False)
        except ValueError:
            raise ValueError(f"invalid --allow-config-from-cidr {self.allow_config_from_cidr!r}") from None
        if not self.base_path.startswith("/"):
            raise ValueError(f"--base-path must start with '/' (got {self.base_path!r})")
        if self.sample_interval <= 0:
            raise ValueError("--sample-interval must be positive")
        if self.history_duration < self.sample_interval:
            raise ValueError("--history must be at least --sample-interval")
        if bool(self.http_client_tls_cert) != bool(self.http_client_tls_key):
            raise ValueError("--http-client-tls-cert and --http-client-tls-key go together")

    @property
    def history_points(self) -> int:
        """Points kept per graphed value."""
        return int(self.history_duration / self.sample_interval) + 1


NSQADMIN_FLAGS = flags_of(Options)
