"""``pynsqd``: the nsqd command line — a drop-in for the ``nsqd`` binary."""

from __future__ import annotations

import sys
from collections.abc import Sequence

import trio

from . import log as logging_setup
from . import version_string
from .daemon import log_flag_warnings, run_until_signal
from .flags import run_cli
from .nsqd import NSQD, DataPathLocked
from .options import Options


async def serve(options: Options) -> None:
    nsqd = NSQD(options)
    nsqd.log.info(version_string("nsqd"))
    nsqd.lock_data_path()

    async def body(stop: trio.CancelScope) -> None:
        nsqd.log.info(f"ID: {options.node_id}")
        nsqd.load_metadata()
        nsqd.persist_metadata()
        with stop:
            await nsqd.run()  # until the signal; then it writes its queues to disk

    try:
        await run_until_signal(body)
    finally:
        nsqd.unlock_data_path()


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    options, parsed = run_cli("pynsqd", Options, args)
    if options.version:
        print(version_string("nsqd"))
        return 0
    logging_setup.configure(app="nsqd", prefix=options.log_prefix, level=options.log_level, fmt=options.log_format)
    log_flag_warnings(parsed)
    try:
        trio.run(serve, options)
    except BaseException as exc:  # noqa: BLE001 - turned into one line below
        leaves = _leaves(exc)
        if all(isinstance(e, KeyboardInterrupt) for e in leaves):
            return 130
        if all(isinstance(e, (DataPathLocked, OSError, ValueError)) for e in leaves):
            # e.g. the data path in use or a listen address taken: one line,
            # as nsqd's fatal log, not a traceback
            for e in leaves:
                sys.stderr.write(f"{options.log_prefix}FATAL: {e}\n")
            return 1
        raise
    return 0


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [exc]


if __name__ == "__main__":
    raise SystemExit(main())
