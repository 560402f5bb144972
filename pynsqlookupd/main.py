"""``nsqlookupd`` on the command line: Go-style flags, signals, exit codes."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from pynsqd.daemon import daemon_main

from .nsqlookupd import NSQLookupd
from .options import Options

PROG = "nsqlookupd"


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point (``pynsqlookupd``, ``python -m pynsqlookupd``)."""
    daemon_main(PROG, Options, sys.argv[1:] if argv is None else argv, NSQLookupd)


if __name__ == "__main__":
    main()
