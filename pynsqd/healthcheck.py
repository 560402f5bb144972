"""``python -m pynsqd.healthcheck [PID]``: is the daemon running as PID (the
container's PID 1 by default) answering ``/ping`` on the address *it was
configured with*?  The Docker image's HEALTHCHECK.

The daemon (pynsqd, pynsqlookupd or pynsqadmin) and its flags are read from
``/proc/PID/cmdline`` and resolved exactly as the daemon resolved them --
command line, then ``--config`` file, then defaults -- so ``--http-address``
moved to another port, or set in the config file, is where the check goes.
An unspecified host (``0.0.0.0``, ``[::]``) is asked on loopback; an nsqd
that requires TLS for HTTP (``--tls-required=true``) is asked over HTTPS.
Exit 0 when the answer starts with ``OK``, 1 otherwise (with the reason).
"""

from __future__ import annotations

import os
import ssl
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

from .flags import FlagError, HelpRequested, resolve

DAEMONS = ("pynsqd", "pynsqlookupd", "pynsqadmin")
TIMEOUT = 3.0


def daemon_argv(cmdline: Sequence[str]) -> tuple[str, list[str]]:
    """(daemon, its flags) from a process's argv: ``pynsqd --x`` (console
    script, also behind the interpreter) or ``python -m pynsqd --x``."""
    for i, arg in enumerate(cmdline):
        name = os.path.basename(arg)
        if name in DAEMONS:
            return name, list(cmdline[i + 1 :])
        if arg == "-m" and i + 1 < len(cmdline) and cmdline[i + 1] in DAEMONS:
            return cmdline[i + 1], list(cmdline[i + 2 :])
    raise ValueError(f"not a pynsqd daemon: {' '.join(cmdline)[:200]}")


def options_for(daemon: str, flags: Sequence[str]) -> Any:
    if daemon == "pynsqd":
        from .options import Options
    elif daemon == "pynsqlookupd":
        from pynsqlookupd.options import Options  # type: ignore[no-redef]
    else:
        from pynsqadmin.options import Options  # type: ignore[no-redef]
    options, _ = resolve(Options, flags)
    return options


def _local(address: str) -> str:
    host, _, port = address.rpartition(":")
    if host in ("", "0.0.0.0", "[::]", "::"):
        host = "127.0.0.1" if host != "[::]" else "[::1]"
    return f"{host}:{port}"


def ping_url(daemon: str, options: Any) -> tuple[str, ssl.SSLContext | None]:
    if daemon == "pynsqd" and options.tls_required == "true" and options.https_address:
        # plain HTTP only points at HTTPS then; the certificate is the daemon's own
        return f"https://{_local(options.https_address)}/ping", ssl._create_unverified_context()
    base = getattr(options, "base_path", "/") or "/"
    if not base.endswith("/"):
        base += "/"
    return f"http://{_local(options.http_address)}{base}ping", None


def check(pid: int = 1) -> str:
    """'' when healthy, else why not."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            cmdline = [a.decode(errors="replace") for a in fh.read().split(b"\0") if a]
        daemon, flags = daemon_argv(cmdline)
        options = options_for(daemon, flags)
    except (OSError, ValueError, FlagError, HelpRequested) as exc:
        return f"cannot tell what to check: {exc}"
    url, context = ping_url(daemon, options)
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT, context=context) as resp:  # noqa: S310 - our own daemon
            body = resp.read(200)
    except urllib.error.HTTPError as exc:
        return f"{url}: HTTP {exc.code} {exc.read(200).decode(errors='replace')}"
    except OSError as exc:
        return f"{url}: {exc}"
    return "" if body.startswith(b"OK") else f"{url}: {body.decode(errors='replace')}"


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    problem = check(int(args[0]) if args else 1)
    if problem:
        sys.stderr.write(f"unhealthy: {problem}\n")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
