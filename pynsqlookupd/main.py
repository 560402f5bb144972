"""``nsqlookupd`` on the command line: Go-style flags, signals, exit codes."""

from __future__ import annotations

import signal
import sys
from collections.abc import Sequence

import trio

from pynsqd import log as logging
from pynsqd import version_string
from pynsqd.flags import run_cli

from .nsqlookupd import ListenError, NSQLookupd
from .options import Options

PROG = "nsqlookupd"


async def serve(options: Options) -> int:
    """Run until SIGINT/SIGTERM; returns the process exit code."""
    log = logging.get_logger()
    lookupd = NSQLookupd(options)
    # the receiver is open before anything binds, so an early signal is
    # still a clean shutdown rather than a KeyboardInterrupt traceback
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            try:
                await nursery.start(lookupd.run)
            except ListenError as exc:
                log.critical(str(exc))
                return 1
            async for signum in signals:
                log.info("signal received, shutting down", signal=signal.Signals(signum).name)
                break
            lookupd.shutdown()
    return 0


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point (``pynsqlookupd``, ``python -m pynsqlookupd``)."""
    options, _ = run_cli(PROG, Options, sys.argv[1:] if argv is None else argv)
    if options.version:
        print(version_string(PROG))
        raise SystemExit(0)
    logging.configure(app=PROG, prefix=options.log_prefix, level=options.log_level, fmt=options.log_format)
    try:
        code = trio.run(serve, options)
    except KeyboardInterrupt:
        code = 0
    raise SystemExit(code)


if __name__ == "__main__":
    main()
