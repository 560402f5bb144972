"""The README's one-command start, ``pynsqd-local``: lookupd first, then nsqd
registered with it, then nsqadmin; and every daemon gone -- its ports free
again -- after a SIGTERM to the process group, a Ctrl-C, a SIGTERM to the
launcher alone, a daemon dying, or the launcher killed outright."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from helpers import http_request, wait_for

ROOT = Path(__file__).resolve().parent.parent
PORT0 = [f"--{name}=127.0.0.1:0" for name in ("nsqd-tcp-address", "nsqd-http-address", "lookupd-tcp-address", "lookupd-http-address", "admin-http-address")]
READY = re.compile(r"ready: nsqd TCP (\S+) HTTP (\S+), nsqlookupd TCP (\S+) HTTP (\S+), nsqadmin http://(\S+)/")


class Local:
    """pynsqd-local in a session (process group) of its own, as a shell runs it."""

    def __init__(self, data: Path) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "pynsqd.local", f"--data-path={data}", *PORT0],
                                     stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        m = wait_for(lambda: self._ready() or self._exited(), timeout=60, message="pynsqd-local ready")
        assert isinstance(m, re.Match), "\n".join(self.lines)
        self.nsqd_tcp, self.nsqd_http, self.lookupd_tcp, self.lookupd_http, self.admin_http = m.groups()
        self.daemons = self.children()
        assert len(self.daemons) == 3, self.daemons

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def _ready(self) -> re.Match | None:
        return next((m for m in map(READY.search, self.lines) if m), None)

    def _exited(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError("pynsqd-local exited:\n" + "\n".join(self.lines))
        return False

    def children(self) -> dict[int, str]:
        """pid -> command line of every process whose parent is the launcher."""
        out = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
                if ppid == self.proc.pid:
                    out[int(entry)] = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except (OSError, ValueError, IndexError):
                continue
        return out

    def index(self, pattern: str) -> int:
        return next(i for i, line in enumerate(self.lines) if re.search(pattern, line))

    def all_gone(self) -> bool:
        return not any(Path(f"/proc/{pid}").exists() and "zombie" not in _state(pid) for pid in self.daemons)

    def ports_free(self) -> bool:
        for address in (self.nsqd_tcp, self.nsqd_http, self.lookupd_tcp, self.lookupd_http, self.admin_http):
            with socket.socket() as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    s.bind(("127.0.0.1", int(address.rsplit(":", 1)[1])))
                except OSError:
                    return False
        return True

    def cleanup(self) -> None:
        for pid in [*self.daemons, self.proc.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self.proc.wait(10)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:", 1)[1].split("\n", 1)[0]
    except (OSError, IndexError):
        return "zombie"


@pytest.fixture
def local(tmp_path):
    data = tmp_path / "data"  # missing: the launcher creates its own folder
    instance = Local(data)
    yield instance
    instance.cleanup()


def test_readme_run_command_is_the_launcher():
    text = (ROOT / "README.md").read_text()
    run = text[text.index("<!-- run-command -->") :].split("```")[1]
    assert run.strip().endswith("&& .venv/bin/pynsqd-local")
    from pynsqd.local import LocalOptions

    defaults = LocalOptions()  # the README's addresses: loopback, Go's ports, ./data
    assert (defaults.nsqd_tcp_address, defaults.lookupd_http_address, defaults.admin_http_address, defaults.data_path) == (
        "127.0.0.1:4150", "127.0.0.1:4161", "127.0.0.1:4171", "./data")


def test_starts_in_order_and_nsqd_registers_at_once(local):
    # nsqd is started only once lookupd listens, nsqadmin once nsqd does
    assert local.index(r"\[nsqlookupd\].*HTTP: listening") < local.index(r"starting nsqd")
    assert local.index(r"\[nsqd\].*HTTP: listening") < local.index(r"starting nsqadmin")
    assert not any("connect failed" in line or "LOOKUPD: " in line and "error" in line.lower() for line in local.lines), local.lines
    assert http_request("POST", f"http://{local.nsqd_http}/topic/create?topic=first")[0] == 200
    wait_for(lambda: b"first" in http_request("GET", f"http://{local.lookupd_http}/topics")[1], message="topic registered")
    assert http_request("GET", f"http://{local.admin_http}/ping")[1] == b"OK"


@pytest.mark.parametrize("how", ["SIGTERM to the process group", "Ctrl-C", "SIGTERM to the launcher", "a daemon dies", "launcher killed"])
def test_everything_stops_together(local, how):
    pgid = os.getpgid(local.proc.pid)
    assert all(os.getpgid(pid) != pgid for pid in local.daemons)  # reached through the launcher only
    if how == "SIGTERM to the process group":
        os.killpg(pgid, signal.SIGTERM)
    elif how == "Ctrl-C":
        os.killpg(pgid, signal.SIGINT)  # what the terminal sends to the foreground group
    elif how == "SIGTERM to the launcher":
        local.proc.send_signal(signal.SIGTERM)
    elif how == "a daemon dies":
        nsqd = next(pid for pid, cmd in local.daemons.items() if " -m pynsqd " in f"{cmd} ")
        os.kill(nsqd, signal.SIGKILL)
    else:
        local.proc.kill()
    code = local.proc.wait(60)
    wait_for(local.all_gone, timeout=30, message="every daemon gone")
    wait_for(local.ports_free, timeout=30, message="ports free for the next run")
    if how == "launcher killed":
        return
    assert code == (1 if how == "a daemon dies" else 0), "\n".join(local.lines)
    assert local.lines[-1].endswith("[pynsqd-local] stopped")
    if how != "a daemon dies":
        # nsqd stopped cleanly: it wrote its metadata and said so
        assert any("NSQ: persisted" in line for line in local.lines)
        assert local.index(r"\[nsqadmin\].*exiting") < local.index(r"NSQ: persisted") < local.index(r"\[nsqlookupd\].*exiting")


def test_the_next_run_starts_cleanly_on_the_same_data(tmp_path):
    first = Local(tmp_path / "data")
    try:
        assert http_request("POST", f"http://{first.nsqd_http}/pub?topic=kept", b"still here")[0] == 200
        os.killpg(os.getpgid(first.proc.pid), signal.SIGTERM)
        assert first.proc.wait(60) == 0
    finally:
        first.cleanup()
    second = Local(tmp_path / "data")
    try:
        stats = http_request("GET", f"http://{second.nsqd_http}/stats?format=json&topic=kept")[1]
        assert b'"depth": 1' in stats or b'"depth":1' in stats
    finally:
        os.killpg(os.getpgid(second.proc.pid), signal.SIGTERM)
        assert second.proc.wait(60) == 0
        second.cleanup()
