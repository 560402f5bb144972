"""nsqd's options: flag names, config keys and defaults as nsqd 1.3.0 has them."""

from __future__ import annotations

import hashlib
import socket
import zlib

import attrs

from .flags import flag_field, flags_of

LOG_LEVELS = ("debug", "info", "warn", "error", "fatal")


def default_node_id(hostname: str | None = None) -> int:
    """nsqd's default: crc32(md5(hostname)) % 1024."""
    host = hostname if hostname is not None else socket.gethostname()
    return zlib.crc32(hashlib.md5(host.encode()).digest()) % 1024


def parse_tls_required(text: str) -> str:
    """``--tls-required``: true, false or tcp-https (TLS for TCP, HTTPS-only HTTP)."""
    t = text.lower()
    if t == "tcp-https":
        return "tcp-https"
    if t in ("1", "t", "true"):
        return "true"
    if t in ("0", "f", "false"):
        return "false"
    raise ValueError("must be true, false or tcp-https")


TLS_VERSION_NUMBERS = {"ssl3.0": 0x0300, "tls1.0": 0x0301, "tls1.1": 0x0302, "tls1.2": 0x0303, "tls1.3": 0x0304}


def parse_tls_min_version(text: str) -> str:
    t = text.lower()
    if t not in ("ssl3.0", "tls1.0", "tls1.1", "tls1.2", "tls1.3"):
        raise ValueError("must be one of ssl3.0, tls1.0, tls1.1, tls1.2, tls1.3")
    return t


@attrs.define(kw_only=True)
class DaemonOptions:
    """The flags every NSQ daemon has (nsqd, nsqlookupd)."""

    version: bool = flag_field(False, flag="version", kind="bool", help="print version string")
    config: str = flag_field("", flag="config", kind="str", help="path to config file (TOML, flag names with underscores)")
    log_level: str = flag_field(
        "info", flag="log-level", kind="str", choices=LOG_LEVELS, help="set log verbosity: debug, info, warn, error, or fatal"
    )
    log_prefix: str = flag_field("", flag="log-prefix", kind="str", help="log message prefix")
    log_format: str = flag_field(
        "text", flag="log-format", kind="str", choices=("text", "json"), help="log line format: text (key=value) or json"
    )
    verbose: bool = flag_field(False, flag="verbose", kind="bool", help="[deprecated] has no effect, use --log-level")


