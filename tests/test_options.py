"""nsqd's options (pynsqd.options): nsqd 1.3.0 defaults, validation as
one-line flag errors, config names and ``GET /config`` values."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import zlib

import pytest

from pynsqd.flags import FlagError, resolve, run_cli
from pynsqd.options import NSQD_FLAGS, Options, config_value, default_node_id

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# nsqd 1.3.0's NewOptions() / nsqdFlagSet, durations in seconds
NSQD_DEFAULTS = {
    "tcp_address": "0.0.0.0:4150",
    "http_address": "0.0.0.0:4151",
    "https_address": "0.0.0.0:4152",
    "broadcast_tcp_port": 0,
    "broadcast_http_port": 0,
    "lookupd_tcp_addresses": [],
    "auth_http_addresses": [],
    "http_client_connect_timeout": 2.0,
    "http_client_request_timeout": 5.0,
    "data_path": "",
    "mem_queue_size": 10000,
    "max_bytes_per_file": 104857600,
    "sync_every": 2500,
    "sync_timeout": 2.0,
    "queue_scan_worker_pool_max": 4,
    "queue_scan_selection_count": 20,
    "msg_timeout": 60.0,
    "max_msg_timeout": 900.0,
    "max_msg_size": 1048576,
    "max_req_timeout": 3600.0,
    "max_body_size": 5242880,
    "max_heartbeat_interval": 60.0,
    "max_rdy_count": 2500,
    "max_output_buffer_size": 65536,
    "max_output_buffer_timeout": 30.0,
    "min_output_buffer_timeout": 0.025,
    "output_buffer_timeout": 0.25,
    "max_channel_consumers": 0,
    "statsd_address": "",
    "statsd_prefix": "nsq.%s",
    "statsd_interval": 60.0,
    "statsd_mem_stats": True,
    "statsd_udp_packet_size": 508,
    "statsd_exclude_ephemeral": False,
    "e2e_processing_latency_percentiles": [],
    "e2e_processing_latency_window_time": 600.0,
    "tls_cert": "",
    "tls_key": "",
    "tls_client_auth_policy": "",
    "tls_root_ca_file": "",
    "tls_required": "false",
    "deflate": True,
    "max_deflate_level": 6,
    "snappy": True,
    "log_level": "info",
    "log_prefix": "[nsqd] ",
    "verbose": False,
    "version": False,
    "config": "",
}


def test_defaults_are_nsqd_1_3_0s():
    opts = Options()
    actual = {name: getattr(opts, name) for name in NSQD_DEFAULTS}
    assert actual == NSQD_DEFAULTS


def test_default_tls_min_version():
    # nsqd 1.3.0 defaults to tls1.0; pynsqd deliberately starts at tls1.2
    # (OpenSSL 3 refuses older protocols at its default security level)
    assert Options().tls_min_version == "tls1.2"


def test_host_derived_defaults():
    opts = Options()
    host = socket.gethostname()
    assert opts.broadcast_address == host
    assert opts.node_id == default_node_id(host)
    assert 0 <= opts.node_id < 1024


@pytest.mark.parametrize("host", ["localhost", "nsqd-1.example.com", "", "héllo"])
def test_default_node_id_is_crc32_of_md5(host):
    expected = zlib.crc32(hashlib.md5(host.encode()).digest()) % 1024
    assert default_node_id(host) == expected


def test_flag_names_and_config_keys():
    by_name = {f.name: f for f in NSQD_FLAGS}
    # config keys are the flag names with underscores, except where nsqd's
    # struct tags say otherwise
    overrides = {
        "node-id": "id",
        "lookupd-tcp-address": "nsqlookupd_tcp_addresses",
        "auth-http-address": "auth_http_addresses",
        "e2e-processing-latency-percentile": "e2e_processing_latency_percentiles",
    }
    for f in NSQD_FLAGS:
        assert f.cfg == overrides.get(f.name, f.name.replace("-", "_")), f.name
    # every nsqd 1.3.0 flag is accepted
    for name in [
        "version", "config", "log-level", "log-prefix", "verbose", "node-id", "worker-id", "https-address",
        "http-address", "tcp-address", "auth-http-address", "broadcast-address", "broadcast-tcp-port",
        "broadcast-http-port", "lookupd-tcp-address", "http-client-connect-timeout", "http-client-request-timeout",
        "data-path", "mem-queue-size", "max-bytes-per-file", "sync-every", "sync-timeout",
        "queue-scan-worker-pool-max", "queue-scan-selection-count", "msg-timeout", "max-msg-timeout",
        "max-msg-size", "max-req-timeout", "max-body-size", "max-heartbeat-interval", "max-rdy-count",
        "max-output-buffer-size", "max-output-buffer-timeout", "min-output-buffer-timeout",
        "output-buffer-timeout", "max-channel-consumers", "statsd-address", "statsd-interval", "statsd-mem-stats",
        "statsd-prefix", "statsd-udp-packet-size", "statsd-exclude-ephemeral", "e2e-processing-latency-percentile",
        "e2e-processing-latency-window-time", "tls-cert", "tls-key", "tls-client-auth-policy", "tls-root-ca-file",
        "tls-required", "tls-min-version", "deflate", "max-deflate-level", "snappy",
    ]:
        assert name in by_name, name


def test_drop_in_command_line():
    opts, parsed = resolve(
        Options,
        [
            "--tcp-address=127.0.0.1:0",
            "--http-address", "127.0.0.1:0",
            "-lookupd-tcp-address=127.0.0.1:4160",
            "--lookupd-tcp-address=127.0.0.1:5160",
            "--node-id=1023",
            "--mem-queue-size=0",
            "--msg-timeout=5s",
            "--max-msg-timeout=1m",
            "--queue-scan-worker-pool-max=8",
            "--e2e-processing-latency-percentile=1.0,0.99",
            "--tls-min-version=TLS1.3",
            "--snappy=false",
            "--verbose",
        ],
    )
    assert opts.lookupd_tcp_addresses == ["127.0.0.1:4160", "127.0.0.1:5160"]
    assert (opts.node_id, opts.mem_queue_size, opts.msg_timeout, opts.max_msg_timeout) == (1023, 0, 5.0, 60.0)
    assert opts.e2e_processing_latency_percentiles == [1.0, 0.99]
    assert opts.tls_min_version == "tls1.3"
    assert opts.snappy is False
    assert parsed.args == []


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--node-id=1024"], "--node-id must be [0,1024)"),
        (["--node-id=-1"], "--node-id must be [0,1024)"),
        (["--mem-queue-size=-1"], "--mem-queue-size must be >= 0"),
        (["--sync-every=-1"], "--sync-every must be >= 0"),
        (["--max-channel-consumers=-5"], "--max-channel-consumers must be >= 0"),
        (["--max-msg-size=0"], "--max-msg-size must be > 0"),
        (["--max-body-size=-1"], "--max-body-size must be > 0"),
        (["--max-rdy-count=0"], "--max-rdy-count must be > 0"),
        (["--msg-timeout=0s"], "--msg-timeout must be > 0"),
        (["--max-req-timeout=-1s"], "--max-req-timeout must be >= 0"),
        (["--max-deflate-level=0"], "--max-deflate-level must be [1,9]"),
        (["--max-deflate-level=10"], "--max-deflate-level must be [1,9]"),
        (["--e2e-processing-latency-percentile=0"], "--e2e-processing-latency-percentile must be in (0, 1.0]"),
        (["--e2e-processing-latency-percentile=0.5,1.5"], "--e2e-processing-latency-percentile must be in (0, 1.0]"),
        (["--tls-required"], "cannot require TLS client connections without TLS key and cert"),
        (["--tls-required=tcp-https"], "cannot require TLS client connections without TLS key and cert"),
        (["--tls-cert=c.pem"], "--tls-cert and --tls-key must be given together"),
        (["--tls-key=k.pem"], "--tls-cert and --tls-key must be given together"),
        (["--tls-required=maybe"], "must be true, false or tcp-https"),
        (["--tls-min-version=tls9"], "must be one of ssl3.0"),
        (["--tls-client-auth-policy=sometimes"], "must be one of"),
        (["--log-level=loud"], "must be one of debug, info, warn, error, fatal"),
    ],
)
def test_validation_errors_are_one_line_flag_errors(argv, fragment, capsys):
    with pytest.raises(FlagError) as exc:
        resolve(Options, argv)
    assert fragment in str(exc.value)
    assert "\n" not in str(exc.value)

    with pytest.raises(SystemExit) as exit_info:
        run_cli("pynsqd", Options, argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("pynsqd: ") and err.endswith("\n")
    assert err.count("\n") == 1
    assert fragment in err


def test_validation_applies_to_config_values(tmp_path):
    path = tmp_path / "nsqd.cfg"
    path.write_text("id = 4096\n")
    with pytest.raises(FlagError) as exc:
        resolve(Options, ["--config", str(path)])
    assert "--node-id must be [0,1024)" in str(exc.value)


def test_tls_required_with_cert_and_key():
    opts, _ = resolve(Options, ["--tls-cert=c.pem", "--tls-key=k.pem", "--tls-required"])
    assert opts.tls_required == "true"
    opts, _ = resolve(Options, ["--tls-cert=c.pem", "--tls-key=k.pem", "--tls-required=tcp-https"])
    assert opts.tls_required == "tcp-https"


@pytest.mark.parametrize("value", [0, 1023])
def test_node_id_bounds_accepted(value):
    opts, _ = resolve(Options, [f"--node-id={value}"])
    assert opts.node_id == value


def test_cli_validation_error_exits_2_with_one_line(tmp_path):
    argv = [
        sys.executable, "-m", "pynsqd", "--node-id=1024",
        # a safety net in case validation ever stops working: stay local
        "--tcp-address=127.0.0.1:0", "--http-address=127.0.0.1:0", "--https-address=", f"--data-path={tmp_path}",
    ]
    proc = subprocess.run(
        argv, cwd=tmp_path, env=dict(os.environ, PYTHONPATH=REPO), capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr == "pynsqd: --node-id must be [0,1024) (got 1024)\n"


# ---------------------------------------------------------------- GET /config


def test_config_value_durations_in_ns():
    opts = Options()
    assert config_value(opts, "msg_timeout") == 60_000_000_000
    assert config_value(opts, "max_msg_timeout") == 900_000_000_000
    assert config_value(opts, "min_output_buffer_timeout") == 25_000_000
    assert config_value(opts, "output_buffer_timeout") == 250_000_000
    assert config_value(opts, "e2e_processing_latency_window_time") == 600_000_000_000
    assert isinstance(config_value(opts, "sync_timeout"), int)


def test_config_value_names_by_config_key():
    opts, _ = resolve(
        Options,
        ["--node-id=42", "--lookupd-tcp-address=a:4160", "--lookupd-tcp-address=b:4160", "--log-level=warn", "--msg-timeout=1.5s"],
    )
    assert config_value(opts, "id") == 42
    assert config_value(opts, "nsqlookupd_tcp_addresses") == ["a:4160", "b:4160"]
    assert config_value(opts, "auth_http_addresses") == []
    assert config_value(opts, "log_level") == "warn"
    assert config_value(opts, "msg_timeout") == 1_500_000_000
    assert config_value(opts, "mem_queue_size") == 10000
    assert config_value(opts, "snappy") is True
    assert config_value(opts, "tcp_address") == "0.0.0.0:4150"
    for attr_name in ("node_id", "lookupd_tcp_addresses", "node-id", "no_such_option"):
        with pytest.raises(KeyError):
            config_value(opts, attr_name)


# Go: TLSNotRequired = 0, TLSRequiredExceptHTTP (tcp-https) = 1, TLSRequired = 2
@pytest.mark.parametrize("flag, value", [("--tls-required=false", 0), ("--tls-required", 2), ("--tls-required=tcp-https", 1)])
def test_config_value_tls_required_is_nsqds_int(flag, value):
    opts, _ = resolve(Options, ["--tls-cert=c.pem", "--tls-key=k.pem", flag])
    assert config_value(opts, "tls_required") == value
