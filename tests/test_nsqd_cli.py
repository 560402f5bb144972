"""pynsqd as a drop-in for the nsqd binary: flags, startup lines, exit codes."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time

from helpers import Daemon, http_request, start_nsqd, wait_for

VERSION_RE = re.compile(r"^nsqd v[0-9]+\.[0-9]+\.[0-9]+(-[a-z]+)? \(built w/[a-z0-9.-]+\)$")


def run(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pynsqd", *args], capture_output=True, text=True, timeout=timeout)


def test_version_shape():
    proc = run("--version")
    assert proc.returncode == 0
    assert VERSION_RE.match(proc.stdout.strip()), proc.stdout
    assert proc.stdout.strip().startswith("nsqd v1.3.0-compatible (built w/pynsqd-")


def test_go_style_flags_port_zero_and_listening_lines(tmp_path):
    started = time.monotonic()
    d = Daemon([
        sys.executable, "-m", "pynsqd",
        "-tcp-address", "127.0.0.1:0",
        "--http-address=127.0.0.1:0",
        "-data-path=" + str(tmp_path),
        "--verbose",
        "-mem-queue-size", "5",
        "--mem-queue-size=7",  # the last one wins
        "--snappy=false",
        "--msg-timeout", "1m30s",
    ])
    try:
        d.wait_listening()
        wait_for(lambda: http_request("GET", f"http://127.0.0.1:{d.http_port}/ping", timeout=1)[0] == 200)
        elapsed = time.monotonic() - started
        # nsqd answers /ping within a second of start; allow a loaded CI box some slack
        assert elapsed < 5, elapsed
        assert any(re.search(r"TCP: listening on 127\.0\.0\.1:\d+$", line) for line in d.lines)
        assert any(re.search(r"HTTP: listening on 127\.0\.0\.1:\d+$", line) for line in d.lines)
        assert d.tcp_port > 0 and d.http_port > 0
        assert http_request("GET", f"http://127.0.0.1:{d.http_port}/config/mem_queue_size")[1] == b"7"
        assert http_request("GET", f"http://127.0.0.1:{d.http_port}/config/msg_timeout")[1] == b"90000000000"
        assert http_request("GET", f"http://127.0.0.1:{d.http_port}/config/snappy")[1] == b"false"
    finally:
        assert d.stop(signal.SIGINT) == 0


def test_config_file_and_flag_precedence(tmp_path):
    cfg = tmp_path / "nsqd.toml"
    cfg.write_text('mem_queue_size = 123\nmax_rdy_count = 50\nmsg_timeout = "45s"\nnsqlookupd_tcp_addresses = []\n')
    d = start_nsqd(str(tmp_path), f"--config={cfg}", "--max-rdy-count=60")
    try:
        assert d.http("GET", "/config/mem_queue_size")[1] == b"123"
        assert d.http("GET", "/config/max_rdy_count")[1] == b"60"
        assert d.http("GET", "/config/msg_timeout")[1] == b"45000000000"
    finally:
        assert d.stop() == 0


def test_bad_flag_values_exit_2_with_one_line():
    for args in (["--mem-queue-size=abc"], ["--no-such-flag"], ["--node-id=5000"], ["--msg-timeout=forever"], ["--tcp-address"]):
        proc = run(*args)
        assert proc.returncode == 2, (args, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1, (args, proc.stderr)
        assert "Traceback" not in proc.stderr


def test_help_exits_0():
    proc = run("--help")
    assert proc.returncode == 0
    assert "-mem-queue-size" in proc.stderr and "-lookupd-tcp-address" in proc.stderr


def test_sigterm_is_a_clean_shutdown(tmp_path):
    d = start_nsqd(str(tmp_path))
    d.http("POST", "/topic/create?topic=kept")
    assert d.stop(signal.SIGTERM) == 0
    assert (tmp_path / "nsqd.dat").exists()
    assert '"kept"' in (tmp_path / "nsqd.dat").read_text()


def test_second_daemon_on_the_same_data_path_refuses(tmp_path):
    d = start_nsqd(str(tmp_path))
    try:
        proc = run("--tcp-address=127.0.0.1:0", "--http-address=127.0.0.1:0", f"--data-path={tmp_path}")
        assert proc.returncode == 1
        fatal = [line for line in proc.stderr.splitlines() if "FATAL" in line]
        assert len(fatal) == 1 and "in use" in fatal[0]
        assert "Traceback" not in proc.stderr
    finally:
        d.stop()


def test_listen_address_in_use_is_one_fatal_line(tmp_path):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    port = s.getsockname()[1]
    try:
        proc = run(f"--tcp-address=127.0.0.1:{port}", "--http-address=127.0.0.1:0", f"--data-path={tmp_path}")
        assert proc.returncode == 1
        assert "Traceback" not in proc.stderr
        assert len([line for line in proc.stderr.splitlines() if "FATAL" in line]) == 1
    finally:
        s.close()


# ---------------------------------------------------------------- the operator's first hour


def test_missing_data_path_is_an_error_as_in_nsqd(tmp_path):
    missing = tmp_path / "typo" / "dir"
    proc = run("--tcp-address=127.0.0.1:0", "--http-address=127.0.0.1:0", f"--data-path={missing}")
    assert proc.returncode == 1
    assert proc.stderr.splitlines()[-1] == (
        f"[nsqd] FATAL: failed to instantiate nsqd - failed to lock data-path: open {missing}: no such file or directory"
    )
    assert not (tmp_path / "typo").exists()  # never created


def test_data_path_that_is_a_file_says_so(tmp_path):
    a_file = tmp_path / "passwd"
    a_file.write_text("root:x:0:0\n")
    proc = run("--tcp-address=127.0.0.1:0", "--http-address=127.0.0.1:0", f"--data-path={a_file}")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.splitlines()[-1].endswith(f"failed to lock data-path: --data-path={a_file} is not a directory")


def test_unknown_config_keys_are_warned_by_name(tmp_path):
    cfg = tmp_path / "nsqd.toml"
    cfg.write_text("mem_queue_sise = 5\nmax_rdy_count = 50\nfrobnicate = true\n")
    d = start_nsqd(str(tmp_path), f"--config={cfg}")
    try:
        warnings = [line for line in d.lines if "WARNING" in line and "config file" in line]
        assert any('unknown option "mem_queue_sise" ignored (did you mean "mem_queue_size"?)' in w for w in warnings), d.lines
        assert any('unknown option "frobnicate" ignored' in w for w in warnings)
        assert d.http("GET", "/config/max_rdy_count")[1] == b"50"  # the known keys still apply
    finally:
        d.stop()
    for module in ("pynsqlookupd", "pynsqadmin"):  # same flags machinery, same warning
        other = Daemon([sys.executable, "-m", module, f"--config={cfg}", "--http-address=127.0.0.1:0", *(["--tcp-address=127.0.0.1:0"] if module == "pynsqlookupd" else [])])
        try:
            other.wait_listening(("HTTP",))
            assert any('unknown option "mem_queue_sise" ignored' in line for line in other.lines), other.lines
        finally:
            other.stop()


def test_shutdown_logs_what_it_persisted(tmp_path):
    d = start_nsqd(str(tmp_path), "--log-level=info")
    for name in ("a", "b"):
        assert d.http("POST", f"/topic/create?topic=persist_{name}")[0] == 200
    assert d.http("POST", "/channel/create?topic=persist_a&channel=c1")[0] == 200
    assert d.http("POST", "/channel/create?topic=persist_a&channel=gone%23ephemeral")[0] == 200
    assert d.http("POST", "/mpub?topic=persist_a", b"\n".join(b"x%d" % i for i in range(40)))[0] == 200
    assert d.http("POST", "/mpub?topic=persist_b", b"\n".join(b"y%d" % i for i in range(7)))[0] == 200
    assert d.stop(signal.SIGTERM) == 0
    persisted = [line for line in d.lines if "NSQ: persisted" in line or "NSQ: dropped" in line]
    assert any("persisted persist_a:c1: 40 messages written to disk" in line and "memory=40" in line for line in persisted), persisted
    assert any("persisted persist_b: 7 messages written to disk" in line for line in persisted), persisted
    assert any("dropped 40 messages of ephemeral persist_a:gone#ephemeral" in line for line in persisted), persisted
    assert persisted[-1].split("INFO: ")[1].startswith("NSQ: persisted 47 in-memory messages to disk at exit")


def test_a_second_signal_during_shutdown_is_ignored(tmp_path):
    d = start_nsqd(str(tmp_path))
    assert d.http("POST", "/mpub?topic=twice", b"\n".join(b"z%d" % i for i in range(100)))[0] == 200
    d.proc.send_signal(signal.SIGTERM)
    d.proc.send_signal(signal.SIGTERM)  # a supervisor's retry, or a whole process group signalled
    d.proc.send_signal(signal.SIGINT)
    assert d.stop() == 0
    assert any("NSQ: persisted twice: 100 messages written to disk" in line for line in d.lines), d.lines


# a body that, once stopped by a first SIGTERM, gets a second one and returns
# before the signal watcher can read it: the signal is left in trio's receiver
# when it closes, and trio hands such signals back to the handlers it restores
_SECOND_SIGNAL_UNREAD = """
import signal, sys, trio
from pynsqd.daemon import run_until_signal

async def body(stop):
    with stop:
        signal.raise_signal(signal.SIGTERM)
        await trio.sleep_forever()
    signal.raise_signal(signal.SIGTERM)  # no checkpoint after it: never read
    return 0

sys.exit(trio.run(run_until_signal, body))
"""


def test_a_second_signal_left_unread_at_exit_does_not_kill_the_process():
    proc = subprocess.run([sys.executable, "-c", _SECOND_SIGNAL_UNREAD], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
