"""The Docker image's health check (``python -m pynsqd.healthcheck``): it
asks each daemon on the HTTP address that daemon was configured with --
by flag or in its --config file -- read from /proc/PID/cmdline."""

from __future__ import annotations

import subprocess
import sys

import pytest

from helpers import Daemon, free_port
from pynsqd.healthcheck import daemon_argv, options_for, ping_url


def test_daemon_argv_finds_the_daemon_and_its_flags():
    assert daemon_argv(["/usr/local/bin/python", "/usr/local/bin/pynsqd", "--data-path=/data"]) == ("pynsqd", ["--data-path=/data"])
    assert daemon_argv(["python3", "-m", "pynsqlookupd", "-http-address", "0.0.0.0:5161"]) == ("pynsqlookupd", ["-http-address", "0.0.0.0:5161"])
    with pytest.raises(ValueError):
        daemon_argv(["/bin/sh", "-c", "sleep 1"])


def test_ping_url_follows_the_configuration(tmp_path):
    assert ping_url("pynsqd", options_for("pynsqd", ["--http-address=0.0.0.0:5151"]))[0] == "http://127.0.0.1:5151/ping"
    assert ping_url("pynsqlookupd", options_for("pynsqlookupd", []))[0] == "http://127.0.0.1:4161/ping"
    assert ping_url("pynsqadmin", options_for("pynsqadmin", ["--http-address=[::]:8080", "--base-path=/admin"]))[0] == "http://[::1]:8080/admin/ping"
    config = tmp_path / "nsqd.toml"
    config.write_text('http_address = "127.0.0.1:6151"\n')
    assert ping_url("pynsqd", options_for("pynsqd", [f"--config={config}"]))[0] == "http://127.0.0.1:6151/ping"


def run_check(pid: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pynsqd.healthcheck", str(pid)], capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("module", ["pynsqd", "pynsqlookupd", "pynsqadmin"])
def test_healthy_daemon_on_a_configured_port(module, tmp_path):
    port = free_port()
    config = tmp_path / "daemon.toml"
    config.write_text(f'http_address = "127.0.0.1:{port}"\n')  # only in the config file
    args = [sys.executable, "-m", module, f"--config={config}"]
    if module == "pynsqd":
        args += [f"--data-path={tmp_path}", "--tcp-address=127.0.0.1:0"]
    elif module == "pynsqlookupd":
        args += ["--tcp-address=127.0.0.1:0"]
    daemon = Daemon(args)
    try:
        daemon.wait_listening(("HTTP",))
        assert daemon.http_port == port
        p = run_check(daemon.proc.pid)
        assert p.returncode == 0, p.stderr
    finally:
        daemon.stop()
    p = run_check(daemon.proc.pid)  # gone: unhealthy, with the reason
    assert p.returncode == 1 and p.stderr.startswith("unhealthy:")
