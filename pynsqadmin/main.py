"""``nsqadmin`` on the command line: Go-style flags, signals, exit codes."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from pynsqd.daemon import daemon_main
from pynsqd.log import get_logger

from .nsqadmin import NSQAdmin
from .options import Options

PROG = "nsqadmin"


def _warn_if_blind(options: Options) -> None:
    if not options.lookupd_http_addresses and not options.nsqd_http_addresses:
        get_logger().warning("no --lookupd-http-address or --nsqd-http-address: there is nothing to show")


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point (``pynsqadmin``, ``python -m pynsqadmin``)."""
    daemon_main(PROG, Options, sys.argv[1:] if argv is None else argv, NSQAdmin, _warn_if_blind)


if __name__ == "__main__":
    main()
