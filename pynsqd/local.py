"""``pynsqd-local``: a local NSQ in one command -- pynsqlookupd, then pynsqd
registered with it, then pynsqadmin -- for trying things out and development.

    pynsqd-local                      # loopback, Go's ports, data in ./data

Each daemon starts once the one before it is listening (so nsqd's first
lookupd connection succeeds), on the addresses given (port 0 works: the
ports the OS chose are passed on).  Their log lines go to stderr as they
come.  On SIGINT (Ctrl-C), SIGTERM (to this process or its process group)
or SIGHUP, and when any daemon exits on its own, the others are stopped in
reverse order with one SIGTERM each -- nsqd writes its queues to disk --
and waited for; a daemon that does not stop within ``--stop-timeout`` is
killed.  The daemons run in their own process group, so a signal meant for
this launcher's group reaches them once, through it; if the launcher is
killed outright (SIGKILL) they get SIGTERM from the kernel (Linux's parent
death signal).  Exit code: 0 after a requested stop, 1 when a daemon failed.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import IO

import attrs

from . import version_string
from .flags import flag_field, run_cli

PROG = "pynsqd-local"
LISTENING = re.compile(r"(TCP|HTTP|HTTPS): listening on (\S+)")

# run in the child before the daemon: die with the launcher (PR_SET_PDEATHSIG
# survives exec), and give up if the launcher is already gone
_CHILD = (
    "import ctypes, os, signal, sys\n"
    "try:\n"
    "    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)\n"
    "except (OSError, AttributeError):\n"
    "    pass\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    sys.exit(1)\n"
    "os.execv(sys.executable, [sys.executable, '-m', *sys.argv[2:]])\n"
)


@attrs.define(kw_only=True)
class LocalOptions:
    data_path: str = flag_field("./data", flag="data-path", kind="str", help="nsqd's data directory (created if missing)")
    nsqd_tcp_address: str = flag_field("127.0.0.1:4150", flag="nsqd-tcp-address", kind="str", help="nsqd's --tcp-address")
    nsqd_http_address: str = flag_field("127.0.0.1:4151", flag="nsqd-http-address", kind="str", help="nsqd's --http-address")
    lookupd_tcp_address: str = flag_field("127.0.0.1:4160", flag="lookupd-tcp-address", kind="str", help="nsqlookupd's --tcp-address")
    lookupd_http_address: str = flag_field("127.0.0.1:4161", flag="lookupd-http-address", kind="str", help="nsqlookupd's --http-address")
    admin_http_address: str = flag_field("127.0.0.1:4171", flag="admin-http-address", kind="str", help="nsqadmin's --http-address")
    broadcast_address: str = flag_field("127.0.0.1", flag="broadcast-address", kind="str", help="the address nsqd and nsqlookupd announce")
    start_timeout: float = flag_field(30.0, flag="start-timeout", kind="duration", help="how long each daemon may take to listen")
    stop_timeout: float = flag_field(30.0, flag="stop-timeout", kind="duration", help="how long each daemon may take to stop before it is killed")
    version: bool = flag_field(False, flag="version", kind="bool", help="print version string")


class Child:
    """One daemon: its process, and its stderr copied to ours line by line."""

    def __init__(self, name: str, module: str, args: Sequence[str], wake: threading.Event, out: IO[str]) -> None:
        self.name = name
        self.addresses: dict[str, str] = {}
        self._wake = wake
        self._out = out
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(os.getpid()), module, *args],
            stdin=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
            process_group=0,  # signals to our group reach the daemons only through us
        )
        self._thread = threading.Thread(target=self._copy, name=f"{name}-stderr", daemon=True)
        self._thread.start()

    def _copy(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._out.write(line)  # before acting on it: the log reads in order
            self._out.flush()
            m = LISTENING.search(line)
            if m:
                self.addresses[m.group(1)] = m.group(2)
                self._wake.set()
        self.proc.wait()
        self._wake.set()  # it exited

    def listening(self, kinds: Sequence[str]) -> bool:
        return all(k in self.addresses for k in kinds)

    def stop(self, timeout: float, log: IO[str]) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.write(f"[{PROG}] {self.name} did not stop within {timeout}s, killing it\n")
                self.proc.kill()
                self.proc.wait()
        self._thread.join(5)
        return self.proc.returncode


class Launcher:
    def __init__(self, opts: LocalOptions, out: IO[str] = sys.stderr) -> None:
        self.opts = opts
        self.out = out
        self.children: list[Child] = []
        self.wake = threading.Event()
        self.stop_requested: str | None = None

    def say(self, text: str) -> None:
        self.out.write(f"[{PROG}] {text}\n")
        self.out.flush()

    def on_signal(self, signum: int, frame: object) -> None:
        self.stop_requested = signal.Signals(signum).name
        self.wake.set()

    def failed(self) -> Child | None:
        return next((c for c in self.children if c.proc.poll() is not None), None)

    def start(self, name: str, module: str, args: Sequence[str], kinds: Sequence[str]) -> Child | None:
        """Start one daemon and wait until it listens; None if it exited,
        or a signal came, first."""
        self.say(f"starting {name}: {module} {' '.join(args)}")
        child = Child(name, module, args, self.wake, self.out)
        self.children.append(child)
        deadline = time.monotonic() + self.opts.start_timeout
        while not child.listening(kinds):
            if self.stop_requested or self.failed():
                return None
            if time.monotonic() > deadline:
                self.say(f"{name} did not listen within {self.opts.start_timeout}s")
                return None
            self.wake.wait(0.5)
            self.wake.clear()
        return child

    def run(self) -> int:
        o = self.opts
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, self.on_signal)
        try:
            os.makedirs(o.data_path, exist_ok=True)  # the one-command start's own folder
            lookupd = self.start(
                "nsqlookupd",
                "pynsqlookupd",
                [f"--tcp-address={o.lookupd_tcp_address}", f"--http-address={o.lookupd_http_address}", f"--broadcast-address={o.broadcast_address}"],
                ("TCP", "HTTP"),
            )
            nsqd = lookupd and self.start(
                "nsqd",
                "pynsqd",
                [
                    f"--data-path={o.data_path}",
                    f"--tcp-address={o.nsqd_tcp_address}",
                    f"--http-address={o.nsqd_http_address}",
                    f"--broadcast-address={o.broadcast_address}",
                    f"--lookupd-tcp-address={lookupd.addresses['TCP']}",
                ],
                ("TCP", "HTTP"),
            )
            admin = nsqd and self.start(
                "nsqadmin",
                "pynsqadmin",
                [f"--http-address={o.admin_http_address}", f"--lookupd-http-address={lookupd.addresses['HTTP']}"],  # type: ignore[union-attr]
                ("HTTP",),
            )
            if admin:
                assert lookupd is not None and nsqd is not None
                self.say(
                    f"ready: nsqd TCP {nsqd.addresses['TCP']} HTTP {nsqd.addresses['HTTP']}, "
                    f"nsqlookupd TCP {lookupd.addresses['TCP']} HTTP {lookupd.addresses['HTTP']}, "
                    f"nsqadmin http://{admin.addresses['HTTP']}/ (Ctrl-C stops all three)"
                )
                while not self.stop_requested and not self.failed():
                    self.wake.wait(1.0)
                    self.wake.clear()
        except OSError as exc:
            self.say(f"cannot start: {exc}")
            self.stop_all()
            return 1
        dead = self.failed()
        if self.stop_requested:
            self.say(f"{self.stop_requested} received, stopping")
            code = 0
        else:
            if dead is not None:
                self.say(f"{dead.name} exited with code {dead.proc.returncode}, stopping the others")
            code = 1
        self.stop_all()
        return code

    def stop_all(self) -> None:
        for child in reversed(self.children):
            child.stop(self.opts.stop_timeout, self.out)
        self.say("stopped")


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    opts, _ = run_cli(PROG, LocalOptions, args)
    if opts.version:
        print(version_string(PROG))
        return 0
    return Launcher(opts).run()


if __name__ == "__main__":
    raise SystemExit(main())