@attrs.define(kw_only=True)
class Options(DaemonOptions):
    log_prefix: str = flag_field("[nsqd] ", flag="log-prefix", kind="str", help="log message prefix")
    node_id: int = flag_field(
        default_node_id(),
        flag="node-id",
        kind="int",
        cfg="id",
        help="unique part for message IDs, (int) in range [0,1024) (default is hash of hostname)",
    )
    worker_id: bool = flag_field(False, flag="worker-id", kind="bool", help="[deprecated] use --node-id", hidden=True)

    https_address: str = flag_field("0.0.0.0:4152", flag="https-address", kind="str", help="<addr>:<port> to listen on for HTTPS clients")
    http_address: str = flag_field("0.0.0.0:4151", flag="http-address", kind="str", help="<addr>:<port> to listen on for HTTP clients")
    tcp_address: str = flag_field("0.0.0.0:4150", flag="tcp-address", kind="str", help="<addr>:<port> to listen on for TCP clients")
    auth_http_addresses: list[str] = flag_field(
        [], flag="auth-http-address", kind="strings", cfg="auth_http_addresses",
        help="<addr>:<port> or a full url to query auth server (may be given multiple times)",
    )
    auth_http_request_method: str = flag_field(
        "get", flag="auth-http-request-method", kind="str", choices=("get", "post"), help="HTTP method to use for auth server requests"
    )
    broadcast_address: str = flag_field(
        socket.gethostname(), flag="broadcast-address", kind="str",
        help="address that will be registered with lookupd (defaults to the OS hostname)",
    )
    broadcast_tcp_port: int = flag_field(
        0, flag="broadcast-tcp-port", kind="int", help="TCP port that will be registered with lookupd (defaults to the TCP port that this nsqd is listening on)"
    )
    broadcast_http_port: int = flag_field(
        0, flag="broadcast-http-port", kind="int", help="HTTP port that will be registered with lookupd (defaults to the HTTP port that this nsqd is listening on)"
    )
    lookupd_tcp_addresses: list[str] = flag_field(
        [], flag="lookupd-tcp-address", kind="strings", cfg="nsqlookupd_tcp_addresses", help="lookupd TCP address (may be given multiple times)"
    )
    http_client_connect_timeout: float = flag_field(2.0, flag="http-client-connect-timeout", kind="duration", help="timeout for HTTP connect")
    http_client_request_timeout: float = flag_field(5.0, flag="http-client-request-timeout", kind="duration", help="timeout for HTTP request")
    topology_region: str = flag_field("", flag="topology-region", kind="str", help="A region represents a larger domain, typically a geographical region")
    topology_zone: str = flag_field("", flag="topology-zone", kind="str", help="A zone represents a logical failure domain, typically a datacenter")

    # diskqueue
    data_path: str = flag_field("", flag="data-path", kind="str", help="path to store disk-backed messages (default: the working directory)")
    mem_queue_size: int = flag_field(
        10000, flag="mem-queue-size", kind="int", help="number of messages to keep in memory (per topic/channel)",
    )
    max_bytes_per_file: int = flag_field(104857600, flag="max-bytes-per-file", kind="int", help="number of bytes per diskqueue file before rolling")
    sync_every: int = flag_field(
        2500, flag="sync-every", kind="int",
        help="number of messages per diskqueue fsync (1: every message written through and fsynced before OK, in-flight messages survive a crash)",
    )
    sync_timeout: float = flag_field(2.0, flag="sync-timeout", kind="duration", help="duration of time per diskqueue fsync")
    # nsqd 1.3.0 flags that tune its queue-scan loop; pynsqd keeps per-channel
    # timers instead, so they are accepted (drop-in command lines) and unused
    queue_scan_worker_pool_max: int = flag_field(
        4, flag="queue-scan-worker-pool-max", kind="int",
        help="max concurrency for checking in-flight and deferred message timeouts (accepted for compatibility, unused)",
    )
    queue_scan_selection_count: int = flag_field(
        20, flag="queue-scan-selection-count", kind="int",
        help="number of channels to check per cycle (every 100ms) for in-flight and deferred timeouts (accepted for compatibility, unused)",
    )

    # beyond nsqd, each off by default (README: dead-letter topics, bounded disk, retention and replay)
    max_attempts: int = flag_field(
        0, flag="max-attempts", kind="int",
        help="deliveries of a message a channel makes before moving it to its dead-letter topic instead of delivering it again "
        "(0: no limit, as nsqd; per channel: POST /channel/settings?max_attempts=)",
    )
    dead_letter_topic: str = flag_field(
        "%s.dead", flag="dead-letter-topic", kind="str",
        help="the topic a channel's dead letters go to (%s: the channel's topic; per channel: POST /channel/settings?dead_letter_topic=)",
    )
    max_disk_bytes_per_topic: int = flag_field(
        0, flag="max-disk-bytes-per-topic", kind="int",
        help="bytes of queued messages a topic and its channels may hold on disk before publishes to it are refused "
        "(0: unbounded, as nsqd; per topic: POST /topic/settings?max_disk_bytes=)",
    )
    retention_time: float = flag_field(
        0.0, flag="retention-time", kind="duration",
        help="keep each topic's messages this long whether or not its channels finished them, for rewinding channels "
        "(0: no time bound; per topic: POST /topic/retention) (pynsqd only)",
    )
    retention_bytes: int = flag_field(
        0, flag="retention-bytes", kind="int",
        help="keep at most this many bytes of each topic's retained messages, oldest files deleted first "
        "(0: no size bound; either bound turns retention on) (pynsqd only)",
    )

    # messages and commands
    msg_timeout: float = flag_field(60.0, flag="msg-timeout", kind="duration", help="default duration to wait before auto-requeing a message")
    max_msg_timeout: float = flag_field(900.0, flag="max-msg-timeout", kind="duration", help="maximum duration before a message will timeout")
    max_msg_size: int = flag_field(1048576, flag="max-msg-size", kind="int", help="maximum size of a single message in bytes")
    max_req_timeout: float = flag_field(3600.0, flag="max-req-timeout", kind="duration", help="maximum requeuing timeout for a message")
    max_body_size: int = flag_field(5242880, flag="max-body-size", kind="int", help="maximum size of a single command body")

    # client overridable
    max_heartbeat_interval: float = flag_field(
        60.0, flag="max-heartbeat-interval", kind="duration", help="maximum client configurable duration of time between client heartbeats"
    )
    max_rdy_count: int = flag_field(2500, flag="max-rdy-count", kind="int", help="maximum RDY count for a client")
    max_output_buffer_size: int = flag_field(
        65536, flag="max-output-buffer-size", kind="int", help="maximum client configurable size (in bytes) for a client output buffer"
    )
    max_output_buffer_timeout: float = flag_field(
        30.0, flag="max-output-buffer-timeout", kind="duration", help="maximum client configurable duration of time between flushing to a client"
    )
    min_output_buffer_timeout: float = flag_field(
        0.025, flag="min-output-buffer-timeout", kind="duration", help="minimum client configurable duration of time between flushing to a client"
    )
    output_buffer_timeout: float = flag_field(
        0.25, flag="output-buffer-timeout", kind="duration", help="default duration of time between flushing data to clients"
    )
    max_channel_consumers: int = flag_field(
        0, flag="max-channel-consumers", kind="int", help="maximum channel consumer connection count per nsqd instance (default 0, i.e., unlimited)"
    )

    # statsd
    statsd_address: str = flag_field("", flag="statsd-address", kind="str", help="UDP <addr>:<port> of a statsd daemon for pushing stats")
    statsd_interval: float = flag_field(60.0, flag="statsd-interval", kind="duration", help="duration between pushing to statsd")
    statsd_mem_stats: bool = flag_field(True, flag="statsd-mem-stats", kind="bool", help="toggle sending memory and GC stats to statsd")
    statsd_prefix: str = flag_field("nsq.%s", flag="statsd-prefix", kind="str", help="prefix used for keys sent to statsd (%s for host replacement)")
    statsd_udp_packet_size: int = flag_field(508, flag="statsd-udp-packet-size", kind="int", help="the size in bytes of statsd UDP packets")
    statsd_exclude_ephemeral: bool = flag_field(
        False, flag="statsd-exclude-ephemeral", kind="bool", help="Skip ephemeral topics and channels when sending stats to statsd"
    )

    # end-to-end latency
    e2e_processing_latency_percentiles: list[float] = flag_field(
        [], flag="e2e-processing-latency-percentile", kind="floats", cfg="e2e_processing_latency_percentiles",
        help="message processing time percentiles (as float (0, 1.0]) to track (can be specified multiple times or comma separated '1.0,0.99,0.95', default none)",
    )
    e2e_processing_latency_window_time: float = flag_field(
        600.0, flag="e2e-processing-latency-window-time", kind="duration",
        help="calculate end to end latency quantiles for this duration of time (ie: 60s would only show quantile calculations from the past 60 seconds)",
    )

    # TLS
    tls_cert: str = flag_field("", flag="tls-cert", kind="str", help="path to certificate file")
    tls_key: str = flag_field("", flag="tls-key", kind="str", help="path to key file")
    tls_client_auth_policy: str = flag_field(
        "", flag="tls-client-auth-policy", kind="str", choices=("", "require", "require-verify"),
        help="client certificate auth policy ('require' or 'require-verify')",
    )
    tls_root_ca_file: str = flag_field("", flag="tls-root-ca-file", kind="str", help="path to certificate authority file")
    tls_required: str = flag_field(
        "false", flag="tls-required", kind="str", parse=parse_tls_required, bool_like=True,
        help="require TLS for client connections (true, false, tcp-https)",
    )
    tls_min_version: str = flag_field(
        "tls1.2", flag="tls-min-version", kind="str", parse=parse_tls_min_version,
        help="minimum SSL/TLS version acceptable ('ssl3.0', 'tls1.0', 'tls1.1', 'tls1.2' or 'tls1.3')",
    )

    # compression
    deflate: bool = flag_field(True, flag="deflate", kind="bool", help="enable deflate feature negotiation (client compression)")
    max_deflate_level: int = flag_field(
        6, flag="max-deflate-level", kind="int", help="max deflate compression level a client can negotiate (> values == > nsqd CPU usage)"
    )
    snappy: bool = flag_field(True, flag="snappy", kind="bool", help="enable snappy feature negotiation (client compression)")

    def __attrs_post_init__(self) -> None:
        if not 0 <= self.node_id < 1024:
            raise ValueError(f"--node-id must be [0,1024) (got {self.node_id})")
        if not 1 <= self.max_deflate_level <= 9:
            raise ValueError(f"--max-deflate-level must be [1,9] (got {self.max_deflate_level})")
        for name in ("mem_queue_size", "max_channel_consumers", "sync_every", "broadcast_tcp_port", "broadcast_http_port",
                     "max_disk_bytes_per_topic", "retention_bytes", "retention_time"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0 (got {getattr(self, name)})")
        for name in (
            "max_bytes_per_file", "max_msg_size", "max_body_size", "max_rdy_count", "msg_timeout", "max_msg_timeout",
            "max_heartbeat_interval", "max_output_buffer_size", "sync_timeout", "statsd_interval", "statsd_udp_packet_size",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0 (got {getattr(self, name)})")
        if not 0 <= self.max_attempts <= 65535:
            raise ValueError(f"--max-attempts must be [0,65535] (got {self.max_attempts})")
        if not self.dead_letter_topic:
            raise ValueError("--dead-letter-topic must not be empty")
        if self.max_req_timeout < 0:
            raise ValueError("--max-req-timeout must be >= 0")
        for p in self.e2e_processing_latency_percentiles:
            if not 0 < p <= 1:
                raise ValueError(f"--e2e-processing-latency-percentile must be in (0, 1.0] (got {p})")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("--tls-cert and --tls-key must be given together")
        if self.tls_client_auth_policy and self.tls_required == "false":
            # nsqd: a client certificate policy only means something with TLS required
            self.tls_required = "true"
        if self.tls_required != "false" and not self.tls_cert:
            raise ValueError("cannot require TLS client connections without TLS key and cert")

    @property
    def heartbeat_interval(self) -> float:
        """The default client heartbeat: nsqd's ClientTimeout (60s) / 2."""
        return 30.0


NSQD_FLAGS = flags_of(Options)


def config_value(options: Options, cfg_name: str) -> object:
    """``GET /config/<name>``: the value as nsqd reports it (durations in ns)."""
    for f in NSQD_FLAGS:
        if f.cfg == cfg_name:
            value = getattr(options, f.attr)
            if f.kind == "duration":
                return round(value * 1e9)
            if f.name == "tls-required":
                # Go's TLSNotRequired, TLSRequiredExceptHTTP, TLSRequired
                return {"false": 0, "tcp-https": 1, "true": 2}[value]
            if f.name == "tls-min-version":
                # Go reports the crypto/tls uint16 (0x0301 = TLS 1.0...)
                return TLS_VERSION_NUMBERS[value]
            return value
    raise KeyError(cfg_name)
